"""`make gpu-check` (domix.bench.gpu_check), run as its dry run on the CPU: every stage runs, the watch sees the
CPU's matrix products, the exports and the fp32 reference compare equal, and a machine without CUDA is told so."""
from __future__ import annotations

import json

from conftest import make_corpus

from domix.bench import gpu_check


def test_the_check_runs_every_stage_and_compares(tiny_decoder, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "corpora").mkdir(parents=True)
    for dom in ("bio", "news"):
        (data / "corpora" / f"{dom}.txt").write_text("\n".join(make_corpus("bio" if dom == "bio" else "law", 24)))
    task = data / "tasks" / "product-sentiment"
    task.mkdir(parents=True)
    for split, n in (("train", 16), ("dev", 8)):
        rows = [{"text": make_corpus(["bio", "law"][i % 2], 1, seed=i)[0], "label": ["pos", "neg"][i % 2]}
                for i in range(n)]
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert gpu_check.main(["--device", "cpu", "--precisions", "fp32", "--steps", "2", "--base", tiny_decoder,
                           "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["ok"] and set(report["precisions"]["fp32"]) >= set(gpu_check.STAGES)
    assert report["watched_cpu_matmuls"]["fp32"].get("mm", 0) > 0  # the watch sees the CPU's products
    checks = report["checks"]
    assert checks["fp32: merged export = task model"]["max_abs_diff"] < 1e-4
    assert checks["fp32: peft-lora export = task model"]["max_abs_diff"] < 1e-4
    assert checks["fp32: fused stage 1 = separate runs"]["max_relative_loss_diff"] < 1e-5
    assert checks["fp32 stage 1: cpu = cpu"]["max_abs_tensor_diff"] == 0.0  # the same run, twice: deterministic
    assert "ok   fp32: merged export" in capsys.readouterr().out


def test_without_cuda_it_says_so(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
