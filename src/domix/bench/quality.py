"""`domix bench quality`: DoMIX against the baselines of DESIGN.md §3 on the four offline
domains of §6 — the same data subsets, the same seeds, every training in its own process.

    data subset ─┬─ module <domain> ×4, library in order A ─┬─ lm-eval (held-out + general text)
                 ├─ module <domain> ×4, library in order B ─┤
                 ├─ joint  (one LoRA on the union, 4× tokens)┤
                 ├─ ncl <order> ×2 (full weights, domains in turn)
                 ├─ mode expert <domain> ×4 ─ compose (experts+gates | gates only) ┤
                 └─ finetune <method> <task> <seed> ────────┴─ results.json, REPORT.md, plots/

Every job has a cache key: a hash of everything that defines its result (its settings, the
base model's identity, the data subset, the paths — hence keys — of its inputs, the thread
count). Its artefact lives under `<out>/work/<name>-<key>/` with a `result.json` written last;
a rerun reuses every finished job and recomputes nothing whose settings changed. Jobs run in
fresh processes (forked from a server that has imported torch and transformers once), so a
job's peak RSS (`ru_maxrss`) is its own; `workers` jobs run at once with cores // workers threads.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.benchmark import DOMAINS, GENERAL
from ..io import atomic_dir, sha256_file, write_json
from ..checkpoints import DEFAULT_BASE

# ---------------------------------------------------------------------------- methods
# Each method is data: FinetuneConfig options plus where its starting point comes from.
# "init": own (the task's domain module), joint (the union module), ncl (the full checkpoint
# after continual pre-training); the domix variants use the whole order-A library.
METHODS: dict[str, dict] = {
    "base-full": {"method": "full"},
    "base-lora": {"method": "lora"},
    "base-dora": {"method": "dora"},
    "own-lora": {"method": "lora", "init": "own"},
    "joint-lora": {"method": "lora", "init": "joint"},
    "ncl": {"method": "full", "init": "ncl"},
    "cat-merge": {"method": "domix", "bridge_init": "identity", "freeze_bridge": True},
    "domix": {"method": "domix"},  # FinetuneConfig's defaults (bridge_init, bridge_lr)
    "domix-rank": {"method": "domix", "bridge_init": "rank"},
    "domix-uniform": {"method": "domix", "bridge_init": "uniform"},
    "domix-identity": {"method": "domix", "bridge_init": "identity"},
    "domix-frozen-bridge": {"method": "domix", "freeze_bridge": True},
    # MoDE (DESIGN.md §4): experts trained alone, composed on the mixed corpora, then fine-tuned
    "mode": {"method": "mode", "init": "composed"},
    "mode-frozen-experts": {"method": "mode", "init": "composed", "freeze_experts": True},
}
DOMIX_LIKE = ("cat-merge", "domix", "domix-rank", "domix-uniform", "domix-identity", "domix-frozen-bridge")
NEEDS = {"own-lora": "modules", "joint-lora": "joint", "ncl": "ncl", **{m: "modules" for m in DOMIX_LIKE},
         "mode": "mode", "mode-frozen-experts": "mode-frozen"}
# a composition per MoDE method: experts and gates trained, or the gates only
COMPOSE = {"mode": {"freeze_experts": False}, "mode-frozen": {"freeze_experts": True}}
COMPOSED_FOR = {v: m for m, v in NEEDS.items() if v in COMPOSE}  # composition -> the method fine-tuning it

# ---------------------------------------------------------------------------- presets
def _merge(a: dict, b: dict) -> dict:
    out = deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else deepcopy(v)
    return out


# Sized from measurements on 2 CPU cores, one thread per job (real model). quick (with MoDE)
# measured 54 CPU-min (27.8 min on 2 quiet cores with 2 workers). A full run with 256 training
# examples per task (32 steps) measured per fine-tune job ~105 CPU-s (a step ~2.1 CPU-s, plus
# ~38 s of loading, scoring 282 dev/test examples and saving), projecting ~2.75 h in all: over
# the 2.5 h budget. 160 examples (20 steps) project ~2.2 h. A fine-tune learns little before
# ~30 steps (product-sentiment dev F1 0.42 at step 10, 0.71 at step 40): quick's task scores are
# a smoke test, full's the least that fits the budget.
QUICK = {
    "seeds": [0],
    "workers": 2,
    "domains": list(DOMAINS),
    "pretrain": {"seq_len": 64, "batch_size": 8, "steps": 8, "rank": 8, "alpha": 16.0, "lr": 5e-4,
                 "full_lr": 1e-4, "seed": 0},
    "lm_eval": {"blocks": 12, "batch_size": 8},
    "finetune": {"train": 80, "dev": 24, "test": 128, "epochs": 1.0, "batch_size": 8, "max_seq_len": 48,
                 "lr": 5e-4, "full_lr": 5e-5, "mode_lr": 1e-4, "base_lora_rank": 16},
    "mode": {"lr": 1e-4, "compose_steps": 8},
    "order_check_finetune": False,  # domix order B: reuse order A's runs when the modules are bitwise equal
    "keep_full_weights": False,
}
PRESETS: dict[str, dict] = {
    "quick": QUICK,
    "full": _merge(QUICK, {  # what differs from quick
        "seeds": [0, 1, 2],
        "pretrain": {"steps": 16},
        "lm_eval": {"blocks": 24},
        "finetune": {"train": 160, "dev": 32, "test": 250},
        "mode": {"compose_steps": 16},
        "order_check_finetune": True,  # domix order B: fine-tune on the order-B library for real
    }),
}
NO_SAVE = 10 ** 9  # Trainer checkpoints are not needed: a job is redone whole if it dies
STAMP = "%Y-%m-%dT%H:%M:%S"  # the local time format of "finished" in job results and the history


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _base_id(base: str) -> dict:
    """What identifies the base checkpoint cheaply: its config and the sizes of its weight files."""
    from ..checkpoints import resolve_base

    path = Path(resolve_base(base))
    if not path.is_dir():
        return {"base": base}
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".bin")}
    cfg = (path / "config.json").read_text() if (path / "config.json").is_file() else ""
    return {"base": base, "config": hashlib.sha256(cfg.encode()).hexdigest()[:16], "weights": files}


def order_name(order) -> str:
    return ",".join(order)


# ---------------------------------------------------------------------------- data subsets
def _stratified(rows: list[dict], n: int | None, rng: random.Random) -> list[dict]:
    """n rows at random, every label present at least once when n allows it."""
    rows = list(rows)
    rng.shuffle(rows)
    if n is None or n >= len(rows):
        return rows
    first, seen = [], set()
    for i, r in enumerate(rows):
        if r["label"] not in seen:
            seen.add(r["label"])
            first.append(i)
    firsts = set(first)
    chosen = first[:n] + [i for i in range(len(rows)) if i not in firsts][:max(0, n - len(first))]
    return [rows[i] for i in sorted(chosen)]


def _take_tokens(docs: list[str], order: list[int], start: int, target: int, tok, cap_words: int | None = None):
    """Documents from order[start:] until they hold `target` tokens. Returns (texts, next index, tokens)."""
    out, total, i = [], 0, start
    while total < target and i < len(order):
        chunk = [docs[j] for j in order[i:i + 64]]
        if cap_words:
            chunk = [" ".join(d.split()[:cap_words]) for d in chunk]
        for text, ids in zip(chunk, tok(chunk)["input_ids"]):
            i += 1
            out.append(text)
            total += len(ids) + 1  # + the end-of-document token of packing
            if total >= target:
                break
    return out, i, total


def prepare_data(root: Path, out: Path, settings: dict, progress: bool = True) -> dict:
    """Deterministic subsets of the benchmark data under out/data-<key>/: per domain a training
    text of the pre-training budget (plus the 5% pretrain holds out itself) and a disjoint
    held-out text for LM loss; a general-text held-out set; the task splits, subsampled."""
    from ..models import load_tokenizer

    root = Path(root)
    pre, ft, lm = settings["pretrain"], settings["finetune"], settings["lm_eval"]
    domains = settings["domains"]
    files = [root / "corpora" / f"{d}.txt" for d in [*domains, GENERAL]]
    files += [root / "tasks" / DOMAINS[d] / f"{s}.jsonl" for d in domains for s in ("train", "dev", "test")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"benchmark data under {root} lacks {missing[:3]} (build it: domix fetch data)")
    spec = {"files": {str(f.relative_to(root)): sha256_file(f) for f in files}, "domains": domains,
            "tokens": pre["steps"] * pre["batch_size"] * pre["seq_len"], "seq_len": pre["seq_len"],
            "heldout_blocks": lm["blocks"], "sizes": {k: ft[k] for k in ("train", "dev", "test")},
            "tokenizer": settings["base_id"], "version": 2}
    dest = out / f"data-{_key(spec)}"
    if (dest / "data.json").is_file():
        return json.loads((dest / "data.json").read_text())
    tok = load_tokenizer(settings["base"])
    # pretrain() holds 5% of the documents out; the rest must fill `steps` batches once
    train_target = math.ceil(spec["tokens"] / 0.95 * 1.05)
    held_target = math.ceil(lm["blocks"] * pre["seq_len"] * 1.1)
    info = {"root": str(root), "key": dest.name, "corpora": {}, "heldout": {}, "tasks": {}}
    with atomic_dir(dest, overwrite=True) as stage:
        for d in [*domains, GENERAL]:
            docs = [l for l in (root / "corpora" / f"{d}.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
            order = list(range(len(docs)))
            random.Random(f"quality/{d}").shuffle(order)
            # held-out documents come first and are capped in length, so a few long pages
            # (news, Wikipedia) cannot make up the whole held-out set
            held, nxt, held_tokens = _take_tokens(docs, order, 0, held_target, tok, cap_words=2 * pre["seq_len"])
            (stage / "heldout").mkdir(exist_ok=True)
            (stage / "heldout" / f"{d}.txt").write_text("\n".join(held) + "\n", encoding="utf-8")
            info["heldout"][d] = {"path": str(dest / "heldout" / f"{d}.txt"), "documents": len(held),
                                  "tokens": held_tokens}
            if d == GENERAL:
                continue
            train, _, train_tokens = _take_tokens(docs, order, nxt, train_target, tok)
            (stage / "corpora").mkdir(exist_ok=True)
            (stage / "corpora" / f"{d}.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
            info["corpora"][d] = {"path": str(dest / "corpora" / f"{d}.txt"), "documents": len(train),
                                  "tokens": train_tokens, "of": len(docs)}
        for d in domains:
            task = DOMAINS[d]
            info["tasks"][task] = {"domain": d}
            for split in ("train", "dev", "test"):
                src = root / "tasks" / task / f"{split}.jsonl"
                rows = [json.loads(l) for l in src.read_text(encoding="utf-8").splitlines() if l.strip()]
                sub = _stratified(rows, ft[split], random.Random(f"quality/{task}/{split}"))
                if split != "train":  # scored in batches: similar lengths together pad less
                    sub.sort(key=lambda r: len(r["text"]))
                (stage / "tasks" / task).mkdir(parents=True, exist_ok=True)
                (stage / "tasks" / task / f"{split}.jsonl").write_text(
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sub), encoding="utf-8")
                info["tasks"][task][split] = {"path": str(dest / "tasks" / task / f"{split}.jsonl"),
                                              "examples": len(sub), "of": len(rows)}
            info["tasks"][task]["labels"] = sorted({str(json.loads(l)["label"]) for l in
                                                    (stage / "tasks" / task / "train.jsonl").read_text().splitlines()})
        write_json(stage / "data.json", info)
    return info


# ---------------------------------------------------------------------------- jobs
@dataclass
class Job:
    name: str          # unique; also the label in logs
    kind: str          # pretrain | ncl | mode-pretrain | mode-compose | lm-eval | finetune
    spec: dict         # the runner's input; hashed (with the upstream paths in it) into the key
    out: str           # the artefact
    result: str        # result.json, written last
    deps: list = field(default_factory=list)
    threads: int = 1
    label: str = ""

    def done(self) -> bool:
        if not Path(self.result).is_file():
            return False
        if self.kind in ("pretrain", "mode-pretrain", "mode-compose"):
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
    from ..library.pretrain import PretrainConfig

    pre = settings["pretrain"]
    return _train_cfg(settings, PretrainConfig, **{
        "domain": domain, "data": data, "library": str(library), "base": settings["base"], "rank": pre["rank"],
        "alpha": pre["alpha"], "lr": pre["lr"], "max_steps": steps, **kw})


def _mode_cfg(settings: dict, cls, **kw) -> dict:
    return _train_cfg(settings, cls, **{"lr": settings["mode"]["lr"], **kw})


def _library_key(common: dict, member_cfg: dict) -> str:
    """A library's key: what every member's config shares (all but its domain, data and place)."""
    return _key({**common, "config": {k: v for k, v in member_cfg.items() if k not in ("domain", "data", "library")}})


# FinetuneConfig fields that only some methods read; the others' keys leave them out, so that a
# changed default (say of bridge_init) reruns exactly the runs it changes
METHOD_FIELDS = {"domix": {"modules", "bridge_init", "bridge_lr", "freeze_bridge", "library"},
                 "lora": {"lora_rank", "lora_alpha", "init_module", "library"}, "dora": {"lora_rank", "lora_alpha"},
                 "mode": {"from_composed", "freeze_experts", "bridge_lr", "library"}}
NOT_RESULTS = {"out", "progress", "overwrite", "resume", "save_steps", "max_new_tokens"}  # run mechanics only


def _finetune_fields(cfg: dict) -> dict:
    """The FinetuneConfig options that define a run's result: the method's own and the shared ones."""
    other = set().union(*METHOD_FIELDS.values()) - METHOD_FIELDS.get(cfg["method"], set())
    return {k: v for k, v in cfg.items() if k not in NOT_RESULTS and k not in other}


def plan(settings: dict, data: dict, work: Path, methods: list[str], seeds: list[int]) -> tuple[dict, list]:
    """All jobs (by name) and the fine-tuning runs [(method, task, seed, order | None, job name)]."""
    from ..finetune import FinetuneConfig

    pre, ft = settings["pretrain"], settings["finetune"]
    domains, orders = settings["domains"], settings["orders"]
    common = {"base_id": settings["base_id"], "threads": settings["threads"], "data": data["key"]}
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
        for i, order in enumerate(orders if "domix" in methods else orders[:1]):
            lib = work / f"lib-{'-'.join(order)}-{lib_key}"
            libs[order_name(order)] = lib
            for d in order:
                cfg = _pretrain_cfg(settings, d, [data["corpora"][d]["path"]], lib, pre["steps"])
                add(Job(f"module/{i + 1}/{d}", "pretrain", {"config": cfg, **common}, str(lib / d),
                        str(lib / ".results" / f"{d}.json")))
    lib_a = libs.get(order_name(orders[0]))
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
        from ..mode.train import ComposeConfig, ModePretrainConfig

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
                            max_steps=settings["mode"]["compose_steps"], **COMPOSE[variant])
            cdir = work / f"{variant}-compose-{_key({**common, 'config': cfg})}"
            cfg["out"] = str(cdir / "model")
            composed[variant] = (f"{variant}/compose", cdir / "model")
            add(Job(f"{variant}/compose", "mode-compose", {"config": cfg, **common}, str(cdir / "model"),
                    str(cdir / "result.json"), [f"mode/expert/{d}" for d in domains]))
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
    for variant, (job, d) in composed.items():
        models.append((f"lm/{variant}", {"mode": str(d)}, [job]))
    for name, model, deps in models:
        spec = {"model": model, "heldout": heldout, "seq_len": pre["seq_len"], **lm, **common, "version": 2}
        d = work / f"{name.replace('/', '-')}-{_key(spec)}"
        add(Job(name, "lm-eval", spec, str(d), str(d / "result.json"), deps))

    # -- stage 3: fine-tuning
    runs = []
    defaults = asdict(FinetuneConfig(train="", eval="", out=""))
    for method in methods:
        m = METHODS[method]
        for d in domains:
            task = DOMAINS[d]
            t = data["tasks"][task]
            variants = [(None, None)]
            if m.get("init") == "ncl":
                variants = [(order_name(o), ncl[order_name(o)]) for o in orders]
            elif method == "domix":
                variants = [(order_name(o), libs[order_name(o)]) for o in orders]
            for order, upstream in variants:
                for seed in seeds:
                    if method == "domix" and order != order_name(orders[0]) and seed != seeds[0]:
                        continue  # the order check runs the first seed
                    kw = {k: v for k, v in m.items() if k != "init"}
                    kw.update(train=t["train"]["path"], eval=t["dev"]["path"], base=settings["base"], seed=seed,
                              epochs=ft["epochs"], batch_size=ft["batch_size"], max_seq_len=ft["max_seq_len"],
                              threads=settings["threads"],
                              lr=ft["full_lr"] if m["method"] == "full" else ft["lr"])
                    deps = []
                    if m["method"] in ("lora", "dora") and "init" not in m:
                        kw.update(lora_rank=ft["base_lora_rank"], lora_alpha=2.0 * ft["base_lora_rank"])
                    if m["method"] == "domix":
                        lib = upstream if method == "domix" else lib_a
                        kw.update(library=str(lib), modules="all")
                        deps = [f"module/{orders.index(order.split(',')) + 1 if order else 1}/{x}" for x in domains]
                    if m.get("init") == "own":
                        kw.update(library=str(lib_a), init_module=d)
                        deps = [f"module/1/{d}"]
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
                    steps = max(1, math.ceil(ft["epochs"] * t["train"]["examples"] / ft["batch_size"]))
                    kw["eval_every"] = steps + 1  # no periodic evaluation: the dev set is scored once, at the end
                    cfg = _finetune_fields({**defaults, **kw})
                    spec = {"config": cfg, "test": t["test"]["path"], **common,
                            "drop_weights": m["method"] == "full" and not settings["keep_full_weights"]}
                    if m.get("init") == "ncl":
                        spec["ncl_base_id"] = str(nd)
                    key = _key(spec)
                    d_job = work / f"ft-{task}-s{seed}-{key}"
                    name = f"finetune/{key}"
                    if name not in jobs:
                        add(Job(name, "finetune", spec, str(d_job / "model"), str(d_job / "result.json"), deps))
                        jobs[name].label = f"{method}/{task}/s{seed}" + (f" [{order}]" if order else "")
                    runs.append((method, task, seed, order, name))
    for job in jobs.values():
        job.threads = settings["threads"]
    return jobs, runs


# ---------------------------------------------------------------------------- runners (in the workers)
def _clock():
    """A Trainer callback stamping every optimizer step (`step_time()`: the median interval after
    the first, warm-up step) and keeping the trained model."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.t, self.c = [], []

        def on_train_begin(self, args, state, control, **kw):
            self.t, self.c = [time.perf_counter()], [time.process_time()]

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter())
            self.c.append(time.process_time())  # CPU time: barely disturbed by other work on the machine

        def on_train_end(self, args, state, control, model=None, **kw):
            self.model = model  # the trained model, to score the test set without reloading it

        def step_time(self, cpu: bool = False):
            t = self.c if cpu else self.t
            d = [b - a for a, b in zip(t, t[1:])]
            return round(statistics.median(d[1:] if len(d) > 2 else d), 4) if d else None

    return StepClock()


def _run_pretrain(spec: dict, out: str) -> dict:
    from ..library.pretrain import PretrainConfig, pretrain

    clock = _clock()
    meta = pretrain(PretrainConfig(**spec["config"]), callbacks=[clock])
    return {"step_time_s": clock.step_time(), "step_cpu_s": clock.step_time(cpu=True),
            "train_time_s": meta["train_time_s"], "steps": meta["steps"],
            "tokens": meta["tokens"], "trainable_params": meta["trainable_params"],
            "train_loss": meta["train_loss"], "module_seed": meta["module_seed"]}


def _run_ncl(spec: dict, out: str) -> dict:
    """The domains in turn, each stage starting from the previous stage's full checkpoint.
    A complete stage is reused (resume); earlier stages' weights are dropped once the next exists."""
    from ..library.pretrain import PretrainConfig, pretrain

    out = Path(out)
    stages = spec["stages"]
    complete = [i for i, s in enumerate(stages) if (out / s["domain"] / "model.safetensors").is_file()
                and (out / ".stages" / f"{s['domain']}.json").is_file()]
    first = complete[-1] + 1 if complete else 0
    prev = str(out / stages[first - 1]["domain"]) if first else spec["base"]
    for i in range(first, len(stages)):
        cfg = {**stages[i], "base": prev, "library": str(out)}
        clock = _clock()
        meta = pretrain(PretrainConfig(**cfg), callbacks=[clock])
        write_json(out / ".stages" / f"{cfg['domain']}.json",
                   {"step_time_s": clock.step_time(), "step_cpu_s": clock.step_time(cpu=True),
                    "train_time_s": meta["train_time_s"],
                    "wall_time_s": meta["wall_time_s"], "steps": meta["steps"], "tokens": meta["tokens"],
                    "trainable_params": meta["trainable_params"], "train_loss": meta["train_loss"]})
        if i > 0 and not spec.get("keep_stages"):
            (Path(prev) / "model.safetensors").unlink(missing_ok=True)
        prev = str(out / cfg["domain"])
    done = [json.loads((out / ".stages" / f"{s['domain']}.json").read_text()) for s in stages]
    return {"final": prev, "stages": done, "train_time_s": round(sum(s["train_time_s"] for s in done), 2),
            "step_time_s": round(statistics.mean(s["step_time_s"] for s in done if s["step_time_s"]), 4),
            "step_cpu_s": _mean([s.get("step_cpu_s") for s in done]),
            "tokens": sum(s["tokens"] for s in done), "trainable_params": done[0]["trainable_params"]}


def _run_mode(spec: dict, out: str) -> dict:
    """A MoDE expert alone on its corpus (kind mode-pretrain) or a composition (mode-compose)."""
    from ..mode.train import ComposeConfig, ModePretrainConfig, compose, pretrain_expert

    clock = _clock()
    if "domain" in spec["config"]:
        meta = pretrain_expert(ModePretrainConfig(**spec["config"]), callbacks=[clock])
    else:
        meta = compose(ComposeConfig(**spec["config"]), callbacks=[clock])
    return {"step_time_s": clock.step_time(), "step_cpu_s": clock.step_time(cpu=True),
            "train_time_s": meta["train_time_s"], "steps": meta["steps"], "tokens": meta["tokens"],
            "trainable_params": meta["trainable_params"], "train_loss": meta["train_loss"],
            "params": meta.get("params")}


def _run_lm_eval(spec: dict, out: str) -> dict:
    """Held-out LM loss and next-token (masked-token) accuracy of one model on every held-out text."""
    from ..data.corpus import load_documents, pack
    from ..lm import lm_loss, load_with_module
    from ..models import load_model, load_tokenizer

    m = spec["model"]
    if "mode" in m:
        from ..mode.model import load_mode_model

        model, objective, meta = load_mode_model(m["mode"], head="lm")
        base = meta["base"]
    elif "ncl" in m:
        ncl = json.loads((Path(m["ncl"]) / "result.json").read_text()) if (Path(m["ncl"]) / "result.json").is_file() \
            else None
        base = ncl["final"] if ncl else None
        if base is None:
            raise FileNotFoundError(f"no finished ncl run in {m['ncl']}")
        model, objective = load_model(base, head="lm")
    elif m.get("module"):
        base = m["base"]
        model, objective = load_with_module(base, m["library"], m["module"])
    else:
        base = m["base"]
        model, objective = load_model(base, head="lm")
    tok = load_tokenizer(base)
    loss, accuracy, tokens = {}, {}, {}
    for name, path in spec["heldout"].items():
        blocks = pack(load_documents([path]), tok, spec["seq_len"], max_blocks=spec["blocks"])
        r = lm_loss(model, blocks, tok, objective, spec["batch_size"], seed=0)
        loss[name], accuracy[name], tokens[name] = round(r["loss"], 5), round(r["accuracy"], 5), r["tokens"]
    return {"loss": loss, "accuracy": accuracy, "tokens": tokens}


def _run_finetune(spec: dict, out: str) -> dict:
    from ..finetune import FinetuneConfig, evaluate_rows, finetune
    from ..models import load_tokenizer
    from ..tasks import read_jsonl

    clock = _clock()
    cfg = FinetuneConfig(**spec["config"], out=out, overwrite=True, progress=False, save_steps=NO_SAVE)
    metrics = finetune(cfg, callbacks=[clock])
    # the test set is scored once, after training, by the model that was saved
    tspec = json.loads((Path(out) / "task.json").read_text())
    task = {"task": "classify", "labels": tspec["labels"], "max_seq_len": tspec["max_seq_len"], "where": spec["test"]}
    test = evaluate_rows(clock.model, load_tokenizer(out), task, read_jsonl(spec["test"], ("text", "label")))
    if spec.get("drop_weights"):
        (Path(out) / "model.safetensors").unlink(missing_ok=True)
    keep = ("accuracy", "macro_f1", "per_class_f1", "confusion_matrix", "examples", "labels")
    return {"dev": {k: metrics["eval"][k] for k in ("accuracy", "macro_f1", "examples")},
            "test": {k: test[k] for k in keep if k in test},
            "trainable_params": metrics["trainable_params"], "total_params": metrics["total_params"],
            "train_time_s": metrics["train_time_s"], "step_time_s": clock.step_time(),
            "step_cpu_s": clock.step_time(cpu=True), "steps": metrics["steps"],
            "train_loss": metrics["train_loss"], "bridge_blocks": metrics.get("bridge_blocks"),
            "weights_dropped": bool(spec.get("drop_weights"))}


RUNNERS = {"pretrain": _run_pretrain, "ncl": _run_ncl, "mode-pretrain": _run_mode, "mode-compose": _run_mode,
           "lm-eval": _run_lm_eval, "finetune": _run_finetune}


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1 << 20) if sys.platform == "darwin" else rss / 1024, 1)


def _work(payload: dict) -> dict:
    """One job in a fresh worker process."""
    import gc

    import torch

    gc.freeze()  # what the fork server imported is permanent: full collections (the Trainer runs some) skip it

    from ..library.pretrain import _quiet

    torch.set_num_threads(payload["threads"])
    _quiet()
    t0, c0 = time.time(), _cpu_s()
    try:
        out = RUNNERS[payload["kind"]](payload["spec"], payload["out"])
    except Exception as e:  # reported per job; jobs that do not need it still run
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    return {**out, "status": "done", "wall_s": round(time.time() - t0, 2), "cpu_s": round(_cpu_s() - c0, 2),
            "peak_rss_mb": _peak_rss_mb(),
            "threads": payload["threads"], "finished": time.strftime(STAMP)}


def _context():
    from multiprocessing import get_all_start_methods, get_context

    if "forkserver" in get_all_start_methods():
        ctx = get_context("forkserver")
        # the server imports these once; every job forks from it instead of importing them again
        ctx.set_forkserver_preload(["torch", "transformers", "peft", "datasets", "sklearn.metrics", "matplotlib.pyplot",
                                    "domix.finetune", "domix.library.pretrain", "domix.mode.train", "domix.lm",
                                    "domix.bench.quality"])
        return ctx
    return get_context("spawn")


def execute(jobs: dict, workers: int, progress: bool = True, log=None) -> dict:
    """Run every unfinished job once its dependencies are done, `workers` at a time, each in
    a fresh process. Returns {name: result} (finished earlier: read back, with reused=True)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    log = log or (lambda s: print(s, file=sys.stderr, flush=True) if progress else None)
    results, failed = {}, {}
    for name, job in jobs.items():
        if job.done():
            results[name] = {**json.loads(Path(job.result).read_text()), "reused": True}
    pending = [j for n, j in jobs.items() if n not in results]
    total, started = len(pending), 0
    if not pending:
        return results
    log(f"quality: {len(results)} jobs reused, {total} to run with {workers} worker(s)")
    workers = max(1, workers)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context(), max_tasks_per_child=1)
    running = {}
    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= workers:
                    break
                if any(d in failed for d in job.deps):
                    failed[job.name] = {"status": "skipped", "error": "a job it needs failed"}
                    pending.remove(job)
                elif all(d in results for d in job.deps):
                    pending.remove(job)
                    started += 1
                    payload = {"kind": job.kind, "spec": job.spec, "out": job.out, "threads": job.threads}
                    running[pool.submit(_work, payload)] = (job, started)
            if not running:
                for job in pending:  # unreachable dependencies
                    failed[job.name] = {"status": "skipped", "error": f"unknown dependency in {job.deps}"}
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                job, i = running.pop(fut)
                try:
                    r = fut.result()
                except BrokenProcessPool as e:  # a worker was killed (e.g. out of memory): the pool is gone
                    r, broken = {"status": "failed", "error": f"worker died: {e}"}, True
                label = job.label or job.name
                if r["status"] == "done":
                    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # others' work slows ours
                    r = {**r, "job": job.name, "label": label, "kind": job.kind, "load_1m": load}
                    write_json(job.result, r)
                    results[job.name] = {**r, "reused": False}
                    log(f"[{i:3d}/{total}] {label:<48} {r['wall_s']:7.1f} s (cpu {r['cpu_s']:.0f} s)  "
                        f"peak RSS {r['peak_rss_mb']:.0f} MB  {time.strftime('%H:%M:%S')}")
                else:
                    failed[job.name] = r
                    log(f"[{i:3d}/{total}] {label:<48} FAILED: {r['error']}\n{r.get('traceback', '')}")
            if broken:  # the jobs still running died with it; start a new pool for the rest
                for fut, (job, i) in running.items():
                    failed[job.name] = {"status": "failed", "error": "worker pool broke while it ran"}
                running = {}
                pool.shutdown(wait=True, cancel_futures=True)
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context(), max_tasks_per_child=1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return {**results, **{n: {**r, "job": n} for n, r in failed.items()}}


# ---------------------------------------------------------------------------- results
def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.mean(xs), 4) if xs else None


def _stats(xs: list[float]) -> dict:
    xs = [float(x) for x in xs]
    return {"mean": round(statistics.mean(xs), 4) if xs else None,
            "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0, "runs": [round(x, 4) for x in xs]}


def _module_tensors_equal(lib_a: Path, lib_b: Path, domains: list[str]) -> dict:
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


def collect(settings: dict, jobs: dict, runs: list, res: dict, methods: list[str], seeds: list[int]) -> dict:
    domains, orders = settings["domains"], [order_name(o) for o in settings["orders"]]
    tasks = [DOMAINS[d] for d in domains]
    ok = lambda n: n in res and res[n].get("status") == "done"  # noqa: E731
    # -- tasks
    out_tasks, by = {t: {} for t in tasks}, {}
    for method, task, seed, order, name in runs:
        by.setdefault((method, task), []).append((order, seed, name))
    for (method, task), rs in by.items():
        if method == "domix":
            rs = [r for r in rs if r[0] == orders[0]]
        done = [res[n] for _, _, n in rs if ok(n)]
        if not done:
            continue
        out_tasks[task][method] = {
            "macro_f1": _stats([r["test"]["macro_f1"] for r in done]),
            "accuracy": _stats([r["test"]["accuracy"] for r in done]),
            "dev_macro_f1": _stats([r["dev"]["macro_f1"] for r in done]),
            "runs": [{"seed": s, **({"order": o} if o else {}), "job": n} for o, s, n in rs if ok(n)]}
    # -- LM loss and retention
    ncl_jobs = {o: f"ncl/{i + 1}" for i, o in enumerate(orders)}

    def lm_metric(metric: str) -> dict:
        """{lm job: {held-out text: value}} of one LM metric."""
        return {n: res[n][metric] for n in res if n.startswith("lm/") and ok(n) and metric in res[n]}

    def per_domain(lm: dict) -> dict:
        """{domain: {model: value}} of one LM metric: each domain's own module or expert, the
        single models (base, joint, the compositions) and ncl per order."""
        rows = {}
        for d in domains:
            row = {"base": lm.get("lm/base", {}).get(d), "own": lm.get(f"lm/module/{d}", {}).get(d),
                   "joint": lm.get("lm/joint", {}).get(d),
                   "ncl": {o: lm[f"lm/{j}"][d] for o, j in ncl_jobs.items() if f"lm/{j}" in lm}}
            if f"lm/mode-expert/{d}" in lm:
                row["mode-expert"] = lm[f"lm/mode-expert/{d}"][d]
            for variant in COMPOSE:
                if f"lm/{variant}" in lm:
                    row[COMPOSED_FOR[variant]] = lm[f"lm/{variant}"][d]
            rows[d] = row
        return rows

    lm = lm_metric("loss")
    lm_loss, lm_accuracy = per_domain(lm), per_domain(lm_metric("accuracy"))
    retention, detail = {}, {"own-lora": {}, "ncl": {}, "cross": {}}
    for d in domains:
        if f"lm/module/{d}" in lm:
            detail["cross"][d] = {k: v for k, v in lm[f"lm/module/{d}"].items()}
    if "lm/base" in lm:
        retention["base"] = lm["lm/base"][GENERAL]
    own = {d: lm[f"lm/module/{d}"][GENERAL] for d in domains if f"lm/module/{d}" in lm}
    if own:
        retention["own-lora"] = round(statistics.mean(own.values()), 5)
        detail["own-lora"] = own
    if "lm/joint" in lm:
        retention["joint-lora"] = lm["lm/joint"][GENERAL]
    ncl_ret = {o: lm[f"lm/{j}"][GENERAL] for o, j in ncl_jobs.items() if f"lm/{j}" in lm}
    if ncl_ret:
        retention["ncl"] = round(statistics.mean(ncl_ret.values()), 5)
        detail["ncl"] = ncl_ret
    experts = {d: lm[f"lm/mode-expert/{d}"][GENERAL] for d in domains if f"lm/mode-expert/{d}" in lm}
    if experts:
        retention["mode-expert"] = round(statistics.mean(experts.values()), 5)
        detail["mode-expert"] = experts
    for variant in COMPOSE:
        if f"lm/{variant}" in lm:
            retention[COMPOSED_FOR[variant]] = lm[f"lm/{variant}"][GENERAL]
    # -- order robustness
    robust, checks = {}, {}
    if "domix" in methods:
        robust["domix"] = {o: {} for o in orders[:2]}
        for method, task, seed, order, name in runs:
            if method == "domix" and seed == seeds[0] and ok(name) and order in robust["domix"]:
                robust["domix"][order][task] = round(res[name]["test"]["macro_f1"], 4)
        libs = [Path(jobs[f"module/{i + 1}/{domains[0]}"].out).parent for i in range(min(2, len(orders)))]
        eq = _module_tensors_equal(libs[0], libs[1], domains) if len(libs) == 2 else {}
        same = [robust["domix"][orders[0]].get(t) == robust["domix"][orders[1]].get(t) for t in tasks] \
            if len(orders) > 1 else []
        first = {(t, s): n for m, t, s, o, n in runs if m == "domix" and o == orders[0]}
        own_runs = [n != first.get((t, s)) for m, t, s, o, n in runs if m == "domix" and o != orders[0]]
        checks["domix"] = {"modules_bitwise_equal": eq, "identical_scores": bool(same) and all(same),
                           "order_b_finetuned": bool(own_runs) and all(own_runs),
                           "libraries": [str(p) for p in libs]}
    if "ncl" in methods:
        robust["ncl"] = {o: {} for o in orders}
        for method, task, seed, order, name in runs:
            if method == "ncl" and seed == seeds[0] and ok(name):
                robust["ncl"][order][task] = round(res[name]["test"]["macro_f1"], 4)
        checks["ncl"] = {"spread": {t: round(max(v) - min(v), 4) for t in tasks
                                    if len(v := [robust["ncl"][o][t] for o in orders if t in robust["ncl"][o]]) > 1}}
    # -- efficiency
    eff = {}
    mod_jobs = [f"module/1/{d}" for d in domains]
    for method in methods:
        fts = [res[n] for m, _, _, o, n in runs if m == method and ok(n)
               and (method != "domix" or o == orders[0])]
        if not fts:
            continue
        pre_jobs = {"modules": mod_jobs, "joint": ["joint"], "ncl": list(ncl_jobs.values()),
                    **{v: [f"mode/expert/{d}" for d in domains] + [f"{v}/compose"] for v in COMPOSE}
                    }.get(NEEDS.get(method), [])
        pre = [res[n] for n in pre_jobs if ok(n)]
        if NEEDS.get(method) == "ncl":  # one sequence per order: the cost of one
            pre_s = statistics.mean(r["wall_s"] for r in pre) if pre else 0.0
        else:
            pre_s = sum(r["wall_s"] for r in pre)
        eff[method] = {
            "trainable_params": fts[0]["trainable_params"], "total_params": fts[0]["total_params"],
            "pretrain_s": round(pre_s, 1),
            "pretrain_step_time_s": round(statistics.mean(r["step_time_s"] for r in pre), 4) if pre else None,
            "pretrain_step_cpu_s": _mean([r.get("step_cpu_s") for r in pre]),
            "pretrain_peak_rss_mb": max((r["peak_rss_mb"] for r in pre), default=None),
            "pretrain_trainable_params": pre[0]["trainable_params"] if pre else 0,
            "pretrain_cpu_s": round(sum(r.get("cpu_s", 0) for r in pre) / (len(pre) if NEEDS.get(method) == "ncl"
                                                                           else 1), 1) if pre else 0.0,
            "finetune_s": round(statistics.mean(r["wall_s"] for r in fts), 1),
            "finetune_cpu_s": round(statistics.mean(r.get("cpu_s", 0) for r in fts), 1),
            "finetune_train_s": round(statistics.mean(r["train_time_s"] for r in fts), 1),
            "finetune_total_s": round(sum(r["wall_s"] for r in fts), 1),
            "step_time_s": round(statistics.mean(r["step_time_s"] for r in fts if r["step_time_s"]), 4),
            "step_cpu_s": _mean([r.get("step_cpu_s") for r in fts]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in fts), "finetune_runs": len(fts)}
    # -- DoMIX's bridge, first seed: per task the domain-by-domain block norms, averaged over layer types
    bridge = {}
    for method, task, seed, order, name in runs:
        if method == "domix" and seed == seeds[0] and order == orders[0] and ok(name) and res[name].get("bridge_blocks"):
            grids = list(res[name]["bridge_blocks"].values())
            n = len(grids[0])
            bridge[task] = [[round(statistics.mean(g[i][j] for g in grids), 5) for j in range(n)] for i in range(n)]
    # -- methods whose settings coincide (e.g. domix-rank when rank is domix's default) share their runs
    job_sets = {}
    for method, task, seed, order, name in runs:
        if method != "domix" or order == orders[0]:
            job_sets.setdefault(method, set()).add(name)
    shared = {m: o for i, m in enumerate(methods) for o in methods[:i] if m in job_sets and job_sets[m] == job_sets.get(o)}
    return {"tasks": out_tasks, "lm_loss": lm_loss, "lm_accuracy": lm_accuracy, "retention_loss": retention,
            "lm_loss_detail": detail,
            "order_robustness": robust, "order_checks": checks, "efficiency": eff, "bridge_blocks": bridge,
            "shared_runs": shared}


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


SAME_RUN_GAP_S = 120  # jobs whose spans are closer than this came from one (unrecorded) invocation


def _unrecorded(res: dict, recorded: list[dict]) -> list[dict]:
    """Invocations whose finished jobs these results reuse but which left no history entry —
    killed before they could write results.json, or run with other settings — rebuilt from
    their jobs' own start and end times. Each spans its first job's start to its last job's end:
    work in flight when it stopped is lost and not counted."""
    def ts(stamp: str) -> float:
        return time.mktime(time.strptime(stamp, STAMP))

    known = [(ts(h["finished"]) - h["wall_time_s"] - 1, ts(h["finished"]) + 1) for h in recorded]
    ends = [(ts(r["finished"]), r["wall_s"]) for r in res.values()
            if r.get("reused") and r.get("finished") and r.get("wall_s") is not None]
    spans = sorted((end - wall, end) for end, wall in ends if not any(a <= end <= b for a, b in known))
    groups: list[list] = []
    for a, b in spans:
        if groups and a <= groups[-1][1] + SAME_RUN_GAP_S:
            groups[-1][1] = max(groups[-1][1], b)
            groups[-1][2] += 1
        else:
            groups.append([a, b, 1])
    return [{"finished": time.strftime(STAMP, time.localtime(b)), "wall_time_s": round(b - a, 1), "jobs_run": n,
             "jobs_reused": None, "methods": None, "interrupted": True} for a, b, n in groups]


def _history(path: Path, results: dict, res: dict) -> list[dict]:
    """The invocations that computed these results: earlier ones (from the previous results.json,
    if its settings are the same), earlier ones that left no entry (see `_unrecorded`), and
    this one."""
    hist = []
    try:
        prev = json.loads(path.read_text())
        if prev.get("settings_key", _key(prev.get("settings"))) == results["settings_key"]:
            hist = prev.get("history") or [{  # written before the history was kept
                "finished": time.strftime(STAMP, time.localtime(path.stat().st_mtime)),
                "wall_time_s": prev["wall_time_s"], "jobs_run": len(prev["jobs"]) - prev.get("reused_jobs", 0),
                "jobs_reused": prev.get("reused_jobs", 0), "methods": prev.get("methods")}]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    hist = sorted(hist + _unrecorded(res, hist), key=lambda h: h["finished"])
    n = len(results["jobs"])
    return hist + [{"finished": time.strftime(STAMP), "wall_time_s": results["wall_time_s"],
                    "jobs_run": n - results["reused_jobs"], "jobs_reused": results["reused_jobs"],
                    "methods": results["methods"]}]


def _parse_list(value, cast=str):
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return [cast(v) for v in value]


def resolve_settings(preset: str, base: str, seeds=None, workers=None, threads=None, overrides=None) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    s = _merge(PRESETS[preset], overrides or {})
    s["preset"] = preset
    s["base"] = base
    s["seeds"] = _parse_list(seeds, int) or s["seeds"]
    s["workers"] = int(workers or s["workers"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    s["threads"] = int(threads or max(1, cores // s["workers"]))
    unknown = [d for d in s["domains"] if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domains {unknown}; known: {list(DOMAINS)}")
    s.setdefault("orders", [list(s["domains"]), list(reversed(s["domains"]))])
    s["orders"] = [list(o) for o in s["orders"]]
    if len(s["orders"]) < 2 or any(sorted(o) != sorted(s["domains"]) for o in s["orders"]):
        raise ValueError("orders must be at least two permutations of the domains")
    from ..finetune import FinetuneConfig

    d = FinetuneConfig(train="", eval="", out="")
    s["domix_defaults"] = {"bridge_init": d.bridge_init, "bridge_lr": d.bridge_lr, "lr": d.lr}
    return s


def run_quality(preset: str = "quick", out=None, methods=None, seeds=None, workers=None, base: str = DEFAULT_BASE,
                data_root=None, progress: bool = True, threads: int | None = None, overrides: dict | None = None) -> dict:
    """Run the quality benchmark (DESIGN.md §6) into `out` and return its results (also
    `out/results.json`; `out/REPORT.md` and `out/plots/` hold the report)."""
    from .report import write_report

    t0 = time.time()
    out = Path(out or f"bench-out/quality-{preset}")
    out.mkdir(parents=True, exist_ok=True)
    methods = _parse_list(methods) or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    settings = resolve_settings(preset, base, seeds, workers, threads, overrides)
    settings["base_id"] = _base_id(base)
    seeds = settings["seeds"]
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    if data_root is None:
        from ..data.benchmark import build_benchmark_data
        from ..fetch import cache_dir

        build_benchmark_data(progress=progress)
        data_root = cache_dir() / "data"
    log(f"quality: preset {preset}, {len(methods)} methods, seeds {seeds}, {settings['workers']} worker(s) x "
        f"{settings['threads']} thread(s), out {out}")
    data = prepare_data(Path(data_root), out, settings, progress)
    work = out / "work"
    jobs, runs = plan(settings, data, work, methods, seeds)
    res = {}
    if "domix" in methods and not settings["order_check_finetune"]:
        # train everything but order B's domix fine-tunes, then reuse order A's if the modules are equal
        order_b = {n for m, t, s, o, n in runs if m == "domix" and o != order_name(settings["orders"][0])}
        first = {k: v for k, v in jobs.items() if k not in order_b}
        res = execute(first, settings["workers"], progress, log)
        jobs, runs = _reuse_order_b(jobs, runs, settings, settings["domains"])
    res.update(execute({k: v for k, v in jobs.items() if k not in res}, settings["workers"], progress, log))
    wall = time.time() - t0
    results = {"preset": preset, "seeds": seeds, "methods": methods,
               "settings": {k: v for k, v in settings.items()}, "data": data,
               "wall_time_s": round(wall, 1),
               "compute_time_s": round(sum(r.get("wall_s", 0) for r in res.values()), 1),
               "cpu_time_s": round(sum(r.get("cpu_s", 0) or 0 for r in res.values()), 1),
               "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               "load_avg_1m": round(statistics.mean(ls), 2) if (ls := [r["load_1m"] for r in res.values()
                                                                      if r.get("load_1m") is not None]) else None,
               "reused_jobs": sum(1 for r in res.values() if r.get("reused")),
               **collect(settings, jobs, runs, res, methods, seeds),
               "jobs": {n: {k: r.get(k) for k in ("label", "kind", "status", "wall_s", "cpu_s", "peak_rss_mb", "load_1m",
                                                  "reused", "error")}
                        for n, r in res.items()},
               "failures": {n: r.get("error") for n, r in res.items() if r.get("status") != "done"}}
    results["settings_key"] = _key(results["settings"])
    results["history"] = _history(out / "results.json", results, res)
    write_json(out / "results.json", results)
    results["table"] = write_report(results, out)
    write_json(out / "results.json", {k: v for k, v in results.items() if k != "table"})
    log(f"quality: done in {wall / 60:.1f} min -> {out / 'REPORT.md'}")
    return results


def run(args) -> dict:
    """`domix bench quality` (args: preset, out, methods, seeds, workers, threads, base, data, json)."""
    res = run_quality(preset=args.preset, out=getattr(args, "out", None), methods=getattr(args, "methods", None),
                      seeds=getattr(args, "seeds", None), workers=getattr(args, "workers", None),
                      base=getattr(args, "base", None) or DEFAULT_BASE, data_root=getattr(args, "data", None),
                      threads=getattr(args, "threads", None), progress=True)
    return res
