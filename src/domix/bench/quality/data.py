"""The benchmark's data: deterministic subsets of the benchmark data (`domix fetch data`) sized
by the settings, written once under `<out>/data-<key>/`."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from ...data.benchmark import GENERAL
from ...io import atomic_dir, sha256_file, write_json
from .job import _key


def _stratified(rows: list[dict], n: int | None, rng: random.Random) -> list[dict]:
    """n rows at random, every label present at least once when n allows it."""
    rows = list(rows)
    rng.shuffle(rows)
    if n is None or n >= len(rows):
        return rows
    first, seen = [], set()
    for i, r in enumerate(rows):
        if r["label"] not in seen:
            seen.add(r["label"])
            first.append(i)
    firsts = set(first)
    chosen = first[:n] + [i for i in range(len(rows)) if i not in firsts][:max(0, n - len(first))]
    return [rows[i] for i in sorted(chosen)]


def _take_tokens(docs: list[str], order: list[int], start: int, target: int, tok, cap_words: int | None = None):
    """Documents from order[start:] until they hold `target` tokens. Returns (texts, next index, tokens)."""
    out, total, i = [], 0, start
    while total < target and i < len(order):
        chunk = [docs[j] for j in order[i:i + 64]]
        if cap_words:
            chunk = [" ".join(d.split()[:cap_words]) for d in chunk]
        for text, ids in zip(chunk, tok(chunk)["input_ids"]):
            i += 1
            out.append(text)
            total += len(ids) + 1  # + the end-of-document token of packing
            if total >= target:
                break
    return out, i, total


SPLITS = ("train", "dev", "test")


def data_tokens(settings: dict) -> int:
    """Training tokens per domain the corpora must hold: the pre-training budget, or with a DAP
    curve its largest budget (smaller budgets train fewer steps on the same text)."""
    pre = settings["pretrain"]
    curve = (settings.get("dap_curve") or {}).get("tokens")
    return max(curve) if curve else pre["steps"] * pre["batch_size"] * pre["seq_len"]


def builtin_source(root: Path, settings: dict) -> dict:
    """The files of the built-in benchmark (`domix fetch data`) as a data source (see `prepare_data`)."""
    root = Path(root)
    return {"root": str(root), "corpora": {d: [str(root / "corpora" / f"{d}.txt")] for d in settings["domains"]},
            "general": str(root / "corpora" / f"{GENERAL}.txt"),
            "tasks": {t: {"domain": d, **{s: str(root / "tasks" / t / f"{s}.jsonl") for s in SPLITS}}
                      for t, d in settings["task_domains"].items()}}


def commonsense_source(root: Path, settings: dict) -> dict:
    """The commonsense tasks (`domix fetch data commonsense`) as a data source: each task is a domain whose
    corpus is its training text (`<task>/corpus.jsonl`), and a task of the suite."""
    root = Path(root)
    return {"root": str(root), "corpora": {t: [str(root / t / "corpus.jsonl")] for t in settings["domains"]},
            "general": None,
            "tasks": {t: {"domain": t, **{s: str(root / t / f"{s}.jsonl") for s in SPLITS}} for t in settings["domains"]}}


def _text(row: dict) -> str:
    return row["text"] if "text" in row else row["prompt"]


def _documents(paths: list[str]) -> list[str]:
    """A corpus's documents: a .txt file holds one per line; anything else `load_documents` reads
    (.jsonl/.json/.csv/.parquet files, folders, saved datasets), a document's newlines made spaces."""
    if len(paths) == 1 and Path(paths[0]).suffix == ".txt" and Path(paths[0]).is_file():
        return [line for line in Path(paths[0]).read_text(encoding="utf-8").splitlines() if line.strip()]
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    from ...data.corpus import load_documents

    was = is_progress_bar_enabled()
    disable_progress_bar()  # a second's reading: the run's log stays one line per stage
    try:
        return [" ".join(t.split()) for t in load_documents(paths)["text"]]
    finally:
        if was:
            enable_progress_bar()


def prepare_data(source, out: Path, settings: dict, progress: bool = True) -> dict:
    """Deterministic subsets of the benchmark data under out/data-<key>/: per domain a training
    text of the pre-training budget (plus the 5% pretrain holds out itself) and a disjoint
    held-out text for LM loss; a general-text held-out set (if the source has one); the task
    splits, subsampled. `source`: the root of the built-in data, or a user benchmark's files
    ({"corpora": {domain: [paths]}, "general": path | None, "tasks": {task: {"domain", "train",
    "dev", "test"}}}, see `config.read_config`)."""
    from ...models import load_tokenizer

    builtin = not isinstance(source, dict)
    if builtin:
        source = (commonsense_source if settings.get("suite") else builtin_source)(source, settings)
    root = Path(source["root"]) if source.get("root") else None
    pre, ft, lm = settings["pretrain"], settings["finetune"], settings["lm_eval"]
    domains = settings["domains"]
    general = source.get("general")
    files = [Path(f) for d in domains for f in source["corpora"][d]] + ([Path(general)] if general else [])
    files += [Path(t[s]) for t in source["tasks"].values() for s in SPLITS]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"benchmark data under {root} lacks {missing[:3]} (build it: domix fetch data)"
                                if builtin else f"the benchmark's files {missing[:3]} do not exist")
    name = lambda f: str(f.relative_to(root)) if root else str(f.resolve())  # noqa: E731
    spec = {"files": {name(f): sha256_file(f) if f.is_file() else _tree_hash(f) for f in files}, "domains": domains,
            "tokens": data_tokens(settings), "seq_len": pre["seq_len"],
            "heldout_blocks": lm["blocks"], "sizes": {k: ft[k] for k in SPLITS},
            "tokenizer": settings["base_id"], "version": 2}
    if not builtin:
        spec["tasks"] = {t: v["domain"] for t, v in source["tasks"].items()}
    if settings.get("suite"):
        spec["suite"] = settings["suite"]
    dest = out / f"data-{_key(spec)}"
    if (dest / "data.json").is_file():
        return json.loads((dest / "data.json").read_text())
    tok = load_tokenizer(settings["base"])
    # pretrain() holds 5% of the documents out; the rest must fill `steps` batches once
    train_target = math.ceil(spec["tokens"] / 0.95 * 1.05)
    held_target = math.ceil(lm["blocks"] * pre["seq_len"] * 1.1)
    info = {"root": str(root) if root else None, "key": dest.name, "corpora": {}, "heldout": {}, "tasks": {}}
    corpora = {**{d: source["corpora"][d] for d in domains}, **({GENERAL: [general]} if general else {})}
    union: dict[str, list[dict]] = {}
    with atomic_dir(dest, overwrite=True) as stage:
        for d, paths in corpora.items():
            docs = _documents(paths)
            order = list(range(len(docs)))
            random.Random(f"quality/{d}").shuffle(order)
            # held-out documents come first and are capped in length, so a few long pages
            # (news, Wikipedia) cannot make up the whole held-out set
            held, nxt, held_tokens = _take_tokens(docs, order, 0, held_target, tok, cap_words=2 * pre["seq_len"])
            (stage / "heldout").mkdir(exist_ok=True)
            (stage / "heldout" / f"{d}.txt").write_text("\n".join(held) + "\n", encoding="utf-8")
            info["heldout"][d] = {"path": str(dest / "heldout" / f"{d}.txt"), "documents": len(held),
                                  "tokens": held_tokens}
            if d == GENERAL and general:
                continue
            train, _, train_tokens = _take_tokens(docs, order, nxt, train_target, tok)
            if not train:
                raise ValueError(f"domain {d}: its corpus has no documents left after the held-out text")
            (stage / "corpora").mkdir(exist_ok=True)
            (stage / "corpora" / f"{d}.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
            info["corpora"][d] = {"path": str(dest / "corpora" / f"{d}.txt"), "documents": len(train),
                                  "tokens": train_tokens, "of": len(docs)}
        for task, t in source["tasks"].items():
            info["tasks"][task] = {"domain": t["domain"]}
            for split in SPLITS:
                rows = [json.loads(line) for line in Path(t[split]).read_text(encoding="utf-8").splitlines()
                        if line.strip()]
                sub = _stratified(rows, ft[split], random.Random(f"quality/{task}/{split}"))
                if split != "train":  # scored in batches: similar lengths together pad less
                    sub.sort(key=lambda r: len(_text(r)))
                if settings.get("suite") and split != "test":
                    union.setdefault(split, []).extend(sub)
                (stage / "tasks" / task).mkdir(parents=True, exist_ok=True)
                (stage / "tasks" / task / f"{split}.jsonl").write_text(
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sub), encoding="utf-8")
                info["tasks"][task][split] = {"path": str(dest / "tasks" / task / f"{split}.jsonl"),
                                              "examples": len(sub), "of": len(rows)}
            info["tasks"][task]["labels"] = sorted({str(json.loads(l)["label"]) for l in
                                                    (stage / "tasks" / task / "train.jsonl").read_text().splitlines()})
            if settings.get("suite"):  # multiple choice: what guessing scores
                test = [json.loads(l) for l in (stage / "tasks" / task / "test.jsonl").read_text().splitlines()]
                info["tasks"][task]["chance"] = round(sum(1 / len(r["choices"]) for r in test) / len(test), 4)
        if settings.get("suite"):
            # the suite's fine-tuning data: every task's training (dev) subset, task by task
            info["union"] = {}
            for split, rows in union.items():
                path = stage / "tasks" / "union" / f"{split}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
                info["union"][split] = {"path": str(dest / "tasks" / "union" / f"{split}.jsonl"), "examples": len(rows)}
        write_json(stage / "data.json", info)
    return info


def _tree_hash(path: Path) -> str:
    """A folder's identity: the sha256 of its files' names and contents."""
    from ...io import sha256_text

    return sha256_text(json.dumps({str(f.relative_to(path)): sha256_file(f)
                                   for f in sorted(path.rglob("*")) if f.is_file()}))
