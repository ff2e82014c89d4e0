"""`domix mode …`: MoDE expert pre-training, composition and LM evaluation (thin: parse, call, print).

`register(subparsers)` adds the `mode` command group to the `domix` parser.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..cli_config import PER_DOMAIN, LMEvalOptions, add_options, command, given, lm_text, report, report_all
from ..executors import PoolOptions
from ..options import option
from .train import ComposeConfig, ModePretrainConfig


@dataclass(kw_only=True)
class PretrainAllOptions(PoolOptions):
    """`mode pretrain --config`: every domain of a domains.yaml, and how the runs share the machine."""

    config: str | None = option(None, "every domain of a domains.yaml (base, defaults, domains); the options given here "
                                      "override it")


@dataclass(kw_only=True)
class EvalOptions(LMEvalOptions):
    """Options of `mode eval`: the model, then how it is scored (`LMEvalOptions`)."""

    model: str = option(help="a `mode compose` output or a library expert directory")
    base: str | None = option(None, "default: the base it was trained on")

def cmd_pretrain(a) -> int:
    from .train import pretrain_expert

    if a.config:
        from ..library.pretrain_all import load_config, pretrain_all

        if a.domain or a.data:
            raise ValueError("give either --config (every domain of a domains.yaml) or --domain/--data, not both")
        overrides = given(a, ModePretrainConfig, exclude=PER_DOMAIN)
        configs = load_config(a.config, a.library, overrides, config_cls=ModePretrainConfig)
        results = pretrain_all(configs, workers=a.workers, executor=a.executor, ray_address=a.ray_address,
                               progress=not a.json, runner=pretrain_expert)
        return report_all(a, results)
    if a.domain is None or not a.data:
        raise ValueError("mode pretrain needs --domain NAME --data PATH... (one domain) or --config domains.yaml")
    meta = pretrain_expert(ModePretrainConfig(**given(a, ModePretrainConfig)))
    lay = meta["layout"]
    return report(a, meta, f"expert '{meta['domain']}' -> {a.library}/{meta['domain']}  {lay['blocks']} blocks x "
                           f"{lay['expert_layers']} layers, {meta['params']['total']:,} params  steps {meta['steps']}  "
                           f"train loss {meta['train_loss']:.4f}  held-out loss {meta['heldout_loss']}")


def cmd_compose(a) -> int:
    from .train import compose

    meta = compose(ComposeConfig(**given(a, ComposeConfig)))
    lines = [f"MoDE model of {', '.join(meta['experts'])} -> {a.out}  steps {meta['steps']}  "
             f"train loss {meta['train_loss']:.4f}"]
    routing = meta.get("routing", {})
    lines += [f"  {name:16s} held-out loss {h['loss']:.4f}  accuracy {h['accuracy']:.4f}  gate weights "
              + "  ".join(f"{k} {v:.2f}" for k, v in routing.get(name, {}).items())
              for name, h in meta["heldout"].items()]
    if routing:
        lines.append(f"  routing heatmap: {a.out}/routing.png")
    return report(a, meta, "\n".join(lines))


def cmd_eval(a) -> int:
    from .train import eval_mode

    out = eval_mode(a.model, a.data, **given(a, LMEvalOptions, exclude=("data",)), base=a.base, progress=not a.json)
    return report(a, out, lm_text(out))


def register(subparsers) -> argparse.ArgumentParser:
    """Add `mode pretrain|compose|eval` to a `domix` parser's subparsers."""
    p = subparsers.add_parser("mode", help="MoDE baseline: per-domain expert layers beside the frozen base, "
                                           "mixed by per-block gates (arXiv 2410.10181)")
    msub = p.add_subparsers(dest="mode_command", required=True)

    q = command(msub, "pretrain", "train one MoDE expert per domain, each alone on its corpus", cmd_pretrain)
    add_options(q, PretrainAllOptions)
    add_options(q, ModePretrainConfig, optional=("domain", "data"), overrides=True)

    add_options(command(msub, "compose", "experts side by side with fresh gates, trained on mixed domains",
                        cmd_compose), ComposeConfig)

    q = command(msub, "eval", "LM loss / perplexity / accuracy of a MoDE model or a single expert", cmd_eval)
    add_options(q, EvalOptions)
    return p
