"""Loading base models: device/dtype, fingerprints, LoRA targets (the default checkpoint: checkpoints.py)."""
from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager

import torch
from torch import nn

from .checkpoints import resolve_base


def resolve_device(device: str = "auto") -> str:
    """The one place `--device` is resolved: "auto" is the first CUDA device, else Apple's MPS, else
    the CPU; "cuda", "cuda:N" and "mps" are checked against what this process sees. Returns the name."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for, but no CUDA device is available")
        if index and not (index.isdigit() and int(index) < torch.cuda.device_count()):
            raise ValueError(f"--device {device}: this process sees {torch.cuda.device_count()} CUDA device(s)")
    elif kind == "mps" and not mps:
        raise ValueError("--device mps was asked for, but MPS is not available")
    elif kind not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown --device {device!r}: auto, cpu, cuda, cuda:N or mps")
    return device


def gpus_for(device: str) -> int:
    """GPUs a run on `device` needs reserved (by Ray, or by a local pool's placement): 1 for CUDA."""
    return 1 if resolve_device(device).startswith("cuda") else 0


def select_device(device: str = "auto") -> torch.device:
    return torch.device(resolve_device(device))


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


@contextmanager
def quiet_load():
    """transformers' "Loading weights" progress bar off while a checkpoint loads: a base loads in
    seconds, and a bar on the stderr of every command that loads one is noise."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


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
        cls, kw = AutoModelForSequenceClassification, {k: v for k, v in kw.items() if v is not None}
    else:
        cls = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    with quiet_load():
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
