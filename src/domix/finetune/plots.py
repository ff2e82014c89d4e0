"""Figures of a task model: its loss curves and DoMIX's bridge, block by block."""
from __future__ import annotations

import math
from pathlib import Path

import torch


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    tr = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bridge(model, layout: dict, names: list[str], path: Path) -> dict:
    """Per layer type, the mean Frobenius norm of each domain-by-domain block of P."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..bridge.apply import bridged_layers

    grids: dict[str, list] = {}
    for layer, m in bridged_layers(model).items():
        mods, ranks = layout[layer]["modules"], layout[layer]["ranks"]
        P = m.bridge()[1].detach().float().cpu()
        edges = [0] + list(torch.tensor(ranks).cumsum(0).tolist())
        g = torch.full((len(names), len(names)), float("nan"))
        for i, a in enumerate(mods):
            for j, b in enumerate(mods):
                g[names.index(a), names.index(b)] = P[edges[i]:edges[i + 1], edges[j]:edges[j + 1]].norm()
        grids.setdefault(layer.rsplit(".", 1)[-1], []).append(g)
    means = {k: torch.stack(v).nanmean(0) for k, v in sorted(grids.items())}
    cols = min(4, len(means)) or 1
    rows = math.ceil(len(means) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (kind, g) in zip(axes.flat, means.items()):
        im = ax.imshow(g.numpy(), cmap="viridis")
        ax.set_title(kind, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(means):]:
        ax.axis("off")
    fig.suptitle("bridge ||P block|| per layer type (rows: output domain, cols: input domain)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {k: v.tolist() for k, v in means.items()}
