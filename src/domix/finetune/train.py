"""Fine-tuning a task model: data, the method's structure on the frozen base, the shared
training recipe (`domix.training`), evaluation, and the task-model files."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ..checkpoints import resolve_base
from ..distributed import barrier, main_process_first, on_main
from ..models import load_tokenizer
from ..data.tasks import TaskDataError, classify_dataset, generate_dataset, label_names, pad_collator, read_jsonl
from ..training import KEEP_BEST_FILE, build_trainer, finished, keep_best, resume_point, setup, total_steps
from .config import TASKS, FinetuneConfig
from .evaluate import classification_metrics, evaluate_rows
from .methods import METHODS, get_method
from .plots import plot_history
from .taskmodel import build_model, save_task_model


def _check(cfg: FinetuneConfig) -> FinetuneConfig:
    """Refuse a config that cannot run, before anything is loaded; the method's own checks."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown --task {cfg.task!r} (classify or generate)")
    if cfg.init_module and cfg.method != "lora":
        raise ValueError("--init-module needs --method lora and --library")
    method = get_method(cfg.method)
    _refuse_other_methods_options(cfg, method)
    cfg = method.prepare(cfg)
    if cfg.task == "generate":
        from transformers import AutoConfig

        from ..models import is_masked_lm

        if is_masked_lm(AutoConfig.from_pretrained(resolve_base(cfg.base))):
            raise ValueError("--task generate needs a decoder (causal LM) base; this base is an encoder")
    return cfg


def _refuse_other_methods_options(cfg: FinetuneConfig, method) -> None:
    """An option of another method, set to other than its default, is refused by name: it would be
    silently ignored (`--lora-rank` with `--method domix`)."""
    from ..training import defaults

    others = set().union(*(m.fields for m in METHODS.values())) - method.fields
    default = defaults(FinetuneConfig)
    stray = sorted(f for f in others if getattr(cfg, f) != default[f])
    if stray:
        owners = {f: "/".join(m.name for m in METHODS.values() if f in m.fields) for f in stray}
        named = ", ".join(f"--{f.replace('_', '-')} (--method {owners[f]})" for f in stray)
        raise ValueError(f"{named} {'does' if len(stray) == 1 else 'do'} not apply to --method {cfg.method}")


def _datasets(cfg: FinetuneConfig, tokenizer):
    """(train rows, eval rows, labels, train dataset, eval dataset) of the task files."""
    fields = ("text", "label") if cfg.task == "classify" else ("prompt", "answer")
    train_rows, eval_rows = read_jsonl(cfg.train, fields), read_jsonl(cfg.eval, fields)
    if cfg.task == "generate":
        return (train_rows, eval_rows, None, generate_dataset(train_rows, tokenizer, cfg.max_seq_len),
                generate_dataset(eval_rows, tokenizer, cfg.max_seq_len))
    labels = label_names(train_rows)
    if len(labels) < 2:
        raise TaskDataError(f"{cfg.train}: a classification task needs at least two labels, found {labels}")
    return (train_rows, eval_rows, labels, classify_dataset(train_rows, tokenizer, labels, cfg.max_seq_len, cfg.train),
            classify_dataset(eval_rows, tokenizer, labels, cfg.max_seq_len, cfg.eval))


def finetune(cfg: FinetuneConfig | None = None, callbacks=None, **kwargs) -> dict:
    """Fine-tune a task model and write it atomically to `cfg.out`. Returns its metrics.

    Under a launcher (`torchrun`, `accelerate launch`) the Trainer trains with DDP; rank 0
    evaluates the final model and writes it, and every rank returns the same metrics."""
    from transformers import set_seed

    cfg = cfg or FinetuneConfig(**kwargs)
    out = Path(cfg.out)
    if finished(out, cfg, f"task model {out}"):
        return json.loads((out / "metrics.json").read_text())
    setup(cfg)
    t0 = time.time()
    with main_process_first():  # an error on any rank (a file one rank cannot read) stops every rank
        cfg = _check(cfg)
        method = get_method(cfg.method)
        tokenizer = load_tokenizer(cfg.base)
        train_rows, eval_rows, labels, train_ds, eval_ds = _datasets(cfg, tokenizer)
        set_seed(cfg.seed)
        model, info = build_model(cfg, labels)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if not method.mixing(n)], "lr": cfg.lr,
               "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in trainable if method.mixing(n)], "lr": method.mixing_lr(cfg),
               "weight_decay": 0.0}]
    steps = total_steps(cfg, len(train_ds))
    work = out.parent / f".{out.name}.work"
    kept = cfg.keep_best or cfg.patience
    last = on_main(lambda: resume_point(work, cfg.resume, also=(KEEP_BEST_FILE,) if kept else ()))

    def compute_metrics(p):
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        m = classification_metrics(p.label_ids.tolist(), logits.argmax(-1).tolist(), labels)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    best = None
    if kept:  # classify: the best macro-F1; generate: the lowest loss
        best = keep_best("eval_macro_f1" if cfg.task == "classify" else "eval_loss", greater=cfg.task == "classify",
                         patience=cfg.patience, resume_from=last)
    trainer = build_trainer(model, cfg, work=work, train_dataset=train_ds, data_collator=pad_collator(tokenizer),
                            steps=steps, param_groups=groups, eval_dataset=eval_ds,
                            lm_objective="clm" if cfg.task == "generate" else None,
                            eval_steps=cfg.eval_every or max(1, steps // 4),
                            compute_metrics=compute_metrics if cfg.task == "classify" else None,
                            logging_steps=max(1, min(10, steps // 20)),
                            callbacks=[*(callbacks or []), *([best] if best else [])])
    result = trainer.train(resume_from_checkpoint=last)
    train_time = time.time() - t0
    barrier()  # every rank's last checkpoint files are written before rank 0 removes the work area

    def write() -> dict:  # rank 0: the final evaluation and the task model
        task = {"task": cfg.task, "labels": labels, "max_seq_len": cfg.max_seq_len,
                "max_new_tokens": cfg.max_new_tokens, "where": str(cfg.eval)}
        final = evaluate_rows(model, tokenizer, task, eval_rows)
        history = [dict(h) for h in trainer.state.log_history]
        n_train = sum(p.numel() for _, p in trainable)
        n_total = sum(p.numel() for p in model.parameters())
        ran = trainer.state.global_step  # fewer than `steps` when --patience stopped the run
        metrics = {"method": cfg.method, "task": cfg.task, "accuracy": final["accuracy"], "macro_f1": final.get("macro_f1"),
                   "eval": final, "trainable_params": n_train, "total_params": n_total,
                   "trainable_fraction": n_train / n_total, "train_loss": result.training_loss, "steps": steps,
                   "steps_run": ran, "kept_step": best.step if best and best.step is not None else ran,
                   "best_eval": best.best if best else None, "train_time_s": round(train_time, 2),
                   "step_time_s": round(result.metrics.get("train_runtime", train_time) / max(1, ran), 4),
                   "history": history, "resumed_from": Path(last).name if last else None,
                   **({"module_selection": info["module_selection"]} if "module_selection" in info else {})}
        spec = {"base": cfg.base, "base_path": resolve_base(cfg.base), **info, "method": cfg.method, "task": cfg.task,
                "labels": labels, "max_seq_len": cfg.max_seq_len, "max_new_tokens": cfg.max_new_tokens,
                "settings": asdict(cfg)}
        keep = method.saved(model)
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in keep}
        plots = [lambda stage: plot_history(history, stage / "loss.png"), *method.plots(model, info, metrics)]
        save_task_model(out, model, tokenizer, spec, metrics, tensors, work, plots)
        shutil.rmtree(work, ignore_errors=True)
        return metrics

    return on_main(write)
