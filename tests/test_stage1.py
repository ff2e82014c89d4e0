"""Stage 1: domain modules, the library, pretrain-all executors, eval-lm, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Stop, interrupt_at, make_corpus
from safetensors.torch import load_file

from domix import Library, LibraryError, pretrain
from domix.cli import main
from domix.library.pretrain_all import load_config, pretrain_all

FAST = dict(max_steps=12, batch_size=4, seq_len=16, lr=5e-3, progress=False, device="cpu", threads=1)


def adapter(lib, name) -> dict:
    return load_file(str(Path(lib) / name / "adapter_model.safetensors"))


class Capture:
    """A Trainer callback that keeps the trained model at the end of training."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kw):
                outer.model = model

        self.cb = _CB()


@pytest.mark.parametrize("kind", ["tiny_decoder", "tiny_encoder"])
def test_pretrain_trains_only_lora_and_reloads_with_peft(kind, request, corpora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    base = request.getfixturevalue(kind)
    auto = AutoModelForCausalLM if kind == "tiny_decoder" else AutoModelForMaskedLM
    before = {k: v.clone() for k, v in auto.from_pretrained(base).state_dict().items()}
    cap = Capture()
    meta = pretrain(domain="bio", data=[corpora["bio"]], library=str(tmp_path), base=base,
                    callbacks=[cap.cb], **{**FAST, "max_steps": 40, "lr": 2e-2})
    assert meta["objective"] == ("clm" if kind == "tiny_decoder" else "mlm")
    # base weights bitwise unchanged; every trained tensor is a LoRA tensor
    trained = cap.model
    for name, p in trained.named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad, name
    merged_free = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                   for k, v in trained.state_dict().items() if "lora_" not in k}
    for k, v in before.items():
        assert torch.equal(merged_free[k], v), k
    assert all("lora_" in k for k in adapter(tmp_path, "bio"))
    # the loss falls on a repetitive corpus
    hist = [h["loss"] for h in meta["loss_history"]]
    assert hist[-1] < hist[0] - 0.05, hist
    # reload with plain PEFT: identical logits
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    trained.eval()
    with torch.no_grad():
        ref = trained(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(auto.from_pretrained(base), str(tmp_path / "bio")).eval()
        assert torch.equal(reloaded(input_ids=ids).logits, ref)
    # the library sees a complete module with the documented metadata
    m = Library(tmp_path).get("bio").meta
    for key in ("domain", "base", "base_fingerprint", "objective", "rank", "alpha", "targets", "seed", "steps",
                "tokens", "train_loss", "heldout_loss", "wall_time_s", "versions"):
        assert key in m, key
    assert m["heldout_documents"] == 3 and m["heldout_loss"] > 0
    assert not list(tmp_path.glob(".bio*")), "staging directories left behind"


def test_module_seed_depends_on_name_not_position(tiny_decoder, corpora, tmp_path):
    a = pretrain(domain="x", data=[corpora["bio"]], library=str(tmp_path / "l1"), base=tiny_decoder, **FAST)
    b = pretrain(domain="y", data=[corpora["bio"]], library=str(tmp_path / "l1"), base=tiny_decoder, **FAST)
    assert a["module_seed"] != b["module_seed"]
    c = pretrain(domain="x", data=[corpora["bio"]], library=str(tmp_path / "l2"), base=tiny_decoder, **FAST)
    ta, tc = adapter(tmp_path / "l1", "x"), adapter(tmp_path / "l2", "x")
    assert all(torch.equal(ta[k], tc[k]) for k in ta)


@pytest.fixture
def chunked_calls(monkeypatch) -> list[dict]:
    """One entry per call of the chunked next-token loss: whether it gave a loss, and whether it
    ran under bf16 autocast."""
    import domix.lm

    calls, real = [], domix.lm.chunked_lm_loss

    def spy(*a, **kw):
        bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        loss = real(*a, **kw)
        calls.append({"loss": loss is not None, "bf16": bf16})
        return loss

    monkeypatch.setattr(domix.lm, "chunked_lm_loss", spy)
    return calls


def test_chunked_loss_runs_under_the_runs_mixed_precision(tiny_decoder, corpora, tmp_path, chunked_calls):
    """The chunked loss calls the decoder itself, bypassing the autocast that accelerate wraps
    around model.forward: with --dtype bf16 it must still run under bf16 autocast."""
    meta = pretrain(domain="a", data=[corpora["bio"]], library=str(tmp_path / "lib"), base=tiny_decoder,
                    dtype="bf16", **{**FAST, "max_steps": 2})
    assert meta["dtype"] == "bf16" and [c["bf16"] for c in chunked_calls] == [True, True]


def test_gradient_checkpointing_trains_the_same_module(tiny_decoder, corpora, tmp_path, chunked_calls):
    """Recomputing activations in backward changes memory, not the result; both runs take the
    chunked next-token loss (the full logits never exist), with and without checkpointing."""
    plain = pretrain(domain="a", data=[corpora["bio"]], library=str(tmp_path / "l1"), base=tiny_decoder, **FAST)
    from transformers import TrainerCallback

    class Seen(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            self.on = model.get_base_model().is_gradient_checkpointing

    seen = Seen()
    ckpt = pretrain(domain="a", data=[corpora["bio"]], library=str(tmp_path / "l2"), base=tiny_decoder,
                    gradient_checkpointing=True, callbacks=[seen], **FAST)
    assert ckpt["gradient_checkpointing"] and not plain["gradient_checkpointing"] and seen.on
    assert [c["loss"] for c in chunked_calls] == [True] * (2 * FAST["max_steps"])  # every step of both runs
    assert ckpt["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    ta, tb = adapter(tmp_path / "l1", "a"), adapter(tmp_path / "l2", "a")
    assert all(torch.allclose(ta[k], tb[k], rtol=1e-4, atol=1e-6) for k in ta)


def test_bf16_holds_the_frozen_base_in_bf16_and_the_module_in_fp32(tiny_decoder, corpora, tmp_path):
    from transformers import TrainerCallback

    class Seen(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            self.dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
            self.trained = {p.dtype for p in model.parameters() if p.requires_grad}

    seen = Seen()
    meta = pretrain(domain="bio", data=[corpora["bio"]], library=str(tmp_path), base=tiny_decoder, dtype="bf16",
                    callbacks=[seen], **FAST)
    assert seen.dtypes == {torch.bfloat16} and seen.trained == {torch.float32}
    tensors = adapter(tmp_path, "bio")
    assert tensors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert meta["heldout_loss"] < meta["base_heldout_loss"]


def _config(tmp_path, base, corpora, names, name="domains.yaml"):
    doc = {"base": base, "defaults": {"max_steps": 6, "batch_size": 4, "seq_len": 16, "lr": 5e-3,
                                      "device": "cpu", "threads": 1},
           "domains": {n: {"data": [corpora[n]]} for n in names}}
    path = tmp_path / name
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def test_pretrain_all_is_order_and_executor_independent(tiny_decoder, corpora, tmp_path):
    lib1, lib2, lib3 = (str(tmp_path / f"lib{i}") for i in (1, 2, 3))
    r1 = pretrain_all(load_config(_config(tmp_path, tiny_decoder, corpora, ["bio", "law", "food"], "a.yaml"), lib1),
                      workers=2, progress=False)
    assert all(r["status"] == "done" for r in r1.values()), r1
    r2 = pretrain_all(load_config(_config(tmp_path, tiny_decoder, corpora, ["food", "bio"], "b.yaml"), lib2),
                      workers=1, progress=False)
    assert all(r["status"] == "done" for r in r2.values()), r2
    for name in ("bio", "food"):
        t1, t2 = adapter(lib1, name), adapter(lib2, name)
        assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1), name
    # complete modules are skipped on a rerun
    again = pretrain_all(load_config(tmp_path / "b.yaml", lib2), workers=1, progress=False)
    assert {r["status"] for r in again.values()} == {"skipped"}
    # Ray (a local instance) gives the same tensors as the local executor
    pytest.importorskip("ray")
    r3 = pretrain_all(load_config(tmp_path / "b.yaml", lib3), executor="ray", progress=False)
    assert all(r["status"] == "done" for r in r3.values()), r3
    for name in ("bio", "food"):
        t1, t3 = adapter(lib1, name), adapter(lib3, name)
        assert all(torch.equal(t1[k], t3[k]) for k in t1), name


def test_a_library_with_full_entries_is_listed_and_rerun(tiny_decoder, corpora, tmp_path, capsys):
    """`full: true` entries (whole checkpoints) are library entries like modules: listed, read,
    and skipped as complete when pretrain-all runs again."""
    path = _config(tmp_path, tiny_decoder, corpora, ["bio", "law"])
    doc = json.loads(path.read_text())
    doc["domains"]["law"]["full"] = True
    doc["domains"]["law"].update(rank=None, alpha=None)
    path.write_text(json.dumps(doc))
    lib = tmp_path / "lib"
    first = pretrain_all(load_config(path, str(lib)), workers=1, progress=False)
    assert {r["status"] for r in first.values()} == {"done"}, first
    assert [(m.name, m.kind) for m in Library(lib).list()] == [("bio", "lora"), ("law", "full")]
    assert Library(lib).get("law").weights_file.name == "model.safetensors"
    again = pretrain_all(load_config(path, str(lib)), workers=1, progress=False)
    assert {r["status"] for r in again.values()} == {"skipped"}
    assert main(["library", "list", str(lib)]) == 0 and "full" in capsys.readouterr().out


def test_pretrain_all_reports_a_failed_domain_and_finishes_the_others(tiny_decoder, corpora, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = _config(tmp_path, tiny_decoder, {**corpora, "law": str(empty)}, ["bio", "law"])
    code = main(["pretrain-all", "--config", str(cfg), "--library", str(tmp_path / "lib"), "--workers", "2"])
    out = capsys.readouterr().out
    assert code == 1
    assert "law" in out and "failed" in out and "empty" in out
    assert Library(tmp_path / "lib").names() == ["bio"]


def test_bad_corpora_are_refused_clearly(tiny_decoder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    odd = tmp_path / "corpus.docx"
    odd.write_text("hello")
    for path, msg in [(empty, "is empty"), (blank, "no non-empty documents"), (odd, "unknown file type")]:
        code = main(["pretrain", "--base", tiny_decoder, "--domain", "d", "--data", str(path),
                     "--library", str(tmp_path / "lib"), "--max-steps", "2", "--device", "cpu"])
        assert code == 2
        assert msg in capsys.readouterr().err
    assert Library(tmp_path / "lib").names() == []


def test_module_from_another_base_is_refused(tiny_decoder, tiny_encoder, corpora, tmp_path, capsys):
    from domix.library.loading import load_with_module

    lib = tmp_path / "lib"
    pretrain(domain="bio", data=[corpora["bio"]], library=str(lib), base=tiny_encoder, **FAST)
    code = main(["library", "check", str(lib), "--base", tiny_decoder])
    out = capsys.readouterr().out
    assert code == 1 and "module 'bio'" in out and "fingerprint" in out
    with pytest.raises(LibraryError, match="module 'bio' was trained on base"):
        load_with_module(tiny_decoder, str(lib), "bio")
    assert main(["library", "check", str(lib), "--base", tiny_encoder]) == 0


def test_truncated_module_file_is_named(tiny_decoder, corpora, tmp_path, capsys):
    from domix.library.loading import load_with_module

    lib = tmp_path / "lib"
    pretrain(domain="bio", data=[corpora["bio"]], library=str(lib), base=tiny_decoder, **FAST)
    f = lib / "bio" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LibraryError, match="module 'bio'.*truncated"):
        load_with_module(tiny_decoder, str(lib), "bio")
    assert main(["library", "check", str(lib), "--base", tiny_decoder]) == 1
    assert "module 'bio'" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_same_module(tiny_decoder, corpora, tmp_path):

    opts = {**FAST, "save_steps": 5}
    pretrain(domain="bio", data=[corpora["bio"]], library=str(tmp_path / "ref"), base=tiny_decoder, **opts)
    with pytest.raises(Stop):
        pretrain(domain="bio", data=[corpora["bio"]], library=str(tmp_path / "run"), base=tiny_decoder,
                 callbacks=[interrupt_at(7)], **opts)
    assert "bio" not in Library(tmp_path / "run"), "an interrupted run must not leave a module"
    meta = pretrain(domain="bio", data=[corpora["bio"]], library=str(tmp_path / "run"), base=tiny_decoder,
                    resume=True, **opts)
    assert meta["resumed_from"] == "checkpoint-5"
    ref, run = adapter(tmp_path / "ref", "bio"), adapter(tmp_path / "run", "bio")
    for k in ref:
        torch.testing.assert_close(run[k], ref[k], rtol=1e-5, atol=1e-6)
    # --resume on the finished module reports it complete and leaves it alone; without --resume or
    # --overwrite the run is refused
    weights = tmp_path / "run" / "bio" / "adapter_model.safetensors"
    before = (weights.read_bytes(), weights.stat().st_mtime_ns)
    again = pretrain(domain="bio", data=[corpora["bio"]], library=str(tmp_path / "run"), base=tiny_decoder,
                     resume=True, callbacks=[interrupt_at(1)], **opts)  # any training step would stop it
    assert again == json.loads((tmp_path / "run" / "bio" / "domix.json").read_text())
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == before
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        pretrain(domain="bio", data=[corpora["bio"]], library=str(tmp_path / "run"), base=tiny_decoder, **opts)


def test_cli_list_show_eval_lm(tiny_decoder, corpora, tmp_path, capsys):
    lib = str(tmp_path / "lib")
    assert main(["pretrain", "--base", tiny_decoder, "--domain", "law", "--data", corpora["law"], "--library", lib,
                 "--max-steps", "30", "--batch-size", "4", "--seq-len", "16", "--lr", "2e-2",
                 "--device", "cpu", "--json"]) == 0
    # --json: stdout is one JSON document (the Trainer's log lines go to stderr)
    assert json.loads(capsys.readouterr().out)["domain"] == "law"
    assert main(["library", "list", lib, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["law"] and rows[0]["kind"] == "lora"
    assert main(["library", "show", lib, "law"]) == 0
    assert json.loads(capsys.readouterr().out)["domain"] == "law"
    scores = {}
    for extra in ([], ["--library", lib, "--module", "law"]):
        assert main(["eval-lm", "--base", tiny_decoder, "--data", corpora["law"], "--seq-len", "16",
                     "--device", "cpu", "--json", *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        assert {"loss", "perplexity"} <= out.keys()
        scores[bool(extra)] = out["loss"]
    assert scores[True] < scores[False], "the module should lower the loss on its own domain"
    # an existing module is not silently replaced
    assert main(["pretrain", "--base", tiny_decoder, "--domain", "law", "--data", corpora["law"],
                 "--library", lib, "--max-steps", "2", "--device", "cpu"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_end_of_document_is_a_target_when_pad_is_eos(tiny_decoder, corpora, tmp_path):
    """Most decoders pad with their EOS (the default model does): the EOS that ends each packed
    document must still be a next-token target, and only real padding is left out."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from domix.data.corpus import pack
    from domix.lm import lm_collator

    tok = AutoTokenizer.from_pretrained(tiny_decoder)
    tok.pad_token = tok.eos_token
    docs = Dataset.from_dict({"text": make_corpus("bio", 12, seed=3)})
    blocks = pack(docs, tok, 16)
    batch = lm_collator(tok, "clm")([{"input_ids": x} for x in blocks["input_ids"][:4]])
    eos = batch["input_ids"] == tok.eos_token_id
    assert eos.any() and (batch["labels"][eos] == tok.eos_token_id).all()
    assert (batch["labels"] != -100).all()  # packed blocks: every token is a target
    ragged = lm_collator(tok, "clm")([{"input_ids": [5, 6, tok.eos_token_id]}, {"input_ids": [7]}])
    assert ragged["labels"].tolist() == [[5, 6, tok.eos_token_id], [7, -100, -100]]
