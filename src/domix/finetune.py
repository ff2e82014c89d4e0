"""Stage 3: end-task fine-tuning of a task model, and loading one back.

A task model directory holds `task.json` (base, fingerprint, method, modules, labels, layout),
`model.safetensors` (every tensor that differs from the base: the bridges' A, P, B and the
task head; all weights for full fine-tuning), the tokenizer, `metrics.json` and plots.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .io import atomic_dir, write_json
from .checkpoints import DEFAULT_BASE, resolve_base
from .models import backbone, fingerprint, load_model, load_tokenizer, select_device
from .library import Library
from .tasks import (TaskDataError, classify_dataset, generate_dataset, label_names, pad_collator, prompt_ids,
                    read_jsonl)

TASK_FILE = "task.json"
WEIGHTS = "model.safetensors"
METHODS = ("domix", "lora", "dora", "full", "mode")


@dataclass
class FinetuneConfig:
    """Options of `domix finetune`."""

    train: str
    eval: str
    out: str
    library: str | None = None
    base: str = DEFAULT_BASE
    modules: str = "all"
    method: str = "domix"
    task: str = "classify"
    bridge_init: str = "uniform"  # chosen on dev macro-F1 of the quick benchmark (README)
    bridge_lr: float = 3e-3
    freeze_bridge: bool = False
    lora_rank: int = 32
    lora_alpha: float | None = None
    init_module: str | None = None  # method lora: start from this module of `library` (A and B trainable)
    from_composed: str | None = None  # method mode: start from a composed MoDE model
    freeze_experts: bool = False  # method mode: train gates and head only
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: float = 0.1
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 16
    max_seq_len: int = 128
    seed: int = 0
    eval_every: int = 0
    save_steps: int = 100
    device: str = "auto"
    dtype: str = "fp32"
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None
    max_new_tokens: int = 32
    progress: bool = True


# ---------------------------------------------------------------- building the model
def _head_and_new(model, missing: list[str]) -> list[str]:
    """Parameter names of the task head: outside the backbone, or newly initialised."""
    body = {f"{model.base_model_prefix}.{n}" for n, _ in backbone(model).named_parameters()}
    return [n for n, _ in model.named_parameters() if n not in body or n in set(missing)]


def build_model(cfg: FinetuneConfig, labels: list[str] | None, layout: dict | None = None):
    """The base with its head and the method's trainable structure. Returns (model, info)."""
    from .bridge.apply import apply_bridge, restore_bridge

    id2label = {i: l for i, l in enumerate(labels)} if labels else None
    model, _ = _load_base(cfg, id2label)
    base_fp = fingerprint(model)
    info = {"base_fingerprint": base_fp, "modules": []}
    head = getattr(model, "_domix_head", [])
    if cfg.method == "domix":
        if layout is None:
            mods = Library(cfg.library).select(cfg.modules)
            layout = apply_bridge(model, mods, cfg.bridge_init, base_fp)
            info["modules"] = [{"name": m.name, "base_fingerprint": m.meta["base_fingerprint"],
                                "rank": m.meta.get("rank"), "alpha": m.meta.get("alpha"),
                                "domain": m.meta.get("domain"), "tokens": m.meta.get("tokens")} for m in mods]
        else:
            restore_bridge(model, layout, _empty_bridge_tensors(layout, model))
        info["layout"] = layout
        for n, p in model.named_parameters():
            p.requires_grad_(n in head or n.endswith("lora_B") or (n.endswith("lora_P") and not cfg.freeze_bridge))
    elif cfg.method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        from .models import target_regex

        shape = dict(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                     target_modules=target_regex(model, "all-linear"))
        init = None
        if cfg.init_module:
            init, shape = _init_module(cfg)
            init.check_base(base_fp)
            info["init_module"] = {"name": init.name, "path": str(init.path), **shape,
                                   "base_fingerprint": init.meta["base_fingerprint"],
                                   "domain": init.meta.get("domain"), "tokens": init.meta.get("tokens")}
        lcfg = LoraConfig(**shape, use_dora=cfg.method == "dora",
                          modules_to_save=sorted({n.rsplit(".", 1)[0] for n in head}) or None)
        torch.manual_seed(cfg.seed)
        model = get_peft_model(model, lcfg).base_model.model  # keep the plain class; PEFT layers stay inside
        if init is not None:
            _load_lora(model, init)
    elif cfg.method == "mode":
        _build_mode(model, cfg, info, base_fp, saved=layout)
        for n, p in model.named_parameters():
            if n in head:
                p.requires_grad_(True)
    elif cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        raise ValueError(f"unknown --method {cfg.method!r} ({', '.join(METHODS)})")
    return model, info


def _init_module(cfg: FinetuneConfig):
    """The library module a LoRA fine-tuning starts from, and its LoRA shape (r, alpha, targets)."""
    if cfg.method != "lora" or not cfg.library:
        raise ValueError("--init-module needs --method lora and --library")
    mod = Library(cfg.library).get(cfg.init_module)
    if mod.kind != "lora":
        raise ValueError(f"module '{mod.name}' is a {mod.kind}, not a LoRA domain module")
    acfg = json.loads((mod.path / "adapter_config.json").read_text())
    return mod, {"r": acfg["r"], "lora_alpha": acfg["lora_alpha"], "target_modules": acfg["target_modules"],
                 "use_rslora": bool(acfg.get("use_rslora"))}


def _load_lora(model, mod) -> None:
    """Copy a module's A and B into the (default) LoRA of every layer it adapts."""
    from .lora import lora_pairs
    from .library import LibraryError

    pairs = lora_pairs(mod.tensors())
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    if set(pairs) != wrapped:
        raise LibraryError(f"module '{mod.name}' adapts {len(pairs)} layers; the LoRA built from its config "
                           f"has {len(wrapped)} (e.g. {sorted(set(pairs) ^ wrapped)[:2]})")
    with torch.no_grad():
        for layer, (a, b) in pairs.items():
            m = model.get_submodule(layer)
            m.lora_A["default"].weight.copy_(a)
            m.lora_B["default"].weight.copy_(b)


def _build_mode(model, cfg: FinetuneConfig, info: dict, base_fp: str, saved: dict | None) -> None:
    """MoDE experts beside the frozen base: from a composed model, from library experts with
    fresh gates, or (`saved` layout, when loading a task model) empty experts to load into."""
    from .mode import apply_mode, load_mode, set_trainable

    if saved:
        apply_mode(model, saved["experts"], blocks=saved["blocks"], expert_layers=saved["expert_layers"],
                   init="random")
    elif cfg.from_composed:
        load_mode(model, cfg.from_composed)
    else:
        if not cfg.library:
            raise ValueError("--method mode needs --library (its MoDE experts) or --from-composed")
        apply_mode(model, Library(cfg.library).select(cfg.modules, kind="mode-expert"), base_fingerprint=base_fp)
    mode = model.domix_mode
    set_trainable(model, experts=not cfg.freeze_experts, gates=True)
    info["mode_layout"] = {"experts": list(mode.names), "blocks": mode.layout.blocks,
                           "expert_layers": mode.layout.expert_layers}
    info["modules"] = [{"name": n, "kind": "mode-expert"} for n in mode.names]


def _load_base(cfg: FinetuneConfig, id2label):
    if cfg.task == "classify":
        from transformers import AutoModelForSequenceClassification

        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolve_base(cfg.base), num_labels=len(id2label), id2label=id2label,
            label2id={v: k for k, v in id2label.items()}, output_loading_info=True)
        missing = info["missing_keys"]
    else:
        model, objective = load_model(cfg.base, head="lm", objective="clm")
        missing = []
    tok = load_tokenizer(cfg.base)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    model._domix_head = _head_and_new(model, missing) if cfg.task == "classify" else []
    return model, info if cfg.task == "classify" else {}


def _empty_bridge_tensors(layout, model):
    out = {}
    for layer, info in layout.items():
        base = model.get_submodule(layer)
        r = sum(info["ranks"])
        out.update({f"{layer}.lora_A": torch.zeros(r, base.in_features), f"{layer}.lora_P": torch.zeros(r, r),
                    f"{layer}.lora_B": torch.zeros(base.out_features, r)})
    return out


def _mixing(name: str) -> bool:
    """The parameters that mix modules — DoMIX's bridge P, MoDE's gates and scales — get `bridge_lr`."""
    return name.endswith("lora_P") or (name.startswith("domix_mode.") and (".gate." in name or name.endswith(".scale")))


def saved_state(model) -> dict:
    """Every tensor a task model needs beyond the base: trainable parameters and bridge buffers."""
    from .bridge.layer import BridgeLinear

    keep = {n for n, p in model.named_parameters() if p.requires_grad or n.startswith("domix_mode.")}
    for name, m in model.named_modules():
        if isinstance(m, BridgeLinear):
            keep |= {f"{name}.lora_A", f"{name}.lora_P", f"{name}.lora_B"}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in keep}


# ---------------------------------------------------------------- metrics and plots
def classification_metrics(y_true, y_pred, labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    ids = list(range(len(labels)))
    per = f1_score(y_true, y_pred, labels=ids, average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
            "per_class_f1": {labels[i]: float(per[i]) for i in ids},
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(), "labels": labels}


@torch.no_grad()
def predict_classify(model, tokenizer, texts, pairs=None, batch_size: int = 32, max_len: int = 128):
    """Class probabilities for a list of texts (optional text pairs)."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None, truncation=True,
                        max_length=max_len, padding=True, return_tensors="pt").to(dev)
        out.append(torch.softmax(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                                 .logits.float(), -1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers, one prompt at a time (no padding subtleties)."""
    model.eval()
    dev = next(model.parameters()).device
    answers = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, p)], device=dev)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def evaluate_rows(model, tokenizer, task: dict, rows: list[dict], batch_size: int = 32) -> dict:
    """accuracy, macro-F1, per-class F1, confusion matrix (classify); exact match (generate)."""
    from .tasks import encode_labels

    if task["task"] == "classify":
        labels = task["labels"]
        y = encode_labels(rows, labels, task.get("where", "evaluation data"))
        probs = predict_classify(model, tokenizer, [r["text"] for r in rows],
                                 [r["text_pair"] for r in rows] if any("text_pair" in r for r in rows) else None,
                                 batch_size, task["max_seq_len"])
        return {"examples": len(rows), **classification_metrics(y, probs.argmax(-1).tolist(), labels)}
    preds = generate_answers(model, tokenizer, [r["prompt"] for r in rows], task.get("max_new_tokens", 32))
    gold = [str(r["answer"]).strip() for r in rows]
    names = sorted(set(gold) | set(preds))
    m = classification_metrics([names.index(g) for g in gold], [names.index(p) for p in preds], names)
    return {"examples": len(rows), "accuracy": m["accuracy"], "exact_match": m["accuracy"],
            "macro_f1": m["macro_f1"], "predictions": preds[:20]}


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    tr = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bridge(model, layout: dict, names: list[str], path: Path) -> dict:
    """Per layer type, the mean Frobenius norm of each domain-by-domain block of P."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .bridge.apply import bridged_layers

    grids: dict[str, list] = {}
    for layer, m in bridged_layers(model).items():
        mods, ranks = layout[layer]["modules"], layout[layer]["ranks"]
        P = m.lora_P.detach().float().cpu()
        edges = [0] + list(torch.tensor(ranks).cumsum(0).tolist())
        g = torch.full((len(names), len(names)), float("nan"))
        for i, a in enumerate(mods):
            for j, b in enumerate(mods):
                g[names.index(a), names.index(b)] = P[edges[i]:edges[i + 1], edges[j]:edges[j + 1]].norm()
        grids.setdefault(layer.rsplit(".", 1)[-1], []).append(g)
    means = {k: torch.stack(v).nanmean(0) for k, v in sorted(grids.items())}
    cols = min(4, len(means)) or 1
    rows = math.ceil(len(means) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (kind, g) in zip(axes.flat, means.items()):
        im = ax.imshow(g.numpy(), cmap="viridis")
        ax.set_title(kind, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(means):]:
        ax.axis("off")
    fig.suptitle("bridge ||P block|| per layer type (rows: output domain, cols: input domain)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {k: v.tolist() for k, v in means.items()}


# ---------------------------------------------------------------- training
def finetune(cfg: FinetuneConfig | None = None, callbacks=None, **kwargs) -> dict:
    """Fine-tune a task model and write it atomically to `cfg.out`. Returns its metrics."""
    from safetensors.torch import save_file
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    cfg = cfg or FinetuneConfig(**kwargs)
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite and not cfg.resume:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if cfg.method == "domix" and not cfg.library:
        raise ValueError("--method domix needs --library")
    if cfg.init_module:  # the LoRA's shape is the module's: say so in the saved settings
        _, shape = _init_module(cfg)
        cfg = replace(cfg, lora_rank=shape["r"], lora_alpha=shape["lora_alpha"])
    if cfg.task not in ("classify", "generate"):
        raise ValueError(f"unknown --task {cfg.task!r} (classify or generate)")
    if cfg.task == "generate":
        from transformers import AutoConfig

        from .models import is_masked_lm

        if is_masked_lm(AutoConfig.from_pretrained(resolve_base(cfg.base))):
            raise ValueError("--task generate needs a decoder (causal LM) base; this base is an encoder")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.progress:
        from .library.pretrain import _quiet
        _quiet()
    device = select_device(cfg.device)
    t0 = time.time()
    tokenizer = load_tokenizer(cfg.base)
    fields = ("text", "label") if cfg.task == "classify" else ("prompt", "answer")
    train_rows, eval_rows = read_jsonl(cfg.train, fields), read_jsonl(cfg.eval, fields)
    labels = label_names(train_rows) if cfg.task == "classify" else None
    if cfg.task == "classify":
        if len(labels) < 2:
            raise TaskDataError(f"{cfg.train}: a classification task needs at least two labels, found {labels}")
        train_ds = classify_dataset(train_rows, tokenizer, labels, cfg.max_seq_len, cfg.train)
        eval_ds = classify_dataset(eval_rows, tokenizer, labels, cfg.max_seq_len, cfg.eval)
    else:
        train_ds = generate_dataset(train_rows, tokenizer, cfg.max_seq_len)
        eval_ds = generate_dataset(eval_rows, tokenizer, cfg.max_seq_len)

    set_seed(cfg.seed)
    model, info = build_model(cfg, labels)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    bridge = [p for n, p in trainable if _mixing(n)]
    rest = [p for n, p in trainable if not _mixing(n)]
    groups = [{"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if bridge:
        groups.append({"params": bridge, "lr": cfg.bridge_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_ds) / cfg.batch_size))

    work = out.parent / f".{out.name}.work"
    last = get_last_checkpoint(str(work)) if cfg.resume and work.is_dir() else None
    if last is None and work.exists():
        shutil.rmtree(work)
    eval_every = cfg.eval_every or max(1, steps // 4)
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=32,
        learning_rate=cfg.lr, lr_scheduler_type="linear", warmup_steps=int(cfg.warmup * steps), max_steps=steps,
        logging_steps=max(1, min(10, steps // 20)), eval_strategy="steps", eval_steps=eval_every,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1, report_to=["tensorboard"],
        seed=cfg.seed, data_seed=cfg.seed, use_cpu=device.type == "cpu", bf16=cfg.dtype == "bf16",
        fp16=cfg.dtype == "fp16", dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=not cfg.progress, save_only_model=False)

    def compute_metrics(p):
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        m = classification_metrics(p.label_ids.tolist(), logits.argmax(-1).tolist(), labels)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=pad_collator(tokenizer), optimizers=(optimizer, None), callbacks=callbacks,
                      compute_metrics=compute_metrics if cfg.task == "classify" else None)
    if not cfg.progress:
        from transformers import PrinterCallback
        trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=last)
    train_time = time.time() - t0

    task = {"task": cfg.task, "labels": labels, "max_seq_len": cfg.max_seq_len,
            "max_new_tokens": cfg.max_new_tokens, "where": str(cfg.eval)}
    final = evaluate_rows(model, tokenizer, task, eval_rows)
    history = [{k: v for k, v in h.items()} for h in trainer.state.log_history]
    n_train = sum(p.numel() for _, p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    metrics = {"method": cfg.method, "task": cfg.task, "accuracy": final["accuracy"], "macro_f1": final["macro_f1"],
               "eval": final, "trainable_params": n_train, "total_params": n_total,
               "trainable_fraction": n_train / n_total, "train_loss": result.training_loss, "steps": steps,
               "train_time_s": round(train_time, 2),
               "step_time_s": round(result.metrics.get("train_runtime", train_time) / max(1, steps), 4),
               "history": history, "resumed_from": Path(last).name if last else None}
    spec = {"format": 1, "base": cfg.base, "base_path": resolve_base(cfg.base), **info, "method": cfg.method,
            "task": cfg.task, "labels": labels, "max_seq_len": cfg.max_seq_len,
            "max_new_tokens": cfg.max_new_tokens, "settings": asdict(cfg)}
    with atomic_dir(out, overwrite=True) as stage:
        save_file(saved_state(model), str(stage / WEIGHTS))
        tokenizer.save_pretrained(stage)
        write_json(stage / TASK_FILE, spec)
        plot_history(history, stage / "loss.png")
        if cfg.method == "domix":
            names = [m["name"] for m in info["modules"]]
            metrics["bridge_blocks"] = plot_bridge(model, info["layout"], names, stage / "bridge.png")
        if (work / "runs").is_dir():
            shutil.copytree(work / "runs", stage / "runs")
        write_json(stage / "metrics.json", metrics)
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def load_task_model(path: str | Path, device: str = "auto"):
    """(model, tokenizer, spec) of a saved task model; refuses a base with another fingerprint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .library import LibraryError

    path = Path(path)
    if not (path / TASK_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a domix task model (no {TASK_FILE})")
    spec = json.loads((path / TASK_FILE).read_text())
    s = spec["settings"]
    cfg = FinetuneConfig(**{**s, "base": spec["base"]})
    if spec["method"] == "domix":
        model, info = build_model(cfg, spec["labels"], layout=spec["layout"])
    elif spec["method"] == "mode":
        model, info = build_model(cfg, spec["labels"], layout=spec["mode_layout"])
    else:
        model, info = build_model(cfg, spec["labels"])
    if info["base_fingerprint"] != spec["base_fingerprint"]:
        raise LibraryError(f"task model {path} was trained on base fingerprint {spec['base_fingerprint']}, "
                           f"but '{spec['base']}' now has {info['base_fingerprint']}")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise LibraryError(f"task model {path}: {WEIGHTS} is unreadable or truncated ({e})") from None
    own = model.state_dict()
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise LibraryError(f"task model {path}: tensors {unknown[:3]} do not fit the model")
    model.load_state_dict(tensors, strict=False)
    model.to(select_device(device)).eval()
    return model, load_tokenizer(str(path)) if (path / "tokenizer_config.json").exists() else load_tokenizer(spec["base"]), spec
