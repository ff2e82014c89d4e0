"""REPORT.md and plots of `domix bench quality` — from results.json alone."""
from __future__ import annotations

import time
from pathlib import Path

from ...data.benchmark import GENERAL
from ...io import atomic_write, save_figure
from ...library.merge import DEFAULT_DENSITY
from .settings import MERGES, METRICS, compose_gate_lr


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
MODE_LM = (("mode-expert", "MoDE expert"), ("mode", "mode (composed)"),
           ("mode-frozen-experts", "mode-frozen-experts (composed)"),
           ("mode-mixture", "experts' Bayesian mixture (reference)"), ("full", "all weights (per domain)"))


def lm_columns(results: dict) -> list[tuple[str, object]]:
    """The models of the LM tables and plot, in order: (label, row -> value), those measured only."""
    rows = list(results["lm_loss"].values())
    cols = [("base", lambda r: r["base"]), ("own module", lambda r: r["own"]), ("joint-lora", lambda r: r["joint"])]
    cols += [(f"ncl [{o}]", lambda r, o=o: r["ncl"].get(o)) for o in (",".join(x) for x in results["settings"]["orders"])]
    cols += [(label, lambda r, k=k: r.get(k)) for k, label in MODE_LM]
    return [(label, get) for label, get in cols if any(get(r) is not None for r in rows)]


def lm_table(results: dict, metric: str = "lm_loss", digits: int = 3) -> str:
    cols = lm_columns(results)
    L = ["| domain | " + " | ".join(label for label, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for d, r in results.get(metric, {}).items():
        L.append(f"| {d} | " + " | ".join(_num(get(r), digits) for _, get in cols) + " |")
    return "\n".join(L)


def verdicts(results: dict) -> list[str]:
    """Plain statements: on which task does DoMIX beat, or not beat, each other method (test macro-F1)."""
    shared = results.get("shared_runs", {})
    same = {m for m, o in shared.items() if o == "domix"} | {o for m, o in shared.items() if m == "domix"}
    out = []
    if same:
        out.append(f"- {', '.join(sorted(same))}: the same settings as domix, hence the same runs (not compared).")
    tasks = results["tasks"]
    for t, by in tasks.items():
        if "domix" not in by:
            continue
        d = by["domix"]["macro_f1"]
        wins, losses, ties = [], [], []
        for m, st in by.items():
            if m == "domix" or m in same or st["macro_f1"]["mean"] is None:
                continue
            o = st["macro_f1"]
            gap = d["mean"] - o["mean"]
            noise = max(d["std"], o["std"])
            note = f"{m} ({d['mean']:.3f} vs {o['mean']:.3f}" + (", within one std" if noise and abs(gap) <= noise
                                                                 else "") + ")"
            (wins if gap > 0 else ties if gap == 0 else losses).append(note)
        if losses:
            out.append(f"- **{t}**: DoMIX does **not** beat " + "; ".join(losses) + ".")
        if ties:
            out.append(f"- **{t}**: DoMIX ties " + "; ".join(ties) + " (does not beat).")
        if wins:
            out.append(f"- **{t}**: DoMIX beats " + "; ".join(wins) + ".")
    means = {m: sum(tasks[t][m]["macro_f1"]["mean"] for t in tasks) / len(tasks)
             for m in results["methods"] if all(m in tasks[t] for t in tasks)}
    if "domix" in means:
        below = [f"{m} ({v:.3f})" for m, v in means.items() if m != "domix" and m not in same and v >= means["domix"]]
        above = [m for m, v in means.items() if m != "domix" and m not in same and v < means["domix"]]
        out.append(f"- **Mean over tasks** (domix {means['domix']:.3f}): DoMIX is above {len(above)} of "
                   f"{len(above) + len(below)} other methods" + (f"; **not** above {', '.join(below)}." if below else "."))
    return out


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


HANDOVER_NATS = 0.05  # a composition hands over when each domain's held-out loss is this close to its own expert's
HANDOVER_MODELS = ("mode", "mode-frozen-experts", "mode-mixture")  # compared with each domain's expert


def mode_comparison_section(results: dict) -> list[str]:
    """MoDE's paper comparison: per domain, at the same pre-training tokens, a LoRA module, a MoDE
    expert and the model with all weights trained — held-out loss and accuracy, retention, cost."""
    import statistics

    cost = results.get("mode_comparison") or {}
    if not cost:
        return []
    loss, acc, ret = results["lm_loss"], results.get("lm_accuracy", {}), results["retention_loss"]
    kinds = [("own", "own-lora", "LoRA module"), ("mode-expert", "mode-expert", "MoDE expert"),
             ("full", "full", "all weights")]
    L = ["## MoDE against LoRA and full training (the MoDE paper's comparison, at equal tokens per domain)", "",
         "| domain | " + " | ".join(f"{label} loss / acc" for *_, label in kinds) + " |", "|---|---|---|---|"]
    for d, row in loss.items():
        L.append(f"| {d} | " + " | ".join(f"{_num(row.get(k))} / {_num(acc.get(d, {}).get(k), 4)}" for k, _, _ in kinds)
                 + " |")
    L.append("| general (retention) | " + " | ".join(_num(ret.get(r)) for _, r, _ in kinds) + " |")
    L += ["", "| pre-training | trainable | CPU s per 1k tokens | step (CPU s) | peak RSS |", "|---|---|---|---|---|"]
    for kind, label in (("lora", "LoRA module"), ("mode-expert", "MoDE expert"), ("full", "all weights")):
        c = cost.get(kind)
        if c:
            L.append(f"| {label} | {_params(c['trainable_params'])} | {c['cpu_s_per_1k_tokens']:.2f} | "
                     f"{_num(c['step_cpu_s'], 2)} | {c['peak_rss_mb']:.0f} MB |")
    mean = lambda k: statistics.mean(r[k] for r in loss.values() if r.get(k) is not None)  # noqa: E731
    try:
        gap = mean("mode-expert") - mean("full")
        lines = [f"Mean held-out loss: MoDE expert {mean('mode-expert'):.3f}, all weights {mean('full'):.3f} "
                 f"(MoDE {gap:+.3f} nats), LoRA module {mean('own'):.3f}."]
        if ret.get("mode-expert") is not None and ret.get("full") is not None:
            lines.append(f"General-text loss: MoDE experts {ret['mode-expert']:.3f}, all weights {ret['full']:.3f} "
                         "(lower is better retention).")
        if cost.get("full") and cost.get("mode-expert"):
            lines.append(f"MoDE's pre-training costs {cost['mode-expert']['cpu_s_per_1k_tokens'] / cost['full']['cpu_s_per_1k_tokens']:.2f}× "
                         f"the CPU time per token of full training, at {cost['mode-expert']['peak_rss_mb'] / cost['full']['peak_rss_mb']:.2f}× its peak memory.")
    except statistics.StatisticsError:
        lines = []
    for variant in HANDOVER_MODELS:
        gaps = {d: r[variant] - r["mode-expert"] for d, r in loss.items()
                if r.get(variant) is not None and r.get("mode-expert") is not None}
        if gaps:
            within = sum(g <= HANDOVER_NATS for g in gaps.values())
            lines.append(f"Hand-over, {variant} ({'reference' if variant == 'mode-mixture' else 'composed'}) "
                         "minus each domain's own expert: "
                         + ", ".join(f"{d} {g:+.3f}" for d, g in gaps.items())
                         + f" — within {HANDOVER_NATS} nats on {within} of {len(gaps)} domains.")
    lines += handover_by_position(results.get("lm_position_loss") or {})
    if any(r.get("mode-mixture") is not None for r in loss.values()):
        lines.append("The reference mixes the experts' next-token predictions, each weighted by its posterior given "
                     "the block so far (uniform prior; Branch-Train-Merge's ensemble, arXiv 2208.03306): like a "
                     "composition it must infer the domain from the text, at one forward pass per expert.")
    return L + ["", *lines, "The MoDE paper (arXiv 2410.10181, its own figures, GPUs and a larger model) reports MoDE "
                "about equal to full training on the target domains, 1.65 % better retention and up to 38 % faster "
                "training than distributed full training; the rows above are ours, on one CPU process each.", ""]


POSITION_SPANS = ((1, 8), (9, 32), (33, None))  # a held-out token's index in its block: the tokens before it


def handover_by_position(by_position: dict) -> list[str]:
    """The hand-over gaps (composition minus the domain's own expert) over the spans of a held-out
    block, `POSITION_SPANS`: a composition must first tell the domain from the text, so its gap
    shrinks along the block. Each position counts equally within a span."""
    variants = [v for v in HANDOVER_MODELS
                if any(v in r and "mode-expert" in r for r in by_position.values())]
    if not variants:
        return []

    def span(values: list, lo: int, hi: int | None) -> float | None:
        picked = [v for v in values[lo:None if hi is None else hi + 1] if v is not None]
        return sum(picked) / len(picked) if picked else None

    names = [f"tokens {lo}–{hi}" if hi else f"tokens {lo}+" for lo, hi in POSITION_SPANS]
    L = ["", "Hand-over by position in the held-out block (a token's index: the block's tokens before it), "
         "composition minus the domain's own expert:", "",
         "| model | domain | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    late = {}
    for v in variants:
        for d, r in by_position.items():
            if v not in r or "mode-expert" not in r:
                continue
            gaps = [None if a is None or b is None else a - b for a, b in zip(r[v], r["mode-expert"])]
            cells = [span(gaps, lo, hi) for lo, hi in POSITION_SPANS]
            late.setdefault(v, {})[d] = cells[-1]
            L.append(f"| {v} | {d} | " + " | ".join("–" if c is None else f"{c:+.3f}" for c in cells) + " |")
    L.append("")
    counts = [f"{v} on {sum(g <= HANDOVER_NATS for g in known)} of {len(known)}" for v, gaps in late.items()
              if (known := [g for g in gaps.values() if g is not None])]
    if counts:
        L.append(f"From token {POSITION_SPANS[-1][0]} on, within {HANDOVER_NATS} nats of the own expert: "
                 + ", ".join(counts) + " domains.")
    return L


def dap_curve_section(results: dict) -> list[str]:
    """The DAP-budget curve: held-out loss and dev gain of own-lora over base-lora per budget."""
    curve, chosen = results.get("dap_curve"), results["settings"].get("dap_budget")
    if not curve:
        return []
    doms = list(curve[0]["heldout_loss"])
    tasks = list(curve[0]["dev_macro_f1"])
    base = curve[0]["base_heldout_loss"]
    L = ["## DAP budget: task gain vs domain tokens (dev, first seed)", "",
         "| tokens per domain | " + " | ".join(f"{d} loss" for d in doms) + " | "
         + " | ".join(f"{t} own / base" for t in tasks) + " | mean dev gain |",
         "|---|" + "---|" * (len(doms) + len(tasks) + 1),
         "| 0 (base) | " + " | ".join(_num(base.get(d)) for d in doms) + " |" + " |" * len(tasks) + " |"]
    for p in curve:
        dev = p["dev_macro_f1"]
        cells = [f"{_num(dev.get(t, {}).get('own'))} / {_num(dev.get(t, {}).get('base'))}" for t in tasks]
        mark = "**" if chosen and p["tokens_per_domain"] == chosen["tokens_per_domain"] else ""
        L.append(f"| {mark}{p['tokens_per_domain']:,}{mark} | " + " | ".join(_num(p["heldout_loss"].get(d)) for d in doms)
                 + " | " + " | ".join(cells) + f" | {mark}{_num(p['mean_dev_gain'], 4)}{mark} |")
    L += ["", "Loss: each domain's own module on its held-out text (nats/token). own / base: dev macro-F1 of the "
          "task fine-tuned from its domain's module vs from the base model (same rank, same fine-tuning, the "
          "first seed)."]
    if chosen:
        L += [f"The run pre-trains at **{chosen['tokens_per_domain']:,} tokens per domain**: {chosen['how']}."]
    return L + [""]


def _auto_note(results: dict) -> str:
    """domix-auto-2: which modules `library rank` chose for each task, and whether its own domain led."""
    chosen = {r["task"]: r["modules_chosen"] for r in results.get("runs", [])
              if r["method"] == "domix-auto-2" and r.get("modules_chosen")}
    domains = results["settings"].get("task_domains", {})
    firsts = sum(1 for t, mods in chosen.items() if mods and mods[0] == domains.get(t))
    picks = "; ".join(f"{t}: {', '.join(m)}" for t, m in chosen.items())
    return (f"- domix-auto-2 bridges the 2 modules `library rank` scores best on each task's training text "
            f"(`finetune --modules auto:2`): {picks or 'no run finished'}"
            + (f" — the task's own domain ranked first for {firsts} of {len(chosen)} tasks." if chosen else "."))


def mode_grid_section(results: dict) -> list[str]:
    """MoDE's learning-rate grid: each point's held-out loss per domain, the chosen point in bold."""
    grid, chosen = results.get("mode_lr_grid"), results["settings"].get("mode_lr_choice")
    if not grid:
        return []
    doms = list(grid[0]["heldout_loss"])
    L = ["## MoDE learning rates: expert lr x gate lr (held-out loss, not a task split)", "",
         "| expert lr | gate lr | " + " | ".join(doms) + " | mean |", "|---|---|" + "---|" * (len(doms) + 1)]
    for p in grid:
        mark = "**" if chosen and (p["lr"], p["gate_lr"]) == (chosen["lr"], chosen["gate_lr"]) else ""
        L.append(f"| {mark}{p['lr']:g}{mark} | {mark}{p['gate_lr']:g}{mark} | "
                 + " | ".join(_num(p["heldout_loss"].get(d)) for d in doms)
                 + f" | {mark}{_num(p['mean_heldout_loss'])}{mark} |")
    if chosen:
        L += ["", f"The run's MoDE experts train at expert lr **{chosen['lr']:g}**, gate lr **{chosen['gate_lr']:g}**: "
                  f"{chosen['how']}."]
    return L + [""]


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


def capacity_section(results: dict) -> list[str]:
    """The capacity-matched baselines' ranks and every method's trainable parameters."""
    cap = results["settings"].get("capacity")
    if not cap:
        return []
    eff = results.get("efficiency", {})
    L = ["## Capacity: trainable parameters and update rank", "",
         f"DoMIX over {cap['modules']} modules of rank {cap['module_rank']} trains {cap['domix_params']:,} parameters in "
         f"the bridged layers (the B's and P) with an update of rank {cap['rank']}. A LoRA of rank R trains "
         f"R × {cap['lora_params_per_rank']:,} there: the parameter-matched rank is **{cap['params']}** "
         f"({cap['params_lora']:,}), the rank-matched one **{cap['rank']}**. Computed from the base model's target "
         "layers (`capacity.py`), the task head left out (it is the same for every method).", "",
         "| method | trainable parameters (head included) | × DoMIX's |", "|---|---:|---:|"]
    ref = eff.get("domix", {}).get("trainable_params")
    for m in results["methods"]:
        if m in eff:
            n = eff[m]["trainable_params"]
            L.append(f"| {m} | {n:,} | {n / ref:.2f} |" if ref else f"| {m} | {n:,} | |")
    return L + [""]


def kept_steps_section(results: dict) -> list[str]:
    """Training to the best dev step: per method the mean kept step, the steps run and allowed."""
    ft = results["settings"]["finetune"]
    runs = results.get("runs") or []
    if not ft.get("keep_best") or not runs:
        return []
    import statistics

    L = [f"## Training to the best dev step (dev every {ft['eval_every']} steps, patience {ft.get('patience')}, "
         f"at most {ft['epochs']:g} epochs)", "",
         "| method | kept step (mean, min–max) | steps allowed | kept the last allowed step | dev macro-F1 at the kept step |",
         "|---|---|---|---|---|"]
    for m in results["methods"]:
        rs = [r for r in runs if r["method"] == m and r.get("order") in (None, ",".join(results["settings"]["orders"][0]))]
        if rs:
            ks = [r["kept_step"] for r in rs]
            last = sum(r["kept_step"] >= r["max_steps"] for r in rs)
            L.append(f"| {m} | {statistics.mean(ks):.1f} ({min(ks)}–{max(ks)}) | {max(r['max_steps'] for r in rs)} | "
                     f"{last} of {len(rs)} ({100 * last / len(rs):.0f} %) | {statistics.mean(r['dev_macro_f1'] for r in rs):.3f} |")
    return L + ["", "Every run is scored on test once, with the parameters of its best dev evaluation "
                "(`plots/dev_curves.png`: the first seed's dev curves).", ""]


def _plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    made = []
    tasks = list(results["tasks"])
    # per-task bars with error bars
    if tasks:
        methods = [m for m in results["methods"] if any(m in results["tasks"][t] for t in tasks)]
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.8), squeeze=False)
        colors = plt.cm.tab20(np.linspace(0, 1, max(1, len(methods))))
        for ax, t in zip(axes[0], tasks):
            ms = [m for m in methods if m in results["tasks"][t]]
            means = [results["tasks"][t][m]["macro_f1"]["mean"] for m in ms]
            stds = [results["tasks"][t][m]["macro_f1"]["std"] for m in ms]
            ax.bar(range(len(ms)), means, yerr=stds, capsize=3,
                   color=[colors[methods.index(m)] for m in ms], edgecolor=["k" if m == "domix" else "none" for m in ms])
            ax.set_xticks(range(len(ms)), ms, rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
            ax.set_title(t, fontsize=9)
            ax.set_ylabel("test macro-F1", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"end tasks (mean ± std over seeds {results['seeds']})", fontsize=9)
        fig.tight_layout()
        save_figure(fig, plots / "tasks.png")
        made.append("plots/tasks.png")
    # per-domain LM loss
    lm = results["lm_loss"]
    if lm:
        doms = list(lm)
        series = [(label, [get(lm[d]) for d in doms]) for label, get in lm_columns(results)]
        ret = results["retention_loss"]
        doms_g = doms + [GENERAL]
        gen = {"base": ret.get("base"), "own module": ret.get("own-lora"), "joint-lora": ret.get("joint-lora"),
               **{label: ret.get(k) for k, label in MODE_LM}}
        for o in results["settings"]["orders"]:
            key = ",".join(o)
            gen[f"ncl [{key}]"] = results["lm_loss_detail"].get("ncl", {}).get(key)
        fig, ax = plt.subplots(figsize=(1.6 * len(doms_g) + 2, 3.6))
        w = 0.8 / len(series)
        for i, (name, vals) in enumerate(series):
            ys = [v if v is not None else np.nan for v in vals] + [gen.get(name) or np.nan]
            ax.bar(np.arange(len(doms_g)) + i * w, ys, w, label=name)
        ax.set_xticks(np.arange(len(doms_g)) + 0.4 - w / 2, [*doms, f"{GENERAL}\n(retention)"])
        ax.set_ylabel("held-out LM loss (nats/token)")
        lo = np.nanmin([v for _, vals in series for v in vals if v is not None] or [0])
        ax.set_ylim(max(0, lo - 0.5), None)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        save_figure(fig, plots / "lm_loss.png")
        made.append("plots/lm_loss.png")
    curve = results.get("dap_curve")
    if curve:
        xs = [p["tokens_per_domain"] for p in curve]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        for t in curve[0]["dev_macro_f1"]:
            a1.plot(xs, [p["dev_macro_f1"].get(t, {}).get("own", np.nan) - p["dev_macro_f1"].get(t, {}).get("base", np.nan)
                         for p in curve], "o-", label=t, alpha=0.7)
        a1.plot(xs, [p["mean_dev_gain"] if p["mean_dev_gain"] is not None else np.nan for p in curve], "ks-", lw=2,
                label="mean")
        a1.axhline(0, color="grey", lw=0.8)
        a1.set(xscale="log", xlabel="DAP tokens per domain", ylabel="dev macro-F1: own module − base",
               title="task gain vs domain tokens")
        a1.legend(fontsize=7)
        for d in curve[0]["heldout_loss"]:
            line, = a2.plot(xs, [p["heldout_loss"].get(d, np.nan) for p in curve], "o-", label=d)
            if curve[0]["base_heldout_loss"].get(d) is not None:
                a2.axhline(curve[0]["base_heldout_loss"][d], color=line.get_color(), ls=":", lw=1)
        a2.set(xscale="log", xlabel="DAP tokens per domain", ylabel="held-out LM loss (dotted: base)",
               title="does the module learn its domain?")
        a2.legend(fontsize=7)
        for ax in (a1, a2):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, plots / "dap_curve.png")
        made.append("plots/dap_curve.png")
    first = [r for r in results.get("runs") or [] if r["seed"] == results["seeds"][0] and len(r.get("dev_curve") or []) > 1
             and r.get("order") in (None, ",".join(results["settings"]["orders"][0]))]
    if first:
        methods = [m for m in results["methods"] if any(r["method"] == m for r in first)]
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
        colors = plt.cm.tab10(np.linspace(0, 1, max(1, len(methods))))
        for ax, t in zip(axes[0], tasks):
            for r in (r for r in first if r["task"] == t):
                c = colors[methods.index(r["method"])]
                ax.plot(*zip(*r["dev_curve"]), "-", color=c, label=r["method"], lw=2 if r["method"] == "domix" else 1)
                ax.plot([r["kept_step"]], [r["dev_macro_f1"]], "o", color=c)
            ax.set(title=t, xlabel="step", ylabel="dev macro-F1")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=6)
        fig.suptitle("dev curves, first seed (dot: the kept step)", fontsize=9)
        fig.tight_layout()
        save_figure(fig, plots / "dev_curves.png")
        made.append("plots/dev_curves.png")
    # the learning-rate grid: each method's mean dev macro-F1 by factor, its choice marked
    sel = {m: v for m, v in (results.get("selection") or {}).items() if "factors" in v}
    if sel:
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        colors = plt.cm.tab20(np.linspace(0, 1, max(1, len(sel))))
        for c, (m, v) in zip(colors, sel.items()):
            pts = [(f, d) for f, d in zip(v["factors"], v["dev"]) if d is not None]
            if pts:
                ax.plot(*zip(*pts), "-o", color=c, ms=3, label=m, lw=2 if m == "domix" else 1)
                ax.plot([v["chosen_factor"]], [dict(pts)[v["chosen_factor"]]], "o", color=c, ms=8, mfc="none")
        ax.set(xscale="log", xlabel="factor on the standard learning rates", ylabel="mean dev macro-F1 (first seed)")
        ax.set_xticks(next(iter(sel.values()))["factors"], [f"{f:g}×" for f in next(iter(sel.values()))["factors"]])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        ax.set_title("learning-rate grid (ring: the factor each method keeps)", fontsize=9)
        fig.tight_layout()
        save_figure(fig, plots / "lr_grid.png")
        made.append("plots/lr_grid.png")
    # bridge heatmaps of DoMIX (first seed), averaged over layer types
    grids = results.get("bridge_blocks", {})
    if grids:
        names = results["settings"]["domains"]
        fig, axes = plt.subplots(1, len(grids), figsize=(3.3 * len(grids), 3.2), squeeze=False)
        for ax, (t, g) in zip(axes[0], grids.items()):
            im = ax.imshow(np.array(g), cmap="viridis")
            ax.set_title(t, fontsize=9)
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle("DoMIX bridge: mean ||P block|| over layers (rows: output domain, cols: input domain)",
                     fontsize=9)
        fig.tight_layout()
        save_figure(fig, plots / "bridge.png")
        made.append("plots/bridge.png")
    return made


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


def write_report(results: dict, out: Path) -> str:
    """Write out/REPORT.md and out/plots/*.png; return the main markdown table."""
    out = Path(out)
    s = results["settings"]
    if s.get("suite"):
        from .suite_report import write_suite_report

        return write_suite_report(results, out)
    pre, ft = s["pretrain"], s["finetune"]
    orders = [",".join(o) for o in s["orders"]]
    table = metric_table(results, "macro_f1")
    plots = _plots(results, out)
    n_seeds = len(results["seeds"])
    tokens = pre["steps"] * pre["batch_size"] * pre["seq_len"]
    L = [f"# DoMIX quality benchmark — preset `{results['preset']}`", "", *run_header(results)]
    if results["failures"]:
        L += ["## Failures", "", *[f"- `{n}`: {e}" for n, e in results["failures"].items()], ""]
    L += [f"## End tasks: test macro-F1 (mean ± std over {n_seeds} seed(s); best per task in bold)", "", table, "",
          "## End tasks: test accuracy", "", metric_table(results, "accuracy"), "",
          ("Nothing was chosen on the test sets: each run kept the step of its best dev macro-F1 (see below), "
           + ("the DAP budget was chosen on dev" if s.get("dap_budget") else "the DAP budget was set in the run's "
              "settings") + (", every method's learning rates were chosen on dev by one grid (below)."
                             if s.get("lr_grid") else ", the learning rates are standard values.")
           if ft.get("keep_best") else
           "Nothing was chosen on the test sets: there is no model selection at all (the last step is scored); "
           "the dev split is scored once at the end and reported in results.json (`dev_macro_f1`)."), "",
          *claim_verdicts(results), *unselected_verdicts(results), *capacity_section(results),
          *dap_curve_section(results), *mode_grid_section(results), *selection_section(results),
          *kept_steps_section(results), *mode_comparison_section(results),
          "## DoMIX against each other method (test macro-F1)", "", *verdicts(results), ""]
    lm = results["lm_loss"]
    if lm:
        L += ["## Did pre-training learn the domain? Held-out LM loss (nats/token, lower is better)", "",
              lm_table(results, "lm_loss")]
        if results.get("lm_accuracy"):
            L += ["", "Next-token accuracy on the same held-out text (higher is better; MoDE's paper reports this):",
                  "", lm_table(results, "lm_accuracy", 4)]
        ret = results["retention_loss"]
        det = results["lm_loss_detail"]
        mode_ret = [f"{label} {_num(ret[k])}" for k, label in (("mode-expert", "MoDE experts (mean)"),
                                                                 ("mode", "mode composed"),
                                                                 ("mode-frozen-experts", "mode-frozen-experts composed"),
                                                                 ("full", "all weights per domain (mean)"))
                    if k in ret]
        L += ["", f"General text (retention, {GENERAL} held-out): base {_num(ret.get('base'))}; "
              f"own modules {_num(ret.get('own-lora'))} (mean; "
              + ", ".join(f"{d} {_num(v)}" for d, v in det.get("own-lora", {}).items()) + f"); joint-lora "
              f"{_num(ret.get('joint-lora'))}"
              + ("; ncl " + ", ".join(f"[{o}] {_num(v)}" for o, v in det["ncl"].items()) if det.get("ncl") else "")
              + (("; " + "; ".join(mode_ret)) if mode_ret else "")
              + (". ncl is measured after its last domain." if det.get("ncl") else "."), ""]
        cross = det.get("cross", {})
        if cross:
            cols = list(next(iter(cross.values())))
            L += ["Each domain module on every held-out set (rows: module, columns: text):", "",
                  "| module | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
            L += [f"| {d} | " + " | ".join(_num(v.get(c)) for c in cols) + " |" for d, v in cross.items()]
            L.append("")
    rob, chk = results["order_robustness"], results.get("order_checks", {})
    if rob:
        L += ["## Order robustness (test macro-F1, first seed)", ""]
        cols = [(m, o) for m in ("domix", "ncl") if m in rob for o in rob[m]]
        L += ["| task | " + " | ".join(f"{m} [{o}]" for m, o in cols) + (" | ncl spread |" if "ncl" in rob else " |"),
              "|---|" + "---|" * (len(cols) + ("ncl" in rob))]
        for t in results["tasks"]:
            row = [_num(rob[m][o].get(t), 4) for m, o in cols]
            if "ncl" in rob:
                row.append(_num(chk.get("ncl", {}).get("spread", {}).get(t), 4))
            L.append(f"| {t} | " + " | ".join(row) + " |")
        L.append("")
        if "domix" in chk:
            c = chk["domix"]
            eq = c["modules_bitwise_equal"]
            L.append(f"DoMIX: the two libraries were trained in the orders {orders[0]} and {orders[1]} (separate "
                     f"directories and processes). Module tensors bitwise equal: "
                     + ", ".join(f"{d} {'yes' if v else 'NO'}" for d, v in eq.items())
                     + f". Scores identical across orders: **{'yes' if c['identical_scores'] else 'NO'}**. "
                     + ("The order-B fine-tunes ran for real." if c["order_b_finetuned"] else
                        "Because the modules are bitwise equal, the order-B fine-tunes are the same computation on "
                        "the same inputs and reuse the order-A runs (preset setting `order_check_finetune: false`; "
                        "the full preset runs them)."))
        if "ncl" in chk:
            L.append("ncl depends on the order: its spread is the max − min over orders of the first seed's score.")
        L.append("")
    eff = results["efficiency"]
    if eff:
        L += ["## Efficiency (each training in its own process; fine-tuning numbers are means per run)", "",
              "| method | trainable (fine-tune) | DAP time (CPU) | DAP step (CPU) | DAP peak RSS | fine-tune time (CPU) | "
              "fine-tune step (CPU) | fine-tune peak RSS |", "|---|---|---|---|---|---|---|---|"]
        for m, e in eff.items():
            dap = f"{_secs(e['pretrain_s'])} ({_secs(e.get('pretrain_cpu_s'))})" if e["pretrain_s"] else "—"
            L.append(f"| {m} | {_params(e['trainable_params'])} ({100 * e['trainable_params'] / e['total_params']:.2f}%)"
                     f" | {dap} | {_step(e.get('pretrain_step_time_s'), e.get('pretrain_step_cpu_s'))}"
                     f" | {_num(e['pretrain_peak_rss_mb'], 0)} MB | {_secs(e['finetune_s'])} "
                     f"({_secs(e.get('finetune_cpu_s'))}) | {_step(e['step_time_s'], e.get('step_cpu_s'))} | "
                     f"{_num(e['peak_rss_mb'], 0)} MB |")
        L += ["", "DAP time: the jobs' wall time, and in brackets their CPU time (process, data, training, save) — for "
              "the domix family, own-lora and the merge methods "
              "the four modules together (a merge's own time: `merge_s` in results.json), for joint-lora its one "
              "run, for ncl one order's four stages, for the "
              "MoDE methods the four experts and their composition (DAP step and trainable: the experts'). "
              "Fine-tune time includes loading, training, dev and test scoring. Step times are wall-clock medians "
              "after the first step, CPU step times the same for the process's CPU time. With more than one worker, or other work on the machine, jobs share the cores "
              "and their memory bandwidth: compare ratios within one run, not absolute times; CPU time is the "
              "least disturbed measure. Peak RSS includes a few hundred MB of imported libraries common to every job.", ""]
    L += ["## Settings and budgets", "",
          f"- Data: the benchmark data of `domix fetch data` (docs/guide.md, \"The benchmark data\"); deterministic subsets in "
          f"`{results['data']['key']}`: task train/dev/test = "
          + ", ".join(f"{t} {v['train']['examples']}/{v['dev']['examples']}/{v['test']['examples']}"
                      for t, v in results["data"]["tasks"].items()) + ".",
          f"- Pre-training, equal in tokens per domain: every module and every ncl stage sees {pre['steps']} steps × "
          f"{pre['batch_size']} × {pre['seq_len']} tokens = {tokens:,} tokens of its domain; **joint-lora gets the sum**, "
          f"{pre['steps'] * len(s['domains'])} steps = {tokens * len(s['domains']):,} tokens over the union in one run. "
          f"LoRA r={pre['rank']}, alpha={pre['alpha']}, all linear layers, lr {pre['lr']}, "
          f"{pre.get('dtype', 'fp32')}; ncl trains all weights "
          f"at lr {pre['full_lr']} (a LoRA lr would wreck a full model; not tuned). "
          + (f"Pre-training seed {pre['seed']}, but " + ", ".join(f"fine-tuning seed {k} on modules of pre-training seed {v}"
                                                             for k, v in alt.items()) + "."
             if (alt := {k: v for k, v in (s.get("module_seeds") or {}).items() if int(k) in results["seeds"]})
             else f"Pre-training runs once (seed {pre['seed']}); the seeds vary fine-tuning."),
          f"- Fine-tuning, equal in epochs: {ft['epochs']:g} epoch(s) of batch {ft['batch_size']}, max length "
          f"{ft['max_seq_len']} tokens, linear schedule with 10% warm-up, {ft.get('dtype', 'fp32')}, for every method"
          + (f"; dev scored every {ft['eval_every']} steps, the best dev step kept, stopped after {ft.get('patience')} "
             "evaluations without improvement" if ft.get("keep_best") else "") + ". "
          + (f"Learning rates: every method's standard ones ({ft['lr']} for LoRA/DoRA/DoMIX, bridge lr "
             f"{s['domix_defaults']['bridge_lr']}, {ft['full_lr']} for full fine-tuning) times the factor it chose on "
             f"dev among {', '.join(f'{f:g}' for f in s['lr_grid'])} (see Learning rates)."
             if s.get("lr_grid") else
             f"Learning rates are each family's standard value, not tuned: {ft['lr']} for LoRA/DoRA/DoMIX (bridge lr "
             f"{s['domix_defaults']['bridge_lr']}), {ft['full_lr']} for full fine-tuning (base-full, ncl)."),
          f"- base-lora/base-dora use rank {ft['base_lora_rank']}" + (
              f", the modules' rank, so own-lora vs base-lora (the DAP curve, C1) differ only in the starting point"
              if ft["base_lora_rank"] == pre["rank"] else f"; the modules have rank {pre['rank']}")
          + "; own-lora and joint-lora keep their module's rank"
          + (f"; base-lora-params and base-dora-params rank {s['capacity']['params']} and base-lora-rank rank "
             f"{s['capacity']['rank']}, DoMIX's capacity (see Capacity)" if s.get("capacity") else "")
          + ". Trainable parameters per method: see Efficiency.",
          f"- domix = FinetuneConfig defaults (bridge_init `{s['domix_defaults']['bridge_init']}`); the ablations set "
          "P = I/(N·r) (domix-rank), I/N (domix-uniform), I (domix-identity, trainable), the default init frozen "
          "(domix-frozen-bridge); cat-merge is P = I frozen. A variant whose settings equal domix's shares its runs.",
          *([f"- ncl orders: {'; '.join(orders)}; the ncl row of the task tables pools both orders."]
            if "ncl" in results["methods"] else []),
          *([_auto_note(results)] if "domix-auto-2" in results["methods"] else []),
          *([f"- Merge baselines ({', '.join(m for m in MERGES if m in results['methods'])}): the "
             f"{len(s['domains'])} modules of the first order's library ({orders[0]}) merged into one LoRA by PEFT's "
             f"`add_weighted_adapter` (`domix library merge`: linear, ties, dare_ties; weights 1/N each, density "
             f"{DEFAULT_DENSITY} for ties and dare_ties), "
             "then every task fine-tuned from the merged module as own-lora is from its domain's module (the same "
             "settings; the merged module keeps rank r, with PEFT's alpha = r)."]
            if any(m in MERGES for m in results["methods"]) else []),
          *([f"- MoDE (docs/design.md; {_mode_layout(results)}): each domain's expert sees the modules' "
             f"{tokens:,} tokens of its domain (expert lr {s['mode']['lr']:g}, gate lr "
             f"{s['mode'].get('gate_lr', 1e-3):g}"
             f"{', from the grid above' if s.get('mode_lr_choice') else ', set in the settings of the run'}); "
             "the composition adds "
             f"{s['mode']['compose_steps']} steps × {pre['batch_size']} × {pre['seq_len']} = "
             f"{s['mode']['compose_steps'] * pre['batch_size'] * pre['seq_len']:,} tokens of the four corpora in "
             "equal parts (DoMIX has no such stage: MoDE's pre-training budget is that much larger) at gate lr "
             f"{compose_gate_lr(s['mode']):g}, with `mode compose`'s routing loss, the gates reading "
             f"{'each token and the mean of the text so far' if s['mode'].get('gate_context') == 'mean' else 'each token'}"
             + (" (routed: a router picks the expert, each expert keeps its own gate)"
                if s['mode'].get('gate_form') == 'routed' else "") + ". "
             "mode trains experts and gates in composition and fine-tuning; mode-frozen-experts trains the gates "
             f"(and the head) only in both. MoDE fine-tunes at lr {ft.get('mode_lr')} (experts are full "
             "transformer layers; gates at the bridge lr), not tuned."]
            if any(m.startswith("mode") for m in results["methods"]) and "mode" in s else []),
          f"- Preset `{results['preset']}` is small by necessity (2 CPU cores): treat differences within one std, or "
          "of a few points on a few hundred test examples, as noise.", ""]
    if plots:
        L += ["## Plots", "", *[f"![{Path(p).stem}]({p})" for p in plots], ""]
    atomic_write(out / "REPORT.md", "\n".join(L))
    return table


if __name__ == "__main__":  # python -m domix.bench.quality.report DIR: rebuild REPORT.md and plots from DIR/results.json
    import json
    import sys

    d = Path(sys.argv[1])
    print(write_report(json.loads((d / "results.json").read_text()), d))
