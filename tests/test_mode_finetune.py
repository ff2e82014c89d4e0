"""`domix finetune --method mode`: MoDE task models are fine-tuned, saved, reloaded, exported."""
from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_corpus

from domix.cli import main
from domix.finetune import finetune, load_task_model
from domix.mode import load_mode_model
from domix.mode.train import compose, pretrain_expert

DOMS = ["bio", "law", "food"]


def test_mode_finetune_save_load_export(tiny_decoder, corpora, tmp_path):
    lib = tmp_path / "lib"
    for dom in DOMS[:2]:
        pretrain_expert(domain=dom, data=[corpora[dom]], library=str(lib), base=tiny_decoder, max_steps=4,
                        batch_size=4, seq_len=16, progress=False, device="cpu", threads=1)
    rows = [{"text": d, "label": dom} for dom in DOMS for d in make_corpus(dom, 20, seed=9)]
    random.Random(0).shuffle(rows)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:45]))
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows[45:]))
    out = tmp_path / "task"
    m = finetune(method="mode", library=str(lib), base=tiny_decoder, train=str(tmp_path / "train.jsonl"),
                 eval=str(tmp_path / "dev.jsonl"), out=str(out), epochs=4, batch_size=8, lr=5e-3, progress=False,
                 device="cpu", threads=1, freeze_experts=True, gate_context="mean", gate_form="routed")
    assert m["method"] == "mode" and m["trainable_params"] < m["total_params"]
    model, tok, spec = load_task_model(out, device="cpu")
    # under routed gates each expert's own gate is a gate: with trained experts it takes the gate rate
    from domix.finetune.methods import Mode

    names = [n for n, _ in model.named_parameters() if n.startswith("domix_mode.")]
    own = [n for n in names if ".own." in n]
    assert own and all(Mode().mixing(n) for n in own)
    assert not any(Mode().mixing(n) for n in names if ".experts." in n or ".out." in n)
    assert spec["mode_layout"]["experts"] == ["bio", "law"] and spec["mode_layout"]["gate_context"] == "mean"
    assert spec["mode_layout"]["gate_form"] == "routed" and model.domix_mode.gate_form == "routed"
    enc = tok(["court judge appeal", "bake dough salt"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
    # frozen experts are still part of the task model: they equal the library's
    from domix.library import Library

    lib_law = Library(lib).get("law").tensors()
    mode = model.domix_mode
    for b, blk in enumerate(mode.blocks):
        prefix = f"blocks.{b}.layers."
        for k, v in blk.experts[1].state_dict().items():  # expert 1 = law
            assert torch.equal(v, lib_law[prefix + k]), k
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "exp"), "--format", "merged"]) == 0
    exported, _, _ = load_mode_model(tmp_path / "exp" / "mode", head="classify", num_labels=3,
                                     id2label={i: l for i, l in enumerate(spec["labels"])})
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(**enc).logits, ref, rtol=1e-5, atol=1e-5)
    # a composed model keeps its own gates: a different --gate-context for it is refused before training
    compose(library=str(lib), out=str(tmp_path / "composed"), max_steps=1, batch_size=4, seq_len=16, progress=False,
            device="cpu", threads=1)
    with pytest.raises(ValueError, match="--gate-context mean is for fresh gates"):
        finetune(method="mode", library=str(lib), from_composed=str(tmp_path / "composed"), base=tiny_decoder,
                 train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "dev.jsonl"), out=str(tmp_path / "x"),
                 epochs=1, batch_size=8, progress=False, device="cpu", threads=1, gate_context="mean")
    with pytest.raises(ValueError, match="--gate-form routed is for fresh gates.*'softmax'"):
        finetune(method="mode", library=str(lib), from_composed=str(tmp_path / "composed"), base=tiny_decoder,
                 train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "dev.jsonl"), out=str(tmp_path / "x"),
                 epochs=1, batch_size=8, progress=False, device="cpu", threads=1, gate_form="routed")
    assert not (tmp_path / "x").exists()
