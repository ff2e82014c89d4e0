"""The benchmark's data: deterministic subsets of the benchmark data (`domix fetch data`) sized
by the settings, written once under `<out>/data-<key>/`."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from ...data.benchmark import DOMAINS, GENERAL
from ...io import atomic_dir, sha256_file, write_json
from .plan import _key


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


def data_tokens(settings: dict) -> int:
    """Training tokens per domain the corpora must hold: the pre-training budget, or with a DAP
    curve its largest budget (smaller budgets train fewer steps on the same text)."""
    pre = settings["pretrain"]
    curve = (settings.get("dap_curve") or {}).get("tokens")
    return max(curve) if curve else pre["steps"] * pre["batch_size"] * pre["seq_len"]


def prepare_data(root: Path, out: Path, settings: dict, progress: bool = True) -> dict:
    """Deterministic subsets of the benchmark data under out/data-<key>/: per domain a training
    text of the pre-training budget (plus the 5% pretrain holds out itself) and a disjoint
    held-out text for LM loss; a general-text held-out set; the task splits, subsampled."""
    from ...models import load_tokenizer

    root = Path(root)
    pre, ft, lm = settings["pretrain"], settings["finetune"], settings["lm_eval"]
    domains = settings["domains"]
    files = [root / "corpora" / f"{d}.txt" for d in [*domains, GENERAL]]
    files += [root / "tasks" / DOMAINS[d] / f"{s}.jsonl" for d in domains for s in ("train", "dev", "test")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"benchmark data under {root} lacks {missing[:3]} (build it: domix fetch data)")
    spec = {"files": {str(f.relative_to(root)): sha256_file(f) for f in files}, "domains": domains,
            "tokens": data_tokens(settings), "seq_len": pre["seq_len"],
            "heldout_blocks": lm["blocks"], "sizes": {k: ft[k] for k in ("train", "dev", "test")},
            "tokenizer": settings["base_id"], "version": 2}
    dest = out / f"data-{_key(spec)}"
    if (dest / "data.json").is_file():
        return json.loads((dest / "data.json").read_text())
    tok = load_tokenizer(settings["base"])
    # pretrain() holds 5% of the documents out; the rest must fill `steps` batches once
    train_target = math.ceil(spec["tokens"] / 0.95 * 1.05)
    held_target = math.ceil(lm["blocks"] * pre["seq_len"] * 1.1)
    info = {"root": str(root), "key": dest.name, "corpora": {}, "heldout": {}, "tasks": {}}
    with atomic_dir(dest, overwrite=True) as stage:
        for d in [*domains, GENERAL]:
            docs = [l for l in (root / "corpora" / f"{d}.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
            order = list(range(len(docs)))
            random.Random(f"quality/{d}").shuffle(order)
            # held-out documents come first and are capped in length, so a few long pages
            # (news, Wikipedia) cannot make up the whole held-out set
            held, nxt, held_tokens = _take_tokens(docs, order, 0, held_target, tok, cap_words=2 * pre["seq_len"])
            (stage / "heldout").mkdir(exist_ok=True)
            (stage / "heldout" / f"{d}.txt").write_text("\n".join(held) + "\n", encoding="utf-8")
            info["heldout"][d] = {"path": str(dest / "heldout" / f"{d}.txt"), "documents": len(held),
                                  "tokens": held_tokens}
            if d == GENERAL:
                continue
            train, _, train_tokens = _take_tokens(docs, order, nxt, train_target, tok)
            (stage / "corpora").mkdir(exist_ok=True)
            (stage / "corpora" / f"{d}.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
            info["corpora"][d] = {"path": str(dest / "corpora" / f"{d}.txt"), "documents": len(train),
                                  "tokens": train_tokens, "of": len(docs)}
        for d in domains:
            task = DOMAINS[d]
            info["tasks"][task] = {"domain": d}
            for split in ("train", "dev", "test"):
                src = root / "tasks" / task / f"{split}.jsonl"
                rows = [json.loads(l) for l in src.read_text(encoding="utf-8").splitlines() if l.strip()]
                sub = _stratified(rows, ft[split], random.Random(f"quality/{task}/{split}"))
                if split != "train":  # scored in batches: similar lengths together pad less
                    sub.sort(key=lambda r: len(r["text"]))
                (stage / "tasks" / task).mkdir(parents=True, exist_ok=True)
                (stage / "tasks" / task / f"{split}.jsonl").write_text(
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sub), encoding="utf-8")
                info["tasks"][task][split] = {"path": str(dest / "tasks" / task / f"{split}.jsonl"),
                                              "examples": len(sub), "of": len(rows)}
            info["tasks"][task]["labels"] = sorted({str(json.loads(l)["label"]) for l in
                                                    (stage / "tasks" / task / "train.jsonl").read_text().splitlines()})
        write_json(stage / "data.json", info)
    return info

