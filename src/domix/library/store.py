"""The module library: a directory of domain modules, one complete sub-directory each.

A LoRA domain module is a standard PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`) plus `domix.json` (what it was trained on and how); a `full` entry
(`pretrain --full`) a whole Hugging Face checkpoint, a `mode-expert` MoDE's expert layers.
Entries whose name starts with '.' are staging/work areas and are never listed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

META = "domix.json"
KIND_FILES = {  # what a complete entry of each kind holds; its weights file comes second to last
    "lora": ("adapter_config.json", "adapter_model.safetensors", META),
    "full": ("config.json", "model.safetensors", META),  # `pretrain --full`: a whole HF checkpoint
    "mode-expert": ("expert.safetensors", META),
}


class LibraryError(ValueError):
    """A module is missing, incomplete, corrupt or does not fit the base model."""


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

    def check_base(self, base_fingerprint: str) -> None:
        if self.meta.get("base_fingerprint") != base_fingerprint:
            raise LibraryError(
                f"module '{self.name}' was trained on base '{self.meta.get('base')}' "
                f"(fingerprint {self.meta.get('base_fingerprint')}), not on this base "
                f"(fingerprint {base_fingerprint})")


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

    def get(self, name: str) -> Module:
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
        return mod

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
        return [self.get(n) for n in names]

    def check(self, model, fingerprint: str) -> list[str]:
        """Problems of every module against a loaded base model: fingerprint, files, shapes."""
        from ..lora import lora_pairs

        problems = []
        shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if hasattr(m, "weight")
                  and getattr(m, "weight") is not None and m.weight.dim() == 2}
        for name in self.names():
            try:
                mod = self.get(name)
                mod.check_base(fingerprint)
                if mod.kind != "lora":
                    continue
                for layer, (a, b) in lora_pairs(mod.tensors()).items():
                    if layer not in shapes:
                        raise LibraryError(f"module '{name}': layer {layer} does not exist in the base")
                    d_out, d_in = shapes[layer]
                    if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                        raise LibraryError(
                            f"module '{name}': {layer} has A {tuple(a.shape)} / B {tuple(b.shape)}, "
                            f"which do not fit the base layer ({d_out} x {d_in})")
            except LibraryError as e:
                problems.append(str(e))
        return problems
