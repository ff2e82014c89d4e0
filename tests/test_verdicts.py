"""The verdicts of `domix bench quality`: the vectorised macro-F1, the paired bootstrap and the
verdict rules, on synthetic predictions (no model)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from domix.bench.quality.verdicts import CLAIMS, macro_f1, paired_bootstrap, verdict, verdicts


def test_macro_f1_of_many_resamples_equals_sklearn():
    rng = np.random.default_rng(1)
    for k, n in ((2, 30), (5, 40), (6, 7)):  # 6 classes on 7 examples: some classes absent
        y, p = rng.integers(0, k, n), rng.integers(0, k, n)
        p[: n // 3] = y[: n // 3]  # some agreement
        idx = rng.integers(0, n, (50, n))
        got = macro_f1(y, p, idx, k)
        want = [f1_score(y[i], p[i], labels=list(range(k)), average="macro", zero_division=0) for i in idx]
        np.testing.assert_allclose(got, want, atol=1e-12)
        assert macro_f1(y, p, n_classes=k)[0] == pytest.approx(
            f1_score(y, p, labels=list(range(k)), average="macro", zero_division=0))


def _runs(y, preds_by_seed, task="t"):
    return {task: {s: (y, p) for s, p in preds_by_seed.items()}}


def test_identical_predictions_differ_by_exactly_zero():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 80)
    a = {s: rng.integers(0, 3, 80) for s in (0, 1, 2)}
    r = paired_bootstrap(_runs(y, a), _runs(y, a), n_boot=300)
    assert r == {"diff": 0.0, "ci95": [0.0, 0.0]}


def test_always_right_against_always_wrong_differs_by_one():
    y = np.arange(100) % 4
    r = paired_bootstrap(_runs(y, {0: y, 1: y}), _runs(y, {0: (y + 1) % 4, 1: (y + 2) % 4}), n_boot=300)
    assert r == {"diff": 1.0, "ci95": [1.0, 1.0]}


def test_the_interval_holds_the_true_difference_and_excludes_zero():
    """A is right on 80 % of the examples, B on 70 %: the interval covers A's true advantage and,
    with 2,000 examples per task, lies above 0 — and B − A's is its mirror image."""
    rng = np.random.default_rng(3)
    a_runs, b_runs, truth = {}, {}, []
    for t in ("t1", "t2"):
        y = rng.integers(0, 2, 2000)
        wrong = lambda rate: np.where(rng.random(len(y)) < rate, 1 - y, y)  # noqa: E731
        a_runs[t] = {s: (y, wrong(0.2)) for s in (0, 1, 2)}
        b_runs[t] = {s: (y, wrong(0.3)) for s in (0, 1, 2)}
        truth.append(np.mean([macro_f1(y, a_runs[t][s][1])[0] - macro_f1(y, b_runs[t][s][1])[0] for s in (0, 1, 2)]))
    r = paired_bootstrap(a_runs, b_runs)
    lo, hi = r["ci95"]
    assert r["diff"] == pytest.approx(np.mean(truth), abs=1e-4)
    assert 0 < lo < r["diff"] < hi and 0.05 < r["diff"] < 0.15
    assert lo < 0.1 < hi  # the expected gap of 10 points
    back = paired_bootstrap(b_runs, a_runs)
    assert back["diff"] == -r["diff"] and back["ci95"] == pytest.approx([-hi, -lo], abs=2e-4)


def test_the_bootstrap_is_deterministic_under_its_seed():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 60)
    a, b = _runs(y, {s: rng.integers(0, 3, 60) for s in (0, 1)}), _runs(y, {s: rng.integers(0, 3, 60) for s in (0, 1)})
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7)["ci95"] != paired_bootstrap(a, b, seed=8)["ci95"]
    assert paired_bootstrap(a, b, seed=7)["diff"] == paired_bootstrap(a, b, seed=8)["diff"]


def test_unpaired_runs_are_refused():
    y = np.arange(10) % 2
    with pytest.raises(ValueError):
        paired_bootstrap(_runs(y, {0: y}), _runs(y, {1: y}))  # other seeds
    with pytest.raises(ValueError):
        paired_bootstrap(_runs(y, {0: y}), _runs(1 - y, {0: y}))  # other test examples


def test_verdict_rules():
    assert verdict([[0.01, 0.2], [0.1, 0.3]]) == "supported"
    assert verdict([[0.01, 0.2], [-0.3, -0.1]]) == "not supported"
    assert verdict([[0.01, 0.2], [-0.1, 0.1]]) == "inconclusive"
    assert verdict([[0.0, 0.0]]) == "inconclusive"  # identical runs: no difference either way
    assert verdict([[0.01, 0.2]], complete=False) == "inconclusive"  # a comparison missing
    assert verdict([[-0.2, -0.01]], complete=False) == "not supported"


def test_verdicts_of_the_claims_and_of_methods_not_run():
    y = np.arange(120) % 3
    good, bad = {s: (y, y) for s in (0, 1)}, {s: (y, (y + 1) % 3) for s in (0, 1)}
    runs = {m: {"t1": good, "t2": good} for m in ("domix", "ncl", "own-lora")}
    runs.update({m: {"t1": bad, "t2": bad} for m in ("base-lora", "base-dora", "base-full", "cat-merge")})
    v = verdicts(runs, n_boot=200)
    assert set(v) == {"C1", "C2", "C3", "C5"} and set(v) <= set(CLAIMS)
    assert v["C1"]["verdict"] == "supported" and "missing" not in v["C1"]
    assert [(c["a"], c["b"], c["diff"], c["ci95"]) for c in v["C1"]["comparisons"]] == [
        ("own-lora", "base-lora", 1.0, [1.0, 1.0]), ("ncl", "base-full", 1.0, [1.0, 1.0])]
    assert v["C5"]["verdict"] == "supported" and len(v["C5"]["comparisons"]) == 3
    # domix ties own-lora; joint-lora was not run: C2 is inconclusive, and says what is missing
    assert v["C2"]["verdict"] == "inconclusive" and v["C2"]["missing"] == ["joint-lora"]
    assert v["C2"]["comparisons"][0]["ci95"] == [0.0, 0.0]
    assert v["C3"]["missing"] == ["domix-frozen-bridge"] and v["C3"]["verdict"] == "inconclusive"
    # a method on fewer seeds: compared on the seeds both ran; no common seed at all: left out
    runs["cat-merge"] = {"t1": {1: bad[1]}, "t2": {1: bad[1]}}
    assert verdicts(runs, n_boot=50)["C3"]["comparisons"][0]["seeds"] == [1]
    assert "C1" not in verdicts({"own-lora": runs["own-lora"]}, n_boot=50)


def test_c5_compares_with_the_baseline_best_on_dev_and_methods_not_run_are_named():
    y = np.arange(90) % 3
    good, bad = {s: (y, y) for s in (0, 1)}, {s: (y, (y + 1) % 3) for s in (0, 1)}
    runs = {"domix": {"t": good}, "own-lora": {"t": good}, "base-lora": {"t": bad}, "base-full": {"t": good}}
    methods = list(runs)
    v = verdicts(runs, n_boot=100, methods=methods, dev={"base-lora": 0.2, "base-full": 0.9, "domix": 0.5})
    assert [(c["a"], c["b"]) for c in v["C5"]["comparisons"]] == [("domix", "base-full")]
    assert v["C5"]["strongest_on_dev"] == {"method": "base-full", "dev_macro_f1": 0.9}
    assert v["C5"]["not_run"] == ["base-dora"] and v["C5"]["verdict"] == "inconclusive"  # a tie
    # a comparison with a method the run left out is named, and does not hold the claim back
    assert v["C1"]["not_run"] == ["ncl"] and v["C1"]["verdict"] == "supported"
    assert "C1" in v and [c["b"] for c in v["C1"]["comparisons"]] == ["base-lora"]
    v = verdicts({**runs, "base-lora": {"t": {s: (y, (y + 1) % 3) for s in (0, 1)}}}, n_boot=100, methods=methods,
                 dev={"base-lora": 0.95, "base-full": 0.9})
    assert v["C5"]["comparisons"][0]["b"] == "base-lora" and v["C5"]["verdict"] == "supported"


def test_order_verdict():
    from domix.bench.quality.verdicts import order_verdict

    y = np.arange(60) % 2
    same = {"t": {0: (y, y)}}
    v = order_verdict({"domix": [same, {"t": {0: (y, y.copy())}}]}, modules_equal=True, n_boot=100)
    assert v["verdict"] == "supported" and v["comparisons"][0]["identical_predictions"]
    flipped = {"t": {0: (y, 1 - y)}}
    v = order_verdict({"domix": [same, flipped]}, modules_equal=False, n_boot=100)
    assert v["verdict"] == "not supported" and not v["comparisons"][0]["identical_predictions"]
    one_off = {"t": {0: (y, np.where(np.arange(60) == 0, 1 - y, y))}}
    assert order_verdict({"domix": [same, one_off]}, None, n_boot=100)["verdict"] == "inconclusive"
    assert order_verdict({"ncl": [same, flipped]}, None) is None  # no domix: no claim
