"""domix: modular domain-adaptive pre-training with LoRA domain modules mixed through a bridge."""
__version__ = "0.1.0"

from .bridge.tuner import DomixConfig, export_lora, param_groups  # noqa: E402  (registers DoMIX with PEFT)
from .library import Library, LibraryError  # noqa: E402
from .library.pretrain import PretrainConfig, pretrain  # noqa: E402

__all__ = ["DomixConfig", "Library", "LibraryError", "PretrainConfig", "export_lora", "param_groups", "pretrain",
           "__version__"]
