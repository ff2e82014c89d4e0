"""Language-modelling objectives shared by stage 1, `eval-lm` and the benchmark."""
from __future__ import annotations

import math

import torch


def lm_collator(tokenizer, objective: str):
    """Masked-LM (15%, 80/10/10 — transformers' collator) or next-token LM."""
    from transformers import DataCollatorForLanguageModeling

    if objective == "mlm" and tokenizer.mask_token is None:
        raise ValueError("the masked-LM objective needs a tokenizer with a mask token")
    return DataCollatorForLanguageModeling(tokenizer, mlm=objective == "mlm", mlm_probability=0.15)


@torch.no_grad()
def lm_loss(model, blocks, tokenizer, objective: str, batch_size: int = 8, seed: int = 0,
            progress: bool = False) -> dict:
    """Mean token loss, perplexity and prediction accuracy over packed `blocks`.

    MLM masks with a fixed seed, so two models are scored on the same masked positions."""
    from tqdm.auto import tqdm

    collate = lm_collator(tokenizer, objective)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in tqdm(range(0, len(blocks), batch_size), desc="eval-lm", disable=not progress):
            batch = collate([{"input_ids": x} for x in blocks[i:i + batch_size]["input_ids"]])
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            logits = model(input_ids=ids).logits.float()
            if objective == "clm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            keep = labels != -100
            sel, tgt = logits[keep], labels[keep]
            total += torch.nn.functional.cross_entropy(sel, tgt, reduction="sum").item()
            correct += (sel.argmax(-1) == tgt).sum().item()
            count += int(keep.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to score")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / count,
            "tokens": count}


def load_with_module(base: str, library: str, module: str, objective: str = "auto", dtype: str = "fp32",
                     trust_remote_code: bool = False):
    """The base LM with one library module attached (refused if trained on another base)."""
    from peft import PeftModel

    from .models import fingerprint, load_model
    from .modules.library import Library

    model, objective = load_model(base, head="lm", objective=objective, dtype=dtype,
                                  trust_remote_code=trust_remote_code)
    mod = Library(library).get(module)
    mod.check_base(fingerprint(model))
    mod.tensors()  # a truncated or corrupt file fails here with the module's name
    return PeftModel.from_pretrained(model, str(mod.path)), objective


def eval_lm(base: str, data, library: str | None = None, module: str | None = None, seq_len: int = 128,
            batch_size: int = 8, max_blocks: int | None = 64, objective: str = "auto", device: str = "auto",
            text_field: str = "text", seed: int = 0, progress: bool = True) -> dict:
    """Mean token loss and perplexity of the base alone or with one module on a corpus."""
    from .data.corpus import load_documents, pack
    from .models import load_model, load_tokenizer, select_device

    tokenizer = load_tokenizer(base)
    if module:
        if not library:
            raise ValueError("--module needs --library")
        model, objective = load_with_module(base, library, module, objective)
    else:
        model, objective = load_model(base, head="lm", objective=objective)
    model.to(select_device(device))
    blocks = pack(load_documents(data, text_field), tokenizer, seq_len, max_blocks=max_blocks)
    out = lm_loss(model, blocks, tokenizer, objective, batch_size, seed=seed, progress=progress)
    return {"base": base, "module": module, "objective": objective, **out}
