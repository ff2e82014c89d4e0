"""The pieces of a quality report that the benchmark's report and the suite report share: number
formats, the metric table, the claims' verdicts, the rates chosen, the run header and the file itself."""
from __future__ import annotations

import time
from pathlib import Path

from ...io import atomic_write
from .settings import METRICS


def _fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    s = f"{stat['mean']:.{digits}f}"
    return s + (f" ± {stat['std']:.{digits}f}" if len(stat.get("runs", [])) > 1 else "")


def _num(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _params(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _step(wall, cpu) -> str:
    if wall is None:
        return "—"
    return f"{wall:.2f} s" + (f" ({cpu:.2f} s)" if cpu is not None else "")


def _secs(x) -> str:
    if x is None:
        return "—"
    return f"{x / 60:.1f} min" if x >= 120 else f"{x:.1f} s"


def metric_table(results: dict, metric: str = "macro_f1") -> str:
    tasks = list(results["tasks"])
    methods = [m for m in results["methods"] if any(m in results["tasks"][t] for t in tasks)]
    best = {t: max((results["tasks"][t][m][metric]["mean"] for m in methods if m in results["tasks"][t]),
                   default=None) for t in tasks}
    lines = ["| method | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for m in methods:
        cells, means = [], []
        for t in tasks:
            st = results["tasks"][t].get(m, {}).get(metric)
            cell = _fmt(st)
            if st and st["mean"] is not None and best[t] is not None and abs(st["mean"] - best[t]) < 1e-12:
                cell = f"**{cell}**"
            cells.append(cell)
            if st and st["mean"] is not None:
                means.append(st["mean"])
        avg = f"{sum(means) / len(means):.3f}" if len(means) == len(tasks) else "—"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


# MoDE's rows of results["lm_loss"] / ["retention_loss"] and their labels in tables and plots


def _iv(iv) -> str:
    return "—" if iv is None else f"[{iv[0]:+.3f}, {iv[1]:+.3f}]"


def unselected_verdicts(results: dict) -> list[str]:
    """The verdicts again from the seeds that chose nothing (the rate grid chose on the first seed)."""
    if not results.get("verdicts_unselected_seeds"):
        return []
    L = claim_verdicts(results, "verdicts_unselected_seeds", explain=False)
    seeds = [s for s in results["seeds"] if s != results["seeds"][0]]
    L[0] = f"### The same from the seeds that chose nothing (seeds {seeds}; the rate grid chose on seed {results['seeds'][0]})"
    return L + [""]


def claim_verdicts(results: dict, key: str = "verdicts", explain: bool = True, title: str | None = None) -> list[str]:
    """The "Verdicts" section: per claim its verdict and each paired difference A − B of the run's test
    metric (macro-F1, or a suite's accuracy) with its plain, Holm-corrected and per-seed intervals (see
    `verdicts.py`)."""
    from .settings import METRICS
    from .verdicts import CLAIM_SETS, N_BOOT, verdict_options

    how = verdict_options(results.get("settings", {}))
    metric, name_of = how["metric"], METRICS[how["metric"]]
    claims = results.get(key)
    if claims is None:
        return []
    L = ["| claim | verdict | A − B | diff | 95 % | Holm-corrected (level) | per seed (t, 95 %) |",
         "|---|---|---|---:|---|---|---|"]
    notes = []
    for name, c in claims.items():
        for i, x in enumerate(c["comparisons"]):
            holm = f"{_iv(x['ci95_holm'])} ({x['level_holm']:.4f})" if "ci95_holm" in x else "—"
            n = len(x["seeds"])
            seeds = f"{_iv(x.get('ci95_seeds'))} ({n} seed{'s' if n != 1 else ''})" if "per_seed" in x else "—"
            what = f"{x['a']} − {x['b']}"
            if name == "C4":
                what += f", predictions {'identical' if x['identical_predictions'] else 'differ'}"
            L.append(f"| {name if i == 0 else ''} | {'**' + c['verdict'] + '**' if i == 0 else ''} | {what} | "
                     f"{x['diff']:+.3f} | {_iv(x['ci95'])} | {holm} | {seeds} |")
        if not c["comparisons"]:
            L.append(f"| {name} | **{c['verdict']}** | — | | | | |")
        extra = [f"comparator(s) not run or without predictions: {', '.join(c['incomplete'])}"
                 if c.get("incomplete") else "",
                 f"strongest on dev: {c['strongest_on_dev']['method']} ({c['strongest_on_dev'][f'dev_{metric}']:.3f} "
                 f"mean dev {name_of})" if c.get("strongest_on_dev") else "",
                 f"modules of the two orders bitwise equal: {'yes' if c['modules_bitwise_equal'] else 'no'}"
                 if name == "C4" and c.get("modules_bitwise_equal") is not None else ""]
        extra = "; ".join(e for e in extra if e)
        notes.append(f"- **{name}** {c['claim']}" + (f" ({extra})" if extra else "") + ".")
    head = title or f"## Verdicts: paired differences of test {name_of}"
    L = [head, "", *notes, "", *L] if claims else [head, ""]
    if not claims:
        needed = {m for _, pairs in CLAIM_SETS[how["claims"]].values() for p in pairs for m in p}
        L.append("- No runs kept their test predictions (jobs reused from older runs): no claim can be judged."
                 if needed & set(results["methods"]) else
                 "- The claims compare DoMIX and the LoRA and full baselines, none of which this run trained: "
                 "no claim can be judged.")
    if explain:
        L += ["", f"Each interval is a paired bootstrap ({N_BOOT:,} draws): a draw resamples every task's test "
              "examples (the same for both methods) and the seeds (with replacement), and takes the mean over tasks "
              f"of the mean over the drawn seeds of {name_of}(A) − {name_of}(B). Every comparison of the table is one "
              "test of a family: Holm-corrected, the comparison with the i-th smallest bootstrap p-value of m is "
              "read at level 0.05 / (m − i + 1). The per-seed interval is Student's t over the seeds' mean-over-task "
              "differences (none with one seed), so that one collapsed run cannot carry a verdict. Supported: "
              "every Holm-corrected and per-seed interval of the claim above 0; not supported: one below 0; "
              "incomplete: a comparator did not run; else inconclusive. ncl and domix use their first order's "
              "runs. `domix bench verdicts DIR` recomputes this table from the run's committed predictions.", ""]
    return L


def selection_section(results: dict) -> list[str]:
    sel = results.get("selection")
    if not sel:
        return []
    grid = next((v["factors"] for v in sel.values() if "factors" in v), None)
    if grid:  # one dev grid for every method: its scores, the choice in bold
        L = ["## Learning rates: one dev grid for every method (nothing chosen on test)", "",
             "| method | lr × 1 (bridge / gate lr) | " + " | ".join(f"dev at ×{f:g}" for f in grid) + " | chosen |",
             "|---|---|" + "---:|" * len(grid) + "---|"]
        for m, v in sel.items():
            g0 = v["grid"][0]
            devs = [("**" + _num(d) + "**" if f == v["chosen_factor"] else _num(d)) for f, d in zip(v["factors"], v["dev"])]
            L.append(f"| {m} | {g0['lr']:g}" + (f" ({g0['bridge_lr']:g})" if g0["bridge_lr"] else "") + " | "
                     + " | ".join(devs) + f" | ×{v['chosen_factor']:g}: lr {v['lr']:g}"
                     + (f", bridge / gate lr {v['bridge_lr']:g}" if v["bridge_lr"] else "") + " |")
        return L + ["", "Each method's standard rates (column 2, from `settings.STANDARD_LR`) times each factor, "
                    "DoMIX's LoRA and bridge rates (MoDE's expert and "
                    "gate rates) together; every method on every task at every factor with the first seed; each keeps "
                    f"the factor of its best mean dev {METRICS[results['settings'].get('metric', 'macro_f1')]} over the "
                    "tasks (ties to the smaller). The other seeds run "
                    "at that factor only.", ""]
    L = ["## Learning rates (one rule for every method; nothing chosen on test)", "",
         "| method | lr | bridge / gate lr | how |", "|---|---|---|---|"]
    L += [f"| {m} | {v['lr']:g} | {_num(v['bridge_lr'], 4)} | {v['how']} |" for m, v in sel.items()]
    return L + [""]


def _mode_layout(results: dict) -> str:
    p = (results.get("efficiency", {}).get("mode") or results.get("efficiency", {}).get("mode-frozen-experts") or {})
    n = p.get("pretrain_trainable_params")
    return f"{_params(n)} trainable per expert with its gates" if n else "expert layers beside a frozen backbone"


def run_header(results: dict) -> list[str]:
    """The report's opening: the measured times of the invocations, the machine, the command."""
    s = results["settings"]
    ran = [h for h in results.get("history", []) if h["jobs_run"]]
    L = []
    if ran and (len(ran) > 1 or results["reused_jobs"]):
        L += [f"Measured wall time of the invocations that computed these results: **"
              f"{sum(h['wall_time_s'] for h in ran) / 60:.1f} min** ("
              + "; ".join(f"{h['finished']}: {h['wall_time_s'] / 60:.1f} min, {h['jobs_run']} jobs run, "
                          + ("interrupted: timed from its first job's start to its last job's end, the work in "
                             "flight when it stopped not counted" if h.get("interrupted")
                             else f"{h['jobs_reused']} reused") for h in ran) + ").", ""]
    L += [f"Measured wall time of this invocation: **{results['wall_time_s'] / 60:.1f} min** "
         f"({results['reused_jobs']} of {len(results['jobs'])} jobs reused from earlier runs; the jobs' own measured "
         f"time, summed: {results['compute_time_s'] / 60:.1f} min; their CPU time: "
         f"{results.get('cpu_time_s', 0) / 60:.1f} min on {results.get('cores', '?')} cores). {s['workers']} worker(s) × "
         f"{s['threads']} thread(s), base `{s['base']}`, seeds {results['seeds']}, written "
         f"{time.strftime('%Y-%m-%d %H:%M')}."
         + (f" The machine was shared: mean 1-minute load average {results['load_avg_1m']} while jobs finished "
            f"(this run alone keeps it near {s['workers']})." if results.get("load_avg_1m") else ""), "",
         "Command: `domix bench quality --preset " + results["preset"]
         + (f" --methods {','.join(results['methods'])}" if results["methods"] != s.get("methods", results["methods"])
            else "") + "".join(f" --set {x}" if i == 0 else f" {x}" for i, x in enumerate(results.get("set", [])))
         + "`", ""]
    return L


def write_markdown(out: Path, lines: list[str], plots: list) -> None:
    """REPORT.md in `out`: `lines`, then the plots (paths relative to `out`) under "Plots"."""
    if plots:
        lines = [*lines, "## Plots", "", *[f"![{Path(p).stem}]({p})" for p in plots], ""]
    atomic_write(out / "REPORT.md", "\n".join(lines))
