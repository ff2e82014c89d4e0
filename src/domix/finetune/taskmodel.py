"""Task-model files: the base with its task head, writing a task model and loading it back.

A task model directory holds `task.json` (format, base, fingerprint, method, modules, labels,
the head's parameter names, the method's layout, the settings), `model.safetensors` (every
tensor that differs from the base: the method's tensors and the task head; all weights for
full fine-tuning), the tokenizer, `metrics.json` and plots. Format 1 (before the head's names
were recorded) still loads.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .._version import __version__
from ..checkpoints import resolve_base
from ..io import atomic_dir, write_json
from ..library import LibraryError
from ..models import DTYPES, backbone, fingerprint, load_model, load_tokenizer, quiet_load, select_device
from ..training import keep_logs
from .config import FinetuneConfig
from .methods import get_method

TASK_FILE = "task.json"
WEIGHTS = "model.safetensors"
FORMAT = 3  # 2: task.json records the head's parameter names ("head"); 3: a bridge's tensors as the PEFT tuner
# names them (`<layer>.domix_A.default`; format 2's `<layer>.lora_A` still loads)


@dataclass
class TaskBase:
    """The frozen base model with the task's head: `head` names its parameters (trained by every
    method): a classification head, plus any part of the backbone the checkpoint did not hold."""

    model: torch.nn.Module
    head: list[str] = field(default_factory=list)


def load_task_base(base: str, task: str, labels: list[str] | None, dtype: str = "fp32",
                   warn: bool = False) -> TaskBase:
    """`base` with a fresh sequence-classification head over `labels` (classify) or its LM head
    (generate), its weights in `dtype` whatever the checkpoint stores; every parameter frozen.
    `warn`: say which backbone weights the checkpoint lacks (they train with the head)."""
    if task == "classify":
        from transformers import AutoModelForSequenceClassification

        id2label = dict(enumerate(labels))
        with _new_head_expected(), quiet_load():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                resolve_base(base), num_labels=len(labels), id2label=id2label, dtype=DTYPES[dtype],
                label2id={v: k for k, v in id2label.items()}, output_loading_info=True)
        body = {f"{model.base_model_prefix}.{n}" for n, _ in backbone(model).named_parameters()}
        missing = set(info["missing_keys"])
        head = [n for n, _ in model.named_parameters() if n not in body or n in missing]
        lacking = sorted(missing & body)
        if lacking and warn:  # not expected: say so plainly, once, when training starts
            warnings.warn(f"{base}: the checkpoint lacks {len(lacking)} backbone weight(s), freshly initialised "
                          f"and trained with the task head: {', '.join(lacking[:5])}", stacklevel=2)
    else:
        model, _ = load_model(base, head="lm", objective="clm", dtype=dtype)
        head = []
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(base).pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    return TaskBase(model, head)


@contextmanager
def _new_head_expected():
    """transformers reports a freshly initialised classification head as a MISSING "LOAD REPORT"
    block, which a user takes for an error; a new task head is expected here, so that report is
    left out (`load_task_base` warns itself about anything else the checkpoint lacks)."""
    import logging

    class NoLoadReport(logging.Filter):
        def filter(self, record):
            return "LOAD REPORT" not in record.getMessage()

    log, keep = logging.getLogger("transformers.modeling_utils"), NoLoadReport()
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def build_model(cfg: FinetuneConfig, labels: list[str] | None):
    """The task base with the method's trainable structure. Returns (model, info): info holds
    the base fingerprint, the head's parameter names and what the method records."""
    method = get_method(cfg.method)
    # the frozen base follows --dtype (full fine-tuning trains it: fp32); what trains stays fp32
    task = load_task_base(cfg.base, cfg.task, labels, "fp32" if method.name == "full" else cfg.dtype, warn=True)
    base_fp = fingerprint(task.model)
    info = {"base_fingerprint": base_fp, "head": task.head, "modules": []}
    info.update(method.build(task.model, cfg, task.head, base_fp))
    trained_in_fp32(task.model)
    return task.model, info


def trained_in_fp32(model) -> None:
    """Every trainable tensor (head, LoRA, MoDE experts and gates) in fp32, whatever the base's
    precision: optimizer updates of half-precision weights lose the small steps (PEFT keeps
    adapters in fp32 the same way, autocast_adapter_dtype). The bridge's A, P and B are fp32
    already (`DomixLinear`)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def save_task_model(out: Path, model, tokenizer, spec: dict, metrics: dict, tensors: dict, work: Path,
                    plots=()) -> None:
    """Write a task model atomically: weights, tokenizer, task.json, metrics.json, the run's
    TensorBoard logs and `plots` (callables `plot(stage_dir)`)."""
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite=True) as stage:
        save_file(tensors, str(stage / WEIGHTS))
        tokenizer.save_pretrained(stage)
        write_json(stage / TASK_FILE, {"format": FORMAT, **spec})
        for plot in plots:
            plot(stage)
        keep_logs(work, stage)
        write_json(stage / "metrics.json", metrics)


def read_spec(path: Path | str) -> dict:
    """A task model's task.json; refuses a format newer than this domix reads."""
    path = Path(path)
    if not (path / TASK_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a domix task model (no {TASK_FILE})")
    spec = json.loads((path / TASK_FILE).read_text())
    fmt = spec.get("format", 1)
    if fmt > FORMAT:
        raise LibraryError(f"task model {path} has format {fmt}, written by a newer domix; this domix "
                           f"({__version__}) reads formats up to {FORMAT}")
    return spec


def load_task_model(path: str | Path, device: str = "auto"):
    """(model, tokenizer, spec) of a saved task model; refuses a base with another fingerprint.
    `spec["head"]` names the task head's parameters."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    spec = read_spec(path)
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(spec["settings"]) - known)
    if unknown:
        raise LibraryError(f"task model {path} records settings this domix ({__version__}) does not know: "
                           f"{', '.join(unknown)} (written by a newer domix?)")
    cfg = FinetuneConfig(**{**spec["settings"], "base": spec["base"]})
    task = load_task_base(spec["base"], spec["task"], spec["labels"])
    base_fp = fingerprint(task.model)
    if base_fp != spec["base_fingerprint"]:
        raise LibraryError(f"task model {path} was trained on base fingerprint {spec['base_fingerprint']}, "
                           f"but '{spec['base']}' now has {base_fp}")
    spec.setdefault("head", task.head)  # format 1 did not record it
    model = get_method(spec["method"]).restore(task.model, cfg, spec)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise LibraryError(f"task model {path}: {WEIGHTS} is unreadable or truncated ({e})") from None
    tensors = get_method(spec["method"]).upgrade(tensors, spec)
    own = model.state_dict()
    unknown = sorted(k for k in tensors if k not in own)
    if unknown:
        raise LibraryError(f"task model {path}: {WEIGHTS} holds {len(unknown)} tensor(s) the model does not "
                           f"have: {', '.join(unknown[:5])}")
    # strict about everything the task model needs (head, bridges, adapters, experts): the base
    # supplies the rest, so a missing tensor would silently be the base's or a fresh random one
    missing = sorted(get_method(spec["method"]).saved(model) - set(tensors))
    if missing:
        raise LibraryError(f"task model {path}: {WEIGHTS} lacks {len(missing)} tensor(s) the model needs: "
                           f"{', '.join(missing[:5])}")
    model.load_state_dict(tensors, strict=False)
    model.to(select_device(device)).eval()
    tokenizer = load_tokenizer(str(path)) if (path / "tokenizer_config.json").exists() else load_tokenizer(spec["base"])
    return model, tokenizer, spec
