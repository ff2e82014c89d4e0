"""Verdicts on the benchmark's claims (`CLAIMS`; docs/benchmarks.md): paired differences of test macro-F1
with intervals, and the words supported / not supported / inconclusive / incomplete.

A comparison A − B is a paired bootstrap over test examples and seeds: each draw resamples the test
examples of every task (the same indices for A and B, which were scored on the same examples) and
the fine-tuning seeds (with replacement; one draw of seeds for A, B and every task, since a seed is
one repetition of the whole experiment). Its statistic is the mean over tasks of the mean over the
drawn seeds of macro-F1(A) − macro-F1(B).

Every comparison of every claim is one test of a family, so each carries, beside its plain 95 %
percentile interval (`ci95`), the interval at its Holm-corrected level (`ci95_holm`: the comparison
with the i-th smallest bootstrap p-value of m is read at level 0.05 / (m − i + 1)), and a per-seed
interval (`ci95_seeds`: Student's t over the seeds' mean-over-task differences), so that a single
collapsed run cannot carry a verdict. A claim is supported when every interval of both kinds of
every comparison lies above 0, not supported when a corrected interval lies below 0, incomplete when
a comparator did not run, else inconclusive.
"""
from __future__ import annotations

import numpy as np

from .records import task_result

N_BOOT = 10000  # bootstrap draws per comparison (enough for the tails of Holm-corrected levels)

# claim -> (what it says, the comparisons A − B that must all be positive for it to hold)
# (C1 compares at the modules' rank, so that only the starting point differs; C5 with the baselines of
# DoMIX's capacity: the one best on dev, and the parameter- and rank-matched LoRAs beside it, see `C5_SHOWN`)
CLAIMS = {
    "C1": ("domain-adaptive pre-training helps", [("own-lora", "base-lora"), ("ncl", "base-full")]),
    "C2": ("mixing the domain modules helps", [("domix", "own-lora"), ("domix", "joint-lora")]),
    "C3": ("the trained bridge helps", [("domix", "cat-merge"), ("domix", "domix-frozen-bridge")]),
    "C5": ("DoMIX beats the strongest baseline of its capacity without DAP (the best on dev of LoRA and DoRA "
           "with DoMIX's trainable parameters, LoRA of its update rank, and full fine-tuning)",
           [("domix", "base-lora-params"), ("domix", "base-lora-rank"), ("domix", "base-dora-params"),
            ("domix", "base-full")]),
    "C6": ("DoMIX's gain comes from the domain pre-training, not the bridge's structure alone (DoMIX over "
           "untrained modules as the control)", [("domix", "domix-untrained")]),
}
# the LLM suite's claims (`--preset commonsense`): the paper's comparisons on the union of the tasks
LLM_CLAIMS = {
    "L1": ("DoMIX beats LoRA, at rank 16 and at DoMIX's update rank N·r",
           [("domix", "base-lora"), ("domix", "base-lora-rank")]),
    "L2": ("DoMIX beats DoRA, at rank 16 and at DoMIX's update rank N·r",
           [("domix", "base-dora"), ("domix", "base-dora-rank")]),
    "L3": ("the trained bridge helps (P trained against P frozen at its start)", [("domix", "domix-frozen-bridge")]),
}
CLAIM_SETS = {"dapt": CLAIMS, "llm": LLM_CLAIMS}
C5_SHOWN = ("base-lora-params", "base-lora-rank")  # compared whichever is the strongest on dev
ALPHA = 0.05
C4 = "DoMIX does not depend on the order in which the domains were learned (ncl's spread beside it)"


def macro_f1(y_true, y_pred, idx=None, n_classes: int | None = None) -> np.ndarray:
    """Macro-F1 of many resamples at once: row b of `idx` (draws × examples) holds the example
    indices of resample b (default: one row, every example). Per class F1 = 2·TP / (true + predicted),
    0 when the class is neither true nor predicted, averaged over all `n_classes` classes (default:
    the largest label + 1) — sklearn's f1_score(average="macro", labels=all, zero_division=0)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    idx = np.arange(len(y_true))[None] if idx is None else np.atleast_2d(idx)
    k = int(n_classes or max(y_true.max(initial=0), y_pred.max(initial=0)) + 1)
    draws = len(idx)
    # one bincount for every confusion matrix: resample b's cell (true, pred) is bin b·k² + true·k + pred
    codes = (y_true * k + y_pred)[idx] + np.arange(draws)[:, None] * (k * k)
    cm = np.bincount(codes.ravel(), minlength=draws * k * k).reshape(draws, k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(2) + cm.sum(1)  # true + predicted per class
    f1 = np.divide(2.0 * tp, support, out=np.zeros(support.shape), where=support > 0)
    return f1.mean(1)


def accuracy(y_true, y_pred, idx=None, n_classes: int | None = None) -> np.ndarray:
    """Accuracy of many resamples at once (`idx` as in `macro_f1`); a prediction of -1 (no answer) is wrong."""
    hit = np.asarray(y_true, dtype=np.int64) == np.asarray(y_pred, dtype=np.int64)
    idx = np.arange(len(hit))[None] if idx is None else np.atleast_2d(idx)
    return hit[idx].mean(1)


METRIC_FUNCTIONS = {"macro_f1": macro_f1, "accuracy": accuracy}


def verdict_options(settings: dict) -> dict:
    """How a run's verdicts are read: its claims and its metric (`run_verdicts`'s keywords)."""
    return {"claims": settings.get("claims", "dapt"), "metric": settings.get("metric", "macro_f1")}


def paired_bootstrap(a_runs: dict, b_runs: dict, n_boot: int = N_BOOT, seed: int = 0,
                     n_classes: dict | None = None, draws: bool = False, metric: str = "macro_f1") -> dict:
    """The paired difference A − B of `metric` (macro_f1 or accuracy; see the module's docstring) and its 95 % percentile
    interval. `a_runs`, `b_runs`: {task: {seed: (y_true, y_pred)}} with the same tasks, the same seeds
    in every task and the same test examples; `n_classes`: {task: number of classes} (default: the
    largest label seen + 1). Returns {"diff": on the original data, "ci95": [lo, hi], "p": the two-sided
    bootstrap p-value, "per_seed": each seed's mean-over-task difference} (with `draws`, also "draws",
    the bootstrap statistics); deterministic given `seed`."""
    tasks = sorted(a_runs)
    seeds = sorted(a_runs[tasks[0]]) if tasks else []
    if not seeds or sorted(b_runs) != tasks or any(sorted(r[t]) != seeds for r in (a_runs, b_runs) for t in tasks):
        raise ValueError("paired_bootstrap needs the same tasks, and the same seeds in every task, for A and B")
    score = METRIC_FUNCTIONS[metric]
    rng = np.random.default_rng(seed)
    seed_draw = rng.integers(0, len(seeds), (n_boot, len(seeds)))
    per_seed, boot = np.zeros(len(seeds)), np.zeros(n_boot)
    for t in tasks:
        y = np.asarray(a_runs[t][seeds[0]][0])
        idx = rng.integers(0, len(y), (n_boot, len(y)))
        k = (n_classes or {}).get(t) or 1 + max(int(np.max(p, initial=0)) for r in (a_runs, b_runs)
                                                for s in seeds for p in r[t][s])
        drawn = np.empty((len(seeds), n_boot))
        for j, s in enumerate(seeds):
            (ya, pa), (yb, pb) = a_runs[t][s], b_runs[t][s]
            if not (np.array_equal(ya, y) and np.array_equal(yb, y)):
                raise ValueError(f"{t}, seed {s}: A and B were not scored on the same test examples")
            per_seed[j] += score(y, pa, n_classes=k)[0] - score(y, pb, n_classes=k)[0]
            drawn[j] = score(y, pa, idx, k) - score(y, pb, idx, k)
        boot += drawn[seed_draw, np.arange(n_boot)[:, None]].mean(1)  # draw b: its seeds' differences
    boot, per_seed = boot / len(tasks), per_seed / len(tasks)
    out = {"diff": round(float(per_seed.mean()), 4), "ci95": percentile_interval(boot, ALPHA),
           "p": bootstrap_p(boot), "per_seed": [round(float(x), 4) for x in per_seed]}
    return {**out, "draws": boot} if draws else out


def percentile_interval(boot: np.ndarray, alpha: float) -> list[float]:
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [round(float(lo), 4), round(float(hi), 4)]


def bootstrap_p(boot: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from the draws: twice the smaller share of draws on one
    side of 0 (draws at exactly 0 count on both sides), at least one draw's worth, at most 1."""
    below, above = float(np.mean(boot <= 0)), float(np.mean(boot >= 0))
    return round(min(1.0, max(1.0 / len(boot), 2 * min(below, above))), 6)


def seed_interval(per_seed: list[float], alpha: float = ALPHA) -> list[float] | None:
    """Student's t interval of the mean of the seeds' differences (None with fewer than two seeds)."""
    from scipy import stats

    x = np.asarray(per_seed, dtype=float)
    if len(x) < 2:
        return None
    half = float(stats.t.ppf(1 - alpha / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return [round(float(x.mean()) - half, 4), round(float(x.mean()) + half, 4)]


def holm_levels(ps: list[float], alpha: float = ALPHA) -> tuple[list[float], list[float]]:
    """Holm's step-down correction of the p-values `ps` (one family): each test's level (the i-th
    smallest p of m is tested at alpha / (m − i + 1)) and its adjusted p-value (max over the smaller
    ones of (m − j + 1) · p_j, at most 1), in the order of `ps`."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: (ps[i], i))
    levels, adjusted, run = [0.0] * m, [0.0] * m, 0.0
    for rank, i in enumerate(order):
        levels[i] = alpha / (m - rank)
        run = max(run, min(1.0, (m - rank) * ps[i]))
        adjusted[i] = round(run, 6)
    return levels, adjusted


def verdict(intervals: list, complete: bool = True) -> str:
    """"not supported" when an interval lies entirely below 0; "incomplete" when a comparison could not
    be made (not `complete`); "supported" when every interval lies entirely above 0 (an interval that
    could not be computed, None, counts as not above 0); else "inconclusive"."""
    if any(iv is not None and iv[1] < 0 for iv in intervals):
        return "not supported"
    if not complete:
        return "incomplete"
    return "supported" if intervals and all(iv is not None and iv[0] > 0 for iv in intervals) else "inconclusive"


def _common(a: dict, b: dict) -> tuple[list, list]:
    """The tasks both methods ran, and the seeds both ran on every one of them."""
    tasks = sorted(set(a) & set(b))
    seeds = set.intersection(*(set(a[t]) & set(b[t]) for t in tasks)) if tasks else set()
    return tasks, sorted(seeds)


def verdicts(runs: dict, n_boot: int = N_BOOT, seed: int = 0, n_classes: dict | None = None,
             methods: list[str] | None = None, dev: dict | None = None, claims: str = "dapt",
             metric: str = "macro_f1") -> dict:
    """Every claim of `CLAIMS` with at least one comparison that can be made: {claim: {"claim": what
    it says, "comparisons": [{"a", "b", "diff", "ci95", "p", "p_holm", "level_holm", "ci95_holm",
    "per_seed", "ci95_seeds", "tasks", "seeds"}], "verdict": ..., "incomplete": [comparators that did
    not run or have no predictions], if any}}. `runs`: {method: {task: {seed: (y_true, y_pred)}}}; a
    comparison uses the tasks both methods ran and the seeds both ran on all of them. `methods`: the
    run's methods (default: every method in `runs`). With `dev` ({method: mean dev macro-F1}), C5
    compares DoMIX with the baseline of its capacity best on dev and with `C5_SHOWN`. The Holm family is
    every comparison made here."""
    methods = list(runs) if methods is None else methods
    plans = {}
    for claim, (says, pairs) in CLAIM_SETS[claims].items():
        if claim == "C5" and dev:
            ranked = [b for _, b in pairs if dev.get(b) is not None and b in methods]
            if ranked:
                best = max(ranked, key=lambda b: dev[b])
                keep = [best] + [b for b in C5_SHOWN if b != best]
                plans[claim] = (says, [p for p in pairs if p[1] in keep or p[1] not in methods], best)
                continue
        plans[claim] = (says, pairs, None)
    made = []  # (claim, comparison, draws)
    out = {}
    for claim, (says, pairs, chosen) in plans.items():
        lacking = []
        for a, b in pairs:
            tasks, seeds = _common(runs.get(a, {}), runs.get(b, {}))
            if not seeds:
                lacking += [m for m in (a, b) if not runs.get(m) and m not in lacking] or [b]
                continue
            pick = lambda m: {t: {s: runs[m][t][s] for s in seeds} for t in tasks}  # noqa: E731
            r = paired_bootstrap(pick(a), pick(b), n_boot, seed, n_classes, draws=True, metric=metric)
            draws = r.pop("draws")
            made.append((claim, {"a": a, "b": b, **r, "ci95_seeds": seed_interval(r["per_seed"]),
                                 "tasks": tasks, "seeds": seeds}, draws))
        ran = {m for p in pairs for m in p if runs.get(m)}
        if any(c == claim for c, _, _ in made) or ran:  # a claim none of whose methods ran is left out
            out[claim] = {"claim": says, "comparisons": [],
                          **({"incomplete": sorted(set(lacking))} if lacking else {}),
                          **({"strongest_on_dev": {"method": chosen, f"dev_{metric}": round(dev[chosen], 4)}}
                             if chosen else {})}
    levels, adjusted = holm_levels([c["p"] for _, c, _ in made])
    for (claim, c, draws), level, p_adj in zip(made, levels, adjusted):
        c.update(level_holm=round(level, 6), p_holm=p_adj, ci95_holm=percentile_interval(draws, level))
        out[claim]["comparisons"].append(c)
    for c in out.values():
        ivs = [x for cmp in c["comparisons"] for x in (cmp["ci95_holm"], cmp["ci95_seeds"])]
        c["verdict"] = verdict(ivs, complete="incomplete" not in c)
    return out


def order_verdict(by_order: dict, modules_equal: bool | None, n_boot: int = N_BOOT, seed: int = 0,
                  n_classes: dict | None = None) -> dict | None:
    """C4: DoMIX's test predictions in the first two domain orders, compared pairwise (and ncl's
    beside it, the baseline whose result depends on the order). `by_order`: {method: [runs of order
    A, runs of order B]} with runs as in `verdicts`. Supported when DoMIX's predictions are
    identical in both orders on every task and seed compared; not supported when the interval of
    the difference excludes 0; else inconclusive."""
    dom = by_order.get("domix")
    if not dom or len(dom) < 2:
        return None
    out = {"claim": C4, "comparisons": []}
    for method in sorted(by_order, key=lambda m: m != "domix"):  # DoMIX first, the baselines beside it
        a, b = by_order[method]
        tasks, seeds = _common(a, b)
        if not seeds:
            continue
        same = all(np.array_equal(a[t][s][1], b[t][s][1]) for t in tasks for s in seeds)
        pick = lambda r: {t: {s: r[t][s] for s in seeds} for t in tasks}  # noqa: E731
        out["comparisons"].append({"a": f"{method} [order A]", "b": f"{method} [order B]",
                                   **paired_bootstrap(pick(a), pick(b), n_boot, seed, n_classes),
                                   "tasks": tasks, "seeds": seeds, "identical_predictions": same})
    first = next((c for c in out["comparisons"] if c["a"].startswith("domix ")), None)
    if first is None:
        return None
    lo, hi = first["ci95"]
    out["verdict"] = ("supported" if first["identical_predictions"] else
                      "not supported" if lo > 0 or hi < 0 else "inconclusive")
    out["modules_bitwise_equal"] = modules_equal
    return out


def run_verdicts(run_list: list[dict], results: dict, methods: list[str], orders: list[str],
                 modules_equal: dict | None = None, n_boot: int = N_BOOT, claims: str = "dapt",
                 metric: str = "macro_f1", prediction: str = "y_pred") -> dict:
    """Every claim's verdict (C4 included) from a run's fine-tuning runs: `run_list` as results.json's
    `runs` ({"method", "task", "seed", "order"?, "job"}), `results` {job: its result or record, with
    `test_predictions`, `test.labels` and `dev.macro_f1`}. ncl and domix count their first order's runs;
    C5's strongest baseline is the one with the best mean dev `metric` over the tasks. `claims`: the claim set
    (`CLAIM_SETS`); `prediction`: which of a run's predictions is scored (a suite's `y_pred_loglik` is its
    log-likelihood protocol). The report and
    `domix bench verdicts` both call this, so they agree to the last digit."""
    import statistics

    preds, n_classes, by_order, dev_runs = {}, {}, {}, {}
    for r in run_list:
        res = results.get(r["job"])
        if not res or "test_predictions" not in res:
            continue
        method, task, seed, order = r["method"], r["task"], r["seed"], r.get("order")
        res = task_result(res, task)
        p = (res["test_predictions"]["y_true"], res["test_predictions"][prediction])
        if res["test"].get("labels"):
            n_classes[task] = len(res["test"]["labels"])
        if order in (None, orders[0]):
            preds.setdefault(method, {}).setdefault(task, {})[seed] = p
            if "dev" in res:
                dev_runs.setdefault(method, {}).setdefault(task, []).append(res["dev"][metric])
        if order in orders[:2]:
            by_order.setdefault(method, [{}, {}])[orders.index(order)].setdefault(task, {})[seed] = p
    dev = {m: statistics.mean(statistics.mean(v) for v in by_task.values()) for m, by_task in dev_runs.items()}
    out = verdicts(preds, n_boot=n_boot, n_classes=n_classes, methods=methods, dev=dev, claims=claims, metric=metric)
    c4 = order_verdict(by_order, all(modules_equal.values()) if modules_equal else None, n_boot=n_boot,
                       n_classes=n_classes) if claims == "dapt" else None
    return dict(sorted({**out, "C4": c4}.items())) if c4 else out
