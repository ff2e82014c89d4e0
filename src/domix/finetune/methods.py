"""The fine-tuning methods, one class each, in a registry (`METHODS`).

A method knows the `FinetuneConfig` fields it reads (`fields`: the benchmark keys a run on
them), checks its options (`prepare`), builds its trainable structure on the frozen task base
(`build`, returning what task.json records about it), names the parameters that take the
mixing learning rate (`mixing`), says which tensors a task model saves (`saved`), rebuilds the
structure of a saved task model before its tensors load (`restore`), and draws its own plots.
"""
from __future__ import annotations

import json
from dataclasses import fields as dc_fields
from dataclasses import replace

import torch

from ..library import Library, LibraryError
from .config import DomixOptions, FinetuneConfig, LoraOptions, ModeOptions


def _names(*option_classes) -> frozenset[str]:
    return frozenset(f.name for c in option_classes for f in dc_fields(c))


class Method:
    """Every weight of the base frozen; the task head trains (the base class is the `full` method's
    opposite only in `build`)."""

    name: str = ""
    fields: frozenset[str] = frozenset()  # FinetuneConfig fields this method reads beyond the shared ones

    def prepare(self, cfg: FinetuneConfig) -> FinetuneConfig:
        """Check the method's options; return the config as it will be saved."""
        return cfg

    def build(self, model, cfg: FinetuneConfig, head: list[str], base_fp: str) -> dict:
        """Add the trainable structure and set requires_grad; return what task.json records."""
        for n, p in model.named_parameters():
            p.requires_grad_(n in head)
        return {}

    def restore(self, model, cfg: FinetuneConfig, spec: dict):
        """The structure of a saved task model (its tensors are loaded next); returns the model."""
        return model

    def mixing(self, name: str) -> bool:
        """Whether parameter `name` mixes modules (it then takes `mixing_lr`, no weight decay)."""
        return False

    def mixing_lr(self, cfg: FinetuneConfig) -> float:
        """The learning rate of the mixing parameters: DoMIX's bridge rate."""
        return cfg.bridge_lr

    def saved(self, model) -> set[str]:
        """Names of the tensors a task model stores (beyond the base)."""
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def upgrade(self, tensors: dict, spec: dict) -> dict:
        """A stored task model's tensors under the names this domix gives them (older formats)."""
        return tensors

    def plots(self, model, info: dict, metrics: dict) -> list:
        """Callables `plot(stage_dir)` drawing this method's figures (they may add to `metrics`)."""
        return []


class Full(Method):
    name = "full"

    def build(self, model, cfg, head, base_fp):
        for p in model.parameters():
            p.requires_grad_(True)
        return {}


class Domix(Method):
    name = "domix"
    fields = _names(DomixOptions) | {"library", "modules"}

    def prepare(self, cfg):
        from ..library.select import parse_auto

        if not cfg.library:
            raise ValueError("--method domix needs --library")
        k = parse_auto(cfg.modules)
        if k is not None and k > (n := len(Library(cfg.library).list("lora"))):
            raise LibraryError(f"--modules auto:{k} asks for {k} modules, but library {cfg.library} has {n} LoRA "
                               f"module{'s' if n != 1 else ''}")
        return cfg

    def build(self, model, cfg, head, base_fp):
        from ..bridge.apply import apply_bridge
        from ..library.select import choose_modules, parse_auto

        selection = None
        if (k := parse_auto(cfg.modules)) is not None:  # ranked on the training text only
            selection = choose_modules(cfg.library, cfg.train, k, base=cfg.base, device=cfg.device)
        mods = Library(cfg.library).select(selection["chosen"] if selection else cfg.modules)
        layout = apply_bridge(model, mods, cfg.bridge_init, base_fp)
        self._trainable(model, cfg, head)
        return {"layout": layout, "modules": [
            {"name": m.name, "base_fingerprint": m.meta["base_fingerprint"], "rank": m.meta.get("rank"),
             "alpha": m.meta.get("alpha"), "domain": m.meta.get("domain"), "tokens": m.meta.get("tokens")}
            for m in mods], **({"module_selection": selection} if selection else {})}

    @staticmethod
    def _trainable(model, cfg, head):
        for n, p in model.named_parameters():
            p.requires_grad_(n in head or n.endswith(".domix_B.default")
                             or (n.endswith(".domix_P.default") and not cfg.freeze_bridge))

    def restore(self, model, cfg, spec):
        from ..bridge.apply import restore_bridge

        empty = {}
        for layer, info in spec["layout"].items():
            base, r = model.get_submodule(layer), sum(info["ranks"])
            empty.update({f"{layer}.lora_A": torch.zeros(r, base.in_features), f"{layer}.lora_P": torch.zeros(r, r),
                          f"{layer}.lora_B": torch.zeros(base.out_features, r)})
        restore_bridge(model, spec["layout"], empty)  # shapes; the task model's tensors are loaded next
        self._trainable(model, cfg, spec.get("head", []))
        return model

    def mixing(self, name):
        return name.endswith(".domix_P.default")

    def saved(self, model):
        from ..bridge.apply import bridged_layers

        keep = super().saved(model)
        for name in bridged_layers(model):
            keep |= {f"{name}.domix_{x}.default" for x in "APB"}
        return keep

    def upgrade(self, tensors, spec):
        # formats 1-2 (domix's own layer before the tuner): `<layer>.lora_A`; the tuner's layer: `<layer>.domix_A.default`
        old = {f"{layer}.lora_{x}": f"{layer}.domix_{x}.default" for layer in spec["layout"] for x in "APB"}
        return {old.get(k, k): v for k, v in tensors.items()}

    def plots(self, model, info, metrics):
        from .plots import plot_bridge

        names = [m["name"] for m in info["modules"]]

        def bridge(stage):
            metrics["bridge_blocks"] = plot_bridge(model, info["layout"], names, stage / "bridge.png")

        return [bridge]


class Lora(Method):
    """PEFT LoRA (or DoRA) from the base, or (`init_module`) from a library module's A and B."""

    name, dora = "lora", False
    fields = _names(LoraOptions) | {"library"}

    def prepare(self, cfg):
        if cfg.init_module:  # the LoRA's shape is the module's: say so in the saved settings
            _, shape = self._init_module(cfg)
            cfg = replace(cfg, lora_rank=shape["r"], lora_alpha=shape["lora_alpha"])
        return cfg

    def _init_module(self, cfg):
        """The library module a LoRA fine-tuning starts from, and its LoRA shape (r, alpha, targets)."""
        if self.dora or not cfg.library:
            raise ValueError("--init-module needs --method lora and --library")
        mod = Library(cfg.library).get(cfg.init_module, kinds=("lora",))
        acfg = json.loads((mod.path / "adapter_config.json").read_text())
        return mod, {"r": acfg["r"], "lora_alpha": acfg["lora_alpha"], "target_modules": acfg["target_modules"],
                     "use_rslora": bool(acfg.get("use_rslora")),
                     # per-layer ranks (a module compressed by energy, `library compress --energy`)
                     **{k: acfg[k] for k in ("rank_pattern", "alpha_pattern") if acfg.get(k)}}

    def _wrap(self, model, cfg, head, shape):
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(**shape, use_dora=self.dora,
                          modules_to_save=sorted({n.rsplit(".", 1)[0] for n in head}) or None)
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, lcfg).base_model.model  # keep the plain class; PEFT layers stay inside

    def _shape(self, model, cfg):
        from ..models import target_regex

        return dict(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                    target_modules=target_regex(model, "all-linear"))

    def build(self, model, cfg, head, base_fp):
        if not cfg.init_module:
            self._wrap(model, cfg, head, self._shape(model, cfg))
            return {}
        mod, shape = self._init_module(cfg)
        mod.check_base(base_fp)
        self._wrap(model, cfg, head, shape)
        _load_lora(model, mod)
        return {"init_module": {"name": mod.name, "path": str(mod.path), **shape,
                                "base_fingerprint": mod.meta["base_fingerprint"], "domain": mod.meta.get("domain"),
                                "tokens": mod.meta.get("tokens")}}

    def restore(self, model, cfg, spec):
        init = spec.get("init_module")
        shape = ({k: init[k] for k in ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern",
                                       "alpha_pattern") if k in init} if init else self._shape(model, cfg))
        self._wrap(model, cfg, spec.get("head", []), shape)
        return model


class Dora(Lora):
    name, dora = "dora", True
    fields = _names(LoraOptions) - {"init_module"}


class Mode(Method):
    """MoDE experts beside the frozen base: from a composed model, or from library experts with fresh gates."""

    name = "mode"
    fields = _names(ModeOptions) | {"library", "modules"}

    def mixing_lr(self, cfg):
        return cfg.gate_lr

    def build(self, model, cfg, head, base_fp):
        from ..mode import apply_mode, load_mode

        if cfg.from_composed:
            mode = load_mode(model, cfg.from_composed)
            for opt, value, default, theirs in (("context", cfg.gate_context, "token", mode.gate_context),
                                                ("form", cfg.gate_form, "softmax", mode.gate_form)):
                if value != default and value != theirs:
                    raise ValueError(f"--gate-{opt} {value} is for fresh gates; the composed model "
                                     f"{cfg.from_composed} has gates of {opt} {theirs!r}")
        else:
            if not cfg.library:
                raise ValueError("--method mode needs --library (its MoDE experts) or --from-composed")
            apply_mode(model, Library(cfg.library).select(cfg.modules, kind="mode-expert"), base_fingerprint=base_fp,
                       gate_context=cfg.gate_context, gate_form=cfg.gate_form)
        return self._finish(model, cfg, head)

    @staticmethod
    def _finish(model, cfg, head) -> dict:
        from ..mode import set_trainable

        mode = model.domix_mode
        set_trainable(model, experts=not cfg.freeze_experts, gates=True)
        for n, p in model.named_parameters():
            if n in head:
                p.requires_grad_(True)
        return {"mode_layout": {"experts": list(mode.names), "blocks": mode.layout.blocks,
                                "expert_layers": mode.layout.expert_layers, "gate_context": mode.gate_context,
                                "gate_form": mode.gate_form},
                "modules": [{"name": n, "kind": "mode-expert"} for n in mode.names]}

    def restore(self, model, cfg, spec):
        from ..mode import apply_mode

        saved = spec["mode_layout"]
        # placeholders: the task model's tensors fill them
        apply_mode(model, saved["experts"], blocks=saved["blocks"], expert_layers=saved["expert_layers"],
                   init=None, gate_context=saved.get("gate_context", "token"),
                   gate_form=saved.get("gate_form", "softmax"))
        self._finish(model, cfg, spec.get("head", []))
        return model

    def mixing(self, name):
        # the gates, and under routed gates each expert's own gate (a gate too, though it came with the
        # expert): at the gate rate, the expert lr would leave the experts' share of each token as it was
        return name.startswith("domix_mode.") and (".gate." in name or ".own." in name)

    def saved(self, model):
        return super().saved(model) | {n for n, _ in model.named_parameters() if n.startswith("domix_mode.")}


def _load_lora(model, mod) -> None:
    """Copy a module's A and B into the (default) LoRA of every layer it adapts."""
    from ..lora import lora_pairs

    pairs = lora_pairs(mod.tensors())
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    if set(pairs) != wrapped:
        raise LibraryError(f"module '{mod.name}' adapts {len(pairs)} layers; the LoRA built from its config "
                           f"has {len(wrapped)} (e.g. {sorted(set(pairs) ^ wrapped)[:2]})")
    with torch.no_grad():
        for layer, (a, b) in pairs.items():
            m = model.get_submodule(layer)
            m.lora_A["default"].weight.copy_(a)
            m.lora_B["default"].weight.copy_(b)


METHODS: dict[str, Method] = {m.name: m for m in (Domix(), Lora(), Dora(), Full(), Mode())}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown --method {name!r} ({', '.join(METHODS)})") from None

