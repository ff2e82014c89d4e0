"""MoDE's learning rates, chosen on held-out loss: a small grid of expert lr x gate lr.

For each point of `settings["mode"]["lr_grid"]` (`{"lr": [...], "gate_lr": [...]}`) the grid trains
every domain's MoDE expert at the run's pre-training budget and reads its held-out LM loss on the
5 % of its own corpus that pre-training holds out (`heldout_loss` in the expert's `domix.json`) —
not the benchmark's held-out text, which the report scores, and never a task split. The run then
keeps the point with the lowest mean held-out loss (`choose_mode_lr`) for everything MoDE does.

The grid's jobs are ordinary `mode/expert/<domain>` jobs of `plan.plan` with that point's rates,
so the experts at the chosen point are the very ones the rest of the run uses (same cache keys).
"""
from __future__ import annotations

import itertools
import json
import statistics
from copy import deepcopy
from pathlib import Path

from ...library import META
from .plan import plan

EXPERT = "mode/expert/"


def at_rates(settings: dict, lr: float, gate_lr: float) -> dict:
    s = deepcopy(settings)
    s["mode"].update(lr=lr, gate_lr=gate_lr)
    return s


def plan_mode_grid(settings: dict, data: dict, work: Path) -> tuple[dict, list]:
    """The grid's expert jobs (named `mode-grid/<lr>,<gate_lr>/<domain>`) and its points
    [{"lr", "gate_lr", "experts": {domain: expert directory}}]."""
    grid = settings["mode"]["lr_grid"]
    jobs, points = {}, []
    for lr, gate_lr in itertools.product(grid["lr"], grid["gate_lr"]):
        p_jobs, _ = plan(at_rates(settings, lr, gate_lr), data, work, ["mode"], settings["seeds"][:1])
        experts = {}
        for name, job in p_jobs.items():
            if name.startswith(EXPERT):
                domain = name[len(EXPERT):]
                job.name = f"mode-grid/{lr:g},{gate_lr:g}/{domain}"
                jobs[job.name] = job
                experts[domain] = job.out
        points.append({"lr": lr, "gate_lr": gate_lr, "experts": experts})
    return jobs, points


def collect_mode_grid(points: list, domains: list[str]) -> list[dict]:
    """results.json's `mode_lr_grid`: each point's held-out loss per domain and their mean."""
    out = []
    for p in points:
        loss = {}
        for d in domains:
            meta = Path(p["experts"][d]) / META
            if meta.is_file() and (x := json.loads(meta.read_text()).get("heldout_loss")) is not None:
                loss[d] = round(x, 4)
        out.append({"lr": p["lr"], "gate_lr": p["gate_lr"], "heldout_loss": loss,
                    "mean_heldout_loss": round(statistics.mean(loss.values()), 4) if len(loss) == len(domains)
                    else None})
    return out


def choose_mode_lr(grid: list[dict]) -> dict:
    """The rates the run keeps: the lowest mean held-out loss (a tie goes to the lower rates).
    Every point must be complete."""
    if not grid or any(p["mean_heldout_loss"] is None for p in grid):
        raise RuntimeError("the MoDE learning-rate grid is incomplete (a job failed): no rates can be chosen")
    best = min(grid, key=lambda p: (p["mean_heldout_loss"], p["lr"], p["gate_lr"]))
    return {"lr": best["lr"], "gate_lr": best["gate_lr"], "mean_heldout_loss": best["mean_heldout_loss"],
            "how": f"the lowest mean held-out LM loss of the experts over the domains, on the 5 % of each "
                   f"corpus that pre-training holds out, among expert lr {grid_values(grid, 'lr')} x gate lr "
                   f"{grid_values(grid, 'gate_lr')} (ties to the lower rates)"}


def grid_values(grid: list[dict], key: str) -> str:
    return "{" + ", ".join(f"{v:g}" for v in sorted({p[key] for p in grid})) + "}"
