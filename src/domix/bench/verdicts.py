"""`domix bench verdicts DIR`: every verdict of a quality run, recomputed from its committed files.

DIR is a run's folder (`bench-out/quality-<preset>/` or its copy under `results/`): its `results.json`
names the fine-tuning runs and `predictions/` holds each run's record (`bench.quality.records`: dev
scores and every test prediction). The verdicts are computed by the same function as the run's
report, so they agree with `results.json`'s `verdicts` to the last digit; a difference means the
files were changed since.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..training import option


@dataclass(kw_only=True)
class VerdictsOptions:
    """Options of `domix bench verdicts`."""

    dir: str = option(help="a quality run's folder: results.json and predictions/", positional=True)


def recompute(folder) -> dict:
    """{"verdicts", "verdicts_unselected_seeds"?, "matches": whether they equal results.json's} of the run
    in `folder`. Raises ValueError when a file is missing or unreadable."""
    from .quality.records import FOLDER, read_records
    from .quality.settings import order_name
    from .quality.verdicts import run_verdicts, verdict_options

    folder = Path(folder)
    path = folder / "results.json"
    if not path.is_file():
        raise ValueError(f"{folder} holds no results.json: not a quality run's folder")
    results = json.loads(path.read_text())
    if not (folder / FOLDER).is_dir():
        raise ValueError(f"{folder} holds no {FOLDER}/ folder: its test predictions were not kept, so no verdict "
                         "can be recomputed")
    records = read_records(folder / FOLDER)
    missing = sorted({r["job"] for r in results["runs"]} - set(records))
    if missing:
        raise ValueError(f"{len(missing)} run(s) of {path} have no record in {folder / FOLDER}: {', '.join(missing[:3])}")
    orders = [order_name(o) for o in results["settings"]["orders"]]
    eq = results.get("order_checks", {}).get("domix", {}).get("modules_bitwise_equal")
    seeds, methods = results["seeds"], results["methods"]
    how = verdict_options(results["settings"])
    out = {"verdicts": run_verdicts(results["runs"], records, methods, orders, eq, **how)}
    if "verdicts_unselected_seeds" in results:
        out["verdicts_unselected_seeds"] = run_verdicts([r for r in results["runs"] if r["seed"] != seeds[0]],
                                                        records, methods, orders, eq, **how)
    from .quality.collect import SUITE_PROTOCOLS

    for name in SUITE_PROTOCOLS:  # a suite's other scoring protocols
        if f"verdicts_{name}" in results:
            out[f"verdicts_{name}"] = run_verdicts(results["runs"], records, methods, orders, eq,
                                                   **{**how, "prediction": f"y_pred_{name}"})
    out["matches"] = all(out[k] == results.get(k) for k in out)
    return out


def run(opts: VerdictsOptions) -> dict:
    from .quality.report_tables import claim_verdicts

    out = recompute(opts.dir)
    lines = claim_verdicts({"verdicts": out["verdicts"]})
    if "verdicts_unselected_seeds" in out:
        lines += ["", "From the seeds that chose nothing:", *claim_verdicts({"verdicts": out["verdicts_unselected_seeds"]})]
    lines += ["", "These equal the run's results.json." if out["matches"] else
              "These DIFFER from the run's results.json: its files were changed after the run."]
    return {**out, "table": "\n".join(lines)}
