"""domix: modular domain-adaptive pre-training with LoRA domain modules mixed through a bridge."""
from ._after_import import after_import  # noqa: E402
from ._version import __version__  # noqa: E402
from .library import Library, LibraryError  # noqa: E402
from .library.pretrain import PretrainConfig, pretrain  # noqa: E402

__all__ = ["DomixConfig", "Library", "LibraryError", "PretrainConfig", "export_lora", "param_groups", "pretrain",
           "__version__"]
_TUNER = ("DomixConfig", "export_lora", "param_groups")


def _register() -> None:
    from .bridge import tuner  # noqa: F401  (registers the DOMIX method with PEFT)


# DoMIX is a PEFT method (`DomixConfig`): registered as soon as PEFT is imported, before or after domix, so
# that `PeftModel.from_pretrained` reads a saved DoMIX adapter; `import domix` itself does not load PEFT
after_import("peft", _register)


def __getattr__(name: str):
    if name in _TUNER:
        from .bridge import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module 'domix' has no attribute {name!r}")
