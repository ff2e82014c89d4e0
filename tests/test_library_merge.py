"""`domix library merge`: LoRA modules merged by PEFT's own `add_weighted_adapter` into a new
library entry (linear, TIES, DARE-TIES), its refusals, and the benchmark's merge baselines."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_bench_quality import DOMS, TASKS, TINY, data_root  # noqa: F401  (data_root: a fixture)

from domix import Library, LibraryError, pretrain
from domix.cli import main
from domix.library.merge import DEFAULT_DENSITY, merge_modules

TRAIN = dict(max_steps=3, batch_size=2, seq_len=16, rank=4, progress=False, device="cpu", threads=1)


@pytest.fixture(scope="module")
def lib(tiny_decoder, corpora, tmp_path_factory):
    """Two rank-4 modules (bio, law), a rank-2 module, a full entry and a module of another base."""
    root = tmp_path_factory.mktemp("merge-lib")
    for dom in ("bio", "law"):
        pretrain(domain=dom, data=[corpora[dom]], library=str(root), base=tiny_decoder, **TRAIN)
    pretrain(domain="r2", data=[corpora["food"]], library=str(root), base=tiny_decoder, **{**TRAIN, "rank": 2})
    pretrain(domain="whole", data=[corpora["food"]], library=str(root), base=tiny_decoder, full=True,
             **{**TRAIN, "max_steps": 1})
    shutil.copytree(root / "bio", root / "other")
    meta = json.loads((root / "other" / "domix.json").read_text())
    (root / "other" / "domix.json").write_text(json.dumps({**meta, "base": "another-base", "base_fingerprint": "f" * 32}))
    return root


def peft_merge(base: str, lib, names: list[str], combination: str, weights, density, seed: int = 0):
    """PEFT's own merge, computed here independently: (the PeftModel with adapter "x", its tensors)."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(lib / names[0]),
                                      adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(lib / n), adapter_name=n)
    torch.manual_seed(seed)
    model.add_weighted_adapter(names, weights, adapter_name="x", combination_type=combination, density=density)
    return model, get_peft_model_state_dict(model, adapter_name="x")


@pytest.mark.parametrize("combination,weights,density", [("linear", None, None), ("ties", None, None),
                                                         ("ties", [0.7, 0.3], 0.5), ("dare_ties", None, None)])
def test_the_entry_holds_pefts_own_merge(lib, tiny_decoder, tmp_path, combination, weights, density):
    meta = merge_modules(lib, "bio,law", combination, "m", weights=weights, density=density, into=tmp_path)
    used_w = weights or [0.5, 0.5]
    used_d = None if combination == "linear" else (density or DEFAULT_DENSITY)
    _, expected = peft_merge(tiny_decoder, lib, ["bio", "law"], combination, used_w, used_d)
    got = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    assert set(got) == set(expected) and got
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert meta["merged"] == {**meta["merged"], "modules": ["bio", "law"], "combination": combination,
                              "weights": used_w, "density": used_d}
    bio = Library(lib).get("bio").meta
    assert meta["kind"] == "lora" and meta["base_fingerprint"] == bio["base_fingerprint"]
    assert meta["rank"] == 4 and meta["alpha"] == 4  # PEFT's merged adapter: rank r, alpha = r
    assert meta["objective"] == bio["objective"] and meta["targets"] == bio["targets"]
    assert json.loads((tmp_path / "m" / "domix.json").read_text()) == meta
    assert Library(tmp_path).get("m", kinds=("lora",)).summary()["kind"] == "lora"


def test_dare_ties_is_seeded(lib, tmp_path):
    a = merge_modules(lib, ["bio", "law"], "dare_ties", "a", into=tmp_path, seed=1)
    merge_modules(lib, ["bio", "law"], "dare_ties", "b", into=tmp_path, seed=1)
    merge_modules(lib, ["bio", "law"], "dare_ties", "c", into=tmp_path, seed=2)
    ta, tb, tc = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "abc")
    assert all(torch.equal(ta[k], tb[k]) for k in ta) and not all(torch.equal(ta[k], tc[k]) for k in ta)
    assert a["seed"] == 1


def test_the_entry_loads_with_plain_peft(lib, tiny_decoder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from domix.models import fingerprint

    merge_modules(lib, "bio,law", "ties", "m", into=tmp_path)
    ref, _ = peft_merge(tiny_decoder, lib, ["bio", "law"], "ties", [0.5, 0.5], DEFAULT_DENSITY)
    ref.set_adapter("x")
    base = AutoModelForCausalLM.from_pretrained(tiny_decoder)
    assert Library(tmp_path).check(base, fingerprint(base)) == []
    plain = PeftModel.from_pretrained(base, str(tmp_path / "m"))
    ids = torch.arange(3, 15).reshape(2, 6)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("modules,combination,error,words", [
    ("bio,other", "linear", LibraryError, ["different bases", "bio", "other", "another-base"]),
    ("bio,whole", "linear", LibraryError, ["'whole' is a full entry"]),
    ("bio", "ties", LibraryError, ["at least 2 modules"]),
    ("bio,law", "svd", ValueError, ["unknown combination 'svd'"]),
    ("bio,r2", "ties", LibraryError, ["one rank", "bio r=4", "r2 r=2"]),
    ("bio,r2", "linear", LibraryError, ["one rank"]),
    ("bio,nope", "linear", LibraryError, ["no module 'nope'"]),
])
def test_refusals(lib, tmp_path, modules, combination, error, words):
    with pytest.raises(error) as e:
        merge_modules(lib, modules, combination, "m", into=tmp_path)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "m").exists()


def test_bad_weights_density_and_names_are_refused(lib, tmp_path):
    for kw, words in (({"weights": [1.0]}, "1 weights for 2 modules"), ({"density": 0.0}, "density must be"),
                      ({"combination": "linear", "density": 0.5}, "ties and dare_ties"), ({"out": ".x"}, "invalid")):
        with pytest.raises(ValueError, match=words):
            merge_modules(lib, "bio,law", **{"combination": "ties", "out": "m", "into": tmp_path, **kw})
    merge_modules(lib, "bio,law", "linear", "m", into=tmp_path)
    with pytest.raises(FileExistsError):
        merge_modules(lib, "bio,law", "linear", "m", into=tmp_path)
    merge_modules(lib, "bio,law", "ties", "m", into=tmp_path, overwrite=True)
    assert Library(tmp_path).get("m").meta["merged"]["combination"] == "ties"


def test_cli(lib, tmp_path, capsys):
    work = tmp_path / "lib"
    shutil.copytree(lib, work)
    assert main(["library", "merge", "--library", str(work), "--modules", "bio,law", "--combination", "dare_ties",
                 "--density", "0.5", "--weights", "1,2", "--out", "both", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["merged"]["weights"] == [1.0, 2.0] and out["merged"]["density"] == 0.5
    assert "both" in Library(work).names() and main(["library", "list", str(work)]) == 0
    assert main(["library", "merge", "--library", str(work), "--modules", "bio,other", "--combination", "linear",
                 "--out", "x"]) == 2
    assert "different bases" in capsys.readouterr().err


def test_bench_merge_methods_fine_tune_from_one_merged_module(tiny_decoder, data_root, tmp_path):  # noqa: F811
    """linear-merge and ties-merge: one merge job each (after the modules), reused by every task's
    fine-tuning, which starts from the merged entry as own-lora starts from its domain's module."""
    from domix.bench.quality import run_quality

    methods = ["own-lora", "linear-merge", "ties-merge"]
    res = run_quality("quick", out=tmp_path, base=tiny_decoder, data_root=data_root, workers=2, progress=False,
                      methods=methods, overrides=TINY)
    assert not res["failures"], res["failures"]
    assert all(set(by) == set(methods) for by in res["tasks"].values()) and set(res["tasks"]) == TASKS
    assert set(res["selection"]) == set(methods)
    assert res["selection"]["linear-merge"]["lr"] == res["selection"]["own-lora"]["lr"]
    merges = {n: j for n, j in res["jobs"].items() if j["kind"] == "merge"}
    assert set(merges) == {"merge/linear", "merge/ties"} and all(j["status"] == "done" for j in merges.values())
    for method, comb in (("linear-merge", "linear"), ("ties-merge", "ties")):
        entries = list((tmp_path / "work").glob(f"merge-{comb}-*/{method}/domix.json"))
        assert len(entries) == 1
        meta = json.loads(entries[0].read_text())
        assert meta["merged"]["modules"] == DOMS and meta["merged"]["combination"] == comb
        starts = set()
        for task in TASKS:
            (run,) = res["tasks"][task][method]["runs"]
            (ft,) = (tmp_path / "work").glob(f"ft-*-{run['job'].split('/')[1]}")
            init = json.loads((ft / "model" / "task.json").read_text())["init_module"]
            starts.add(init["path"])
            assert init["r"] == meta["rank"]
        assert starts == {str(entries[0].parent)}
        assert res["efficiency"][method]["merge_s"] > 0
    assert "Merge baselines" in (tmp_path / "REPORT.md").read_text()
