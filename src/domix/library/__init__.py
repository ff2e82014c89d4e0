"""Stage 1 and its store: domain modules (`pretrain`, `pretrain-all`) and the module library."""
from .store import KIND_FILES, META, Library, LibraryError, Module

__all__ = ["KIND_FILES", "META", "Library", "LibraryError", "Module"]
