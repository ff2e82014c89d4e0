"""`finetune-all`: one task model per task (or task x seed) of a `tasks.yaml`, independently,
locally or on Ray — `pretrain-all`'s mechanism (`read_config`, `run_all`) over `finetune`.

    base: smollm2-135m
    library: lib/
    defaults: {method: domix, epochs: 3, lr: 5.0e-4}   # any `domix finetune` option, underscored
    seeds: [0, 1]                                       # optional: one task model per task and seed
    resources: {cpus: 4, gpus: 1}                       # optional: what each task reserves on Ray
    tasks:
      pubmed-role: {train: tasks/pubmed-role/train.jsonl, eval: tasks/pubmed-role/dev.jsonl}
      reviews: {train: ..., eval: ..., out: models/reviews, lr: 1.0e-3}

A shared setting (the top-level `library`, `defaults`) reaches only the tasks whose method reads it;
an option given for one task that its method does not read is refused by name, as `finetune` does.
Relative paths are from the file's folder. `out` defaults to `<out root>/<task>`; with `seeds`,
every task model's directory ends in `-s<seed>` (as its name does).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from ..executors import PoolOptions
from ..library.pretrain_all import read_config, run_all
from ..options import option
from .config import FinetuneConfig
from .methods import METHODS
from .taskmodel import TASK_FILE
from .train import finetune

PER_TASK = ("train", "eval", "out")  # a tasks.yaml's, not overridable on the command line


@dataclass(kw_only=True)
class FinetuneAllOptions(PoolOptions):
    """Options of `domix finetune-all` (beside the fine-tuning options that override the config's)."""

    config: str = option(help="tasks.yaml (base, library, defaults, seeds, resources, tasks); the options given here "
                              "override it for every task")
    out: str | None = option(None, "root of the task models without their own out: OUT/TASK[-sSEED] (default: the "
                                   "config's folder)")
PATHS = ("train", "eval", "out", "library", "from_composed")  # resolved from the file's folder
RESOURCES = ("cpus", "gpus")


def load_tasks(path: Path | str, out: Path | str | None = None,
               overrides: dict | None = None) -> tuple[dict[str, FinetuneConfig], dict]:
    """Parse a `tasks.yaml` into ({name: FinetuneConfig}, resources), in the listed order.

    `out`: the root of the default task-model directories (default: the file's folder).
    `overrides` (command-line options) apply to every task; their paths are the caller's."""
    path = Path(path).absolute()  # paths that mean the same in every worker, also on Ray
    if set(overrides or {}) & set(PER_TASK):
        raise ValueError(f"{sorted(set(overrides) & set(PER_TASK))} are per task: give them in {path}")
    overrides = {k: str(Path(v).absolute()) if k in PATHS and v else v for k, v in (overrides or {}).items()}
    doc, entries = read_config(path, "tasks", {f.name for f in fields(FinetuneConfig)}, shared=("base", "library"),
                               run=("seeds", "resources"), overrides=overrides, paths=PATHS)
    resources = doc.get("resources") or {}
    if not isinstance(resources, dict):
        raise ValueError(f"{path}: resources must be a mapping of {list(RESOURCES)}, got {resources!r}")
    if set(resources) - set(RESOURCES):
        raise ValueError(f"{path}: resources: unknown keys {sorted(set(resources) - set(RESOURCES))} "
                         f"(allowed: {list(RESOURCES)})")
    for k, v in resources.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (k == "cpus" and v == 0):
            raise ValueError(f"{path}: resources: {k} must be a {'positive' if k == 'cpus' else 'non-negative'} "
                             f"number, got {v!r}")
    seeds = doc.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
                              or len(set(seeds)) < len(seeds)):
        raise ValueError(f"{path}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    root = Path(out).absolute() if out else path.parent
    configs = {}
    specific = set().union(*(m.fields for m in METHODS.values()))
    for name, opts in entries:
        method = METHODS.get(opts.get("method", FinetuneConfig.method))
        if method is not None:  # a shared setting (top-level, `defaults`) goes to the tasks whose method reads it;
            given = set((doc.get("tasks") or {}).get(name) or {}) | set(overrides)  # one given for this task is refused
            opts = {k: v for k, v in opts.items() if k not in specific - method.fields or k in given}
        missing = [k for k in ("train", "eval") if not opts.get(k)]
        if missing:
            raise ValueError(f"{path}: task '{name}' has no {' and no '.join(missing)}")
        if seeds is not None and "seed" in opts:
            raise ValueError(f"{path}: task '{name}': seed given beside the run's seeds {seeds}; give one of them")
        for seed in seeds if seeds is not None else [None]:
            suffix = "" if seed is None else f"-s{seed}"
            configs[name + suffix] = FinetuneConfig(**{**opts, **({} if seed is None else {"seed": seed}),
                                                       "out": (opts.get("out") or str(root / name)) + suffix})
    return configs, resources


def _task_model_complete(cfg: FinetuneConfig) -> dict | None:
    """The metrics of the finished task model at `cfg.out`; None when it is to be trained (also
    with `overwrite`). Anything else there is left to `finetune`, which refuses it."""
    out = Path(cfg.out)
    if cfg.overwrite or not (out / TASK_FILE).is_file():
        return None
    return json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}


def finetune_all(configs: dict[str, FinetuneConfig], workers: int = 1, executor: str = "local",
                 ray_address: str | None = None, progress: bool = True, resources: dict | None = None) -> dict:
    """Fine-tune every task model not already complete (`run_all`), each exactly as `finetune`
    writes it. Returns {name: {"task", "status", "out", "meta" (its metrics) | "error"}}."""
    resources = resources or {}
    results = run_all(configs, finetune, _task_model_complete, key="task", unit="model", workers=workers,
                      executor=executor, ray_address=ray_address, progress=progress,
                      cpus=resources.get("cpus"), gpus=resources.get("gpus"))
    return {name: {**r, "out": configs[name].out} for name, r in results.items()}
