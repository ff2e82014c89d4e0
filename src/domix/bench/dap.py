"""`domix bench dap`: stage-1 efficiency — domain-module training against plain PEFT + Trainer
LoRA and against full-parameter training of the same model.

Three runs on the same packed blocks of a real corpus, each in a fresh Python process (so the
peak RSS is that run's own), with the same thread count, batch size, sequence length and lr:

  peft-trainer  plain script: AutoModelForCausalLM + get_peft_model(LoRA r=8, alpha=16,
                "all-linear") + Trainer + DataCollatorForLanguageModeling(mlm=False)
  domix         `domix.library.pretrain.pretrain` — the real stage-1 code path
  full-ft       the plain Trainer run with every parameter trainable (AdamW, the default)

A Trainer callback stamps every optimizer step. The first `WARMUP_STEPS` steps are warm-up;
the timed steps are the intervals between consecutive step ends (forward, backward, optimizer,
data collation, logging: everything a training step costs). tokens/s is tokens per step over
the median step time (robust to a few steps slowed by other load); the `*_best` ratios use the
fastest step of each run instead — on a shared machine they estimate the uncontended cost; the
CPU seconds per step (all threads of the process) are a third view, least disturbed by other
work when `--threads 1`.
The load average before and after each run is recorded. Peak RSS is the process's
`ru_maxrss` at exit. Results are ratios, measured in one invocation (DESIGN §8).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..checkpoints import DEFAULT_BASE
from ..training import DEVICES, PRECISIONS, option

RUNS = ("peft-trainer", "domix", "full-ft")
WARMUP_STEPS = 2
LR = 5e-4  # stage-1 default (PretrainConfig.lr), used by every run
TARGETS = {  # from the issues
    "tokens_per_s_domix_over_peft": (">=", 0.95),
    "peak_rss_domix_over_full": ("<=", 0.5),
    "fused_peak_rss_over_separate_sum": ("<=", 0.6),
    "fused_tokens_per_s_over_separate": (">=", 1.0),
    "fused_stack1_peak_rss_over_separate_sum": ("<=", 0.6),
    "fused_stack1_tokens_per_s_over_separate": (">=", 1.0),
    "fused_parallel_peak_rss_over_separate_sum": ("<=", 0.6),
    "fused_parallel_tokens_per_s_over_separate": (">=", 1.0),
    "ddp_scaling_2_processes": (">=", 0.8),
}
THEORY_STEP_TIME_LORA_OVER_FULL = 4 / 6  # DESIGN §8: ≈4PT vs ≈6PT FLOPs
MIN_DOCS = 20


@dataclass(kw_only=True)
class EfficiencyOptions:
    """What every efficiency benchmark (`bench dap`, `bench finetune`) measures on."""

    base: str = option(DEFAULT_BASE, "'smollm2-135m' (the offline default) or a Hugging Face model id / local path")
    steps: int = option(8, "timed optimizer steps per run")
    seq_len: int = option(128, "tokens per block (sequence length)")
    batch_size: int = option(8, "examples per step")
    threads: int | None = option(None, "torch threads of every run (default: torch's; 1 is least disturbed by "
                                       "other load)")
    device: str = option("auto", "where every run trains (resolved once and recorded); on a CUDA device each step "
                                 "is timed to its end and peak CUDA memory is measured beside peak RSS",
                         choices=DEVICES)


@dataclass(kw_only=True)
class DapOptions(EfficiencyOptions):
    """Options of `domix bench dap`."""

    repeats: int = option(1, "repeat the runs, alternating their order")
    dtype: str = option("fp32", "precision of every run (LoRA runs hold the frozen base in it; full-ft autocasts)",
                        choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, "every run recomputes activations in backward (the memory-saving "
                                                 "setting)")
    data: str | None = option(None, "corpus (default: the benchmark's bio corpus if built, else a Wikipedia sample)")
    fused: int = option(0, "also: N modules trained fused in one process (2 threads: all N per forward pass, one "
                           "per pass, one per pass in each of 2 threads) against N separate processes (2 at a time, "
                           "1 thread each), end to end; 0 skips it")
    ddp: bool = option(False, "also: one module on 2 DDP processes against 1 process (1 thread each, the same "
                              "batch per process)")
    out: str | None = option("bench-out/dap.json", "where to write the JSON result")


# ---------------------------------------------------------------------------- corpus

def _lines(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.strip()


def bench_corpus(steps: int, seq_len: int, batch_size: int) -> tuple[str, str]:
    """(path, source) of a real-text corpus large enough for the runs: the benchmark's `bio`
    corpus if it was built (`domix fetch data`), else the gensim Wikipedia sample. Only the
    first documents are kept (a few times the tokens the runs consume, and at least `MIN_DOCS` so
    the held-out split leaves the training blocks intact), written once to the cache."""
    from ..fetch import cache_dir
    from ..io import atomic_write

    tokens = (steps + WARMUP_STEPS) * batch_size * seq_len
    budget = max(100_000, 12 * tokens)  # characters: ~4-5 per token, held-out share, room to spare
    bio = cache_dir() / "data" / "corpora" / "bio.txt"
    if bio.is_file() and bio.stat().st_size > 0:
        source, docs = f"bio ({bio})", _lines(bio)
        name = f"dap-bio-{bio.stat().st_size}-{budget}-{MIN_DOCS}.txt"
    else:
        from ..data.benchmark import WIKI, wikipedia_pages

        source, docs = f"enwiki sample (gensim {WIKI.rsplit('/', 1)[-1]})", wikipedia_pages()
        name = f"dap-enwiki2-{budget}-{MIN_DOCS}.txt"  # 2: the benchmark data's markup stripping
    out = cache_dir() / "bench" / name
    if not out.is_file():
        kept, size = [], 0
        for doc in docs:
            kept.append(doc)
            size += len(doc)
            if size >= budget and len(kept) >= MIN_DOCS:
                break
        atomic_write(out, "".join(d + "\n" for d in kept))
    return str(out), source


# ---------------------------------------------------------------------------- one run (worker)

def _step_timer():
    import psutil
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Stamps every optimizer step; notes the RSS and trainable parameters at train start."""

        def __init__(self):
            self.begin: list[float] = []
            self.end: list[float] = []
            self.cpu_end: list[float] = []  # this process's CPU time (all threads)
            self.rss_loaded = 0
            self.trainable = self.total = None
            self.weights_dtype, self.checkpointing = None, None  # what the run really trained with

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.rss_loaded = psutil.Process().memory_info().rss
            if model is not None:
                self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                self.total = sum(p.numel() for p in model.parameters())
                body = model.get_base_model() if hasattr(model, "get_base_model") else model
                self.weights_dtype = str(body.get_input_embeddings().weight.dtype).replace("torch.", "")
                self.checkpointing = bool(getattr(body, "is_gradient_checkpointing", False))

        def on_step_begin(self, args, state, control, **kw):
            _sync()
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            _sync()  # a CUDA step ends when its kernels do, not when Python has queued them
            self.end.append(time.perf_counter())
            self.cpu_end.append(time.process_time())

    return StepTimer()


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_cuda_mb(device: str) -> float | None:
    """This process's peak CUDA memory allocated by torch (MiB) on a CUDA `device`; None elsewhere."""
    import torch

    return torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 20 if device.startswith("cuda") else None


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
    import resource

    import torch

    if kind == "fused":
        return _fused_worker(base, data, steps, seq_len, batch_size, threads, dtype, domains, stack, parallel, device)

    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()

    timer = _step_timer()
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
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "rss_at_train_start_mb": timer.rss_loaded / 2**20, "device": device, "peak_cuda_mb": peak_cuda_mb(device),
        "trainable_params": timer.trainable, "total_params": timer.total,
        "weights_dtype": timer.weights_dtype, "gradient_checkpointing": timer.checkpointing,
        "threads": torch.get_num_threads(), "wall_s": wall, "processes": world_size(),
        "loadavg_before": load0, "loadavg_after": os.getloadavg()[0],
    }


def _fused_worker(base: str, data: str, steps: int, seq_len: int, batch_size: int, threads: int, dtype: str,
                  domains: int, stack: int = 0, parallel: int = 1, device: str = "cpu") -> dict:
    import resource

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
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": threads,
            "device": device, "peak_cuda_mb": peak_cuda_mb(device), "loadavg_before": load0, "loadavg_after": os.getloadavg()[0]}


def _command(kind: str, base: str, data: str, steps: int, seq_len: int, batch_size: int, threads: int,
             result: Path, gradient_checkpointing: bool = False, dtype: str = "fp32", domains: int = 1,
             processes: int = 1, stack: int = 0, parallel: int = 1, device: str = "cpu") -> list[str]:
    launch = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launch, "-m", "domix.bench.dap", "--worker", kind, "--base", base, "--data", data,
           "--steps", str(steps), "--seq-len", str(seq_len), "--batch-size", str(batch_size),
           "--threads", str(threads), "--dtype", dtype, "--domains", str(domains), "--stack", str(stack),
           "--parallel", str(parallel), "--device", device, "--result", str(result)]
    return cmd + (["--gradient-checkpointing"] if gradient_checkpointing else [])


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false"}


def _read(kind: str, proc, result: Path) -> dict:
    if proc.returncode != 0 or not result.is_file():
        out = proc.stderr if isinstance(proc.stderr, str) else (proc.stderr.read() if proc.stderr else "")
        tail = "\n".join((out or "").strip().splitlines()[-25:])
        raise RuntimeError(f"benchmark run '{kind}' failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result.read_text())


def _spawn(kind: str, base: str, data: str, steps: int, seq_len: int, batch_size: int, threads: int,
           tmpdir: str, gradient_checkpointing: bool = False, dtype: str = "fp32", domains: int = 1,
           processes: int = 1, stack: int = 0, parallel: int = 1, device: str = "cpu") -> dict:
    result = Path(tmpdir) / f"{kind}-{time.time_ns()}.json"
    cmd = _command(kind, base, data, steps, seq_len, batch_size, threads, result, gradient_checkpointing, dtype,
                   domains, processes, stack, parallel, device)
    proc = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True)
    return _read(kind, proc, result)


def _separate(n: int, at_once: int, base, data, steps, seq_len, batch_size, dtype, tmpdir, device="cpu") -> dict:
    """n `domix` runs, `at_once` at a time with 1 thread each, timed end to end (first start to last end)."""
    t0, runs, pending = time.perf_counter(), [], list(range(n))
    running: list[tuple] = []
    while pending or running:
        while pending and len(running) < at_once:
            i = pending.pop(0)
            result = Path(tmpdir) / f"separate-{i}-{time.time_ns()}.json"
            cmd = _command("domix", base, data, steps, seq_len, batch_size, 1, result, dtype=dtype, device=device)
            running.append((subprocess.Popen(cmd, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                             text=True), result))
        proc, result = running.pop(0)
        proc.wait()
        runs.append(_read("domix (separate)", proc, result))
    wall = time.perf_counter() - t0
    tokens = n * (steps + WARMUP_STEPS) * batch_size * seq_len
    return {"run": "separate", "domains": n, "at_once": at_once, "tokens": tokens, "wall_s": wall,
            "peak_rss_mb_sum": sum(r["peak_rss_mb"] for r in runs), "peak_rss_mb": [r["peak_rss_mb"] for r in runs],
            "runs": runs}


def scale_study(opts, base: str, data: str, tmpdir: str, log, device: str = "cpu") -> dict:
    """Fused (all domains stacked per forward pass; one at a time; one at a time in each of 2
    threads) vs separate processes (`opts.fused` domains, 2 threads in all), and DDP on 2
    processes vs 1."""
    out: dict = {"runs": {}, "ratios": {}}
    steps, seq_len, batch, dtype = opts.steps, opts.seq_len, opts.batch_size, opts.dtype
    if opts.fused:
        log(f"scale: {opts.fused} modules in {opts.fused} separate processes, 2 at a time ...")
        sep = _separate(opts.fused, 2, base, data, steps, seq_len, batch, dtype, tmpdir, device)
        out["runs"]["separate"] = sep
        for key, stack, parallel in (("fused", 0, 1), ("fused_stack1", 1, 1), ("fused_parallel", 1, 2)):
            log(f"scale: {opts.fused} modules fused in one process (2 threads), "
                + ("all stacked in each forward pass" if not stack else f"{stack} per forward pass")
                + (f", {parallel} passes at once" if parallel > 1 else "") + " ...")
            f = _spawn("fused", base, data, steps, seq_len, batch, 2, tmpdir, dtype=dtype, domains=opts.fused,
                       stack=stack, parallel=parallel, device=device)
            out["runs"][key] = f
            out["ratios"].update({
                f"{key}_peak_rss_over_separate_sum": f["peak_rss_mb"] / sep["peak_rss_mb_sum"],
                f"{key}_tokens_per_s_over_separate": (f["tokens"] / f["wall_s"]) / (sep["tokens"] / sep["wall_s"])})
    if opts.ddp:
        log("scale: one module on 1 process, then on 2 DDP processes (1 thread each) ...")
        one = _spawn("domix", base, data, steps, seq_len, batch, 1, tmpdir, dtype=dtype, device=device)
        two = _spawn("domix", base, data, steps, seq_len, batch, 1, tmpdir, dtype=dtype, processes=2, device=device)
        out["runs"].update(ddp_1=one, ddp_2=two)
        out["ratios"]["ddp_scaling_2_processes"] = two["tokens_per_s"] / (2 * one["tokens_per_s"])
    return out


# ---------------------------------------------------------------------------- the benchmark

def _aggregate(runs: list[dict]) -> dict:
    """One run's figures over its repeats: medians of the per-repeat values (peak: the fastest step)."""
    step = statistics.median(r["step_time_s"] for r in runs)
    return {
        "tokens_per_s": runs[0]["tokens_per_step"] / step,
        "step_time_s": step, "step_time_min_s": min(r["step_time_min_s"] for r in runs),
        "step_compute_s": statistics.median(r["step_compute_s"] for r in runs),
        "step_cpu_s": statistics.median(r["step_cpu_s"] for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "rss_at_train_start_mb": statistics.median(r["rss_at_train_start_mb"] for r in runs),
        "peak_cuda_mb": statistics.median(r["peak_cuda_mb"] for r in runs) if runs[0].get("peak_cuda_mb") else None,
        "trainable_params": runs[0]["trainable_params"], "total_params": runs[0]["total_params"],
        "repeats": len(runs),
    }


def _ratios(r: dict) -> dict:
    domix, peft, full = r["domix"], r["peft-trainer"], r["full-ft"]
    return {
        "tokens_per_s_domix_over_peft": domix["tokens_per_s"] / peft["tokens_per_s"],
        "peak_rss_domix_over_full": domix["peak_rss_mb"] / full["peak_rss_mb"],
        **({"peak_cuda_domix_over_full": domix["peak_cuda_mb"] / full["peak_cuda_mb"]}
           if domix.get("peak_cuda_mb") and full.get("peak_cuda_mb") else {}),
        # the two plain Trainer runs differ only by PEFT: the cleanest LoRA-vs-full comparison
        "step_time_lora_over_full": peft["step_time_s"] / full["step_time_s"],
        "step_time_domix_over_full": domix["step_time_s"] / full["step_time_s"],
        # from each run's fastest step and from CPU time: less disturbed by other load
        "tokens_per_s_domix_over_peft_best": peft["step_time_min_s"] / domix["step_time_min_s"],
        "cpu_per_step_domix_over_peft": domix["step_cpu_s"] / peft["step_cpu_s"],
        "step_time_lora_over_full_best": peft["step_time_min_s"] / full["step_time_min_s"],
    }


def _met(op: str, value: float, target: float) -> bool:
    return value >= target if op == ">=" else value <= target


def _mib(v) -> str:
    return "–" if v is None else f"{v:.0f}"


def _table(res: dict) -> str:
    s = res["settings"]
    lines = [f"DAP efficiency — base {s['base']}, {s['steps']} timed steps (+{s['warmup_steps']} warm-up), "
             f"batch {s['batch_size']} × seq {s['seq_len']}, {s['threads']} threads, torch {s['torch']}, "
             f"repeats {s['repeats']}, {s.get('dtype', 'fp32')} on {s.get('device', 'cpu')}" + (" (LoRA runs: frozen base in "
             f"{s.get('dtype')}; full-ft: fp32 weights + autocast)" if s.get("dtype", "fp32") != "fp32" else "")
             + (", gradient checkpointing in every run" if s.get("gradient_checkpointing") else ""), "",
             "| run | tokens/s | step time (s, median) | fastest step (s) | CPU s/step | peak RSS (MB) | "
             "peak CUDA (MiB) | trainable params | load avg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["runs"].items():
        load = max(max(x["loadavg_before"], x["loadavg_after"]) for x in res["raw"][name])
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['step_time_s']:.3f} | {r['step_time_min_s']:.3f} | "
                     f"{r['step_cpu_s']:.3f} | {r['peak_rss_mb']:.0f} | {_mib(r.get('peak_cuda_mb'))} | "
                     f"{r['trainable_params']:,} | {load:.1f} |")
    sc = res.get("scale") or {}
    if "separate" in sc:
        p = sc["separate"]
        lines += ["", f"Many modules, end to end (loading included), {p['domains']} modules of {s['steps']} (+"
                      f"{s['warmup_steps']}) steps, 2 threads in all:", "",
                  "| run | tokens/s | wall (s) | peak RSS (MB) |", "|---|---:|---:|---:|",
                  f"| {p['domains']} separate processes, 2 at a time, 1 thread each | {p['tokens'] / p['wall_s']:.1f} | "
                  f"{p['wall_s']:.1f} | {p['peak_rss_mb_sum']:.0f} (sum) |"]
        for f in (sc[k] for k in ("fused", "fused_stack1", "fused_parallel") if k in sc):
            how = "all domains per forward pass" if f.get("stack", f["domains"]) == f["domains"] else \
                f"{f['stack']} domain(s) per forward pass"
            if f.get("parallel", 1) > 1:
                how += f", {f['parallel']} passes at once in threads"
            lines.append(f"| fused, one process, 2 threads, {how} | {f['tokens'] / f['wall_s']:.1f} | "
                         f"{f['wall_s']:.1f} | {f['peak_rss_mb']:.0f} |")
    if "ddp_1" in sc:
        one, two = sc["ddp_1"], sc["ddp_2"]
        lines += ["", "One module on DDP processes (1 thread each, the same batch per process):", "",
                  "| processes | tokens/s | step time (s) |", "|---|---:|---:|",
                  f"| 1 | {one['tokens_per_s']:.1f} | {one['step_time_s']:.3f} |",
                  f"| 2 | {two['tokens_per_s']:.1f} | {two['step_time_s']:.3f} |"]
    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|:-:|"]
    for name, v in res["ratios"].items():
        t = res["targets"].get(name)
        if t:
            lines.append(f"| {name} | {v:.3f} | {t['op']} {t['target']} | {'yes' if t['met'] else 'NO'} |")
        elif name.startswith("step_time_lora_over_full"):
            lines.append(f"| {name} | {v:.3f} | ≈{THEORY_STEP_TIME_LORA_OVER_FULL:.2f} (theory) | |")
        else:
            lines.append(f"| {name} | {v:.3f} | | |")
    load = max(max(x["loadavg_before"], x["loadavg_after"]) for v in res["raw"].values() for x in v)
    if load > (s["cpu_count"] or 1) + 0.5:
        lines += ["", f"Note: the 1-min load average reached {load:.1f} on {s['cpu_count']} CPUs during the runs; "
                      f"other work shared the machine, so the timing ratios are noisy (compare the *_best ratios)."]
    return "\n".join(lines)


def run(opts: DapOptions) -> dict:
    """`domix bench dap`: the three runs (alternating order when repeated), ratios, targets."""
    import peft
    import torch
    import transformers

    from ..checkpoints import resolve_base
    from ..io import write_json
    from ..models import resolve_device

    device = resolve_device(opts.device)
    steps, seq_len, batch_size = opts.steps, opts.seq_len, opts.batch_size
    if steps < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1, --seq-len >= 2")
    repeats = max(1, opts.repeats)
    threads = opts.threads or torch.get_num_threads()
    checkpointing, dtype = opts.gradient_checkpointing, opts.dtype
    base = resolve_base(opts.base)  # fetch the default model once, here, not in each worker
    if opts.data:
        data, source = str(opts.data), str(opts.data)
    else:
        data, source = bench_corpus(steps, seq_len, batch_size)

    schedule = [k for r in range(repeats) for k in (RUNS if r % 2 == 0 else RUNS[::-1])]
    raw: dict[str, list[dict]] = {k: [] for k in RUNS}
    with tempfile.TemporaryDirectory(prefix="domix-bench-dap-") as tmp:
        for i, kind in enumerate(schedule, 1):
            print(f"[{i}/{len(schedule)}] {kind:12s} ...", end="", file=sys.stderr, flush=True)
            r = _spawn(kind, base, data, steps, seq_len, batch_size, threads, tmp, checkpointing, dtype,
                       device=device)
            raw[kind].append(r)
            print(f" {r['tokens_per_s']:8.1f} tokens/s  {r['step_time_s']:.3f} s/step (fastest "
                  f"{r['step_time_min_s']:.3f})  peak RSS {r['peak_rss_mb']:.0f} MB  {r['wall_s']:.0f} s  "
                  f"load avg {r['loadavg_before']:.1f}->{r['loadavg_after']:.1f}", file=sys.stderr, flush=True)

        scale = scale_study(opts, base, data, tmp, lambda s: print(s, file=sys.stderr, flush=True), device) \
            if opts.fused or opts.ddp else None

    runs = {k: _aggregate(v) for k, v in raw.items()}
    # Each ratio is taken within a repeat (its runs ran next to each other), then the median over
    # repeats; with one repeat it is simply the ratio of the runs' figures.
    per_repeat = [_ratios({k: v[i] for k, v in raw.items()}) for i in range(repeats)]
    ratios = {name: statistics.median(r[name] for r in per_repeat) for name in per_repeat[0]}
    ratios.update(scale["ratios"] if scale else {})
    targets = {name: {"value": ratios[name], "target": target, "op": op, "met": _met(op, ratios[name], target)}
               for name, (op, target) in TARGETS.items() if name in ratios}
    res = {
        "benchmark": "dap",
        "settings": {
            "base": opts.base, "base_path": base, "steps": steps, "warmup_steps": WARMUP_STEPS,
            "seq_len": seq_len, "batch_size": batch_size, "lr": LR, "threads": threads, "repeats": repeats,
            "gradient_checkpointing": checkpointing, "dtype": dtype, "device": device, "fused_domains": opts.fused, "ddp": opts.ddp,
            "order": schedule, "corpus": data, "corpus_source": source, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "runs": runs,
        "ratios": ratios,
        "theory": {"step_time_lora_over_full": THEORY_STEP_TIME_LORA_OVER_FULL},
        "targets": targets,
        "raw": raw,
        **({"scale": scale["runs"]} if scale else {}),
    }
    res["table"] = _table(res)
    if opts.out:
        write_json(opts.out, res)
        res["out"] = str(opts.out)
    return res


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m domix.bench.dap", description="one `domix bench dap` run")
    ap.add_argument("--worker", required=True, choices=(*RUNS, "fused"))
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--result", required=True, help="where to write this run's JSON")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--dtype", choices=PRECISIONS, required=True)
    ap.add_argument("--domains", type=int, default=1, help="fused: modules trained together")
    ap.add_argument("--stack", type=int, default=0, help="fused: modules per forward pass (0: all)")
    ap.add_argument("--parallel", type=int, default=1, help="fused: forward passes at once, in threads")
    ap.add_argument("--device", default="cpu", help="where the run trains (resolved by the parent)")
    a = ap.parse_args(argv)
    from ..distributed import is_main
    from ..io import write_json

    r = worker(a.worker, a.base, a.data, a.steps, a.seq_len, a.batch_size, a.threads, a.gradient_checkpointing,
               a.dtype, a.domains, a.stack, a.parallel, a.device)
    if is_main():  # under torchrun: one result, rank 0's (its steps are every process's)
        write_json(a.result, r)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
