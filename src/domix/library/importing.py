"""`library add`: import a PEFT LoRA adapter trained elsewhere as a library module, once it is
shown to fit the base: plain LoRA, layers and A/B shapes of the base, the base's kind of LM."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_dir, write_json
from ..options import option
from .store import META, Library, LibraryError, Module, entry_name


@dataclass(kw_only=True)
class AddOptions:
    """Options of `domix library add`."""

    library: str = option(help="library directory")
    adapter: str = option(help="the adapter's directory (adapter_config.json and adapter_model.safetensors)")
    domain: str = option(help="name of the new entry")
    base: str = option(help="the base model the adapter was trained on: checked, then recorded")
    overwrite: bool = option(False, "replace an existing entry of that name")

SUPPORTED = "plain LoRA (peft_type LORA, without DoRA or other LoRA variants)"
# LoRA variants and extras a domain module cannot hold: the bridge and the library read LoRA A/B pairs only
_VARIANTS = ("use_dora", "use_qalora", "use_bdlora", "lora_bias", "alora_invocation_tokens", "layer_replication",
             "modules_to_save", "trainable_token_indices", "target_parameters")
# adapter task types that fit a base of each objective (None: a bare LoRA over the model)
_TASK_TYPES = {"clm": (None, "CAUSAL_LM"), "mlm": (None,)}


def plain_lora_problem(cfg: dict, keys) -> str | None:
    """Why an adapter (its `adapter_config.json` and its tensor names) is not a plain LoRA, or None."""
    from ..lora import _KEY, lora_pairs

    if cfg.get("peft_type") != "LORA":
        return f"is a PEFT {cfg.get('peft_type')} adapter; supported: {SUPPORTED}"
    if cfg.get("use_dora"):
        return f"is a DoRA adapter (use_dora); supported: {SUPPORTED}"
    used = [k for k in _VARIANTS if cfg.get(k)]
    if used:
        return f"uses {', '.join(used)}; supported: {SUPPORTED}"
    if cfg.get("bias", "none") != "none":
        return f"trains biases (bias={cfg['bias']!r}); supported: {SUPPORTED} with bias 'none'"
    keys = list(keys)
    other = [k for k in keys if not _KEY.match(k)]
    if other:
        return f"holds tensors other than LoRA A/B pairs ({', '.join(other[:3])}); supported: {SUPPORTED}"
    pairs = lora_pairs(dict.fromkeys(keys))
    if not pairs or 2 * len(pairs) != len(keys):
        return "holds no LoRA A/B pairs" if not pairs else "holds a LoRA A without its B (or a B without its A)"
    return None


def add_adapter(library: str | Path, adapter: str | Path, domain: str, base: str,
                overwrite: bool = AddOptions.overwrite, trust_remote_code: bool = False) -> dict:
    """Check the PEFT LoRA adapter directory `adapter` against `base` and write it atomically as
    module `domain` of `library` (its two adapter files, unchanged, plus `domix.json`).

    Refused, with what differs named: another PEFT type or a LoRA variant (DoRA, ...), weights only
    as `adapter_model.bin` (weights are read with safetensors only), an adapter for another kind of
    LM (a causal-LM adapter onto an encoder), layers the base lacks or whose A/B shapes do not fit,
    and per-layer scalings that differ (a module has one scaling, alpha/r). Returns the metadata."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from ..lora import lora_pairs
    from ..models import fingerprint, load_model
    from ..training import versions

    lib, src = Library(library), Path(adapter)
    entry_name(domain)
    dest = lib.path / domain
    if dest.exists() and not overwrite:
        raise LibraryError(f"module '{domain}' already exists in library {lib.path}; pass --overwrite to replace it")
    if not (src / "adapter_config.json").is_file():
        raise LibraryError(f"{src} is not a PEFT adapter directory (no adapter_config.json)")
    weights = src / "adapter_model.safetensors"
    if not weights.is_file():
        if (src / "adapter_model.bin").is_file():
            raise LibraryError(f"adapter {src} ships only adapter_model.bin; domix reads weights with safetensors "
                               f"only: re-save the adapter with PEFT's save_pretrained (safetensors is its default)")
        raise LibraryError(f"adapter {src} has no adapter_model.safetensors")
    try:
        cfg = json.loads((src / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise LibraryError(f"adapter {src}: adapter_config.json is corrupt ({e})") from None
    shapes = Module(src.name, src, {"kind": "lora"}).shapes()  # from the header; corrupt: a clear error
    problem = plain_lora_problem(cfg, shapes)
    if problem:
        raise LibraryError(f"adapter {src} {problem}")

    model, objective = load_model(base, head="lm", trust_remote_code=trust_remote_code)
    made_for = (cfg.get("auto_mapping") or {}).get("base_model_class")
    here = f"base {base} is a {type(model).__name__} ({'masked' if objective == 'mlm' else 'causal'} LM)"
    origin = f"the adapter was made for {made_for or cfg.get('base_model_name_or_path') or 'an unnamed base'}"
    task = cfg.get("task_type")
    if task not in _TASK_TYPES[objective]:
        raise LibraryError(f"adapter {src} has task type {task}; {here}, which takes task type "
                           f"{' or '.join(str(t) for t in _TASK_TYPES[objective])}")
    layers = {n: tuple(m.weight.shape) for n, m in model.named_modules()
              if getattr(m, "weight", None) is not None and m.weight.dim() == 2}
    pairs = lora_pairs(shapes)
    missing = [n for n in pairs if n not in layers]
    if missing:
        raise LibraryError(f"adapter {src} does not fit: {len(missing)} of its {len(pairs)} layers do not exist in "
                           f"the base (e.g. {missing[0]}); {origin}, {here}")
    for name, (a, b) in pairs.items():
        d_out, d_in = layers[name]
        if a[1] != d_in or b[0] != d_out or a[0] != b[1]:
            raise LibraryError(f"adapter {src} does not fit: {name} has A {a} / B {b}, the base layer is "
                               f"{d_out} x {d_in}; {origin}, {here}")

    base_fp = fingerprint(model)
    peft_model = PeftModel.from_pretrained(model, str(src))  # as `eval-lm` and the bridge will load it
    lora = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and "default" in m.lora_A}
    if set(lora) != set(pairs):
        extra = sorted(set(lora) ^ set(pairs))
        raise LibraryError(f"adapter {src}: its target_modules adapt {len(lora)} layers of the base but its weights "
                           f"hold {len(pairs)} (e.g. {extra[0]})")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scaling = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    odd = [n for n, m in lora.items() if abs(m.scaling["default"] - scaling) > 1e-9 * abs(scaling)]
    if odd:
        raise LibraryError(f"adapter {src}: layer {odd[0]} has scaling {lora[odd[0]].scaling['default']:g}, not the "
                           f"adapter's {scaling:g} (alpha_pattern/rank_pattern); a library module has one scaling")

    targets = cfg.get("target_modules")
    meta = {
        "kind": "lora", "domain": domain, "base": base, "base_fingerprint": base_fp, "objective": objective,
        "rank": max(a[0] for a, _ in pairs.values()), "alpha": alpha,
        "targets": ",".join(sorted(targets)) if isinstance(targets, list) else targets, "target_modules": targets,
        "imported_from": str(src.resolve()), "adapter_base": cfg.get("base_model_name_or_path"),
        "data": None, "steps": None, "tokens": None,
        "heldout_loss": None, "heldout_tokens": None, "base_heldout_loss": None, "versions": versions(),
    }
    with atomic_dir(dest, overwrite=overwrite) as stage:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(src / name, stage / name)
        write_json(stage / META, meta)
    return meta
