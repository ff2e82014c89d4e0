"""A benchmark of the user's own data (`domix bench quality --config bench.yaml`): the same protocol
as the built-in four domains, on the user's corpora and labelled tasks.

    preset: decisive            # quick | decisive | full: the budgets (default: quick)
    base: smollm2-135m          # optional; --base wins
    domains:                    # domain -> its unlabelled corpus (a path or a list of paths:
      legal: corpora/legal.txt  #   .txt one document per line, .jsonl/.csv with a "text" field, folders)
      med: [corpora/med1.jsonl, corpora/med2.jsonl]
    general: corpora/wiki.txt   # optional: general text for the retention loss
    tasks:                      # task -> its splits (JSONL, {"text": ..., "label": ...}) and its domain
      contracts: {domain: legal, train: t/c/train.jsonl, dev: t/c/dev.jsonl, test: t/c/test.jsonl}
      notes: {domain: med, train: ..., dev: ..., test: ...}
    settings:                   # optional overrides of the preset, e.g.
      finetune: {train: 400}

Relative paths are read from the config file's folder. Every problem is reported at once, before
anything runs.
"""
from __future__ import annotations

from pathlib import Path

from ...data.benchmark import GENERAL
from .data import SPLITS


class ConfigError(ValueError):
    """A benchmark config that cannot be run; the message lists every problem found."""


def read_config(path) -> dict:
    """{"preset", "base", "settings", "task_domains", "source"} of the config at `path` (see the
    module's docstring); raises ConfigError naming every problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark config {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping with 'domains' and 'tasks'")
    here = path.parent
    problems = []
    unknown = set(cfg) - {"preset", "base", "domains", "general", "tasks", "settings"}
    if unknown:
        problems.append(f"unknown keys {sorted(unknown)} (known: preset, base, domains, general, tasks, settings)")

    def resolve(p) -> str:
        p = Path(str(p)).expanduser()
        return str(p if p.is_absolute() else here / p)

    domains, corpora = cfg.get("domains"), {}
    if not isinstance(domains, dict) or not domains:
        problems.append("'domains' must map each domain's name to its corpus (a path or a list of paths)")
        domains = {}
    for d, paths in domains.items():
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths:
            problems.append(f"domain {d}: give its corpus as a path or a list of paths")
            continue
        corpora[str(d)] = [resolve(p) for p in paths]
        problems += [f"domain {d}: corpus {p} does not exist" for p in corpora[str(d)] if not Path(p).exists()]
    general = cfg.get("general")
    if general is not None:
        general = resolve(general)
        if not Path(general).is_file():
            problems.append(f"general text {general} does not exist")
        if GENERAL in corpora:
            problems.append(f"a domain cannot be named '{GENERAL}' when the config gives general text")
    tasks, source_tasks = cfg.get("tasks"), {}
    if not isinstance(tasks, dict) or not tasks:
        problems.append("'tasks' must map each task's name to {domain, train, dev, test}")
        tasks = {}
    for name, t in tasks.items():
        if not isinstance(t, dict):
            problems.append(f"task {name}: expected {{domain, train, dev, test}}")
            continue
        if t.get("domain") not in corpora:
            problems.append(f"task {name}: its domain {t.get('domain')!r} is not among the config's domains "
                            f"{sorted(corpora)}")
        lacking = [s for s in SPLITS if not t.get(s)]
        if lacking:
            problems.append(f"task {name}: no {', '.join(lacking)} split (train, dev and test are all needed)")
            continue
        files = {s: resolve(t[s]) for s in SPLITS}
        absent = [f for f in files.values() if not Path(f).is_file()]
        if absent:
            problems += [f"task {name}: {f} does not exist" for f in absent]
            continue
        problems += _check_task(str(name), files)
        source_tasks[str(name)] = {"domain": t.get("domain"), **files}
    if problems:
        raise ConfigError(f"benchmark config {path}:\n  - " + "\n  - ".join(problems))
    return {"preset": cfg.get("preset"), "base": cfg.get("base"), "settings": cfg.get("settings") or {},
            "task_domains": {t: v["domain"] for t, v in source_tasks.items()},
            "source": {"root": None, "corpora": corpora, "general": general, "tasks": source_tasks}}


def _check_task(name: str, files: dict) -> list[str]:
    """A task's splits, read as fine-tuning reads them (`read_jsonl`: JSON lines with "text" and
    "label", not empty), and every dev/test label seen in train."""
    from ...data.tasks import TaskDataError, label_names, read_jsonl

    problems, labels = [], {}
    for split, f in files.items():
        try:
            labels[split] = set(label_names(read_jsonl(f, ("text", "label"))))
        except TaskDataError as e:
            problems.append(f"task {name}: {e}")
    for split in ("dev", "test"):
        unseen = labels.get(split, set()) - labels.get("train", set())
        if "train" in labels and unseen:
            problems.append(f"task {name}: labels {sorted(unseen)} of its {split} split are absent from train")
    return problems
