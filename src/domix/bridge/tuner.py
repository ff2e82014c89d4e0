"""DoMIX as a PEFT method: `get_peft_model(model, DomixConfig(library=..., modules=...))`.

The bridge over a library's modules becomes a PEFT tuner, so that DoMIX fits the scripts people already
write: the Trainer and TRL's `SFTTrainer(peft_config=...)` take the config, `save_pretrained` /
`PeftModel.from_pretrained` round-trip it, `merge_and_unload` folds it into the base.

Per target layer (every layer the chosen modules adapt): h = W0 x + s · B_cat P A_cat x, A_cat frozen (a
buffer), P and B_cat trained — the same tensors and the same forward as `domix finetune --method domix`
(`bridge_parts`, `bridge_update`). The saved adapter holds A_cat, P and B_cat (A_cat too, so that loading
needs the base model only, not the library); its config names the modules and the base fingerprint they
were trained on, and loading onto another base is refused.

PEFT admits new methods through `register_peft_method`, which takes only names of its closed `PeftType`
enum; domix adds the member `DOMIX` to that enum at import (`_peft_type`, the one private step) and then
registers with PEFT's own function. Needs peft >= 0.18 (`BaseTuner` provides set_adapter, merging and
unloading since then). Importing this module registers the method; `import domix` imports it as soon as
PEFT is imported (`domix._after_import`). Without domix, a saved DoMIX adapter fails to load with PEFT's
KeyError 'DOMIX' rather than loading wrongly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.peft_types import PeftType, register_peft_method
from torch import nn

from ..io import atomic_dir
from .layer import bridge_update

NAME, PREFIX = "domix", "domix_"


def _peft_type(value: str) -> PeftType:
    """`PeftType[value]`, added to PEFT's closed enum if it is not there (idempotent): a genuine member,
    recorded where the enum machinery looks it up (attribute, member map, names, value map)."""
    if value in PeftType.__members__:
        return PeftType[value]
    member = str.__new__(PeftType, value)
    member._name_, member._value_, member.__objclass__ = value, value, PeftType
    member._sort_order_ = len(PeftType._member_names_)
    if hasattr(PeftType, "_add_member_"):  # CPython >= 3.13
        PeftType._add_member_(value, member)
    else:
        type.__setattr__(PeftType, value, member)  # past EnumType.__setattr__'s guard
        PeftType._member_map_[value] = member
    PeftType._member_names_.append(value)
    PeftType._value2member_map_[value] = member
    return member


DOMIX = _peft_type(NAME.upper())


@dataclass
class DomixConfig(PeftConfig):
    """A bridge over modules of a domix library (`domix pretrain`), for `get_peft_model`.

    `library` and `modules` choose the modules ("all", a comma list or a list, in that order); `bridge_init`
    starts P (uniform I/N, rank I/(N·r), identity I, own:DOMAIN). `layout` (each layer's modules, ranks
    and scaling) and `base_fingerprint` are filled when the model is built and saved with the adapter."""

    library: Optional[str] = field(default=None, metadata={"help": "the module library (a folder)"})
    modules: Union[str, list[str]] = field(default="all", metadata={"help": "'all', a comma list or a list"})
    bridge_init: str = field(default="uniform", metadata={"help": "uniform, rank, identity or own:DOMAIN"})
    layout: Optional[dict] = field(default=None, metadata={"help": "per layer: modules, ranks, scaling (filled)"})
    base_fingerprint: Optional[str] = field(default=None, metadata={"help": "the modules' base model (filled)"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "filled: the layers"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    target_parameters: Optional[list[str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "also trained and saved (a head)"})
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(default=None)
    # written into adapter_config.json for whoever opens it after PEFT's KeyError 'DOMIX'
    loading: str = field(default="a DoMIX adapter: `pip install domix` and `import domix` before "
                                 "PeftModel.from_pretrained; domix.export_lora writes it as a plain LoRA")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = DOMIX
        if isinstance(self.modules, str) and self.modules != "all":
            self.modules = [m.strip() for m in self.modules.split(",") if m.strip()]
        if self.layout is None and not self.library:
            raise ValueError("DomixConfig needs library= (a domix module library) to choose its modules from")
        if self.layout is not None and self.target_modules is None:
            self.target_modules = sorted(self.layout)


class DomixLayer(BaseTunerLayer):
    """A linear layer's bridges, one per adapter name: A (frozen buffer), P and B (trained), a scaling."""

    adapter_layer_names = ("domix_P", "domix_B")  # what set_adapter makes trainable
    other_param_names = ("domix_A", "domix_scaling")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.domix_A = BufferDict({}, persistent=True)  # saved: a fresh base restores without the library
        self.domix_P = nn.ParameterDict({})
        self.domix_B = nn.ParameterDict({})
        self.domix_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"a DoMIX bridge adapts nn.Linear layers only, not {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, A: torch.Tensor, P: torch.Tensor, B: torch.Tensor, scaling: float):
        dev = self.get_base_layer().weight.device  # fp32 whatever the base's precision
        self.domix_A[adapter_name] = A.to(dev, torch.float32).contiguous()
        self.domix_P[adapter_name] = nn.Parameter(P.to(dev, torch.float32).contiguous())
        self.domix_B[adapter_name] = nn.Parameter(B.to(dev, torch.float32).contiguous())
        self.domix_scaling[adapter_name] = float(scaling)
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return self.domix_scaling[adapter] * (self.domix_B[adapter] @ self.domix_P[adapter] @ self.domix_A[adapter])

    def bridge(self, adapter: str | None = None) -> tuple:
        """(A_cat, P, B_cat, scaling) of `adapter` (default: the layer's only one)."""
        n = adapter or next(iter(self.domix_P))
        return self.domix_A[n], self.domix_P[n], self.domix_B[n], self.domix_scaling[n]

    def set_bridge(self, A: torch.Tensor, P: torch.Tensor, B: torch.Tensor, scaling: float,
                   adapter: str | None = None) -> None:
        """Replace the values of `adapter`'s bridge in place (shapes may change, e.g. a truncated export)."""
        n = adapter or next(iter(self.domix_P))
        self.domix_A[n] = A
        self.domix_P[n].data, self.domix_B[n].data, self.domix_scaling[n] = P, B, float(scaling)

    def delta(self, adapter: str | None = None) -> torch.Tensor:
        """The d_out × d_in update s · B P A (export and merging only)."""
        return self.get_delta_weight(adapter or next(iter(self.domix_P)))


class DomixLinear(nn.Module, DomixLayer):
    def __init__(self, base_layer, adapter_name, A, P, B, scaling, **kwargs):
        super().__init__()
        DomixLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, A, P, B, scaling)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.domix_P:
                w = self.get_base_layer().weight
                new = w.data + self.get_delta_weight(name).to(w.dtype)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"merging DoMIX adapter {name} gives non-finite weights")
                w.data = new
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w = self.get_base_layer().weight
            w.data = w.data - self.get_delta_weight(name).to(w.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.domix_P:
                # in x's dtype, as domix has always added it (under autocast the sum may then be fp32)
                result = result + bridge_update(x, self.domix_A[name], self.domix_P[name], self.domix_B[name],
                                                self.domix_scaling[name]).to(x.dtype)
        return result

    def __repr__(self) -> str:
        return "domix." + super().__repr__()


class DomixModel(BaseTuner):
    """PEFT's tuner for `DomixConfig`: builds the bridge from the library (a new adapter) or from the
    config's layout (loading a saved one, whose tensors PEFT then reads from the checkpoint)."""

    prefix: str = PREFIX
    tuner_layer_cls = DomixLayer
    target_module_mapping: dict = {}

    def _pre_injection_hook(self, model: nn.Module, config: DomixConfig, adapter_name: str) -> None:
        from ..library import Library, LibraryError
        from ..models import fingerprint
        from .parts import bridge_parts

        parts = self.__dict__.setdefault("_domix_parts", {})
        if id(config) in _GIVEN:  # `inject`: the tensors are given
            parts[adapter_name] = _GIVEN.pop(id(config))
            return
        fp = fingerprint(model)
        if config.layout is None:  # a new adapter: the modules' tensors
            mods = Library(config.library).select(config.modules)
            parts[adapter_name], config.layout = bridge_parts(model, mods, config.bridge_init, fp)
            config.base_fingerprint, config.modules = fp, [m.name for m in mods]
            config.target_modules = sorted(config.layout)
        elif config.base_fingerprint and config.base_fingerprint != fp:
            raise LibraryError(f"this DoMIX adapter was built on another base model (fingerprint "
                               f"{config.base_fingerprint}, this base {fp})")

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key not in config.layout:
            return
        got = self.__dict__.get("_domix_parts", {}).get(adapter_name, {}).get(current_key)
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if got is None:  # loading: shapes only, PEFT then loads the checkpoint's values
            r = sum(config.layout[current_key]["ranks"])
            got = (torch.zeros(r, base.in_features), torch.zeros(r, r), torch.zeros(base.out_features, r),
                   config.layout[current_key]["scaling"])
        if isinstance(target, DomixLinear):
            target.update_layer(adapter_name, *got)
        else:
            new = DomixLinear(target, adapter_name, *got)
            if adapter_name not in self.active_adapters:
                new.requires_grad_(False)
            self._replace_module(parent, target_name, new, target)

    def _post_injection_hook(self, model: nn.Module, config: DomixConfig, adapter_name: str) -> None:
        self.__dict__.get("_domix_parts", {}).pop(adapter_name, None)  # the layers hold the tensors now


register_peft_method(name=NAME, config_cls=DomixConfig, model_cls=DomixModel, prefix=PREFIX)

_GIVEN: dict[int, dict] = {}  # id(config) -> {layer: (A, P, B, scaling)} handed from `inject` to the tuner


def inject(model: nn.Module, layout: dict, parts: dict, adapter_name: str = "default") -> None:
    """Put DoMIX layers with the given tensors ({layer: (A, P, B, scaling)}, `layout` as `bridge_parts`
    gives it) into `model` in place, without a PeftModel around it: `domix finetune` keeps the
    transformers model (its head, its Trainer) and saves its own task-model files."""
    config = DomixConfig(layout=layout)
    _GIVEN[id(config)] = parts
    try:
        DomixModel(model, config, adapter_name)
    finally:
        _GIVEN.pop(id(config), None)
    if hasattr(model, "peft_config"):  # the tuner's bookkeeping: not a PEFT model to transformers
        del model.peft_config


def param_groups(model: nn.Module, lr: float, bridge_lr: float, weight_decay: float = 0.0) -> list[dict]:
    """The optimizer's parameter groups DoMIX needs: the bridges' P at `bridge_lr` without weight decay,
    everything else that trains (the B's, a head) at `lr` — for `torch.optim.AdamW(param_groups(...))`
    or the Trainer's `optimizers=(optimizer, None)`. Works on a PeftModel of `DomixConfig` and on a
    `domix finetune` model alike."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    bridge = [p for n, p in trainable if ".domix_P." in n]
    rest = [p for n, p in trainable if ".domix_P." not in n]
    return [g for g in ({"params": rest, "lr": lr, "weight_decay": weight_decay},
                        {"params": bridge, "lr": bridge_lr, "weight_decay": 0.0}) if g["params"]]


def write_lora(folder, factors: dict, head: dict, *, task_type=None, base_model_name_or_path=None) -> dict:
    """Write a plain PEFT LoRA adapter into `folder` (a staging folder: the callers make the write
    atomic), which loads with PEFT alone.

    `factors` maps a target layer's name to (A', B', scaling) with the layer's update s · B' A';
    `head` maps the parameter names of modules saved whole (a classification head, PEFT's
    `modules_to_save`) to their tensors. Returns the adapter's most common rank and alpha."""
    from collections import Counter

    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, ranks, alphas = {}, {}, {}
    for name, (A, B, s) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().float().cpu().contiguous()
        ranks[name], alphas[name] = A.shape[0], s * A.shape[0]  # PEFT's scaling is alpha / r
    for name, p in head.items():
        tensors[f"base_model.model.{name}"] = p.detach().cpu().contiguous()
    r0, a0 = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    saved = sorted({n.rsplit(".", 1)[0] for n in head})
    lora = LoraConfig(r=r0, lora_alpha=a0, target_modules=sorted(factors), lora_dropout=0.0, bias="none",
                      rank_pattern={n: r for n, r in ranks.items() if r != r0},
                      alpha_pattern={n: a for n, a in alphas.items() if a != a0}, modules_to_save=saved or None,
                      task_type=task_type, base_model_name_or_path=base_model_name_or_path)
    lora.save_pretrained(str(folder))
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"lora_rank": r0, "lora_alpha": a0, "layers": len(factors)}


def export_lora(model, out, adapter_name: str = "default") -> dict:
    """Write a PeftModel of `DomixConfig` to `out` as one plain PEFT LoRA adapter of rank N·r per layer
    (A' = A_cat, B' = B_cat P, the bridge's scaling; `modules_to_save` kept), which loads with PEFT
    alone, without domix. The write is atomic. Returns the adapter's rank and alpha."""
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, DomixLinear)
              and adapter_name in m.domix_P}
    if not layers:
        raise ValueError(f"no DoMIX bridge named {adapter_name!r} in this model to export")
    with torch.no_grad():
        factors = {name: (m.domix_A[adapter_name], m.domix_B[adapter_name] @ m.domix_P[adapter_name],
                          m.domix_scaling[adapter_name]) for name, m in layers.items()}
    marker = f".modules_to_save.{adapter_name}."  # a trained head: PEFT's copy, under the module's own name
    head = {n.replace(marker, ".").removeprefix("base_model.model."): p
            for n, p in model.named_parameters() if marker in n}
    cfg = model.peft_config[adapter_name]
    with atomic_dir(out, overwrite=True) as stage:
        return write_lora(stage, factors, head, task_type=cfg.task_type,
                          base_model_name_or_path=cfg.base_model_name_or_path)
