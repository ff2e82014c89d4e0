"""Every method's learning rates, chosen on dev by one rule.

The grid (`settings["lr_grid"]`, factors such as [1, 2, 4]) multiplies each method's standard rates
(`settings.STANDARD_LR`) by each factor — DoMIX's LoRA rate and bridge rate together, MoDE's expert and
gate rates likewise — and fine-tunes every method on every task at every factor with the first seed.
Each method keeps the factor with its best mean dev macro-F1 over the tasks (a tie goes to the smaller
factor); its other seeds run at that factor only. The test sets play no part: the grid's runs are
scored on test as every run is, and those scores are never read here.

The grid's runs are ordinary fine-tuning jobs of `plan.plan` (their names are their cache keys), so a
method's first-seed runs at the chosen factor are the very runs the rest of the run reports.
"""
from __future__ import annotations

import statistics
from copy import deepcopy
from pathlib import Path

from .plan import plan


def at_scale(settings: dict, methods: list[str], factor: float) -> dict:
    s = deepcopy(settings)
    s["lr_scale"] = {m: float(factor) for m in methods}
    return s


def plan_rate_grid(settings: dict, data: dict, work: Path, methods: list[str]) -> tuple[dict, list]:
    """The grid's jobs (by name; their upstream jobs included) and its points [{"factor", "runs"}]."""
    jobs, points = {}, []
    seed = settings["seeds"][0]
    order_a = ",".join(settings["orders"][0])
    for factor in settings["lr_grid"]:
        p_jobs, p_runs = plan(at_scale(settings, methods, factor), data, work, methods, [seed])
        # the order check (domix over order B's library) and the LM evaluations choose nothing: only the
        # runs of the first order and what they need
        p_runs = [r for r in p_runs if r[3] in (None, order_a)]
        need, todo = set(), [r[4] for r in p_runs]
        while todo:
            name = todo.pop()
            if name not in need:
                need.add(name)
                todo += p_jobs[name].deps
        for name, job in p_jobs.items():  # in the plan's order: modules first, then the fine-tunes
            if name in need:
                jobs.setdefault(name, job)
        points.append({"factor": float(factor), "runs": p_runs})
    return jobs, points


def collect_rate_grid(points: list, res: dict, methods: list[str], tasks: list[str], metric: str = "macro_f1") -> dict:
    """{method: {"grid": [factors], "dev": [mean dev `metric` over the tasks at each factor, None where a
    run is missing], "dev_by_task": [{task: dev metric}]}} from the grid's results (dev only; a suite's
    run has one dev score, on the union's dev set, which every task then shows)."""
    out = {}
    for m in methods:
        grid, dev, by_task = [], [], []
        for p in points:
            scores = {t: res[n]["dev"][metric] for meth, t, s, o, n in p["runs"]
                      if meth == m and n in res and res[n].get("status") == "done"}
            grid.append(p["factor"])
            by_task.append({t: round(v, 4) for t, v in scores.items()})
            dev.append(round(statistics.mean(scores.values()), 4) if len(scores) == len(tasks) else None)
        out[m] = {"grid": grid, "dev": dev, "dev_by_task": by_task}
    return out


def choose_rates(grid: dict) -> dict:
    """{method: the factor it keeps}: the best mean dev macro-F1, ties to the smaller factor. Every
    point must be complete."""
    chosen = {}
    for m, g in grid.items():
        if any(d is None for d in g["dev"]):
            raise RuntimeError(f"the learning-rate grid of {m} is incomplete (a job failed): no rate can be chosen")
        chosen[m] = max(zip(g["grid"], g["dev"]), key=lambda fd: (fd[1], -fd[0]))[0]
    return chosen
