"""`domix bench dap`: stage-1 efficiency — domain-module training against plain PEFT + Trainer
LoRA and against full-parameter training of the same model.

Three runs on the same packed blocks of a real corpus, each in a fresh Python process (so the
peak RSS is that run's own), with the same thread count, batch size, sequence length and lr:

  peft-trainer  plain script: AutoModelForCausalLM + get_peft_model(LoRA r=8, alpha=16,
                "all-linear") + Trainer + DataCollatorForLanguageModeling(mlm=False)
  domix         `domix.library.pretrain.pretrain` — the real stage-1 code path
  full-ft       the plain Trainer run with every parameter trainable (AdamW, the default)

Each run is its own `python -m domix.bench.dap_worker` process (`dap_worker`: the runs and their
timing); this module starts them, aggregates their figures into ratios against the targets and
writes the result (its Markdown `table`: `dap_table`).

A Trainer callback stamps every optimizer step. The first `WARMUP_STEPS` steps are warm-up;
the timed steps are the intervals between consecutive step ends (forward, backward, optimizer,
data collation, logging: everything a training step costs). tokens/s is tokens per step over
the median step time (robust to a few steps slowed by other load); the `*_best` ratios use the
fastest step of each run instead — on a shared machine they estimate the uncontended cost; the
CPU seconds per step (all threads of the process) are a third view, least disturbed by other
work when `--threads 1`.
The load average before and after each run is recorded. Peak RSS is the process's
`ru_maxrss` at exit. Results are ratios, measured in one invocation (docs/efficiency.md).
"""
from __future__ import annotations

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
from .dap_table import table
from .dap_worker import LR, RUNS, WARMUP_STEPS

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
THEORY_STEP_TIME_LORA_OVER_FULL = 4 / 6  # ≈4PT vs ≈6PT FLOPs per step (docs/efficiency.md)
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


# ---------------------------------------------------------------------------- the runs, each in its process

def _command(kind: str, base: str, data: str, steps: int, seq_len: int, batch_size: int, threads: int,
             result: Path, gradient_checkpointing: bool = False, dtype: str = "fp32", domains: int = 1,
             processes: int = 1, stack: int = 0, parallel: int = 1, device: str = "cpu") -> list[str]:
    launch = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launch, "-m", "domix.bench.dap_worker", "--worker", kind, "--base", base, "--data", data,
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
    res["table"] = table(res)
    if opts.out:
        write_json(opts.out, res)
        res["out"] = str(opts.out)
    return res
