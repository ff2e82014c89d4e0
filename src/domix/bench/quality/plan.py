"""The jobs of a run and their cache keys: every job's spec (its settings, the base model's
identity, the data subset, the paths of its inputs, the thread count) is hashed into the name of
its artefact directory, so a rerun finds what it already computed."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...io import sha256_text
from .capacity import run_capacity
from .records import record_path, restore
from .settings import COMPOSE, MERGES, METHODS, NEEDS, NO_SAVE, compose_gate_lr, order_name


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


NOT_RESULTS = {"out", "progress", "overwrite", "resume", "save_steps", "max_new_tokens"}  # run mechanics only


def _finetune_fields(cfg: dict) -> dict:
    """The FinetuneConfig options that define a run's result: the shared ones and the method's own
    (`domix.finetune.METHODS[...].fields`), so that a changed default (say of bridge_init) reruns
    exactly the runs it changes."""
    from ...finetune import METHODS as FINETUNE_METHODS

    other = set().union(*(m.fields for m in FINETUNE_METHODS.values())) - FINETUNE_METHODS[cfg["method"]].fields
    return {k: v for k, v in cfg.items() if k not in NOT_RESULTS and k not in other}


def plan(settings: dict, data: dict, work: Path, methods: list[str], seeds: list[int]) -> tuple[dict, list]:
    """All jobs (by name) and the fine-tuning runs [(method, task, seed, order | None, job name)].

    `settings["module_seeds"]` ({fine-tuning seed: pre-training seed}) gives some fine-tuning seeds
    modules (and the joint and untrained ones) pre-trained with another seed, so that the seeds'
    spread holds the pre-training's variance too: their upstream jobs are named `<name>@pretrain-seed<p>`,
    and they run in the first domain order only (the order check is the first seed's)."""
    from copy import deepcopy

    base_seed = settings["pretrain"]["seed"]
    by_seed = {int(k): int(v) for k, v in (settings.get("module_seeds") or {}).items()}
    jobs, runs = _plan(settings, data, work, methods, [s for s in seeds if by_seed.get(s, base_seed) == base_seed])
    for p in sorted({by_seed[s] for s in seeds if by_seed.get(s, base_seed) != base_seed}):
        other = deepcopy(settings)
        other["pretrain"]["seed"] = p
        p_jobs, p_runs = _plan(other, data, work, methods, [s for s in seeds if by_seed.get(s, base_seed) == p])
        # the first order's fine-tunes only (the floor's scores, which train nothing, come from the first plan)
        p_runs = [r for r in p_runs if r[3] in (None, order_name(settings["orders"][0]))
                  and METHODS[r[0]]["method"] != "none"]
        need, todo = set(), [r[4] for r in p_runs]
        while todo:  # only what these runs need (no LM evaluations, no second order)
            name = todo.pop()
            if name not in need:
                need.add(name)
                todo += p_jobs[name].deps
        outs = {j.out: n for n, j in jobs.items()}
        rename = {n: n if n.startswith("finetune/") or outs.get(j.out) == n else f"{n}@pretrain-seed{p}"
                  for n, j in p_jobs.items() if n in need}
        for n, j in p_jobs.items():
            if n in need:
                j.name, j.deps = rename[n], [rename[d] for d in j.deps]
                jobs.setdefault(j.name, j)
        runs += p_runs
    return jobs, runs


def _plan(settings: dict, data: dict, work: Path, methods: list[str], seeds: list[int]) -> tuple[dict, list]:
    from ...finetune import FinetuneConfig
    from ...training import defaults as config_defaults

    pre, ft = settings["pretrain"], settings["finetune"]
    domains, orders = settings["domains"], settings["orders"]
    from ...models import resolve_device

    device = resolve_device("auto")  # where the jobs' `auto` trains: a GPU rerun never reuses CPU results
    common = {"base_id": settings["base_id"], "threads": settings["threads"], "data": data["key"],
              "results_version": RESULTS_VERSION, **({"device": device} if device != "cpu" else {})}
    jobs: dict[str, Job] = {}
    needs = {NEEDS.get(m) for m in methods}

    def add(job: Job) -> Job:
        jobs.setdefault(job.name, job)
        return jobs[job.name]

    # -- stage 1: one LoRA module per domain, each library trained in its own domain order
    libs = {}
    if "modules" in needs:
        shared = _pretrain_cfg(settings, "", [], Path("."), pre["steps"])  # what every module of a library shares
        lib_key = _library_key(common, shared)
        for i, order in enumerate(orders if "domix" in methods and settings.get("order_check", True) else orders[:1]):
            lib = work / f"lib-{'-'.join(order)}-{lib_key}"
            libs[order_name(order)] = lib
            for d in order:
                cfg = _pretrain_cfg(settings, d, [data["corpora"][d]["path"]], lib, pre["steps"])
                add(Job(f"module/{i + 1}/{d}", "pretrain", {"config": cfg, **common}, str(lib / d),
                        str(lib / ".results" / f"{d}.json")))
    lib_a = libs.get(order_name(orders[0]))
    # -- the control's library: order A's modules as initialised (one step at learning rate 0: the same
    # A's as the trained modules start from, B = 0), so that only the pre-training differs
    lib_u = None
    if "untrained" in needs:
        shared = _pretrain_cfg(settings, "", [], Path("."), 1, lr=0.0)
        lib_u = work / f"lib-untrained-{_library_key(common, shared)}"
        for d in orders[0]:
            cfg = _pretrain_cfg(settings, d, [data["corpora"][d]["path"]], lib_u, 1, lr=0.0)
            add(Job(f"untrained/{d}", "pretrain", {"config": cfg, **common}, str(lib_u / d),
                    str(lib_u / ".results" / f"{d}.json")))
    # -- the merge baselines: order A's modules merged into one by PEFT, one entry per combination
    from ...library.merge import DEFAULT_DENSITY

    merged = {}
    for method in [m for m in methods if m in MERGES]:
        comb = MERGES[method]
        spec = {"library": str(lib_a), "modules": list(domains), "combination": comb, "base": settings["base"],
                "weights": [1.0 / len(domains)] * len(domains), "density": None if comb == "linear" else DEFAULT_DENSITY,
                "seed": pre["seed"], **common}
        mdir = work / f"merge-{comb}-{_key(spec)}"
        merged[method] = (f"merge/{comb}", mdir)
        add(Job(f"merge/{comb}", "merge", spec, str(mdir / method), str(mdir / "result.json"),
                [f"module/1/{d}" for d in domains]))
    # -- joint-lora: one LoRA on the union, the summed token budget
    joint_lib = None
    if "joint" in needs:
        cfg = _pretrain_cfg(settings, "joint", [data["corpora"][d]["path"] for d in domains], Path("."),
                            pre["steps"] * len(domains))
        joint_lib = work / f"joint-{_key({**common, 'config': {**cfg, 'library': None}})}"
        cfg["library"] = str(joint_lib)
        add(Job("joint", "pretrain", {"config": cfg, **common}, str(joint_lib / "joint"),
                str(joint_lib / ".results" / "joint.json")))
    # -- ncl: full-parameter pre-training over the domains in turn, per order
    ncl = {}
    if "ncl" in needs:
        for i, order in enumerate(orders):
            stages = [_pretrain_cfg(settings, d, [data["corpora"][d]["path"]], Path("."), pre["steps"], full=True,
                                    lr=pre["full_lr"], rank=None, alpha=None) for d in order]
            spec = {"stages": stages, "base": settings["base"], "keep_stages": False, **common}
            d = work / f"ncl-{'-'.join(order)}-{_key(spec)}"
            ncl[order_name(order)] = (f"ncl/{i + 1}", d)
            add(Job(f"ncl/{i + 1}", "ncl", spec, str(d), str(d / "result.json")))
    # -- MoDE: one expert per domain (the modules' token budget), then compositions on the mixture
    mode_lib, composed = None, {}
    if needs & set(COMPOSE):
        from ...mode.train import ComposeConfig, ModePretrainConfig

        shared = _mode_cfg(settings, ModePretrainConfig, domain="", data=[], library="", max_steps=pre["steps"],
                           base=settings["base"])
        mode_lib = work / f"mode-lib-{_library_key(common, shared)}"
        for d in domains:
            cfg = {**shared, "domain": d, "data": [data["corpora"][d]["path"]], "library": str(mode_lib)}
            add(Job(f"mode/expert/{d}", "mode-pretrain", {"config": cfg, **common}, str(mode_lib / d),
                    str(mode_lib / ".results" / f"{d}.json")))
        for variant in [v for v in COMPOSE if v in needs]:
            cfg = _mode_cfg(settings, ComposeConfig, library=str(mode_lib), out="", experts=list(domains),
                            data=[f"{d}={data['corpora'][d]['path']}" for d in domains], base=settings["base"],
                            max_steps=settings["mode"]["compose_steps"], **COMPOSE[variant],
                            gate_lr=compose_gate_lr(settings["mode"]),  # fresh gates: their own rate
                            gate_context=settings["mode"].get("gate_context", "token"),
                            gate_form=settings["mode"].get("gate_form", "softmax"))
            cdir = work / f"{variant}-compose-{_key({**common, 'config': cfg})}"
            cfg["out"] = str(cdir / "model")
            composed[variant] = (f"{variant}/compose", cdir / "model")
            add(Job(f"{variant}/compose", "mode-compose", {"config": cfg, **common}, str(cdir / "model"),
                    str(cdir / "result.json"), [f"mode/expert/{d}" for d in domains]))
    # -- MoDE's paper comparison: each domain alone with all weights trained, the experts' tokens
    full_lib = None
    if mode_lib is not None:
        shared = _pretrain_cfg(settings, "", [], Path("."), pre["steps"], full=True, lr=pre["full_lr"], rank=None,
                               alpha=None)
        full_lib = work / f"full-lib-{_library_key(common, shared)}"
        for d in domains:
            cfg = _pretrain_cfg(settings, d, [data["corpora"][d]["path"]], full_lib, pre["steps"], full=True,
                                lr=pre["full_lr"], rank=None, alpha=None)
            add(Job(f"full/{d}", "pretrain", {"config": cfg, **common}, str(full_lib / d),
                    str(full_lib / ".results" / f"{d}.json")))
    # -- LM loss on the held-out text of every domain and on general text
    lm = settings["lm_eval"]
    heldout = {k: v["path"] for k, v in data["heldout"].items()}
    models = [("lm/base", {"base": settings["base"]}, [])]
    if lib_a:
        models += [(f"lm/module/{d}", {"base": settings["base"], "library": str(lib_a), "module": d},
                    [f"module/1/{d}"]) for d in domains]
    if joint_lib:
        models.append(("lm/joint", {"base": settings["base"], "library": str(joint_lib), "module": "joint"},
                       ["joint"]))
    for name, (job, d) in ncl.items():
        models.append((f"lm/{job}", {"ncl": str(d)}, [job]))
    if mode_lib:
        models += [(f"lm/mode-expert/{d}", {"mode": str(mode_lib / d)}, [f"mode/expert/{d}"]) for d in domains]
        # the experts' predictions mixed by their posterior on the text so far: the hand-over's reference
        models.append(("lm/mode-mixture", {"mixture": [str(mode_lib / d) for d in domains]},
                       [f"mode/expert/{d}" for d in domains]))
    if full_lib:
        models += [(f"lm/full/{d}", {"base": str(full_lib / d)}, [f"full/{d}"]) for d in domains]
    for variant, (job, d) in composed.items():
        models.append((f"lm/{variant}", {"mode": str(d)}, [job]))
    for name, model, deps in models:
        spec = {"model": model, "heldout": heldout, "seq_len": pre["seq_len"], **lm, **common, "version": 2}
        if "mode" in model or "mixture" in model:  # MoDE's hand-over, by position in the block (the report's)
            spec["by_position"] = True
        d = work / f"{name.replace('/', '-')}-{_key(spec)}"
        add(Job(name, "lm-eval", spec, str(d), str(d / "result.json"), deps))

    # -- the floor of a suite: the base model and each task's module alone, scored without fine-tuning
    runs = []
    suite = settings.get("suite")
    for method in [m for m in methods if METHODS[m]["method"] == "none" and seeds]:
        own = METHODS[method].get("init") == "own"
        for task in (settings["task_domains"] if own else [None]):
            tests = {t: data["tasks"][t]["test"]["path"] for t in ([task] if own else settings["task_domains"])}
            model = {"base": settings["base"], **({"library": str(lib_a), "module": task} if own else {})}
            spec = {"model": model, "tests": tests, "max_seq_len": ft["max_seq_len"],
                    "max_new_tokens": ft.get("max_new_tokens", 32), "dtype": ft.get("dtype", "fp32"), **common}
            key = _key(spec)
            name = f"score/{key}"
            d_job = work / f"score-{task or 'all'}-{key}"
            add(Job(name, "score", spec, str(d_job), str(d_job / "result.json"), [f"module/1/{task}"] if own else [],
                    label=f"{method}" + (f"/{task}" if own else ""), record=str(record_path(work, d_job.name))))
            runs += [(method, t, seeds[0], None, name) for t in tests]

    # -- stage 3: fine-tuning (in a suite, once on the union of its tasks, scored on each task's test set)
    defaults = config_defaults(FinetuneConfig)
    units = {task: (d, data["tasks"][task], {task: data["tasks"][task]["test"]["path"]})
             for task, d in settings["task_domains"].items()}
    if suite:
        units = {"union": (None, data["union"], {t: data["tasks"][t]["test"]["path"] for t in settings["task_domains"]})}
    for method in methods:
        m = METHODS[method]
        if m["method"] == "none":
            continue
        for task, (d, t, tests) in units.items():
            variants = [(None, None)]
            if m.get("init") == "ncl":
                variants = [(order_name(o), ncl[order_name(o)]) for o in orders]
            elif method == "domix":
                variants = [(order_name(o), libs[order_name(o)]) for o in orders if order_name(o) in libs]
            for order, upstream in variants:
                for seed in seeds:
                    if method == "domix" and order != order_name(orders[0]) and seed != seeds[0]:
                        continue  # the order check runs the first seed
                    kw = {k: v for k, v in m.items() if k not in ("init", "rank")}
                    if suite:
                        kw.update(task="generate", max_new_tokens=ft.get("max_new_tokens", 32))
                    kw.update(train=t["train"]["path"], eval=t["dev"]["path"], base=settings["base"], seed=seed,
                              epochs=ft["epochs"], batch_size=ft["batch_size"], max_seq_len=ft["max_seq_len"],
                              threads=settings["threads"],
                              lr=ft["full_lr"] if m["method"] == "full" else ft["lr"])
                    deps = []
                    if m["method"] in ("lora", "dora") and "init" not in m:
                        rank = run_capacity(settings)[m["rank"]] if "rank" in m else ft["base_lora_rank"]
                        kw.update(lora_rank=rank, lora_alpha=2.0 * rank)
                    if m["method"] == "domix" and m.get("init") == "untrained":
                        kw.update(library=str(lib_u), modules="all")
                        deps = [f"untrained/{x}" for x in orders[0]]
                    elif m["method"] == "domix":
                        lib = upstream if method == "domix" else lib_a
                        kw.update(library=str(lib), modules=m.get("modules", "all"))
                        deps = [f"module/{orders.index(order.split(',')) + 1 if order else 1}/{x}" for x in domains]
                    if m.get("init") == "own":
                        kw.update(library=str(lib_a), init_module=d)
                        deps = [f"module/1/{d}"]
                    if m.get("init") == "merged":
                        job, mdir = merged[method]
                        kw.update(library=str(mdir), init_module=method)
                        deps = [job]
                    if m.get("init") == "joint":
                        kw.update(library=str(joint_lib), init_module="joint")
                        deps = ["joint"]
                    if m.get("init") == "ncl":
                        job, nd = upstream
                        kw.update(base=str(nd / order.split(",")[-1]))
                        deps = [job]
                    if m.get("init") == "composed":
                        job, cdir = composed[NEEDS[method]]
                        kw.update(library=str(mode_lib), from_composed=str(cdir), lr=ft["mode_lr"])
                        deps = [job]
                    scale = settings.get("lr_scale", {}).get(method, 1.0)
                    if scale != 1.0:  # the rate grid (rates.py): the method's rates together, by one factor
                        kw["lr"] *= scale
                        if m["method"] in ("domix", "mode") and not m.get("freeze_bridge"):
                            rate = "gate_lr" if m["method"] == "mode" else "bridge_lr"  # the mixing parameters' rate
                            kw[rate] = m.get("bridge_lr", defaults[rate]) * scale
                    steps = max(1, math.ceil(ft["epochs"] * t["train"]["examples"] / ft["batch_size"]))
                    # eval_every: dev scored every so many steps (keep_best keeps the best, patience stops);
                    # without it, the dev set is scored once, at the end
                    kw.update(eval_every=ft.get("eval_every") or steps + 1, keep_best=ft.get("keep_best", False),
                              patience=ft.get("patience"), dtype=ft.get("dtype", "fp32"))
                    cfg = _finetune_fields({**defaults, **kw})
                    spec = {"config": cfg, **({"tests": tests} if suite else {"test": tests[task]}), **common,
                            "drop_weights": m["method"] == "full" and not settings["keep_full_weights"],
                            **({"method_version": METHOD_VERSIONS[method]} if method in METHOD_VERSIONS else {})}
                    if m.get("init") == "ncl":
                        spec["ncl_base_id"] = str(nd)
                    key = _key(spec)
                    d_job = work / f"ft-{task}-s{seed}-{key}"
                    name = f"finetune/{key}"
                    if name not in jobs:
                        add(Job(name, "finetune", spec, str(d_job / "model"), str(d_job / "result.json"), deps,
                                record=str(record_path(work, d_job.name))))
                        jobs[name].label = f"{method}/{task}/s{seed}" + (f" [{order}]" if order else "")
                    runs += [(method, tt, seed, order, name) for tt in tests]
    for job in jobs.values():
        job.threads = settings["threads"]
    return jobs, runs


def _reuse_order_b(jobs: dict, runs: list, settings: dict, domains: list[str]) -> tuple[dict, list]:
    """When order B's modules are bitwise equal to order A's, its domix fine-tunes are the same
    computation on the same inputs: point them at order A's jobs instead of running them again."""
    orders = [order_name(o) for o in settings["orders"]]
    libs = [Path(jobs[f"module/{i + 1}/{domains[0]}"].out).parent for i in range(2)]
    eq = _module_tensors_equal(libs[0], libs[1], domains)
    if not eq or not all(eq.values()):
        return jobs, runs
    first = {(t, s): n for m, t, s, o, n in runs if m == "domix" and o == orders[0]}
    new_runs, drop = [], set()
    for m, t, s, o, n in runs:
        if m == "domix" and o != orders[0] and (t, s) in first:
            drop.add(n)
            n = first[(t, s)]
        new_runs.append((m, t, s, o, n))
    still = {n for *_, n in new_runs}
    return {k: v for k, v in jobs.items() if k not in drop or k in still}, new_runs


def _module_tensors_equal(lib_a: Path, lib_b: Path, domains: list[str]) -> dict:
    """{domain: whether its module's tensors in the two libraries are bitwise equal (None: one is missing)}."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for d in domains:
        fa, fb = lib_a / d / "adapter_model.safetensors", lib_b / d / "adapter_model.safetensors"
        if not (fa.is_file() and fb.is_file()):
            out[d] = None
            continue
        a, b = load_file(str(fa)), load_file(str(fb))
        out[d] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return out

