"""`domix bench quality` end to end on a tiny random decoder and tiny synthetic benchmark data:
every method, the results.json schema, DoMIX's order robustness, resuming, cache keys."""
from __future__ import annotations

import hashlib
import json
import random

import pytest
from conftest import WORDS, make_corpus

from domix.bench.quality import METHODS, plan, prepare_data, resolve_settings, run_quality, _base_id
from domix.data.benchmark import DOMAINS

# what a domain benchmark runs by default: every method but those that only a suite scores without training
METHODS = {m: v for m, v in METHODS.items() if v["method"] != "none"}

VOCAB = {"bio": "bio", "reviews": "food", "news": "law", "health": "bio", "general": "law"}
DOMS = ["bio", "reviews"]  # two of the four domains keep the test short; the data holds all four
TASKS = {DOMAINS[d] for d in DOMS}
TINY = {"domains": DOMS, "pretrain": {"seq_len": 16, "batch_size": 4, "steps": 3, "lr": 1e-2, "full_lr": 1e-3},
        "lm_eval": {"blocks": 4, "batch_size": 4},
        "finetune": {"train": 24, "dev": 8, "test": 12, "epochs": 1.0, "batch_size": 8, "max_seq_len": 24,
                     "base_lora_rank": 4}}


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return {"path": str(path.relative_to(path.parents[1] if path.parent.name == "corpora" else path.parents[2])),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The layout of the real benchmark data: corpora/*.txt, tasks/<task>/{train,dev,test}.jsonl, manifest.json."""
    root = tmp_path_factory.mktemp("bench-data")
    manifest = {"version": 1, "seed": 0, "corpora": {}, "tasks": {}}
    for dom in [*DOMAINS, "general"]:
        manifest["corpora"][dom] = _write(root / "corpora" / f"{dom}.txt", make_corpus(VOCAB[dom], 80, seed=1))
    for i, (dom, task) in enumerate(DOMAINS.items()):
        labels = list(WORDS)[: 2 + i % 2]  # 2 or 3 classes: the vocabulary a text is written in
        rows = [{"text": t, "label": lab} for lab in labels for t in make_corpus(lab, 30, seed=10 + i)]
        random.Random(i).shuffle(rows)
        n = len(rows)
        splits = {"train": rows[: n // 2], "dev": rows[n // 2: 3 * n // 4], "test": rows[3 * n // 4:]}
        manifest["tasks"][task] = {"domain": dom, "labels": labels, "splits": {
            s: {**_write(root / "tasks" / task / f"{s}.jsonl", [json.dumps(r) for r in rs]), "examples": len(rs)}
            for s, rs in splits.items()}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture(scope="module")
def bench(tiny_decoder, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    res = run_quality("quick", out=out, base=tiny_decoder, data_root=data_root, workers=2, progress=False,
                      overrides=TINY)
    return out, res


def test_results_schema(bench):
    out, res = bench
    saved = json.loads((out / "results.json").read_text())
    assert not saved["failures"], saved["failures"]
    for key in ("preset", "seeds", "settings", "wall_time_s", "tasks", "lm_loss", "retention_loss",
                "order_robustness", "efficiency"):
        assert key in saved, key
    assert saved["preset"] == "quick" and saved["seeds"] == [0]
    assert set(saved["tasks"]) == TASKS
    for task, by in saved["tasks"].items():
        assert set(by) == set(METHODS), (task, set(METHODS) ^ set(by))
        for m, st in by.items():
            for metric in ("macro_f1", "accuracy"):
                assert set(st[metric]) >= {"mean", "std", "runs"}
                assert 0.0 <= st[metric]["mean"] <= 1.0
                assert len(st[metric]["runs"]) == (2 if m == "ncl" else 1)  # ncl: two orders x one seed
    orders = [",".join(o) for o in saved["settings"]["orders"]]
    assert set(saved["lm_loss"]) == set(DOMS)
    for dom in DOMS:
        row = saved["lm_loss"][dom]
        assert all(isinstance(row[k], float) for k in ("base", "own", "joint"))
        assert set(row["ncl"]) == set(orders)
    for dom in DOMS:  # MoDE: each expert alone and both compositions, loss and next-token accuracy
        for metric in ("lm_loss", "lm_accuracy"):
            row = saved[metric][dom]
            assert all(isinstance(row[k], float) for k in ("base", "own", "mode-expert", "mode", "mode-frozen-experts",
                                                           "mode-mixture"))
        assert all(0.0 <= v <= 1.0 for k, v in saved["lm_accuracy"][dom].items() if k != "ncl")
    assert set(saved["retention_loss"]) >= {"base", "own-lora", "joint-lora", "ncl", "mode-expert", "mode",
                                            "mode-frozen-experts", "full"}
    # MoDE's paper comparison: per domain, at the same tokens, LoRA module vs MoDE expert vs all weights
    assert all(isinstance(saved["lm_loss"][d]["full"], float) for d in DOMS)
    cmp = saved["mode_comparison"]
    assert set(cmp) == {"lora", "mode-expert", "full"}
    assert cmp["lora"]["trainable_params"] < cmp["mode-expert"]["trainable_params"] < cmp["full"]["trainable_params"]
    assert len({c["tokens_per_domain"] for c in cmp.values()}) == 1 and all(c["cpu_s_per_1k_tokens"] > 0
                                                                         for c in cmp.values())
    for m in METHODS:
        e = saved["efficiency"][m]
        assert e["trainable_params"] > 0 and e["finetune_s"] > 0 and e["step_time_s"] > 0 and e["peak_rss_mb"] > 0
        assert (e["pretrain_s"] > 0) == (not m.startswith("base-"))
    eff = saved["efficiency"]
    assert eff["ncl"]["pretrain_trainable_params"] > eff["domix"]["pretrain_trainable_params"]
    assert eff["base-full"]["trainable_params"] == eff["base-full"]["total_params"]
    # frozen experts: only gates and the head train, far fewer than experts + gates + head
    assert eff["mode-frozen-experts"]["trainable_params"] < eff["mode"]["trainable_params"]
    assert eff["mode"]["pretrain_trainable_params"] > 0
    # every fine-tuning run with the step that was scored (the presets score the last one)
    assert {(r["task"], r["method"]) for r in saved["runs"]} == {(t, m) for t in TASKS for m in METHODS}
    assert all(r["kept_step"] == r["max_steps"] > 0 and 0 <= r["dev_macro_f1"] <= 1 for r in saved["runs"])
    # verdicts: a paired bootstrap of the test predictions per claim; its point estimate is the
    # difference of the tables' macro-F1 means (ncl's table pools both orders, its verdict the first)
    assert set(saved["verdicts"]) == {"C1", "C2", "C3", "C4", "C5", "C6"}
    strongest = saved["verdicts"]["C5"]["strongest_on_dev"]["method"]
    for claim, v in saved["verdicts"].items():
        assert v["verdict"] in ("supported", "not supported", "inconclusive") and "incomplete" not in v, claim
        # C5: the strongest on dev, and the parameter- and rank-matched LoRAs beside it
        c5 = 2 if strongest in ("base-lora-params", "base-lora-rank") else 3
        assert len(v["comparisons"]) == {"C1": 2, "C2": 2, "C3": 2, "C4": 2, "C5": c5, "C6": 1}[claim]
        for c in v["comparisons"]:
            lo, hi = c["ci95"]
            assert {"a", "b", "diff", "ci95"} <= set(c) and -1 <= lo <= hi <= 1 and set(c["tasks"]) == TASKS
            if claim != "C4":  # the Holm-corrected interval holds the plain one; one seed: no per-seed interval
                assert c["ci95_holm"][0] <= lo <= hi <= c["ci95_holm"][1] and c["ci95_seeds"] is None
            if claim != "C4" and "ncl" not in (c["a"], c["b"]):
                gap = [by[c["a"]]["macro_f1"]["mean"] - by[c["b"]]["macro_f1"]["mean"]
                       for by in saved["tasks"].values()]
                assert c["diff"] == pytest.approx(sum(gap) / len(gap), abs=2e-4), c
    # C5: DoMIX against the non-DAP baseline of its capacity with the best mean dev macro-F1
    dev = {m: sum(by[m]["dev_macro_f1"]["mean"] for by in saved["tasks"].values()) / len(TASKS)
           for m in ("base-lora-params", "base-lora-rank", "base-dora-params", "base-full")}
    assert strongest == max(dev, key=dev.get)
    assert strongest in [c["b"] for c in saved["verdicts"]["C5"]["comparisons"]]
    # C4: the modules of both orders are bitwise equal, so DoMIX's order-B runs are order A's
    c4 = saved["verdicts"]["C4"]
    assert c4["verdict"] == "supported" and c4["modules_bitwise_equal"]
    assert c4["comparisons"][0]["identical_predictions"] and c4["comparisons"][0]["ci95"] == [0.0, 0.0]
    assert c4["comparisons"][1]["a"] == "ncl [order A]"
    job = json.loads(next((out / "work").glob("ft-*/result.json")).read_text())
    assert len(job["test_predictions"]["y_true"]) == len(job["test_predictions"]["y_pred"]) == job["test"]["examples"]
    report = (out / "REPORT.md").read_text()
    assert "## Verdicts" in report and "**C1**" in report
    assert "## End tasks" in report and "Measured wall time" in report and res["table"] in report
    assert "Next-token accuracy" in report and "mode (composed)" in report
    assert "## MoDE against LoRA and full training" in report
    for variant in ("mode", "mode-frozen-experts", "mode-mixture"):  # the hand-over: against each domain's expert
        gaps = [saved["lm_loss"][d][variant] - saved["lm_loss"][d]["mode-expert"] for d in DOMS]
        kind = "reference" if variant == "mode-mixture" else "composed"
        assert (f"Hand-over, {variant} ({kind}) minus each domain's own expert: {DOMS[0]} {gaps[0]:+.3f}, "
                f"{DOMS[1]} {gaps[1]:+.3f} — within 0.05 nats on {sum(g <= 0.05 for g in gaps)} of 2") in report
    # ... and by position in the held-out block: the loss at each index, the report's spans of the gap
    seq_len = saved["settings"]["pretrain"]["seq_len"]
    for d in DOMS:
        row = saved["lm_position_loss"][d]
        assert set(row) == {"mode-expert", "mode", "mode-frozen-experts", "mode-mixture"}
        assert all(len(v) == seq_len and v[0] is None and None not in v[1:] for v in row.values())
    row = saved["lm_position_loss"][DOMS[0]]
    gap = [a - b for a, b in zip(row["mode"][1:], row["mode-expert"][1:])]  # index 1 onwards
    spans = [sum(g) / len(g) for g in (gap[:8], gap[8:32], gap[32:]) if g]
    assert "Hand-over by position in the held-out block" in report
    assert f"| mode | {DOMS[0]} | " + " | ".join(f"{c:+.3f}" for c in spans) in report
    for plot in ("tasks.png", "lm_loss.png", "bridge.png"):
        assert (out / "plots" / plot).stat().st_size > 0


def test_domix_is_order_robust_and_ncl_is_reported_per_order(bench, tiny_decoder, data_root):
    out, res = bench
    rob, chk = res["order_robustness"], res["order_checks"]
    orders = [",".join(o) for o in res["settings"]["orders"]]
    assert set(rob["domix"]) == set(orders[:2]) and set(rob["ncl"]) == set(orders)
    assert all(chk["domix"]["modules_bitwise_equal"].values())  # trained in two orders, in separate processes
    # the quick preset reuses order A's fine-tunes for order B because the modules are equal ...
    assert not chk["domix"]["order_b_finetuned"]
    assert set(chk["ncl"]["spread"]) == TASKS
    # ... and fine-tuning on the order-B library for real gives the same scores
    real = run_quality("quick", out=out, base=tiny_decoder, data_root=data_root, workers=2, progress=False,
                       methods=["domix"], overrides={**TINY, "order_check_finetune": True})
    rchk, rrob = real["order_checks"]["domix"], real["order_robustness"]["domix"]
    assert rchk["order_b_finetuned"] and not real["failures"]
    assert sum(1 for j in real["jobs"].values() if not j["reused"]) == len(TASKS)  # only order B's fine-tunes ran
    a, b = (rrob[o] for o in orders[:2])
    assert a == b and set(a) == TASKS and rchk["identical_scores"]
    assert real["verdicts"]["C4"]["comparisons"][0]["identical_predictions"]


def test_rerun_reuses_every_job(bench, tiny_decoder, data_root):
    out, res = bench
    again = run_quality("quick", out=out, base=tiny_decoder, data_root=data_root, workers=2, progress=False,
                        overrides=TINY)
    assert again["reused_jobs"] == len(again["jobs"]) and not again["failures"]
    assert again["tasks"] == res["tasks"] and again["lm_loss"] == res["lm_loss"]


def test_an_interrupted_run_is_timed_from_its_jobs(bench, tiny_decoder, data_root):
    """A run killed before it wrote results.json leaves finished jobs and no history entry: the
    next run reuses the jobs and counts that run's time, rebuilt from the jobs' own times."""
    from domix.bench.quality.report import write_report

    out, res = bench
    (out / "results.json").unlink()  # what a killed run leaves: its jobs, no results
    again = run_quality("quick", out=out, base=tiny_decoder, data_root=data_root, workers=2, progress=False,
                        overrides=TINY)
    first, now = again["history"]
    assert first["interrupted"] and first["jobs_run"] == len(again["jobs"])
    # it spans at least its longest job and at most the whole first run (1 s: the stamps' resolution)
    assert max(j["wall_s"] for j in res["jobs"].values()) <= first["wall_time_s"] <= res["wall_time_s"] + 1
    assert now["jobs_run"] == 0 and now["jobs_reused"] == len(again["jobs"])
    write_report(again, out)
    assert "interrupted: timed from its first job's start" in (out / "REPORT.md").read_text()


def test_changed_settings_change_the_cache_keys(bench, tiny_decoder, data_root):
    out, _ = bench

    def job_dirs(overrides):
        s = resolve_settings("quick", tiny_decoder, workers=2, overrides=overrides)
        s["base_id"] = _base_id(tiny_decoder)
        data = prepare_data(data_root, out, s)
        jobs, _ = plan(s, data, out / "work", list(METHODS), s["seeds"])
        return {j.label or j.name: j.result for j in jobs.values()}

    same, ft_lr, pre = (job_dirs(TINY), job_dirs({**TINY, "finetune": {**TINY["finetune"], "lr": 1e-3}}),
                        job_dirs({**TINY, "pretrain": {**TINY["pretrain"], "steps": 4}}))
    assert same == job_dirs(TINY)
    ft = [k for k in same if "/s0" in k]
    lora_ft = [k for k in ft if not k.startswith(("base-full", "ncl", "mode"))]  # these have their own lr
    assert all(same[k] != ft_lr[k] for k in lora_ft) and same["module/1/bio"] == ft_lr["module/1/bio"]
    assert all(same[k] != pre[k] for k in same if not k.startswith(("base-", "lm/base")))
    # the device the jobs train on: a GPU run never reuses a CPU run's results (CPU keys stay as they were)
    import domix.models

    real = domix.models.resolve_device
    try:
        domix.models.resolve_device = lambda d="auto": "cuda" if d == "auto" else real(d)
        on_gpu = job_dirs(TINY)
    finally:
        domix.models.resolve_device = real
    assert all(on_gpu[k] != same[k] for k in same)


def test_a_method_is_keyed_only_on_the_options_it_reads():
    from dataclasses import asdict

    from domix.bench.quality import _finetune_fields
    from domix.finetune import FinetuneConfig

    full = _finetune_fields(asdict(FinetuneConfig(train="t", eval="e", out="o", method="full")))
    lora = _finetune_fields(asdict(FinetuneConfig(train="t", eval="e", out="o", method="lora")))
    domix = _finetune_fields(asdict(FinetuneConfig(train="t", eval="e", out="o", method="domix")))
    assert "bridge_init" not in full and "bridge_init" not in lora and "lora_rank" not in full
    assert {"bridge_init", "bridge_lr", "freeze_bridge", "modules"} <= set(domix) and "lora_rank" not in domix
    assert {"lr", "epochs", "seed", "batch_size", "max_seq_len"} <= set(full) and "out" not in full


def test_a_killed_run_resumes_to_the_same_results(bench, tiny_decoder, data_root, tmp_path):
    """SIGKILL to the whole run (its job server and workers) after a few jobs, then the same
    command again: the results equal an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _, ref = bench
    out = tmp_path / "run"
    script = (f"from domix.bench.quality import run_quality\n"
              f"if __name__ == '__main__':\n"
              f"    run_quality('quick', out={str(out)!r}, base={tiny_decoder!r}, data_root={str(data_root)!r}, "
              f"workers=2, progress=False, overrides={TINY!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    t0 = time.time()
    while len(list(out.glob("work/*/result.json")) + list(out.glob("work/*/.results/*.json"))) < 6:
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    again = run_quality("quick", out=out, base=tiny_decoder, data_root=data_root, workers=2, progress=False,
                        overrides=TINY)
    assert not again["failures"] and 6 <= again["reused_jobs"] < len(again["jobs"])
    scores = lambda r: {t: {m: {k: v for k, v in st.items() if k != "runs"} for m, st in by.items()}  # noqa: E731
                        for t, by in r["tasks"].items()}  # the job names hold the output folder's path
    assert scores(again) == scores(ref) and again["lm_loss"] == ref["lm_loss"]
    assert again["history"][0]["interrupted"]


def test_mode_jobs_take_the_pretraining_dtype_and_the_composition_its_gate_settings(bench, tiny_decoder, data_root):
    out, _ = bench
    mode = {**TINY.get("mode", {}), "gate_lr": 2e-3, "compose_gate_lr": 7e-3, "gate_context": "mean",
            "gate_form": "routed"}
    s = resolve_settings("quick", tiny_decoder, workers=2,
                         overrides={**TINY, "mode": mode, "pretrain": {**TINY["pretrain"], "dtype": "bf16"}})
    s["base_id"] = _base_id(tiny_decoder)
    jobs, _ = plan(s, prepare_data(data_root, out, s), out / "work", ["mode", "mode-frozen-experts"], s["seeds"])
    experts = [j for j in jobs.values() if j.kind == "mode-pretrain"]
    composed = [j for j in jobs.values() if j.kind == "mode-compose"]
    assert experts and len(composed) == 2
    assert all(j.spec["config"]["gate_lr"] == 2e-3 and j.spec["config"]["dtype"] == "bf16" for j in experts)
    assert all(j.spec["config"]["gate_lr"] == 7e-3 and j.spec["config"]["dtype"] == "bf16" for j in composed)
    assert all(j.spec["config"]["routing_loss"] == 1.0 and j.spec["config"]["gate_context"] == "mean"
               and j.spec["config"]["gate_form"] == "routed"
               for j in composed)


def test_set_changes_the_presets_settings_and_the_report_shows_it(tiny_decoder, data_root, tmp_path):
    """`--set KEY=VALUE` (dotted keys, JSON values) reaches the run's settings and the jobs, and the
    report's command line names it; an unknown setting is refused by name before anything runs."""
    from domix.bench.quality.settings import parse_overrides
    from domix.cli import main

    assert parse_overrides(["dap_curve=null", "pretrain.steps=64", "mode.lr=1e-3", "mode.gate_form=routed"],
                           "decisive") == {"dap_curve": None, "pretrain": {"steps": 64},
                                           "mode": {"lr": 1e-3, "gate_form": "routed"}}
    res = run_quality("quick", out=tmp_path / "q", base=tiny_decoder, data_root=data_root, workers=2, progress=False,
                      seeds=[0], methods=["base-lora"], overrides=TINY,
                      set_items=["lm_eval.blocks=2", "finetune.epochs=2"])
    assert not res["failures"] and res["set"] == ["lm_eval.blocks=2", "finetune.epochs=2"]
    assert res["settings"]["lm_eval"]["blocks"] == 2 and res["settings"]["finetune"]["epochs"] == 2
    assert res["settings"]["finetune"]["train"] == TINY["finetune"]["train"]  # the overrides beside it are kept
    runs = [json.loads((d / "result.json").read_text()) for d in (tmp_path / "q" / "work").glob("ft-*")]
    assert len(runs) == len(DOMS) and all(r["steps"] == 2 * TINY["finetune"]["train"] // 8 for r in runs)  # 2 epochs
    assert "--set lm_eval.blocks=2 finetune.epochs=2`" in (tmp_path / "q" / "REPORT.md").read_text()
    for bad, said in [("mode.nope=1", "no setting 'mode.nope'"), ("pretrain.steps", "KEY=VALUE"),
                      ("pretrain.steps=many", "expected a number"), ("pretrain.steps=null", "expected a number"),
                      ("dap_curve.tokens=8192", "expected a JSON list")]:
        with pytest.raises(ValueError, match=said):
            parse_overrides([bad], "decisive")
    assert main(["bench", "quality", "--out", str(tmp_path / "never"), "--set", "nope=1"]) == 2
    assert not (tmp_path / "never").exists()
