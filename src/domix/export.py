"""Export a DoMIX task model: merged weights, or one standard PEFT LoRA adapter.

The bridged update of a layer is s · (B_cat P) A_cat: an ordinary LoRA of rank N·r with
A' = A_cat, B' = B_cat P and the same scaling; `rank=K` truncates it per layer by SVD.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .bridge.apply import bridged_layers, merge_bridge
from .cli_config import FORMATS, ExportOptions
from .finetune import load_task_model
from .io import atomic_dir, write_json

def _lora_factors(layer, rank: int | None):
    """(A', B', scaling, relative error) of one bridged layer."""
    A, P, B, s = layer.bridge()
    A, P, B = A.float(), P.float(), B.float()
    if rank is None:
        return A, B @ P, s, 0.0
    delta = s * (B @ P @ A)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    B2, A2 = U[:, :k] * S[:k], Vh[:k]
    err = (torch.linalg.norm(delta - B2 @ A2) / torch.linalg.norm(delta).clamp_min(1e-12)).item()
    return A2, B2, 1.0, err


@contextmanager
def truncated(model, rank: int | None):
    """The task model with each bridged layer's update truncated to `rank` by SVD, as `export
    --rank` writes it (`None`: unchanged); the layers are put back on exit. Yields
    {layer: relative error of its truncated update}."""
    layers = bridged_layers(model)
    saved = {n: tuple(t.data if isinstance(t, torch.Tensor) else t for t in layer.bridge()) for n, layer in layers.items()}
    errors = {}
    try:
        if rank is not None:
            for name, layer in layers.items():
                A2, B2, s2, errors[name] = _lora_factors(layer, rank)
                layer.set_bridge(A2, torch.eye(A2.shape[0], device=A2.device), B2, s2)
        yield errors
    finally:
        for name, layer in layers.items():
            layer.set_bridge(*saved[name])


def export(model_dir: str | Path, out: str | Path, fmt: str = ExportOptions.format, rank: int | None = ExportOptions.rank,
           overwrite: bool = ExportOptions.overwrite) -> dict:
    """Write `out` (atomically) and return a report (format, rank, per-layer relative errors)."""
    model, tokenizer, spec = load_task_model(model_dir, device="cpu")
    if spec["method"] not in ("domix", "full", "mode"):
        raise ValueError(f"export supports domix, mode and full task models, not '{spec['method']}'")
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r} (merged or peft-lora)")
    if spec["method"] == "mode" and (fmt != "merged" or rank is not None):
        raise ValueError("a MoDE task model exports only as --format merged (experts are layers, not a LoRA)")
    report = {"format": fmt, "model": str(model_dir), "out": str(out), "base": spec["base"], "rank": rank}
    with atomic_dir(Path(out), overwrite=overwrite) as stage:
        if spec["method"] == "mode":
            # MoDE is a new architecture: no transformers class can load it. The export is the
            # base id + MoDE state (experts, gates, head): load with domix.mode.load_mode_model.
            from .mode import save_mode

            save_mode(model, stage / "mode", meta={"base": spec["base"], "labels": spec["labels"],
                                                   "task": spec["task"]})
            report["needs_domix"] = ("load with domix.mode.load_mode_model(DIR/'mode', head='classify', "
                                     "num_labels=..., id2label=...) — MoDE layers are not a transformers class")
        elif fmt == "merged":
            with truncated(model, rank):
                merge_bridge(model)
            model.config.name_or_path = spec["base_path"]
            model.save_pretrained(stage)
        else:
            report.update(_peft_export(model, spec, rank, stage))
        tokenizer.save_pretrained(stage)
        write_json(stage / "domix_export.json", {k: v for k, v in report.items() if k != "layer_errors"})
    return report


def _peft_export(model, spec: dict, rank: int | None, stage: Path) -> dict:
    from .bridge.tuner import write_lora

    layers = bridged_layers(model)
    if not layers:
        raise ValueError("this task model has no bridge to export as a LoRA adapter")
    factors = {name: _lora_factors(layer, rank) for name, layer in layers.items()}
    own = dict(model.named_parameters())
    report = write_lora(stage, {n: f[:3] for n, f in factors.items()}, {n: own[n] for n in spec["head"]},
                        task_type=None if spec["task"] == "classify" else "CAUSAL_LM",  # SEQ_CLS would add absent head names
                        base_model_name_or_path=spec["base_path"])
    errs = {n: f[3] for n, f in factors.items()}
    return {"lora_rank": report["lora_rank"], "lora_alpha": report["lora_alpha"],
            "max_relative_error": max(errs.values()), "mean_relative_error": sum(errs.values()) / len(errs),
            "layer_errors": errs}
