"""The plots of a quality report (`plots/*.png`), drawn from results.json alone."""
from __future__ import annotations

from pathlib import Path

from ...data.benchmark import GENERAL
from ...io import save_figure
from .report_mode import MODE_LM, lm_columns


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
