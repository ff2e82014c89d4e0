"""A base model with one library entry loaded on it (the library's read side for whole models)."""
from __future__ import annotations


def load_with_module(base: str, library: str, module: str, objective: str = "auto", dtype: str = "fp32",
                     trust_remote_code: bool = False):
    """The base LM with one library module: a LoRA module attached, or a `full` entry's own weights
    (refused if trained on another base). MoDE experts load with `mode.load_mode_model`."""
    from peft import PeftModel

    from ..models import fingerprint, load_model
    from .store import Library

    model, objective = load_model(base, head="lm", objective=objective, dtype=dtype,
                                  trust_remote_code=trust_remote_code)
    mod = Library(library).get(module, kinds=("lora", "full"))
    mod.check_base(fingerprint(model))
    mod.tensors()  # a truncated or corrupt file fails here with the module's name
    if mod.kind == "full":
        return load_model(str(mod.path), head="lm", objective=objective, dtype=dtype,
                          trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, str(mod.path)), objective
