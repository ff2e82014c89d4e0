"""`pretrain-all`: train every domain of a config, independently, locally or on Ray.

`read_config` (a YAML of named entries over shared defaults) and `run_all` (every entry not yet
complete, each in its own process, failures reported while the others finish) are also
`finetune-all`'s."""
from __future__ import annotations

import os
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from ..executors import PoolOptions, make_executor
from ..options import option
from .store import Library
from .pretrain import PretrainConfig, pretrain


@dataclass(kw_only=True)
class PretrainAllOptions(PoolOptions):
    """Options of `domix pretrain-all` (beside the training options that override the config's): which
    domains, where their modules go, and how the runs share the machine."""

    config: str = option(help="domains.yaml (base, defaults, domains); the training options given here override it "
                              "for every domain")
    library: str = option(help="library directory")
    fused: bool = option(False, "train every LoRA module in one process that holds the base once (decoders; one "
                                "seq_len): each row of a stacked batch through its own domain's LoRA")
    fused_stack: int | None = option(None, "with --fused: how many domains' batches share one forward/backward pass "
                                           "(default: all); fewer hold fewer activations at once (1: the domains take "
                                           "turns through the one base)", metavar="K")
    fused_parallel: int | None = option(None, "with --fused: how many of those passes run at once, in threads of the "
                                              "one process that share the --threads cores (default: 1); on a 2-core "
                                              "CPU, --fused-stack 1 --fused-parallel 2 --threads 2 trained 4 modules as "
                                              "fast as separate processes at half their memory (docs/efficiency.md)",
                                        metavar="P")

RUN_KEYS = {"base"}  # top-level keys besides `defaults` and `domains`


def read_config(path: Path | str, section: str, allowed: set[str], shared: tuple = ("base",), run: tuple = (),
                overrides: dict | None = None, paths: tuple = ()) -> tuple[dict, list[tuple[str, dict]]]:
    """(the document, [(name, options)]) of a YAML config: the entries of `section` in their order,
    each one's options = the `shared` top-level keys, `defaults`, its own, then `overrides`.

    `run`: other top-level keys allowed (read by the caller from the document). Keys outside
    `allowed` are refused, naming the allowed ones. The file's relative values of `paths` (a
    string or a list) are resolved from its folder; `overrides` are taken as given."""
    path = Path(path)
    doc = yaml.safe_load(path.read_text()) or {}
    what = section.removesuffix("s")
    top = {*shared, *run, "defaults", section}
    if set(doc) - top:
        raise ValueError(f"{path}: unknown top-level keys {sorted(set(doc) - top)} (allowed: {sorted(top)})")
    entries = doc.get(section) or {}
    if not entries:
        raise ValueError(f"{path}: no {section} listed")

    def resolve(p):
        return str(p if Path(p).is_absolute() else path.parent / p)

    out = []
    for name, spec in entries.items():
        merged = {**{k: doc[k] for k in shared if k in doc}, **(doc.get("defaults") or {}), **(spec or {})}
        merged.update({k: (resolve(v) if isinstance(v, str) else [resolve(p) for p in v])
                       for k, v in merged.items() if k in paths and v})
        merged.update(overrides or {})
        bad = set(merged) - allowed
        if bad:
            raise ValueError(f"{path}: {what} '{name}': unknown keys {sorted(bad)} (allowed: {sorted(allowed)})")
        out.append((str(name), merged))
    return doc, out


def load_config(path: Path | str, library: str, overrides: dict | None = None,
                config_cls: type = PretrainConfig) -> list:
    """Parse a `domains.yaml` into one `config_cls` (default PretrainConfig) per domain, in the listed order.

    Data paths are relative to the config file; keys are the training command's options, underscored."""
    allowed = {f.name for f in fields(config_cls)} - {"domain", "library", "extra"}
    _, entries = read_config(path, "domains", allowed, shared=tuple(RUN_KEYS), overrides=overrides, paths=("data",))
    configs = []
    for name, merged in entries:
        data = merged.pop("data", None)
        if not data:
            raise ValueError(f"{path}: domain '{name}' has no data")
        configs.append(config_cls(domain=name, data=[data] if isinstance(data, str) else data, library=library,
                                  **merged))
    return configs


def _run_one(name: str, key: str, cfg_dict: dict, cfg_cls: type = PretrainConfig, runner=pretrain) -> dict:
    """One entry in a worker: returns {key: name, "status", "meta" | "error"}."""
    try:
        return {key: name, "status": "done", "meta": runner(cfg_cls(**cfg_dict))}
    except Exception as e:  # reported per entry; the others still finish
        return {key: name, "status": "failed", "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}


def run_all(configs: dict, runner, complete, *, key: str = "domain", unit: str = "module", workers: int = 1,
            executor: str = "local", ray_address: str | None = None, progress: bool = True,
            cpus: float | None = None, gpus: float | None = None) -> dict:
    """`runner(config)` for every {name: config} where `complete(config)` is None (else that is its
    meta, reported skipped), each in its own process. Returns {name: {key: name, "status":
    done|skipped|failed, "meta" | "error"}} in the given order.

    A config runs with `threads` intra-op threads (default: `cpus`, else cores // workers), so
    its tensors do not depend on what runs beside it; on Ray it reserves `cpus` (default: its
    threads) and `gpus` (default: 1 when its device resolves to CUDA, `auto` included; a local pool gives
    each such run a GPU of its own). `runner` must be importable by the workers."""
    from ..models import gpus_for

    from tqdm.auto import tqdm

    results, todo = {}, {}
    threads = max(1, int(cpus) if cpus else (os.cpu_count() or 1) // max(1, workers))
    for name, cfg in configs.items():
        meta = complete(cfg)
        if meta is not None:
            results[name] = {key: name, "status": "skipped", "meta": meta}
            continue
        todo[name] = {**asdict(cfg), "progress": False, "threads": cfg.threads or threads}
    bar = tqdm(total=len(todo), desc=f"{key}s", unit=unit, disable=not progress)
    with make_executor(executor, workers, ray_address) as pool:
        names = {pool.submit(_run_one, name, key, d, type(configs[name]), runner, cpus=cpus or d["threads"],
                             gpus=gpus_for(d["device"]) if gpus is None else gpus): name
                 for name, d in todo.items()}
        while pool.in_flight:
            task, r, error = pool.next_done()
            if error is not None:  # its worker died: the others still finish
                r = {key: names[task], "status": "failed", "error": f"{type(error).__name__}: {error}"}
            results[names[task]] = r
            bar.set_postfix_str(f"{names[task]}: {r['status']}")
            bar.update()
    bar.close()
    return {name: results[name] for name in configs}


def _module_complete(cfg) -> dict | None:
    """The meta of `cfg`'s finished library entry; None when it is to be trained. An entry of
    another kind under the same name is left to the runner, which refuses it."""
    kind = "full" if getattr(cfg, "full", False) else getattr(cfg, "kind", "lora")
    lib = Library(cfg.library)
    if cfg.domain in lib and not cfg.overwrite and lib.get(cfg.domain).kind == kind:
        return lib.get(cfg.domain).meta
    return None


def pretrain_all(configs: list[PretrainConfig], workers: int = 1, executor: str = "local",
                 ray_address: str | None = None, progress: bool = True, runner=None) -> dict:
    """Train every domain not already complete in its library (`run_all`). Returns {domain: result}.

    `runner(cfg) -> meta` trains one domain (default: stage-1 `pretrain`; e.g. MoDE's
    `pretrain_expert` with its config class)."""
    return run_all({c.domain: c for c in configs}, runner or pretrain, _module_complete, key="domain",
                   unit="module", workers=workers, executor=executor, ray_address=ray_address, progress=progress)
