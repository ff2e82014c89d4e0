"""`domix bench dap`: the three runs in their own processes, the JSON schema and the ratios."""
from __future__ import annotations

import json

import pytest

from domix.bench.dap import RUNS, WARMUP_STEPS
from domix.cli import main


def test_bench_dap_schema_on_tiny_llama(tiny_decoder, corpora, tmp_path, capsys):
    out = tmp_path / "dap.json"
    rc = main(["bench", "dap", "--base", tiny_decoder, "--data", corpora["bio"], "--steps", "3",
               "--seq-len", "16", "--batch-size", "4", "--threads", "1", "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    res = json.loads(out.read_text())
    assert printed["ratios"] == res["ratios"]

    s = res["settings"]
    for key in ("base", "steps", "seq_len", "batch_size", "threads", "torch", "date", "corpus"):
        assert key in s, key
    assert (s["steps"], s["seq_len"], s["batch_size"], s["threads"]) == (3, 16, 4, 1)
    assert s["order"] == list(RUNS) and s["device"] == "cpu"

    runs = res["runs"]
    assert set(runs) == set(RUNS)
    for name, r in runs.items():
        for key in ("tokens_per_s", "step_time_s", "peak_rss_mb", "trainable_params"):
            assert r[key] > 0, (name, key)
        raw = res["raw"][name][0]
        assert len(raw["step_times_s"]) == 3 and raw["warmup_steps"] == WARMUP_STEPS
        assert raw["threads"] == 1
        assert raw["device"] == "cpu" and raw["peak_cuda_mb"] is None  # `auto` resolved once, on this machine
    # LoRA runs train the same adapter (all block linears, r=8); full-ft trains everything
    assert runs["domix"]["trainable_params"] == runs["peft-trainer"]["trainable_params"]
    assert runs["full-ft"]["trainable_params"] == runs["full-ft"]["total_params"]
    assert runs["domix"]["trainable_params"] < runs["full-ft"]["trainable_params"]

    ratios = res["ratios"]
    assert ratios["tokens_per_s_domix_over_peft"] == pytest.approx(
        runs["domix"]["tokens_per_s"] / runs["peft-trainer"]["tokens_per_s"])
    assert ratios["peak_rss_domix_over_full"] == pytest.approx(
        runs["domix"]["peak_rss_mb"] / runs["full-ft"]["peak_rss_mb"])
    assert ratios["step_time_lora_over_full"] == pytest.approx(
        runs["peft-trainer"]["step_time_s"] / runs["full-ft"]["step_time_s"])
    for name, t in res["targets"].items():
        assert set(t) >= {"value", "target", "met"}
        assert t["value"] == ratios[name] and isinstance(t["met"], bool)
    assert set(res["targets"]) == {"tokens_per_s_domix_over_peft", "peak_rss_domix_over_full"}
    assert "| domix |" in res["table"] and "peak_rss_domix_over_full" in res["table"]


def test_bench_dap_memory_settings_reach_every_run(tiny_decoder, corpora, tmp_path):
    """--dtype bf16 --gradient-checkpointing: LoRA runs hold the base in bf16, full-ft keeps fp32
    weights; every run recomputes activations."""
    out = tmp_path / "dap.json"
    assert main(["bench", "dap", "--base", tiny_decoder, "--data", corpora["bio"], "--steps", "1", "--seq-len", "16",
                 "--batch-size", "4", "--threads", "1", "--dtype", "bf16", "--gradient-checkpointing",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["dtype"] == "bf16" and res["settings"]["gradient_checkpointing"]
    raw = {k: v[0] for k, v in res["raw"].items()}
    assert all(r["gradient_checkpointing"] for r in raw.values())
    assert raw["domix"]["weights_dtype"] == raw["peft-trainer"]["weights_dtype"] == "bfloat16"
    assert raw["full-ft"]["weights_dtype"] == "float32"


def test_bench_dap_fused_and_ddp_runs(tiny_decoder, corpora, tmp_path):
    """--fused 2 --ddp: fused vs separate processes and DDP on 2 processes vs 1, with their ratios
    and targets (the values are measured on the real model, not here)."""
    out = tmp_path / "dap.json"
    assert main(["bench", "dap", "--base", tiny_decoder, "--data", corpora["bio"], "--steps", "2", "--seq-len", "16",
                 "--batch-size", "2", "--threads", "1", "--fused", "2", "--ddp", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    sc = res["scale"]
    assert sc["fused"]["domains"] == 2 and sc["separate"]["domains"] == 2 and len(sc["separate"]["runs"]) == 2
    assert (sc["fused"]["stack"], sc["fused_stack1"]["stack"], sc["fused_parallel"]["stack"]) == (2, 1, 1)
    assert (sc["fused"]["parallel"], sc["fused_stack1"]["parallel"], sc["fused_parallel"]["parallel"]) == (1, 1, 2)
    assert sc["fused"]["tokens"] == sc["fused_stack1"]["tokens"] == sc["fused_parallel"]["tokens"] == \
        sc["separate"]["tokens"] == 2 * (2 + WARMUP_STEPS) * 2 * 16
    assert sc["ddp_2"]["processes"] == 2 and sc["ddp_1"]["processes"] == 1
    assert sc["ddp_2"]["tokens_per_step"] == 2 * sc["ddp_1"]["tokens_per_step"]
    r = res["ratios"]
    assert r["fused_peak_rss_over_separate_sum"] == pytest.approx(sc["fused"]["peak_rss_mb"] /
                                                                  sc["separate"]["peak_rss_mb_sum"])
    assert r["ddp_scaling_2_processes"] == pytest.approx(sc["ddp_2"]["tokens_per_s"] / (2 * sc["ddp_1"]["tokens_per_s"]))
    assert r["fused_stack1_tokens_per_s_over_separate"] == pytest.approx(
        (sc["fused_stack1"]["tokens"] / sc["fused_stack1"]["wall_s"]) / (sc["separate"]["tokens"] / sc["separate"]["wall_s"]))
    assert r["fused_parallel_peak_rss_over_separate_sum"] == pytest.approx(sc["fused_parallel"]["peak_rss_mb"] /
                                                                           sc["separate"]["peak_rss_mb_sum"])
    assert {"fused_peak_rss_over_separate_sum", "fused_tokens_per_s_over_separate", "fused_stack1_peak_rss_over_separate_sum",
            "fused_parallel_tokens_per_s_over_separate", "ddp_scaling_2_processes"} <= set(res["targets"])
    assert "all domains per forward pass" in res["table"] and "1 domain(s) per forward pass" in res["table"]
    assert "1 domain(s) per forward pass, 2 passes at once in threads" in res["table"]
    assert "| 2 |" in res["table"]


def test_the_device_reaches_every_worker_and_cuda_peaks_are_read(monkeypatch):
    """`--device` is resolved by the parent and handed to each worker process; on a CUDA device the worker reads
    torch's peak CUDA memory (patched here: this machine has no GPU)."""
    import torch

    from domix.bench import dap, measure

    cmd = dap._command("fused", "b", "d", 1, 8, 2, 1, "r.json", domains=2, device="cuda:1")
    assert cmd[cmd.index("--device") + 1] == "cuda:1"
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2 ** 20)
    assert measure.peak_cuda_mb("cuda:0") == 3.0 and measure.peak_cuda_mb("cpu") is None
    with pytest.raises(ValueError, match="no CUDA device"):
        dap.run(dap.DapOptions(device="cuda", out=None))
