"""The chunked next-token loss of stage-1 training equals transformers' own causal-LM loss."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def peft_decoder(tiny_decoder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def _batch(model, pad: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, model.config.vocab_size, (3, 11), generator=g)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    if pad:
        labels[1, 7:] = -100
        mask[1, 7:] = 0
    return ids, labels, mask


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("chunk", [4, 256])  # several chunks (one of them partly ignored), and one
def test_chunked_loss_and_gradients_equal_the_models_own(peft_decoder, pad, chunk):
    from domix.lm import chunked_lm_loss

    ids, labels, mask = _batch(peft_decoder, pad)
    ref = peft_decoder(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in peft_decoder.named_parameters() if p.requires_grad}
    peft_decoder.zero_grad()
    ours = chunked_lm_loss(peft_decoder, ids, labels, mask, chunk=chunk)
    ours.backward()
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours.item(), ref.item())
    assert ref_grads and all(torch.allclose(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6)
                             for n, p in peft_decoder.named_parameters() if p.requires_grad)


def test_num_items_in_batch_is_the_divisor(peft_decoder):
    from domix.lm import chunked_lm_loss

    ids, labels, mask = _batch(peft_decoder, pad=False)
    mean = chunked_lm_loss(peft_decoder, ids, labels, mask)
    scored = (labels[:, 1:] != -100).sum()
    summed = chunked_lm_loss(peft_decoder, ids, labels, mask, num_items_in_batch=2 * scored)
    assert torch.allclose(summed, mean / 2)


def test_a_trainable_head_falls_back_to_the_models_loss(tiny_decoder):
    from transformers import AutoModelForCausalLM

    from domix.lm import chunked_lm_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_decoder)  # every weight trainable, the head too
    ids, labels, mask = _batch(model, pad=False)
    assert chunked_lm_loss(model, ids, labels, mask) is None


def test_evaluation_reads_the_chunked_loss_without_gathering_logits(peft_decoder, tmp_path, monkeypatch):
    """A generate fine-tuning's periodic evaluation: the loss equals the model's own, and no batch of
    full-vocabulary logits is computed or kept (it was the run's peak memory)."""
    from datasets import Dataset

    from domix.finetune.config import FinetuneConfig
    from domix.lm import _plain_head
    from domix.training import build_trainer

    ids, labels, mask = _batch(peft_decoder, pad=True)
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(), "attention_mask": mask.tolist()})
    collate = lambda b: {k: torch.tensor([r[k] for r in b]) for k in b[0]}  # noqa: E731
    opts = FinetuneConfig(train="x", eval="x", out=str(tmp_path / "m"), library=None, progress=False)
    with torch.no_grad():
        ref = peft_decoder(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    head = _plain_head(peft_decoder)[1]
    full_logits = []
    head.register_forward_hook(lambda m, a, out: full_logits.append(out.shape))
    scores = {}
    for objective in ("clm", None):
        trainer = build_trainer(peft_decoder, opts, work=tmp_path / str(objective), train_dataset=rows,
                                data_collator=collate, steps=1, eval_dataset=rows, eval_steps=1, lm_objective=objective,
                                logs=False)
        full_logits.clear()
        scores[objective] = trainer.evaluate()["eval_loss"]
        assert trainer.args.prediction_loss_only
        assert bool(full_logits) == (objective is None)  # the chunked loss never runs the head on the batch
    assert scores["clm"] == pytest.approx(ref, rel=1e-5) and scores[None] == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_lm_loss_in_chunks_equals_the_whole_batch(objective, tiny_decoder, tiny_encoder):
    """`lm_loss` scores a chunk of tokens at a time; the totals equal scoring the whole logits."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from domix.lm import lm_collator, lm_loss
    from domix.models import load_tokenizer

    base = tiny_decoder if objective == "clm" else tiny_encoder
    model = (AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM).from_pretrained(base).eval()
    tok = load_tokenizer(base)
    g = torch.Generator().manual_seed(2)
    from datasets import Dataset

    ids = torch.randint(5, model.config.vocab_size, (6, 200), generator=g).tolist()  # several chunks of 256 tokens
    blocks = Dataset.from_dict({"input_ids": ids})
    got = lm_loss(model, blocks, tok, objective, batch_size=3, seed=0)
    torch.manual_seed(0)  # lm_loss masks (MLM) under seed 0
    batch = lm_collator(tok, objective)([{"input_ids": x} for x in ids[:3]])
    batch2 = lm_collator(tok, objective)([{"input_ids": x} for x in ids[3:]])
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for b in (batch, batch2):
            logits, labels = model(input_ids=b["input_ids"]).logits, b["labels"]
            if objective == "clm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            correct += (logits[keep].argmax(-1) == labels[keep]).sum().item()
            count += int(keep.sum())
    assert got["tokens"] == count and got["accuracy"] == pytest.approx(correct / count)
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert "position_loss" not in got  # only when asked
    # by position: each index's mean over the blocks; the indices' means weighted by their tokens are the loss
    pos = lm_loss(model, blocks, tok, objective, batch_size=3, seed=0, by_position=True)
    assert pos["loss"] == got["loss"] and len(pos["position_loss"]) == 200
    if objective == "clm":  # a block's first token is never predicted; each later index once per block
        assert pos["position_loss"][0] is None
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ids)).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.tensor(ids)[:, 1:], reduction="none")
        assert pos["position_loss"][1:] == pytest.approx(nll.mean(0).tolist(), abs=1e-4)
    else:  # masked positions: some indices are never masked
        counts = torch.zeros(200)
        for b in (batch, batch2):
            counts += (b["labels"] != -100).sum(0)
        assert [v is None for v in pos["position_loss"]] == (counts == 0).tolist()
        mean = sum(v * c for v, c in zip(pos["position_loss"], counts.tolist()) if v is not None) / counts.sum()
        assert mean.item() == pytest.approx(got["loss"], rel=1e-4)


def test_the_bayesian_mixture_is_the_average_of_the_models_block_likelihoods(tiny_decoder):
    """`mixture_lm_loss` predicts each token by the models' posterior on the block so far, so by the
    chain rule a block's total loss is -log(mean_j p_j(block)); a mixture of one model and its copy
    is that model; the mixture is never worse than its best model by more than log(M) per block."""
    import math

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from domix.lm import lm_collator, lm_loss, mixture_lm_loss
    from domix.models import load_tokenizer

    tok = load_tokenizer(tiny_decoder)
    a = AutoModelForCausalLM.from_pretrained(tiny_decoder).eval()
    b = AutoModelForCausalLM.from_pretrained(tiny_decoder).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.5 * torch.randn_like(p))  # another model of the same vocabulary
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, a.config.vocab_size, (5, 24), generator=g)
    blocks = Dataset.from_dict({"input_ids": ids.tolist()})

    def block_nll(model):  # each block's summed next-token loss, as lm_loss scores it
        batch = lm_collator(tok, "clm")([{"input_ids": x} for x in ids.tolist()])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:],
                                                 reduction="none").sum(-1)

    got = mixture_lm_loss([a, b], blocks, batch_size=2)
    nll = torch.stack([block_nll(a), block_nll(b)])  # [models, blocks]
    expect = -(torch.logsumexp(-nll, 0) - math.log(2)).sum().item() / (ids.shape[0] * (ids.shape[1] - 1))
    assert got["tokens"] == ids.shape[0] * (ids.shape[1] - 1)
    assert got["loss"] == pytest.approx(expect, abs=1e-4)
    bound = (nll.min(0).values + math.log(2)).sum().item() / got["tokens"]  # the best model per block, + log M
    assert got["loss"] <= bound + 1e-5
    same = mixture_lm_loss([a, a], blocks, batch_size=3)
    alone = lm_loss(a, blocks, tok, "clm", batch_size=3)
    assert same["loss"] == pytest.approx(alone["loss"], abs=1e-5) and same["accuracy"] == alone["accuracy"]
    # by position: a mixture of a model with itself is that model at every index of the block
    same = mixture_lm_loss([a, a], blocks, batch_size=3, by_position=True)["position_loss"]
    alone = lm_loss(a, blocks, tok, "clm", batch_size=3, by_position=True)["position_loss"]
    assert same[0] is None and alone[0] is None and len(same) == len(alone) == ids.shape[1]
    assert same[1:] == pytest.approx(alone[1:], abs=1e-4)
