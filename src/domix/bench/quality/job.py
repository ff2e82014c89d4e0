"""A job of the benchmark and its cache key: every job's spec (its settings, the base model's identity,
the data subset, the paths of its inputs, the thread count) is hashed into the name of its artefact
directory, so a rerun finds what it already computed."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ...io import sha256_text
from .records import restore
from .settings import METHODS

# Raised when domix itself computes different results from the same settings, so a rerun redoes
# the jobs an older domix computed instead of mixing them with new ones. 2: end-of-document is a
# next-token target when pad == eos; trained tensors fp32 over a base held in --dtype; MoDE experts
# through zero-initialised output maps (2026-11-30).
RESULTS_VERSION = 2
# The same for one bench method's fine-tuning runs only (their specs gain the field; the other jobs keep
# their keys). mode 2: under routed gates the experts' own gates train at the gate rate (2026-12-01).
# The domix family 2: the bridge is the PEFT tuner's layer (2026-12-03); fp32 runs are bitwise the same,
# bf16 gradients differ in their last bits (measured: grad norm 1.65862 against 1.65853 at the first step).
METHOD_VERSIONS = {"mode": 2, **{m: 2 for m, v in METHODS.items() if v["method"] == "domix"}}
# The same for a suite's (generate) fine-tuning runs of every method. 2: they train and evaluate with the
# chunked next-token loss (2026-12-03; losses as before to 1e-5 relative, at half the peak memory).
GENERATE_VERSION = 2


def _key(obj) -> str:
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))[:12]


def _base_id(base: str) -> dict:
    """What identifies the base checkpoint cheaply: its config and the sizes of its weight files."""
    from ...checkpoints import resolve_base

    path = Path(resolve_base(base))
    if not path.is_dir():
        return {"base": base}
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".bin")}
    cfg = (path / "config.json").read_text() if (path / "config.json").is_file() else ""
    return {"base": base, "config": sha256_text(cfg)[:16], "weights": files}


@dataclass
class Job:
    name: str          # unique; also the label in logs
    kind: str          # pretrain | ncl | mode-pretrain | mode-compose | merge | lm-eval | finetune | score
    spec: dict         # the runner's input; hashed (with the upstream paths in it) into the key
    out: str           # the artefact
    result: str        # result.json, written last
    deps: list = field(default_factory=list)
    threads: int = 1
    label: str = ""
    record: str = ""   # a fine-tune's committable record (`records.py`): its result, test predictions included

    def done(self) -> bool:
        if not Path(self.result).is_file() and not (self.record and restore(self.record, self.result)):
            return False
        if self.kind in ("pretrain", "mode-pretrain", "mode-compose", "merge"):
            return (Path(self.out) / "domix.json").is_file()
        if self.kind == "ncl":
            final = json.loads(Path(self.result).read_text()).get("final")
            return bool(final) and (Path(final) / "model.safetensors").is_file()
        return True


@dataclass
class Planning:
    """What every step of a plan reads, and the jobs (by name, in the order they were added) it adds to."""
    settings: dict
    data: dict         # the data subset (`data.prepare_data`)
    work: Path         # where the jobs' artefacts lie
    jobs: dict = field(default_factory=dict)
    common: dict = field(init=False)  # what every job's spec (hence its key) holds

    def __post_init__(self):
        from ...models import resolve_device

        device = resolve_device("auto")  # where the jobs' `auto` trains: a GPU rerun never reuses CPU results
        s = self.settings
        self.common = {"base_id": s["base_id"], "threads": s["threads"], "data": self.data["key"],
                       "results_version": RESULTS_VERSION, **({"device": device} if device != "cpu" else {})}

    def add(self, job: Job) -> Job:
        """The job, or the one of its name already planned."""
        return self.jobs.setdefault(job.name, job)
