"""The verdicts of `domix bench quality`: the vectorised macro-F1, the paired bootstrap and the
verdict rules, on synthetic predictions (no model)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from domix.bench.quality.verdicts import CLAIMS, holm_levels, macro_f1, paired_bootstrap, seed_interval, verdict, verdicts


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
    assert r == {"diff": 0.0, "ci95": [0.0, 0.0], "p": 1.0, "per_seed": [0.0, 0.0, 0.0]}


def test_always_right_against_always_wrong_differs_by_one():
    y = np.arange(100) % 4
    r = paired_bootstrap(_runs(y, {0: y, 1: y}), _runs(y, {0: (y + 1) % 4, 1: (y + 2) % 4}), n_boot=300)
    assert r == {"diff": 1.0, "ci95": [1.0, 1.0], "p": round(1 / 300, 6), "per_seed": [1.0, 1.0]}  # p: one draw's worth


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
    assert verdict([[0.01, 0.2], None]) == "inconclusive"  # a per-seed interval of one seed cannot support
    assert verdict([[0.01, 0.2]], complete=False) == "incomplete"  # a comparator did not run
    assert verdict([[-0.2, -0.01]], complete=False) == "not supported"


def test_holm_against_a_hand_computed_case():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005, 0.01, 0.03, 0.04 are read at 0.05/4, 0.05/3,
    # 0.05/2, 0.05/1; adjusted 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, max(0.03, 2 x 0.03) = 0.06, max(0.06, 0.04)
    levels, adjusted = holm_levels([0.01, 0.04, 0.03, 0.005])
    assert levels == pytest.approx([0.05 / 3, 0.05, 0.05 / 2, 0.05 / 4])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_levels([]) == ([], [])


def test_the_per_seed_interval_is_students_t():
    # mean 0.02, sd 0.01, 3 seeds: half-width t(0.975, 2) x 0.01 / sqrt(3) = 4.3027 x 0.005774 = 0.02484
    assert seed_interval([0.01, 0.02, 0.03]) == pytest.approx([0.02 - 0.02484, 0.02 + 0.02484], abs=1e-4)
    assert seed_interval([0.5]) is None


def test_one_collapsed_seed_cannot_carry_a_claim():
    """A beats B by a wide margin on one seed and ties on two: the bootstrap over examples sees a
    difference, the per-seed interval does not, and the claim is not supported."""
    y = np.arange(300) % 3
    wrong = (y + 1) % 3
    runs = {"domix": {"t": {0: (y, y), 1: (y, y), 2: (y, y)}},
            "domix-untrained": {"t": {0: (y, wrong), 1: (y, y), 2: (y, y)}}}
    c = verdicts(runs, n_boot=500)["C6"]
    (x,) = c["comparisons"]
    assert x["per_seed"] == [1.0, 0.0, 0.0] and x["ci95_seeds"][0] < 0 < x["ci95_seeds"][1]
    assert c["verdict"] == "inconclusive"


def test_verdicts_of_the_claims_and_of_methods_not_run():
    y = np.arange(120) % 3
    good, bad = {s: (y, y) for s in (0, 1)}, {s: (y, (y + 1) % 3) for s in (0, 1)}
    runs = {m: {"t1": good, "t2": good} for m in ("domix", "ncl", "own-lora")}
    runs.update({m: {"t1": bad, "t2": bad} for m in ("base-lora", "base-lora-params", "base-lora-rank",
                                                      "base-dora-params", "base-full", "cat-merge")})
    v = verdicts(runs, n_boot=200)
    assert set(v) == {"C1", "C2", "C3", "C5", "C6"} and set(v) <= set(CLAIMS)
    assert v["C6"] == {"claim": CLAIMS["C6"][0], "comparisons": [], "incomplete": ["domix-untrained"],
                       "verdict": "incomplete"}
    assert v["C1"]["verdict"] == "supported" and "incomplete" not in v["C1"]
    assert [(c["a"], c["b"], c["diff"], c["ci95"]) for c in v["C1"]["comparisons"]] == [
        ("own-lora", "base-lora", 1.0, [1.0, 1.0]), ("ncl", "base-full", 1.0, [1.0, 1.0])]
    assert v["C5"]["verdict"] == "supported" and len(v["C5"]["comparisons"]) == 4
    # every comparison made is one Holm family: C1 2, C2 1 and C3 1 (a comparator each not run), C5 4
    m = sum(len(c["comparisons"]) for c in v.values())
    assert m == 8 and sorted(c["level_holm"] for x in v.values() for c in x["comparisons"])[0] == pytest.approx(0.05 / m)
    # domix ties own-lora; joint-lora was not run: C2 is incomplete, and says what is missing
    assert v["C2"]["verdict"] == "incomplete" and v["C2"]["incomplete"] == ["joint-lora"]
    assert v["C2"]["comparisons"][0]["ci95"] == [0.0, 0.0]
    assert v["C3"]["incomplete"] == ["domix-frozen-bridge"] and v["C3"]["verdict"] == "incomplete"
    # a method on fewer seeds: compared on the seeds both ran; no common seed at all: left out
    runs["cat-merge"] = {"t1": {1: bad[1]}, "t2": {1: bad[1]}}
    assert verdicts(runs, n_boot=50)["C3"]["comparisons"][0]["seeds"] == [1]
    # no comparator of a claim ran: the claim is incomplete, with nothing compared
    alone = verdicts({"own-lora": runs["own-lora"]}, n_boot=50)
    assert alone["C1"] == {"claim": CLAIMS["C1"][0], "comparisons": [], "incomplete": ["base-full", "base-lora", "ncl"],
                           "verdict": "incomplete"}
    assert "C6" not in alone  # none of its methods ran


def test_c5_compares_with_the_capacity_matched_baseline_best_on_dev_and_a_missing_one_is_incomplete():
    y = np.arange(90) % 3
    good, bad = {s: (y, y) for s in (0, 1)}, {s: (y, (y + 1) % 3) for s in (0, 1)}
    runs = {"domix": {"t": good}, "own-lora": {"t": good}, "base-lora": {"t": good}, "base-full": {"t": good},
            "base-lora-params": {"t": bad}, "base-lora-rank": {"t": bad}}
    methods = list(runs)
    dev = {"base-lora-params": 0.2, "base-lora-rank": 0.3, "base-full": 0.9, "domix": 0.5}
    v = verdicts(runs, n_boot=100, methods=methods, dev=dev)
    # the strongest on dev, then the parameter- and rank-matched LoRAs shown beside it; DoRA did not run
    assert [(c["a"], c["b"]) for c in v["C5"]["comparisons"]] == [
        ("domix", "base-lora-params"), ("domix", "base-lora-rank"), ("domix", "base-full")]
    assert v["C5"]["strongest_on_dev"] == {"method": "base-full", "dev_macro_f1": 0.9}
    assert v["C5"]["incomplete"] == ["base-dora-params"] and v["C5"]["verdict"] == "incomplete"
    # a claim whose comparator was not run is never "supported": C1 without ncl
    assert v["C1"]["incomplete"] == ["ncl"] and v["C1"]["verdict"] != "supported"
    # the strongest on dev decides: base-full's tie with DoMIX makes C5 inconclusive once DoRA ran
    runs["base-dora-params"] = {"t": bad}
    v = verdicts(runs, n_boot=100, methods=list(runs), dev={**dev, "base-dora-params": 0.1})
    assert v["C5"]["verdict"] == "inconclusive" and "incomplete" not in v["C5"]


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
