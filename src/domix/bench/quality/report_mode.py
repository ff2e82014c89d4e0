"""The MoDE sections of a quality report: held-out LM loss tables, the hand-over comparison with each
domain's own expert (also by token position), and the expert/gate rate grid."""
from __future__ import annotations

from .report_tables import _num, _params


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
