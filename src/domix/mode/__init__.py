"""MoDE (Modular Domain Experts, arXiv 2410.10181): per-domain expert layers beside a frozen
backbone, mixed per block by a token-level gate — a baseline next to DoMIX."""
from . import entry  # noqa: F401  (registers the `mode-expert` kind of library entry)
from .hooks import find_layers
from .layer import Layout, Mode, ModeBlock, default_layout, layout_for
from .model import (apply_mode, load_mode, load_mode_model, mode_of, read_meta, remove_mode, save_mode,
                    set_trainable)

__all__ = ["Layout", "Mode", "ModeBlock", "apply_mode", "default_layout", "find_layers", "layout_for",
           "load_mode", "load_mode_model", "mode_of", "read_meta", "remove_mode", "save_mode", "set_trainable"]
