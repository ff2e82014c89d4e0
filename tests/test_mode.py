"""MoDE: the block/gate architecture, expert pre-training, composition, save/load, refusals."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import Stop, interrupt_at
from safetensors.torch import load_file

from domix import Library, LibraryError
from domix.mode import apply_mode, find_layers, load_mode, load_mode_model, mode_of, remove_mode, save_mode
from domix.cli import main
from domix.mode.train import ModePretrainConfig, compose, eval_mode, pretrain_expert
from domix.finetune.evaluate import _cache_name
from domix.library.pretrain_all import load_config, pretrain_all

FAST = dict(max_steps=8, batch_size=4, seq_len=16, lr=1e-2, gate_lr=5e-2, progress=False, device="cpu", threads=1)
IDS = torch.tensor([[3, 5, 7, 9, 11, 13, 6, 8], [4, 6, 8, 10, 12, 14, 5, 7]])
MASK = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]])  # left padding: masks must reach the experts


def _load(base, head="lm", kind="tiny_decoder"):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    if head == "classify":
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(base, num_labels=3).eval()
    return (AutoModelForCausalLM if kind == "tiny_decoder" else AutoModelForMaskedLM).from_pretrained(base).eval()


@torch.no_grad()
def _logits(model, **kw):
    return model(input_ids=IDS, attention_mask=MASK, **kw).logits


@torch.no_grad()
def _randomise_gates(mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    for blk in mode.blocks:
        blk.gate.weight.copy_(torch.randn(blk.gate.weight.shape, generator=g))
        blk.gate.bias.copy_(torch.randn(blk.gate.bias.shape, generator=g))
        if blk.form == "routed":  # the experts' own gates
            blk.own.weight.copy_(torch.randn(blk.own.weight.shape, generator=g))
            blk.own.bias.copy_(torch.randn(blk.own.bias.shape, generator=g))
        for w in blk.out:  # W_j = I: the paper's mixture
            w.weight.copy_(torch.eye(w.weight.shape[0]))


@pytest.fixture(scope="module")
def lib(tiny_decoder, corpora, tmp_path_factory):
    """A library with two decoder experts (default layout: 2 blocks x 1 layer on the 4-layer model)."""
    path = tmp_path_factory.mktemp("mode-lib")
    for dom in ("bio", "law"):
        pretrain_expert(domain=dom, data=[corpora[dom]], library=str(path), base=tiny_decoder, **FAST)
    return path


GATES = [("token", "softmax"), ("mean", "softmax"), ("mean", "routed")]  # (context, form)


@pytest.mark.parametrize("context,form", GATES)
@pytest.mark.parametrize("kind", ["tiny_decoder", "tiny_encoder"])
@pytest.mark.parametrize("head", ["lm", "classify"])
def test_fresh_gates_give_the_base_model(kind, head, context, form, request):
    base = request.getfixturevalue(kind)
    model = _load(base, head, kind)
    ref = _logits(model)
    n_hidden = len(model(input_ids=IDS, output_hidden_states=True).hidden_states)
    for init in ("copy", "random"):
        mode = apply_mode(model, ["a", "b"], init=init, gate_context=context, gate_form=form)
        assert torch.equal(_logits(model), ref), init  # exactly: the output maps W_j start at 0
        # the experts are real and trainable, the base is frozen
        assert all(p.requires_grad for p in mode.parameters())
        assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("domix_mode."))
        _randomise_gates(mode)
        assert not torch.allclose(_logits(model), ref, atol=1e-4)
        # the expert layers do not add hidden states to the model's outputs
        assert len(model(input_ids=IDS, output_hidden_states=True).hidden_states) == n_hidden
        remove_mode(model)
        assert torch.equal(_logits(model), ref)


@pytest.mark.parametrize("init", ["copy", "random"])
def test_experts_get_gradients_from_the_first_step(tiny_decoder, init):
    """Step one: the output maps W_j get gradients of the activations' size (the expert differs
    from the block's output); after one optimizer step every expert layer and every gate does."""
    model = _load(tiny_decoder)
    model.train()
    mode = apply_mode(model, ["a", "b"], init=init)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
    outs = [w.weight.grad for blk in mode.blocks for w in blk.out]
    assert all(g is not None and g.abs().max() > 1e-4 for g in outs)
    opt.step()
    opt.zero_grad()
    model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
    for blk in mode.blocks:
        for expert in blk.experts:
            assert all(p.grad is not None and p.grad.abs().max() > 0 for p in expert.parameters())
        assert blk.gate.weight.grad.abs().max() > 0


@pytest.mark.parametrize("kind", ["tiny_decoder", "tiny_encoder"])
def test_expert_layers_receive_masks_and_position_embeddings(kind, request):
    """An expert copying the whole backbone, with all gate weight on it, is the backbone again:
    the expert layers get the same attention mask, rotary embeddings and positions."""
    model = _load(request.getfixturevalue(kind), kind=kind)
    ref = _logits(model)
    mode = apply_mode(model, ["all"], blocks=1, expert_layers=4, init="copy")
    with torch.no_grad():
        mode.blocks[0].out[0].weight.copy_(torch.eye(mode.blocks[0].out[0].weight.shape[0]))
        mode.blocks[0].gate.bias.copy_(torch.tensor([-1e4, 1e4]))
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("context,form", GATES)
def test_kv_cache_decoding_matches_a_full_forward(tiny_decoder, context, form):
    """Also for gates that read the mean of the text so far: in decoding, each block keeps its
    earlier tokens' inputs in the cache (so `generate` sees them; the cache's beam reordering acts
    on them too)."""
    model = _load(tiny_decoder)
    _randomise_gates(apply_mode(model, ["a", "b"], init="random", gate_context=context, gate_form=form))
    with torch.no_grad():
        full = model(input_ids=IDS, attention_mask=MASK).logits
        key = _cache_name(model)  # `cache` in newer transformers, `past_key_values` before
        out = model(input_ids=IDS[:, :4], attention_mask=MASK[:, :4], use_cache=True)
        steps, cache = [out.logits], getattr(out, key)
        for t in range(4, IDS.shape[1]):
            out = model(input_ids=IDS[:, t:t + 1], attention_mask=MASK[:, :t + 1], use_cache=True,
                        **{key: cache})
            steps.append(out.logits)
            cache = getattr(out, key)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_mean_context_sees_neither_later_tokens_nor_padding(tiny_decoder, tiny_encoder):
    # decoder: a token's output does not depend on the tokens after it (no peeking through the gate)
    model = _load(tiny_decoder)
    _randomise_gates(apply_mode(model, ["a", "b"], gate_context="mean"))
    other = IDS.clone()
    other[:, 5:] = 2
    torch.testing.assert_close(model(input_ids=other).logits[:, :5], model(input_ids=IDS).logits[:, :5])
    # ... nor on left padding (positions as `generate` gives them)
    ids, pos = IDS[1:, 2:], torch.arange(6)[None]
    padded_pos = (MASK[1:].cumsum(-1) - 1).clamp_min(0)
    alone = model(input_ids=ids, position_ids=pos).logits
    padded = model(input_ids=IDS[1:], attention_mask=MASK[1:], position_ids=padded_pos).logits[:, 2:]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)
    unmasked = model(input_ids=IDS[1:], position_ids=padded_pos).logits[:, 2:]
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # the mask is what keeps the pads out
    # encoder: every token sees the whole text, right padding excluded
    enc = _load(tiny_encoder, kind="tiny_encoder")
    _randomise_gates(apply_mode(enc, ["a", "b"], gate_context="mean"))
    alone = enc(input_ids=IDS[:1, :6]).logits
    padded = enc(input_ids=IDS[:1], attention_mask=torch.tensor([[1] * 6 + [0] * 2])).logits[:, :6]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)
    other = IDS[:1, :6].clone()
    other[:, 5] = 2  # a later token changes an earlier one's output (so does attention; the gate too)
    assert not torch.allclose(enc(input_ids=other).logits[:, 0], alone[:, 0], atol=1e-4)

    # a caller of the decoder alone (`lm.lm_loss`) gets its own call's mask, not one left from the head's last call
    model(input_ids=IDS, attention_mask=MASK)
    hidden = model.get_decoder()(input_ids=IDS[1:]).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), model(input_ids=IDS[1:]).logits)


class Capture:
    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kw):
                outer.model = model

        self.cb = _CB()


@pytest.mark.parametrize("kind", ["tiny_decoder", "tiny_encoder"])
def test_expert_pretraining_changes_only_its_expert_and_gates(kind, request, corpora, tmp_path):
    base = request.getfixturevalue(kind)
    before = {k: v.clone() for k, v in _load(base, kind=kind).state_dict().items()}
    cap = Capture()
    meta = pretrain_expert(domain="bio", data=[corpora["bio"]], library=str(tmp_path), base=base,
                           callbacks=[cap.cb], **{**FAST, "max_steps": 30})
    assert meta["kind"] == "mode-expert" and meta["objective"] == ("clm" if kind == "tiny_decoder" else "mlm")
    trained = cap.model
    for name, p in trained.named_parameters():
        assert p.requires_grad == name.startswith("domix_mode."), name
    state = trained.state_dict()
    for k, v in before.items():
        assert torch.equal(state[k], v), k  # the base, head included, is bitwise unchanged
    # the expert started as a copy of each block's last layer and has moved; so have the gates
    mode, layers = mode_of(trained), find_layers(trained)
    for b, (_, end) in enumerate(mode.layout.spans):
        src, ex = layers[end - 1].state_dict(), mode.blocks[b].experts[0][0].state_dict()
        assert src.keys() == ex.keys() and any(not torch.equal(src[k], ex[k]) for k in src)
        assert mode.blocks[b].out[0].weight.abs().sum() > 0 and mode.blocks[b].gate.weight.abs().sum() > 0
    hist = [h["loss"] for h in meta["loss_history"]]
    assert sum(hist[-3:]) < sum(hist[:3]), hist  # the loss falls (MLM losses are noisy: means of three)
    # the library entry: weights + metadata with the parameter count
    entry = Library(tmp_path).get("bio")
    assert entry.kind == "mode-expert"
    tensors = load_file(str(tmp_path / "bio" / "expert.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == meta["params"]["total"]
    assert meta["params"]["expert"] > 0 and meta["params"]["gate"] > 0
    assert meta["layout"]["blocks"] == 2 and meta["layout"]["expert_layers"] == 1
    assert meta["heldout_loss"] > 0 and 0 <= meta["heldout_accuracy"] <= 1
    assert not list(tmp_path.glob(".bio*")) and not (tmp_path / ".work" / "bio").exists()
    # a single expert evaluates with its own gate; its model is the trained one
    model, _, _ = load_mode_model(tmp_path / "bio")
    trained.eval()
    assert torch.equal(_logits(model), _logits(trained))
    out = eval_mode(str(tmp_path / "bio"), corpora["bio"], seq_len=16, device="cpu", progress=False)
    assert {"loss", "perplexity", "accuracy", "tokens"} <= out.keys() and out["experts"] == ["bio"]


def _config(tmp_path, base, corpora, names, name):
    doc = {"base": base, "defaults": {"max_steps": 4, "batch_size": 4, "seq_len": 16, "lr": 1e-2,
                                      "device": "cpu", "threads": 1},
           "domains": {n: {"data": [corpora[n]]} for n in names}}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_experts_do_not_depend_on_their_company(tiny_decoder, corpora, tmp_path, capsys):
    lib1, lib2 = tmp_path / "lib1", tmp_path / "lib2"
    config = _config(tmp_path, tiny_decoder, corpora, ["bio", "law"], "a.yaml")
    code = main(["mode", "pretrain", "--config", str(config), "--library", str(lib1), "--workers", "2",
                 "--expert-init", "random"])
    assert code == 0, capsys.readouterr()
    configs = load_config(_config(tmp_path, tiny_decoder, corpora, ["law"], "b.yaml"), str(lib2),
                          {"expert_init": "random"}, config_cls=ModePretrainConfig)
    r = pretrain_all(configs, workers=1, progress=False, runner=pretrain_expert)
    assert r["law"]["status"] == "done", r
    t1, t2 = (load_file(str(lib / "law" / "expert.safetensors")) for lib in (lib1, lib2))
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert Library(lib1).get("law").kind == "mode-expert"
    # complete experts are skipped on a rerun
    again = pretrain_all(configs, workers=1, progress=False, runner=pretrain_expert)
    assert again["law"]["status"] == "skipped"


def test_expert_order_is_a_gate_permutation(tiny_decoder, lib):
    ab, ba = _load(tiny_decoder), _load(tiny_decoder)
    mab = apply_mode(ab, Library(lib).select("bio,law", kind="mode-expert"))
    mba = apply_mode(ba, Library(lib).select("law,bio", kind="mode-expert"))
    assert mab.names == ["bio", "law"] and mba.names == ["law", "bio"]
    _randomise_gates(mab)
    with torch.no_grad():
        for x, y in zip(mab.blocks, mba.blocks):
            y.gate.weight.copy_(x.gate.weight[[0, 2, 1]])
            y.gate.bias.copy_(x.gate.bias[[0, 2, 1]])
            for j, k in ((0, 1), (1, 0)):
                y.out[j].weight.copy_(x.out[k].weight)
    torch.testing.assert_close(_logits(ba), _logits(ab), rtol=1e-5, atol=1e-6)


def test_compose_trains_gates_and_round_trips(tiny_decoder, lib, corpora, tmp_path, capsys):
    cap = Capture()
    meta = compose(library=str(lib), experts="all", data=[f"bio={corpora['bio']}", f"law={corpora['law']}"],
                   out=str(tmp_path / "frozen"), freeze_experts=True, callbacks=[cap.cb], **FAST)
    assert meta["kind"] == "mode" and meta["experts"] == ["bio", "law"] and set(meta["heldout"]) == {"bio", "law"}
    assert meta["blocks_per_part"][0] > 0
    # where the gates send each domain's held-out tokens: a distribution over the backbone and the
    # experts, as a table in domix.json and a heatmap beside the model
    assert set(meta["routing"]) == {"bio", "law"}
    for row in meta["routing"].values():
        assert list(row) == ["backbone", "bio", "law"] and sum(row.values()) == pytest.approx(1, abs=1e-3)
    assert meta["routing"]["bio"] != meta["routing"]["law"]  # token-level gates: the texts differ
    assert (tmp_path / "frozen" / "routing.png").stat().st_size > 0
    saved = load_file(str(tmp_path / "frozen" / "mode.safetensors"))
    for j, name in enumerate(["bio", "law"]):  # frozen experts (layers and output maps): bitwise the library's
        lib_t = load_file(str(lib / name / "expert.safetensors"))
        for key, t in lib_t.items():
            if ".layers." in key:
                b, rest = key.split(".layers.")
                assert torch.equal(saved[f"{b}.experts.{j}.{rest}"], t), key
            elif key.endswith(".out.weight"):
                assert torch.equal(saved[key.replace(".out.", f".out.{j}.")], t), key
    assert saved["blocks.0.gate.weight"].shape[0] == 3 and saved["blocks.0.gate.weight"].abs().sum() > 0
    # save/load round-trip: the loaded model computes what the trained one computed
    model, _, _ = load_mode_model(tmp_path / "frozen")
    cap.model.eval()
    assert torch.equal(_logits(model), _logits(cap.model))
    # the CLI: compose with trainable experts (default: the experts' own corpora), then eval
    assert main(["mode", "compose", "--library", str(lib), "--experts", "law,bio", "--out", str(tmp_path / "full"),
                 "--max-steps", "3", "--batch-size", "4", "--seq-len", "16", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["experts"] == ["law", "bio"] and out["parts"] == ["law", "bio"] and not out["freeze_experts"]
    assert main(["mode", "eval", "--model", str(tmp_path / "full"), "--data", corpora["law"], "--seq-len", "16",
                 "--device", "cpu", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "accuracy"} <= scores.keys()
    assert main(["mode", "compose", "--library", str(lib), "--out", str(tmp_path / "full"), "--max-steps", "1"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_routing_loss_teaches_each_expert_its_own_gate_weight(tiny_decoder, lib):
    model = _load(tiny_decoder)
    experts = Library(lib).select("bio,law", kind="mode-expert")
    mode = apply_mode(model, experts)
    _randomise_gates(mode)
    inputs = []
    for blk in mode.blocks:  # each block's input
        blk.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    route = torch.tensor([1, -1])  # row 0 is law text, row 1 of no expert's corpus
    with mode.routing_targets(route) as routed:
        model(input_ids=IDS, attention_mask=MASK)
        loss = routed()
    law = experts[1].tensors()
    want = []
    for b, (blk, x) in enumerate(zip(mode.blocks, inputs)):  # by hand: law's own gate, alone, on row 0
        xh = x[0] / x[0].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        own = torch.softmax(xh @ law[f"blocks.{b}.gate.weight"].T + law[f"blocks.{b}.gate.bias"], -1)
        logp = torch.log_softmax(blk.gate(xh), -1)
        want.append(-(own[:, 0] * logp[:, 0] + own[:, 1] * logp[:, 2]).mean())
    torch.testing.assert_close(loss, torch.stack(want).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()  # it trains the gates and nothing else
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mode.gate_parameters())
    assert all(p.grad is None for p in mode.expert_parameters())
    with mode.routing_targets(torch.tensor([-1, -1])) as routed:  # no row of an expert's corpus: no loss
        model(input_ids=IDS, attention_mask=MASK)
        assert routed() is None
    assert all(blk.route is None and blk.route_losses == [] for blk in mode.blocks)
    # experts that carry no gate of their own (made here, not loaded) cannot be routed this way
    fresh = apply_mode(_load(tiny_decoder), ["a", "b"])
    with pytest.raises(ValueError, match="own gate"):
        fresh.blocks[0].routing_loss(torch.randn(2, 8, 32), torch.tensor([0, 1]))


@torch.no_grad()
def test_a_routed_gate_sure_of_a_domain_is_that_expert_alone(tiny_decoder, lib):
    """Gate form "routed": each expert keeps its own gate, so a router sure of expert j gives
    exactly the model of expert j alone (its own trained gate); an unsure one mixes them."""
    alone = {name: load_mode_model(lib / name)[0] for name in ("bio", "law")}
    model = _load(tiny_decoder)
    mode = apply_mode(model, Library(lib).select("bio,law", kind="mode-expert"), gate_context="mean",
                      gate_form="routed")
    assert mode.gate_form == "routed" and mode.blocks[0].gate.out_features == 2  # a router over the experts
    for j, name in enumerate(mode.names):
        for blk in mode.blocks:
            blk.gate.weight.zero_()
            blk.gate.bias.copy_(torch.tensor([40.0, -40.0] if j == 0 else [-40.0, 40.0]))
        torch.testing.assert_close(_logits(model), _logits(alone[name]), rtol=1e-5, atol=1e-5)
    for blk in mode.blocks:
        blk.reset_gate()
    mixed = _logits(model)
    assert all(not torch.allclose(mixed, _logits(m), atol=1e-3) for m in alone.values())


def test_routed_gates_learn_which_text_is_whose_and_round_trip(tiny_decoder, lib, corpora, tmp_path):
    """The routing loss of a routed gate is the router's cross-entropy on each row's expert; it
    trains the router alone. A composition with it hands each domain to its expert and saves and
    loads with its form."""
    model = _load(tiny_decoder)
    mode = apply_mode(model, Library(lib).select("bio,law", kind="mode-expert"), gate_form="routed")
    _randomise_gates(mode)
    inputs = []
    for blk in mode.blocks:
        blk.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with mode.routing_targets(torch.tensor([1, -1])) as routed:
        model(input_ids=IDS, attention_mask=MASK)
        loss = routed()
    want = [-torch.log_softmax(blk.gate(x[0] / x[0].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()), -1)[:, 1].mean()
            for blk, x in zip(mode.blocks, inputs)]
    torch.testing.assert_close(loss, torch.stack(want).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mode.gate_parameters())
    assert all(p.grad is None for p in mode.expert_parameters())  # the experts' own gates among them
    data = [f"bio={corpora['bio']}", f"law={corpora['law']}"]
    cap = Capture()
    meta = compose(library=str(lib), data=data, out=str(tmp_path / "routed"), freeze_experts=True,
                   gate_context="mean", gate_form="routed", callbacks=[cap.cb], **{**FAST, "max_steps": 12})
    assert meta["gate_form"] == "routed"
    for own, other in (("bio", "law"), ("law", "bio")):
        assert meta["routing"][own][own] > 2 * meta["routing"][own][other], meta["routing"]
    saved = load_file(str(tmp_path / "routed" / "mode.safetensors"))
    for b in range(2):  # frozen experts keep the own gates they were trained with
        law = load_file(str(lib / "law" / "expert.safetensors"))
        assert torch.equal(saved[f"blocks.{b}.own.weight"][1], law[f"blocks.{b}.gate.weight"][1] -
                           law[f"blocks.{b}.gate.weight"][0])
    loaded, _, _ = load_mode_model(tmp_path / "routed")
    cap.model.eval()
    assert loaded.domix_mode.gate_form == "routed" and torch.equal(_logits(loaded), _logits(cap.model))
    with pytest.raises(ValueError, match="unknown gate form 'soft'"):
        apply_mode(_load(tiny_decoder), ["a"], gate_form="soft")


def test_routing_loss_hands_each_domain_to_its_expert(tiny_decoder, lib, corpora, tmp_path):
    data = [f"bio={corpora['bio']}", f"law={corpora['law']}"]
    kw = {**FAST, "max_steps": 12}
    routed = compose(library=str(lib), data=data, out=str(tmp_path / "routed"), freeze_experts=True, **kw)
    plain = compose(library=str(lib), data=data, out=str(tmp_path / "plain"), freeze_experts=True, routing_loss=0,
                    **kw)
    context = compose(library=str(lib), data=data, out=str(tmp_path / "context"), freeze_experts=True,
                      gate_context="mean", **kw)
    assert routed["routing_loss"] == 1.0 and plain["routing_loss"] == 0 and context["gate_context"] == "mean"
    for own, other in (("bio", "law"), ("law", "bio")):  # each domain's tokens go to its own expert
        for m in (routed, context):
            assert m["routing"][own][own] > 2 * m["routing"][own][other], m["routing"]
        share = lambda m: m["routing"][own][own] / (m["routing"][own][own] + m["routing"][own][other])  # noqa: E731
        assert share(routed) > share(plain), (routed["routing"], plain["routing"])
    with pytest.raises(ValueError, match="--routing-loss must be 0 or more"):
        compose(library=str(lib), data=data, out=str(tmp_path / "x"), routing_loss=-1, **FAST)
    # corpora named after no expert cannot be routed
    with pytest.raises(ValueError, match="--routing-loss 0"):
        compose(library=str(lib), data=[f"x={corpora['bio']}", f"y={corpora['law']}"], out=str(tmp_path / "x"),
                experts="bio", **FAST)


@pytest.mark.parametrize("context", ["token", "mean"])
def test_classifier_with_mode_round_trips_with_its_head(tiny_encoder, tmp_path, context):
    model = _load(tiny_encoder, "classify")
    mode = apply_mode(model, ["a", "b"], gate_context=context)
    _randomise_gates(mode)
    model.classifier.requires_grad_(True)  # a task head trains with the experts; it is saved with them
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
    ref = _logits(model)
    assert save_mode(model, tmp_path / "m", {"base": tiny_encoder, "objective": "mlm"})["gate_context"] == context
    fresh = _load(tiny_encoder, "classify")
    assert load_mode(fresh, tmp_path / "m").gate_context == context
    assert torch.equal(_logits(fresh), ref)
    # tensors that do not fit what domix.json says (here: the gates' input) are refused by name
    meta = json.loads((tmp_path / "m" / "domix.json").read_text())
    meta["gate_context"] = "token" if context == "mean" else "mean"
    (tmp_path / "m" / "domix.json").write_text(json.dumps(meta))
    with pytest.raises(LibraryError, match="mode.safetensors does not match its domix.json"):
        load_mode(_load(tiny_encoder, "classify"), tmp_path / "m")


def test_foreign_experts_are_refused(tiny_decoder, tiny_encoder, lib, corpora, tmp_path, capsys):
    # another base
    pretrain_expert(domain="enc", data=[corpora["food"]], library=str(tmp_path / "enc"), base=tiny_encoder,
                    **{**FAST, "max_steps": 1})
    with pytest.raises(LibraryError, match="'enc' was trained on base"):
        apply_mode(_load(tiny_decoder), [Library(tmp_path / "enc").get("enc")])
    # another block layout, next to experts of the default layout
    pretrain_expert(domain="food", data=[corpora["food"]], library=str(lib), base=tiny_decoder, blocks=1,
                    **{**FAST, "max_steps": 1})
    try:
        with pytest.raises(LibraryError, match="expert 'food' has block layout 1 blocks x 1 expert layers"):
            apply_mode(_load(tiny_decoder), Library(lib).select("bio,food", kind="mode-expert"))
        with pytest.raises(LibraryError, match="block layout"):
            apply_mode(_load(tiny_decoder), [Library(lib).get("bio")], blocks=4)
        assert main(["mode", "compose", "--library", str(lib), "--out", str(tmp_path / "x"), "--max-steps", "1",
                     "--device", "cpu"]) == 2
        assert "block layout" in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    finally:
        import shutil
        shutil.rmtree(lib / "food")
    # a composed model onto another base
    model = _load(tiny_decoder)
    apply_mode(model, ["a"])
    save_mode(model, tmp_path / "m", {"base": tiny_decoder})
    with pytest.raises(LibraryError, match="trained on base"):
        load_mode(_load(tiny_encoder, kind="tiny_encoder"), tmp_path / "m")
    # an expert name that exists as another kind is not silently replaced or skipped
    with pytest.raises(FileExistsError, match="kind mode-expert"):
        pretrain_expert(domain="bio", data=[corpora["bio"]], library=str(lib), base=tiny_decoder, **FAST)


def test_interrupted_expert_training_resumes_to_the_same_expert(tiny_decoder, corpora, tmp_path):

    opts = {**FAST, "save_steps": 3}
    pretrain_expert(domain="bio", data=[corpora["bio"]], library=str(tmp_path / "ref"), base=tiny_decoder, **opts)
    with pytest.raises(Stop):
        pretrain_expert(domain="bio", data=[corpora["bio"]], library=str(tmp_path / "run"), base=tiny_decoder,
                        callbacks=[interrupt_at(5)], **opts)
    assert "bio" not in Library(tmp_path / "run")
    meta = pretrain_expert(domain="bio", data=[corpora["bio"]], library=str(tmp_path / "run"), base=tiny_decoder,
                           resume=True, **opts)
    assert meta["resumed_from"] == "checkpoint-3"
    ref, run = (load_file(str(tmp_path / d / "bio" / "expert.safetensors")) for d in ("ref", "run"))
    for k in ref:
        torch.testing.assert_close(run[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_default_model_layout_and_exact_start():
    from domix.models import load_model, load_tokenizer

    model, _ = load_model("smollm2-135m")
    model.eval()
    tok = load_tokenizer("smollm2-135m")
    enc = tok(["The trial enrolled adults with chronic asthma.", "A charming, funny film."], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        ref = model(**enc).logits
    mode = apply_mode(model, ["a", "b"])
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref)
    assert (mode.layout.blocks, mode.layout.expert_layers) == (3, 2)
    assert mode.layout.spans == [(0, 10), (10, 20), (20, 30)]
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3 + 2 * 576
    assert mode.param_counts()["per_expert"] == 6 * per_layer + 3 * 576 * 576 == 22_235_904
    # one backward pass: the experts' output maps get gradients of full size, nothing outside MoDE any
    model(**enc, labels=enc["input_ids"]).loss.backward()
    assert all(w.weight.grad.abs().max() > 1e-3 for blk in mode.blocks for w in blk.out)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("domix_mode."))


def test_an_expert_of_the_earlier_scale_form_is_refused(tiny_decoder, lib, tmp_path):
    import shutil

    from safetensors.torch import save_file

    old = tmp_path / "old-lib"
    shutil.copytree(lib, old)
    t = load_file(str(old / "bio" / "expert.safetensors"))
    t = {k: v for k, v in t.items() if not k.endswith(".out.weight")}
    t.update({f"blocks.{b}.scale": torch.zeros(()) for b in range(2)})  # what an earlier domix saved
    save_file(t, str(old / "bio" / "expert.safetensors"))
    with pytest.raises(ValueError, match="earlier domix.*train it again"):
        apply_mode(_load(tiny_decoder), Library(old).select("bio", kind="mode-expert"))


def test_an_expert_is_a_library_entry_like_any_other(tiny_decoder, tiny_encoder, lib, corpora, tmp_path, capsys):
    """`eval-lm --library --module` scores an expert as `mode eval --model` does; `library list/show/check`
    give its kind, size and layout; a command given an entry of the wrong kind names the kinds it takes."""
    score = ["--data", corpora["bio"], "--seq-len", "16", "--device", "cpu", "--json"]
    assert main(["eval-lm", "--base", tiny_decoder, "--library", str(lib), "--module", "bio", *score]) == 0
    by_entry = json.loads(capsys.readouterr().out)
    assert main(["mode", "eval", "--model", str(lib / "bio"), *score]) == 0
    by_path = json.loads(capsys.readouterr().out)
    assert by_entry["module"] == "bio" and by_entry["kind"] == "mode-expert"
    assert by_entry["loss"] == by_path["loss"] and by_entry["tokens"] == by_path["tokens"] > 0
    # another base's expert through eval-lm: refused by fingerprint
    assert main(["eval-lm", "--base", tiny_encoder, "--library", str(lib), "--module", "bio", *score]) == 2
    assert "'bio' was trained on base" in capsys.readouterr().err

    assert main(["library", "list", str(lib), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    meta = Library(lib).get("bio").meta
    tensors = load_file(str(lib / "bio" / "expert.safetensors"))
    assert rows["bio"]["kind"] == "mode-expert"
    assert rows["bio"]["params"] == sum(t.numel() for t in tensors.values()) == meta["params"]["total"]
    assert rows["bio"]["size_bytes"] == (lib / "bio" / "expert.safetensors").stat().st_size
    assert "2 blocks x 1 expert layers over 4" in rows["bio"]["layout"]
    assert main(["library", "list", str(lib)]) == 0
    table = capsys.readouterr().out
    assert "mode-expert" in table and "2 blocks x 1 expert layers" in table
    assert main(["library", "show", str(lib), "bio"]) == 0
    assert json.loads(capsys.readouterr().out)["entry"]["kind"] == "mode-expert"
    assert main(["library", "check", str(lib), "--base", tiny_decoder]) == 0
    assert "all 2 modules" in capsys.readouterr().out
    assert main(["library", "check", str(lib), "--base", tiny_encoder]) == 1
    assert "'bio' was trained on base" in capsys.readouterr().out

    # the wrong kind, named: LoRA commands given an expert, MoDE commands given a LoRA module
    with pytest.raises(LibraryError, match="'bio' is a mode-expert entry; this takes lora entries"):
        Library(lib).select("bio")
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"text": t, "label": t.split()[0]}) for t in ("a b", "c d")))
    assert main(["finetune", "--base", tiny_decoder, "--library", str(lib), "--modules", "bio", "--method", "domix",
                 "--train", str(task), "--eval", str(task), "--out", str(tmp_path / "t"), "--device", "cpu"]) == 2
    assert "'bio' is a mode-expert entry; this takes lora entries" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    from domix.library.pretrain import pretrain

    pretrain(domain="lora", data=[corpora["law"]], library=str(tmp_path / "mixed"), base=tiny_decoder, max_steps=1,
             batch_size=2, seq_len=16, rank=2, progress=False, device="cpu", threads=1)
    with pytest.raises(LibraryError, match="'lora' is a lora entry; this takes mode-expert entries"):
        compose(library=str(tmp_path / "mixed"), experts="lora", data=[f"lora={corpora['law']}"],
                out=str(tmp_path / "c"), **FAST)
