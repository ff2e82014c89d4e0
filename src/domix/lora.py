"""Reading PEFT LoRA tensors: map adapter keys to the base model's layer names."""
from __future__ import annotations

import re

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<layer>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def lora_pairs(tensors: dict) -> dict[str, tuple]:
    """{layer name in the base model: (A [r x d_in], B [d_out x r])} from a PEFT adapter state dict."""
    pairs: dict[str, dict] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            pairs.setdefault(m["layer"], {})[m["ab"]] = t
    return {layer: (ab["A"], ab["B"]) for layer, ab in sorted(pairs.items()) if len(ab) == 2}
