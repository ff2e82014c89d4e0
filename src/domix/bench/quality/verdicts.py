"""Verdicts on the claims of DESIGN.md §6: paired differences of test macro-F1 with 95 % bootstrap
intervals, and the words supported / not supported / inconclusive.

A comparison A − B is a paired bootstrap over test examples and seeds: each draw resamples the test
examples of every task (the same indices for A and B, which were scored on the same examples) and
the fine-tuning seeds (with replacement; one draw of seeds for A, B and every task, since a seed is
one repetition of the whole experiment). Its statistic is the mean over tasks of the mean over the
drawn seeds of macro-F1(A) − macro-F1(B); the interval is the 2.5th to 97.5th percentile of the
draws. Pre-training runs once, so its own variance is not in the interval.
"""
from __future__ import annotations

import numpy as np

N_BOOT = 2000  # bootstrap draws per comparison

# claim -> (what it says, the comparisons A − B that must all be positive for it to hold)
CLAIMS = {
    "C1": ("domain-adaptive pre-training helps", [("own-lora", "base-lora"), ("ncl", "base-full")]),
    "C2": ("mixing the domain modules helps", [("domix", "own-lora"), ("domix", "joint-lora")]),
    "C3": ("the trained bridge helps", [("domix", "cat-merge"), ("domix", "domix-frozen-bridge")]),
    "C5": ("DoMIX beats the strongest baseline without DAP (the best on dev of base LoRA/DoRA/full)",
           [("domix", "base-lora"), ("domix", "base-dora"), ("domix", "base-full")]),
}
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


def paired_bootstrap(a_runs: dict, b_runs: dict, n_boot: int = N_BOOT, seed: int = 0,
                     n_classes: dict | None = None) -> dict:
    """The paired difference A − B of macro-F1 (see the module's docstring) and its 95 % percentile
    interval. `a_runs`, `b_runs`: {task: {seed: (y_true, y_pred)}} with the same tasks, the same seeds
    in every task and the same test examples; `n_classes`: {task: number of classes} (default: the
    largest label seen + 1). Returns {"diff": on the original data, "ci95": [lo, hi]}; deterministic
    given `seed`."""
    tasks = sorted(a_runs)
    seeds = sorted(a_runs[tasks[0]]) if tasks else []
    if not seeds or sorted(b_runs) != tasks or any(sorted(r[t]) != seeds for r in (a_runs, b_runs) for t in tasks):
        raise ValueError("paired_bootstrap needs the same tasks, and the same seeds in every task, for A and B")
    rng = np.random.default_rng(seed)
    seed_draw = rng.integers(0, len(seeds), (n_boot, len(seeds)))
    point, boot = 0.0, np.zeros(n_boot)
    for t in tasks:
        y = np.asarray(a_runs[t][seeds[0]][0])
        idx = rng.integers(0, len(y), (n_boot, len(y)))
        k = (n_classes or {}).get(t) or 1 + max(int(np.max(p, initial=0)) for r in (a_runs, b_runs)
                                                for s in seeds for p in r[t][s])
        full, drawn = [], np.empty((len(seeds), n_boot))
        for j, s in enumerate(seeds):
            (ya, pa), (yb, pb) = a_runs[t][s], b_runs[t][s]
            if not (np.array_equal(ya, y) and np.array_equal(yb, y)):
                raise ValueError(f"{t}, seed {s}: A and B were not scored on the same test examples")
            full.append(macro_f1(y, pa, n_classes=k)[0] - macro_f1(y, pb, n_classes=k)[0])
            drawn[j] = macro_f1(y, pa, idx, k) - macro_f1(y, pb, idx, k)
        point += float(np.mean(full))
        boot += drawn[seed_draw, np.arange(n_boot)[:, None]].mean(1)  # draw b: its seeds' differences
    lo, hi = np.percentile(boot / len(tasks), [2.5, 97.5])
    return {"diff": round(point / len(tasks), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}


def verdict(intervals: list, complete: bool = True) -> str:
    """"not supported" when an interval lies entirely below 0; "supported" when every comparison
    was made (`complete`) and every interval lies entirely above 0; else "inconclusive"."""
    if any(hi < 0 for _, hi in intervals):
        return "not supported"
    return "supported" if complete and intervals and all(lo > 0 for lo, _ in intervals) else "inconclusive"


def _common(a: dict, b: dict) -> tuple[list, list]:
    """The tasks both methods ran, and the seeds both ran on every one of them."""
    tasks = sorted(set(a) & set(b))
    seeds = set.intersection(*(set(a[t]) & set(b[t]) for t in tasks)) if tasks else set()
    return tasks, sorted(seeds)


def verdicts(runs: dict, n_boot: int = N_BOOT, seed: int = 0, n_classes: dict | None = None,
             methods: list[str] | None = None, dev: dict | None = None) -> dict:
    """Every claim of `CLAIMS` with at least one comparison that can be made: {claim: {"claim": what
    it says, "comparisons": [{"a", "b", "diff", "ci95", "tasks", "seeds"}], "verdict": ...,
    "missing": [methods without test predictions], "not_run": [methods the run left out], if any}}.
    `runs`: {method: {task: {seed: (y_true, y_pred)}}}; a comparison uses the tasks both methods ran
    and the seeds both ran on all of them. A comparison with a method outside `methods` (the run's
    methods; default: every method) is left out and named; one whose method ran without predictions
    makes its claim at best inconclusive. With `dev` ({method: mean dev macro-F1}), C5 compares
    DoMIX with the baseline that scored best on dev only."""
    out = {}
    for claim, (says, pairs) in CLAIMS.items():
        comparisons, missing = [], []
        not_run = sorted({m for p in pairs for m in p if methods is not None and m not in methods})
        pairs = [p for p in pairs if not set(p) & set(not_run)]
        chosen = None
        if claim == "C5" and dev and pairs:
            ranked = [b for _, b in pairs if dev.get(b) is not None]
            if ranked:
                chosen = max(ranked, key=lambda b: dev[b])
                pairs = [p for p in pairs if p[1] == chosen]
        for a, b in pairs:
            tasks, seeds = _common(runs.get(a, {}), runs.get(b, {}))
            if not seeds:
                lack = [m for m in (a, b) if not runs.get(m)] or [a, b]  # not run, or never on the same seeds
                missing += [m for m in lack if m not in missing]
                continue
            pick = lambda m: {t: {s: runs[m][t][s] for s in seeds} for t in tasks}  # noqa: E731
            comparisons.append({"a": a, "b": b, **paired_bootstrap(pick(a), pick(b), n_boot, seed, n_classes),
                                "tasks": tasks, "seeds": seeds})
        if comparisons:
            complete = len(comparisons) == len(pairs)
            out[claim] = {"claim": says, "comparisons": comparisons,
                          "verdict": verdict([c["ci95"] for c in comparisons], complete),
                          **({"missing": missing} if not complete else {}),
                          **({"not_run": not_run} if not_run else {}),
                          **({"strongest_on_dev": {"method": chosen, "dev_macro_f1": round(dev[chosen], 4)}}
                             if chosen else {})}
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
