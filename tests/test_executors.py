"""The executor layer (`domix.executors`): local process pool and Ray give the same outcomes —
results, a task's own exception, a dead worker — and the benchmark's jobs run the same on both."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from domix.executors import WorkerDied, make_executor


def _square(x: int) -> int:
    return x * x


def _fail():
    raise ZeroDivisionError("on purpose")


def _die():
    os._exit(3)  # the worker process is gone without returning


def _pid() -> int:
    return os.getpid()


def _outcomes(pool) -> dict:
    """{name: result or exception class} of a task that returns, one that raises, one whose process dies."""
    tasks = {pool.submit(_square, 7): "square", pool.submit(_fail): "raises", pool.submit(_die): "dies"}
    out = {}
    while pool.in_flight:
        task, result, error = pool.next_done()
        out[tasks[task]] = result if error is None else type(error)
    # after a worker died, the executor still runs tasks, each in a fresh process
    pids = [pool.submit(_pid) for _ in range(3)]
    out["pids"] = len({pool.next_done().result for _ in pids})
    return out


def test_local_and_ray_executors_report_the_same_outcomes(monkeypatch):
    with make_executor("local", workers=1) as pool:
        local = _outcomes(pool)
    assert local == {"square": 49, "raises": ZeroDivisionError, "dies": WorkerDied, "pids": 3}
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("threads")
    pytest.importorskip("ray")
    # Ray's workers import this module's functions by name, as spawned processes do
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    with make_executor("ray") as pool:
        on_ray = _outcomes(pool)
    assert issubclass(on_ray.pop("raises"), ZeroDivisionError)  # Ray's error class is also the cause's
    assert on_ray == {k: v for k, v in local.items() if k != "raises"}


def test_benchmark_jobs_run_the_same_on_ray_as_locally(tiny_decoder, tmp_path):
    """`execute` on the benchmark's cheapest jobs (held-out LM loss of the base model): the same
    numbers through Ray, a failed job reported, the job needing it skipped."""
    pytest.importorskip("ray")
    from domix.bench.quality.execute import execute, job_executor
    from domix.bench.quality.job import Job

    text = tmp_path / "heldout.txt"
    text.write_text("".join(f"patients protein cells clinical trial dose tumour gene {i}\n" for i in range(40)))

    def jobs(root):
        spec = {"model": {"base": tiny_decoder}, "heldout": {"bio": str(text)}, "seq_len": 16, "blocks": 4,
                "batch_size": 4}
        broken = {**spec, "model": {"ncl": str(root / "no-such-run")}}
        return {"lm/base": Job("lm/base", "lm-eval", spec, str(root / "a"), str(root / "a" / "result.json")),
                "lm/broken": Job("lm/broken", "lm-eval", broken, str(root / "b"), str(root / "b" / "result.json")),
                "lm/after": Job("lm/after", "lm-eval", spec, str(root / "c"), str(root / "c" / "result.json"),
                                ["lm/broken"])}

    runs = {}
    for kind in ("local", "ray"):
        with job_executor(kind, 2) as pool:
            runs[kind] = execute(jobs(tmp_path / kind), pool, 2, lambda line: None)
    for kind, res in runs.items():
        assert res["lm/base"]["status"] == "done" and res["lm/base"]["peak_rss_mb"] > 0, (kind, res["lm/base"])
        assert res["lm/broken"]["status"] == "failed" and "no finished ncl run" in res["lm/broken"]["error"], kind
        assert res["lm/after"]["status"] == "skipped", kind
    assert runs["ray"]["lm/base"]["loss"] == runs["local"]["lm/base"]["loss"]
    assert runs["ray"]["lm/base"]["accuracy"] == runs["local"]["lm/base"]["accuracy"]


def _visible() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_local_workers_are_spread_over_the_visible_gpus(monkeypatch):
    """Two tasks that ask for a GPU on a machine of two run on different ones, each seeing only its
    own; a task that asks for none is left alone; a third GPU task while both are held shares one."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    with make_executor("local", workers=3) as pool:
        tasks = {pool.submit(_visible, gpus=1): "a", pool.submit(_visible, gpus=1): "b",
                 pool.submit(_visible, gpus=1): "c"}
        got = {}
        while pool.in_flight:
            task, result, error = pool.next_done()
            assert error is None
            got[tasks[task]] = result
        assert got["a"] != got["b"] and {got["a"], got["b"]} == {"4", "7"} and got["c"] in ("4", "7")
        plain = pool.submit(_visible)
        assert pool.next_done().result == "4,7" and plain is not None


def test_the_device_is_resolved_in_one_place():
    from domix.models import gpus_for, resolve_device
    from domix.training import DEVICES

    import torch

    if not torch.cuda.is_available():  # this suite's machines
        assert resolve_device("auto") == "cpu" and gpus_for("auto") == 0
    assert resolve_device("cpu") == "cpu" and gpus_for("cpu") == 0
    if not torch.cuda.is_available():
        for bad in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="no CUDA device"):
                resolve_device(bad)
    with pytest.raises(ValueError, match="unknown --device"):
        resolve_device("tpu")
    assert "cuda:3" in DEVICES and "mps" in DEVICES and "cuda:x" not in DEVICES
