"""One module (or task model) trained on many processes: `torchrun` / `accelerate launch` with
DDP on CPUs (gloo), against one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import WORDS, make_corpus
from safetensors.torch import load_file

from domix import pretrain

# 8 steps of 4 blocks (2 processes x 2, or 1 x 4) stay inside the first epoch of the corpus, so
# both runs see the same blocks in the same order (the distributed sampler deals out the single
# process's seeded shuffle batch by batch). The gradients differ only in summation order (a mean
# over 4 blocks vs the all-reduce of two means over 2), which after 8 AdamW steps left the LoRA
# tensors (values up to 0.19) at most 1.3e-6 apart; the test allows 1e-5.
ATOL = 1e-5
STEPS = dict(max_steps=8, seq_len=16, lr=5e-3, seed=0, device="cpu", threads=1)
TIMEOUT = 240  # s: a launch takes about 15 s here; a hang fails the test instead of blocking it


def flags(**opts) -> list[str]:
    out = []
    for k, v in opts.items():
        out += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    return out


def launch(args: list[str], tmp_path: Path, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Two processes of `args` (a module to run with -m, or a script) under a launcher."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    else:  # accelerate runs several CPU processes through torch's launcher when asked for --multi_gpu
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DOMIX_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)


def pretrain_cmd(corpus, base, library, **opts) -> list[str]:
    return ["-m", "domix", "pretrain", *flags(domain="bio", data=corpus, library=library, base=base, batch_size=2,
                                               **STEPS, **opts)]


def adapter(lib) -> dict:
    return load_file(str(Path(lib) / "bio" / "adapter_model.safetensors"))


def assert_same_module(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=k)


@pytest.fixture(scope="module")
def ddp_module(tiny_decoder, corpora, tmp_path_factory):
    """A module trained by `torchrun --nproc_per_node 2 -m domix pretrain` (batch 2 per process):
    (library, the command's JSON output)."""
    root = tmp_path_factory.mktemp("ddp")
    proc = launch([*pretrain_cmd(corpora["bio"], tiny_decoder, root / "lib"), "--json"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "lib", json.loads(proc.stdout)  # one JSON document: rank 0 reports, the others are quiet


def test_pretrain_with_ddp_matches_one_process_and_writes_the_entry_once(ddp_module, tiny_decoder, corpora, tmp_path):
    lib, out = ddp_module
    one = pretrain(domain="bio", data=[corpora["bio"]], library=str(tmp_path), base=tiny_decoder, batch_size=4,
                   progress=False, **STEPS)
    assert_same_module(adapter(lib), adapter(tmp_path))
    meta = json.loads((lib / "bio" / "domix.json").read_text())
    assert meta == out
    assert meta["processes"] == 2 and one["processes"] == 1
    assert meta["tokens"] == one["tokens"] == 8 * 4 * 16 and meta["steps"] == 8
    assert meta["base_fingerprint"] == one["base_fingerprint"]
    for key in ("train_loss", "heldout_loss", "base_heldout_loss"):
        assert meta[key] == pytest.approx(one[key], abs=1e-5), key
    assert [h["step"] for h in meta["loss_history"]] == [h["step"] for h in one["loss_history"]]
    for a, b in zip(meta["loss_history"], one["loss_history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    # the entry, written once by rank 0: complete, its logs from rank 0 alone, no staging or work left
    assert sorted(p.name for p in (lib / "bio").iterdir()) == sorted(p.name for p in (tmp_path / "bio").iterdir())
    assert len(list((lib / "bio" / "runs").rglob("events.out.tfevents.*"))) == 1
    assert [p.name for p in lib.iterdir() if p.name != ".work"] == ["bio"]
    assert not (lib / ".work" / "bio").exists()


# a run cut short at step 5 (its last checkpoint: step 3), on two processes
INTERRUPTED = """
import sys
from transformers import TrainerCallback
from domix import pretrain

class Stop(RuntimeError):
    pass

class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 5:
            raise Stop("simulated interruption")

try:
    pretrain(domain="bio", data=[sys.argv[1]], library=sys.argv[2], base=sys.argv[3], batch_size=2, save_steps=3,
             progress=False, callbacks=[Interrupt()], **{STEPS})
except Stop:
    sys.exit(0)
sys.exit("the run was not interrupted")
"""


def test_interrupted_ddp_run_resumes_under_accelerate_launch(ddp_module, tiny_decoder, corpora, tmp_path):
    (tmp_path / "interrupted.py").write_text(INTERRUPTED.replace("{STEPS}", repr(STEPS)))
    lib = tmp_path / "lib"
    proc = launch(["interrupted.py", corpora["bio"], str(lib), tiny_decoder], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = lib / ".work" / "bio" / "checkpoint-3"
    assert {"trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    assert not (lib / "bio").exists()
    proc = launch([*pretrain_cmd(corpora["bio"], tiny_decoder, lib, save_steps=3), "--resume"], tmp_path,
                  launcher="accelerate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((lib / "bio" / "domix.json").read_text())
    assert meta["resumed_from"] == "checkpoint-3" and meta["processes"] == 2
    assert_same_module(adapter(lib), adapter(ddp_module[0]))
    assert not (lib / ".work" / "bio").exists()


def test_finetune_with_ddp_writes_a_loadable_task_model(tiny_decoder, tmp_path):
    import random

    from domix.finetune import load_task_model

    rows = [{"text": d, "label": dom} for dom in ("bio", "law") for d in make_corpus(dom, 24, seed=5)]
    random.Random(0).shuffle(rows)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:36]) + "\n")
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows[36:]) + "\n")
    out = tmp_path / "task"
    proc = launch(["-m", "domix", "finetune", *flags(method="lora", train=tmp_path / "train.jsonl",
                                                     eval=tmp_path / "dev.jsonl", out=out, base=tiny_decoder,
                                                     lora_rank=4, max_steps=6, batch_size=4, lr=5e-3, save_steps=2,
                                                     keep_best=True, device="cpu", threads=1), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reported = json.loads(proc.stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    assert reported == {k: v for k, v in metrics.items() if k != "history"}
    assert metrics["steps"] == metrics["steps_run"] == 6 and metrics["eval"]["examples"] == 12
    model, tok, spec = load_task_model(out, device="cpu")
    assert spec["method"] == "lora" and spec["labels"] == ["bio", "law"]
    logits = model(**tok([" ".join(WORDS["law"])], return_tensors="pt")).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging, no work area


# each rank reports what `pretrain` returned; then a corpus missing on rank 1, then on rank 0; at exit,
# whether it left the process group
RANKS = """
import atexit, json, os, sys
import torch.distributed as dist
from domix import pretrain
from domix.cli import main

rank = os.environ["RANK"]
# registered first, so it runs last: is the process group gone by then?
atexit.register(lambda: open(f"group-left-{rank}", "w").write(str(not dist.is_initialized())))
corpus, lib, base = sys.argv[1:4]
meta = pretrain(domain="bio", data=[corpus], library=lib, base=base, batch_size=2, max_steps=2, seq_len=16,
                progress=False, device="cpu", threads=1)
open(f"meta-{rank}.json", "w").write(json.dumps(meta))

def run(gone_on):
    data = f"gone-on-rank-{gone_on}.txt" if rank == gone_on else corpus
    return main(["pretrain", "--domain", f"gone{gone_on}", "--data", data, "--library", lib, "--base", base,
                 "--max-steps", "2", "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--threads", "1"])

open(f"rc-{rank}", "w").write(str(run("1")))
sys.exit(run("0"))
"""


def test_a_corpus_missing_on_one_rank_fails_every_rank_promptly(tiny_decoder, corpora, tmp_path):
    (tmp_path / "ranks.py").write_text(RANKS)
    lib = tmp_path / "lib"
    t0 = time.time()
    proc = launch(["ranks.py", corpora["bio"], str(lib), tiny_decoder], tmp_path)
    took = time.time() - t0
    # a good run first: every rank returns the same metadata
    metas = [json.loads((tmp_path / f"meta-{r}.json").read_text()) for r in (0, 1)]
    assert metas[0] == metas[1] == json.loads((lib / "bio" / "domix.json").read_text())
    # missing on rank 1: rank 1 reports its error, rank 0 says which rank failed and why; both exit 2
    assert [(tmp_path / f"rc-{r}").read_text() for r in (0, 1)] == ["2", "2"]
    assert "domix: error: corpus gone-on-rank-1.txt does not exist" in proc.stderr
    assert "domix: error: rank 1 of 2 failed: corpus gone-on-rank-1.txt does not exist" in proc.stderr
    # missing on rank 0 (the process exits with it): the launch fails with the message, without a hang
    assert proc.returncode != 0
    assert "domix: error: corpus gone-on-rank-0.txt does not exist" in proc.stderr
    assert took < TIMEOUT / 2
    # every rank left the process group before interpreter teardown (gloo's threads abort it otherwise)
    assert [(tmp_path / f"group-left-{r}").read_text() for r in (0, 1)] == ["True", "True"]
    assert sorted(p.name for p in lib.iterdir()) == [".work", "bio"]  # nothing of the failed runs
    assert list((lib / ".work").iterdir()) == []


def test_mode_expert_with_ddp_matches_one_process(tiny_decoder, corpora, tmp_path):
    from domix.mode.train import pretrain_expert

    opts = dict(STEPS, lr=1e-3, blocks=2, expert_layers=1)
    proc = launch(["-m", "domix", "mode", "pretrain", *flags(domain="bio", data=corpora["bio"], library=tmp_path / "lib",
                                                           base=tiny_decoder, batch_size=2, **opts), "--json"],
                  tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = pretrain_expert(domain="bio", data=[corpora["bio"]], library=str(tmp_path / "one"), base=tiny_decoder,
                          batch_size=4, progress=False, **opts)
    meta = json.loads((tmp_path / "lib" / "bio" / "domix.json").read_text())
    assert meta == json.loads(proc.stdout) and meta["processes"] == 2 and one["processes"] == 1
    assert meta["tokens"] == one["tokens"] and meta["heldout_loss"] == pytest.approx(one["heldout_loss"], abs=1e-5)
    a, b = (load_file(str(tmp_path / x / "bio" / "expert.safetensors")) for x in ("lib", "one"))
    assert_same_module(a, b)
    assert not (tmp_path / "lib" / ".work" / "bio").exists()


def test_commands_that_run_their_own_processes_are_refused_under_a_launcher(tiny_decoder, corpora, tmp_path):
    (tmp_path / "domains.yaml").write_text(f"base: {tiny_decoder}\ndomains:\n  bio: {{data: [{corpora['bio']}]}}\n")
    proc = launch(["-m", "domix", "pretrain-all", "--config", "domains.yaml", "--library", "lib"], tmp_path)
    assert proc.returncode != 0
    assert "domix: error: 'domix pretrain-all' is not for launchers: start it once, without torchrun" in proc.stderr
    assert not (tmp_path / "lib").exists()


def test_ddp_sends_no_buffers(tiny_decoder, tmp_path):
    """Under DDP nothing is broadcast that never changes (a bridge's frozen A's are buffers, loaded alike
    on every rank), and no graph search for unused parameters (every trained tensor gets a gradient)."""
    import torch

    from domix.library.pretrain import PretrainConfig
    from domix.training import build_trainer

    model = torch.nn.Linear(2, 2)
    opts = PretrainConfig(domain="d", data=[], library=str(tmp_path), base=tiny_decoder, progress=False)
    trainer = build_trainer(model, opts, work=tmp_path / "work", train_dataset=[], data_collator=None, steps=1,
                            logs=False)
    assert trainer.args.ddp_broadcast_buffers is False and trainer.args.ddp_find_unused_parameters is False
