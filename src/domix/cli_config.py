"""The command line's building blocks: options made from config dataclasses (litgpt's way: a
default is written once), subcommands with `--json`, and their output.

`add_options(parser, cls)` adds one `--field-name` per field of `cls` (a dataclass written with
`domix.options.option`): its type from the annotation (int, float, str, `X | None`, `list[X]`
as `nargs="+"`, bool as a flag, `--no-x` when on by default; `parse=` in the metadata parses the text
itself, e.g. a comma list), its `choices`, its help ending with the dataclass default;
fields without a default are required; fields sharing a `metadata["group"]` are mutually
exclusive (the budget: --epochs / --max-steps / --max-tokens; the one given replaces the
others, so they default to None here); `positional=True` makes a field an argument (optional
when it has a default); `cli=False` fields are left out.

With `overrides=True` every option defaults to None, so that only what the command line gives
overrides a config file (`pretrain-all`, `mode pretrain --config`); the help still shows the
dataclass default. `given(namespace, cls)` turns a parsed namespace back into `cls`'s kwargs.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass

from .checkpoints import DEFAULT_BASE
from .io import print_json
from .training import DEVICES, LMTrainOptions, field_default, option


def _kind(annotation) -> tuple[type, bool]:
    """(element type, is a list) of an annotation; of a union, its first type that is not None."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return (typing.get_args(annotation) or (str,))[0], True
    return annotation, False


def _help(text: str, default) -> str:
    if not any(default is x for x in (MISSING, None, False)) and "(default" not in text:
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        text = f"{text} (default: {shown})".strip()
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_options(parser: argparse.ArgumentParser, cls, *, exclude=(), optional=(), overrides: bool = False):
    """Add `cls`'s fields (but `exclude` and `cli=False` ones) to `parser` as options.

    `optional`: fields without a default that the command line may still leave out (the caller
    checks them). `overrides`: every default None (only given options count)."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in exclude and f.metadata.get("cli", True)]
    # the most derived class's fields first, in its order (a command's own options before the shared
    # ones); a group's options side by side in field order, at its first one's place (argparse's
    # usage line needs them side by side)
    declared = [list(vars(c).get("__annotations__", {})) for c in cls.__mro__]
    own = {f.name: next((d, n.index(f.name)) for d, n in enumerate(declared) if f.name in n) for f in fields}
    group = {f.name: f.metadata.get("group") for f in fields}
    place = {f.name: min(own[g.name] for g in fields if g is f or group[f.name] and group[g.name] == group[f.name])
             for f in fields}
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in sorted(fields, key=lambda f: (place[f.name], fields.index(f))):
        meta = f.metadata
        default = field_default(f)
        tp, many = _kind(hints[f.name])
        kw = {"dest": f.name, "help": _help(meta.get("help", ""), default)}
        flag = "--" + f.name.replace("_", "-")
        if meta.get("positional"):  # `domix bench verdicts DIR`: the one thing the command is about
            optional_kw = {} if default is MISSING else {"nargs": "?", "default": default}
            parser.add_argument(f.name, type=tp, help=kw["help"], choices=meta.get("choices"),
                                metavar=meta.get("metavar") or (None if meta.get("choices") else f.name.upper()),
                                **optional_kw)
            continue
        if tp is bool:  # a flag that turns it on, or --no-... when it is on by default
            flag, kw["action"] = ("--no-" + flag[2:], "store_false") if default is True else (flag, "store_true")
        else:
            kw.update(type=meta.get("parse", tp), nargs="+" if many else None, choices=meta.get("choices"),
                      metavar=meta.get("metavar"))
        if default is MISSING and f.name not in optional:
            kw["required"] = True
        else:
            kw["default"] = None if overrides or default is MISSING or group[f.name] else default
        if group[f.name] and group[f.name] not in groups:
            groups[group[f.name]] = parser.add_mutually_exclusive_group()
        (groups[group[f.name]] if group[f.name] else parser).add_argument(flag, **kw)
    return parser


def given(ns: argparse.Namespace, cls, *, exclude=()) -> dict:
    """`cls`'s kwargs from a parsed namespace: the fields that are set (not None). A budget given
    on the command line replaces the others of its group (their dataclass defaults), also those
    of a config file; with `--json`, `progress=False` (stdout carries the JSON document only)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    kw = {k: v for k, v in vars(ns).items() if k in fields and v is not None}
    for name in list(kw):  # (the members of a group default to None on the command line)
        group = fields[name].metadata.get("group")
        if group:
            kw.update({k: field_default(f) for k, f in fields.items() if k != name and f.metadata.get("group") == group})
    if getattr(ns, "json", False) and "progress" in fields:
        kw["progress"] = False
    return kw


PER_DOMAIN = ("domain", "data", "library")  # a domains.yaml's, not overridable on the command line


def command(sub, name: str, text: str, func) -> argparse.ArgumentParser:
    """A subcommand that runs `func(args)`, with --json (its result as one JSON document on stdout)."""
    p = sub.add_parser(name, help=text, description=text)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=func)
    return p


@dataclass(kw_only=True)
class LMEvalOptions:
    """The options of an LM evaluation (`eval-lm`, `mode eval`): the corpus and how it is scored."""

    data: list[str] = option(help="the corpus to score")
    seq_len: int = option(LMTrainOptions.seq_len, "tokens per block")
    batch_size: int = option(LMTrainOptions.batch_size, "blocks per forward pass")
    max_blocks: int = option(LMTrainOptions.eval_blocks, "score at most this many blocks")
    device: str = option(LMTrainOptions.device, "where to score", choices=DEVICES)
    text_field: str = option(LMTrainOptions.text_field, "field holding the text in .jsonl/.json/.csv corpora")


@dataclass(kw_only=True)
class EvalLmOptions(LMEvalOptions):
    """Options of `domix eval-lm`: what is scored, then how (`LMEvalOptions`)."""

    base: str = option(DEFAULT_BASE, "the base model")
    library: str | None = option(None, "a module library")
    module: str | None = option(None, "an entry of --library: a LoRA module, a full entry or a MoDE expert")
    model: str | None = option(None, "instead: a composed MoDE directory or a library MoDE expert")


@dataclass(kw_only=True)
class FetchOptions:
    """Options of `domix fetch`."""

    what: str = option(help="the default model, or data", positional=True, choices=("model", "data"))
    which: str = option("benchmark", "data: the four-domain benchmark, or the eight commonsense-reasoning tasks of the "
                                     "LLM setting (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA)",
                        positional=True, choices=("benchmark", "commonsense"))
    out: str | None = option(None, "data: output directory (default: $DOMIX_CACHE/data, or $DOMIX_CACHE/commonsense)")
    seed: int = option(0, "data: split seed")
    train: int | None = option(None, "commonsense: training examples per task (default 1000; the whole set when it "
                                     "is smaller)")
    dev: int | None = option(None, "commonsense: dev examples per task (default 100; the whole set when it is smaller)")
    test: int | None = option(None, "commonsense: test examples per task (default 500; the whole set when it is "
                                    "smaller)")


@dataclass(kw_only=True)
class PredictOptions:
    """Options of `domix predict`: a task model, and texts given inline or in a file (one of the two)."""

    model: str = option(help="a domix task model directory")
    text: list[str] | None = option(None, "one or more texts (prompts for generate tasks)", group="source")
    data: str | None = option(None, "a JSONL file with text (or prompt) fields", group="source")
    device: str = option("auto", "where to predict", choices=DEVICES)


@dataclass(kw_only=True)
class EvaluateOptions:
    """Options of `domix evaluate`."""

    model: str = option(help="a task model directory, or a base model (zero-shot)")
    data: str = option(help="JSONL rows of the task: text,label (classify) or prompt,answer[,choices] (generate)")
    max_seq_len: int | None = option(None, "tokens per example, a longer prompt cut from its left (default: the task "
                                           "model's; 256 for a base model)")
    device: str = option("auto", "where to score", choices=DEVICES)


FORMATS = ("merged", "peft-lora")


@dataclass(kw_only=True)
class ExportOptions:
    """Options of `domix export`."""

    model: str = option(help="a domix task model directory")
    out: str = option(help="where the export is written (atomically)")
    format: str = option("merged", "merged Hugging Face weights, or one standard PEFT LoRA adapter", choices=FORMATS)
    rank: int | None = option(None, "SVD-truncate each layer's update to this rank")
    overwrite: bool = option(False, "replace an existing export")


def report(a, result, text: str) -> int:
    """With --json, `result` as the one JSON document on stdout; else `text`. Exit status 0."""
    print_json(result) if a.json else print(text)
    return 0


def lm_text(out: dict) -> str:
    """One line of an LM evaluation (`eval-lm`, `mode eval`)."""
    return (f"loss {out['loss']:.4f}  perplexity {out['perplexity']:.2f}  accuracy {out['accuracy']:.4f}  "
            f"({out['tokens']} tokens)")


def report_all(a, results: dict, detail=lambda r: f"held-out loss {r['meta'].get('heldout_loss')}") -> int:
    """`report` the per-entry results of `run_all` (`pretrain-all`, `finetune-all`): a line each,
    its error or `detail(result)`; exit status 1 when one failed."""
    report(a, results, "\n".join(f"{name:16s} {r['status']:8s} " + (r["error"] if r["status"] == "failed" else detail(r))
                                 for name, r in results.items()))
    return 0 if all(r["status"] != "failed" for r in results.values()) else 1
