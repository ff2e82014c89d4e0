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
