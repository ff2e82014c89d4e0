"""MoDE training: one expert per domain on its own corpus, then composition on mixed domains.

Both run the frozen base with `apply_mode` under transformers' `Trainer` (progress bars,
TensorBoard logs, checkpoints for `resume`), like stage-1 LoRA pre-training; checkpoints hold
only the trained tensors. Experts (layers and output maps) and gates have their own learning
rates (`lr`, `gate_lr`).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..checkpoints import DEFAULT_BASE
from ..io import atomic_dir, write_json
from ..library import META, Library
from ..library.store import entry_name, one_base
from ..models import fingerprint, load_model, load_tokenizer, select_device
from ..distributed import barrier, main_process_first, on_main
from ..training import LMTrainOptions, build_trainer, finished, keep_logs, option, resume_point, run_record, run_seed, setup, \
    total_steps, trained
from .layer import GATE_CONTEXT_HELP, GATE_CONTEXTS, GATE_FORM_HELP, GATE_FORMS
from .model import EXPERT_FILE, apply_mode, load_mode_model, read_meta, save_mode, set_trainable

CHECKPOINT_FILE = "model.safetensors"


@dataclass(kw_only=True)
class ModeTrainOptions(LMTrainOptions):
    """Training options shared by `mode pretrain` and `mode compose`: two learning rates."""

    lr: float = option(1e-4, "experts' learning rate: their layers and output maps (full transformer layers, so "
                             "lower than LoRA's 5e-4)")
    gate_lr: float = option(1e-3, "gates' learning rate (zero-initialised; like DoMIX's bridge lr)")
    weight_decay: float = option(0.0, "expert layers' weight decay")


@dataclass(kw_only=True)
class ModePretrainConfig(ModeTrainOptions):
    """Options of `domix mode pretrain` (underscored keys are also its domains.yaml keys)."""

    kind: ClassVar[str] = "mode-expert"
    domain: str = option(help="one domain: the expert's name in the library")
    data: list[str] = option(help="one domain: .txt (a document per line), .jsonl/.json, .csv, a directory, or a "
                                  "saved dataset")
    library: str = option(help="library directory (an expert is an entry of kind mode-expert)")
    base: str = option(DEFAULT_BASE, "'smollm2-135m' (the offline default) or a Hugging Face model id / local path")
    blocks: int | None = option(None, "B blocks (default: domix.mode.default_layout, 3 for the default model)")
    expert_layers: int | None = option(None, "k layers per expert and block (default: domix.mode.default_layout, "
                                             "2 for the default model)")
    expert_init: str = option("copy", "copy: the block's last k backbone layers; random: fresh layers",
                              choices=("copy", "random"))
    seed: int = option(0, "run seed; an expert's seed derives from it and its name")


@dataclass(kw_only=True)
class ComposeConfig(ModeTrainOptions):
    """Options of `domix mode compose`."""

    library: str = option(help="library directory holding the experts")
    out: str = option(help="output directory of the MoDE model")
    experts: str | list[str] = option("all", "'all' (every mode-expert of the library) or a,b,...")
    data: list[str] | None = option(None, "one corpus per domain, mixed in equal parts (PATH or NAME=PATH); "
                                          "default: the experts' own")
    base: str | None = option(None, "default: the base the experts were trained on")
    freeze_experts: bool = option(False, "train the gates only")
    routing_loss: float = option(1.0, "weight of the routing loss: on the text of a corpus named as an expert, "
                                      "the gate learns to give that expert the weight its own gate gave it alone, "
                                      "the backbone the rest and the other experts none (with --gate-form routed: "
                                      "the router learns to pick that expert); 0: the LM loss alone trains the gates")
    gate_context: str = option("token", GATE_CONTEXT_HELP, choices=GATE_CONTEXTS)
    gate_form: str = option("softmax", GATE_FORM_HELP, choices=GATE_FORMS)


def _trainer_class():
    from safetensors.torch import load_file, save_file
    from transformers import Trainer

    from ..lm import ChunkedLMLossMixin

    class ModeTrainer(ChunkedLMLossMixin, Trainer):
        """Checkpoints hold only the trained tensors (experts, gates, a head), not the frozen base.
        A batch with `route` (each row's own expert, `RoutedCollator`) adds `routing_loss` times the
        gates' routing loss (`Mode.routing_targets`) to the LM loss."""

        routing_loss: float = 0.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            route = inputs.pop("route", None)
            if route is None or not self.routing_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            from .model import mode_of

            with mode_of(self.accelerator.unwrap_model(model)).routing_targets(route) as routed:
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                aux = routed()
            if aux is None:
                return out
            scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else \
                (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
            if scaled:  # the Trainer will not divide this micro-batch's loss by the accumulation steps
                aux = aux / self.current_gradient_accumulation_steps
            aux = self.routing_loss * aux
            return (out[0] + aux, *out[1:]) if return_outputs else out + aux

        def _save(self, output_dir=None, state_dict=None):
            out = Path(output_dir or self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad},
                      str(out / CHECKPOINT_FILE), metadata={"format": "pt"})

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            import torch

            model = model or self.model
            saved = load_file(str(Path(resume_from_checkpoint) / CHECKPOINT_FILE))
            params = dict(model.named_parameters())
            unknown = sorted(set(saved) - set(params))
            if unknown:
                raise ValueError(f"checkpoint {resume_from_checkpoint} does not fit this model: {unknown[:3]}")
            with torch.no_grad():
                for name, t in saved.items():
                    params[name].copy_(t)

    return ModeTrainer


class RoutedCollator:
    """`collate` on the LM columns, plus `route` (each row's own expert, -1: none) as a tensor."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features: list[dict]) -> dict:
        import torch

        batch = self.collate([{k: v for k, v in f.items() if k != "route"} for f in features])
        batch["route"] = torch.tensor([f["route"] for f in features], dtype=torch.long)
        return batch


def _fit(model, mode, train_blocks, collator, objective: str, cfg: ModeTrainOptions, seed: int, work: Path,
         device, callbacks, routing_loss: float = 0.0):
    """Train the model's trainable MoDE tensors with the Trainer (with DDP under a launcher).
    Returns (result, trainer, steps, last) once every rank has finished."""
    last = on_main(lambda: resume_point(work, cfg.resume))
    steps = total_steps(cfg, len(train_blocks))
    groups = [{"params": [p for p in mode.expert_parameters() if p.requires_grad], "lr": cfg.lr,
               "weight_decay": cfg.weight_decay},
              {"params": [p for p in mode.gate_parameters() if p.requires_grad], "lr": cfg.gate_lr,
               "weight_decay": 0.0}]
    model.to(device)
    trainer = build_trainer(model, cfg, work=work, train_dataset=train_blocks, data_collator=collator, steps=steps,
                            seed=seed, param_groups=groups, lm_objective=objective, trainer_cls=_trainer_class(),
                            callbacks=callbacks)
    trainer.routing_loss = routing_loss
    result = trainer.train(resume_from_checkpoint=last)
    barrier()  # every rank's last checkpoint files are written before rank 0 removes the work area
    return result, trainer, steps, last


def pretrain_expert(cfg: ModePretrainConfig | None = None, callbacks=None, **kwargs) -> dict:
    """Train the MoDE expert `cfg.domain` alone on its corpus (its layers and gates; the base is
    frozen) and write it atomically to `cfg.library/<domain>/` (expert.safetensors + domix.json).

    Its seed comes from the domain name and the run seed. Returns the expert's metadata. Under a
    launcher (`torchrun -m domix mode pretrain ...`) the Trainer trains with DDP; rank 0 prepares
    the data first, scores the held-out blocks and writes the entry, as `pretrain` does."""
    from transformers import set_seed

    from ..library.pretrain import load_domain
    from ..lm import lm_collator, lm_loss

    cfg = cfg or ModePretrainConfig(**kwargs)
    lib = Library(cfg.library)
    dest = lib.path / cfg.domain
    entry_name(cfg.domain, "domain")
    kind = lib.get(cfg.domain).kind if cfg.domain in lib else "unknown"
    if finished(dest, cfg, f"module '{cfg.domain}' (kind {kind}) in {lib.path}"):
        if kind != "mode-expert":
            raise FileExistsError(f"module '{cfg.domain}' in {lib.path} is a {kind}, not a MoDE expert; pass "
                                  "--overwrite to replace it")
        return lib.get(cfg.domain).meta
    device = setup(cfg)
    seed = run_seed(cfg.domain, cfg.seed)
    t0 = time.time()

    tokenizer, model, objective, corpus = load_domain(cfg)
    train_blocks, held_blocks = corpus.train, corpus.heldout
    base_fp = fingerprint(model)

    set_seed(seed)  # `random` expert init draws from here
    mode = apply_mode(model, [cfg.domain], blocks=cfg.blocks, expert_layers=cfg.expert_layers, init=cfg.expert_init,
                      base_fingerprint=base_fp)
    work = lib.path / ".work" / cfg.domain
    result, trainer, steps, last = _fit(model, mode, train_blocks, lm_collator(tokenizer, objective), objective, cfg,
                                        seed, work, device, callbacks)
    train_time = time.time() - t0

    def write() -> dict:  # rank 0: the held-out score and the entry
        from safetensors.torch import save_file

        heldout = lm_loss(model, held_blocks, tokenizer, objective, cfg.batch_size, seed=0) if held_blocks else None
        counts = mode.param_counts()
        meta = {
            "kind": "mode-expert", "domain": cfg.domain, "base": cfg.base, "base_fingerprint": base_fp,
            "objective": objective, "layout": mode.layout.to_dict(), "expert_init": cfg.expert_init,
            "params": {"expert": counts["per_expert"], "gate": counts["gates"], "total": counts["total"]},
            "seed": cfg.seed, "module_seed": seed, "data": [str(p) for p in cfg.data],
            "documents": corpus.documents, "heldout_documents": corpus.heldout_documents,
            **run_record(cfg, **trained(trainer, result), steps=steps, seq_len=cfg.seq_len, t0=t0,
                         train_time=train_time, last=last, device=device),
            "gate_lr": cfg.gate_lr,
            "heldout_loss": heldout["loss"] if heldout else None,
            "heldout_accuracy": heldout["accuracy"] if heldout else None,
            "heldout_tokens": heldout["tokens"] if heldout else 0, **cfg.extra,
        }
        with atomic_dir(dest, overwrite=cfg.overwrite) as stage:
            save_file(mode.expert_state(0, gate=True), str(stage / EXPERT_FILE), metadata={"format": "pt"})
            keep_logs(work, stage)
            write_json(stage / META, meta)
        shutil.rmtree(work, ignore_errors=True)
        return meta

    return on_main(write)


def _parts(data: list[str] | None, experts) -> list[tuple[str, list[str]]]:
    """(name, paths) per corpus of the mixture: `--data` entries ("name=path" or a path), or the experts' own."""
    if not data:
        return [(m.name, list(m.meta["data"])) for m in experts]
    out = []
    for entry in data:
        name, sep, path = str(entry).partition("=")
        out.append((name, [path]) if sep else (Path(entry).stem, [str(entry)]))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two corpora have the same name {names}; name them with --data NAME=PATH")
    return out


def compose(cfg: ComposeConfig | None = None, callbacks=None, **kwargs) -> dict:
    """Put library experts side by side with fresh gates and train gates and experts (or gates
    only) on equal parts of the domains' corpora; write the MoDE model atomically to `cfg.out`.

    The LM loss alone leaves the fresh gates near uniform in a short composition (each expert
    alone learned to help on its own text, not to stay out of the others'), so by default a
    routing loss is added (`routing_loss` times it, `ModeBlock.routing_loss`): on every token of
    a corpus named as an expert, the cross-entropy of the gate against the weights that expert's
    own gate gave alone (the expert q, the backbone 1 - q, the other experts 0). Where the gates
    learn it, a domain's tokens get exactly its expert's block outputs: the composition hands
    each domain over to its expert, and the LM loss trains on from there.

    Returns its metadata, with each corpus's held-out loss / perplexity / next-token accuracy.
    Under a launcher it trains with DDP as `pretrain_expert` does (rank 0 scores and writes)."""
    from datasets import interleave_datasets
    from transformers import set_seed

    from ..data.corpus import prepare_corpus
    from ..lm import lm_collator, lm_loss

    cfg = cfg or ComposeConfig(**kwargs)
    if cfg.routing_loss < 0:
        raise ValueError(f"--routing-loss must be 0 or more, not {cfg.routing_loss:g}")
    out = Path(cfg.out)
    if finished(out, cfg, f"composed MoDE model {out}"):
        return read_meta(out)
    experts = Library(cfg.library).select(cfg.experts, kind="mode-expert")
    one_base(experts)
    device = setup(cfg)
    t0 = time.time()
    base = cfg.base or experts[0].meta["base"]
    with main_process_first():  # an error on any rank (a corpus one rank cannot read) stops every rank
        tokenizer = load_tokenizer(base, cfg.trust_remote_code)
        model, objective = load_model(base, head="lm", objective=cfg.objective,
                                      trust_remote_code=cfg.trust_remote_code)
        parts = _parts(cfg.data, experts)
        train_parts, held_parts = [], {}
        for name, paths in parts:
            corpus = prepare_corpus(cfg, tokenizer, paths)
            train_parts.append(corpus.train)
            if corpus.heldout is not None:
                held_parts[name] = corpus.heldout
    base_fp = fingerprint(model)
    mode = apply_mode(model, experts, base_fingerprint=base_fp, gate_context=cfg.gate_context,
                      gate_form=cfg.gate_form)
    set_trainable(model, experts=not cfg.freeze_experts, gates=True)
    collate = lm_collator(tokenizer, objective)
    if cfg.routing_loss:  # each block carries the expert of its corpus (-1: a corpus no expert is named after)
        routes = [mode.names.index(name) if name in mode.names else -1 for name, _ in parts]
        if max(routes) < 0:
            raise ValueError(f"--routing-loss needs corpora named as experts {mode.names} (--data NAME=PATH), "
                             f"not {[n for n, _ in parts]}; or --routing-loss 0")
        train_parts = [p.add_column("route", [r] * len(p)) for p, r in zip(train_parts, routes)]
        collate = RoutedCollator(collate)
    # equal parts: round-robin over the corpora, the smaller ones repeated until the largest is used up
    train_blocks = interleave_datasets(train_parts, stopping_strategy="all_exhausted") if len(train_parts) > 1 \
        else train_parts[0]

    set_seed(cfg.seed)
    work = out.parent / f".{out.name}.work"
    result, trainer, steps, last = _fit(model, mode, train_blocks, collate, objective, cfg, cfg.seed, work, device,
                                        callbacks, routing_loss=cfg.routing_loss)
    train_time = time.time() - t0

    def write() -> dict:  # rank 0: held-out scores, routing and the composed model
        heldout, routing = {}, {}
        for name, blocks in held_parts.items():  # held-out loss and where the gates send each domain's tokens
            with mode.recording_routing() as mean:
                heldout[name] = lm_loss(model, blocks, tokenizer, objective, cfg.batch_size, seed=0)
                routing[name] = dict(zip(["backbone", *mode.names], (round(w, 4) for w in mean())))
        meta = {
            "kind": "mode", "base": base, "objective": objective, "library": str(cfg.library),
            "expert_meta": {m.name: {k: m.meta.get(k) for k in ("module_seed", "steps", "data", "heldout_loss")}
                            for m in experts},
            "freeze_experts": cfg.freeze_experts, "routing_loss": cfg.routing_loss, "seed": cfg.seed,
            "parts": [n for n, _ in parts],
            "blocks_per_part": [len(p) for p in train_parts],
            **run_record(cfg, **trained(trainer, result), steps=steps, seq_len=cfg.seq_len, t0=t0,
                         train_time=train_time, last=last, device=device),
            "gate_lr": cfg.gate_lr, "heldout": heldout,
            "heldout_loss": (sum(h["loss"] for h in heldout.values()) / len(heldout)) if heldout else None,
            "routing": routing, **cfg.extra,
        }
        plots = [lambda stage: plot_routing(routing, stage / "routing.png")] if routing else []
        meta = save_mode(model, out, meta, overwrite=cfg.overwrite, base_fingerprint=base_fp, logs=work, plots=plots)
        shutil.rmtree(work, ignore_errors=True)
        return meta

    return on_main(write)


def plot_routing(routing: dict, path: Path) -> None:
    """Heatmap of the mean gate weight per held-out domain (rows) and path (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols = list(routing), list(next(iter(routing.values())))
    grid = np.array([[routing[r][c] for c in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2, 0.6 * len(rows) + 1.6))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("gate path")
    ax.set_ylabel("held-out text of")
    ax.set_title("mean gate weight per token (all blocks)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_mode(path: str, data, seq_len: int = 128, batch_size: int = 8, max_blocks: int | None = 64,
              device: str = "auto", text_field: str = "text", seed: int = 0, base: str | None = None,
              progress: bool = True) -> dict:
    """Loss, perplexity and next-token (or masked-token) accuracy of a composed MoDE directory or
    a single library expert (with its own gate) on a corpus — `lm_loss`'s dict plus what was scored."""
    from ..data.corpus import load_documents, pack
    from ..lm import lm_loss

    model, objective, meta = load_mode_model(path, head="lm", base=base)
    model.to(select_device(device))
    tokenizer = load_tokenizer(base or meta["base"])
    blocks = pack(load_documents(data, text_field), tokenizer, seq_len, max_blocks=max_blocks)
    out = lm_loss(model, blocks, tokenizer, objective, batch_size, seed=seed, progress=progress)
    experts = meta.get("experts") or [meta.get("domain")]
    return {"model": str(path), "kind": meta["kind"], "experts": experts, "base": base or meta["base"],
            "objective": objective, **out}
