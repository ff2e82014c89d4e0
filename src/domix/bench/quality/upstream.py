"""The jobs upstream of fine-tuning: what each method starts from (the LoRA modules of every domain
order, the control's untrained modules, their merges, the joint module, ncl's checkpoints, MoDE's
experts and compositions, the all-weights models of MoDE's comparison) and the held-out LM loss of
each."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .job import Job, Planning, _key
from .settings import COMPOSE, MERGES, NEEDS, NO_SAVE, compose_gate_lr, order_name


@dataclass
class Upstream:
    """Where each starting point lies, with the job that makes it (None or empty: not in this plan)."""
    libs: dict                # {order name: the library of LoRA modules pre-trained in that order}
    lib_a: Path | None        # the first order's library
    lib_u: Path | None        # the control's library: order A's modules as initialised
    merged: dict              # {merge method: (job name, its library)}
    joint: Path | None        # joint-lora's library
    ncl: dict                 # {order name: (job name, its checkpoints)}
    mode_lib: Path | None     # MoDE's experts
    composed: dict            # {composition variant: (job name, its model)}
    full_lib: Path | None     # the domains' all-weights models


def upstream_jobs(p: Planning, methods: list[str]) -> Upstream:
    """Plan what `methods` start from, in this order."""
    needs = {NEEDS.get(m) for m in methods}
    libs = _modules(p, needs, "domix" in methods)
    lib_a = libs.get(order_name(p.settings["orders"][0]))
    lib_u = _untrained(p, needs)
    merged = _merges(p, methods, lib_a)
    joint = _joint(p, needs)
    ncl = _ncl(p, needs)
    mode_lib, composed = _mode(p, needs)
    return Upstream(libs, lib_a, lib_u, merged, joint, ncl, mode_lib, composed, _full(p, mode_lib))


# ---------------------------------------------------------------------------- training configs
def _train_cfg(settings: dict, cls, **kw) -> dict:
    """Every option of the training config `cls` (PretrainConfig, ModePretrainConfig,
    ComposeConfig), defaults included, so that a changed default changes the key."""
    pre = settings["pretrain"]
    cfg = {"seq_len": pre["seq_len"], "batch_size": pre["batch_size"], "seed": pre["seed"], "eval_blocks": 4,
           "save_steps": NO_SAVE, "threads": settings["threads"], "progress": False, "overwrite": True, **kw}
    return {**asdict(cls(**cfg)), **cfg}


def _pretrain_cfg(settings: dict, domain: str, data: list[str], library: Path, steps: int, **kw) -> dict:
    from ...library.pretrain import PretrainConfig

    pre = settings["pretrain"]
    return _train_cfg(settings, PretrainConfig, **{
        "domain": domain, "data": data, "library": str(library), "base": settings["base"], "rank": pre["rank"],
        "alpha": pre["alpha"], "lr": pre["lr"], "max_steps": steps, "dtype": pre.get("dtype", "fp32"), **kw})


def _mode_cfg(settings: dict, cls, **kw) -> dict:
    """A MoDE expert's or composition's config: the MoDE rates, and the pre-training dtype that the LoRA
    modules and the all-weights runs use (their costs per token are compared)."""
    rates = {k: settings["mode"][k] for k in ("lr", "gate_lr") if k in settings["mode"]}
    return _train_cfg(settings, cls, **{**rates, "dtype": settings["pretrain"].get("dtype", "fp32"), **kw})


def _library_key(common: dict, member_cfg: dict) -> str:
    """A library's key: what every member's config shares (all but its domain, data and place)."""
    return _key({**common, "config": {k: v for k, v in member_cfg.items() if k not in ("domain", "data", "library")}})


def _library(p: Planning, prefix: str, name: str, domains: list[str], steps: int, **kw) -> Path:
    """A library of one module per domain, pre-trained by `pretrain` jobs `<name>/<domain>` (`kw`: the
    options that differ from the LoRA modules')."""
    settings, corpora = p.settings, p.data["corpora"]
    shared = _pretrain_cfg(settings, "", [], Path("."), steps, **kw)  # what every module of the library shares
    lib = p.work / f"{prefix}-{_library_key(p.common, shared)}"
    for d in domains:
        cfg = _pretrain_cfg(settings, d, [corpora[d]["path"]], lib, steps, **kw)
        p.add(Job(f"{name}/{d}", "pretrain", {"config": cfg, **p.common}, str(lib / d),
                  str(lib / ".results" / f"{d}.json")))
    return lib


FULL = {"full": True, "rank": None, "alpha": None}  # all weights trained (with the pre-training's full_lr)


# ---------------------------------------------------------------------------- the starting points
def _modules(p: Planning, needs: set, order_check: bool) -> dict:
    """Stage 1: one LoRA module per domain, each library trained in its own domain order (the first
    order alone without DoMIX's order check)."""
    if "modules" not in needs:
        return {}
    orders, steps = p.settings["orders"], p.settings["pretrain"]["steps"]
    if not (order_check and p.settings.get("order_check", True)):
        orders = orders[:1]
    return {order_name(order): _library(p, f"lib-{'-'.join(order)}", f"module/{i + 1}", order, steps)
            for i, order in enumerate(orders)}


def _untrained(p: Planning, needs: set) -> Path | None:
    """The control's library: order A's modules as initialised (one step at learning rate 0: the same
    A's as the trained modules start from, B = 0), so that only the pre-training differs."""
    if "untrained" not in needs:
        return None
    return _library(p, "lib-untrained", "untrained", p.settings["orders"][0], 1, lr=0.0)


def _merges(p: Planning, methods: list[str], lib_a: Path | None) -> dict:
    """The merge baselines: order A's modules merged into one by PEFT, one entry per combination."""
    from ...library.merge import DEFAULT_DENSITY

    domains, merged = p.settings["domains"], {}
    for method in [m for m in methods if m in MERGES]:
        comb = MERGES[method]
        spec = {"library": str(lib_a), "modules": list(domains), "combination": comb, "base": p.settings["base"],
                "weights": [1.0 / len(domains)] * len(domains),
                "density": None if comb == "linear" else DEFAULT_DENSITY, "seed": p.settings["pretrain"]["seed"],
                **p.common}
        mdir = p.work / f"merge-{comb}-{_key(spec)}"
        merged[method] = (f"merge/{comb}", mdir)
        p.add(Job(f"merge/{comb}", "merge", spec, str(mdir / method), str(mdir / "result.json"),
                  [f"module/1/{d}" for d in domains]))
    return merged


def _joint(p: Planning, needs: set) -> Path | None:
    """joint-lora's module: one LoRA on the union of the domains, their summed token budget."""
    if "joint" not in needs:
        return None
    domains, common = p.settings["domains"], p.common
    cfg = _pretrain_cfg(p.settings, "joint", [p.data["corpora"][d]["path"] for d in domains], Path("."),
                        p.settings["pretrain"]["steps"] * len(domains))
    lib = p.work / f"joint-{_key({**common, 'config': {**cfg, 'library': None}})}"
    cfg["library"] = str(lib)
    p.add(Job("joint", "pretrain", {"config": cfg, **common}, str(lib / "joint"), str(lib / ".results" / "joint.json")))
    return lib


def _ncl(p: Planning, needs: set) -> dict:
    """ncl: full-parameter pre-training over the domains in turn, per order."""
    if "ncl" not in needs:
        return {}
    pre, ncl = p.settings["pretrain"], {}
    for i, order in enumerate(p.settings["orders"]):
        stages = [_pretrain_cfg(p.settings, d, [p.data["corpora"][d]["path"]], Path("."), pre["steps"],
                                lr=pre["full_lr"], **FULL) for d in order]
        spec = {"stages": stages, "base": p.settings["base"], "keep_stages": False, **p.common}
        d = p.work / f"ncl-{'-'.join(order)}-{_key(spec)}"
        ncl[order_name(order)] = (f"ncl/{i + 1}", d)
        p.add(Job(f"ncl/{i + 1}", "ncl", spec, str(d), str(d / "result.json")))
    return ncl


def _mode(p: Planning, needs: set) -> tuple[Path | None, dict]:
    """MoDE: one expert per domain (the modules' token budget), then compositions on the mixture.
    Returns the experts' library and {variant: (job name, the composed model)}."""
    if not needs & set(COMPOSE):
        return None, {}
    from ...mode.train import ComposeConfig, ModePretrainConfig

    settings, data, common, domains = p.settings, p.data, p.common, p.settings["domains"]
    mode, composed = settings["mode"], {}
    shared = _mode_cfg(settings, ModePretrainConfig, domain="", data=[], library="",
                       max_steps=settings["pretrain"]["steps"], base=settings["base"])
    lib = p.work / f"mode-lib-{_library_key(common, shared)}"
    for d in domains:
        cfg = {**shared, "domain": d, "data": [data["corpora"][d]["path"]], "library": str(lib)}
        p.add(Job(f"mode/expert/{d}", "mode-pretrain", {"config": cfg, **common}, str(lib / d),
                  str(lib / ".results" / f"{d}.json")))
    for variant in [v for v in COMPOSE if v in needs]:
        cfg = _mode_cfg(settings, ComposeConfig, library=str(lib), out="", experts=list(domains),
                        data=[f"{d}={data['corpora'][d]['path']}" for d in domains], base=settings["base"],
                        max_steps=mode["compose_steps"], **COMPOSE[variant],
                        gate_lr=compose_gate_lr(mode),  # fresh gates: their own rate
                        gate_context=mode.get("gate_context", "token"), gate_form=mode.get("gate_form", "softmax"))
        cdir = p.work / f"{variant}-compose-{_key({**common, 'config': cfg})}"
        cfg["out"] = str(cdir / "model")
        composed[variant] = (f"{variant}/compose", cdir / "model")
        p.add(Job(f"{variant}/compose", "mode-compose", {"config": cfg, **common}, str(cdir / "model"),
                  str(cdir / "result.json"), [f"mode/expert/{d}" for d in domains]))
    return lib, composed


def _full(p: Planning, mode_lib: Path | None) -> Path | None:
    """MoDE's paper comparison: each domain alone with all weights trained, the experts' tokens."""
    if mode_lib is None:
        return None
    pre = p.settings["pretrain"]
    return _library(p, "full-lib", "full", p.settings["domains"], pre["steps"], lr=pre["full_lr"], **FULL)


# ---------------------------------------------------------------------------- their LM loss
def lm_eval_jobs(p: Planning, up: Upstream) -> None:
    """The LM loss on the held-out text of every domain and on general text: the base model's and that
    of every pre-trained model."""
    settings, domains, base = p.settings, p.settings["domains"], p.settings["base"]
    heldout = {k: v["path"] for k, v in p.data["heldout"].items()}
    models = [("lm/base", {"base": base}, [])]
    if up.lib_a:
        models += [(f"lm/module/{d}", {"base": base, "library": str(up.lib_a), "module": d}, [f"module/1/{d}"])
                   for d in domains]
    if up.joint:
        models.append(("lm/joint", {"base": base, "library": str(up.joint), "module": "joint"}, ["joint"]))
    for job, d in up.ncl.values():
        models.append((f"lm/{job}", {"ncl": str(d)}, [job]))
    if up.mode_lib:
        models += [(f"lm/mode-expert/{d}", {"mode": str(up.mode_lib / d)}, [f"mode/expert/{d}"]) for d in domains]
        # the experts' predictions mixed by their posterior on the text so far: the hand-over's reference
        models.append(("lm/mode-mixture", {"mixture": [str(up.mode_lib / d) for d in domains]},
                       [f"mode/expert/{d}" for d in domains]))
    if up.full_lib:
        models += [(f"lm/full/{d}", {"base": str(up.full_lib / d)}, [f"full/{d}"]) for d in domains]
    for variant, (job, d) in up.composed.items():
        models.append((f"lm/{variant}", {"mode": str(d)}, [job]))
    for name, model, deps in models:
        spec = {"model": model, "heldout": heldout, "seq_len": settings["pretrain"]["seq_len"], **settings["lm_eval"],
                **p.common, "version": 2}
        if "mode" in model or "mixture" in model:  # MoDE's hand-over, by position in the block (the report's)
            spec["by_position"] = True
        d = p.work / f"{name.replace('/', '-')}-{_key(spec)}"
        p.add(Job(name, "lm-eval", spec, str(d), str(d / "result.json"), deps))
