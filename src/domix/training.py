"""The one training recipe of every stage: the options they share, the `Trainer` built from
them, and the run mechanics around it.

Stage 1 (`library.pretrain`), MoDE (`mode.train`), fine-tuning (`finetune.train`) and the
efficiency benchmark's plain-PEFT baseline all train through `build_trainer`; a stage adds only
what is its own (the model, the data, parameter groups, a Trainer subclass). Run mechanics:
`setup` (threads, quiet output, device), `resume_point` (the work directory: resume from its
last checkpoint or start clean), `keep_logs` (the run's TensorBoard logs go with its result),
`run_record` (what every pre-training result records about its run).

Option fields carry their command-line help in `metadata["help"]`; `domix.cli_config` turns a
config dataclass into command-line options, so a default is written once, here.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import MISSING, dataclass
from pathlib import Path

from .options import DEVICES, PRECISIONS, option  # noqa: F401  (re-exported: the stages' configs import them from here)


@dataclass(kw_only=True)
class TrainOptions:
    """What every training run needs: budget, batch, optimiser, precision, placement, mechanics."""

    lr: float = option(5e-4, "learning rate (AdamW, linear schedule)")
    warmup: float = option(0.1, "warm-up as a fraction of the steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    epochs: float = option(1.0, "passes over the training data", group="budget")
    max_steps: int | None = option(None, "optimizer steps (instead of --epochs)", group="budget")
    batch_size: int = option(8, "examples (blocks) per device and step")
    grad_accum: int = option(1, "gradient accumulation steps")
    seed: int = option(0, "run seed")
    device: str = option("auto", "where to train", choices=DEVICES)
    dtype: str = option("fp32", "precision: bf16/fp16 hold the frozen base in half precision and train with "
                                "autocast (trained tensors stay fp32); bf16 is much faster on CPUs with "
                                "AVX512-BF16/AMX", choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, "recompute activations during backward: much lower peak "
                                                 "memory for about 1.5x the compute")
    threads: int | None = option(None, "torch intra-op threads (default: torch's)")
    save_steps: int = option(50, "checkpoint every N steps (for --resume)")
    resume: bool = option(False, "continue an interrupted run from its last checkpoint")
    overwrite: bool = option(False, "replace a result that already exists")
    progress: bool = option(True, "progress bars and log lines", cli=False)


@dataclass(kw_only=True)
class LMTrainOptions(TrainOptions):
    """Self-supervised training on a corpus (stage-1 modules, MoDE experts and compositions)."""

    objective: str = option("auto", "masked-LM (encoders) or next-token LM (decoders); auto decides from the "
                                    "model", choices=("auto", "mlm", "clm"))
    seq_len: int = option(128, "tokens per packed block")
    max_tokens: int | None = option(None, "training tokens (sets the steps)", group="budget")
    text_field: str = option("text", "field holding the text in .jsonl/.json/.csv corpora")
    eval_blocks: int = option(64, "held-out blocks scored before and after training")
    trust_remote_code: bool = option(False, "allow model code from the checkpoint's repository")
    extra: dict = option({}, "extra metadata recorded with the result", cli=False)


def field_default(f) -> object:
    """A dataclass field's default (made by its factory, if it has one); MISSING when it is required."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def defaults(cls) -> dict:
    """The defaults of a config dataclass's optional fields (what an omitted option means)."""
    from dataclasses import fields

    return {f.name: d for f in fields(cls) if (d := field_default(f)) is not MISSING}


def run_seed(name: str, seed: int) -> int:
    """A module's (or expert's) seed comes from its own name and the run seed, never from a list position."""
    return int.from_bytes(hashlib.sha256(f"{name}\0{seed}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def total_steps(opts: TrainOptions, n_examples: int, seq_len: int | None = None) -> int:
    """Optimizer steps from the budget: `max_tokens` (LM runs), else `max_steps`, else `epochs`.
    A step takes `batch_size` examples on each process (DDP)."""
    from .distributed import world_size

    per_step = opts.batch_size * opts.grad_accum * world_size()
    if getattr(opts, "max_tokens", None) is not None:
        return max(1, math.ceil(opts.max_tokens / (per_step * (seq_len or opts.seq_len))))
    if opts.max_steps:
        return opts.max_steps
    return max(1, math.ceil(opts.epochs * n_examples / per_step))


def quiet() -> None:
    """No progress bars or library chatter (worker processes, `--json` runs, runs asked for no progress)."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    # transformers deprecates an attribute PEFT still reads: chatter, not a problem of the run
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def setup(opts: TrainOptions):
    """Threads and output for this run; under a launcher (`torchrun`, `accelerate launch`) it
    joins the process group. Returns its torch device."""
    import torch

    from . import distributed
    from .models import select_device

    device = select_device(opts.device)
    distributed.init(device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if not opts.progress:
        quiet()
    return device


def finished(path: Path | str, opts: TrainOptions, what: str) -> bool:
    """Whether `path` holds a finished result this run leaves alone. Results are written whole
    (atomically), so one that exists is complete: `--overwrite` replaces it (False), `--resume`
    reports it complete and keeps it (True), and without either the run is refused."""
    if not Path(path).exists() or opts.overwrite:
        return False
    if opts.resume:
        if opts.progress:
            print(f"{what} is complete: left alone (pass --overwrite to train it again)", file=sys.stderr)
        return True
    raise FileExistsError(f"{what} already exists; pass --overwrite to replace it")


def resume_point(work: Path, resume: bool, also: tuple[str, ...] = ()) -> str | None:
    """The last complete checkpoint in `work` when resuming; otherwise `work` is cleared for a
    fresh run. The Trainer writes a checkpoint's trainer_state.json after its weights, optimizer
    and RNG states, and callbacks add their files (`also`, e.g. `KEEP_BEST_FILE`) after it, so a
    checkpoint without them was cut short (a killed run): it is removed and the one before it used."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    work = Path(work)
    last = None
    if resume and work.is_dir():
        steps = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in work.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                       if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit())
        for _, ckpt in reversed(steps):
            if all((ckpt / f).is_file() for f in ("trainer_state.json", *also)):
                last = str(ckpt)
                break
            shutil.rmtree(ckpt)  # cut short by a crash
    if last is None and work.exists():
        shutil.rmtree(work)
    return last


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


def build_trainer(model, opts: TrainOptions, *, work: Path, train_dataset, data_collator, steps: int,
                  seed: int | None = None, param_groups: list[dict] | None = None, lm_objective: str | None = None,
                  trainer_cls=None, eval_dataset=None, eval_steps: int | None = None, compute_metrics=None,
                  logging_steps: int | None = None, callbacks=None, logs: bool = True):
    """The `Trainer` of a run: linear schedule with warm-up, `steps` optimizer steps, checkpoints
    every `opts.save_steps` (0: none), TensorBoard logs under `work/runs` (`logs`), periodic
    evaluation when `eval_dataset` is given.

    `param_groups` (dicts with params/lr/weight_decay) become one AdamW; without them the Trainer
    builds its own from `opts.lr`/`opts.weight_decay`. `lm_objective="clm"` trains with the
    chunked next-token loss (`domix.lm.ChunkedLMLossMixin`); `trainer_cls` replaces `Trainer`."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from .lm import ChunkedLMLossMixin
    from .models import select_device

    seed = opts.seed if seed is None else seed
    device = select_device(opts.device)
    # without compute_metrics only the loss is read: the Trainer would otherwise gather every evaluation
    # row's logits (a generate task's full-vocabulary logits of the whole dev set) before dropping them
    evaluation = {"eval_strategy": "steps", "eval_steps": eval_steps, "per_device_eval_batch_size": 32,
                  "prediction_loss_only": compute_metrics is None} if eval_dataset is not None else {}
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr, lr_scheduler_type="linear",
        warmup_steps=int(opts.warmup * steps), weight_decay=opts.weight_decay, max_steps=steps,
        logging_steps=logging_steps or max(1, min(10, steps // 10)),
        save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500, save_total_limit=1,
        report_to=["tensorboard"] if logs else "none", seed=seed, data_seed=seed,
        use_cpu=device.type == "cpu", bf16=opts.dtype == "bf16", fp16=opts.dtype == "fp16",
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=not opts.progress,
        # DDP: every trained tensor (LoRA, bridge, MoDE experts and gates, head) gets a gradient each step,
        # so DDP need not search the graph for unused ones (and warn that it found none)
        ddp_find_unused_parameters=False,
        # nor broadcast buffers from rank 0 before each forward: domix's buffers (a bridge's frozen A's)
        # are loaded alike on every rank and never change
        ddp_broadcast_buffers=False,
        **evaluation, **checkpointing_args(opts.gradient_checkpointing))
    cls = trainer_cls or Trainer
    if lm_objective is not None:
        # a trainer class that is already one (to wrap the chunked loss in its own) keeps its method order
        bases = (cls,) if issubclass(cls, ChunkedLMLossMixin) else (ChunkedLMLossMixin, cls)
        cls = type(cls.__name__, bases, {"lm_objective": lm_objective})
    optimizer = torch.optim.AdamW([g for g in param_groups if g["params"]]) if param_groups else None
    trainer = cls(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                  data_collator=data_collator, callbacks=callbacks, compute_metrics=compute_metrics,
                  optimizers=(optimizer, None))
    if not opts.progress:
        trainer.remove_callback(PrinterCallback)
    return trainer


def keep_best(metric: str, greater: bool, patience: int | None = None, resume_from: str | None = None):
    """A Trainer callback for training to the best evaluation: after each evaluation it keeps the
    trained tensors (a copy in memory) when `metric` improved, stops training after `patience`
    evaluations without improvement, and at the end puts the best tensors back (`.step`: the step
    they come from; `.best`: their metric). Every checkpoint also holds the best so far
    (`KEEP_BEST_FILE`), so a run resumed from `resume_from` goes on with it.

    transformers' own `load_best_model_at_end` would write the whole model (frozen base included)
    at every evaluation; this keeps only what trains."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    class KeepBest(TrainerCallback):
        def __init__(self):
            self.best = self.step = None
            self.bad, self.tensors = 0, {}

        def on_train_begin(self, args, state, control, **kw):
            saved = Path(resume_from or "") / KEEP_BEST_FILE
            if resume_from and saved.is_file():
                with safe_open(str(saved), framework="pt") as f:
                    meta = f.metadata()
                    self.tensors = {k: f.get_tensor(k) for k in f.keys()}
                if meta["best"]:  # "": no evaluation before this checkpoint
                    self.best, self.step, self.bad = float(meta["best"]), int(meta["step"]), int(meta["bad"])

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
            value = (metrics or {}).get(metric)
            if value is None or model is None:
                return
            if self.best is None or (value > self.best if greater else value < self.best):
                self.best, self.step, self.bad = value, state.global_step, 0
                self.tensors = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
            else:
                self.bad += 1
                if patience and self.bad >= patience:
                    control.should_training_stop = True

        def on_save(self, args, state, control, **kw):
            # written into every checkpoint, even before the first evaluation, and last (the Trainer has
            # written trainer_state.json): `resume_point(..., also=(KEEP_BEST_FILE,))` counts a checkpoint
            # without it as cut short. Under DDP, rank 0 writes the checkpoint.
            if state.is_world_process_zero:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / KEEP_BEST_FILE
                tmp = path.with_name(f".{path.name}.tmp")
                save_file(self.tensors, str(tmp), metadata={"best": "" if self.best is None else repr(self.best),
                                                            "step": str(self.step), "bad": str(self.bad)})
                os.replace(tmp, path)

        def on_train_end(self, args, state, control, model=None, **kw):
            if self.tensors and model is not None:
                params = dict(model.named_parameters())
                with torch.no_grad():
                    for name, t in self.tensors.items():
                        params[name].copy_(t)

    return KeepBest()


KEEP_BEST_FILE = "domix_best.safetensors"


def loss_history(trainer) -> list[dict]:
    return [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]


def versions() -> dict:
    import peft
    import torch
    import transformers

    from ._version import __version__

    return {"domix": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def trained(trainer, result) -> dict:
    """What a Trainer's run gives `run_record`: its mean training loss, logged losses and
    trainable parameter count."""
    return {"train_loss": result.training_loss, "loss_history": loss_history(trainer),
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


def run_record(opts: TrainOptions, *, steps: int, seq_len: int, train_loss: float, loss_history: list[dict],
               trainable_params: int, t0: float, train_time: float, device, last: str | None = None,
               processes: int | None = None) -> dict:
    """What every pre-training result records about its run (budget, losses, times, environment),
    whether a Trainer ran it (`**trained(trainer, result)`) or the fused job; `processes`: the
    data-parallel processes (default: this run's world size)."""
    from .distributed import world_size

    processes = world_size() if processes is None else processes
    return {
        "steps": steps, "tokens": steps * opts.batch_size * opts.grad_accum * processes * seq_len,
        "seq_len": seq_len, "batch_size": opts.batch_size, "grad_accum": opts.grad_accum, "processes": processes,
        "lr": opts.lr, "train_loss": train_loss, "loss_history": loss_history, "trainable_params": trainable_params,
        "wall_time_s": round(time.time() - t0, 2), "train_time_s": round(train_time, 2),
        "resumed_from": Path(last).name if last else None, "device": device.type, "dtype": opts.dtype,
        "gradient_checkpointing": opts.gradient_checkpointing, "versions": versions(),
    }


def keep_logs(work: Path, stage: Path) -> None:
    """Copy the run's TensorBoard logs (`work/runs`) into the result being staged."""
    runs = Path(work) / "runs"
    if runs.is_dir():
        shutil.copytree(runs, Path(stage) / "runs")
