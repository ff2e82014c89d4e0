"""Benchmarks (`domix bench <which>`): efficiency (dap, finetune) and quality: each returns a JSON-able dict with a
markdown `table` and writes its result to `--out`."""
from __future__ import annotations


def _dap(args) -> dict:
    from .dap import run

    return run(args)


def _finetune(args) -> dict:
    from .finetune import run

    return run(args)


def _quality(args) -> dict:
    from .quality import run

    return run(args)


BENCHMARKS = {"dap": _dap, "finetune": _finetune, "quality": _quality}


def run_bench(which: str, args) -> dict:
    try:
        bench = BENCHMARKS[which]
    except KeyError:
        raise ValueError(f"unknown benchmark {which!r}; known: {sorted(BENCHMARKS)}") from None
    return bench(args)
