"""The results of a run: per task and method, LM loss and retention, order robustness,
efficiency and the bridge; and the history of the invocations that computed them."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ...data.benchmark import GENERAL
from .job import _key
from .order_b import _module_tensors_equal
from .records import task_result
from .settings import COMPOSE, COMPOSED_FOR, MERGES, NEEDS, STAMP, order_name
from .verdicts import run_verdicts, verdict_options


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.mean(xs), 4) if xs else None


def _stats(xs: list[float]) -> dict:
    xs = [float(x) for x in xs]
    return {"mean": round(statistics.mean(xs), 4) if xs else None,
            "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0, "runs": [round(x, 4) for x in xs]}


def collect(settings: dict, jobs: dict, runs: list, res: dict, methods: list[str], seeds: list[int]) -> dict:
    domains, orders = settings["domains"], [order_name(o) for o in settings["orders"]]
    tasks = list(settings["task_domains"])
    metric = settings.get("metric", "macro_f1")
    # the test scores beside the metric: accuracy beside macro-F1; a suite's other protocols beside extraction
    shown = [metric, "accuracy"] if metric == "macro_f1" else [metric, *SUITE_PROTOCOLS.values()]
    ok = lambda n: n in res and res[n].get("status") == "done"  # noqa: E731
    view = lambda n, t: task_result(res[n], t)  # noqa: E731
    # -- tasks
    out_tasks, by = {t: {} for t in tasks}, {}
    for method, task, seed, order, name in runs:
        by.setdefault((method, task), []).append((order, seed, name))
    for (method, task), rs in by.items():
        if method == "domix":
            rs = [r for r in rs if r[0] == orders[0]]
        done = [view(n, task) for _, _, n in rs if ok(n)]
        if not done:
            continue
        out_tasks[task][method] = {
            **{k: _stats([r["test"][k] for r in done]) for k in shown if all(k in r["test"] for r in done)},
            **({f"dev_{metric}": _stats([r["dev"][metric] for r in done])} if "dev" in done[0] else {}),
            "runs": [{"seed": s, **({"order": o} if o else {}), "job": n} for o, s, n in rs if ok(n)]}
    # -- every fine-tuning run: the step whose model was scored (the last, or the best on dev)
    run_list = [{"task": task, "method": method, "seed": seed, **({"order": order} if order else {}), "job": name,
                 **({"kept_step": r.get("kept_step", r["steps"]), "max_steps": r["steps"],
                     f"dev_{metric}": r["dev"][metric], "dev_curve": r.get("dev_curve", []),
                     **{f"dev_{k}": r["dev"][k] for k in SUITE_PROTOCOLS.values() if k in r["dev"]}}
                    if "dev" in r else {}),
                 f"test_{metric}": r["test"][metric],
                 **({"modules_chosen": r["modules_chosen"]} if "modules_chosen" in r else {})}
                for method, task, seed, order, name in runs if ok(name) and (r := view(name, task))]
    # -- LM loss and retention
    ncl_jobs = {o: f"ncl/{i + 1}" for i, o in enumerate(orders)}

    def lm_metric(metric: str) -> dict:
        """{lm job: {held-out text: value}} of one LM metric."""
        return {n: res[n][metric] for n in res if n.startswith("lm/") and ok(n) and metric in res[n]}

    def per_domain(lm: dict) -> dict:
        """{domain: {model: value}} of one LM metric: each domain's own module or expert, the
        single models (base, joint, the compositions) and ncl per order."""
        rows = {}
        for d in domains:
            row = {"base": lm.get("lm/base", {}).get(d), "own": lm.get(f"lm/module/{d}", {}).get(d),
                   "joint": lm.get("lm/joint", {}).get(d),
                   "ncl": {o: lm[f"lm/{j}"][d] for o, j in ncl_jobs.items() if f"lm/{j}" in lm}}
            if f"lm/mode-expert/{d}" in lm:
                row["mode-expert"] = lm[f"lm/mode-expert/{d}"][d]
            if f"lm/full/{d}" in lm:
                row["full"] = lm[f"lm/full/{d}"][d]
            if d in lm.get("lm/mode-mixture", {}):
                row["mode-mixture"] = lm["lm/mode-mixture"][d]
            for variant in COMPOSE:
                if f"lm/{variant}" in lm:
                    row[COMPOSED_FOR[variant]] = lm[f"lm/{variant}"][d]
            rows[d] = row
        return rows

    lm = lm_metric("loss")
    lm_loss, lm_accuracy = per_domain(lm), per_domain(lm_metric("accuracy"))
    # the loss at each index of a held-out block (MoDE's models only): where a composition loses to the experts
    by_position = {d: {k: v for k, v in row.items() if v}  # ncl's {} and the models without it drop out
                   for d, row in per_domain(lm_metric("position_loss")).items()}
    retention, detail = {}, {"own-lora": {}, "ncl": {}, "cross": {}}
    for d in domains:
        if f"lm/module/{d}" in lm:
            detail["cross"][d] = {k: v for k, v in lm[f"lm/module/{d}"].items()}
    if GENERAL in lm.get("lm/base", {}):  # a user benchmark without general text has no retention
        retention["base"] = lm["lm/base"][GENERAL]
        own = {d: lm[f"lm/module/{d}"][GENERAL] for d in domains if f"lm/module/{d}" in lm}
        if own:
            retention["own-lora"] = round(statistics.mean(own.values()), 5)
            detail["own-lora"] = own
        if "lm/joint" in lm:
            retention["joint-lora"] = lm["lm/joint"][GENERAL]
        ncl_ret = {o: lm[f"lm/{j}"][GENERAL] for o, j in ncl_jobs.items() if f"lm/{j}" in lm}
        if ncl_ret:
            retention["ncl"] = round(statistics.mean(ncl_ret.values()), 5)
            detail["ncl"] = ncl_ret
        for key, job in (("mode-expert", "lm/mode-expert"), ("full", "lm/full")):
            per = {d: lm[f"{job}/{d}"][GENERAL] for d in domains if f"{job}/{d}" in lm}
            if per:
                retention[key] = round(statistics.mean(per.values()), 5)
                detail[key] = per
        for variant in COMPOSE:
            if f"lm/{variant}" in lm:
                retention[COMPOSED_FOR[variant]] = lm[f"lm/{variant}"][GENERAL]
    # -- order robustness
    robust, checks = {}, {}
    if "domix" in methods and settings.get("order_check", True):
        robust["domix"] = {o: {} for o in orders[:2]}
        for method, task, seed, order, name in runs:
            if method == "domix" and seed == seeds[0] and ok(name) and order in robust["domix"]:
                robust["domix"][order][task] = round(res[name]["test"]["macro_f1"], 4)
        libs = [Path(jobs[f"module/{i + 1}/{domains[0]}"].out).parent for i in range(min(2, len(orders)))]
        eq = _module_tensors_equal(libs[0], libs[1], domains) if len(libs) == 2 else {}
        same = [robust["domix"][orders[0]].get(t) == robust["domix"][orders[1]].get(t) for t in tasks] \
            if len(orders) > 1 else []
        first = {(t, s): n for m, t, s, o, n in runs if m == "domix" and o == orders[0]}
        own_runs = [n != first.get((t, s)) for m, t, s, o, n in runs if m == "domix" and o != orders[0]]
        checks["domix"] = {"modules_bitwise_equal": eq, "identical_scores": bool(same) and all(same),
                           "order_b_finetuned": bool(own_runs) and all(own_runs),
                           "libraries": [str(p) for p in libs]}
    if "ncl" in methods:
        robust["ncl"] = {o: {} for o in orders}
        for method, task, seed, order, name in runs:
            if method == "ncl" and seed == seeds[0] and ok(name):
                robust["ncl"][order][task] = round(res[name]["test"]["macro_f1"], 4)
        checks["ncl"] = {"spread": {t: round(max(v) - min(v), 4) for t in tasks
                                    if len(v := [robust["ncl"][o][t] for o in orders if t in robust["ncl"][o]]) > 1}}
    # -- efficiency
    eff = {}
    mod_jobs = [f"module/1/{d}" for d in domains]
    for method in methods:
        # a suite's run appears once per task: each job counts once
        fts = [res[n] for n in dict.fromkeys(n for m, _, _, o, n in runs if m == method and ok(n)
                                              and (method != "domix" or o == orders[0]))]
        if not fts or "train_time_s" not in fts[0]:  # scored without training: no fine-tuning cost
            continue
        pre_jobs = {"modules": mod_jobs, "joint": ["joint"], "ncl": list(ncl_jobs.values()),
                    "untrained": [f"untrained/{d}" for d in settings["orders"][0]],  # built, not trained
                    **{v: [f"mode/expert/{d}" for d in domains] + [f"{v}/compose"] for v in COMPOSE}
                    }.get(NEEDS.get(method), [])
        pre = [res[n] for n in pre_jobs if ok(n)]
        if NEEDS.get(method) == "ncl":  # one sequence per order: the cost of one
            pre_s = statistics.mean(r["wall_s"] for r in pre) if pre else 0.0
        else:
            pre_s = sum(r["wall_s"] for r in pre)
        eff[method] = {
            "trainable_params": fts[0]["trainable_params"], "total_params": fts[0]["total_params"],
            "pretrain_s": round(pre_s, 1),
            "pretrain_step_time_s": round(statistics.mean(r["step_time_s"] for r in pre), 4) if pre else None,
            "pretrain_step_cpu_s": _mean([r.get("step_cpu_s") for r in pre]),
            "pretrain_peak_rss_mb": max((r["peak_rss_mb"] for r in pre), default=None),
            "pretrain_trainable_params": pre[0]["trainable_params"] if pre else 0,
            "pretrain_cpu_s": round(sum(r.get("cpu_s", 0) for r in pre) / (len(pre) if NEEDS.get(method) == "ncl"
                                                                           else 1), 1) if pre else 0.0,
            "finetune_s": round(statistics.mean(r["wall_s"] for r in fts), 1),
            "finetune_cpu_s": round(statistics.mean(r.get("cpu_s", 0) for r in fts), 1),
            "finetune_train_s": round(statistics.mean(r["train_time_s"] for r in fts), 1),
            "finetune_total_s": round(sum(r["wall_s"] for r in fts), 1),
            "step_time_s": round(statistics.mean(r["step_time_s"] for r in fts if r["step_time_s"]), 4),
            "step_cpu_s": _mean([r.get("step_cpu_s") for r in fts]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in fts), "finetune_runs": len(fts)}
        if method in MERGES and ok(f"merge/{MERGES[method]}"):  # the merge itself, beside the modules' DAP
            eff[method]["merge_s"] = res[f"merge/{MERGES[method]}"]["wall_s"]
    # -- MoDE's paper comparison: per domain, at the same tokens, a LoRA module, a MoDE expert and all
    # weights trained; the cost of each kind of pre-training per token
    paper = {}
    kinds = {"lora": [f"module/1/{d}" for d in domains], "mode-expert": [f"mode/expert/{d}" for d in domains],
             "full": [f"full/{d}" for d in domains]}
    if all(ok(n) for n in kinds["mode-expert"] + kinds["full"]):
        for kind, names in kinds.items():
            done = [res[n] for n in names if ok(n)]
            if not done:
                continue
            tokens = sum(r["tokens"] for r in done)
            paper[kind] = {"trainable_params": done[0]["trainable_params"],
                           "cpu_s_per_1k_tokens": round(1000 * sum(r.get("cpu_s") or 0 for r in done) / tokens, 3),
                           "step_cpu_s": _mean([r.get("step_cpu_s") for r in done]),
                           "peak_rss_mb": max(r["peak_rss_mb"] for r in done), "tokens_per_domain": done[0]["tokens"]}
    # -- DoMIX's bridge, first seed: per task the domain-by-domain block norms, averaged over layer types
    bridge = {}
    for method, task, seed, order, name in runs:
        if method == "domix" and seed == seeds[0] and order == orders[0] and ok(name) and res[name].get("bridge_blocks"):
            grids = list(res[name]["bridge_blocks"].values())
            n = len(grids[0])
            bridge[task] = [[round(statistics.mean(g[i][j] for g in grids), 5) for j in range(n)] for i in range(n)]
    # -- methods whose settings coincide (e.g. domix-rank when rank is domix's default) share their runs
    job_sets = {}
    for method, task, seed, order, name in runs:
        if method != "domix" or order == orders[0]:
            job_sets.setdefault(method, set()).add(name)
    shared = {m: o for i, m in enumerate(methods) for o in methods[:i] if m in job_sets and job_sets[m] == job_sets.get(o)}
    # -- verdicts on the claims: paired bootstrap of the test predictions (ncl and domix: the first
    # order's runs); with a rate grid, also from the seeds that chose nothing
    eq = checks.get("domix", {}).get("modules_bitwise_equal")
    results_by_job = {n: res[n] for n in res if ok(n)}
    how = verdict_options(settings)
    claims = run_verdicts(run_list, results_by_job, methods, orders, eq, **how)
    unselected = None
    if settings.get("lr_grid") and len(seeds) > 1:
        unselected = run_verdicts([r for r in run_list if r["seed"] != seeds[0]], results_by_job, methods, orders, eq,
                                  **how)
    # a suite's claims read on its other protocols too: the answer sentences' and the option texts' likelihood
    others = {f"verdicts_{name}": run_verdicts(run_list, results_by_job, methods, orders, eq,
                                               **{**how, "prediction": f"y_pred_{name}"})
              for name in SUITE_PROTOCOLS if settings.get("suite") and _predicted(results_by_job, f"y_pred_{name}")}
    return {"tasks": out_tasks, "lm_loss": lm_loss, "lm_accuracy": lm_accuracy, "retention_loss": retention,
            "lm_loss_detail": detail, **({"lm_position_loss": by_position} if any(by_position.values()) else {}),
            "order_robustness": robust, "order_checks": checks, "efficiency": eff, "bridge_blocks": bridge,
            "shared_runs": shared, "runs": run_list, "verdicts": claims,
            **({"verdicts_unselected_seeds": unselected} if unselected is not None else {}),
            **others, "mode_comparison": paper}


# a suite's scoring protocols beside answer extraction: name -> the test score (predictions: `y_pred_<name>`)
SUITE_PROTOCOLS = {"loglik": "accuracy_loglik", "cloze": "accuracy_cloze"}


def _predicted(results: dict, key: str) -> bool:
    """Whether every suite run has predictions `key` (a run scored before a protocol existed has not)."""
    preds = [p for r in results.values() for p in (r.get("test_predictions") or {}).values() if isinstance(p, dict)]
    return bool(preds) and all(key in p for p in preds)


SAME_RUN_GAP_S = 120  # jobs whose spans are closer than this came from one (unrecorded) invocation


def _unrecorded(res: dict, recorded: list[dict]) -> list[dict]:
    """Invocations whose finished jobs these results reuse but which left no history entry —
    killed before they could write results.json, or run with other settings — rebuilt from
    their jobs' own start and end times. Each spans its first job's start to its last job's end:
    work in flight when it stopped is lost and not counted."""
    def ts(stamp: str) -> float:
        return time.mktime(time.strptime(stamp, STAMP))

    known = [(ts(h["finished"]) - h["wall_time_s"] - 1, ts(h["finished"]) + 1) for h in recorded]
    ends = [(ts(r["finished"]), r["wall_s"]) for r in res.values()
            if r.get("reused") and r.get("finished") and r.get("wall_s") is not None]
    spans = sorted((end - wall, end) for end, wall in ends if not any(a <= end <= b for a, b in known))
    groups: list[list] = []
    for a, b in spans:
        if groups and a <= groups[-1][1] + SAME_RUN_GAP_S:
            groups[-1][1] = max(groups[-1][1], b)
            groups[-1][2] += 1
        else:
            groups.append([a, b, 1])
    return [{"finished": time.strftime(STAMP, time.localtime(b)), "wall_time_s": round(b - a, 1), "jobs_run": n,
             "jobs_reused": None, "methods": None, "interrupted": True} for a, b, n in groups]


def _history(path: Path, results: dict, res: dict) -> list[dict]:
    """The invocations that computed these results: earlier ones (from the previous results.json,
    if its settings are the same), earlier ones that left no entry (see `_unrecorded`), and
    this one."""
    hist = []
    try:
        prev = json.loads(path.read_text())
        if prev.get("settings_key", _key(prev.get("settings"))) == results["settings_key"]:
            hist = prev.get("history") or [{  # written before the history was kept
                "finished": time.strftime(STAMP, time.localtime(path.stat().st_mtime)),
                "wall_time_s": prev["wall_time_s"], "jobs_run": len(prev["jobs"]) - prev.get("reused_jobs", 0),
                "jobs_reused": prev.get("reused_jobs", 0), "methods": prev.get("methods")}]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    hist = sorted(hist + _unrecorded(res, hist), key=lambda h: h["finished"])
    n = len(results["jobs"])
    return hist + [{"finished": time.strftime(STAMP), "wall_time_s": results["wall_time_s"],
                    "jobs_run": n - results["reused_jobs"], "jobs_reused": results["reused_jobs"],
                    "methods": results["methods"]}]

