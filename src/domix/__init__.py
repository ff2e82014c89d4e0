"""domix: modular domain-adaptive pre-training with LoRA domain modules mixed through a bridge."""
__version__ = "0.1.0"

from .library import Library, LibraryError  # noqa: E402
from .library.pretrain import PretrainConfig, pretrain  # noqa: E402

__all__ = ["Library", "LibraryError", "PretrainConfig", "pretrain", "__version__"]
