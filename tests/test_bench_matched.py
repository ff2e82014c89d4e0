"""The matched preset's protocol on tiny fixtures: capacity-matched baselines (their ranks computed
from the base and the library), the control over untrained modules, one dev grid of learning rates
for every method, and committed records that restore a run and recompute its verdicts."""
from __future__ import annotations

import json
import shutil

import pytest
from test_bench_quality import DOMS, TASKS, TINY, data_root  # noqa: F401  (data_root: a fixture)

from domix.bench.quality import run_quality
from domix.bench.quality.capacity import matched_ranks, target_shapes
from domix.bench.quality.records import read_records

METHODS = ["base-lora", "base-lora-params", "base-lora-rank", "own-lora", "domix", "domix-untrained"]
MATCHED = {**TINY, "lr_grid": [1.0, 2.0], "module_seeds": {"1": 7},
           "finetune": {**TINY["finetune"], "eval_every": 1, "keep_best": True, "patience": 1, "epochs": 2.0}}


def _run(base, root, out, **kw):
    return run_quality("matched", out=out, base=base, data_root=root, workers=2, progress=False, seeds=[0, 1],
                       methods=METHODS, overrides=MATCHED, **kw)


@pytest.fixture(scope="module")
def matched(tiny_decoder, data_root, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("matched")
    res = _run(tiny_decoder, data_root, out)
    res["_out"] = out
    return res


def test_matched_ranks_by_hand():
    # two layers 8x4 and 4x8; DoMIX over 2 modules of rank 2: B's 8*4 + 4*4 and P 16 + 16 -> 80 parameters;
    # a LoRA trains 12 per rank per layer, 24 in all: rank 80 / 24 = 3.33 -> 3
    r = matched_ranks([(8, 4), (4, 8)], 2, 2)
    assert r == {"params": 3, "rank": 4, "domix_params": 80, "lora_params_per_rank": 24, "params_lora": 72,
                 "modules": 2, "module_rank": 2}
    with pytest.raises(ValueError, match="no target layers"):
        matched_ranks([], 2, 2)


def test_capacity_matched_baselines_train_domix_count(matched, tiny_decoder):
    res = matched
    assert not res["failures"], res["failures"]
    cap = res["settings"]["capacity"]
    assert cap == matched_ranks(target_shapes(tiny_decoder), len(DOMS), res["settings"]["pretrain"]["rank"])
    eff = res["efficiency"]
    head = eff["base-lora"]["trainable_params"] - cap["lora_params_per_rank"] * TINY["finetune"]["base_lora_rank"]
    assert eff["base-lora-params"]["trainable_params"] == cap["params"] * cap["lora_params_per_rank"] + head
    assert eff["base-lora-rank"]["trainable_params"] == cap["rank"] * cap["lora_params_per_rank"] + head
    # DoMIX's own count (B's, P, the head) is what the parameter-matched rank was matched to
    assert eff["domix"]["trainable_params"] == cap["domix_params"] + head
    assert abs(eff["base-lora-params"]["trainable_params"] - eff["domix"]["trainable_params"]) \
        <= cap["lora_params_per_rank"] / 2


def test_the_control_mixes_untrained_modules(matched):
    import torch
    from safetensors.torch import load_file

    out = matched["_out"] / "work"
    seed0 = lambda lib: json.loads((lib / DOMS[0] / "domix.json").read_text())["seed"] == 0  # noqa: E731
    (lib_u,) = [p for p in out.glob("lib-untrained-*") if seed0(p)]
    (lib_a,) = [p for p in out.glob(f"lib-{DOMS[0]}-*") if seed0(p)]
    for d in DOMS:
        u = load_file(str(lib_u / d / "adapter_model.safetensors"))
        t = load_file(str(lib_a / d / "adapter_model.safetensors"))
        assert all(not v.any() for k, v in u.items() if "lora_B" in k)  # B = 0: no domain knowledge
        # the same A initialisation as the trained module started from (seeded by the module's name)
        meta_u = json.loads((lib_u / d / "domix.json").read_text())
        meta_t = json.loads((lib_a / d / "domix.json").read_text())
        assert meta_u["module_seed"] == meta_t["module_seed"]
        assert any(not torch.equal(u[k], t[k]) for k in u)
    assert {r["method"] for r in matched["runs"]} == set(METHODS)


def test_every_method_gets_the_same_grid_chosen_on_dev(matched):
    sel, scale = matched["selection"], matched["settings"]["lr_scale"]
    for m in METHODS:
        s = sel[m]
        assert s["factors"] == [1.0, 2.0] and len(s["grid"]) == 2 and len(s["dev"]) == 2
        best = max(zip(s["factors"], s["dev"]), key=lambda fd: (fd[1], -fd[0]))[0]
        assert s["chosen_factor"] == best == scale[m]
        assert s["chosen"] == s["grid"][s["factors"].index(best)]
    assert sel["domix"]["grid"][1] == {"lr": 2 * sel["domix"]["grid"][0]["lr"],
                                       "bridge_lr": 2 * sel["domix"]["grid"][0]["bridge_lr"]}
    assert sel["base-lora"]["grid"][0]["bridge_lr"] is None
    report = (matched["_out"] / "REPORT.md").read_text()
    for section in ("## Learning rates: one dev grid for every method", "## Capacity: trainable parameters",
                    "kept the last allowed step", "### The same from the seeds that chose nothing", "Holm-corrected"):
        assert section in report, section
    assert (matched["_out"] / "plots" / "lr_grid.png").stat().st_size > 0
    # the second seed ran at the chosen factor only; the first seed's reported run is the grid's
    assert len([r for r in matched["runs"] if r["seed"] == 1 and r["method"] == "base-lora"]) == len(TASKS)


def test_the_grid_chooses_nothing_on_test(matched, tiny_decoder, data_root, tmp_path):  # noqa: F811
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    for task in TASKS:  # every test label changed: no choice may move
        path = root / "tasks" / task / "test.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        labels = sorted({r["label"] for r in rows})
        path.write_text("".join(json.dumps({**r, "label": labels[(labels.index(r["label"]) + 1) % len(labels)]}) + "\n"
                                for r in rows))
    res = _run(tiny_decoder, root, tmp_path / "out")
    assert res["settings"]["lr_scale"] == matched["settings"]["lr_scale"]
    assert {m: s["dev"] for m, s in res["selection"].items()} == {m: s["dev"] for m, s in matched["selection"].items()}


def test_records_restore_a_run_on_another_machine(matched, tiny_decoder, data_root, tmp_path):  # noqa: F811
    recs = read_records(matched["_out"] / "predictions")
    assert set(recs) == {r["job"] for r in matched["runs"]} | {n for n in matched["jobs"] if n.startswith("finetune/")}
    assert all("test_predictions" in r for r in recs.values())
    # the same --out on a fresh machine, with the records alone: no fine-tune runs again, every score is
    # the same (the records' names are the jobs' keys, which hold the prepared data's paths under --out)
    out = matched["_out"]
    kept = tmp_path / "kept"
    shutil.move(out, kept)
    try:
        shutil.copytree(kept / "predictions", out / "predictions")
        res = _run(tiny_decoder, data_root, out)
        fts = {n: j for n, j in res["jobs"].items() if n.startswith("finetune/")}
        assert fts and all(j["reused"] for j in fts.values())
        assert res["tasks"] == matched["tasks"] and res["verdicts"] == matched["verdicts"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(kept, out)


def test_bench_verdicts_recomputes_the_report_from_committed_files(matched, tmp_path, capsys):
    from domix.bench.verdicts import recompute
    from domix.cli import main

    out = matched["_out"]
    got = recompute(out)
    assert got["matches"] and got["verdicts"] == json.loads((out / "results.json").read_text())["verdicts"]
    assert got["verdicts_unselected_seeds"] == matched["verdicts_unselected_seeds"]
    # every comparison was made from the seed(s) that chose nothing only
    assert all(c["seeds"] == [1] for v in got["verdicts_unselected_seeds"].values() for c in v["comparisons"])
    assert main(["bench", "verdicts", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["verdicts"] == got["verdicts"] and printed["matches"] is True
    # a copy whose predictions were changed no longer matches; a truncated record is refused by name
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("work"))
    import gzip

    job = next(r["job"] for r in matched["runs"] if r["method"] == "domix" and r.get("order") != "reviews,bio")
    first = sorted((copy / "predictions").glob(f"*-{job.split('/')[1]}.json.gz"))
    first += sorted(set((copy / "predictions").glob("*.json.gz")) - set(first))
    rec = json.loads(gzip.decompress(first[0].read_bytes()))
    rec["test_predictions"]["y_pred"] = [1 - p if p in (0, 1) else p for p in rec["test_predictions"]["y_pred"]]
    first[0].write_bytes(gzip.compress(json.dumps(rec).encode()))
    assert recompute(copy)["matches"] is False
    first[1].write_bytes(first[1].read_bytes()[:20])
    with pytest.raises(ValueError, match=first[1].name):
        recompute(copy)
    with pytest.raises(ValueError, match="no results.json"):
        recompute(tmp_path)


def test_a_second_pretraining_seed_for_a_finetuning_seed(matched):
    jobs = matched["jobs"]
    # seed 1's modules, the control's untrained ones, were pre-trained with seed 7: their own jobs
    for d in DOMS:
        assert jobs[f"module/1/{d}@pretrain-seed7"]["status"] == "done"
        assert jobs[f"untrained/{d}@pretrain-seed7"]["status"] == "done"
    assert not any(n.startswith("lm/") and "@" in n for n in jobs)  # no LM evaluation of them
    assert not any(n.startswith("module/2/") and "@" in n for n in jobs)  # nor a second domain order
    out = matched["_out"] / "work"
    seeds = {json.loads((lib / DOMS[0] / "domix.json").read_text())["seed"] for lib in out.glob(f"lib-{DOMS[0]}-*")}
    assert seeds == {0, 7}
    # every method still has one run per task and seed
    for m in METHODS:
        assert sorted((r["task"], r["seed"]) for r in matched["runs"] if r["method"] == m
                      and r.get("order") in (None, ",".join(DOMS))) == sorted((t, s) for t in TASKS for s in (0, 1))
