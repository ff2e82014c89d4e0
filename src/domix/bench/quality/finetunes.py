"""Stage 3, the runs the report compares: every method's fine-tuning jobs on every task and seed (in a
suite once on the union of its tasks, scored on each task's test set), and a suite's floor, scored
without fine-tuning. A run is (method, task, seed, domain order | None, job name)."""
from __future__ import annotations

import math

from .capacity import run_capacity
from .job import GENERATE_VERSION, METHOD_VERSIONS, Job, Planning, _key
from .records import record_path
from .settings import METHODS, NEEDS, order_name
from .upstream import Upstream

NOT_RESULTS = {"out", "progress", "overwrite", "resume", "save_steps", "max_new_tokens"}  # run mechanics only


def _finetune_fields(cfg: dict) -> dict:
    """The FinetuneConfig options that define a run's result: the shared ones and the method's own
    (`domix.finetune.METHODS[...].fields`), so that a changed default (say of bridge_init) reruns
    exactly the runs it changes."""
    from ...finetune import METHODS as FINETUNE_METHODS

    other = set().union(*(m.fields for m in FINETUNE_METHODS.values())) - FINETUNE_METHODS[cfg["method"]].fields
    return {k: v for k, v in cfg.items() if k not in NOT_RESULTS and k not in other}


def floor_jobs(p: Planning, methods: list[str], seeds: list[int], up: Upstream) -> list:
    """The floor of a suite: the base model and each task's module alone, scored without fine-tuning."""
    settings, ft, tasks = p.settings, p.settings["finetune"], p.data["tasks"]
    runs = []
    for method in [m for m in methods if METHODS[m]["method"] == "none" and seeds]:
        own = METHODS[method].get("init") == "own"
        for task in (settings["task_domains"] if own else [None]):
            tests = {t: tasks[t]["test"]["path"] for t in ([task] if own else settings["task_domains"])}
            model = {"base": settings["base"], **({"library": str(up.lib_a), "module": task} if own else {})}
            spec = {"model": model, "tests": tests, "max_seq_len": ft["max_seq_len"],
                    "max_new_tokens": ft.get("max_new_tokens", 32), "dtype": ft.get("dtype", "fp32"), **p.common}
            key = _key(spec)
            name = f"score/{key}"
            d_job = p.work / f"score-{task or 'all'}-{key}"
            p.add(Job(name, "score", spec, str(d_job), str(d_job / "result.json"), [f"module/1/{task}"] if own else [],
                      label=f"{method}" + (f"/{task}" if own else ""), record=str(record_path(p.work, d_job.name))))
            runs += [(method, t, seeds[0], None, name) for t in tests]
    return runs


def finetune_jobs(p: Planning, methods: list[str], seeds: list[int], up: Upstream) -> list:
    """Every fine-tuning method on every task (a suite's union) and seed; DoMIX and ncl once per domain
    order (DoMIX's order check with the first seed only)."""
    from ...finetune import FinetuneConfig
    from ...training import defaults as config_defaults

    defaults = config_defaults(FinetuneConfig)
    first, units = order_name(p.settings["orders"][0]), _units(p.settings, p.data)
    runs = []
    for method in [m for m in methods if METHODS[m]["method"] != "none"]:
        for task, unit in units.items():
            for order in _orders(method, up, p.settings["orders"]):
                for seed in seeds:
                    if method == "domix" and order != first and seed != seeds[0]:
                        continue  # the order check runs the first seed
                    name = _finetune_job(p, up, method, task, unit, order, seed, defaults)
                    runs += [(method, t, seed, order, name) for t in unit[2]]
    return runs


def _units(settings: dict, data: dict) -> dict:
    """{name: (domain, its data, {task: test set})}: what one fine-tuning run trains on and is scored on."""
    tasks = data["tasks"]
    if settings.get("suite"):
        return {"union": (None, data["union"], {t: tasks[t]["test"]["path"] for t in settings["task_domains"]})}
    return {task: (d, tasks[task], {task: tasks[task]["test"]["path"]}) for task, d in settings["task_domains"].items()}


def _orders(method: str, up: Upstream, orders: list) -> list:
    """The domain orders a method runs in: ncl's checkpoints and DoMIX's libraries, one each (None: one run)."""
    if METHODS[method].get("init") == "ncl":
        return [order_name(o) for o in orders]
    if method == "domix":
        return [order_name(o) for o in orders if order_name(o) in up.libs]
    return [None]


def _finetune_job(p: Planning, up: Upstream, method: str, task: str, unit: tuple, order: str | None, seed: int,
                  defaults: dict) -> str:
    """Plan one fine-tuning run; returns its job's name (its key: a run planned twice is one job)."""
    settings, ft, m = p.settings, p.settings["finetune"], METHODS[method]
    domain, t, tests = unit
    suite = settings.get("suite")
    kw = {k: v for k, v in m.items() if k not in ("init", "rank")}
    if suite:
        kw.update(task="generate", max_new_tokens=ft.get("max_new_tokens", 32))
    kw.update(train=t["train"]["path"], eval=t["dev"]["path"], base=settings["base"], seed=seed, epochs=ft["epochs"],
              batch_size=ft["batch_size"], max_seq_len=ft["max_seq_len"], threads=settings["threads"],
              lr=ft["full_lr"] if m["method"] == "full" else ft["lr"])
    if m["method"] in ("lora", "dora") and "init" not in m:
        rank = run_capacity(settings)[m["rank"]] if "rank" in m else ft["base_lora_rank"]
        kw.update(lora_rank=rank, lora_alpha=2.0 * rank)
    start, deps = _start(settings, up, method, order, domain)
    kw.update(start)
    _scale_rates(kw, settings, method, defaults)
    steps = max(1, math.ceil(ft["epochs"] * t["train"]["examples"] / ft["batch_size"]))
    # eval_every: dev scored every so many steps (keep_best keeps the best, patience stops);
    # without it, the dev set is scored once, at the end
    kw.update(eval_every=ft.get("eval_every") or steps + 1, keep_best=ft.get("keep_best", False),
              patience=ft.get("patience"), dtype=ft.get("dtype", "fp32"))
    spec = {"config": _finetune_fields({**defaults, **kw}), **({"tests": tests} if suite else {"test": tests[task]}),
            **p.common, "drop_weights": m["method"] == "full" and not settings["keep_full_weights"],
            **({"method_version": METHOD_VERSIONS[method]} if method in METHOD_VERSIONS else {}),
            **({"generate_version": GENERATE_VERSION} if suite else {})}
    if m.get("init") == "ncl":
        spec["ncl_base_id"] = str(up.ncl[order][1])
    key = _key(spec)
    d_job = p.work / f"ft-{task}-s{seed}-{key}"
    name = f"finetune/{key}"
    if name not in p.jobs:
        p.add(Job(name, "finetune", spec, str(d_job / "model"), str(d_job / "result.json"), deps,
                  label=f"{method}/{task}/s{seed}" + (f" [{order}]" if order else ""),
                  record=str(record_path(p.work, d_job.name))))
    return name


def _start(settings: dict, up: Upstream, method: str, order: str | None, domain: str | None) -> tuple[dict, list]:
    """Where a run starts: the options that point it at its upstream model, and the jobs that make it."""
    m, orders = METHODS[method], settings["orders"]
    init = m.get("init")
    if m["method"] == "domix" and init == "untrained":
        return {"library": str(up.lib_u), "modules": "all"}, [f"untrained/{x}" for x in orders[0]]
    if m["method"] == "domix":  # DoMIX itself over its order's library, the others over order A's
        lib = up.libs[order] if method == "domix" else up.lib_a
        i = orders.index(order.split(",")) + 1 if order else 1
        deps = [f"module/{i}/{x}" for x in settings["domains"]]
        return {"library": str(lib), "modules": m.get("modules", "all")}, deps
    if init == "own":
        return {"library": str(up.lib_a), "init_module": domain}, [f"module/1/{domain}"]
    if init == "merged":
        job, mdir = up.merged[method]
        return {"library": str(mdir), "init_module": method}, [job]
    if init == "joint":
        return {"library": str(up.joint), "init_module": "joint"}, ["joint"]
    if init == "ncl":
        job, checkpoints = up.ncl[order]
        return {"base": str(checkpoints / order.split(",")[-1])}, [job]
    if init == "composed":
        job, model = up.composed[NEEDS[method]]
        return {"library": str(up.mode_lib), "from_composed": str(model), "lr": settings["finetune"]["mode_lr"]}, [job]
    return {}, []


def _scale_rates(kw: dict, settings: dict, method: str, defaults: dict) -> None:
    """The rate grid (rates.py): the method's rates together, by one factor."""
    scale, m = settings.get("lr_scale", {}).get(method, 1.0), METHODS[method]
    if scale != 1.0:
        kw["lr"] *= scale
        if m["method"] in ("domix", "mode") and not m.get("freeze_bridge"):
            rate = "gate_lr" if m["method"] == "mode" else "bridge_lr"  # the mixing parameters' rate
            kw[rate] = m.get("bridge_lr", defaults[rate]) * scale
