"""The DAP-budget curve: how much domain text before domain-adaptive pre-training pays.

For each budget of `settings["dap_curve"]["tokens"]` (training tokens per domain) the curve trains
every domain's module, scores its held-out LM loss, and fine-tunes each task from its own domain's
module (own-lora) and from the base (base-lora, the same for every budget), first seed only, and
compares them on **dev**. The run then keeps the budget with the largest mean dev gain
(`choose_budget`) for everything that pre-trains; the test sets play no part.

The curve's jobs are ordinary jobs of `plan.plan` with the pre-training steps of each budget, so
the modules at the chosen budget are the very ones the rest of the run uses (same cache keys).
"""
from __future__ import annotations

import statistics
from copy import deepcopy
from pathlib import Path

from .plan import plan

CURVE_METHODS = ["base-lora", "own-lora"]


def tokens_per_step(settings: dict) -> int:
    pre = settings["pretrain"]
    return pre["batch_size"] * pre["seq_len"]


def at_budget(settings: dict, tokens: int) -> dict:
    """The settings with the pre-training steps of `tokens` per domain."""
    s = deepcopy(settings)
    s["pretrain"]["steps"] = max(1, tokens // tokens_per_step(settings))
    return s


def plan_curve(settings: dict, data: dict, work: Path) -> tuple[dict, list]:
    """The curve's jobs (by name) and its points [{"tokens", "runs", "lm"}]. Jobs shared between
    budgets (the base model's LM evaluation, base-lora's fine-tunes) appear once; the others are
    named `curve/<tokens>/<name>`."""
    jobs, points, by_out = {}, [], {}
    seed = settings["seeds"][0]
    for tokens in settings["dap_curve"]["tokens"]:
        b_jobs, b_runs = plan(at_budget(settings, tokens), data, work, CURVE_METHODS, [seed])
        rename = {}
        for name, job in b_jobs.items():
            if job.out not in by_out:
                shared = name == "lm/base" or name.startswith("finetune/")  # already unique by their key
                by_out[job.out] = name if shared else f"curve/{tokens}/{name}"
            rename[name] = by_out[job.out]
        for name, job in b_jobs.items():
            if rename[name] not in jobs:
                job.name, job.deps = rename[name], [rename[d] for d in job.deps]
                jobs[job.name] = job
        points.append({"tokens": at_budget(settings, tokens)["pretrain"]["steps"] * tokens_per_step(settings),
                       "runs": [(m, t, s, o, rename[n]) for m, t, s, o, n in b_runs],
                       "lm": {d: rename[f"lm/module/{d}"] for d in settings["domains"]}, "base_lm": rename["lm/base"]})
    return jobs, points


def collect_curve(points: list, res: dict, domains: list[str]) -> list[dict]:
    """results.json's `dap_curve`: per budget each domain's held-out LM loss (its own module; the
    base's beside it) and each task's dev macro-F1 from its own module and from the base."""
    ok = lambda n: n in res and res[n].get("status") == "done"  # noqa: E731
    out = []
    for p in points:
        dev = {}
        for method, task, seed, order, name in p["runs"]:
            if ok(name):
                dev.setdefault(task, {})["own" if method == "own-lora" else "base"] = round(res[name]["dev"]["macro_f1"], 4)
        gains = [v["own"] - v["base"] for v in dev.values() if "own" in v and "base" in v]
        out.append({"tokens_per_domain": p["tokens"],
                    "heldout_loss": {d: res[p["lm"][d]]["loss"][d] for d in domains if ok(p["lm"][d])},
                    "base_heldout_loss": {d: res[p["base_lm"]]["loss"][d] for d in domains} if ok(p["base_lm"]) else {},
                    "dev_macro_f1": dev,
                    "mean_dev_gain": round(statistics.mean(gains), 4) if len(gains) == len(domains) else None})
    return out


def choose_budget(curve: list[dict]) -> dict:
    """The budget the run keeps: the largest mean dev gain of own-lora over base-lora (dev only;
    a tie goes to the smaller budget). Every point must be complete."""
    if not curve or any(p["mean_dev_gain"] is None for p in curve):
        raise RuntimeError("the DAP curve is incomplete (a job failed): no budget can be chosen")
    best = max(curve, key=lambda p: (p["mean_dev_gain"], -p["tokens_per_domain"]))
    gains = ", ".join(f"{p['tokens_per_domain']:,}: {p['mean_dev_gain']:+.4f}" for p in curve)
    return {"tokens_per_domain": best["tokens_per_domain"], "mean_dev_gain": best["mean_dev_gain"],
            "how": f"the largest mean dev macro-F1 gain of own-lora over base-lora across the tasks "
                   f"(first seed; ties to the smaller budget); gains by tokens per domain: {gains}"}
