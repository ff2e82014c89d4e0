"""Stage 1: train one LoRA domain module on a frozen base with the self-supervised objective."""
from __future__ import annotations

import hashlib
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_dir, write_json
from ..checkpoints import DEFAULT_BASE, resolve_base
from ..models import fingerprint, load_model, load_tokenizer, select_device, target_regex
from .store import META, Library


@dataclass
class PretrainConfig:
    """Options of `domix pretrain` (underscored keys are also the YAML keys of `pretrain-all`)."""

    domain: str
    data: list[str]
    library: str
    base: str = DEFAULT_BASE
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all-linear"
    objective: str = "auto"
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    warmup: float = 0.1
    weight_decay: float = 0.0
    max_steps: int | None = None
    epochs: float = 1.0
    max_tokens: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"  # bf16/fp16: the frozen base in that precision, plus autocast (full: autocast only)
    gradient_checkpointing: bool = False  # recompute activations in backward: far less memory, ~1.5x the compute
    resume: bool = False
    overwrite: bool = False
    text_field: str = "text"
    eval_blocks: int = 64
    save_steps: int = 50
    threads: int | None = None
    trust_remote_code: bool = False
    progress: bool = True
    full: bool = False  # train every weight instead of a LoRA module (the naive continual DAP baseline)
    extra: dict = field(default_factory=dict)


def module_seed(name: str, seed: int) -> int:
    """A module's seed comes from its own name and the run seed, never from a list position."""
    return int.from_bytes(hashlib.sha256(f"{name}\0{seed}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def _versions() -> dict:
    import peft
    import torch
    import transformers

    from .. import __version__

    return {"domix": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def _total_steps(cfg: PretrainConfig, n_blocks: int) -> int:
    per_step = cfg.batch_size * cfg.grad_accum
    if cfg.max_tokens is not None:
        return max(1, math.ceil(cfg.max_tokens / (per_step * cfg.seq_len)))
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_blocks / per_step))


def pretrain(cfg: PretrainConfig | None = None, callbacks=None, **kwargs) -> dict:
    """Train the domain module `cfg.domain` and write it atomically to `cfg.library/<domain>/`.

    Returns the module's metadata (the content of its `domix.json`). With `full`, every weight
    trains and the entry is a complete HF checkpoint with its tokenizer (kind "full"): the naive
    continual-DAP baseline, whose next domain or full fine-tuning takes it as `base`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from ..data.corpus import load_documents, pack, split_heldout
    from ..lm import lm_collator, lm_loss

    cfg = cfg or PretrainConfig(**kwargs)
    lib = Library(cfg.library)
    dest = lib.path / cfg.domain
    if cfg.domain.startswith(".") or "/" in cfg.domain:
        raise ValueError(f"invalid domain name {cfg.domain!r}")
    if dest.exists() and not cfg.overwrite:
        raise FileExistsError(f"module '{cfg.domain}' already exists in {lib.path}; pass --overwrite to replace it")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.progress:
        _quiet()
    device = select_device(cfg.device)
    seed = module_seed(cfg.domain, cfg.seed)
    t0 = time.time()

    tokenizer = load_tokenizer(cfg.base, cfg.trust_remote_code)
    # a LoRA module's frozen base can be held in half precision (the adapter, its gradients and
    # AdamW state stay fp32); full-weight training keeps fp32 weights and uses autocast instead
    model, objective = load_model(cfg.base, head="lm", objective=cfg.objective,
                                  dtype="fp32" if cfg.full else cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    base_fp = fingerprint(model)
    docs = load_documents(cfg.data, cfg.text_field)
    train_docs, held_docs = split_heldout(docs)
    train_blocks = pack(train_docs, tokenizer, cfg.seq_len)
    held_blocks = pack(held_docs, tokenizer, cfg.seq_len, max_blocks=cfg.eval_blocks) if len(held_docs) else None
    steps = _total_steps(cfg, len(train_blocks))

    base_held = lm_loss(model, held_blocks, tokenizer, objective, cfg.batch_size, seed=0) if held_blocks else None
    set_seed(seed)
    if cfg.full:  # a full checkpoint: usable as the `base` of a next domain or of full fine-tuning
        lora = None
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=target_regex(model, cfg.targets), bias="none",
                          task_type="CAUSAL_LM" if objective == "clm" else None)
        model = get_peft_model(model, lora)
        model.peft_config["default"].base_model_name_or_path = resolve_base(cfg.base)

    work = lib.path / ".work" / cfg.domain
    last = get_last_checkpoint(str(work)) if cfg.resume and work.is_dir() else None
    if last is None and work.exists():
        shutil.rmtree(work)
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type="linear",
        warmup_steps=int(cfg.warmup * steps), weight_decay=cfg.weight_decay, max_steps=steps,
        logging_steps=max(1, min(10, steps // 10)), save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=1, report_to=["tensorboard"], seed=seed, data_seed=seed,
        use_cpu=device.type == "cpu", bf16=cfg.dtype == "bf16", fp16=cfg.dtype == "fp16",
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=not cfg.progress,
        **checkpointing_args(cfg.gradient_checkpointing),
    )
    trainer = _lm_trainer(Trainer, objective)(model=model, args=args, train_dataset=train_blocks,
                                              data_collator=lm_collator(tokenizer, objective), callbacks=callbacks)
    if not cfg.progress:
        from transformers import PrinterCallback
        trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=last)
    train_time = time.time() - t0

    heldout = lm_loss(model, held_blocks, tokenizer, objective, cfg.batch_size, seed=0) if held_blocks else None
    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    meta = {
        "kind": "full" if cfg.full else "lora", "domain": cfg.domain, "base": cfg.base, "base_fingerprint": base_fp,
        "objective": objective, "rank": None if cfg.full else cfg.rank, "alpha": None if cfg.full else cfg.alpha,
        "targets": "all" if cfg.full else cfg.targets, "target_modules": lora.target_modules if lora else None,
        "seed": cfg.seed, "module_seed": seed,
        "data": [str(p) for p in cfg.data], "documents": len(train_docs), "heldout_documents": len(held_docs),
        "steps": steps, "tokens": steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr,
        "train_loss": result.training_loss, "loss_history": history,
        "heldout_loss": heldout["loss"] if heldout else None, "heldout_tokens": heldout["tokens"] if heldout else 0,
        "base_heldout_loss": base_held["loss"] if base_held else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "wall_time_s": round(time.time() - t0, 2), "train_time_s": round(train_time, 2),
        "resumed_from": Path(last).name if last else None, "device": device.type, "dtype": cfg.dtype,
        "gradient_checkpointing": cfg.gradient_checkpointing, "versions": _versions(), **cfg.extra,
    }
    with atomic_dir(dest, overwrite=cfg.overwrite) as stage:
        model.save_pretrained(stage)
        if cfg.full:
            tokenizer.save_pretrained(stage)
        runs = work / "runs"
        if runs.is_dir():
            shutil.copytree(runs, stage / "runs")
        write_json(stage / META, meta)
    shutil.rmtree(work, ignore_errors=True)
    return meta


def checkpointing_args(on: bool) -> dict:
    """TrainingArguments for gradient (activation) checkpointing, non-reentrant; none when off.
    Recent transformers renamed the option `activation_checkpointing` (the old name warns)."""
    if not on:
        return {}
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def _lm_trainer(trainer_cls, objective: str):
    """`trainer_cls` with the chunked next-token loss (domix.lm.ChunkedLMLossMixin): the LM
    head's full logits are never held, which saves several hundred MB on a large vocabulary."""
    from ..lm import ChunkedLMLossMixin

    return type(trainer_cls.__name__, (ChunkedLMLossMixin, trainer_cls), {"lm_objective": objective})


def _quiet() -> None:
    import warnings

    import datasets

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
