"""The bridge's tensors over library modules: per layer the concatenated A's and B's and the initial P."""
from __future__ import annotations

import json
import math

import torch
from torch import nn

from ..library import LibraryError, Module
from ..lora import lora_pairs
from .layer import bridge_init


def module_scaling(mod: Module) -> float:
    """The module's LoRA scaling as PEFT computes it (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    cfg = json.loads((mod.path / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def bridge_parts(model: nn.Module, modules: list[Module], init: str, base_fingerprint: str) -> tuple[dict, dict]:
    """The bridge over `modules` (in the given order) in every layer of `model` they adapt:
    ({layer: (A_cat, P, B_cat, scaling)}, layout). Per layer A_cat = [A_1; …; A_N], B_cat = [B_1 … B_N],
    P from `init`. Modules of different ranks or scalings mix: each B_k is rescaled by s_k / s so one
    scaling s serves the layer. Raises LibraryError for a module of another base or another shape."""
    if not modules:
        raise LibraryError("no modules chosen")
    per_layer: dict[str, list] = {}
    rank_of = {}
    for mod in modules:
        mod.require("lora").check_base(base_fingerprint)
        s = module_scaling(mod)
        for layer, (a, b) in lora_pairs(mod.tensors()).items():
            per_layer.setdefault(layer, []).append((mod.name, a.float(), b.float(), s))
            rank_of[mod.name] = max(rank_of.get(mod.name, 0), a.shape[0])
    names = [m.name for m in modules]
    layout, parts_out = {}, {}
    for layer, parts in per_layer.items():
        try:
            base = model.get_submodule(layer)
        except AttributeError:
            raise LibraryError(f"module '{parts[0][0]}': layer {layer} does not exist in this model") from None
        if not isinstance(base, nn.Linear):
            raise LibraryError(f"module '{parts[0][0]}': {layer} is not a linear layer of this model")
        ranks = [a.shape[0] for _, a, _, _ in parts]
        for name, a, b, _ in parts:
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise LibraryError(f"module '{name}': {layer} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                   f"the base layer is {base.out_features} x {base.in_features}")
        s = parts[0][3]
        A = torch.cat([a for _, a, _, _ in parts], 0)
        B = torch.cat([b * (sk / s) for _, _, b, sk in parts], 1)
        layer_names = [n for n, *_ in parts]
        if init.startswith("own:") and init[4:] not in layer_names:
            P = torch.zeros(sum(ranks), sum(ranks))  # own:DOMAIN where that module adapts nothing: start from 0
        else:
            P = bridge_init(init, ranks, layer_names, n_modules=len(modules), total_rank=sum(rank_of.values()))
        parts_out[layer] = (A, P, B, s)
        layout[layer] = {"modules": layer_names, "ranks": ranks, "scaling": s}
    if init.startswith("own:") and init[4:] not in names:
        raise ValueError(f"--bridge-init {init}: '{init[4:]}' is not among the chosen modules {names}")
    return parts_out, layout
