"""`domix bench finetune`: the cost of DoMIX fine-tuning against the baselines a reviewer asks for.

Same data, batch and sequence lengths, each run in a fresh process (so peak RSS is its own):

  domix      the bridge over N library modules (P, B_cat and the head trained; A_cat frozen)
  base-lora  PEFT LoRA from the base (rank 32 by default), all linear layers of every block
  base-dora  PEFT DoRA, same rank
  base-full  every weight trained (AdamW)
  floor      PEFT LoRA of rank 1 on the same layers: an almost free adapter, so its step is what
             any method that adapts every layer of the frozen base pays at least (the frozen
             forward plus the input gradients); DoMIX can be no faster than this

plus `inference`: a forward pass of DoMIX's merged export against the base model of the same
class, alternated in one process (the export must cost exactly the base).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

from ..training import option
from .dap import EfficiencyOptions
from .measure import mib, peak_cuda_mb, peak_rss_mb, step_timer, sync

RUNS = {"domix": {"method": "domix"}, "base-lora": {"method": "lora"}, "base-dora": {"method": "dora"},
        "base-full": {"method": "full"}, "floor": {"method": "lora", "lora_rank": 1}}
WARMUP = 2
TARGETS = {"step_time_domix_over_lora": ("<=", 1.1), "step_time_domix_over_dora": ("<=", 0.75),
           "peak_rss_domix_over_full": ("<=", 0.7), "inference_merged_over_base": ("<=", 1.05)}
TASK = "product-sentiment"


@dataclass(kw_only=True)
class FinetuneBenchOptions(EfficiencyOptions):
    """Options of `domix bench finetune`."""

    library: str | None = option(None, "modules to mix (default: --modules modules of rank --module-rank, built "
                                       "once in the cache)")
    modules: int = option(4, "how many modules DoMIX mixes when the library is built here")
    module_rank: int = option(8, "LoRA rank of those modules")
    lora_rank: int = option(32, "rank of the LoRA/DoRA baselines")
    inference_reps: int = option(5, "forward passes timed per model (merged export vs base)")
    out: str | None = option("bench-out/finetune.json", "where to write the JSON result")


def _library(base: str, n: int, rank: int) -> str:
    """A library of `n` real domain modules (the benchmark corpora, a few steps each) in the cache.
    The benchmark measures cost, which depends on shapes only; the modules are still real."""
    from ..data.benchmark import DOMAINS, build_benchmark_data
    from ..fetch import cache_dir
    from ..io import sha256_text
    from ..library.pretrain_all import pretrain_all
    from ..library.pretrain import PretrainConfig

    from ..checkpoints import resolve_base

    build_benchmark_data(progress=False)
    weights = Path(resolve_base(base)) / "model.safetensors"  # a rewritten base gets a new library
    stamp = f"{base}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}" if weights.exists() else base
    lib = cache_dir() / "bench" / f"finetune-lib-{sha256_text(stamp)[:12]}-r{rank}"
    corpora = cache_dir() / "data" / "corpora"
    cfgs = [PretrainConfig(domain=d, data=[str(corpora / f"{d}.txt")], library=str(lib), base=base, rank=rank,
                           alpha=2 * rank, max_steps=2, seq_len=64, batch_size=4, eval_blocks=1)
            for d in list(DOMAINS)[:n]]
    res = pretrain_all(cfgs, workers=1, progress=False)
    bad = {d: r["error"] for d, r in res.items() if r["status"] == "failed"}
    if bad:
        raise RuntimeError(f"could not build the benchmark library: {bad}")
    return str(lib)


def _task_files(tmp: Path, train_rows: int) -> tuple[str, str]:
    from ..fetch import cache_dir

    src = cache_dir() / "data" / "tasks" / TASK
    train = [l for l in (src / "train.jsonl").read_text().splitlines() if l.strip()][:train_rows]
    dev = [l for l in (src / "dev.jsonl").read_text().splitlines() if l.strip()][:16]
    (tmp / "train.jsonl").write_text("\n".join(train) + "\n")
    (tmp / "dev.jsonl").write_text("\n".join(dev) + "\n")
    return str(tmp / "train.jsonl"), str(tmp / "dev.jsonl")


def _train_worker(name: str, opts: dict) -> dict:
    import torch

    from ..finetune import METHODS, finetune

    torch.set_num_threads(opts["threads"])
    timer = step_timer()
    steps = opts["steps"] + WARMUP
    method = RUNS[name]["method"]
    own = {k: v for k, v in (("library", opts["library"]), ("lora_rank", RUNS[name].get("lora_rank", opts["lora_rank"])))
           if k in METHODS[method].fields}  # another method's options are refused
    m = finetune(train=opts["train"], eval=opts["eval"], out=opts["out"], base=opts["base"], method=method, **own,
                 max_steps=steps, eval_every=10 ** 6, save_steps=10 ** 6, batch_size=opts["batch_size"],
                 max_seq_len=opts["seq_len"], device=opts["device"], threads=opts["threads"], progress=False, overwrite=True,
                 callbacks=[timer])
    times = [timer.end[i] - timer.end[i - 1] for i in range(WARMUP, steps)]
    return {"run": name, "step_time_s": statistics.median(times), "step_time_min_s": min(times),
            "step_times_s": [round(t, 4) for t in times], "trainable_params": m["trainable_params"],
            "total_params": m["total_params"], "peak_rss_mb": peak_rss_mb(),
            "device": opts["device"], "peak_cuda_mb": peak_cuda_mb(opts["device"]),
            "loadavg": os.getloadavg()[0]}


def _inference_worker(task_model: str, opts: dict) -> dict:
    """Forward time of the merged export vs the base model (same class), alternated, one process."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ..export import export
    from ..checkpoints import resolve_base
    from ..models import load_tokenizer

    torch.set_num_threads(opts["threads"])
    merged_dir = Path(opts["tmp"]) / "merged"
    export(task_model, merged_dir, "merged", overwrite=True)
    dev = opts["device"]
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval().to(dev)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_base(opts["base"]),
                                                              num_labels=merged.config.num_labels).eval().to(dev)
    base.config.pad_token_id = merged.config.pad_token_id
    tok = load_tokenizer(opts["base"])
    enc = tok(["a sentence about a product that works well"] * opts["batch_size"], padding="max_length",
              max_length=opts["seq_len"], truncation=True, return_tensors="pt").to(dev)
    t = {"merged": [], "base": []}
    with torch.no_grad():
        for rep in range(opts["inference_reps"] + 1):  # alternate the order: no model always goes first
            for name in (("merged", "base") if rep % 2 == 0 else ("base", "merged")):
                sync()
                t0 = time.perf_counter()
                (merged if name == "merged" else base)(**enc)
                sync()
                t[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in t.items()}  # drop each model's first (warm-up) pass


def _in_process(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        return pool.submit(fn, *args).result()


def run(opts: FinetuneBenchOptions) -> dict:
    import torch

    from ..checkpoints import resolve_base
    from ..io import write_json
    from ..models import resolve_device

    device = resolve_device(opts.device)
    resolve_base(opts.base)  # fetch the default model once, here, not in each worker
    threads = opts.threads or torch.get_num_threads()
    n, rank = opts.modules, opts.module_rank
    library = opts.library or _library(opts.base, n, rank)
    raw = {}
    with tempfile.TemporaryDirectory(prefix="domix-bench-ft-") as tmp:
        train, dev = _task_files(Path(tmp), opts.steps * opts.batch_size + WARMUP * opts.batch_size)
        work = dict(train=train, eval=dev, library=library, base=opts.base, lora_rank=opts.lora_rank,
                    steps=opts.steps, batch_size=opts.batch_size, seq_len=opts.seq_len, threads=threads, tmp=tmp,
                    inference_reps=opts.inference_reps, device=device)
        for name in RUNS:
            print(f"[{name}] ...", end="", flush=True)
            raw[name] = _in_process(_train_worker, name, {**work, "out": str(Path(tmp) / name)})
            print(f" {raw[name]['step_time_s']:.2f} s/step, peak RSS {raw[name]['peak_rss_mb']:.0f} MB", flush=True)
        inference = _in_process(_inference_worker, str(Path(tmp) / "domix"), work)
    ratios = {
        "step_time_domix_over_lora": raw["domix"]["step_time_s"] / raw["base-lora"]["step_time_s"],
        "step_time_domix_over_dora": raw["domix"]["step_time_s"] / raw["base-dora"]["step_time_s"],
        "step_time_domix_over_full": raw["domix"]["step_time_s"] / raw["base-full"]["step_time_s"],
        "peak_rss_domix_over_full": raw["domix"]["peak_rss_mb"] / raw["base-full"]["peak_rss_mb"],
        "peak_rss_domix_over_lora": raw["domix"]["peak_rss_mb"] / raw["base-lora"]["peak_rss_mb"],
        **({"peak_cuda_domix_over_full": raw["domix"]["peak_cuda_mb"] / raw["base-full"]["peak_cuda_mb"],
            "peak_cuda_domix_over_dora": raw["domix"]["peak_cuda_mb"] / raw["base-dora"]["peak_cuda_mb"]}
           if raw["domix"]["peak_cuda_mb"] else {}),
        "inference_merged_over_base": inference["merged"] / inference["base"],
        # the least any every-layer adapter can reach against DoRA on this machine
        "step_time_floor_over_dora": raw["floor"]["step_time_s"] / raw["base-dora"]["step_time_s"],
        "step_time_dora_over_lora": raw["base-dora"]["step_time_s"] / raw["base-lora"]["step_time_s"],
    }
    targets = {k: {"value": ratios[k], "op": op, "target": t, "met": ratios[k] <= t} for k, (op, t) in TARGETS.items()}
    res = {"benchmark": "finetune",
           "settings": {"base": opts.base, "modules": n, "module_rank": rank, "lora_rank": opts.lora_rank,
                        "task": TASK, "steps": opts.steps, "warmup_steps": WARMUP, "batch_size": opts.batch_size,
                        "max_seq_len": opts.seq_len, "threads": threads, "device": device, "torch": torch.__version__,
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
           "runs": raw, "inference_s": inference, "ratios": ratios, "targets": targets}
    lines = [f"Fine-tuning cost — base {opts.base}, DoMIX over {n} modules of rank {rank}; LoRA/DoRA rank "
             f"{opts.lora_rank}; {TASK}, batch {opts.batch_size}, max seq {opts.seq_len}, {opts.steps} timed steps, "
             f"{threads} threads, on {device}", "",
             "| run | step time (s, median) | fastest step (s) | peak RSS (MB) | peak CUDA (MiB) | trainable params |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in raw.items():
        lines.append(f"| {name} | {r['step_time_s']:.3f} | {r['step_time_min_s']:.3f} | {r['peak_rss_mb']:.0f} | "
                     f"{mib(r['peak_cuda_mb'])} | {r['trainable_params']:,} |")
    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|:-:|"]
    for k, v in ratios.items():
        t = targets.get(k)
        lines.append(f"| {k} | {v:.3f} | {t['op'] + ' ' + str(t['target']) if t else ''} | "
                     f"{('yes' if t['met'] else 'NO') if t else ''} |")
    res["table"] = "\n".join(lines)
    if opts.out:
        write_json(opts.out, res)
        res["out"] = str(opts.out)
    return res
