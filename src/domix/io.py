"""Atomic writes: a file or a directory is complete or absent; the commands' JSON output."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def write_json(path: Path | str, obj, indent: int = 2) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(stage, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


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
