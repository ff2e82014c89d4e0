"""One run of `domix bench dap`, in the process the parent (`domix.bench.dap`) starts for it:
`python -m domix.bench.dap_worker --worker RUN ...` trains and times that run and writes its
measurements as JSON to `--result` (under torchrun, rank 0's).

  peft-trainer  plain script: AutoModelForCausalLM + get_peft_model(LoRA r=8, alpha=16,
                "all-linear") + Trainer + DataCollatorForLanguageModeling(mlm=False)
  domix         `domix.library.pretrain.pretrain` — the real stage-1 code path
  full-ft       the plain Trainer run with every parameter trainable (AdamW, the default)
  fused         N modules trained together in one process (`domix.library.fused`), end to end

The first `WARMUP_STEPS` optimizer steps are warm-up; the timed steps are the intervals between
consecutive step ends (`measure.step_timer`).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..training import PRECISIONS, option
from .measure import peak_cuda_mb, peak_rss_mb, step_timer

RUNS = ("peft-trainer", "domix", "full-ft")
WARMUP_STEPS = 2
LR = 5e-4  # stage-1 default (PretrainConfig.lr), used by every run


@dataclass(kw_only=True)
class WorkerOptions:
    """The arguments of one run, as the parent passes them (`domix.bench.dap._command`)."""

    worker: str = option(help="the run", choices=(*RUNS, "fused"))
    base: str = option(help="the base model (resolved by the parent)")
    data: str = option(help="the corpus")
    steps: int = option(help="timed optimizer steps")
    seq_len: int = option(help="tokens per block")
    batch_size: int = option(help="examples per step")
    threads: int = option(help="torch threads")
    result: str = option(help="where to write this run's JSON")
    gradient_checkpointing: bool = option(False, "recompute activations in backward")
    dtype: str = option(help="precision of the run", choices=PRECISIONS)
    domains: int = option(1, "fused: modules trained together")
    stack: int = option(0, "fused: modules per forward pass (0: all)")
    parallel: int = option(1, "fused: forward passes at once, in threads")
    device: str = option("cpu", "where the run trains (resolved by the parent)")


def _plain_trainer(kind: str, base: str, data: str, total_steps: int, seq_len: int, batch_size: int,
                   workdir: str, timer, gradient_checkpointing: bool = False, dtype: str = "fp32",
                   device: str = "cpu") -> None:
    """The script-style baseline: what a user would write with transformers + PEFT (a plain
    Trainer with the model's own loss, built by the one training recipe `build_trainer`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    from ..checkpoints import resolve_base
    from ..data.corpus import load_documents, pack, split_heldout
    from ..models import DTYPES
    from ..training import TrainOptions, build_trainer

    path = resolve_base(base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_docs, _ = split_heldout(load_documents([data]))  # the same blocks domix trains on
    blocks = pack(train_docs, tokenizer, seq_len)
    # LoRA: the frozen base in the run's precision; full training keeps fp32 weights (AdamW) and autocasts
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype] if kind == "peft-trainer" else torch.float32)
    if kind == "peft-trainer":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    opts = TrainOptions(lr=LR, warmup=0.1, batch_size=batch_size, seed=0, device=device, dtype=dtype,
                        gradient_checkpointing=gradient_checkpointing, save_steps=0, progress=False)
    trainer = build_trainer(model, opts, work=Path(workdir), train_dataset=blocks, steps=total_steps,
                            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), lm_objective=None,
                            callbacks=[timer], logs=False)
    trainer.train()


def worker(kind: str, base: str, data: str, steps: int, seq_len: int, batch_size: int, threads: int,
           gradient_checkpointing: bool = False, dtype: str = "fp32", domains: int = 1, stack: int = 0,
           parallel: int = 1, device: str = "cpu") -> dict:
    """One benchmark run in this process; returns its measurements. `fused`: `domains` modules on
    copies of the corpus in one process, `stack` of them per forward pass (0: all), `parallel`
    passes at once in threads, timed end to end (loading included)."""
    import torch

    if kind == "fused":
        return _fused_worker(base, data, steps, seq_len, batch_size, threads, dtype, domains, stack, parallel, device)

    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()

    timer = step_timer()
    total_steps = steps + WARMUP_STEPS
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"domix-bench-{kind}-") as tmp:
        if kind == "domix":
            from ..library.pretrain import pretrain

            pretrain(domain="bench", data=[data], library=tmp, base=base, seq_len=seq_len, batch_size=batch_size,
                     lr=LR, max_steps=total_steps, device=device, threads=threads, progress=False,
                     gradient_checkpointing=gradient_checkpointing, dtype=dtype, callbacks=[timer])
        elif kind in RUNS:
            _plain_trainer(kind, base, data, total_steps, seq_len, batch_size, tmp, timer, gradient_checkpointing,
                           dtype, device)
        else:
            raise ValueError(f"unknown run {kind!r}; known: {RUNS}")
    wall = time.perf_counter() - t0
    if len(timer.end) != total_steps:
        raise RuntimeError(f"{kind}: expected {total_steps} optimizer steps, the timer saw {len(timer.end)}")
    intervals = [timer.end[i] - timer.end[i - 1] for i in range(WARMUP_STEPS, total_steps)]
    compute = [timer.end[i] - timer.begin[i] for i in range(WARMUP_STEPS, total_steps)]
    cpu = [timer.cpu_end[i] - timer.cpu_end[i - 1] for i in range(WARMUP_STEPS, total_steps)]
    from ..distributed import world_size

    per_step = batch_size * seq_len * world_size()  # DDP: every process's batch
    return {
        "run": kind, "timed_steps": steps, "warmup_steps": WARMUP_STEPS, "tokens_per_step": per_step,
        "tokens_per_s": per_step / statistics.median(intervals),
        "tokens_per_s_mean": per_step * steps / sum(intervals),
        "step_time_s": statistics.median(intervals), "step_time_min_s": min(intervals),
        "step_times_s": [round(x, 4) for x in intervals],
        "step_compute_s": statistics.median(compute), "step_cpu_s": statistics.median(cpu),
        "peak_rss_mb": peak_rss_mb(),
        "rss_at_train_start_mb": timer.rss_loaded / 2**20, "device": device, "peak_cuda_mb": peak_cuda_mb(device),
        "trainable_params": timer.trainable, "total_params": timer.total,
        "weights_dtype": timer.weights_dtype, "gradient_checkpointing": timer.checkpointing,
        "threads": torch.get_num_threads(), "wall_s": wall, "processes": world_size(),
        "loadavg_before": load0, "loadavg_after": os.getloadavg()[0],
    }


def _fused_worker(base: str, data: str, steps: int, seq_len: int, batch_size: int, threads: int, dtype: str,
                  domains: int, stack: int = 0, parallel: int = 1, device: str = "cpu") -> dict:
    from ..library.fused import domains_per_pass, pretrain_fused
    from ..library.pretrain import PretrainConfig

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    total = steps + WARMUP_STEPS
    with tempfile.TemporaryDirectory(prefix="domix-bench-fused-") as tmp:
        cfgs = [PretrainConfig(domain=f"d{i}", data=[data], library=tmp, base=base, seq_len=seq_len,
                               batch_size=batch_size, lr=LR, max_steps=total, device=device, threads=threads,
                               dtype=dtype, progress=False) for i in range(domains)]
        res = pretrain_fused(cfgs, progress=False, stack=stack or None, parallel=parallel)
    failed = {d: r["error"] for d, r in res.items() if r["status"] != "done"}
    if failed:
        raise RuntimeError(f"fused run: {failed}")
    wall = time.perf_counter() - t0
    return {"run": "fused", "domains": domains, "stack": domains_per_pass(domains, stack or None, parallel),
            "parallel": parallel,
            "tokens": domains * total * batch_size * seq_len, "wall_s": wall,
            "peak_rss_mb": peak_rss_mb(), "threads": threads,
            "device": device, "peak_cuda_mb": peak_cuda_mb(device), "loadavg_before": load0, "loadavg_after": os.getloadavg()[0]}


def main(argv=None) -> int:
    import argparse

    from ..cli_config import add_options, given
    from ..distributed import is_main
    from ..io import write_json

    ap = argparse.ArgumentParser(prog="python -m domix.bench.dap_worker", description="one `domix bench dap` run")
    a = WorkerOptions(**given(add_options(ap, WorkerOptions).parse_args(argv), WorkerOptions))
    r = worker(a.worker, a.base, a.data, a.steps, a.seq_len, a.batch_size, a.threads, a.gradient_checkpointing,
               a.dtype, a.domains, a.stack, a.parallel, a.device)
    if is_main():  # under torchrun: one result, rank 0's (its steps are every process's)
        write_json(a.result, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
