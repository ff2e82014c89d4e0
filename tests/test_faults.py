"""Fault tests: a run killed with SIGKILL at a bad moment, then run again, ends as if it had never
been interrupted, and nothing half-written is ever visible meanwhile."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from domix.library import Library
from domix.library.pretrain_all import load_config, pretrain_all

DOMS = ("bio", "law")
DEFAULTS = {"max_steps": 30, "save_steps": 5, "batch_size": 4, "seq_len": 16, "lr": 5e-3, "device": "cpu",
            "threads": 1}


def _config(tmp_path, base, corpora):
    path = tmp_path / "domains.yaml"
    path.write_text(json.dumps({"base": base, "defaults": DEFAULTS,
                                "domains": {d: {"data": [corpora[d]]} for d in DOMS}}))
    return path


def _kill_when(cmd: list[str], ready, timeout: float = 240.0) -> None:
    """Start `cmd` in its own process group and SIGKILL the whole group once `ready()` holds."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    t0 = time.time()
    try:
        while not ready():
            assert proc.poll() is None, "the run finished before it could be interrupted"
            assert time.time() - t0 < timeout, "the run never reached the point to interrupt"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_pretrain_all_killed_mid_module_resumes_to_the_same_library(tiny_decoder, corpora, tmp_path):
    cfg = _config(tmp_path, tiny_decoder, corpora)
    ref = pretrain_all(load_config(cfg, str(tmp_path / "ref")), workers=1, progress=False)
    assert {r["status"] for r in ref.values()} == {"done"}
    lib = tmp_path / "lib"
    work = lib / ".work"
    seen = []

    def mid_second_module():  # one module complete, another past a complete checkpoint but unfinished
        names = Library(lib).names()
        seen.append(names)
        busy = [d for d in DOMS
                if d not in names and any((work / d).glob("checkpoint-*/trainer_state.json"))]
        return len(names) >= 1 and bool(busy)

    _kill_when([sys.executable, "-m", "domix.cli", "pretrain-all", "--config", str(cfg), "--library", str(lib),
                "--workers", "1"], mid_second_module)
    listed = Library(lib).names()
    assert len(listed) == 1
    for name in listed:  # whatever is listed is complete and readable
        assert Library(lib).get(name).tensors()
    assert all(set(n) <= set(DOMS) for n in seen)
    again = pretrain_all(load_config(cfg, str(lib), {"resume": True}), workers=1, progress=False)
    assert {r["status"] for r in again.values()} <= {"done", "skipped"} and Library(lib).names() == list(DOMS)
    resumed = [d for d, r in again.items() if r["status"] == "done" and r["meta"].get("resumed_from")]
    assert resumed, {d: (r["status"], r.get("meta", {}).get("resumed_from")) for d, r in again.items()}
    for name in DOMS:
        a = load_file(str(tmp_path / "ref" / name / "adapter_model.safetensors"))
        b = load_file(str(lib / name / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_finetune_killed_mid_run_resumes_to_the_same_model(tiny_decoder, corpora, tmp_path):
    from conftest import make_corpus

    from domix.finetune import finetune

    lib = tmp_path / "lib"
    for dom in ("bio", "law"):
        from domix import pretrain

        pretrain(domain=dom, data=[corpora[dom]], library=str(lib), base=tiny_decoder, rank=4, alpha=8,
                 max_steps=3, batch_size=4, seq_len=16, progress=False, device="cpu", threads=1)
    rows = [{"text": t, "label": d} for d in ("bio", "law") for t in make_corpus(d, 40, seed=9)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = ["--train", str(train), "--eval", str(train), "--library", str(lib), "--base", tiny_decoder,
            "--epochs", "3", "--batch-size", "4", "--save-steps", "5", "--eval-every", "1000", "--device", "cpu",
            "--threads", "1", "--lr", "5e-3"]
    finetune(train=str(train), eval=str(train), library=str(lib), base=tiny_decoder, out=str(tmp_path / "ref"),
             epochs=3, batch_size=4, save_steps=5, eval_every=1000, device="cpu", threads=1, lr=5e-3, progress=False)
    out = tmp_path / "run"
    work = tmp_path / ".run.work"
    # killed as soon as a second checkpoint directory appears: most likely while it is being
    # written, so the resumed run must fall back to the complete one before it
    _kill_when([sys.executable, "-m", "domix.cli", "finetune", "--out", str(out), *opts],
               lambda: len(list(work.glob("checkpoint-*"))) >= 2)
    assert not out.exists()  # never half-written
    from domix.cli import main

    assert main(["finetune", "--out", str(out), "--resume", "--json", *opts]) == 0
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "metrics.json").read_text())["resumed_from"].startswith("checkpoint-")
    assert not Path(work).exists()


def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    """A checkpoint without trainer_state.json (the Trainer writes it last) was cut short by a crash:
    resuming uses the complete one before it and removes the broken one."""
    from domix.training import resume_point

    work = tmp_path / "work"
    for step, complete in ((5, True), (10, True), (15, False)):
        (work / f"checkpoint-{step}").mkdir(parents=True)
        (work / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x")
        if complete:
            (work / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert resume_point(work, resume=True) == str(work / "checkpoint-10")
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-10", "checkpoint-5"]
    assert resume_point(work, resume=False) is None and not work.exists()
