"""The LLM suite of the quality benchmark (`--preset commonsense`) on a tiny decoder and two tiny tasks: one
module per task, one fine-tuning per method on the union scored on each task's test set by both protocols,
the floor (zero-shot, each module alone), the rates chosen on dev, the verdicts, the report and the records."""
from __future__ import annotations

import json
import zipfile

import pytest
from test_commonsense import _doc, _requests

from domix.bench.quality import run_quality
from domix.data.commonsense import ROOT, TASKS, build_commonsense

SUITE = ["piqa", "arc-e"]
METHODS = ["zero-shot", "own-module", "base-lora", "base-lora-rank", "domix", "domix-frozen-bridge"]
TINY = {"domains": SUITE, "lr_grid": [1.0, 2.0],
        "pretrain": {"seq_len": 32, "batch_size": 2, "steps": 2, "rank": 2, "lr": 1e-2},
        "lm_eval": {"blocks": 2, "batch_size": 2},
        "finetune": {"train": 8, "dev": 4, "test": 6, "epochs": 1.0, "batch_size": 4, "max_seq_len": 64,
                     "max_new_tokens": 6, "eval_every": 2, "patience": 1, "base_lora_rank": 2}}


@pytest.fixture(scope="module")
def suite_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("commonsense")
    archive = tmp / "olmo.whl"
    words = ["recipe butter", "court contract", "patients cells", "oven flour"]
    with zipfile.ZipFile(archive, "w") as z:
        for task in SUITE:
            folder, evaluation, _, _ = TASKS[task]
            for split, n in (("train", 16), (evaluation, 8)):
                docs = [_doc(f"{words[i % 4]} {split} {i}", ["butter oven", "court judge", "cells"][: 2 + i % 2], i % 2)
                        for i in range(n)]
                z.writestr(f"{ROOT}/{folder}/{split}_mc_5shot/requests.jsonl.gz", _requests(docs))
    build_commonsense(tmp / "data", sizes={"train": 12, "dev": 4, "test": 6}, tasks=SUITE, archive=archive,
                      progress=False)
    return tmp / "data"


@pytest.fixture(scope="module")
def suite(tiny_decoder, suite_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("suite-run")
    res = run_quality("commonsense", out=out, base=tiny_decoder, data_root=suite_data, workers=2, progress=False,
                      methods=METHODS, overrides=TINY)
    res["_out"] = out
    return res


def test_one_finetune_per_method_scored_on_every_task(suite):
    res = suite
    assert not res["failures"], res["failures"]
    assert set(res["tasks"]) == set(SUITE)
    for t in SUITE:
        assert set(res["tasks"][t]) == set(METHODS)
        for m in METHODS:
            st = res["tasks"][t][m]
            assert all(0 <= st[k]["mean"] <= 1 for k in ("accuracy", "accuracy_loglik", "accuracy_cloze"))
    by_method = {}
    for r in res["runs"]:
        by_method.setdefault(r["method"], set()).add(r["job"])
    # a trained method: one job (the union) serves both tasks; own-module: one job per task, zero-shot one
    assert {m: len(j) for m, j in by_method.items()} == {**{m: 1 for m in METHODS}, "own-module": 2}
    union = res["data"]["union"]
    assert union["train"]["examples"] == 2 * TINY["finetune"]["train"]
    assert union["dev"]["examples"] == 2 * TINY["finetune"]["dev"]
    # chance: the mean of 1 / options over each task's test rows (2 or 3 options here)
    for t in SUITE:
        rows = [json.loads(x) for x in open(res["data"]["tasks"][t]["test"]["path"])]
        assert res["data"]["tasks"][t]["chance"] == round(sum(1 / len(r["choices"]) for r in rows) / len(rows), 4)
        assert len(rows) == TINY["finetune"]["test"]


def test_the_floor_is_the_base_and_each_module_alone(suite, suite_data):
    from domix.bench.quality.records import read_records

    records = read_records(suite["_out"] / "predictions")
    zero = {r["job"] for r in suite["runs"] if r["method"] == "zero-shot"}
    (z,) = zero
    assert records[z]["trainable_params"] == 0 and set(records[z]["tests"]) == set(SUITE)
    own = [records[r["job"]] for r in suite["runs"] if r["method"] == "own-module"]
    assert sorted(next(iter(o["tests"])) for o in own) == sorted(SUITE)  # each module on its own task only
    for o in own:
        (t,) = o["tests"]
        assert len(o["test_predictions"][t]["y_true"]) == TINY["finetune"]["test"]


def test_rates_chosen_on_dev_accuracy_and_the_floor_has_none(suite):
    sel = suite["selection"]
    assert "zero-shot" not in sel and "own-module" not in sel
    for m in ("base-lora", "domix"):
        v = sel[m]
        assert v["factors"] == [1.0, 2.0]
        best = max(zip(v["factors"], v["dev"]), key=lambda fd: (fd[1], -fd[0]))[0]
        assert v["chosen_factor"] == best == suite["settings"]["lr_scale"][m]


def test_llm_claims_by_both_protocols_and_recomputed_from_records(suite):
    from domix.bench.verdicts import recompute

    v = suite["verdicts"]
    assert set(v) == {"L1", "L2", "L3"}
    assert [(c["a"], c["b"]) for c in v["L1"]["comparisons"]] == [("domix", "base-lora"), ("domix", "base-lora-rank")]
    assert v["L2"]["verdict"] == "incomplete"  # DoRA did not run
    assert v["L3"]["comparisons"][0]["tasks"] == sorted(SUITE)
    assert set(suite["verdicts_loglik"]) == set(suite["verdicts_cloze"]) == {"L1", "L2", "L3"}
    again = recompute(suite["_out"])
    assert again["matches"] and again["verdicts_cloze"] == suite["verdicts_cloze"]


def test_accuracy_bootstrap_by_hand():
    import numpy as np

    from domix.bench.quality.verdicts import accuracy, paired_bootstrap

    y = [0, 1, 1, 0]
    assert accuracy(y, [0, 1, -1, 1])[0] == 0.5  # -1 (no answer) is wrong
    assert np.allclose(accuracy(y, [0, 1, 1, 1], [[0, 0, 1, 1], [3, 3, 3, 3]]), [1.0, 0.0])
    r = paired_bootstrap({"t": {0: (y, [0, 1, 1, 0])}}, {"t": {0: (y, [1, 1, 1, 0])}}, n_boot=200, metric="accuracy")
    assert r["diff"] == 0.25 and r["ci95"][0] >= 0


def test_the_report_shows_chance_and_both_protocols(suite):
    text = (suite["_out"] / "REPORT.md").read_text()
    assert "| chance |" in text and "answer extraction" in text and "cloze" in text
    assert text.count("## Verdicts (") == 3 and "× base-dora-rank" in text
    assert (suite["_out"] / "plots" / "tasks.png").is_file()


def test_methods_that_mean_nothing_are_refused(tiny_decoder, suite_data, tmp_path):
    with pytest.raises(ValueError, match="own-lora do not apply to preset commonsense"):
        run_quality("commonsense", out=tmp_path / "a", base=tiny_decoder, data_root=suite_data, progress=False,
                    methods=["own-lora"], overrides=TINY)
    with pytest.raises(ValueError, match="zero-shot do not apply to preset quick"):
        run_quality("quick", out=tmp_path / "b", base=tiny_decoder, data_root=suite_data, progress=False,
                    methods=["zero-shot"])
    with pytest.raises(ValueError, match="unknown commonsense tasks"):
        run_quality("commonsense", out=tmp_path / "c", base=tiny_decoder, data_root=suite_data, progress=False,
                    overrides={"domains": ["mmlu"]})
