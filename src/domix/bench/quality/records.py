"""A run's committable records: one gzipped JSON file per fine-tuning run under `<out>/predictions/`,
holding the run's whole result (dev curve, kept step, test scores and every test prediction).

They are what `domix bench verdicts DIR` recomputes the verdicts from, and they carry a run across
machines: a fine-tune whose `result.json` is missing but whose record is in `<out>/predictions/` (say,
copied there from a committed `results/` folder) is restored from it instead of run again (its key,
hence its settings and inputs, is in the file name).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from ...io import atomic_write, write_json

FOLDER = "predictions"


def record_path(work: Path, job_dir: str) -> Path:
    """Where the fine-tune in `work/<job_dir>` keeps its record: `<out>/predictions/<job_dir>.json.gz`."""
    return Path(work).parent / FOLDER / f"{job_dir}.json.gz"


def write_record(path, result: dict) -> None:
    """A fine-tune's result as its record (atomic; gzip without a time stamp, so equal results give
    equal files)."""
    data = json.dumps({k: v for k, v in result.items() if k not in ("reused", "traceback")}, sort_keys=True)
    atomic_write(path, gzip.compress(data.encode(), mtime=0))


def read_record(path) -> dict:
    """A record's result; a corrupt or truncated file raises ValueError naming it."""
    try:
        return json.loads(gzip.decompress(Path(path).read_bytes()))
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path} is not a readable run record ({type(e).__name__}: {e})") from e


def restore(record, result) -> bool:
    """Write the fine-tune's `result.json` from its record when the record exists and reads; False
    otherwise (the job then runs)."""
    if not Path(record).is_file():
        return False
    try:
        r = read_record(record)
    except ValueError:
        return False
    if r.get("status") != "done":
        return False
    write_json(result, r)
    return True


def read_records(folder) -> dict:
    """{job name (`finetune/<key>`): result} of every record in `folder`."""
    out = {}
    for p in sorted(Path(folder).glob("*.json.gz")):
        r = read_record(p)
        out[r.get("job") or f"finetune/{p.name.split('-')[-1].split('.')[0]}"] = r
    return out


def task_result(result: dict, task: str) -> dict:
    """One task's view of a run's result: a suite's run holds every task's test scores and predictions
    (`tests`, `test_predictions` by task); a single task's run is its own view."""
    if "tests" not in result:
        return result
    return {**result, "test": result["tests"][task], "test_predictions": result["test_predictions"][task]}
