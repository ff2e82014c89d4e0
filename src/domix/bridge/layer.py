"""The bridge's math: h = W0 x + s · B_cat P A_cat x, and P's initial values.

PEFT has no layer with a trainable square matrix between a frozen A and a trainable B: the layer is
domix's PEFT tuner (`tuner.DomixLinear`), whose A_cat is a buffer (never a parameter, never updated)
and P and B_cat parameters; the d_out × d_in update is never formed during training.
"""
from __future__ import annotations

import torch

def bridge_init(init: str, ranks: list[int], names: list[str], n_modules: int | None = None,
                total_rank: int | None = None) -> torch.Tensor:
    """The initial P of a layer adapted by modules of `ranks` (in order): uniform I/N, rank
    I/(N·r), identity I, or own:DOMAIN (I on that domain's block, zeros elsewhere). N counts every
    chosen module (`n_modules`) and N·r sums their ranks (`total_rank`), also at a layer only some of
    them adapt, so uniform starts at the average of all the modules' updates (defaults: this
    layer's modules)."""
    total, n = sum(ranks), len(ranks)
    if init == "uniform":
        return torch.eye(total) / (n_modules or n)
    if init == "rank":
        return torch.eye(total) / (total_rank or total)
    if init == "identity":
        return torch.eye(total)
    if init.startswith("own:"):
        dom = init[4:]
        if dom not in names:
            raise ValueError(f"--bridge-init {init}: '{dom}' is not among the chosen modules {names}")
        i = names.index(dom)
        p = torch.zeros(total, total)
        lo = sum(ranks[:i])
        p[lo:lo + ranks[i], lo:lo + ranks[i]] = torch.eye(ranks[i])
        return p
    raise ValueError(f"unknown --bridge-init {init!r} (uniform, rank, identity, own:DOMAIN)")


def bridge_update(x: torch.Tensor, A: torch.Tensor, P: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · B P A x as three thin products, (x A^T) P^T B^T, each at most N·r wide, in A's dtype: the
    d_out × d_in update is never formed. The bridge's one forward (`tuner.DomixLinear`)."""
    z = (x.to(A.dtype) @ A.T) @ P.T
    return scaling * (z @ B.T)
