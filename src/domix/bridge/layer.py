"""The bridged linear layer: h = W0 x + s · B_cat P A_cat x.

Written by hand because PEFT has no layer with a trainable square matrix between a frozen
A and a trainable B. A_cat is a buffer (never a parameter, never updated); P and B_cat
are parameters; the d_out × d_in update is never formed during training.
"""
from __future__ import annotations

import torch
from torch import nn

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
    d_out × d_in update is never formed. The one forward of the bridge (BridgeLinear, the PEFT tuner)."""
    z = (x.to(A.dtype) @ A.T) @ P.T
    return scaling * (z @ B.T)


class BridgeLinear(nn.Module):
    """A frozen base linear layer plus the bridged update of N LoRA modules."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, P: torch.Tensor, B: torch.Tensor, scaling: float,
                 ranks: list[int]):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        # A, P and B in fp32 whatever the base's precision (a bf16 base keeps them fp32; autocast,
        # where a run asks for it, computes the products in half precision)
        dev, dt = base.weight.device, torch.float32
        self.register_buffer("lora_A", A.to(dev, dt).contiguous())  # frozen: not a parameter
        self.lora_P = nn.Parameter(P.to(dev, dt).contiguous())
        self.lora_B = nn.Parameter(B.to(dev, dt).contiguous())
        self.scaling = float(scaling)
        self.ranks = list(ranks)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that inspects .weight (e.g. dtype checks) sees the base weight
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + bridge_update(x, self.lora_A, self.lora_P, self.lora_B, self.scaling).to(x.dtype)

    def delta(self) -> torch.Tensor:
        """The d_out × d_in update s · B P A (for export and merging only)."""
        return self.scaling * (self.lora_B @ self.lora_P @ self.lora_A)

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta().to(self.base.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}, scaling={self.scaling:g}"
