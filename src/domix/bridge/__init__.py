"""Stages 2–3 of DoMIX: mix library modules through a trainable bridge, fine-tune, export."""
from .apply import apply_bridge, bridged_layers, merge_bridge
from .layer import bridge_init, bridge_update
from .parts import bridge_parts
from .tuner import DomixConfig, DomixLinear, DomixModel, export_lora, param_groups, write_lora

__all__ = ["DomixConfig", "DomixLinear", "DomixModel", "apply_bridge", "bridge_init", "bridge_parts", "bridge_update",
           "bridged_layers", "export_lora", "merge_bridge", "param_groups", "write_lora"]
