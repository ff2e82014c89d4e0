"""Language-modelling objectives shared by stage 1, `eval-lm` and the benchmark."""
from __future__ import annotations

import math

import torch


def lm_collator(tokenizer, objective: str):
    """Masked-LM (15%, 80/10/10 — transformers' collator) or next-token LM on packed blocks."""
    from transformers import DataCollatorForLanguageModeling

    if objective == "mlm" and tokenizer.mask_token is None:
        raise ValueError("the masked-LM objective needs a tokenizer with a mask token")
    if objective == "mlm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)
    return NextTokenCollator(tokenizer)


class NextTokenCollator:
    """Labels for next-token LM: every real token is a target, padding (by the attention mask)
    is not. transformers' collator masks every token equal to the pad id instead; most decoders
    pad with their EOS, so the EOS that ends each packed document would never be learned."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict]) -> dict:
        batch = self.tokenizer.pad([{"input_ids": f["input_ids"]} for f in features], return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, a chunk of tokens at a time.

    The full logits (tokens x vocabulary: 200 MB for 8 x 128 tokens of a 49k vocabulary in fp32,
    several copies of it during backward) never exist: each chunk's logits are made, turned into
    the loss and into the gradient for `hidden` (softmax - onehot) @ weight, and dropped. The same
    FLOPs as logits + cross-entropy + their backward; `weight` is frozen (no gradient for it)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, chunk):
        with torch.autocast(hidden.device.type, enabled=False):  # every dtype below is explicit
            return _LinearCrossEntropy._forward(ctx, hidden, weight, labels, divisor, chunk)

    @staticmethod
    def _forward(ctx, hidden, weight, labels, divisor, chunk):
        want_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden) if want_grad else None
        weight = weight.to(hidden.dtype)  # both products in the hidden states' precision (bf16 stays fast)
        for s in range(0, hidden.shape[0], chunk):
            y = labels[s:s + chunk]
            keep = y != -100
            if not keep.any():
                continue
            logits = (hidden[s:s + chunk] @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(len(y), device=y.device)
            safe = y.clamp(min=0)
            total += ((lse - logits[rows, safe]) * keep).sum()
            if want_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # in place: one chunk-sized buffer
                probs[rows, safe] -= 1.0
                probs *= keep[:, None]
                grad[s:s + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad / divisor if want_grad else None)
        return total / divisor

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g if grad is not None else None), None, None, None, None


def _plain_head(model):
    """(causal LM, its head) when the logits are just `head(decoder(x))` — a bias-free linear head
    and no logit scaling or soft-capping — else None. Sees through a PEFT wrapper."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    cfg = causal.config
    plain = (type(head) is torch.nn.Linear and head.bias is None and hasattr(causal, "get_decoder")
             and not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling",
                                                         "output_multiplier_scale")))
    return (causal, head) if plain else None


def next_token_pairs(hidden, labels):
    """Decoder states [B, T, d] and labels [B, T] -> the states and the tokens they predict (shifted
    by one), flattened."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1).to(hidden.device)


def _next_token_hidden(causal, input_ids, labels, attention_mask=None):
    """The decoder's final hidden states and the labels they predict (shifted by one), flattened."""
    hidden = causal.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return next_token_pairs(hidden, labels)


def next_token_loss(hidden, labels, weight, num_items_in_batch=None, chunk: int = 256):
    """Mean cross-entropy of the flattened states `hidden` through the frozen head `weight` against
    `labels` (-100 ignored), over the scored tokens or over `num_items_in_batch`, chunk by chunk."""
    n = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
    divisor = torch.as_tensor(n, device=hidden.device, dtype=torch.float32).clamp(min=1)
    return _LinearCrossEntropy.apply(hidden, weight, labels, divisor, chunk)


def _scored_logits(model, ids, labels, objective: str, chunk: int = 256):
    """fp32 logits, targets and the targets' positions in their block (index in the block: for a
    causal LM, how many of the block's tokens precede it) of the scored tokens, a chunk at a time:
    the whole batch's logits over a large vocabulary (and its fp32 copies) would be the largest
    thing in memory."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    plain = _plain_head(model) if objective == "clm" else None
    if plain is not None:
        causal, head = plain
        hidden, labels = _next_token_hidden(causal, ids, labels)
        keep = labels != -100
        hidden, labels, positions = hidden[keep], labels[keep], positions[:, 1:].reshape(-1)[keep]
        weight = head.weight.to(hidden.dtype)
        for s in range(0, len(labels), chunk):
            yield (hidden[s:s + chunk] @ weight.T).float(), labels[s:s + chunk], positions[s:s + chunk]
        return
    logits = model(input_ids=ids).logits
    if objective == "clm":
        logits, labels, positions = logits[:, :-1], labels[:, 1:], positions[:, 1:]
    for row, y, pos in zip(logits, labels, positions):
        keep = y != -100
        yield row[keep].float(), y[keep], pos[keep]


class _ByPosition:
    """Mean token loss per position in the block (`position_loss`: index i, the tokens at index i;
    None where none was scored) — where in a block a model loses, e.g. a MoDE composition in the
    first tokens, before the text has told its domain."""

    def __init__(self):
        self.total, self.count = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)

    def add(self, positions: torch.Tensor, losses: torch.Tensor) -> None:
        pos = positions.reshape(-1).cpu()
        if not len(pos):
            return
        grow = lambda t: torch.nn.functional.pad(t, (0, max(0, int(pos.max()) + 1 - len(t))))  # noqa: E731
        self.total = grow(self.total).index_add_(0, pos, losses.reshape(-1).detach().double().cpu())
        self.count = grow(self.count).index_add_(0, pos, torch.ones(len(pos), dtype=torch.float64))

    def means(self) -> list[float | None]:
        return [round(t / c, 5) if c else None for t, c in zip(self.total.tolist(), self.count.tolist())]


def chunked_lm_loss(model, input_ids, labels, attention_mask=None, num_items_in_batch=None, chunk: int = 256):
    """The next-token LM loss of a causal LM (PEFT-wrapped or not) without materialising its full
    logits — or None when the model's head is not a plain frozen linear layer (then use the
    model's own loss). Equal to transformers' causal-LM loss: labels shifted by one, -100
    ignored, mean over the scored tokens (or over `num_items_in_batch`, the Trainer's count
    under gradient accumulation)."""
    plain = _plain_head(model)
    if plain is None or plain[1].weight.requires_grad:
        return None
    causal, head = plain
    hidden, labels = _next_token_hidden(causal, input_ids, labels, attention_mask)
    return next_token_loss(hidden, labels, head.weight, num_items_in_batch, chunk)


class ChunkedLMLossMixin:
    """For a transformers `Trainer` subclass (set `lm_objective`): next-token LM batches take
    `chunked_lm_loss`, in training and in an evaluation that reads the loss only
    (`prediction_loss_only`); everything else the model's own loss.

    A wrapped model (DDP under `torchrun`) takes its own loss too: the chunked loss calls the
    decoder directly, past the wrapper's forward, where DDP arms its gradient all-reduce; the
    rank's gradients would then never be averaged."""

    lm_objective: str | None = None

    def _chunked_loss(self, model, inputs, num_items_in_batch=None):
        """`chunked_lm_loss` of a batch, or None where the model's own loss applies."""
        if (self.lm_objective != "clm" or "labels" not in inputs or self.label_smoother is not None
                or self.compute_loss_func is not None or self.accelerator.unwrap_model(model) is not model):
            return None
        # the decoder is called directly, not through the (accelerate-wrapped) model.forward that
        # carries the mixed-precision autocast: enter it here, or bf16/fp16 runs compute in fp32
        with self.accelerator.autocast():
            return chunked_lm_loss(model, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"),
                                   num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not return_outputs and (loss := self._chunked_loss(model, inputs, num_items_in_batch)) is not None:
            self.loss_is_scaled_for_ga = num_items_in_batch is not None  # normalised over the whole batch
            return loss
        self.loss_is_scaled_for_ga = None
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if prediction_loss_only:  # the evaluation loss without a batch of full-vocabulary logits
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self._chunked_loss(model, inputs)
            if loss is not None:
                return loss.detach(), None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


@torch.no_grad()
def lm_loss(model, blocks, tokenizer, objective: str, batch_size: int = 8, seed: int = 0,
            progress: bool = False, by_position: bool = False) -> dict:
    """Mean token loss, perplexity and prediction accuracy over packed `blocks` (and with
    `by_position`, `position_loss`: the mean loss at each index of a block, `_ByPosition`).

    MLM masks with a fixed seed, so two models are scored on the same masked positions."""
    from tqdm.auto import tqdm

    collate = lm_collator(tokenizer, objective)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, correct, count, positions = 0.0, 0, 0, _ByPosition()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in tqdm(range(0, len(blocks), batch_size), desc="eval-lm", disable=not progress):
            batch = collate([{"input_ids": x} for x in blocks[i:i + batch_size]["input_ids"]])
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            for sel, tgt, pos in _scored_logits(model, ids, labels, objective):
                nll = torch.nn.functional.cross_entropy(sel, tgt, reduction="none")
                total += nll.sum().item()
                if by_position:
                    positions.add(pos, nll)
                correct += (sel.argmax(-1) == tgt).sum().item()
                count += len(tgt)
    model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to score")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / count,
            "tokens": count, **({"position_loss": positions.means()} if by_position else {})}


def mixture_lm_loss(models: list, blocks, batch_size: int = 8, by_position: bool = False) -> dict:
    """Next-token loss and accuracy of a Bayesian mixture of causal LMs on packed `blocks`: token t
    is predicted by `sum_j w_j(t) p_j(. | x_<t)`, where `w(t)` is the posterior over the models
    given the block's tokens before t under a uniform prior — the ensemble of domain experts of
    Branch-Train-Merge (Li et al. 2022, arXiv 2208.03306) with its posterior from the text so far.
    Each model runs the whole text, so it costs one forward pass per model; `bench quality` scores
    it beside a MoDE composition as what mixing the experts' predictions, not their hidden states,
    reaches without being told the domain. `by_position`: as in `lm_loss`."""
    ids_all = torch.tensor(blocks["input_ids"]).to(next(models[0].parameters()).device)
    for m in models:
        m.eval()
    total, correct, count, positions = 0.0, 0, 0, _ByPosition()
    with torch.no_grad():
        for i in range(0, len(ids_all), batch_size):
            ids = ids_all[i:i + batch_size]
            target = ids[:, 1:]
            logp = torch.stack([torch.log_softmax(m(input_ids=ids).logits[:, :-1].float(), -1) for m in models])
            own = logp.gather(-1, target[None, ..., None].expand(len(models), -1, -1, 1)).squeeze(-1)
            prior = torch.log_softmax(own.cumsum(-1) - own, 0)  # log w_j(t): the block so far, uniform prior
            mix = torch.logsumexp(prior[..., None] + logp, 0)  # [batch, tokens, vocab]
            nll = -mix.gather(-1, target[..., None]).squeeze(-1)
            total += nll.sum().item()
            if by_position:
                positions.add(torch.arange(1, ids.shape[1], device=ids.device).expand_as(target), nll)
            correct += (mix.argmax(-1) == target).sum().item()
            count += target.numel()
    if count == 0:
        raise ValueError("no tokens to score")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / count, "tokens": count,
            **({"position_loss": positions.means()} if by_position else {})}
