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


def atomic_write(path: Path | str, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write `data` to a temporary sibling of `path`, then rename it over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode(encoding) if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path | str, obj, indent: int = 2) -> None:
    atomic_write(path, json.dumps(obj, indent=indent, default=str) + "\n")


@contextmanager
def atomic_dir(dest: Path | str, overwrite: bool = False):
    """Yield a staging directory next to `dest`; on success it replaces `dest` in one rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists")
    stage = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        yield stage
        stage.chmod(0o755)  # mkdtemp's 0700 would make the result private
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
            os.replace(dest, old / dest.name)
            os.replace(stage, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


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
