"""`pretrain-all`: train every domain of a config, independently, locally or on Ray."""
from __future__ import annotations

import os
import traceback
from dataclasses import asdict, fields
from pathlib import Path

import yaml

from ..executors import make_executor
from .store import Library
from .pretrain import PretrainConfig, pretrain

RUN_KEYS = {"base"}  # top-level keys besides `defaults` and `domains`


def load_config(path: Path | str, library: str, overrides: dict | None = None,
                config_cls: type = PretrainConfig) -> list:
    """Parse a `domains.yaml` into one `config_cls` (default PretrainConfig) per domain, in the listed order.

    Data paths are relative to the config file; keys are the training command's options, underscored."""
    path = Path(path)
    doc = yaml.safe_load(path.read_text()) or {}
    unknown_top = set(doc) - RUN_KEYS - {"defaults", "domains"}
    if unknown_top:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown_top)}")
    domains = doc.get("domains") or {}
    if not domains:
        raise ValueError(f"{path}: no domains listed")
    allowed = {f.name for f in fields(config_cls)} - {"domain", "library", "extra"}
    configs = []
    for name, spec in domains.items():
        merged = {**({"base": doc["base"]} if "base" in doc else {}), **(doc.get("defaults") or {}),
                  **(spec or {}), **(overrides or {})}
        bad = set(merged) - allowed
        if bad:
            raise ValueError(f"{path}: domain '{name}': unknown keys {sorted(bad)} (allowed: {sorted(allowed)})")
        data = merged.pop("data", None)
        if not data:
            raise ValueError(f"{path}: domain '{name}' has no data")
        data = [data] if isinstance(data, str) else data
        data = [str(p if Path(p).is_absolute() else (path.parent / p)) for p in data]
        configs.append(config_cls(domain=str(name), data=data, library=library, **merged))
    return configs


def _run_one(cfg_dict: dict, cfg_cls: type = PretrainConfig, runner=pretrain) -> dict:
    """One domain in a worker: returns {"domain", "status", "meta" | "error"}."""
    cfg = cfg_cls(**cfg_dict)
    try:
        return {"domain": cfg.domain, "status": "done", "meta": runner(cfg)}
    except Exception as e:  # reported per domain; the other domains still finish
        return {"domain": cfg.domain, "status": "failed", "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}


def pretrain_all(configs: list[PretrainConfig], workers: int = 1, executor: str = "local",
                 ray_address: str | None = None, progress: bool = True, runner=None) -> dict:
    """Train every domain not already complete in its library. Returns {domain: result}.

    Each domain runs in its own process with `threads` intra-op threads (default: cores //
    workers), so its tensors do not depend on which or how many other domains run.
    `runner(cfg) -> meta` trains one domain (default: stage-1 `pretrain`; e.g. MoDE's
    `pretrain_expert` with its config class); it must be importable by the workers."""
    from tqdm.auto import tqdm

    results, todo = {}, []
    runner = runner or pretrain
    cfg_cls = type(configs[0]) if configs else PretrainConfig
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    for cfg in configs:
        # an entry of another kind under the same name is left to the runner, which refuses it
        kind = "full" if getattr(cfg, "full", False) else getattr(cfg, "kind", "lora")
        if (cfg.domain in Library(cfg.library) and not cfg.overwrite
                and Library(cfg.library).get(cfg.domain).kind == kind):
            results[cfg.domain] = {"domain": cfg.domain, "status": "skipped", "meta": Library(cfg.library).get(cfg.domain).meta}
            continue
        d = asdict(cfg)
        d.update(progress=False, threads=cfg.threads or threads)
        todo.append(d)
    bar = tqdm(total=len(todo), desc="domains", unit="module", disable=not progress)
    with make_executor(executor, workers, ray_address) as pool:
        domains = {pool.submit(_run_one, d, cfg_cls, runner, cpus=d["threads"],
                               gpus=1 if d["device"] == "cuda" else 0): d["domain"] for d in todo}
        while pool.in_flight:
            task, r, error = pool.next_done()
            if error is not None:  # its worker died: the other domains still finish
                r = {"domain": domains[task], "status": "failed", "error": f"{type(error).__name__}: {error}"}
            results[r["domain"]] = r
            bar.set_postfix_str(f"{r['domain']}: {r['status']}")
            bar.update()
    bar.close()
    return {c.domain: results[c.domain] for c in configs}
