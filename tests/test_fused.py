"""`pretrain-all --fused`: N modules in one process that holds the base once; each module equals
the one trained alone, whatever other domains share the job; refusals; a failing domain."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from domix import pretrain
from domix.cli import main
from domix.library.fused import pretrain_fused
from domix.library.pretrain import PretrainConfig

# Measured here (CPU, fp32, one thread): fused and separately trained modules are bitwise equal after
# 6 steps, also with other company. Elsewhere (more threads, GPUs) a product over the stacked rows
# may be blocked differently than over one domain's rows, so the contract is float tolerance.
TOL = 1e-5
OPTS = dict(max_steps=6, batch_size=2, seq_len=16, lr=1e-2, rank=4, alpha=8, progress=False, device="cpu", threads=1)


def _cfgs(base, corpora, library, domains, **kw):
    return [PretrainConfig(domain=d, data=[corpora[d]], library=str(library), base=base, **{**OPTS, **kw})
            for d in domains]


def _tensors(library, domain):
    return load_file(str(library / domain / "adapter_model.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _same_run(fused: dict, alone: dict) -> None:
    """The fused entry records what the separately trained one does, and the same losses."""
    assert fused.keys() - {"fused"} == alone.keys()
    assert fused["train_loss"] == pytest.approx(alone["train_loss"], abs=1e-4)
    assert [h["step"] for h in fused["loss_history"]] == [h["step"] for h in alone["loss_history"]]
    assert [h["loss"] for h in fused["loss_history"]] == pytest.approx([h["loss"] for h in alone["loss_history"]],
                                                                       abs=2e-4)


@pytest.fixture(scope="module")
def separate(tiny_decoder, corpora, tmp_path_factory):
    lib = tmp_path_factory.mktemp("separate")
    for cfg in _cfgs(tiny_decoder, corpora, lib, ["bio", "law", "food"]):
        pretrain(cfg)
    return lib


def test_fused_modules_equal_separately_trained_ones(tiny_decoder, corpora, separate, tmp_path):
    lib = tmp_path / "fused"
    res = pretrain_fused(_cfgs(tiny_decoder, corpora, lib, ["bio", "law", "food"]))
    assert {d: r["status"] for d, r in res.items()} == {"bio": "done", "law": "done", "food": "done"}
    for d in ("bio", "law", "food"):
        a, b = _tensors(lib, d), _tensors(separate, d)
        assert _max_diff(a, b) <= TOL, d
        assert max(t.abs().max().item() for t in a.values()) > 0.01  # the modules moved
        fm, sm = (json.loads((x / d / "domix.json").read_text()) for x in (lib, separate))
        for key in ("steps", "tokens", "module_seed", "base_fingerprint", "rank", "alpha", "documents"):
            assert fm[key] == sm[key], key
        assert fm["heldout_loss"] == pytest.approx(sm["heldout_loss"], abs=1e-4)
        _same_run(fm, sm)
        assert fm["fused"]["domains"] == ["bio", "law", "food"]
        # a standard PEFT adapter at the top of the entry, as pretrain writes it
        assert json.loads((lib / d / "adapter_config.json").read_text())["r"] == 4
    # a module does not depend on which other domains share the job
    alone = tmp_path / "alone"
    pretrain_fused(_cfgs(tiny_decoder, corpora, alone, ["law"]))
    assert _max_diff(_tensors(alone, "law"), _tensors(lib, "law")) <= TOL
    # nor on how many domains share a forward pass
    turns = tmp_path / "turns"
    pretrain_fused(_cfgs(tiny_decoder, corpora, turns, ["bio", "law", "food"]), stack=1)
    for d in ("bio", "law", "food"):
        assert _max_diff(_tensors(turns, d), _tensors(separate, d)) <= TOL, d
    # a rerun keeps the finished modules
    again = pretrain_fused(_cfgs(tiny_decoder, corpora, lib, ["bio", "law"]))
    assert {r["status"] for r in again.values()} == {"skipped"}


def test_fused_domains_in_threads_equal_separately_trained_ones(tiny_decoder, corpora, separate, tmp_path,
                                                                monkeypatch):
    """--fused-stack 1 --fused-parallel 2: two domains' passes at once in threads of the one process,
    each on one of the two intra-op threads; every module as trained alone."""
    import threading

    from domix.library.fused_routing import _Rows

    seen, hook = set(), _Rows.hook

    def spy(self, module, args, output):
        seen.add(threading.current_thread().name)
        return hook(self, module, args, output)

    monkeypatch.setattr(_Rows, "hook", spy)
    before = torch.get_num_threads()
    lib = tmp_path / "threads"
    try:
        res = pretrain_fused(_cfgs(tiny_decoder, corpora, lib, ["bio", "law", "food"], threads=2), stack=1, parallel=2)
        assert torch.get_num_threads() == 2  # --threads; shared out between the threads for the passes only
    finally:
        torch.set_num_threads(before)
    assert {r["status"] for r in res.values()} == {"done"}
    assert seen and all(n.startswith("domix-fused") for n in seen)  # the passes ran in the pool's threads
    for d in ("bio", "law", "food"):
        assert _max_diff(_tensors(lib, d), _tensors(separate, d)) <= TOL, d
        _same_run(json.loads((lib / d / "domix.json").read_text()), json.loads((separate / d / "domix.json").read_text()))
    # threads would share LoRA dropout's random stream: refused, as is a count below 1
    with pytest.raises(ValueError, match="dropout.*bio"):
        pretrain_fused(_cfgs(tiny_decoder, corpora, tmp_path / "x", ["bio"], dropout=0.1), parallel=2)
    with pytest.raises(ValueError, match="at least 1"):
        pretrain_fused(_cfgs(tiny_decoder, corpora, tmp_path / "x", ["bio"]), parallel=0)
    assert not (tmp_path / "x").exists()


def test_fused_with_gradient_accumulation_matches_separate(tiny_decoder, corpora, tmp_path):
    kw = dict(grad_accum=2, max_steps=21)  # the Trainer logs every 2 steps: 10 entries, the last step unlogged
    pretrain(_cfgs(tiny_decoder, corpora, tmp_path / "alone", ["bio"], **kw)[0])
    pretrain_fused(_cfgs(tiny_decoder, corpora, tmp_path / "fused", ["bio", "law"], **kw))
    assert _max_diff(_tensors(tmp_path / "fused", "bio"), _tensors(tmp_path / "alone", "bio")) <= TOL
    fm, sm = (json.loads((tmp_path / x / "bio" / "domix.json").read_text()) for x in ("fused", "alone"))
    assert fm["tokens"] == sm["tokens"] == 21 * 2 * 2 * 16
    _same_run(fm, sm)
    assert [h["step"] for h in fm["loss_history"]] == list(range(2, 21, 2))


@pytest.mark.parametrize("where", ["batch", "pass"])
def test_a_failing_domain_is_reported_and_the_others_finish(tiny_decoder, corpora, separate, tmp_path, where):
    """A domain that fails fetching its batch, or inside the pass it shares with the others, stops alone:
    the others' modules equal their separate runs'."""
    def fail(domain, step, at):
        if domain == "law" and step == 2 and at == where:
            raise RuntimeError("simulated failure")

    lib = tmp_path / "lib"
    res = pretrain_fused(_cfgs(tiny_decoder, corpora, lib, ["bio", "law"]), fail=fail)
    assert res["law"]["status"] == "failed" and "simulated failure" in res["law"]["error"]
    assert "simulated failure" in res["law"]["traceback"]
    assert not (lib / "law").exists()
    assert res["bio"]["status"] == "done" and _max_diff(_tensors(lib, "bio"), _tensors(separate, "bio")) <= TOL


def test_fp16_passes_are_loss_scaled(tiny_decoder, corpora, tmp_path, monkeypatch):
    """fp16 scales the shared backward and unscales each domain's gradients before its step."""
    scaled = []
    real = torch.amp.GradScaler

    class Spy(real):
        def scale(self, outputs):
            scaled.append(float(self.get_scale()) if self.is_enabled() else None)
            return super().scale(outputs)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    res = pretrain_fused(_cfgs(tiny_decoder, corpora, tmp_path / "lib", ["bio", "law"], dtype="fp16"))
    assert {r["status"] for r in res.values()} == {"done"}
    assert scaled and all(x is not None and x > 1 for x in scaled)
    for d in ("bio", "law"):
        assert all(torch.isfinite(t).all() for t in _tensors(tmp_path / "lib", d).values())


def test_what_cannot_be_fused_is_refused(tiny_decoder, tiny_encoder, corpora, tmp_path, capsys):
    mixed = _cfgs(tiny_decoder, corpora, tmp_path, ["bio"]) + _cfgs(tiny_decoder, corpora, tmp_path, ["law"], seq_len=32)
    with pytest.raises(ValueError, match="one seq_len.*bio: 16; law: 32.*group the domains"):
        pretrain_fused(mixed)
    bases = _cfgs(tiny_decoder, corpora, tmp_path, ["bio"]) + _cfgs(tiny_encoder, corpora, tmp_path, ["law"])
    with pytest.raises(ValueError, match="one base"):
        pretrain_fused(bases)
    with pytest.raises(ValueError, match="next-token modules of a decoder"):
        pretrain_fused(_cfgs(tiny_encoder, corpora, tmp_path, ["bio"]))
    assert not any(tmp_path.iterdir())
    # the command line
    cfg = tmp_path / "domains.yaml"
    cfg.write_text(f"base: {tiny_decoder}\ndefaults: {{max_steps: 2, batch_size: 2, seq_len: 16, rank: 4}}\n"
                   f"domains:\n  bio: {{data: {corpora['bio']}}}\n  law: {{data: {corpora['law']}, seq_len: 32}}\n")
    assert main(["pretrain-all", "--config", str(cfg), "--library", str(tmp_path / "lib"), "--fused"]) == 2
    assert "group the domains" in capsys.readouterr().err
    cfg.write_text(cfg.read_text().replace(", seq_len: 32", ""))
    assert main(["pretrain-all", "--config", str(cfg), "--library", str(tmp_path / "lib"), "--fused", "--device", "cpu",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {d: r["status"] for d, r in out.items()} == {"bio": "done", "law": "done"}


def test_fused_bf16_matches_separate_bf16(tiny_decoder, corpora, tmp_path):
    """The same under bf16 autocast (the benchmark's precision): the base in bf16, the modules fp32."""
    sep, fus = tmp_path / "separate", tmp_path / "fused"
    for cfg in _cfgs(tiny_decoder, corpora, sep, ["bio", "law"], dtype="bf16", max_steps=3):
        pretrain(cfg)
    res = pretrain_fused(_cfgs(tiny_decoder, corpora, fus, ["bio", "law"], dtype="bf16", max_steps=3))
    assert {r["status"] for r in res.values()} == {"done"}
    for d in ("bio", "law"):
        assert _max_diff(_tensors(fus, d), _tensors(sep, d)) <= TOL, d


def test_the_private_peft_api_fused_training_reads_is_there_or_falls_back():
    """Fused training adds each domain's LoRA to its own rows by hand, as PEFT's LoRA forward does: it
    reads PEFT's private `_cast_input_dtype` (falling back to a plain cast where it is missing) and sets
    the layers' `_disable_adapters`. This fails when an installed PEFT drops either, so a PEFT upgrade
    cannot silently change fused modules."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from domix.library.fused_routing import _cast_input

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert hasattr(layer, "_disable_adapters") and hasattr(LoraLayer, "_cast_input_dtype")
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    assert torch.equal(_cast_input(layer, x, torch.float32), layer._cast_input_dtype(x, torch.float32))

    class Old:  # a PEFT before the private cast: the plain cast
        pass

    assert _cast_input(Old(), x, torch.float32).dtype == torch.float32
