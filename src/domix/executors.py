"""Run independent tasks in parallel, each in a fresh process: a local process pool or Ray tasks.

    with make_executor("local", workers=2) as pool:          # or "ray", ray_address="auto"
        names = {pool.submit(train, cfg, cpus=4): cfg.domain for cfg in configs}
        while pool.in_flight:
            task, result, error = pool.next_done()          # the next task to finish

`submit` starts a task as soon as the backend has room (locally: `workers` processes; on Ray:
the cluster's free `cpus` and `gpus`, which a task reserves) and returns its handle, an int.
`next_done` waits for the next task to finish and returns `Done(task, result, error)`: its
return value, or the exception it raised (`error`, then `result` is None). A task whose process
died before it returned (killed, out of memory) fails with `WorkerDied`; the executor carries on
with the other tasks. A task's function and arguments travel by pickle: the function must be a
module-level function of an importable module. On a Ray cluster of several machines, paths in the
arguments must mean the same on every node (a shared file system).
"""
from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

from .options import option


@dataclass(kw_only=True)
class PoolOptions:
    """Where runs go: the executor options of `pretrain-all`, `mode pretrain --config`, `bench quality`."""

    workers: int = option(1, "runs at once (local executor)")
    executor: str = option("local", "local processes or a Ray cluster", choices=("local", "ray"))
    ray_address: str | None = option(None, "Ray cluster address (default: start a local instance)")


class WorkerDied(RuntimeError):
    """The process running a task died before the task returned."""


class Done(NamedTuple):
    task: int
    result: Any
    error: BaseException | None


class _Executor:
    def __init__(self):
        self._ids = itertools.count()
        self._running: dict = {}  # backend handle -> task id
        self._done: deque[Done] = deque()  # finished, not yet handed out by next_done

    @property
    def in_flight(self) -> int:
        """Tasks submitted whose outcome `next_done` has not handed out yet."""
        return len(self._running) + len(self._done)

    def next_done(self) -> Done:
        if not self.in_flight:
            raise ValueError("no task in flight")
        if not self._done:
            self._wait()
        return self._done.popleft()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` names them (or their indices)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]  # counts without starting CUDA
    except ImportError:
        return []


def _on_gpu(gpu: str, fn, *args):
    """`fn(*args)` in a fresh worker that sees one GPU only (set before anything there starts CUDA)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return fn(*args)


class LocalExecutor(_Executor):
    """A `ProcessPoolExecutor` of `workers` processes, each running one task, then replaced.

    A task that asks for a GPU gets one of the visible GPUs to itself (its process sees only that one,
    `cuda` meaning it), the GPUs taken in turn among those no running task holds; with more such tasks
    than GPUs they share them in turn. When a worker dies the pool is broken: every task in it fails
    with `WorkerDied` and a new pool runs the tasks submitted after that."""

    def __init__(self, workers: int = 1, mp_context=None):
        from multiprocessing import get_context

        super().__init__()
        self.workers = max(1, workers)
        self.mp_context = mp_context or get_context("spawn")
        self._pool = None
        self._gpu_of: dict = {}  # future -> the GPU its task holds

    def submit(self, fn, *args, cpus: int = 1, gpus: int = 0) -> int:
        """Run `fn(*args)` in a fresh process. `cpus` is what Ray would reserve (a local pool runs
        `workers` tasks at once, whatever they ask for); with `gpus` > 0 the task gets a GPU of its own
        when one is visible."""
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=self.mp_context,
                                             max_tasks_per_child=1)
        task = next(self._ids)
        gpu = None
        if gpus and (visible := visible_gpus()):
            held = [g for f, g in self._gpu_of.items() if f in self._running]
            gpu = min(visible, key=lambda g: (held.count(g), visible.index(g)))
        fut = self._pool.submit(_on_gpu, gpu, fn, *args) if gpu is not None else self._pool.submit(fn, *args)
        self._running[fut] = task
        if gpu is not None:
            self._gpu_of[fut] = gpu
        return task

    def _wait(self) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        done, _ = wait(self._running, return_when=FIRST_COMPLETED)
        broken = None
        for fut in done:
            task = self._running.pop(fut)
            self._gpu_of.pop(fut, None)
            try:
                self._done.append(Done(task, fut.result(), None))
            except BrokenProcessPool as e:  # a worker was killed (e.g. out of memory): the pool is gone
                broken = e
                self._done.append(Done(task, None, WorkerDied(str(e))))
            except Exception as e:
                self._done.append(Done(task, None, e))
        if broken:  # the tasks still in the pool died with it; a new pool runs what comes next
            for task in self._running.values():
                self._done.append(Done(task, None, WorkerDied(f"the worker pool broke while it ran: {broken}")))
            self._running, self._gpu_of = {}, {}
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor(_Executor):
    """Ray tasks (`max_retries=0`; `max_calls=1`: a fresh worker process per task), on the
    cluster at `address`, or on a local Ray instance of all cores started at the first submit
    and shut down by `close` (as is a connection this executor made)."""

    def __init__(self, address: str | None = None):
        super().__init__()
        self.address = address
        self._started_here = False
        self._remote: dict = {}  # fn -> its ray remote function

    def submit(self, fn, *args, cpus: int = 1, gpus: int = 0) -> int:
        """Run `fn(*args)` as a Ray task reserving `cpus` CPUs and `gpus` GPUs."""
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     **({} if self.address else {"num_cpus": os.cpu_count()}))
            self._started_here = True
        if fn not in self._remote:
            self._remote[fn] = ray.remote(max_retries=0, max_calls=1)(fn)
        task = next(self._ids)
        self._running[self._remote[fn].options(num_cpus=cpus, num_gpus=gpus).remote(*args)] = task
        return task

    def _wait(self) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        (ref,), _ = ray.wait(list(self._running), num_returns=1)
        task = self._running.pop(ref)
        try:
            self._done.append(Done(task, ray.get(ref), None))
        except RayTaskError as e:  # the function raised: hand back its exception
            self._done.append(Done(task, None, e.as_instanceof_cause()))
        except RayError as e:  # its worker or node died
            self._done.append(Done(task, None, WorkerDied(f"{type(e).__name__}: {e}")))

    def close(self) -> None:
        if self._started_here:
            import ray

            ray.shutdown()
            self._started_here = False


def make_executor(kind: str = "local", workers: int = 1, ray_address: str | None = None, mp_context=None):
    """`local`: a pool of `workers` processes from `mp_context` (default: spawn); `ray`: Ray tasks
    on the cluster at `ray_address` (default: a local instance), as many at once as the tasks'
    reservations allow (`workers` and `mp_context` do not apply)."""
    if kind == "local":
        return LocalExecutor(workers, mp_context)
    if kind == "ray":
        return RayExecutor(ray_address)
    raise ValueError(f"unknown executor {kind!r} (local or ray)")
