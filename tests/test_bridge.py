"""Stages 2–3: the bridge layer, fine-tuning, evaluation, prediction, export."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch
from safetensors.torch import load_file
from conftest import Stop, interrupt_at, make_corpus

from domix import LibraryError, pretrain
from domix.bridge.apply import apply_bridge, bridged_layers
from domix.cli import main
from domix.finetune import FinetuneConfig, finetune, load_task_model
from domix.finetune.methods import get_method
from domix.library import Library
from domix.models import fingerprint

DOMS = ["bio", "law", "food"]
FT = dict(epochs=3, batch_size=8, lr=5e-3, progress=False, device="cpu", threads=1)


@pytest.fixture(scope="module")
def libs(tiny_decoder, tiny_encoder, corpora, tmp_path_factory):
    """{base path: library with modules bio, law, food (rank 4, 4, 2: mixed ranks)}."""
    out = {}
    for base in (tiny_decoder, tiny_encoder):
        lib = tmp_path_factory.mktemp("lib")
        for dom, rank in zip(DOMS, (4, 4, 2)):
            pretrain(domain=dom, data=[corpora[dom]], library=str(lib), base=base, rank=rank, alpha=2 * rank,
                     max_steps=10, batch_size=4, seq_len=16, lr=2e-2, progress=False, device="cpu", threads=1)
        out[base] = str(lib)
    return out


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    rows = [{"text": d, "label": dom} for dom in DOMS for d in make_corpus(dom, 30, seed=7)]
    random.Random(0).shuffle(rows)
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:70]) + "\n")
    (root / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows[70:]) + "\n")
    gen = [{"prompt": f"domain of: {d[:40]}", "answer": dom} for dom in DOMS for d in make_corpus(dom, 12, seed=3)]
    random.Random(1).shuffle(gen)
    (root / "gen_train.jsonl").write_text("\n".join(json.dumps(r) for r in gen[:30]) + "\n")
    (root / "gen_dev.jsonl").write_text("\n".join(json.dumps(r) for r in gen[30:]) + "\n")
    bad = rows[70:75] + [{"text": "bake the dough", "label": "cooking"}]
    (root / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in bad) + "\n")
    return root


def _lm(base):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(base).eval()


def _mods(lib, names):
    return Library(lib).select(names)


IDS = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6]])


def test_identity_bridge_equals_peft_cat_merge(tiny_decoder, libs):
    from peft import PeftModel

    lib = libs[tiny_decoder]
    mods = _mods(lib, DOMS[:2])  # add_weighted_adapter(cat) needs equal scalings: bio, law (alpha/r = 2)
    peft = PeftModel.from_pretrained(_lm(tiny_decoder), f"{lib}/bio", adapter_name="bio")
    peft.load_adapter(f"{lib}/law", adapter_name="law")
    peft.add_weighted_adapter(["bio", "law"], [1.0, 1.0], "cat", combination_type="cat")
    peft.set_adapter("cat")
    ours = _lm(tiny_decoder)
    apply_bridge(ours, mods, "identity", fingerprint(ours))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, peft(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mixed_lib(tiny_decoder, corpora, tmp_path_factory):
    """Modules that adapt different layers with different scalings alpha/r: bio every linear
    (r 4, alpha 8: 2), law only q_proj and v_proj (r 4, alpha 4: 1), food every linear (r 2, alpha 8: 4)."""
    lib = tmp_path_factory.mktemp("mixed-lib")
    for dom, rank, alpha, targets in (("bio", 4, 8, "all-linear"), ("law", 4, 4, "q_proj,v_proj"),
                                      ("food", 2, 8, "all-linear")):
        pretrain(domain=dom, data=[corpora[dom]], library=str(lib), base=tiny_decoder, rank=rank, alpha=alpha,
                 targets=targets, max_steps=4, batch_size=4, seq_len=16, lr=2e-2, progress=False, device="cpu",
                 threads=1)
    return str(lib)


@pytest.mark.parametrize("which", ["equal", "mixed"])
def test_uniform_bridge_is_the_average_of_module_updates(which, tiny_decoder, libs, mixed_lib):
    """P = I/N starts the model at (1/N)·Σ_k ΔW_k with N the chosen modules — also where a layer
    is adapted by only some of them, and when their scalings alpha/r differ."""
    from peft import PeftModel

    lib = libs[tiny_decoder] if which == "equal" else mixed_lib
    base = _lm(tiny_decoder)
    W0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    deltas = []
    for name in DOMS:
        merged = PeftModel.from_pretrained(_lm(tiny_decoder), f"{lib}/{name}").merge_and_unload()
        deltas.append({n: merged.get_submodule(n).weight.detach() - w for n, w in W0.items()})
    avg = _lm(tiny_decoder)
    with torch.no_grad():
        for n in W0:
            avg.get_submodule(n).weight += sum(d[n] for d in deltas) / len(deltas)
    ours = _lm(tiny_decoder)
    apply_bridge(ours, _mods(lib, DOMS), "uniform", fingerprint(ours))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, avg(IDS).logits, rtol=1e-5, atol=1e-5)


def test_a_cat_gets_no_gradient_and_permutation_invariance(tiny_decoder, libs):
    lib = libs[tiny_decoder]
    m1 = _lm(tiny_decoder)
    apply_bridge(m1, _mods(lib, ["bio", "law", "food"]), "rank", fingerprint(m1))
    layer = next(iter(bridged_layers(m1).values()))
    assert "domix_A.default" not in dict(layer.named_parameters()) and "domix_A.default" in dict(layer.named_buffers())
    with torch.no_grad():  # a random, non-diagonal P: the permuted model must still agree
        for l in bridged_layers(m1).values():
            l.bridge()[1].copy_(torch.randn_like(l.bridge()[1]) * 0.1)
    A, P, B, _ = layer.bridge()
    A0 = A.clone()
    m1(IDS).logits.sum().backward()
    assert P.grad is not None and B.grad is not None
    assert A.grad is None and torch.equal(A, A0)
    # permute the modules: food, bio, law — and P's blocks accordingly
    m2 = _lm(tiny_decoder)
    apply_bridge(m2, _mods(lib, ["food", "bio", "law"]), "rank", fingerprint(m2))
    ranks = {"bio": 4, "law": 4, "food": 2}
    start = {"bio": 0, "law": 4, "food": 8}
    idx = torch.cat([torch.arange(start[n], start[n] + ranks[n]) for n in ["food", "bio", "law"]])
    with torch.no_grad():
        for name, l2 in bridged_layers(m2).items():
            l2.bridge()[1].copy_(bridged_layers(m1)[name].bridge()[1][idx][:, idx])
        torch.testing.assert_close(m2(IDS).logits, m1(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["tiny_decoder", "tiny_encoder"])
def test_classify_finetune_evaluate_predict_export(kind, request, libs, task_files, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = request.getfixturevalue(kind)
    out = tmp_path / "task"
    m = finetune(train=str(task_files / "train.jsonl"), eval=str(task_files / "dev.jsonl"), out=str(out),
                 library=libs[base], base=base, **{**FT, "epochs": 10, "lr": 1e-2})
    for key in ("accuracy", "macro_f1", "trainable_params", "total_params", "train_loss", "history"):
        assert key in m
    assert m["accuracy"] > 0.6, m["accuracy"]  # 3 separable classes; chance is 1/3
    assert {"model.safetensors", "task.json", "metrics.json", "loss.png", "bridge.png"} <= {p.name for p in out.iterdir()}
    model, tok, spec = load_task_model(out, device="cpu")
    # only P, B_cat and the head are trained; the task model stores them and the frozen A_cat, nothing else
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert all(k.endswith((".domix_A.default", ".domix_P.default", ".domix_B.default")) or k in spec["head"]
               for k in saved)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {k for k in saved if ".domix_A." not in k}
    assert main(["evaluate", "--model", str(out), "--data", str(task_files / "dev.jsonl"), "--device", "cpu", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] == pytest.approx(m["accuracy"]) and len(ev["confusion_matrix"]) == 3
    assert main(["predict", "--model", str(out), "--text", "court judge appeal ruling", "--device", "cpu",
                 "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)[0]
    assert set(pred["probabilities"]) == set(DOMS) and abs(sum(pred["probabilities"].values()) - 1) < 1e-4
    # unknown label: refused with its name
    assert main(["evaluate", "--model", str(out), "--data", str(task_files / "bad.jsonl"), "--device", "cpu"]) == 2
    assert "cooking" in capsys.readouterr().err
    # exports give the same logits without domix
    enc = tok(["court judge appeal ruling", "bake the dough with salt"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "merged"), "--format", "merged"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "bio", 1: "food", 2: "law"}
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "lora"), "--format", "peft-lora"]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    adapter = PeftModel.from_pretrained(plain, str(tmp_path / "lora")).eval()
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 10  # N·r = 4 + 4 + 2
    with torch.no_grad():
        for other in (merged(**enc).logits, adapter(**enc).logits):
            assert (torch.linalg.norm(other - ref) / torch.linalg.norm(ref)).item() <= 1e-4
    capsys.readouterr()
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "lora4"), "--format", "peft-lora",
                 "--rank", "4", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["lora_rank"] == 4 and 0 < rep["max_relative_error"] < 1
    # `bench ranks` scores the task model as `export --rank K` writes it, then untruncated
    assert main(["bench", "ranks", "--model", str(out), "--data", str(task_files / "dev.jsonl"), "--ranks", "0,2,4,16",
                 "--device", "cpu", "--out", str(tmp_path / "ranks.json"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    pts = res["points"]
    assert res["full_rank"] == 10
    assert [(p["rank"], p["truncated"]) for p in pts] == [(0, True), (2, True), (4, True), (10, False)]
    assert pts[-1]["macro_f1"] == pytest.approx(ev["macro_f1"]) and pts[-1]["max_relative_error"] == 0
    assert pts[0]["max_relative_error"] == pytest.approx(1) and pts[0]["lora_params"] == 0  # no update at all
    assert pts[1]["max_relative_error"] > pts[2]["max_relative_error"] > 0
    assert pts[2]["max_relative_error"] == pytest.approx(rep["max_relative_error"], rel=1e-4)
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "merged4"), "--format", "merged",
                 "--rank", "4"]) == 0
    from domix.finetune import predict_classify

    rows = [json.loads(line) for line in (task_files / "dev.jsonl").read_text().splitlines()]
    merged4 = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged4").eval()
    probs = predict_classify(merged4, tok, [r["text"] for r in rows], max_len=spec["max_seq_len"])
    gold = torch.tensor([spec["labels"].index(r["label"]) for r in rows])
    assert -torch.log(probs[torch.arange(len(rows)), gold]).mean().item() == pytest.approx(pts[2]["loss"], abs=1e-4)
    assert json.loads((tmp_path / "ranks.json").read_text())["points"] == pts
    assert (tmp_path / "ranks.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["tiny_decoder"])
def test_generate_task(kind, request, libs, task_files, tmp_path):
    base = request.getfixturevalue(kind)
    m = finetune(train=str(task_files / "gen_train.jsonl"), eval=str(task_files / "gen_dev.jsonl"),
                 out=str(tmp_path / "gen"), library=libs[base], base=base, task="generate",
                 **{**FT, "epochs": 8, "lr": 1e-2})
    hist = [h["loss"] for h in m["history"] if "loss" in h]
    assert m["task"] == "generate" and hist[-1] < hist[0]
    # the reported exact match is the share of dev answers the saved model reproduces exactly
    from domix.finetune.evaluate import generate_answers

    model, tok, spec = load_task_model(tmp_path / "gen", device="cpu")
    rows = [json.loads(line) for line in (task_files / "gen_dev.jsonl").read_text().splitlines()]
    answers = generate_answers(model, tok, [r["prompt"] for r in rows], spec["max_new_tokens"])
    assert m["accuracy"] == pytest.approx(sum(a == r["answer"] for a, r in zip(answers, rows)) / len(rows))


def test_generate_task_on_an_encoder_is_refused(tiny_encoder, libs, task_files, tmp_path):
    with pytest.raises(ValueError, match="decoder"):
        finetune(train=str(task_files / "gen_train.jsonl"), eval=str(task_files / "gen_dev.jsonl"),
                 out=str(tmp_path / "gen"), library=libs[tiny_encoder], base=tiny_encoder, task="generate", **FT)


def test_single_module_and_foreign_base(tiny_decoder, tiny_encoder, libs, task_files, tmp_path):
    m = finetune(train=str(task_files / "train.jsonl"), eval=str(task_files / "dev.jsonl"), out=str(tmp_path / "one"),
                 library=libs[tiny_decoder], modules="law", base=tiny_decoder, bridge_init="own:law", **FT)
    # one module of rank 4: its bridge is 4 x 4 and B_cat is its B, per adapted layer, plus the head
    model, _, spec = load_task_model(tmp_path / "one", device="cpu")
    layers = bridged_layers(model)
    assert [x["name"] for x in spec["modules"]] == ["law"] and layers
    sizes = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    expected = sum(16 + layer.out_features * 4 for layer in layers.values()) + sizes["score.weight"]
    assert m["trainable_params"] == sum(sizes.values()) == expected
    with pytest.raises(LibraryError, match="module 'bio' was trained on base"):
        finetune(train=str(task_files / "train.jsonl"), eval=str(task_files / "dev.jsonl"), out=str(tmp_path / "x"),
                 library=libs[tiny_encoder], base=tiny_decoder, **FT)
    assert not (tmp_path / "x").exists()


def test_unknown_eval_label_is_refused_before_training(tiny_decoder, libs, task_files, tmp_path):
    with pytest.raises(ValueError, match="cooking"):
        finetune(train=str(task_files / "train.jsonl"), eval=str(task_files / "bad.jsonl"), out=str(tmp_path / "x"),
                 library=libs[tiny_decoder], base=tiny_decoder, **FT)


def test_interrupted_finetune_resumes_to_the_same_model(tiny_decoder, libs, task_files, tmp_path):
    from safetensors.torch import load_file

    opts = dict(train=str(task_files / "train.jsonl"), eval=str(task_files / "dev.jsonl"), library=libs[tiny_decoder],
                base=tiny_decoder, save_steps=4, eval_every=100, **FT)
    finetune(out=str(tmp_path / "ref"), **opts)
    with pytest.raises(Stop):
        finetune(out=str(tmp_path / "run"), callbacks=[interrupt_at(6)], **opts)
    assert not (tmp_path / "run").exists()
    m = finetune(out=str(tmp_path / "run"), resume=True, **opts)
    assert m["resumed_from"] == "checkpoint-4"
    ref, run = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert ref.keys() == run.keys()
    for k in ref:
        torch.testing.assert_close(run[k], ref[k], rtol=1e-5, atol=1e-6)
    # --resume on the finished model: reported complete (its metrics), left alone
    weights = tmp_path / "run" / "model.safetensors"
    before = (weights.read_bytes(), weights.stat().st_mtime_ns)
    again = finetune(out=str(tmp_path / "run"), resume=True, callbacks=[interrupt_at(1)], **opts)
    assert again == json.loads((tmp_path / "run" / "metrics.json").read_text()) and again["resumed_from"] == "checkpoint-4"
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == before


@pytest.mark.parametrize("method", ["domix", "lora", "mode"])
def test_every_method_saves_and_loads_back_the_same_model(method, tiny_decoder, libs, corpora, task_files, tmp_path):
    """Each method of the registry rebuilds its structure from task.json and gets its tensors back."""
    opts = dict(train=str(task_files / "train.jsonl"), eval=str(task_files / "dev.jsonl"), base=tiny_decoder, **FT)
    if method == "mode":
        from domix.mode.train import pretrain_expert

        lib = tmp_path / "experts"
        for dom in ("bio", "law"):
            pretrain_expert(domain=dom, data=[corpora[dom]], library=str(lib), base=tiny_decoder, max_steps=2,
                            batch_size=4, seq_len=16, blocks=2, expert_layers=1, progress=False, device="cpu")
        opts.update(library=str(lib))
    elif method == "lora":
        opts.update(library=libs[tiny_decoder], init_module="law")
    else:
        opts.update(library=libs[tiny_decoder])
    m = finetune(out=str(tmp_path / "task"), method=method, **opts)
    model, tok, spec = load_task_model(tmp_path / "task", device="cpu")
    assert spec["method"] == method and spec["format"] == 3 and spec["head"] == ["score.weight"]
    probs = torch.softmax(model(**tok(["court judge appeal ruling"], return_tensors="pt")).logits, -1)
    again, _, _ = load_task_model(tmp_path / "task", device="cpu")
    torch.testing.assert_close(torch.softmax(again(**tok(["court judge appeal ruling"], return_tensors="pt")).logits, -1),
                               probs)
    assert m["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "task" / "model.safetensors"))
    if method == "domix":  # a format-2 task model (the bridge's tensors named `<layer>.lora_A`) loads the same
        old = {k.replace(".domix_", ".lora_").removesuffix(".default") if ".domix_" in k else k: v
               for k, v in tensors.items()}
        save_file(old, str(tmp_path / "task" / "model.safetensors"))
        was, _, _ = load_task_model(tmp_path / "task", device="cpu")
        torch.testing.assert_close(torch.softmax(was(**tok(["court judge appeal ruling"], return_tensors="pt")).logits,
                                                 -1), probs)
    # a task model missing any tensor it needs (the head, a bridge, an adapter, an expert) is refused
    # with the tensor's name, never completed from the base or a fresh random head
    head = next(k for k in sorted(tensors) if k.startswith("score."))  # LoRA: PEFT's copy of the head
    body = next(k for k in sorted(tensors) if not k.startswith("score."))
    for gone in (head, body):
        save_file({k: v for k, v in tensors.items() if k != gone}, str(tmp_path / "task" / "model.safetensors"))
        with pytest.raises(LibraryError, match=f"lacks 1 tensor.*{re.escape(gone)}"):
            load_task_model(tmp_path / "task", device="cpu")
    save_file({**tensors, "extra.weight": torch.zeros(1)}, str(tmp_path / "task" / "model.safetensors"))
    with pytest.raises(LibraryError, match="does not have: extra.weight"):
        load_task_model(tmp_path / "task", device="cpu")


def test_a_format_1_task_model_loads_and_a_newer_format_is_refused(tiny_decoder, libs, task_files, tmp_path):
    """Task models written before task.json named the head (format 1) load and predict the same;
    one written by a newer domix is refused, naming both formats."""
    import shutil

    out = tmp_path / "task"
    finetune(train=str(task_files / "train.jsonl"), eval=str(task_files / "dev.jsonl"), out=str(out),
             library=libs[tiny_decoder], base=tiny_decoder, **FT)
    model, tok, spec = load_task_model(out, device="cpu")
    enc = tok(["court judge appeal ruling", "bake the dough with salt"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
    old = tmp_path / "old"
    shutil.copytree(out, old)
    task = json.loads((old / "task.json").read_text())
    task["format"] = 1  # what format 1 wrote: no head names, the settings of its FinetuneConfig
    del task["head"]
    for new_field in ("grad_accum", "gradient_checkpointing"):
        del task["settings"][new_field]
    (old / "task.json").write_text(json.dumps(task))
    model1, _, spec1 = load_task_model(old, device="cpu")
    assert spec1["head"] == spec["head"] == ["score.weight"]
    with torch.no_grad():
        torch.testing.assert_close(model1(**enc).logits, ref)
    assert main(["export", "--model", str(old), "--out", str(tmp_path / "lora"), "--format", "peft-lora"]) == 0
    task["format"] = 99
    (old / "task.json").write_text(json.dumps(task))
    with pytest.raises(LibraryError, match="format 99.*reads formats up to 3"):
        load_task_model(old, device="cpu")
    task["format"] = 2
    task["settings"]["warp_drive"] = True  # a setting from a newer domix: named, not a TypeError
    (old / "task.json").write_text(json.dumps(task))
    with pytest.raises(LibraryError, match="does not know: warp_drive"):
        load_task_model(old, device="cpu")


def test_keep_best_puts_back_the_best_evaluation(tiny_decoder, libs, task_files, tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):  # the trained tensors at every evaluation
        at: dict = {}

        def on_evaluate(self, args, state, control, model=None, **kw):
            self.at[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    snaps = Snapshots()
    m = finetune(train=str(task_files / "train.jsonl"), eval=str(task_files / "dev.jsonl"), out=str(tmp_path / "best"),
                 library=libs[tiny_decoder], base=tiny_decoder, eval_every=2, keep_best=True, callbacks=[snaps],
                 **{**FT, "epochs": 4, "lr": 5e-2})
    evals = [(h["step"], h["eval_macro_f1"]) for h in m["history"] if "eval_macro_f1" in h]
    best = max(f1 for _, f1 in evals)
    assert m["kept_step"] == next(step for step, f1 in evals if f1 == best) and m["best_eval"] == best
    assert m["steps_run"] == m["steps"] and m["kept_step"] < evals[-1][0]
    assert m["macro_f1"] == pytest.approx(best, abs=1e-9)  # the final evaluation scores the kept model
    saved = load_file(str(tmp_path / "best" / "model.safetensors"))
    kept, last = snaps.at[m["kept_step"]], snaps.at[evals[-1][0]]
    assert all(torch.equal(saved[n], t) for n, t in kept.items())  # the task model holds the kept step's tensors
    assert not all(torch.equal(saved[n], t) for n, t in last.items())


def test_patience_stops_a_run_that_no_longer_improves(tiny_decoder, libs, task_files, tmp_path):
    """With nothing learning (lr 0), the first evaluation stays the best: two more without
    improvement stop the run there."""
    m = finetune(train=str(task_files / "train.jsonl"), eval=str(task_files / "dev.jsonl"), out=str(tmp_path / "stop"),
                 library=libs[tiny_decoder], base=tiny_decoder, eval_every=2, patience=2,
                 **{**FT, "epochs": 6, "lr": 0.0, "bridge_lr": 0.0})
    assert m["steps_run"] == 6 < m["steps"] and m["kept_step"] == 2


def test_an_interrupted_keep_best_run_resumes_with_its_best(tiny_decoder, libs, task_files, tmp_path):
    from safetensors.torch import load_file

    opts = dict(train=str(task_files / "train.jsonl"), eval=str(task_files / "dev.jsonl"), library=libs[tiny_decoder],
                base=tiny_decoder, save_steps=4, eval_every=2, keep_best=True, **{**FT, "epochs": 4, "lr": 5e-2})
    ref = finetune(out=str(tmp_path / "ref"), **opts)
    with pytest.raises(Stop):
        finetune(out=str(tmp_path / "run"), callbacks=[interrupt_at(7)], **opts)
    m = finetune(out=str(tmp_path / "run"), resume=True, **opts)
    assert m["resumed_from"] == "checkpoint-4" and (m["kept_step"], m["best_eval"]) == (ref["kept_step"], ref["best_eval"])
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # killed after the Trainer's checkpoint files but before the best tensors: that checkpoint is cut short
    from domix.training import KEEP_BEST_FILE

    with pytest.raises(Stop):
        finetune(out=str(tmp_path / "cut"), callbacks=[interrupt_at(7)], **opts)
    (tmp_path / ".cut.work" / "checkpoint-4" / KEEP_BEST_FILE).unlink()
    m = finetune(out=str(tmp_path / "cut"), resume=True, **opts)
    assert m["resumed_from"] is None and (m["kept_step"], m["best_eval"]) == (ref["kept_step"], ref["best_eval"])


@pytest.mark.parametrize("method", ["domix", "lora"])
def test_trained_tensors_are_fp32_and_the_base_follows_dtype(method, tiny_decoder, libs, task_files, tmp_path):
    """A checkpoint stored in bf16 (as most hub models are): with the default fp32 everything is
    fp32; with --dtype bf16 the frozen base is bf16 and every trained tensor (bridge, B, LoRA, head)
    fp32, in training and in the saved task model."""
    import shutil

    from domix.finetune.taskmodel import build_model

    bf16 = tmp_path / "bf16-base"
    shutil.copytree(tiny_decoder, bf16)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_decoder).to(torch.bfloat16).save_pretrained(bf16)
    lib = tmp_path / "lib"
    for dom in ("bio", "law"):
        pretrain(domain=dom, data=[str(task_files / "train.jsonl")], library=str(lib), base=str(bf16), rank=4,
                 alpha=8, max_steps=2, batch_size=4, seq_len=16, progress=False, device="cpu", text_field="text")
    opts = dict(train=str(task_files / "train.jsonl"), eval=str(task_files / "dev.jsonl"), base=str(bf16),
                method=method, library=str(lib), **({"init_module": "law"} if method == "lora" else {}))
    for dtype, base_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = FinetuneConfig(out=str(tmp_path / dtype), dtype=dtype, **opts, **FT)
        model, _ = build_model(get_method(method).prepare(cfg), ["bio", "food", "law"])
        trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        assert trained and set(trained.values()) == {torch.float32}, trained
        assert frozen == {base_dtype}
        m = finetune(cfg)
        assert 0 < m["eval"]["examples"]
        saved = load_file(str(tmp_path / dtype / "model.safetensors"))
        assert {t.dtype for t in saved.values()} == {torch.float32}
