"""The decisive preset's protocol on tiny fixtures: the DAP-budget curve and the budget it
chooses on dev, fine-tuning with dev evaluation, best-checkpoint keeping and early stopping —
and nothing chosen on test: the same run with other test labels chooses the same things."""
from __future__ import annotations

import json
import shutil

import pytest
from test_bench_quality import DOMS, TASKS, TINY, data_root  # noqa: F401  (data_root: a fixture)

from domix.bench.quality import run_quality

METHODS = ["base-lora", "own-lora", "cat-merge", "domix"]
DECISIVE = {**TINY, "dap_curve": {"tokens": [64, 192]},
            "finetune": {**TINY["finetune"], "eval_every": 1, "keep_best": True, "patience": 1, "epochs": 2.0}}


def _run(base, root, out):
    return run_quality("decisive", out=out, base=base, data_root=root, workers=2, progress=False, seeds=[0],
                       methods=METHODS, overrides=DECISIVE)


@pytest.fixture(scope="module")
def decisive(tiny_decoder, data_root, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("decisive")
    res = _run(tiny_decoder, data_root, out)
    res["_out"] = out
    return res


def test_the_curve_chooses_the_budget_on_dev(decisive):
    res = decisive
    assert not res["failures"], res["failures"]
    curve = res["dap_curve"]
    assert [p["tokens_per_domain"] for p in curve] == [64, 192]
    for p in curve:
        assert set(p["heldout_loss"]) == set(DOMS) and set(p["dev_macro_f1"]) == TASKS
        assert all(set(v) == {"own", "base"} for v in p["dev_macro_f1"].values())
        gains = [v["own"] - v["base"] for v in p["dev_macro_f1"].values()]
        assert p["mean_dev_gain"] == pytest.approx(sum(gains) / len(gains), abs=1e-4)
    # base-lora does not pre-train: the same runs at every budget
    assert len({json.dumps({t: v["base"] for t, v in p["dev_macro_f1"].items()}) for p in curve}) == 1
    # more pre-training lowers the modules' held-out loss (lr 1e-2 on a tiny model: it learns fast)
    assert sum(curve[1]["heldout_loss"].values()) < sum(curve[0]["heldout_loss"].values())
    chosen = res["settings"]["dap_budget"]
    best = max(curve, key=lambda p: (p["mean_dev_gain"], -p["tokens_per_domain"]))
    assert chosen["tokens_per_domain"] == best["tokens_per_domain"] and "dev" in chosen["how"]
    # the rest of the run pre-trains at the chosen budget, with the curve's own modules
    assert res["settings"]["pretrain"]["steps"] * 64 == chosen["tokens_per_domain"]
    assert res["lm_loss"][DOMS[0]]["own"] == next(p for p in curve if p is best)["heldout_loss"][DOMS[0]]
    assert res["jobs"]["module/1/bio"]["reused"]  # trained once, by the curve


def test_every_run_keeps_its_best_dev_step(decisive):
    runs = decisive["runs"]
    assert {(r["task"], r["method"]) for r in runs} == {(t, m) for t in TASKS for m in METHODS}
    for r in runs:
        assert 1 <= r["kept_step"] <= r["max_steps"]
        steps = [s for s, _ in r["dev_curve"]]
        assert steps and steps == sorted(steps) and r["kept_step"] in steps
        # the kept step is the first best dev score, and that is the score reported
        best = max(f for _, f in r["dev_curve"])
        assert r["kept_step"] == next(s for s, f in r["dev_curve"] if f == best)
        assert r["dev_macro_f1"] == pytest.approx(best, abs=1e-4)


def test_the_report_shows_the_protocol(decisive):
    out = decisive["_out"]
    report = (out / "REPORT.md").read_text()
    for section in ("## DAP budget: task gain vs domain tokens", "## Learning rates", "## Training to the best dev step",
                    "**C4**", "The run pre-trains at **"):
        assert section in report, section
    for plot in ("dap_curve.png", "dev_curves.png"):
        assert (out / "plots" / plot).stat().st_size > 0
    sel = decisive["selection"]
    assert set(sel) == set(METHODS) and sel["domix"]["bridge_lr"] == 3e-3 and sel["cat-merge"]["bridge_lr"] is None
    assert all("standard value" in v["how"] for v in sel.values())


def test_nothing_is_chosen_on_test(decisive, tiny_decoder, data_root, tmp_path):  # noqa: F811
    """Other test labels change test scores only: the budget, every kept step and every dev score stay."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    for task in TASKS:
        path = root / "tasks" / task / "test.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        labels = sorted({r["label"] for r in rows})
        rows = [{**r, "label": labels[(labels.index(r["label"]) + 1) % len(labels)]} for r in rows]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = _run(tiny_decoder, root, tmp_path / "out")
    assert other["settings"]["dap_budget"] == decisive["settings"]["dap_budget"]
    assert other["dap_curve"] == decisive["dap_curve"]
    key = lambda r: (r["task"], r["method"], r.get("order"))  # noqa: E731
    a = {key(r): (r["kept_step"], r["dev_macro_f1"], r["dev_curve"]) for r in decisive["runs"]}
    b = {key(r): (r["kept_step"], r["dev_macro_f1"], r["dev_curve"]) for r in other["runs"]}
    assert a == b
    assert [r["test_macro_f1"] for r in decisive["runs"]] != [r["test_macro_f1"] for r in other["runs"]]


def test_mode_learning_rates_are_chosen_on_held_out_loss(tiny_decoder, data_root, tmp_path):  # noqa: F811
    """With MoDE in the run, the expert and gate rates come from a grid scored on the experts' own
    held-out text (never a task split), and the run's experts are the grid's at the chosen point."""
    grid = {"lr": [1e-4, 1e-2], "gate_lr": [1e-2]}
    res = run_quality("decisive", out=tmp_path, base=tiny_decoder, data_root=data_root, workers=2, progress=False,
                      seeds=[0], methods=["mode-frozen-experts"],
                      overrides={**TINY, "dap_curve": None, "mode": {"lr_grid": grid, "compose_steps": 2}})
    assert not res["failures"], res["failures"]
    points = res["mode_lr_grid"]
    assert [(p["lr"], p["gate_lr"]) for p in points] == [(1e-4, 1e-2), (1e-2, 1e-2)]
    work = tmp_path / "work"
    for p in points:
        assert set(p["heldout_loss"]) == set(DOMS)
        assert p["mean_heldout_loss"] == pytest.approx(sum(p["heldout_loss"].values()) / len(DOMS), abs=1e-4)
    # lr 1e-2 moves a tiny model's experts much further than 1e-4 in 3 steps: the points differ
    assert points[0]["mean_heldout_loss"] != points[1]["mean_heldout_loss"]
    chosen = res["settings"]["mode_lr_choice"]
    best = min(points, key=lambda p: p["mean_heldout_loss"])
    assert (chosen["lr"], chosen["gate_lr"]) == (best["lr"], best["gate_lr"]) and "held-out" in chosen["how"]
    assert (res["settings"]["mode"]["lr"], res["settings"]["mode"]["gate_lr"]) == (best["lr"], best["gate_lr"])
    # the run's experts are the grid's at the chosen point: trained once, their held-out loss the grid's
    for d in DOMS:
        assert res["jobs"][f"mode/expert/{d}"]["reused"]
    assert len(list(work.glob("mode-lib-*"))) == 2  # one library per point
    chosen_lib = [p for p in work.glob("mode-lib-*")
                  if json.loads((p / DOMS[0] / "domix.json").read_text())["lr"] == best["lr"]][0]
    assert json.loads((chosen_lib / DOMS[0] / "domix.json").read_text())["heldout_loss"] == pytest.approx(
        best["heldout_loss"][DOMS[0]], abs=1e-4)
    assert "## MoDE learning rates" in (tmp_path / "REPORT.md").read_text()


def test_the_grid_choice_rule():
    from domix.bench.quality.grid import choose_mode_lr

    pts = [{"lr": 3e-4, "gate_lr": 1e-3, "mean_heldout_loss": 4.0}, {"lr": 1e-4, "gate_lr": 1e-2, "mean_heldout_loss": 4.0},
           {"lr": 1e-4, "gate_lr": 1e-3, "mean_heldout_loss": 4.1}]
    assert (choose_mode_lr(pts)["lr"], choose_mode_lr(pts)["gate_lr"]) == (1e-4, 1e-2)  # a tie: the lower rates
    with pytest.raises(RuntimeError, match="incomplete"):
        choose_mode_lr([*pts, {"lr": 1e-3, "gate_lr": 1e-3, "mean_heldout_loss": None}])


# ---------------------------------------------------------------------------- the user's own benchmark
def _user_config(tmp_path, data_root, **change):  # noqa: F811
    """A config of two domains (one corpus as .txt, one as .jsonl) and two tasks under new names."""
    import yaml

    corpus = tmp_path / "corpora"
    corpus.mkdir(exist_ok=True)
    shutil.copy(data_root / "corpora" / "bio.txt", corpus / "lab.txt")
    docs = (data_root / "corpora" / "reviews.txt").read_text().splitlines()
    (corpus / "shop.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d.strip()))
    tasks = {}
    for name, (task, dom) in {"roles": ("pubmed-role", "lab"), "polarity": ("product-sentiment", "shop")}.items():
        tasks[name] = {"domain": dom, **{s: str(data_root / "tasks" / task / f"{s}.jsonl")
                                         for s in ("train", "dev", "test")}}
    cfg = {"preset": "quick", "domains": {"lab": "corpora/lab.txt", "shop": ["corpora/shop.jsonl"]},
           "general": str(data_root / "corpora" / "general.txt"), "tasks": tasks,
           "settings": {k: v for k, v in TINY.items() if k != "domains"}}
    for k, v in change.items():
        cfg[k] = v(cfg) if callable(v) else v
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_user_benchmark_runs_the_same_protocol(tiny_decoder, data_root, tmp_path):  # noqa: F811
    cfg = _user_config(tmp_path, data_root)
    res = run_quality(config=cfg, out=tmp_path / "out", base=tiny_decoder, workers=2, progress=False,
                      methods=["base-lora", "own-lora", "domix"])
    assert not res["failures"], res["failures"]
    assert res["settings"]["domains"] == ["lab", "shop"]
    assert res["settings"]["task_domains"] == {"roles": "lab", "polarity": "shop"}
    assert set(res["tasks"]) == {"roles", "polarity"} and all(set(v) == {"base-lora", "own-lora", "domix"}
                                                               for v in res["tasks"].values())
    assert set(res["lm_loss"]) == {"lab", "shop"} and {"base", "own-lora"} <= set(res["retention_loss"])
    assert {"C1", "C2", "C4", "C5"} <= set(res["verdicts"])
    assert res["verdicts"]["C5"]["verdict"] == "incomplete"  # no baseline of DoMIX's capacity was run
    assert "roles" in (tmp_path / "out" / "REPORT.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"tasks": lambda c: {**c["tasks"], "roles": {**c["tasks"]["roles"], "domain": "court"}}},
     "task roles: its domain 'court' is not among the config's domains ['lab', 'shop']"),
    ({"tasks": lambda c: {**c["tasks"], "roles": {k: v for k, v in c["tasks"]["roles"].items() if k != "dev"}}},
     "task roles: no dev split"),
    ({"domains": {"lab": "corpora/none.txt", "shop": "corpora/shop.jsonl"}}, "domain lab: corpus"),
    ({"tasks": lambda c: {**c["tasks"], "roles": {**c["tasks"]["roles"], "test": "extra-label.jsonl"}}},
     "task roles: labels ['unheard'] of its test split are absent from train"),
])
def test_a_bad_user_benchmark_is_refused_before_anything_runs(tiny_decoder, data_root, tmp_path, change,
                                                              message):  # noqa: F811
    from domix.bench.quality import ConfigError

    (tmp_path / "extra-label.jsonl").write_text(json.dumps({"text": "a b c", "label": "unheard"}) + "\n")
    cfg = _user_config(tmp_path, data_root, **change)
    with pytest.raises(ConfigError, match="bench.yaml") as err:
        run_quality(config=cfg, out=tmp_path / "out", base=tiny_decoder, workers=2, progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()
