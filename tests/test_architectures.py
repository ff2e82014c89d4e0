"""The pipeline on more architectures than Llama and BERT: tiny randomly initialised Gemma-3
(sliding and full attention layers), Qwen-2 (attention biases), RoBERTa and DistilBERT (other layer
names). Each runs stage 1, the bridge with fine-tuning (classify; generate for decoders) and both
exports, which must give the task model's logits without domix."""
from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import WORDS, _tokenizer, make_corpus

from domix import pretrain
from domix.cli import main
from domix.finetune import finetune, load_task_model
from domix.finetune.evaluate import _cache_name


def _gemma3(path, tok):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return Gemma3ForCausalLM(cfg)


def _qwen2(path, tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def _roberta(path, tok):
    from transformers import RobertaConfig, RobertaForMaskedLM

    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=260, pad_token_id=tok.pad_token_id)
    return RobertaForMaskedLM(cfg)


def _distilbert(path, tok):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    cfg = DistilBertConfig(vocab_size=len(tok), dim=32, hidden_dim=64, n_layers=3, n_heads=4,
                           max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    return DistilBertForMaskedLM(cfg)


ARCHS = {"gemma3": (_gemma3, "llama"), "qwen2": (_qwen2, "llama"), "roberta": (_roberta, "bert"),
         "distilbert": (_distilbert, "bert")}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    build, kind = ARCHS[request.param]
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tok = _tokenizer(path, kind)
    torch.manual_seed(0)
    build(path, tok).save_pretrained(path)
    return request.param, str(path), kind == "llama"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch-data")
    for dom in ("bio", "law"):
        (root / f"{dom}.txt").write_text("\n".join(make_corpus(dom, 40)) + "\n")
    rows = [{"text": d, "label": dom} for dom in ("bio", "law", "food") for d in make_corpus(dom, 16, seed=4)]
    random.Random(0).shuffle(rows)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:36]))
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[36:]))
    gen = [{"prompt": f"domain of: {d[:30]}", "answer": dom} for dom in WORDS for d in make_corpus(dom, 6, seed=2)]
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    return root


def test_stage1_bridge_finetune_and_exports(arch, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    name, base, decoder = arch
    lib = tmp_path / "lib"
    for dom, rank in (("bio", 4), ("law", 2)):
        meta = pretrain(domain=dom, data=[str(data / f"{dom}.txt")], library=str(lib), base=base, rank=rank,
                        alpha=2 * rank, max_steps=3, batch_size=4, seq_len=16, progress=False, device="cpu")
        assert meta["objective"] == ("clm" if decoder else "mlm") and meta["trainable_params"] > 0
    out = tmp_path / "task"
    m = finetune(train=str(data / "train.jsonl"), eval=str(data / "dev.jsonl"), out=str(out), library=str(lib),
                 base=base, epochs=2, batch_size=8, lr=5e-3, progress=False, device="cpu")
    assert m["bridge_blocks"] and m["trainable_params"] < m["total_params"]
    model, tok, _ = load_task_model(out, device="cpu")
    enc = tok(["court judge appeal ruling", "bake the dough with salt"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "merged"), "--format", "merged"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "lora"), "--format", "peft-lora"]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    adapter = PeftModel.from_pretrained(plain, str(tmp_path / "lora")).eval()
    with torch.no_grad():
        for other in (merged(**enc).logits, adapter(**enc).logits):
            assert (torch.linalg.norm(other - ref) / torch.linalg.norm(ref)).item() <= 1e-4, name
    if decoder:
        g = finetune(train=str(data / "gen.jsonl"), eval=str(data / "gen.jsonl"), out=str(tmp_path / "gen"),
                     library=str(lib), base=base, task="generate", epochs=1, batch_size=6, lr=5e-3, progress=False,
                     device="cpu", max_new_tokens=4)
        assert g["task"] == "generate" and g["eval"]["examples"] == 18
        assert main(["export", "--model", str(tmp_path / "gen"), "--out", str(tmp_path / "gen-merged"),
                     "--format", "merged"]) == 0


def test_mode_experts_on_every_architecture(arch):
    """MoDE on each architecture: the exact start, an expert copying the whole backbone with all the
    gate's weight is the backbone again (Gemma-3's sliding/full masks and local/global rotary
    embeddings reach the right expert layers; Qwen-2's biases, RoBERTa's and DistilBERT's layer names),
    decoding with a KV cache longer than Gemma-3's sliding window gives the full forward's logits, and
    the output maps get gradients at step one."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from domix.mode import apply_mode, find_layers, remove_mode

    name, base, decoder = arch
    model = (AutoModelForCausalLM if decoder else AutoModelForMaskedLM).from_pretrained(base).eval()
    ids = torch.tensor([[3, 5, 7, 9, 11, 13, 6, 8, 4, 6, 8, 10]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        mode = apply_mode(model, ["a", "b"])
        assert torch.equal(model(input_ids=ids).logits, ref), name
        remove_mode(model)
        mode = apply_mode(model, ["all"], blocks=1, expert_layers=len(find_layers(model)), init="copy")
        mode.blocks[0].out[0].weight.copy_(torch.eye(mode.blocks[0].out[0].weight.shape[0]))
        mode.blocks[0].gate.bias.copy_(torch.tensor([-1e4, 1e4]))
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=1e-5)
        if decoder:
            remove_mode(model)
            mode = apply_mode(model, ["a", "b"], blocks=1, expert_layers=len(find_layers(model)))
            for w in mode.blocks[0].out:
                w.weight.copy_(torch.eye(w.weight.shape[0]) + 0.1 * torch.randn(w.weight.shape))
            full = model(input_ids=ids).logits
            key = _cache_name(model)  # `cache` in newer transformers, `past_key_values` before
            out = model(input_ids=ids[:, :4], use_cache=True)
            steps, cache = [out.logits], getattr(out, key)
            for t in range(4, ids.shape[1]):  # 12 tokens: past Gemma-3's sliding window of 8
                out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{key: cache})
                steps.append(out.logits)
                cache = getattr(out, key)
            torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    remove_mode(model)
    model.train()
    mode = apply_mode(model, ["a", "b"])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(w.weight.grad is not None and w.weight.grad.abs().max() > 0 for blk in mode.blocks for w in blk.out)
