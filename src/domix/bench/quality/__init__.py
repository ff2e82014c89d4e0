"""`domix bench quality`: DoMIX against the baselines a reviewer would ask for on the four offline
domains — the same data subsets, the same seeds, every training in its own process.

    data subset ─┬─ module <domain> ×4, library in order A ─┬─ lm-eval (held-out + general text)
                 ├─ module <domain> ×4, library in order B ─┤
                 ├─ joint  (one LoRA on the union, 4× tokens)┤
                 ├─ ncl <order> ×2 (full weights, domains in turn)
                 ├─ mode expert <domain> ×4 ─ compose (experts+gates | gates only) ┤
                 ├─ merge linear | ties | dare_ties (order A's modules, by PEFT) ┤
                 └─ finetune <method> <task> <seed> ────────┴─ results.json, REPORT.md, plots/

Every job has a cache key: a hash of everything that defines its result (its settings, the
base model's identity, the data subset, the paths — hence keys — of its inputs, the thread
count). Its artefact lives under `<out>/work/<name>-<key>/` with a `result.json` written last;
a rerun reuses every finished job and recomputes nothing whose settings changed. Jobs run in
fresh processes (locally forked from a server that has imported torch and transformers once,
or as Ray tasks), so a job's peak RSS (`ru_maxrss`) is its own; `workers` jobs run at once with
cores // workers threads.

    settings.py  methods, presets, learning rates        runners.py  the jobs, in the workers
    config.py    a benchmark of the user's own data       execute.py  running jobs with dependencies
    data.py      the data subsets                         collect.py  results and the run history
    plan.py      a run's jobs, in order                   curve.py    the DAP-budget curve
    job.py       a job and its cache key                  order_b.py  order B reusing order A's fine-tunes
    upstream.py  what fine-tuning starts from, LM loss    finetunes.py  the fine-tuning runs, a suite's floor
    grid.py      MoDE's learning rates, on held-out loss  rates.py    every method's rates, on dev
    capacity.py  the ranks of DoMIX's capacity            records.py  committable per-run records
    report.py    REPORT.md and plots, from results.json alone
    verdicts.py  the claims' paired differences with bootstrap, Holm-corrected and per-seed intervals
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from ...checkpoints import DEFAULT_BASE
from ...io import write_json
from .capacity import run_capacity
from .collect import _history, collect
from .config import ConfigError, read_config
from .curve import at_budget, choose_budget, collect_curve, plan_curve
from .data import prepare_data
from .execute import execute, job_executor
from .finetunes import _finetune_fields
from .grid import choose_mode_lr, collect_mode_grid, plan_mode_grid
from .job import _base_id, _key
from .order_b import _reuse_order_b
from .plan import plan
from .rates import choose_rates, collect_rate_grid, plan_rate_grid
from .settings import (COMPOSE, METHODS, NEEDS, _merge, _parse_list, order_name, parse_overrides,
                       resolve_settings, selection)

__all__ = ["BenchmarkError", "ConfigError", "METHODS", "read_config", "plan", "prepare_data", "resolve_settings",
           "run_quality", "run", "_base_id", "_finetune_fields"]


class BenchmarkError(RuntimeError):
    """A run that cannot go on (e.g. the DAP curve, which the rest of the run needs, has failed jobs)."""


def run_quality(preset: str | None = None, out=None, methods=None, seeds=None, workers=None, base: str | None = None,
                data_root=None, progress: bool = True, threads: int | None = None, overrides: dict | None = None,
                executor: str = "local", ray_address: str | None = None, config=None,
                set_items: list[str] | None = None) -> dict:
    """Run the quality benchmark into `out` and return its results (also
    `out/results.json`; `out/REPORT.md` and `out/plots/` hold the report). The jobs run in a
    local process pool (`executor="local"`) or as Ray tasks (`"ray"`, on the cluster at
    `ray_address`, default a local Ray instance; `out` must be on a file system every node sees).
    `config`: a benchmark of the user's own corpora and tasks (YAML, see `config.py`) instead of
    the built-in four domains; `preset`, `base` and `overrides` given here win over its own.
    `set_items`: `--set KEY=VALUE` strings (`parse_overrides`), applied over `overrides`."""
    from .report import write_report

    t0 = time.time()
    if config and data_root:
        raise ValueError("give a benchmark config or a data root (--data), not both")
    user = read_config(config) if config else None
    if user:
        preset = preset or user["preset"]
        base = base or user["base"]
        overrides = _merge(user["settings"], {"domains": list(user["source"]["corpora"]), **(overrides or {})})
    preset, base = preset or "quick", base or DEFAULT_BASE
    if set_items:
        overrides = _merge(overrides or {}, parse_overrides(set_items, preset))
    out = Path(out or f"bench-out/quality-{preset}")
    out.mkdir(parents=True, exist_ok=True)
    settings = resolve_settings(preset, base, seeds, workers, threads, overrides,
                                task_domains=user["task_domains"] if user else None)
    methods = _parse_list(methods) or settings.get("methods") or [m for m in METHODS if not _inapplicable([m], settings)[0]]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    _check_methods(methods, settings)
    settings["base_id"] = _base_id(base)
    if any("rank" in METHODS[m] for m in methods):  # capacity-matched baselines: their ranks, from the base
        run_capacity(settings)
    pool = job_executor(executor, settings["workers"], ray_address)  # starts nothing before its first job
    seeds = settings["seeds"]
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    if user:
        data_root = user["source"]
    elif data_root is None and settings.get("suite"):
        from ...data.commonsense import build_commonsense
        from ...fetch import cache_dir

        data_root = cache_dir() / "commonsense"
        build_commonsense(data_root, progress=progress)  # the default sizes: `domix fetch data commonsense`
    elif data_root is None:
        from ...data.benchmark import build_benchmark_data
        from ...fetch import cache_dir

        build_benchmark_data(progress=progress)
        data_root = cache_dir() / "data"
    log(f"quality: preset {preset}, {len(methods)} methods, seeds {seeds}, {settings['workers']} worker(s) x "
        f"{settings['threads']} thread(s), out {out}")
    data = prepare_data(data_root if user else Path(data_root), out, settings, progress)
    work = out / "work"
    res, curve, curve_res, mode_grid, grid_res, rate_grid, rate_res = {}, None, {}, None, {}, None, {}
    with pool:
        if settings.get("dap_curve"):
            # the curve first (with every job that does not pre-train, so both workers stay busy),
            # then the budget it chooses on dev for everything that pre-trains
            c_jobs, points = plan_curve(settings, data, work)
            free = [m for m in methods if m not in NEEDS]
            c_jobs.update({k: v for k, v in plan(settings, data, work, free, seeds)[0].items() if k not in c_jobs})
            budgets = ", ".join(f"{p['tokens']:,}" for p in points)
            log(f"quality: DAP curve at {budgets} tokens per domain")
            curve_res = _study("the DAP curve", "budget", c_jobs, pool, settings, log)
            curve = collect_curve(points, curve_res, settings["domains"])
            settings["dap_budget"] = choose_budget(curve)
            settings["pretrain"]["steps"] = at_budget(settings, settings["dap_budget"]["tokens_per_domain"])[
                "pretrain"]["steps"]
            log(f"quality: DAP budget {settings['dap_budget']['tokens_per_domain']:,} tokens per domain "
                f"({settings['dap_budget']['how']})")
        if settings["mode"].get("lr_grid") and {NEEDS.get(m) for m in methods} & set(COMPOSE):
            # MoDE's rates, at the run's budget, on the experts' own held-out text
            g_jobs, g_points = plan_mode_grid(settings, data, work)
            log(f"quality: MoDE learning-rate grid, {len(g_points)} points x {len(settings['domains'])} experts")
            grid_res = _study("the MoDE learning-rate grid", "learning rate", g_jobs, pool, settings, log)
            mode_grid = collect_mode_grid(g_points, settings["domains"])
            settings["mode_lr_choice"] = choose_mode_lr(mode_grid)
            settings["mode"].update({k: settings["mode_lr_choice"][k] for k in ("lr", "gate_lr")})
            log(f"quality: MoDE expert lr {settings['mode']['lr']:g}, gate lr {settings['mode']['gate_lr']:g} "
                f"({settings['mode_lr_choice']['how']})")
        if settings.get("lr_grid"):
            # every method's rates, by one rule: the grid's factors on the first seed, chosen on dev
            tuned = [m for m in methods if METHODS[m]["method"] != "none"]  # what trains has rates
            r_jobs, r_points = plan_rate_grid(settings, data, work, tuned)
            log(f"quality: learning-rate grid, factors {settings['lr_grid']} x {len(tuned)} methods "
                f"(seed {seeds[0]}, chosen on dev)")
            rate_res = _study("the learning-rate grid", "learning rate", r_jobs, pool, settings, log)
            rate_grid = collect_rate_grid(r_points, rate_res, tuned, list(settings["task_domains"]),
                                          settings.get("metric", "macro_f1"))
            settings["lr_scale"] = choose_rates(rate_grid)
            log("quality: learning-rate factors chosen on dev: "
                + ", ".join(f"{m} {f:g}" for m, f in settings["lr_scale"].items()))
        jobs, runs = plan(settings, data, work, methods, seeds)
        # the studies' jobs the plan shares (the curve's other budgets are in dap_curve)
        res = {k: v for k, v in {**curve_res, **rate_res}.items() if k in jobs}
        if "domix" in methods and settings.get("order_check", True) and not settings["order_check_finetune"]:
            # train everything but order B's domix fine-tunes, then reuse order A's if the modules are equal
            order_b = {n for m, t, s, o, n in runs if m == "domix" and o != order_name(settings["orders"][0])}
            first = {k: v for k, v in jobs.items() if k not in order_b}
            res = execute(first, pool, settings["workers"], log)
            jobs, runs = _reuse_order_b(jobs, runs, settings, settings["domains"])
        res.update(execute({k: v for k, v in jobs.items() if k not in res}, pool, settings["workers"], log, finished=res))
    wall = time.time() - t0
    every = {**curve_res, **grid_res, **rate_res, **res}  # every job of the run, the curve's and the grid's included
    # a job can appear under two names (a study's and the run's): count its cost once
    once = {r.get("job", n): r for n, r in every.items()}.values()
    results = {"preset": preset, "seeds": seeds, "methods": methods, "set": list(set_items or []),
               "settings": {k: v for k, v in settings.items()}, "data": data,
               "wall_time_s": round(wall, 1),
               "compute_time_s": round(sum(r.get("wall_s", 0) for r in once), 1),
               "cpu_time_s": round(sum(r.get("cpu_s", 0) or 0 for r in once), 1),
               "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               "load_avg_1m": round(statistics.mean(ls), 2) if (ls := [r["load_1m"] for r in every.values()
                                                                      if r.get("load_1m") is not None]) else None,
               "reused_jobs": sum(1 for r in every.values() if r.get("reused")),
               **collect(settings, jobs, runs, res, methods, seeds),
               **({"dap_curve": curve} if curve is not None else {}),
               **({"mode_lr_grid": mode_grid} if mode_grid is not None else {}),
               "selection": selection(settings, methods, rate_grid),
               "jobs": {n: {k: r.get(k) for k in ("label", "kind", "status", "wall_s", "cpu_s", "peak_rss_mb", "load_1m",
                                                  "reused", "error")}
                        for n, r in every.items()},
               "failures": {n: r.get("error") for n, r in every.items() if r.get("status") != "done"}}
    results["settings_key"] = _key(results["settings"])
    results["history"] = _history(out / "results.json", results, every)
    write_json(out / "results.json", results)
    results["table"] = write_report(results, out)
    write_json(out / "results.json", {k: v for k, v in results.items() if k != "table"})
    log(f"quality: done in {wall / 60:.1f} min -> {out / 'REPORT.md'}")
    return results


def _inapplicable(methods: list[str], settings: dict) -> tuple[list[str], str]:
    """The methods the run cannot give a meaning to, and why: a suite's tasks share one fine-tuning, so no
    task has a domain module to start from (own-module scores each alone instead); outside a suite a
    classification head has nothing to score without fine-tuning."""
    if settings.get("suite"):
        return ([m for m in methods if METHODS[m].get("init") == "own" and METHODS[m]["method"] != "none"],
                "a suite fine-tunes once on the union of its tasks, so no run starts from one task's module")
    return ([m for m in methods if METHODS[m]["method"] == "none"],
            "they score a model without fine-tuning, which only a suite (--preset commonsense) does")


def _check_methods(methods: list[str], settings: dict) -> None:
    bad, why = _inapplicable(methods, settings)
    if bad:
        raise ValueError(f"methods {', '.join(bad)} do not apply to preset {settings['preset']}: {why}")


def _study(what: str, chooses: str, jobs: dict, pool, settings: dict, log) -> dict:
    """Run the jobs of a study the rest of the run depends on; any failure stops the run."""
    res = execute(jobs, pool, settings["workers"], log)
    failed = {n: r.get("error") for n, r in res.items() if r.get("status") != "done"}
    if failed:
        raise BenchmarkError(f"{len(failed)} job(s) of {what} failed, so no {chooses} can be chosen: "
                             + "; ".join(f"{n}: {e}" for n, e in list(failed.items())[:3])
                             + ". Rerun the same command to retry them (finished jobs are reused).")
    return res


def run(args) -> dict:
    """`domix bench quality` (args: preset, config, out, methods, seeds, workers, threads, base, data,
    executor, ray_address, set, json)."""
    res = run_quality(preset=getattr(args, "preset", None), out=getattr(args, "out", None),
                      methods=getattr(args, "methods", None), config=getattr(args, "config", None),
                      seeds=getattr(args, "seeds", None), workers=getattr(args, "workers", None),
                      base=getattr(args, "base", None), data_root=getattr(args, "data", None),
                      threads=getattr(args, "threads", None), progress=True,
                      executor=getattr(args, "executor", None) or "local",
                      ray_address=getattr(args, "ray_address", None),
                      set_items=getattr(args, "set", None))
    return res
