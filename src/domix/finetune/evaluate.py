"""Scoring a task model: class probabilities, greedy answers, accuracy / macro-F1 / per-class F1."""
from __future__ import annotations

import torch

from ..data.tasks import encode_labels, prompt_ids


def classification_metrics(y_true, y_pred, labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    ids = list(range(len(labels)))
    per = f1_score(y_true, y_pred, labels=ids, average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
            "per_class_f1": {labels[i]: float(per[i]) for i in ids},
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(), "labels": labels}


def half_autocast(model):
    """Autocast to the model's half precision when its frozen base is held in bf16/fp16 (its
    trained tensors are fp32): the mixed model then runs as it did in training. A no-op for fp32."""
    import contextlib

    half = next((p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)
    if half is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=half)


@torch.no_grad()
def predict_classify(model, tokenizer, texts, pairs=None, batch_size: int = 32, max_len: int = 128):
    """Class probabilities for a list of texts (optional text pairs)."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    with half_autocast(model):
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None, truncation=True,
                            max_length=max_len, padding=True, return_tensors="pt").to(dev)
            out.append(torch.softmax(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                                     .logits.float(), -1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers, one prompt at a time (no padding subtleties)."""
    model.eval()
    dev = next(model.parameters()).device
    answers = []
    with half_autocast(model):
        for p in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, p)], device=dev)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def evaluate_rows(model, tokenizer, task: dict, rows: list[dict], batch_size: int = 32,
                  predictions: bool = False) -> dict:
    """accuracy, macro-F1, per-class F1, confusion matrix (classify); exact match (generate).
    `predictions` (classify): also the gold and predicted class indices, `y_true` and `y_pred`."""
    if task["task"] == "classify":
        labels = task["labels"]
        y = encode_labels(rows, labels, task.get("where", "evaluation data"))
        probs = predict_classify(model, tokenizer, [r["text"] for r in rows],
                                 [r["text_pair"] for r in rows] if any("text_pair" in r for r in rows) else None,
                                 batch_size, task["max_seq_len"])
        pred = probs.argmax(-1).tolist()
        return {"examples": len(rows), **classification_metrics(y, pred, labels),
                **({"y_true": y, "y_pred": pred} if predictions else {})}
    preds = generate_answers(model, tokenizer, [r["prompt"] for r in rows], task.get("max_new_tokens", 32))
    gold = [str(r["answer"]).strip() for r in rows]
    names = sorted(set(gold) | set(preds))
    m = classification_metrics([names.index(g) for g in gold], [names.index(p) for p in preds], names)
    return {"examples": len(rows), "accuracy": m["accuracy"], "exact_match": m["accuracy"],
            "macro_f1": m["macro_f1"], "predictions": preds[:20]}
