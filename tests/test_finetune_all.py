"""`finetune-all`: task models of a tasks.yaml on the local pool and on Ray, each equal to
`finetune` run directly; complete ones skipped, a failed task reported, bad configs refused."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_corpus
from safetensors.torch import load_file

from domix import pretrain
from domix.cli import main
from domix.finetune import FinetuneConfig, finetune
from domix.finetune.finetune_all import finetune_all, load_tasks

DOMS = ["bio", "law"]
DEFAULTS = dict(max_steps=2, batch_size=4, max_seq_len=32, eval_every=1, device="cpu", threads=1)


@pytest.fixture(scope="module")
def lib(tiny_decoder, corpora, tmp_path_factory) -> str:
    lib = tmp_path_factory.mktemp("lib")
    for dom in DOMS:
        pretrain(domain=dom, data=[corpora[dom]], library=str(lib), base=tiny_decoder, max_steps=3, batch_size=2,
                 seq_len=16, rank=4, progress=False, device="cpu", threads=1)
    return str(lib)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("task")
    rows = [{"text": d, "label": dom} for dom in DOMS for d in make_corpus(dom, 12, seed=7)]
    random.Random(0).shuffle(rows)
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:16]) + "\n")
    (root / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows[16:]) + "\n")
    (root / "bad.jsonl").write_text('{"text": "no label here"}\n')
    return root


def _config(folder: Path, base: str, lib: str, tasks: dict, **top) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"base": base, "library": lib, "defaults": DEFAULTS, **top, "tasks": tasks}
    path = folder / "tasks.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def _tensors(out) -> dict:
    return load_file(str(Path(out) / "model.safetensors"))


def _same(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_local_and_ray_task_models_equal_finetune_and_reruns_skip(tiny_decoder, lib, task_files, tmp_path, capsys):
    tf = task_files
    tasks = {"a": {"train": str(tf / "train.jsonl"), "eval": str(tf / "dev.jsonl")},
             "b": {"train": str(tf / "train.jsonl"), "eval": str(tf / "dev.jsonl"), "modules": "bio", "lr": 1e-2}}
    path = _config(tmp_path / "cfg", tiny_decoder, lib, tasks, seeds=[1])
    configs, resources = load_tasks(path, tmp_path / "local")
    assert list(configs) == ["a-s1", "b-s1"] and resources == {}
    assert configs["b-s1"].out == str(tmp_path / "local" / "b-s1") and configs["b-s1"].seed == 1
    results = finetune_all(configs, workers=2, progress=False)
    assert {r["status"] for r in results.values()} == {"done"}, results
    for name, spec in tasks.items():  # each is what `finetune` with the same options writes
        direct = tmp_path / "direct" / name
        finetune(FinetuneConfig(**{**DEFAULTS, **spec, "base": tiny_decoder, "library": lib, "seed": 1,
                                   "out": str(direct), "progress": False}))
        assert _same(results[f"{name}-s1"]["out"], direct), name
    assert not _same(results["a-s1"]["out"], results["b-s1"]["out"])
    # a rerun skips the complete task models
    assert main(["finetune-all", "--config", str(path), "--out", str(tmp_path / "local"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {r["status"] for r in again.values()} == {"skipped"}
    assert again["a-s1"]["meta"]["accuracy"] == results["a-s1"]["meta"]["accuracy"]
    # Ray (a local instance) writes the same task models
    pytest.importorskip("ray")
    on_ray = finetune_all(load_tasks(path, tmp_path / "ray")[0], executor="ray", progress=False)
    assert {r["status"] for r in on_ray.values()} == {"done"}, on_ray
    for name in configs:
        assert _same(on_ray[name]["out"], results[name]["out"]), name


def test_a_failed_task_is_reported_and_the_others_finish(tiny_decoder, lib, task_files, tmp_path, capsys):
    tasks = {"good": {"train": str(task_files / "train.jsonl"), "eval": str(task_files / "dev.jsonl")},
             "broken": {"train": "bad.jsonl", "eval": str(task_files / "dev.jsonl")}}
    (tmp_path / "bad.jsonl").write_text((task_files / "bad.jsonl").read_text())  # relative to the config
    path = _config(tmp_path, tiny_decoder, lib, tasks)
    code = main(["finetune-all", "--config", str(path), "--workers", "2", "--out", str(tmp_path / "models")])
    out = capsys.readouterr().out
    assert code == 1
    line = next(ln for ln in out.splitlines() if ln.startswith("broken"))
    assert "failed" in line and "missing field" in line and str(tmp_path / "bad.jsonl") in line
    assert "good" in out and "done" in out
    assert (tmp_path / "models" / "good" / "model.safetensors").is_file()
    assert not (tmp_path / "models" / "broken").exists()


def test_config_paths_outs_and_refusals(tiny_decoder, lib, tmp_path):
    tasks = {"t": {"train": "t/train.jsonl", "eval": "/abs/dev.jsonl", "out": "models/t"},
             "u": {"train": "x", "eval": "y"}}
    path = _config(tmp_path, tiny_decoder, "lib", tasks, resources={"cpus": 2, "gpus": 0})
    configs, resources = load_tasks(path, overrides={"lr": 0.1})
    t, u = configs["t"], configs["u"]
    assert (t.train, t.eval, t.out, t.library) == (str(tmp_path / "t/train.jsonl"), "/abs/dev.jsonl",
                                                   str(tmp_path / "models/t"), str(tmp_path / "lib"))
    assert u.out == str(tmp_path / "u") and u.lr == t.lr == 0.1 and u.max_steps == 2
    assert resources == {"cpus": 2, "gpus": 0}
    # with seeds, every task model's directory ends in -s<seed>
    path = _config(tmp_path, tiny_decoder, lib, tasks, seeds=[0, 3])
    assert [(n, c.seed, Path(c.out).name) for n, c in load_tasks(path)[0].items()] == [
        ("t-s0", 0, "t-s0"), ("t-s3", 3, "t-s3"), ("u-s0", 0, "u-s0"), ("u-s3", 3, "u-s3")]
    refused = [({"tasks": {"t": {"train": "x", "eval": "y", "learning_rate": 1}}},
                r"task 't': unknown keys \['learning_rate'\] \(allowed: .*'bridge_lr'"),
               ({"workers": 2}, r"unknown top-level keys \['workers'\] \(allowed: .*'resources'"),
               ({"resources": {"gpu": 1}}, r"resources: unknown keys \['gpu'\] \(allowed: \['cpus', 'gpus'\]\)"),
               ({"resources": {"cpus": 0}}, "cpus must be a positive number"),
               ({"seeds": 3}, "seeds must be a non-empty list"), ({"seeds": [1, 1]}, "distinct integers"),
               ({"seeds": [1], "tasks": {"t": {"train": "x", "eval": "y", "seed": 2}}}, "seed given beside"),
               ({"tasks": {"t": {"train": "x"}}}, "task 't' has no eval"),
               ({"tasks": {}}, "no tasks listed")]
    for change, message in refused:
        doc = {"base": tiny_decoder, "defaults": DEFAULTS, "tasks": tasks, **change}
        path.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=message):
            load_tasks(path)
    assert main(["finetune-all", "--config", str(path)]) == 2  # refused before anything runs


def test_shared_settings_reach_only_the_methods_that_read_them(tmp_path):
    """The top-level library (and `defaults`) go to the tasks whose method reads them; an option of another
    method given for one task stays, for `finetune` to refuse by name."""
    tasks = {"mix": {"train": "t.jsonl", "eval": "d.jsonl"},
             "dora": {"train": "t.jsonl", "eval": "d.jsonl", "method": "dora"},
             "odd": {"train": "t.jsonl", "eval": "d.jsonl", "method": "full", "lora_rank": 4}}
    path = _config(tmp_path, "base", "lib", tasks, defaults={"bridge_lr": 1e-2, "lora_rank": 16})
    configs, _ = load_tasks(path)
    assert configs["mix"].library == str(tmp_path / "lib") and configs["mix"].bridge_lr == 1e-2
    assert configs["mix"].lora_rank == FinetuneConfig.lora_rank  # the shared rank is dora's, not domix's
    assert configs["dora"].library is None and configs["dora"].lora_rank == 16
    assert configs["dora"].bridge_lr == FinetuneConfig.bridge_lr
    assert configs["odd"].lora_rank == 4 and configs["odd"].library is None
    from domix.finetune.train import _check

    with pytest.raises(ValueError, match=r"--lora-rank \(--method lora/dora\) does not apply to --method full"):
        _check(configs["odd"])
