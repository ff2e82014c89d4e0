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


def _left_padded(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(x) for x in seqs)
    ids = torch.tensor([[pad] * (n - len(x)) + x for x in seqs], device=device)
    mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in seqs], device=device)
    return ids, mask


def _by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (less padding), each batch in the original order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [sorted(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
                     max_len: int | None = None) -> list[str]:
    """Greedy answers: prompts of similar length batched, left-padded, decoded with the KV cache
    (`generate`'s default). A prompt longer than `max_len` tokens keeps its last `max_len` (the
    instruction's start and the question's go first, the options and the answer format stay)."""
    model.eval()
    dev = next(model.parameters()).device
    ids = [prompt_ids(tokenizer, p)[-max_len:] if max_len else prompt_ids(tokenizer, p) for p in prompts]
    answers = [""] * len(prompts)
    with half_autocast(model):
        for batch in _by_length([len(x) for x in ids], batch_size):
            x, mask = _left_padded([ids[i] for i in batch], tokenizer.pad_token_id, dev)
            gen = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            for i, row in zip(batch, gen[:, x.shape[1]:]):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return answers


def answer_tokens(tokenizer, answer: str) -> list[int]:
    """An answer's tokens as training sees them after its prompt (`data.tasks.generate_dataset`)."""
    return tokenizer(" " + str(answer).strip(), add_special_tokens=False)["input_ids"]


def _cache_name(model) -> str:
    """The keyword a causal LM takes its KV cache by: `cache` in newer transformers, `past_key_values`
    before (a PEFT wrapper is looked through)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: each row's first real token is position 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def choice_logprobs(model, tokenizer, prompts: list[str], choices: list[list[str]], batch_size: int = 16,
                    max_len: int | None = None) -> list[list[float]]:
    """Each choice's log-likelihood after its prompt, log p(choice tokens | prompt) summed over the
    choice's tokens (lm-evaluation-harness's `acc`). A batch of prompts (left-padded) runs once and its
    KV cache serves every choice in turn (each choice pass appends to the cache, which is then cut
    back to the prompts). A prompt longer than `max_len` minus its longest choice keeps its last
    tokens (cut from the left, never through a choice)."""
    model.eval()
    dev = next(model.parameters()).device
    tails = [[answer_tokens(tokenizer, c) for c in cs] for cs in choices]
    heads = []
    for p, ts in zip(prompts, tails):
        head = prompt_ids(tokenizer, p)
        room = max(1, max_len - max(len(t) for t in ts)) if max_len else len(head)
        heads.append(head[-room:])
    out = [[0.0] * len(cs) for cs in choices]
    pad = tokenizer.pad_token_id
    with half_autocast(model):
        for batch in _by_length([len(h) for h in heads], batch_size):
            x, mask = _left_padded([heads[i] for i in batch], pad, dev)
            pos = _positions(mask)
            first = model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            key = _cache_name(model)
            cache = getattr(first, key)
            first_logp = torch.log_softmax(first.logits[:, -1].float(), -1)  # predicts each choice's first token
            for c in range(max(len(tails[i]) for i in batch)):
                toks = [tails[i][c] if c < len(tails[i]) else [pad] for i in batch]
                n = max(len(t) for t in toks)
                t_ids = torch.tensor([t + [pad] * (n - len(t)) for t in toks], device=dev)
                t_mask = torch.tensor([[1] * len(t) + [0] * (n - len(t)) for t in toks], device=dev)
                t_pos = pos[:, -1:] + 1 + torch.arange(n, device=dev)[None]
                logits = model(input_ids=t_ids, attention_mask=torch.cat([mask, t_mask], 1), position_ids=t_pos,
                               use_cache=True, **{key: cache}).logits
                logp = torch.log_softmax(logits.float(), -1)
                cache.crop(-n)  # back to the prompts for the next choice (a negative crop: in every version)
                for j, i in enumerate(batch):
                    if c < len(tails[i]):
                        t = tails[i][c]
                        score = first_logp[j, t[0]] + sum(logp[j, k - 1, t[k]] for k in range(1, len(t)))
                        out[i][c] = float(score)
    return out


def extract_choice(text: str, choices: list[str]) -> int | None:
    """The option a generated answer names: each choice's last word (solution1, answer3, true), the one
    met first in the text wins (LLM-Adapters' answer extraction); None when none is named."""
    import re

    words = [c.split()[-1].lower() for c in choices]
    m = re.search(r"\b(" + "|".join(map(re.escape, sorted(set(words), key=len, reverse=True))) + r")\b", text.lower())
    return words.index(m.group(1)) if m else None


def choice_metrics(model, tokenizer, rows: list[dict], max_new_tokens: int = 16, batch_size: int = 16,
                   max_len: int | None = None, predictions: bool = False) -> dict:
    """Multiple-choice rows ({"prompt", "answer", "choices"}) scored both ways the field scores them:
    `accuracy` by extracting the option from the greedy answer (an answer naming no option is wrong),
    `accuracy_loglik` by the most likely choice; rows with `cloze` ({"context", "options"}) also
    `accuracy_cloze`, by the most likely option text after the bare question (lm-evaluation-harness's
    cloze `acc`). With `predictions`: `y_true`, `y_pred` (extraction; -1 for none), `y_pred_loglik` (and
    `y_pred_cloze`)."""
    gold = []
    for i, r in enumerate(rows):
        if r["answer"] not in r["choices"]:
            raise ValueError(f"example {i + 1}: its answer {r['answer']!r} is not among its choices")
        gold.append(r["choices"].index(r["answer"]))
    prompts, choices = [r["prompt"] for r in rows], [r["choices"] for r in rows]
    texts = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, max_len)
    by_gen = [extract_choice(t, cs) for t, cs in zip(texts, choices)]
    best = lambda lps: [max(range(len(lp)), key=lp.__getitem__) for lp in lps]  # noqa: E731
    by_ll = best(choice_logprobs(model, tokenizer, prompts, choices, batch_size, max_len))
    by_cloze = None
    if rows and all("cloze" in r for r in rows):  # the options' own texts after the bare question
        by_cloze = best(choice_logprobs(model, tokenizer, [r["cloze"]["context"] for r in rows],
                                        [r["cloze"]["options"] for r in rows], batch_size, max_len))
    n = max(1, len(rows))
    acc = lambda pred: sum(p == g for p, g in zip(pred, gold)) / n  # noqa: E731
    return {"examples": len(rows), "accuracy": acc(by_gen), "accuracy_loglik": acc(by_ll),
            **({"accuracy_cloze": acc(by_cloze)} if by_cloze is not None else {}),
            "answered": sum(p is not None for p in by_gen) / n, "generations": texts[:20],
            **({"y_true": gold, "y_pred": [-1 if p is None else p for p in by_gen], "y_pred_loglik": by_ll,
                **({"y_pred_cloze": by_cloze} if by_cloze is not None else {})} if predictions else {})}


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
    if rows and all("choices" in r for r in rows):  # multiple choice: extraction and log-likelihood
        return choice_metrics(model, tokenizer, rows, task.get("max_new_tokens", 16), batch_size,
                              task.get("max_seq_len"), predictions)
    preds = generate_answers(model, tokenizer, [r["prompt"] for r in rows], task.get("max_new_tokens", 32),
                             batch_size, task.get("max_seq_len"))
    gold = [str(r["answer"]).strip() for r in rows]
    names = sorted(set(gold) | set(preds))
    m = classification_metrics([names.index(g) for g in gold], [names.index(p) for p in preds], names)
    return {"examples": len(rows), "accuracy": m["accuracy"], "exact_match": m["accuracy"],
            "macro_f1": m["macro_f1"], "predictions": preds[:20]}
