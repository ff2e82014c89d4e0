"""`library compress` (SVD re-factorisation of a module to a lower rank) and `library add` (importing
a PEFT LoRA adapter trained elsewhere): exactness, recorded energies, plain-PEFT loading, refusals.

Full rank is tested through `--energy 1.0` (every nonzero singular value kept: the same update),
the path a user has; `--rank` at or above the module's rank is refused as compressing nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli_error
from safetensors.torch import load_file

from domix import Library, LibraryError, pretrain
from domix.cli import main
from domix.library.compress import compress_module
from domix.lora import lora_pairs

IDS = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6]])


@pytest.fixture(scope="module")
def lib(tiny_decoder, corpora, tmp_path_factory):
    """A library with one rank-4 module 'bio', trained once for the whole file."""
    path = tmp_path_factory.mktemp("compress-lib")
    pretrain(domain="bio", data=[corpora["bio"]], library=str(path), base=tiny_decoder, rank=4, alpha=8,
             max_steps=10, batch_size=2, seq_len=16, lr=2e-2, progress=False, device="cpu", threads=1)
    return path


def _copy_lib(lib, tmp_path) -> Path:
    dest = tmp_path / "lib"
    shutil.copytree(lib, dest)
    return dest


def _peft_logits(base: str, adapter) -> torch.Tensor:
    """Logits of `base` with `adapter` loaded by plain PEFT (no domix code)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _deltas(entry) -> dict:
    """{layer: scaling · B A} of a saved adapter, scaling = alpha / r per layer."""
    cfg = json.loads((Path(entry) / "adapter_config.json").read_text())
    out = {}
    for layer, (a, b) in lora_pairs(load_file(str(Path(entry) / "adapter_model.safetensors"))).items():
        r = next((v for k, v in cfg["rank_pattern"].items() if layer.endswith(k)), cfg["r"])
        alpha = next((v for k, v in cfg["alpha_pattern"].items() if layer.endswith(k)), cfg["lora_alpha"])
        assert a.shape[0] == r
        out[layer] = (alpha / r) * (b.double() @ a.double())
    return out


def _snapshot(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))


def test_energy_one_reproduces_the_module(lib, tiny_decoder, tmp_path, capsys):
    lib = _copy_lib(lib, tmp_path)
    assert main(["library", "compress", "--library", str(lib), "--module", "bio", "--energy", "1.0",
                 "--out", "bio-same", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "bio" and out["source_rank"] == 4 and out["requested"] == {"rank": None, "energy": 1.0}
    assert out["energy"] == pytest.approx(1.0, abs=1e-9)
    assert all(v["rank"] <= 4 and v["energy"] == pytest.approx(1.0, abs=1e-9) for v in out["layers"].values())
    # same logits with plain PEFT, within 1e-5
    ref, new = _peft_logits(tiny_decoder, lib / "bio"), _peft_logits(tiny_decoder, lib / "bio-same")
    assert (ref - new).abs().max().item() < 1e-5
    # held-out losses scored like pretrain's heldout_loss: the same number before, unchanged after
    meta = Library(lib).get("bio-same").meta
    assert out["heldout_loss_before"] == pytest.approx(meta["compressed"]["heldout_loss_before"])
    assert out["heldout_loss_before"] == pytest.approx(Library(lib).get("bio").meta["heldout_loss"], abs=1e-5)
    assert out["heldout_loss_after"] == pytest.approx(out["heldout_loss_before"], abs=1e-5)
    # the base on the same blocks: pretrain's own base score, and the whole gain kept
    assert out["heldout_loss_base"] == pytest.approx(Library(lib).get("bio").meta["base_heldout_loss"], abs=1e-5)
    assert out["kept_gain"] == pytest.approx(1.0, abs=1e-3)
    assert out["heldout_note"] is None and out["heldout_tokens"] > 0


def test_lower_rank_keeps_the_best_approximation_and_records_its_energy(lib, tiny_decoder, tmp_path):
    lib = _copy_lib(lib, tmp_path)
    src = _deltas(lib / "bio")
    rec = compress_module(lib, "bio", "bio-r2", rank=2, device="cpu")
    new = _deltas(lib / "bio-r2")
    assert set(rec["layers"]) == set(src) == set(new)
    for layer, delta in src.items():
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        assert rec["layers"][layer]["rank"] == 2
        assert rec["layers"][layer]["energy"] == pytest.approx((S[:2] ** 2).sum().item() / (S ** 2).sum().item(),
                                                               rel=1e-9)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        assert torch.allclose(new[layer], best, atol=1e-6), layer
    kept = sum((torch.linalg.svdvals(d)[:2] ** 2).sum().item() for d in src.values())
    assert rec["energy"] == pytest.approx(kept / sum((torch.linalg.svdvals(d) ** 2).sum().item()
                                                     for d in src.values()), rel=1e-9)
    assert rec["params_after"] == rec["params_before"] // 2
    # an ordinary PEFT LoRA with domix.json copied from the source plus the record
    _peft_logits(tiny_decoder, lib / "bio-r2")
    meta, old = Library(lib).get("bio-r2").meta, Library(lib).get("bio").meta
    assert meta["compressed"]["source"] == "bio" and meta["rank"] == 2
    assert {k: meta[k] for k in ("domain", "base_fingerprint", "data", "steps")} == \
           {k: old[k] for k in ("domain", "base_fingerprint", "data", "steps")}
    assert meta["heldout_loss"] == rec["heldout_loss_after"] is not None


def test_energy_picks_the_smallest_rank_per_layer_with_rank_pattern(lib, tiny_decoder, tmp_path):
    lib = _copy_lib(lib, tmp_path)
    src = _deltas(lib / "bio")
    rec = compress_module(lib, "bio", "bio-e", energy=0.9, device="cpu")
    for layer, delta in src.items():
        share = (torch.linalg.svdvals(delta) ** 2).cumsum(0)
        share = share / share[-1]
        k = rec["layers"][layer]["rank"]
        assert share[k - 1] >= 0.9 - 1e-12 and (k == 1 or share[k - 2] < 0.9), (layer, k, share)
        assert rec["layers"][layer]["energy"] == pytest.approx(share[k - 1].item(), rel=1e-9)
    cfg = json.loads((lib / "bio-e" / "adapter_config.json").read_text())
    if len({v["rank"] for v in rec["layers"].values()}) > 1:
        assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
    new = _deltas(lib / "bio-e")  # the saved adapter's own ranks and scalings reproduce the kept update
    for layer, delta in src.items():
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = rec["layers"][layer]["rank"]
        assert torch.allclose(new[layer], (U[:, :k] * S[:k]) @ Vh[:k], atol=1e-6), layer
    _peft_logits(tiny_decoder, lib / "bio-e")
    # a module of per-layer ranks is a starting point like any other: fine-tune from it, load it back
    from domix.finetune import finetune, load_task_model

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"text": t, "label": "ab"[i % 2]}) + "\n"
                            for i, t in enumerate(["patients protein cells", "court contract judge"] * 8)))
    finetune(method="lora", library=str(lib), init_module="bio-e", base=tiny_decoder, train=str(task), eval=str(task),
             out=str(tmp_path / "ft"), max_steps=2, batch_size=8, progress=False, device="cpu", threads=1)
    spec = json.loads((tmp_path / "ft" / "task.json").read_text())
    assert cfg["rank_pattern"] and spec["init_module"]["rank_pattern"] == cfg["rank_pattern"]
    load_task_model(tmp_path / "ft", device="cpu")


def test_missing_corpus_records_null(lib, corpora, tmp_path):
    lib = _copy_lib(lib, tmp_path)
    meta_path = lib / "bio" / "domix.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "data": [str(tmp_path / "gone.txt")]}))
    rec = compress_module(lib, "bio", "bio-r1", rank=1, device="cpu")
    assert rec["heldout_loss_before"] is None and rec["heldout_loss_after"] is None and rec["kept_gain"] is None
    assert "no longer exists" in rec["heldout_note"]
    assert Library(lib).get("bio-r1").meta["heldout_loss"] is None


def _dora_entry(lib: Path, base: str, name: str = "dora") -> None:
    """A DoRA adapter placed in the library by hand, with the metadata of 'bio'."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    model.save_pretrained(lib / name)
    shutil.copy(lib / "bio" / "domix.json", lib / name / "domix.json")


@pytest.mark.parametrize("args, message", [
    (["--rank", "4"], "--rank 4 does not compress module 'bio' of rank 4"),
    (["--rank", "9"], "--rank 9 does not compress"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--energy", "0"], "--energy must be in (0, 1]"),
    (["--energy", "1.5"], "--energy must be in (0, 1]"),
    (["--rank", "2", "--energy", "0.9"], "exactly one of --rank and --energy"),
    ([], "exactly one of --rank and --energy"),
    (["--rank", "2", "--out", "taken"], "module 'taken' already exists"),
    (["--rank", "2", "--out", "bio"], "--out must name a new entry"),
    (["--rank", "2", "--module", "full"], "module 'full' is a full entry; this takes lora entries"),
    (["--rank", "2", "--module", "dora"], "DoRA"),
    (["--rank", "2", "--module", "nope"], "no module 'nope'"),
])
def test_compress_bad_input_is_refused_and_writes_nothing(args, message, lib, tiny_decoder, tmp_path, capsys):
    lib = _copy_lib(lib, tmp_path)
    shutil.copytree(lib / "bio", lib / "taken")
    (lib / "full").mkdir()
    for f in ("config.json", "model.safetensors"):
        (lib / "full" / f).write_text("{}")
    (lib / "full" / "domix.json").write_text(json.dumps({"kind": "full", "base": tiny_decoder}))
    _dora_entry(lib, tiny_decoder)
    before = _snapshot(lib)
    argv = ["library", "compress", "--library", str(lib), "--module", "bio", "--out", "bio-small", *args]
    line = cli_error(capsys, argv)
    assert message in line, line
    assert _snapshot(lib) == before


# -- library add ---------------------------------------------------------------------------------

def _adapter(base: str, **cfg):
    """A LoRA adapter made with plain PEFT on `base`, with random nonzero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    opts = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM") | cfg
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**opts))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def _save(model, path: Path, safe: bool = True) -> Path:
    model.save_pretrained(path, safe_serialization=safe)
    return path


def test_imported_adapter_round_trips(tiny_decoder, corpora, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domix.data.corpus import load_documents, pack
    from domix.lm import lm_loss

    adapter = _save(_adapter(tiny_decoder), tmp_path / "adapter")
    lib = tmp_path / "lib"
    assert main(["library", "add", "--library", str(lib), "--adapter", str(adapter), "--domain", "ext",
                 "--base", tiny_decoder, "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta == Library(lib).get("ext").meta
    assert meta["kind"] == "lora" and meta["domain"] == "ext" and meta["objective"] == "clm"
    assert meta["rank"] == 4 and meta["alpha"] == 8 and meta["imported_from"] == str(adapter.resolve())
    assert meta["heldout_loss"] is None and meta["base_heldout_loss"] is None
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (lib / "ext" / f).read_bytes() == (adapter / f).read_bytes()
    # domix and plain PEFT agree: logits and the LM loss of eval-lm
    from domix.library.loading import load_with_module

    model, _ = load_with_module(tiny_decoder, str(lib), "ext")
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, _peft_logits(tiny_decoder, adapter))
    assert main(["eval-lm", "--base", tiny_decoder, "--data", corpora["law"], "--library", str(lib),
                 "--module", "ext", "--seq-len", "16", "--max-blocks", "4", "--device", "cpu", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    tok = AutoTokenizer.from_pretrained(tiny_decoder)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_decoder), str(adapter))
    ref = lm_loss(plain, pack(load_documents([corpora["law"]]), tok, 16, max_blocks=4), tok, "clm", 8)
    assert ours["loss"] == pytest.approx(ref["loss"], abs=1e-6) and ours["tokens"] == ref["tokens"]
    assert main(["library", "check", str(lib), "--base", tiny_decoder]) == 0
    # the imported module compresses like a trained one (no corpus: held-out loss not scored)
    rec = compress_module(lib, "ext", "ext-r2", rank=2, device="cpu")
    assert rec["heldout_loss_after"] is None and "records no corpus" in rec["heldout_note"]


def test_list_shows_compressed_and_imported_entries(lib, tiny_decoder, tmp_path, capsys):
    lib = _copy_lib(lib, tmp_path)
    compress_module(lib, "bio", "bio-r2", rank=2, device="cpu")
    assert main(["library", "add", "--library", str(lib), "--adapter",
                 str(_save(_adapter(tiny_decoder), tmp_path / "adapter")), "--domain", "ext",
                 "--base", tiny_decoder]) == 0
    capsys.readouterr()
    assert main(["library", "list", str(lib), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"bio", "bio-r2", "ext"} and not any("error" in r for r in rows.values())
    assert "r=2" in rows["bio-r2"]["layout"] and rows["ext"]["steps"] is None
    assert main(["library", "list", str(lib)]) == 0
    text = capsys.readouterr().out
    assert "bio-r2" in text and "ext" in text and "ERROR" not in text


@pytest.mark.parametrize("case, message", [
    ("encoder", "task type CAUSAL_LM; base"),
    ("encoder-untyped", "do not exist in the base"),
    ("dora", "is a DoRA adapter (use_dora); supported: plain LoRA"),
    ("ia3", "is a PEFT IA3 adapter; supported: plain LoRA"),
    ("bin", "ships only adapter_model.bin"),
    ("shape", "q_proj has A (4, 32) / B (31, 4), the base layer is 32 x 32"),
    ("taken", "module 'taken' already exists"),
])
def test_add_refuses_what_does_not_fit(case, message, tiny_decoder, tiny_encoder, tmp_path, capsys):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    base, path = tiny_decoder, tmp_path / "adapter"
    if case.startswith("encoder"):
        base = tiny_encoder
        _save(_adapter(tiny_decoder, **({"task_type": None} if case == "encoder-untyped" else {})), path)
    elif case == "dora":
        _save(_adapter(tiny_decoder, use_dora=True), path)
    elif case == "ia3":
        _save(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_decoder),
                             IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])), path)
    elif case == "bin":
        _save(_adapter(tiny_decoder), path, safe=False)
    else:
        _save(_adapter(tiny_decoder), path)
    if case == "shape":  # a B one row short of its layer
        t = load_file(str(path / "adapter_model.safetensors"))
        key = next(k for k in t if "q_proj.lora_B" in k)
        from safetensors.torch import save_file

        save_file({**t, key: t[key][:-1].contiguous()}, str(path / "adapter_model.safetensors"))
    lib = tmp_path / "lib"
    if case == "taken":
        (lib / "taken").mkdir(parents=True)
    before = _snapshot(lib) if lib.exists() else []
    line = cli_error(capsys, ["library", "add", "--library", str(lib), "--adapter", str(path), "--domain",
                           "taken" if case == "taken" else "ext", "--base", base])
    assert message in line, line
    if case.startswith("encoder"):
        assert "BertForMaskedLM" in line and ("LlamaForCausalLM" in line or "CAUSAL_LM" in line), line
    assert (_snapshot(lib) if lib.exists() else []) == before


def test_add_refuses_a_missing_adapter(tiny_decoder, tmp_path):
    from domix.library.importing import add_adapter

    with pytest.raises(LibraryError, match="not a PEFT adapter directory"):
        add_adapter(tmp_path / "lib", tmp_path, "ext", tiny_decoder)
