"""A run's plan: all its jobs, in order, and the runs the report compares. The steps: what fine-tuning
starts from (`upstream.py`), the LM loss of what that pre-trains, a suite's floor and the fine-tuning
runs (`finetunes.py`); a job's key is the hash of its spec (`job.py`)."""
from __future__ import annotations

from copy import deepcopy
from pathlib import Path

from .finetunes import finetune_jobs, floor_jobs
from .job import Planning
from .settings import METHODS, order_name
from .upstream import lm_eval_jobs, upstream_jobs


def plan(settings: dict, data: dict, work: Path, methods: list[str], seeds: list[int]) -> tuple[dict, list]:
    """All jobs (by name) and the fine-tuning runs [(method, task, seed, order | None, job name)].

    `settings["module_seeds"]` ({fine-tuning seed: pre-training seed}) gives some fine-tuning seeds
    modules (and the joint and untrained ones) pre-trained with another seed, so that the seeds'
    spread holds the pre-training's variance too: their upstream jobs are named `<name>@pretrain-seed<p>`,
    and they run in the first domain order only (the order check is the first seed's)."""
    base_seed = settings["pretrain"]["seed"]
    by_seed = {int(k): int(v) for k, v in (settings.get("module_seeds") or {}).items()}
    jobs, runs = _plan(settings, data, work, methods, [s for s in seeds if by_seed.get(s, base_seed) == base_seed])
    for p in sorted({by_seed[s] for s in seeds if by_seed.get(s, base_seed) != base_seed}):
        other = deepcopy(settings)
        other["pretrain"]["seed"] = p
        p_jobs, p_runs = _plan(other, data, work, methods, [s for s in seeds if by_seed.get(s, base_seed) == p])
        # the first order's fine-tunes only (the floor's scores, which train nothing, come from the first plan)
        p_runs = [r for r in p_runs if r[3] in (None, order_name(settings["orders"][0]))
                  and METHODS[r[0]]["method"] != "none"]
        need, todo = set(), [r[4] for r in p_runs]
        while todo:  # only what these runs need (no LM evaluations, no second order)
            name = todo.pop()
            if name not in need:
                need.add(name)
                todo += p_jobs[name].deps
        outs = {j.out: n for n, j in jobs.items()}
        rename = {n: n if n.startswith("finetune/") or outs.get(j.out) == n else f"{n}@pretrain-seed{p}"
                  for n, j in p_jobs.items() if n in need}
        for n, j in p_jobs.items():
            if n in need:
                j.name, j.deps = rename[n], [rename[d] for d in j.deps]
                jobs.setdefault(j.name, j)
        runs += p_runs
    return jobs, runs


def _plan(settings: dict, data: dict, work: Path, methods: list[str], seeds: list[int]) -> tuple[dict, list]:
    """One pre-training seed's plan."""
    p = Planning(settings, data, work)
    up = upstream_jobs(p, methods)
    lm_eval_jobs(p, up)
    runs = floor_jobs(p, methods, seeds, up) + finetune_jobs(p, methods, seeds, up)
    for job in p.jobs.values():
        job.threads = settings["threads"]
    return p.jobs, runs
