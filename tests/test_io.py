"""Crash-safe writes: a file or directory is the old version or the new one, never half of
either; an error while writing (a full disk, no permission) leaves the old one intact and no
debris; a shared cache entry is built by one process while the others wait."""
from __future__ import annotations

import errno
import multiprocessing as mp
import os
import time

import pytest

from domix.io import atomic_dir, atomic_write, cache_lock


def _debris(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    atomic_write(path, "old")
    atomic_write(path, "new")
    assert path.read_text() == "new" and _debris(tmp_path) == []

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, "newer")
    assert path.read_text() == "new" and _debris(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_dir_swaps_a_whole_directory_and_a_failure_keeps_the_old_one(tmp_path, monkeypatch, exchange):
    import domix.io

    if not exchange:  # systems without renameat2's exchange
        monkeypatch.setattr(domix.io, "_exchange", lambda a, b: False)
    dest = tmp_path / "module"
    with atomic_dir(dest) as stage:
        (stage / "a.txt").write_text("1")
        (stage / "sub").mkdir()
        (stage / "sub" / "b.txt").write_text("1")
    with atomic_dir(dest, overwrite=True) as stage:
        (stage / "a.txt").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"] and (dest / "a.txt").read_text() == "2"
    assert _debris(tmp_path) == []
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_dir(dest, overwrite=True) as stage:
            (stage / "a.txt").write_text("3")
            raise RuntimeError("interrupted while writing")
    assert (dest / "a.txt").read_text() == "2" and _debris(tmp_path) == []
    with pytest.raises(FileExistsError):
        with atomic_dir(dest):
            pass


def _count_under_lock(path):
    with cache_lock(path):
        n = int(path.read_text()) if path.exists() else 0
        time.sleep(0.3)  # another process reading meanwhile would lose this increment
        atomic_write(path, str(n + 1))


def test_cache_lock_lets_one_process_build_at_a_time(tmp_path):
    path = tmp_path / "entry"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_count_under_lock, args=(path,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert path.read_text() == "3"
