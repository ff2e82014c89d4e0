"""Running the jobs of a run: each once the jobs it needs are done, `workers` at a time, each in a
fresh process of an executor (`domix.executors`: a local process pool or Ray tasks); a job
whose dependency failed is skipped, and a job finished by an earlier run is read back."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ...executors import WorkerDied, make_executor
from ...models import gpus_for
from ...io import write_json
from .records import write_record
from .runners import _work


def _context():
    from multiprocessing import get_all_start_methods, get_context

    if "forkserver" in get_all_start_methods():
        ctx = get_context("forkserver")
        # the server imports these once; every job forks from it instead of importing them again
        ctx.set_forkserver_preload(["torch", "transformers", "peft", "datasets", "sklearn.metrics", "matplotlib.pyplot",
                                    "domix.finetune", "domix.library.pretrain", "domix.mode.train", "domix.lm",
                                    "domix.bench.quality.runners"])
        return ctx
    return get_context("spawn")


def job_executor(kind: str, workers: int, ray_address: str | None = None):
    """The executor of a run's jobs: locally, a pool of `workers` processes forked from a server
    that has imported torch and transformers once; on Ray, its tasks (see `domix.executors`)."""
    return make_executor(kind, workers, ray_address, mp_context=_context() if kind == "local" else None)


def execute(jobs: dict, pool, workers: int, log, finished: dict | None = None) -> dict:
    """Run every unfinished job once its dependencies are done, `workers` at a time, each in
    a fresh process of `pool` (`job_executor`). Returns {name: result} (finished earlier: read
    back, with reused=True). `finished`: results of jobs outside `jobs` that some of them depend
    on (an earlier stage's). `log(line)` reports progress."""
    results, failed = {}, {}
    for name, job in jobs.items():
        if job.done():
            results[name] = {**json.loads(Path(job.result).read_text()), "reused": True}
            if job.record and not Path(job.record).is_file():
                write_record(job.record, results[name])
    pending = [j for n, j in jobs.items() if n not in results]
    total, started = len(pending), 0
    if not pending:
        return results
    log(f"quality: {len(results)} jobs reused, {total} to run with {workers} worker(s)")
    workers = max(1, workers)
    running = {}  # task -> (job, its number)
    while pending or running:
        for job in list(pending):
            if len(running) >= workers:
                break
            if any(d in failed for d in job.deps):
                failed[job.name] = {"status": "skipped", "error": "a job it needs failed"}
                pending.remove(job)
            elif all(d in results or d in (finished or {}) for d in job.deps):
                pending.remove(job)
                started += 1
                payload = {"kind": job.kind, "spec": job.spec, "out": job.out, "threads": job.threads}
                # a job training on a GPU reserves one (on Ray; locally it gets one of its own)
                gpus = gpus_for((job.spec.get("config") or {}).get("device", "auto"))
                running[pool.submit(_work, payload, cpus=job.threads, gpus=gpus)] = (job, started)
        if not running:
            for job in pending:  # unreachable dependencies
                failed[job.name] = {"status": "skipped", "error": f"unknown dependency in {job.deps}"}
            break
        task, r, error = pool.next_done()
        job, i = running.pop(task)
        if error is not None:  # `_work` reports a job's own exceptions: this one lost its process
            r = {"status": "failed", "error": f"worker died: {error}" if isinstance(error, WorkerDied)
                 else f"{type(error).__name__}: {error}"}
        label = job.label or job.name
        if r["status"] == "done":
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # others' work slows ours
            r = {**r, "job": job.name, "label": label, "kind": job.kind, "load_1m": load}
            write_json(job.result, r)
            if job.record:
                write_record(job.record, r)
            results[job.name] = {**r, "reused": False}
            log(f"[{i:3d}/{total}] {label:<48} {r['wall_s']:7.1f} s (cpu {r['cpu_s']:.0f} s)  "
                f"peak RSS {r['peak_rss_mb']:.0f} MB  {time.strftime('%H:%M:%S')}")
        else:
            failed[job.name] = r
            log(f"[{i:3d}/{total}] {label:<48} FAILED: {r['error']}\n{r.get('traceback', '')}")
    return {**results, **{n: {**r, "job": n} for n, r in failed.items()}}
