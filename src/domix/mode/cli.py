"""`domix mode …`: MoDE expert pre-training, composition and LM evaluation (thin: parse, call, print).

`register(subparsers)` adds the `mode` command group to the `domix` parser.
"""
from __future__ import annotations

import argparse

from ..io import print_json


def _train_opts(p: argparse.ArgumentParser) -> None:
    """Training options (defaults None: the config dataclasses hold the defaults, and with
    --config only the options given on the command line override the file)."""
    p.add_argument("--objective", choices=["auto", "mlm", "clm"], default=None,
                   help="masked-LM (encoders) or next-token LM (decoders); auto decides from the model")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 128)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="expert layers' learning rate (default 1e-4)")
    p.add_argument("--gate-lr", type=float, default=None, help="gates' learning rate (default 1e-3)")
    p.add_argument("--scale-lr", type=float, default=None,
                   help="learning rate of the per-block scale that hands over from the backbone to the gated "
                        "mixture (default 1e-2)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up fraction of the steps (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=None, help="expert layers' weight decay (default 0)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    budget.add_argument("--epochs", type=float, default=None, help="passes over the corpus (default 1)")
    budget.add_argument("--max-tokens", type=int, default=None, help="training tokens (sets the steps)")
    p.add_argument("--seed", type=int, default=None, help="run seed; an expert's seed derives from it and its name")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="mixed-precision mode")
    p.add_argument("--text-field", default=None, help="field holding the text in .jsonl/.json/.csv corpora")
    p.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (for --resume)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing result")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", action="store_true", help="print the result's metadata as JSON")


def _given(a, cls) -> dict:
    given = {k: v for k, v in vars(a).items() if k in cls.__dataclass_fields__ and v is not None}
    return {**given, "progress": False} if getattr(a, "json", False) else given  # stdout is the JSON only


def cmd_pretrain(a) -> int:
    from .train import ModePretrainConfig, pretrain_expert

    if a.config:
        from ..library.executors import load_config, pretrain_all

        if a.domain or a.data:
            raise ValueError("give either --config (every domain of a domains.yaml) or --domain/--data, not both")
        overrides = {k: v for k, v in _given(a, ModePretrainConfig).items() if k not in ("domain", "data", "library")}
        configs = load_config(a.config, a.library, overrides, config_cls=ModePretrainConfig)
        results = pretrain_all(configs, workers=a.workers, executor=a.executor, ray_address=a.ray_address,
                               progress=not a.json, runner=pretrain_expert)
        if a.json:
            print_json(results)
        else:
            for name, r in results.items():
                line = f"{name:16s} {r['status']:8s}"
                line += (f" {r['error']}" if r["status"] == "failed"
                         else f" held-out loss {r['meta'].get('heldout_loss')}")
                print(line)
        return 0 if all(r["status"] != "failed" for r in results.values()) else 1
    if not (a.domain and a.data):
        raise ValueError("mode pretrain needs --domain NAME --data PATH... (one domain) or --config domains.yaml")
    meta = pretrain_expert(ModePretrainConfig(**_given(a, ModePretrainConfig)))
    if a.json:
        print_json(meta)
    else:
        lay = meta["layout"]
        print(f"expert '{meta['domain']}' -> {a.library}/{meta['domain']}  {lay['blocks']} blocks x "
              f"{lay['expert_layers']} layers, {meta['params']['total']:,} params  steps {meta['steps']}  "
              f"train loss {meta['train_loss']:.4f}  held-out loss {meta['heldout_loss']}")
    return 0


def cmd_compose(a) -> int:
    from .train import ComposeConfig, compose

    fields = _given(a, ComposeConfig)
    meta = compose(ComposeConfig(**fields))
    if a.json:
        print_json(meta)
    else:
        print(f"MoDE model of {', '.join(meta['experts'])} -> {a.out}  steps {meta['steps']}  "
              f"train loss {meta['train_loss']:.4f}")
        for name, h in meta["heldout"].items():
            print(f"  {name:16s} held-out loss {h['loss']:.4f}  accuracy {h['accuracy']:.4f}")
    return 0


def cmd_eval(a) -> int:
    from .train import eval_mode

    out = eval_mode(a.model, a.data, seq_len=a.seq_len, batch_size=a.batch_size, max_blocks=a.max_blocks,
                    device=a.device, text_field=a.text_field, base=a.base, progress=not a.json)
    if a.json:
        print_json(out)
    else:
        print(f"loss {out['loss']:.4f}  perplexity {out['perplexity']:.2f}  accuracy {out['accuracy']:.4f}  "
              f"({out['tokens']} tokens)")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `mode pretrain|compose|eval` to a `domix` parser's subparsers."""
    p = subparsers.add_parser("mode", help="MoDE baseline: per-domain expert layers beside the frozen base, "
                                           "mixed by per-block gates (arXiv 2410.10181)")
    msub = p.add_subparsers(dest="mode_command", required=True)

    q = msub.add_parser("pretrain", help="train one MoDE expert per domain, each alone on its corpus")
    q.add_argument("--library", required=True, help="library directory (an expert is an entry of kind mode-expert)")
    q.add_argument("--domain", default=None, help="one domain: the expert's name in the library")
    q.add_argument("--data", nargs="+", default=None,
                   help="one domain: .txt (a document per line), .jsonl/.json, .csv, a directory, or a saved dataset")
    q.add_argument("--config", default=None, help="every domain of a domains.yaml (base, defaults, domains)")
    q.add_argument("--workers", type=int, default=1, help="--config: domains trained at once (local executor)")
    q.add_argument("--executor", choices=["local", "ray"], default="local")
    q.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local instance)")
    q.add_argument("--base", default=None, help="'smollm2-135m' (default) or a Hugging Face model id / local path")
    q.add_argument("--blocks", type=int, default=None, help="B blocks (default: 3 for the default model)")
    q.add_argument("--expert-layers", type=int, default=None,
                   help="k layers per expert and block (default: 2 for the default model)")
    q.add_argument("--expert-init", choices=["copy", "random"], default=None,
                   help="copy: the block's last k backbone layers (default); random: fresh layers")
    _train_opts(q)
    q.set_defaults(func=cmd_pretrain)

    q = msub.add_parser("compose", help="experts side by side with fresh gates, trained on mixed domains")
    q.add_argument("--library", required=True)
    q.add_argument("--experts", default="all", help="'all' (every mode-expert of the library) or a,b,...")
    q.add_argument("--data", nargs="+", default=None,
                   help="one corpus per domain, mixed in equal parts (PATH or NAME=PATH); default: the experts' own")
    q.add_argument("--out", required=True, help="output directory of the MoDE model")
    q.add_argument("--freeze-experts", action="store_true", default=None, help="train the gates only")
    q.add_argument("--base", default=None, help="default: the base the experts were trained on")
    _train_opts(q)
    q.set_defaults(func=cmd_compose)

    q = msub.add_parser("eval", help="LM loss / perplexity / accuracy of a MoDE model or a single expert")
    q.add_argument("--model", required=True, help="a `mode compose` output or a library expert directory")
    q.add_argument("--data", nargs="+", required=True)
    q.add_argument("--base", default=None, help="default: the base it was trained on")
    q.add_argument("--seq-len", type=int, default=128)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--max-blocks", type=int, default=64, help="score at most this many blocks")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    q.add_argument("--text-field", default="text")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_eval)
    return p
