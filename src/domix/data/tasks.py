"""End-task data: classification JSONL (`text`, `label`, optional `text_pair`) and
instruction JSONL (`prompt`, `answer`), tokenised for fine-tuning."""
from __future__ import annotations

import json
from pathlib import Path


class TaskDataError(ValueError):
    """A task file is missing, empty, lacks a field, or has a label the model does not know."""


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"task file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskDataError(f"task file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}:{i}: not a JSON object with fields {list(required)}")
        missing = [k for k in required if k not in row]
        if missing:
            raise TaskDataError(f"{path}:{i}: missing field(s) {missing}")
        rows.append(row)
    if not rows:
        raise TaskDataError(f"task file {path} has no examples")
    return rows


def label_names(rows: list[dict]) -> list[str]:
    return sorted({str(r["label"]) for r in rows})


def encode_labels(rows: list[dict], labels: list[str], where: str) -> list[int]:
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({str(r["label"]) for r in rows} - index.keys())
    if unknown:
        raise TaskDataError(f"{where}: label(s) {unknown} are not known to the model (known: {labels})")
    return [index[str(r["label"])] for r in rows]


def classify_dataset(rows: list[dict], tokenizer, labels: list[str], max_len: int, where: str):
    import datasets

    y = encode_labels(rows, labels, where)
    pair = [r.get("text_pair") for r in rows] if any("text_pair" in r for r in rows) else None
    enc = tokenizer([r["text"] for r in rows], pair, truncation=True, max_length=max_len)
    return datasets.Dataset.from_dict({**{k: enc[k] for k in ("input_ids", "attention_mask")}, "labels": y})


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def generate_dataset(rows: list[dict], tokenizer, max_len: int):
    """prompt + answer + EOS; the loss sees only the answer tokens."""
    import datasets

    ids, labels = [], []
    for r in rows:
        p = prompt_ids(tokenizer, r["prompt"])
        a = tokenizer(" " + str(r["answer"]).strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        x = (p + a)[-max_len:]
        ids.append(x)
        labels.append(([-100] * len(p) + a)[-max_len:])
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                                       "labels": labels})


def pad_collator(tokenizer):
    """Right-pad input_ids/attention_mask with the pad id and labels (lists) with -100."""
    import torch

    def collate(batch):
        n = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": torch.tensor([b["input_ids"] + [tokenizer.pad_token_id] * (n - len(b["input_ids"]))
                                          for b in batch]),
               "attention_mask": torch.tensor([b["attention_mask"] + [0] * (n - len(b["attention_mask"]))
                                               for b in batch])}
        labs = [b["labels"] for b in batch]
        out["labels"] = torch.tensor([x + [-100] * (n - len(x)) for x in labs] if isinstance(labs[0], list) else labs)
        return out

    return collate
