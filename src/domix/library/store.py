"""The module library: a directory of domain modules, one complete sub-directory each.

A LoRA domain module is a standard PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`) plus `domix.json` (what it was trained on and how); a `full` entry
(`pretrain --full`) a whole Hugging Face checkpoint, a `mode-expert` MoDE's expert layers.
Entries whose name starts with '.' are staging/work areas and are never listed.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError, safe_open

META = "domix.json"
KIND_FILES = {  # what a complete entry of each kind holds; its weights file comes second to last
    "lora": ("adapter_config.json", "adapter_model.safetensors", META),
    "full": ("config.json", "model.safetensors", META),  # `pretrain --full`: a whole HF checkpoint
    "mode-expert": ("expert.safetensors", META),
}


class LibraryError(ValueError):
    """A module is missing, incomplete, corrupt or does not fit the base model."""


@dataclass(frozen=True)
class EntryKind:
    """What the library asks of a kind of entry: a one-line description of an entry (`library list`),
    and whether it fits a loaded base (`fits(module, model, shapes)`, raising LibraryError;
    `shapes`: the base's 2-D weights by module name). The default only reads the weights to the end."""

    describe: Callable[["Module"], str]
    fits: Callable[["Module", Any, dict], None] = lambda mod, model, shapes: readable(mod)


KINDS: dict[str, EntryKind] = {}
# Kinds defined above the library register themselves when their package is imported; the library
# imports that package by name when it first meets an entry of the kind (no import arrow upwards).
PROVIDERS = {"mode-expert": "domix.mode"}


def readable(mod: "Module") -> None:
    """The entry's weights read to the end (a truncated or corrupt file is an error naming it)."""
    mod.tensors()


def register_kind(name: str, kind: EntryKind) -> None:
    KINDS[name] = kind


def entry_kind(name: str) -> EntryKind:
    if name not in KINDS and name in PROVIDERS:
        importlib.import_module(PROVIDERS[name])
    if name not in KINDS:
        raise LibraryError(f"unknown kind of library entry {name!r} (known: {sorted({*KINDS, *PROVIDERS})})")
    return KINDS[name]


def entry_name(name: str, what: str = "module") -> str:
    """`name` if it can name a library entry (a folder of the library: not empty, not starting
    with '.', which marks staging and work areas, and no path separator), else a ValueError."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ValueError(f"invalid {what} name {name!r}: an entry's name is a folder name in the library, "
                         "not empty, not starting with '.', without '/' or '\\'")
    return name


@dataclass
class Module:
    name: str
    path: Path
    meta: dict

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "lora")

    @property
    def weights_file(self) -> Path:
        return self.path / KIND_FILES[self.kind][-2]

    def tensors(self) -> dict:
        """The module's tensors, read with safetensors (a truncated file is a clear error)."""
        import torch  # noqa: F401  (safetensors' torch framework)

        try:
            with safe_open(self.weights_file, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise LibraryError(f"module '{self.name}': {self.weights_file.name} is unreadable or "
                               f"truncated ({e})") from None

    def require(self, *kinds: str) -> "Module":
        """This module, if it is of one of `kinds`; else an error naming the kinds the caller takes."""
        if self.kind not in kinds:
            raise LibraryError(f"module '{self.name}' is a {self.kind} entry; this takes "
                               f"{' or '.join(kinds)} entries")
        return self

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, read from the weights file's header (no tensor is loaded)."""
        try:
            with safe_open(self.weights_file, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise LibraryError(f"module '{self.name}': {self.weights_file.name} is unreadable or "
                               f"truncated ({e})") from None

    def summary(self) -> dict:
        """Kind, size on disk, parameter count and layout: what `library list/show` print."""
        import math

        params = sum(math.prod(s) for s in self.shapes().values())
        return {"kind": self.kind, "size_bytes": self.weights_file.stat().st_size, "params": params,
                "layout": entry_kind(self.kind).describe(self)}

    def check_base(self, base_fingerprint: str) -> None:
        if self.meta.get("base_fingerprint") != base_fingerprint:
            raise LibraryError(
                f"module '{self.name}' was trained on base '{self.meta.get('base')}' "
                f"(fingerprint {self.meta.get('base_fingerprint')}), not on this base "
                f"(fingerprint {base_fingerprint})")


def one_base(mods: list[Module]) -> None:
    """Refuse modules trained on different bases, naming each group's modules, base and fingerprint."""
    bases: dict[str, list[Module]] = {}
    for m in mods:
        bases.setdefault(m.meta.get("base_fingerprint"), []).append(m)
    if len(bases) > 1:
        raise LibraryError("the modules were trained on different bases: " + "; ".join(
            f"{', '.join(m.name for m in group)} (fingerprint {fp}, base '{group[0].meta.get('base')}')"
            for fp, group in bases.items()))


class Library:
    """A directory of modules. `Library(path).list()`, `.get(name)`, `.check(model)`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __contains__(self, name: str) -> bool:
        return (self.path / name / META).is_file()

    def names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / META).is_file())

    def get(self, name: str, kinds: tuple[str, ...] | None = None) -> Module:
        """The complete entry `name`; with `kinds`, refused unless it is of one of them."""
        path = self.path / name
        if not (path / META).is_file():
            known = ", ".join(self.names()) or "none"
            raise LibraryError(f"no module '{name}' in library {self.path} (modules: {known})")
        try:
            meta = json.loads((path / META).read_text())
        except json.JSONDecodeError as e:
            raise LibraryError(f"module '{name}': {META} is corrupt ({e})") from None
        mod = Module(name, path, meta)
        missing = [f for f in KIND_FILES.get(mod.kind, ()) if not (path / f).is_file()]
        if mod.kind not in KIND_FILES or missing:
            raise LibraryError(f"module '{name}' is incomplete: missing {missing or mod.kind}")
        return mod.require(*kinds) if kinds else mod

    def list(self, kind: str | None = None) -> list[Module]:
        mods = [self.get(n) for n in self.names()]
        return [m for m in mods if kind is None or m.kind == kind]

    def select(self, names: str | list[str] = "all", kind: str = "lora") -> list[Module]:
        """Modules by comma list / list, or all of one kind; in the order given."""
        if names == "all":
            mods = self.list(kind)
            if not mods:
                raise LibraryError(f"library {self.path} has no modules of kind '{kind}'")
            return mods
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if len(set(names)) != len(names):
            raise LibraryError(f"a module is listed twice: {names}")
        return [self.get(n, kinds=(kind,)) for n in names]

    def check(self, model, fingerprint: str) -> list[str]:
        """Problems of every module against a loaded base model: fingerprint, files, and each
        kind's fit — a LoRA's A/B shapes, a MoDE expert's block layout."""
        problems = []
        shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if hasattr(m, "weight")
                  and getattr(m, "weight") is not None and m.weight.dim() == 2}
        for name in self.names():
            try:
                mod = self.get(name)
                mod.check_base(fingerprint)
                entry_kind(mod.kind).fits(mod, model, shapes)
            except LibraryError as e:
                problems.append(str(e))
        return problems


def _describe_lora(mod: Module) -> str:
    cfg = json.loads((mod.path / "adapter_config.json").read_text())
    targets = cfg.get("target_modules")
    return f"LoRA r={cfg.get('r')} on {', '.join(sorted(targets)) if isinstance(targets, list) else targets}"


def _lora_fits(mod: Module, model, shapes: dict) -> None:
    from ..lora import lora_pairs

    for layer, (a, b) in lora_pairs(mod.tensors()).items():
        if layer not in shapes:
            raise LibraryError(f"module '{mod.name}': layer {layer} does not exist in the base")
        d_out, d_in = shapes[layer]
        if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
            raise LibraryError(f"module '{mod.name}': {layer} has A {tuple(a.shape)} / B {tuple(b.shape)}, "
                               f"which do not fit the base layer ({d_out} x {d_in})")


register_kind("lora", EntryKind(describe=_describe_lora, fits=_lora_fits))
register_kind("full", EntryKind(describe=lambda mod: "all weights (a whole checkpoint)"))
