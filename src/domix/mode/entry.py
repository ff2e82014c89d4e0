"""MoDE experts as library entries (kind `mode-expert`): how the library describes one and checks
that it fits a base, registered with the library's kinds when `domix.mode` is imported."""
from __future__ import annotations

from ..library.store import EntryKind, LibraryError, readable, register_kind
from .layer import Layout, layout_for


def _describe(mod) -> str:
    return f"MoDE expert, {Layout.from_dict(mod.meta['layout']).describe()}"


def _fits(mod, model, shapes: dict) -> None:
    saved = Layout.from_dict(mod.meta["layout"])
    here = layout_for(model, saved.blocks, saved.expert_layers)
    if saved != here:
        raise LibraryError(f"module '{mod.name}': block layout {saved.describe()} does not fit the base "
                           f"({here.describe()})")
    readable(mod)


register_kind("mode-expert", EntryKind(describe=_describe, fits=_fits))
