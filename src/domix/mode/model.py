"""Put MoDE experts into a loaded transformers model (any head), save and load the result.

`apply_mode(model, experts)` works in place on a causal-LM, masked-LM or sequence-classification
model of the base: the same call serves expert pre-training, composition and end-task
fine-tuning. A saved MoDE model is a directory with `mode.safetensors` (the experts, gates and
any other trainable tensors, e.g. a task head) and `domix.json` (base fingerprint, layout,
experts); a single expert is a library entry of kind `mode-expert`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_dir, write_json
from ..library import META, Library, LibraryError, Module
from ..models import fingerprint, is_masked_lm
from .hooks import find_layers
from .layer import Layout, Mode, ModeBlock, layout_for, make_expert

ATTR = "domix_mode"
MODE_FILE = "mode.safetensors"
EXPERT_FILE = "expert.safetensors"
EXTRA = "model."  # prefix of trainable tensors outside MoDE (a task head) in mode.safetensors

ExpertSpec = str | Module | tuple[str, Mapping[str, torch.Tensor]]


def mode_of(model: nn.Module) -> Mode:
    mode = getattr(model, ATTR, None)
    if mode is None:
        raise ValueError(f"{type(model).__name__} has no MoDE experts (see domix.mode.apply_mode)")
    return mode


def _check_expert(mod: Module, base_fp: str) -> Layout:
    mod.require("mode-expert").check_base(base_fp)
    return Layout.from_dict(mod.meta["layout"])


def apply_mode(model: nn.Module, experts: Sequence[ExpertSpec], *, blocks: int | None = None,
               expert_layers: int | None = None, init: str | None = "copy", keep_gates: bool = False,
               freeze_base: bool = True, base_fingerprint: str | None = None, gate_context: str = "token",
               gate_form: str = "softmax") -> Mode:
    """Give `model` one expert per item of `experts`, side by side in every block, with fresh
    (N+1)-way gates: the model then computes exactly what it computed before.

    An item is a name (a new expert, initialised by `init`: "copy" = the block's last k
    backbone layers, "random" = fresh layers, None = placeholders for saved tensors), a
    library `Module` of kind mode-expert (loaded; refused if trained on another base or under
    another block layout), or `(name, tensors)`.
    The layout (`blocks`, `expert_layers`; default `default_layout`) comes from the library
    experts when there are any. `keep_gates` also loads a single expert's own trained gate.
    `freeze_base` freezes every parameter the model had (backbone and head); MoDE's experts and
    gates are trainable (see `set_trainable`). `gate_context`: what the gates read, "token" or
    "mean" (`ModeBlock.gate_input`); `gate_form`: how they weigh the paths, "softmax" or "routed"
    (`ModeBlock.weights`). Returns the `Mode` module (`model.domix_mode`)."""
    if getattr(model, ATTR, None) is not None:
        raise ValueError("the model already has MoDE experts; call remove_mode(model) first")
    if not experts:
        raise ValueError("MoDE needs at least one expert")
    names = [e if isinstance(e, str) else e.name if isinstance(e, Module) else e[0] for e in experts]
    if len(set(names)) != len(names):
        raise ValueError(f"an expert is listed twice: {names}")
    layout = layout_for(model, blocks, expert_layers)
    lib = [e for e in experts if isinstance(e, Module)]
    if lib:
        base_fp = base_fingerprint or fingerprint(model)
        ref = None
        for mod in lib:
            lay = _check_expert(mod, base_fp)
            want = ref or Layout(layout.num_layers, blocks or lay.blocks, expert_layers or lay.expert_layers,
                                 layout.layer_class, layout.hidden_size)
            if lay != want:
                raise LibraryError(
                    f"expert '{mod.name}' has block layout {lay.describe()}, which does not fit "
                    f"{'the other experts' if ref else 'this model'} ({want.describe()})")
            ref = lay
        layout = ref
    if keep_gates and (len(experts) != 1 or gate_form != "softmax"):
        raise ValueError("keep_gates loads an expert's own gate: only for a single expert under softmax gates")

    if freeze_base:
        model.requires_grad_(False)
    layers = find_layers(model)
    n, k = len(experts), layout.expert_layers
    blocks_ = []
    for b, span in enumerate(layout.spans):
        exps = [make_expert(model, layers, span, k, init if isinstance(e, str) else None,
                            first_index=layout.num_layers + (b * n + j) * k) for j, e in enumerate(experts)]
        blocks_.append(ModeBlock(exps, layout.hidden_size, context=gate_context,
                                 causal=not is_masked_lm(model.config), form=gate_form))
    mode = Mode(layout, names, blocks_)
    for j, e in enumerate(experts):
        if isinstance(e, str):
            continue
        tensors = e.tensors() if isinstance(e, Module) else dict(e[1])
        try:
            mode.load_expert_state(j, tensors, gate=keep_gates)
        except (RuntimeError, ValueError, KeyError) as err:
            raise LibraryError(f"expert '{names[j]}' does not fit this layout: {err}") from None
    model.add_module(ATTR, mode)
    mode.attach(layers, model)
    return mode


def remove_mode(model: nn.Module) -> Mode:
    """Unhook and remove the experts; the model is the base model again."""
    mode = mode_of(model)
    mode.detach()
    delattr(model, ATTR)
    return mode


def set_trainable(model: nn.Module, experts: bool = True, gates: bool = True) -> None:
    """Which MoDE tensors train: experts (their layers and output maps), gates. The rest of the
    model is left as it is (e.g. a task head the caller trains)."""
    mode = mode_of(model)
    for p in mode.expert_parameters():
        p.requires_grad_(experts)
    for p in mode.gate_parameters():
        p.requires_grad_(gates)


def _layout_error(what: str, saved: Layout, here: Layout) -> LibraryError:
    return LibraryError(f"{what} has block layout {saved.describe()}, which does not fit this model "
                        f"({here.describe()})")


def save_mode(model: nn.Module, out: Path | str, meta: dict | None = None, overwrite: bool = False,
              base_fingerprint: str | None = None, logs: Path | None = None, plots=()) -> dict:
    """Write the model's MoDE state atomically to `out/` (mode.safetensors + domix.json, the
    TensorBoard logs of the training directory `logs`, if given, and `plots`: callables
    `plot(stage_dir)`).

    Trainable tensors outside MoDE (e.g. a classification head) are saved too, under `model.<name>`."""
    from safetensors.torch import save_file

    mode = mode_of(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in mode.state_dict().items()}
    extra = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(ATTR + ".")]
    params = dict(model.named_parameters())
    tensors.update({EXTRA + n: params[n].detach().cpu().contiguous() for n in extra})
    base_fp = base_fingerprint or _base_fingerprint(model)
    meta = {"kind": "mode", **(meta or {}), "base_fingerprint": base_fp, "layout": mode.layout.to_dict(),
            "experts": mode.names, "gate_context": mode.gate_context, "gate_form": mode.gate_form,
            "params": mode.param_counts(),
            "extra_tensors": extra}
    with atomic_dir(out, overwrite=overwrite) as stage:
        save_file(tensors, str(stage / MODE_FILE), metadata={"format": "pt"})
        write_json(stage / META, meta)
        if logs is not None:
            from ..training import keep_logs

            keep_logs(logs, stage)
        for plot in plots:
            plot(stage)
    return meta


def _base_fingerprint(model: nn.Module) -> str:
    mode = getattr(model, ATTR, None)
    if mode is None:
        return fingerprint(model)
    delattr(model, ATTR)  # MoDE sits outside the backbone, but be safe for a bare backbone model
    try:
        return fingerprint(model)
    finally:
        model.add_module(ATTR, mode)


def read_meta(path: Path | str) -> dict:
    import json

    path = Path(path)
    if not (path / META).is_file():
        raise LibraryError(f"{path} is not a MoDE model or expert directory (no {META})")
    meta = json.loads((path / META).read_text())
    if meta.get("kind") not in ("mode", "mode-expert"):
        raise LibraryError(f"{path} holds a {meta.get('kind', 'lora')} module, not a MoDE model or expert")
    return meta


def load_mode(model: nn.Module, path: Path | str, freeze_base: bool = True) -> Mode:
    """Attach the saved MoDE of `path` — a composed MoDE directory, or a library expert (with its
    own trained gate) — to a freshly loaded base `model` of any head; refused for another base
    or block layout."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    if meta["kind"] == "mode-expert":
        return apply_mode(model, [Library(path.parent).get(path.name)], keep_gates=True, freeze_base=freeze_base)
    base_fp = fingerprint(model)
    if meta.get("base_fingerprint") != base_fp:
        raise LibraryError(f"MoDE model {path} was trained on base '{meta.get('base')}' (fingerprint "
                           f"{meta.get('base_fingerprint')}), not on this base (fingerprint {base_fp})")
    saved = Layout.from_dict(meta["layout"])
    here = layout_for(model, saved.blocks, saved.expert_layers)
    if saved != here:
        raise _layout_error(f"MoDE model {path}", saved, here)
    try:
        tensors = load_file(str(path / MODE_FILE))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise LibraryError(f"MoDE model {path}: {MODE_FILE} is unreadable or truncated ({e})") from None
    mode = apply_mode(model, list(meta["experts"]), blocks=saved.blocks, expert_layers=saved.expert_layers,
                      init=None, freeze_base=freeze_base, gate_context=meta.get("gate_context", "token"),
                      gate_form=meta.get("gate_form", "softmax"))
    try:
        mode.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(EXTRA)}, strict=True)
    except RuntimeError as e:  # tensors that do not match domix.json (edited or mixed-up files)
        raise LibraryError(f"MoDE model {path}: {MODE_FILE} does not match its {META} ({e})") from None
    extra = {k[len(EXTRA):]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    if extra:
        missing = sorted(set(extra) - set(dict(model.named_parameters())))
        if missing:
            raise LibraryError(f"MoDE model {path} holds tensors this model lacks (another head?): {missing[:3]}")
        model.load_state_dict(extra, strict=False)
    return mode


def load_mode_model(path: Path | str, head: str = "lm", base: str | None = None, num_labels: int | None = None,
                    id2label: dict | None = None, dtype: str = "fp32", trust_remote_code: bool = False):
    """Load the base a MoDE model/expert was trained on (or `base`) with `head`, and its MoDE.
    Returns (model, objective, meta)."""
    from ..models import load_model

    meta = read_meta(path)
    model, objective = load_model(base or meta["base"], head=head, objective=meta.get("objective", "auto"),
                                  num_labels=num_labels, id2label=id2label, dtype=dtype,
                                  trust_remote_code=trust_remote_code)
    load_mode(model, path)
    return model, objective, meta
