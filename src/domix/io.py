"""Atomic writes (a file or a directory is complete or absent), sha256 of files, and the
commands' JSON output. Every write of domix goes through `atomic_write`, `write_json` or
`atomic_dir`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    """Make a rename in directory `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write `data` to a temporary sibling of `path`, flush it to disk, rename it over `path` in
    one step and flush the directory: after a crash `path` holds the old or the new content, and
    an error while writing (a full disk, no permission) leaves the old one untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode(encoding) if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: Path | str, obj, indent: int = 2) -> None:
    atomic_write(path, json.dumps(obj, indent=indent, default=str) + "\n")


def save_figure(fig, path: Path | str, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG, written atomically like every result, and closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths in one step (Linux >= 3.15)


def _exchange(a: Path, b: Path) -> bool:
    """Swap directories `a` and `b` atomically; False where the system cannot (then the caller
    falls back to two renames)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


@contextmanager
def atomic_dir(dest: Path | str, overwrite: bool = False):
    """Yield a staging directory next to `dest`; on success its files are flushed to disk and it
    takes `dest`'s place in one step (an existing `dest` is swapped out atomically where the
    system can, renameat2; elsewhere by two renames, during which `dest` is briefly absent — never
    half-written). On an error the staging directory is removed and `dest` is untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists")
    stage = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        yield stage
        stage.chmod(0o755)  # mkdtemp's 0700 would make the result private
        _fsync_tree(stage)
        if dest.exists():
            if _exchange(stage, dest):  # stage now holds the old version
                shutil.rmtree(stage, ignore_errors=True)
            else:
                old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
                os.replace(dest, old / dest.name)
                os.replace(stage, dest)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


@contextmanager
def cache_lock(path: Path | str, timeout: float = 3600.0):
    """A file lock (`filelock`) held while a shared cache entry is built, so processes started
    together (`pretrain-all --workers 2` on an empty cache) build it once; the others wait."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock"), timeout=timeout):
        yield


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


_json_out = None  # set by json_stdout(): where print_json writes while stdout is redirected


@contextmanager
def json_stdout():
    """For `--json` runs: stdout carries only `print_json`'s document; everything else printed
    meanwhile (the Trainer's log lines, library notices) goes to stderr."""
    import contextlib
    import sys

    global _json_out
    _json_out = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _json_out = None


def print_json(obj) -> None:
    """The commands' `--json` output: indented, anything unknown as its str()."""
    import sys

    print(json.dumps(obj, indent=2, default=str), file=_json_out or sys.stdout, flush=True)
