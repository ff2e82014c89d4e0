"""Stage 1: train one LoRA domain module on a frozen base with the self-supervised objective."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

from ..checkpoints import DEFAULT_BASE, resolve_base
from ..distributed import barrier, main_process_first, on_main
from ..io import atomic_dir, write_json
from ..models import fingerprint, load_model, load_tokenizer, target_regex
from ..training import LMTrainOptions, build_trainer, finished, keep_logs, option, resume_point, run_record, run_seed, setup, \
    total_steps, trained
from .store import META, Library, entry_name


@dataclass(kw_only=True)
class PretrainConfig(LMTrainOptions):
    """Options of `domix pretrain` (underscored keys are also the YAML keys of `pretrain-all`)."""

    domain: str = option(help="module name in the library")
    data: list[str] = option(help=".txt (a document per line), .jsonl/.json, .csv, a directory, or a saved dataset")
    library: str = option(help="library directory")
    base: str = option(DEFAULT_BASE, "'smollm2-135m' (the offline default) or a Hugging Face model id / local path")
    rank: int = option(8, "LoRA rank r")
    alpha: float = option(16.0, "LoRA alpha (scaling alpha/r)")
    dropout: float = option(0.0, "LoRA dropout")
    targets: str = option("all-linear", "'all-linear' (attention + MLP linears of every block) or comma-separated "
                                        "layer names")
    full: bool = option(False, "train every weight instead of a LoRA module (the naive continual-DAP baseline)")
    seed: int = option(0, "run seed; a module's seed derives from it and its name")


def load_domain(cfg, dtype: str = "fp32"):
    """(tokenizer, base model with its LM head, objective, `prepare_corpus`'s corpus) of a domain's run
    (`pretrain`, `mode pretrain`). Under a launcher rank 0 goes first and the others read datasets' cache;
    an error on any rank (a corpus one rank cannot read) stops every rank."""
    from ..data.corpus import prepare_corpus

    with main_process_first():
        tokenizer = load_tokenizer(cfg.base, cfg.trust_remote_code)
        model, objective = load_model(cfg.base, head="lm", objective=cfg.objective, dtype=dtype,
                                      trust_remote_code=cfg.trust_remote_code)
        return tokenizer, model, objective, prepare_corpus(cfg, tokenizer)


def pretrain(cfg: PretrainConfig | None = None, callbacks=None, **kwargs) -> dict:
    """Train the domain module `cfg.domain` and write it atomically to `cfg.library/<domain>/`.

    Returns the module's metadata (the content of its `domix.json`). With `full`, every weight
    trains and the entry is a complete HF checkpoint with its tokenizer (kind "full"): the naive
    continual-DAP baseline, whose next domain or full fine-tuning takes it as `base`.

    Under a launcher (`torchrun`, `accelerate launch`) the Trainer trains with DDP; rank 0
    prepares the data first (the others read datasets' cache), scores the held-out blocks and
    writes the entry, and every rank returns the same metadata once it is written."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from ..lm import lm_collator, lm_loss

    cfg = cfg or PretrainConfig(**kwargs)
    lib = Library(cfg.library)
    dest = lib.path / cfg.domain
    entry_name(cfg.domain, "domain")
    if finished(dest, cfg, f"module '{cfg.domain}' in {lib.path}"):
        return lib.get(cfg.domain).meta
    device = setup(cfg)
    seed = run_seed(cfg.domain, cfg.seed)
    t0 = time.time()

    # a LoRA module's frozen base can be held in half precision (the adapter, its gradients and
    # AdamW state stay fp32); full-weight training keeps fp32 weights and uses autocast instead
    tokenizer, model, objective, corpus = load_domain(cfg, dtype="fp32" if cfg.full else cfg.dtype)
    train_blocks, held_blocks = corpus.train, corpus.heldout
    base_fp = fingerprint(model)
    steps = total_steps(cfg, len(train_blocks))
    model.to(device)  # the held-out scores too run where training does

    base_held = on_main(lambda: lm_loss(model, held_blocks, tokenizer, objective, cfg.batch_size, seed=0)
                        if held_blocks else None)
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
    last = on_main(lambda: resume_point(work, cfg.resume))
    trainer = build_trainer(model, cfg, work=work, train_dataset=train_blocks, steps=steps, seed=seed,
                            data_collator=lm_collator(tokenizer, objective), lm_objective=objective,
                            callbacks=callbacks)
    result = trainer.train(resume_from_checkpoint=last)
    train_time = time.time() - t0
    barrier()  # every rank's last checkpoint files are written before rank 0 removes the work area

    def write() -> dict:  # rank 0: the held-out score and the entry
        heldout = lm_loss(model, held_blocks, tokenizer, objective, cfg.batch_size, seed=0) if held_blocks else None
        meta = {
            "kind": "full" if cfg.full else "lora", "domain": cfg.domain, "base": cfg.base, "base_fingerprint": base_fp,
            "objective": objective, "rank": None if cfg.full else cfg.rank, "alpha": None if cfg.full else cfg.alpha,
            "targets": "all" if cfg.full else cfg.targets, "target_modules": lora.target_modules if lora else None,
            "seed": cfg.seed, "module_seed": seed,
            "data": [str(p) for p in cfg.data], "documents": corpus.documents, "heldout_documents": corpus.heldout_documents,
            **run_record(cfg, **trained(trainer, result), steps=steps, seq_len=cfg.seq_len, t0=t0, train_time=train_time,
                         last=last, device=device),
            "heldout_loss": heldout["loss"] if heldout else None, "heldout_tokens": heldout["tokens"] if heldout else 0,
            "base_heldout_loss": base_held["loss"] if base_held else None, **cfg.extra,
        }
        with atomic_dir(dest, overwrite=cfg.overwrite) as stage:
            model.save_pretrained(stage)
            if cfg.full:
                tokenizer.save_pretrained(stage)
            keep_logs(work, stage)
            write_json(stage / META, meta)
        shutil.rmtree(work, ignore_errors=True)
        return meta

    return on_main(write)
