"""`domix library …`: the module library's commands — inventory, integrity, selection for a task, merges,
compression, imports (thin: parse, call, print).

`register(subparsers)` adds the `library` command group to the `domix` parser.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..cli_config import add_options, command, given, report
from ..io import print_json
from ..options import option
from .compress import CompressOptions
from .importing import AddOptions
from .merge import MergeOptions
from .select import RankOptions
from .store import Library


@dataclass(kw_only=True)
class LibraryDirOptions:
    """The library directory, as an argument (`library list lib/`) or as `--library` like the other library
    commands take it."""

    dir: str | None = option(None, "library directory (or --library)", positional=True)
    library: str | None = option(None, "the same, as the other library commands take it")


@dataclass(kw_only=True)
class ShowOptions:
    """What `library show` shows (after the library directory)."""

    name: str = option(help="the entry", positional=True)


@dataclass(kw_only=True)
class CheckOptions:
    """What `library check` checks the entries against."""

    base: str = option(help="the base model every entry must fit")


def _library(a) -> Library:
    if a.dir and a.library and a.dir != a.library:
        raise ValueError(f"two library directories given: {a.dir} and --library {a.library}")
    where = a.dir or a.library
    if not where:
        raise ValueError(f"library {a.action}: give the library directory (library {a.action} DIR, or --library DIR)")
    return Library(where)


def cmd_list(a) -> int:
    lib = _library(a)
    rows = []
    for name in lib.names():
        try:
            mod = lib.get(name)
            rows.append({"name": name} | {k: mod.meta.get(k) for k in ("domain", "base", "objective", "steps",
                                                                      "tokens", "heldout_loss")} | mod.summary())
        except Exception as e:  # a broken entry is listed, not fatal
            rows.append({"name": name, "error": str(e)})
    if not rows:
        return report(a, rows, f"library {lib.path} is empty")
    lines = [f"{'name':16s} {'kind':12s} {'params':>11s} {'size':>9s} {'steps':>6s} {'tokens':>9s} {'held-out':>9s}  "
             "layout"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:16s} ERROR {r['error']}")
            continue
        held = f"{r['heldout_loss']:.4f}" if r["heldout_loss"] is not None else "-"
        steps, tokens = ("-" if r[k] is None else r[k] for k in ("steps", "tokens"))  # None: an imported module
        lines.append(f"{r['name']:16s} {r['kind']:12s} {r['params']:>11,} {r['size_bytes'] / 2**20:>7.1f}MB "
                     f"{steps:>6} {tokens:>9} {held:>9s}  {r['layout']}")
    return report(a, rows, "\n".join(lines))


def cmd_show(a) -> int:
    mod = _library(a).get(a.name)
    print_json({**mod.meta, "entry": mod.summary()})
    return 0


def cmd_check(a) -> int:
    from ..models import fingerprint, load_model

    lib = _library(a)
    model, _ = load_model(a.base, head="lm")
    problems = lib.check(model, fingerprint(model))
    if a.json:
        print_json({"modules": lib.names(), "problems": problems})
    else:
        print("\n".join(problems) if problems else f"all {len(lib.names())} modules in {lib.path} fit base {a.base}")
    return 1 if problems else 0


def cmd_rank(a) -> int:
    from .select import plot_ranking, rank_modules

    out = rank_modules(**given(a, RankOptions, exclude=("plot",)), progress=not a.json)
    if a.plot:
        out["plot"] = str(plot_ranking(out, a.plot))
    top = max((abs(r["gain"]) for r in out["ranking"]), default=0) or 1.0
    lines = [f"{out['tokens']:,} tokens of {a.data}; base loss {out['base_loss']:.4f}",
             f"{'#':>3s} {'module':16s} {'loss':>8s} {'gain':>8s}"]
    lines += [f"{i:3d} {r['name']:16s} {r['loss']:8.4f} {r['gain']:+8.4f} {'#' * round(20 * max(0, r['gain']) / top)}"
              for i, r in enumerate(out["ranking"], 1)]
    return report(a, out, "\n".join(lines + ([f"plot: {out['plot']}"] if a.plot else [])))


def cmd_merge(a) -> int:
    from .merge import merge_modules

    meta = merge_modules(**given(a, MergeOptions))
    m = meta["merged"]
    return report(a, meta, f"module '{a.out}' -> {Path(a.library) / a.out}: {m['combination']} merge of "
                           f"{', '.join(m['modules'])} (weights {', '.join(f'{w:g}' for w in m['weights'])}"
                           + (f", density {m['density']:g}" if m["density"] is not None else "")
                           + f"), LoRA r={meta['rank']}")


def cmd_compress(a) -> int:
    from .compress import compress_module

    out = compress_module(**given(a, CompressOptions))
    ranks = [v["rank"] for v in out["layers"].values()]
    loss = (f"held-out loss {out['heldout_loss_before']:.4f} -> {out['heldout_loss_after']:.4f}"
            if out["heldout_loss_after"] is not None else out["heldout_note"])
    return report(a, out, f"module '{a.module}' (r={out['source_rank']}) -> '{a.out}': rank {min(ranks)}-{max(ranks)}, "
                          f"{out['params_after']:,} of {out['params_before']:,} params, kept energy "
                          f"{out['energy']:.4f}; {loss}")


def cmd_add(a) -> int:
    from .importing import add_adapter

    meta = add_adapter(**given(a, AddOptions))
    return report(a, meta, f"adapter {a.adapter} -> module '{a.domain}' in {a.library} (LoRA r={meta['rank']}, "
                           f"fits base {a.base})")


# name: (what it does, its function, its option classes in their order on the command line)
COMMANDS = {
    "list": ("one line per module", cmd_list, (LibraryDirOptions,)),
    "show": ("a module's metadata, with its kind, size and layout under 'entry'", cmd_show,
             (LibraryDirOptions, ShowOptions)),
    "rank": ("which modules a task needs: each module's loss gain over the base on the task's own text, most "
             "relevant first", cmd_rank, (RankOptions,)),
    "merge": ("merge LoRA modules into a new library entry with PEFT's add_weighted_adapter (linear, TIES or "
              "DARE-TIES)", cmd_merge, (MergeOptions,)),
    "check": ("check every entry against a base model: fingerprint, files, LoRA shapes, MoDE layouts (exit 1 on any "
              "problem)", cmd_check, (LibraryDirOptions, CheckOptions)),
    "compress": ("a smaller copy of a LoRA module: each layer's update re-factorised by SVD to a lower rank",
                 cmd_compress, (CompressOptions,)),
    "add": ("import a PEFT LoRA adapter trained elsewhere as a module, once it is checked against the base", cmd_add,
            (AddOptions,)),
}


def register(subparsers) -> argparse.ArgumentParser:
    """Add `library list|show|rank|merge|check|compress|add` to a `domix` parser's subparsers."""
    p = subparsers.add_parser("library", help="the module library: inventory, integrity, selection for a task, merges, "
                                              "compression, imports")
    lsub = p.add_subparsers(dest="action", required=True)
    for name, (text, func, option_classes) in COMMANDS.items():
        q = command(lsub, name, text, func)
        for cls in option_classes:
            add_options(q, cls)
    return p
