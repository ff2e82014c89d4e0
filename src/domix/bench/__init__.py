"""Benchmarks (`domix bench dap|finetune|quality`): efficiency (dap, finetune) and quality. Each is a
module `domix.bench.<name>` with `run(options) -> dict` (JSON-able, with a markdown `table`) that
writes its result to `options.out`; its options are a dataclass (`benchmarks()`)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..checkpoints import DEFAULT_BASE
from ..executors import PoolOptions
from ..training import option


@dataclass(kw_only=True)
class QualityOptions(PoolOptions):
    """Options of `domix bench quality` (read by `domix.bench.quality.run`)."""

    preset: str | None = option(None, "quick (the default: the pipeline's smoke test, under an hour), matched "
                                      "(baselines of DoMIX's capacity, every method's rates chosen on one dev grid, "
                                      "trained to a cap runs rarely reach: resumable, many CPU-hours), decisive "
                                      "(the DAP curve, training to the best dev step, three seeds) or full (the "
                                      "earlier, under-trained budget); commonsense: the LLM setting (eight commonsense "
                                      "tasks, one fine-tuning on their union scored on each, against LoRA and DoRA)",
                                choices=("quick", "matched", "decisive", "full", "commonsense"))
    config: str | None = option(None, "YAML of your own benchmark: domains -> corpora, tasks -> train/dev/test JSONL "
                                      "and their domain (see domix.bench.quality.config)")
    methods: str | None = option(None, "comma list of methods (default: the preset's)")
    seeds: str | None = option(None, "comma list of seeds (default: the preset's)")
    workers: int | None = option(None, "trainings run at once (default: the preset's)")
    threads: int | None = option(None, "torch threads per training")
    base: str | None = option(None, f"'{DEFAULT_BASE}' (the offline default) or a Hugging Face model id / local path")
    data: str | None = option(None, "benchmark data root (default: $DOMIX_CACHE/data; commonsense: "
                                    "$DOMIX_CACHE/commonsense, built by `domix fetch data commonsense`)")
    out: str | None = option(None, "output directory (default: bench-out/quality-<preset>/)")
    set: list[str] | None = option(None, "KEY=VALUE ...: change the preset's settings (dotted keys, JSON values), "
                                         "e.g. pretrain.steps=64 mode.lr_grid=null; null turns a study off")


def benchmarks() -> dict:
    """{name: (options dataclass, help)}. Imported when asked for, not with the package: the
    workers of `bench dap` run as `python -m domix.bench.dap_worker`."""
    from .dap import DapOptions
    from .finetune import FinetuneBenchOptions
    from .ranks import RanksOptions
    from .verdicts import VerdictsOptions

    return {
        "dap": (DapOptions, "stage-1 module training vs plain PEFT and full training"),
        "finetune": (FinetuneBenchOptions, "DoMIX vs LoRA/DoRA/full fine-tuning and merged-export inference"),
        "ranks": (RanksOptions, "a DoMIX task model scored as `export --rank K` would write it, at several K "
                                "(macro-F1, loss, adapter size): how small it can be"),
        "quality": (QualityOptions, "DoMIX against every baseline on the four-domain benchmark or on your own "
                                    "corpora and tasks (--config): REPORT.md, results.json, plots"),
        "verdicts": (VerdictsOptions, "recompute every verdict of a quality run from its committed results.json "
                                      "and test predictions"),
    }


def run_bench(which: str, opts) -> dict:
    """Run benchmark `which` with its options (a `benchmarks()[which]` dataclass)."""
    if which not in benchmarks():
        raise ValueError(f"unknown benchmark {which!r}; known: {sorted(benchmarks())}")
    return importlib.import_module(f"{__name__}.{which}").run(opts)
