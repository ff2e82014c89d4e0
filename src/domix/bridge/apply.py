"""Stage 2: put a bridge over the chosen library modules in every layer they adapt."""
from __future__ import annotations

from torch import nn

from ..library import Module
from .parts import bridge_parts
from .tuner import DomixLinear, inject


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def bridged_layers(model: nn.Module) -> dict:
    """{layer name: its DoMIX layer (`tuner.DomixLinear`)} of a model with bridges."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DomixLinear)}


def apply_bridge(model: nn.Module, modules: list[Module], init: str, base_fingerprint: str) -> dict:
    """Put a bridge over `modules` (in the given order) into every layer of `model` they adapt, in place
    (the PEFT tuner's layers, `tuner.inject`); see `bridge_parts`. Returns the per-layer layout
    {layer: {"modules": [...], "ranks": [...], "scaling": s}}."""
    parts, layout = bridge_parts(model, modules, init, base_fingerprint)
    inject(model, layout, parts)
    return layout


def restore_bridge(model: nn.Module, layout: dict, tensors: dict) -> None:
    """Rebuild saved bridges (A, P, B from `tensors`, keyed `<layer>.domix_<X>.default`, or `<layer>.lora_<X>`
    as task models of format 2 hold them) in a freshly loaded base."""
    def get(layer, x):
        return tensors[f"{layer}.domix_{x}.default"] if f"{layer}.domix_{x}.default" in tensors \
            else tensors[f"{layer}.lora_{x}"]

    inject(model, layout, {layer: (get(layer, "A"), get(layer, "P"), get(layer, "B"), info["scaling"])
                           for layer, info in layout.items()})


def merge_bridge(model: nn.Module) -> nn.Module:
    """Fold every bridge into its base weight and put the plain layer back: inference then costs
    exactly the base model."""
    for name, layer in bridged_layers(model).items():
        layer.merge()
        set_submodule(model, name, layer.get_base_layer())
    return model
