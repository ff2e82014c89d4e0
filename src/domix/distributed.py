"""One training on many processes (DDP under `torchrun` or `accelerate launch`): which process
writes, the others waiting for it, and failing together.

The Trainer does the data-parallel training; around it a result is written once (rank 0) and
complete when every rank returns, and an error on one rank reaches every rank, instead of
leaving the others blocked in a collective until its timeout. In one process (no launcher)
every function here is a no-op or runs its argument directly.
"""
from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from datetime import timedelta

# what the launchers set: torchrun and accelerate's torch launcher, or MPI (accelerate on CPUs with mpirun)
_SIZE = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
# the Trainer's default `ddp_timeout`; the other ranks wait this long while rank 0 tokenises a corpus
TIMEOUT = timedelta(seconds=1800)


class RankFailed(ValueError):
    """Another rank failed; the message is its error. A ValueError, so the command line reports
    it in one line (exit 2) as it does the input error that usually causes it."""


def _env(names: tuple[str, ...], default: int) -> int:
    return next((int(os.environ[n]) for n in names if os.environ.get(n)), default)


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return _env(_SIZE, 1) > 1


def launch_rank() -> int:
    """This process's rank as its launcher set it (before any process group exists)."""
    return _env(_RANK, 0)


def init(device) -> None:
    """Join the launcher's process group now (gloo on CPUs, NCCL on GPUs: accelerate's choice, the
    one the Trainer makes later and then reuses), so that the data preparation before the
    Trainer can be ordered and its errors shared."""
    if launched():
        from accelerate import PartialState

        PartialState(cpu=device.type == "cpu", timeout=TIMEOUT)
        atexit.unregister(_shutdown)  # once, however many runs the process makes
        atexit.register(_shutdown)


def _shutdown() -> None:
    """Leave the process group while the interpreter is whole. Left to interpreter teardown,
    gloo's worker threads can outlive it and the process aborts ("terminate called without an
    active exception", SIGABRT) after the command succeeded; torch asks programs to call
    `destroy_process_group` on exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _group():
    """torch.distributed when a group of more than one process is running, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    dist = _group()
    if dist:
        dist.barrier()


def _message(err: BaseException) -> str:
    return str(err) or type(err).__name__


def any_rank_failed(err: BaseException | None) -> None:
    """Every rank calls this at the same point with its own error (or None); a rank without an
    error raises `RankFailed` with the first failed rank's message when there is one (the rank
    that failed goes on to raise its own error)."""
    dist = _group()
    if dist is None:
        return
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if err is None else _message(err))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed and err is None:
        r, m = failed[0]
        raise RankFailed(f"rank {r} of {len(messages)} failed: {m}")


@contextmanager
def main_process_first():
    """Rank 0 runs the block first, then the others (e.g. tokenising and packing: rank 0 fills
    datasets' cache, the others read it). An error in the block on any rank is raised on every
    rank: the failed rank raises its own, the others `RankFailed` (accelerate's
    `main_process_first` would leave them waiting at its barrier for the failed rank)."""
    if not is_main():
        any_rank_failed(None)  # wait for rank 0's block
    try:
        yield
    except BaseException as e:
        any_rank_failed(e)
        raise
    any_rank_failed(None)
    if is_main():
        any_rank_failed(None)  # wait for the others' blocks


def on_main(fn):
    """`fn()` on rank 0 only (held-out scoring, writing a result); every rank returns its value,
    or raises its error (`RankFailed` on the other ranks). The other ranks wait meanwhile, so a
    result written by `fn` is complete when any rank returns."""
    dist = _group()
    if dist is None:
        return fn()
    out = [None]
    if dist.get_rank() == 0:
        try:
            out = [(True, fn())]
        except BaseException as e:
            dist.broadcast_object_list([(False, _message(e))], src=0)
            raise
    dist.broadcast_object_list(out, src=0)
    ok, value = out[0]
    if not ok:
        raise RankFailed(f"rank 0 of {dist.get_world_size()} failed: {value}")
    return value
