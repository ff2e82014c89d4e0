"""What the quality benchmark runs: the methods, the presets and the settings a run resolves
from a preset, its overrides and the machine."""
from __future__ import annotations

import os
from copy import deepcopy

from ...data.benchmark import DOMAINS
from ...data.commonsense import TASKS as COMMONSENSE_TASKS

# ---------------------------------------------------------------------------- methods
# Each method is data: FinetuneConfig options plus where its starting point comes from.
# "init": own (the task's domain module), joint (the union module), ncl (the full checkpoint
# after continual pre-training), merged (order A's modules merged by PEFT); the domix variants use
# the whole order-A library.
METHODS: dict[str, dict] = {
    "base-full": {"method": "full"},
    "base-lora": {"method": "lora"},
    "base-dora": {"method": "dora"},
    # capacity-matched baselines: "params" is the rank whose LoRA trains as many parameters as DoMIX
    # over the run's N modules of rank r (`capacity.matched_ranks`), "rank" the rank N·r of DoMIX's update
    "base-lora-params": {"method": "lora", "rank": "params"},
    "base-lora-rank": {"method": "lora", "rank": "rank"},
    "base-dora-params": {"method": "dora", "rank": "params"},
    "base-dora-rank": {"method": "dora", "rank": "rank"},
    "own-lora": {"method": "lora", "init": "own"},
    "joint-lora": {"method": "lora", "init": "joint"},
    "ncl": {"method": "full", "init": "ncl"},
    "cat-merge": {"method": "domix", "bridge_init": "identity", "freeze_bridge": True},
    "domix": {"method": "domix"},  # FinetuneConfig's defaults (bridge_init, bridge_lr)
    "domix-rank": {"method": "domix", "bridge_init": "rank"},
    "domix-uniform": {"method": "domix", "bridge_init": "uniform"},
    "domix-identity": {"method": "domix", "bridge_init": "identity"},
    "domix-frozen-bridge": {"method": "domix", "freeze_bridge": True},
    # the control: DoMIX over modules that never saw their domain (A as initialised, B = 0), which
    # separates what domain pre-training brings from what the bridge's structure, rank and rate bring
    "domix-untrained": {"method": "domix", "init": "untrained"},
    # the bridge over the 2 modules `library rank` puts first on the task's training text
    "domix-auto-2": {"method": "domix", "modules": "auto:2"},
    # MoDE (docs/design.md): experts trained alone, composed on the mixed corpora, then fine-tuned
    "mode": {"method": "mode", "init": "composed"},
    "mode-frozen-experts": {"method": "mode", "init": "composed", "freeze_experts": True},
    # the merge baselines: order A's modules merged into one by PEFT (`domix library merge`), then
    # every task fine-tunes from the merged module as own-lora does from its domain's
    "linear-merge": {"method": "lora", "init": "merged"},
    "ties-merge": {"method": "lora", "init": "merged"},
    "dare-ties-merge": {"method": "lora", "init": "merged"},
    # scored without fine-tuning (a suite's floor): the base model, and each task's own module on its task
    "zero-shot": {"method": "none"},
    "own-module": {"method": "none", "init": "own"},
}
DOMIX_LIKE = ("cat-merge", "domix", "domix-rank", "domix-uniform", "domix-identity", "domix-frozen-bridge",
              "domix-auto-2")  # over the run's trained modules (domix-untrained has its own library)
MERGES = {"linear-merge": "linear", "ties-merge": "ties", "dare-ties-merge": "dare_ties"}  # method -> PEFT's combination
NEEDS = {"own-lora": "modules", "own-module": "modules", "joint-lora": "joint", "ncl": "ncl", **{m: "modules" for m in DOMIX_LIKE},
         "mode": "mode", "mode-frozen-experts": "mode-frozen", **{m: "modules" for m in MERGES},
         "domix-untrained": "untrained"}
# a composition per MoDE method: experts and gates trained, or the gates only
COMPOSE = {"mode": {"freeze_experts": False}, "mode-frozen": {"freeze_experts": True}}
COMPOSED_FOR = {v: m for m, v in NEEDS.items() if v in COMPOSE}  # composition -> the method fine-tuning it


def compose_gate_lr(mode: dict) -> float:
    """The compositions' gate lr: `compose_gate_lr`, else the experts' `gate_lr`, else its default."""
    return mode.get("compose_gate_lr", mode.get("gate_lr", 1e-3))

# ---------------------------------------------------------------------------- presets
def _merge(a: dict, b: dict) -> dict:
    out = deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else deepcopy(v)
    return out


# Sized from measurements on 2 CPU cores, one thread per job (real model). quick (with MoDE)
# measured 68 CPU-min in fp32 (27.8 to 35.1 min on 2 cores with 2 workers, by machine); in bf16
# autocast (1.3x per fine-tuning step, 1.5x per pre-training token) 42.2 CPU-min, 21.8 min, with
# 18 methods (2026-12-01): under its 60 CPU-min budget. A full run with 256 training
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
                 "full_lr": 1e-4, "seed": 0, "dtype": "bf16"},
    "lm_eval": {"blocks": 12, "batch_size": 8},
    "finetune": {"train": 80, "dev": 24, "test": 128, "epochs": 1.0, "batch_size": 8, "max_seq_len": 48,
                 "lr": 5e-4, "full_lr": 5e-5, "mode_lr": 1e-4, "base_lora_rank": 16, "dtype": "bf16"},
    "mode": {"lr": 1e-4, "gate_lr": 1e-3, "compose_steps": 8},
    "order_check_finetune": False,  # domix order B: reuse order A's runs when the modules are bitwise equal
    "keep_full_weights": False,
}
# decisive: sized from measurements on 2 CPU cores, one thread per job (2026-11-30, real model):
# LoRA pre-training in bf16 autocast runs at ~170 tokens/s per job (fp32 ~114; bf16 with
# gradient checkpointing ~132: on CPU recomputing costs more than it saves), a fine-tuning step of
# 8 examples takes ~2.4 CPU-s in bf16 (fp32 ~3.1). Its DAP budget is not fixed: the curve trains
# modules at each of `dap_curve.tokens` per domain and the run keeps the budget with the largest
# mean dev gain of own-lora over base-lora (see `choose_budget`). ncl (full-weight continual
# pre-training in two orders), DoRA, the bridge-init variants and MoDE are left out to fit ~6
# CPU-hours; `--methods` adds them to the same run. With MoDE, its expert and gate rates come
# from a grid on the experts' held-out loss at the chosen budget (grid.py).
DECISIVE = _merge(QUICK, {
    "seeds": [0, 1, 2],
    "methods": ["base-lora", "base-full", "own-lora", "joint-lora", "cat-merge", "domix", "domix-frozen-bridge"],
    "dap_curve": {"tokens": [8192, 32768, 65536]},
    "lm_eval": {"blocks": 24},
    # base-lora at the modules' rank: the DAP curve and C1 compare own-lora with base-lora at the same
    # rank and the same fine-tuning (the other presets give base-lora rank 16, about DoMIX's budget)
    "finetune": {"train": 256, "dev": 200, "test": 300, "epochs": 2.0,
                 "eval_every": 16, "keep_best": True, "patience": 2, "base_lora_rank": 8},
    # the composition: 256 steps (131,072 tokens of the mixture, four domains' budget) at gate lr 3e-2, with
    # the routing loss, gates that read the text so far and routed gates. Measured 2026-12-01 on this preset's fp32
    # experts (frozen; held-out loss above each expert's own, mean of the 4 domains; docs/mode.md): token gates,
    # 16 steps at gate lr 1e-3 / 1e-2 / 3e-2: 0.152 / 0.138 / 0.228 nats, 64 steps at 1e-2: 0.073 (0.172
    # without the routing loss); gates reading the mean context, 64 steps at 1e-2 / 3e-2: 0.057 / 0.198,
    # 128 steps at 1e-2: 0.045. Measured 2026-12-01 on a fresh set of this preset's fp32 experts, context gates:
    # softmax gates 128 steps at 1e-2: 0.087 (health +0.198), 256 steps: 0.076; routed gates (a router times each
    # expert's own gate) 128 steps at 1e-2 / 3e-2 / 1e-1: 0.068 / 0.049 / 0.042, 256 steps at 1e-2 / 3e-2:
    # 0.035 / 0.032 (worst domain +0.050)
    "mode": {"compose_steps": 256, "compose_gate_lr": 3e-2, "gate_context": "mean", "gate_form": "routed",
             "lr_grid": {"lr": [1e-4, 3e-4, 1e-3], "gate_lr": [1e-3, 1e-2]}},
})
# matched: the decisive protocol made one a reviewer accepts. Baselines of DoMIX's capacity (LoRA and DoRA
# with as many trainable parameters, LoRA of the same update rank) beside the decisive ones and a control
# (DoMIX over untrained modules); every method's rates from the same dev grid (`lr_grid`: multiples of its
# standard rates, chosen on the first seed's mean dev macro-F1, rates.py); a cap of 6 epochs (192 steps) with
# dev every 32 steps and patience 2, so that runs stop on dev rather than at the cap (the decisive run kept its
# last allowed step in 42-75 % of the runs of every method at 2 epochs). Dev every 16 steps, as the decisive
# preset scores it, measured 2026-12-03: base-lora on pubmed-role ran all 192 steps (best dev at 176) in
# 684 CPU-s, a third of it in its 12 dev evaluations of 200 examples. The DAP budget is the one the decisive
# run's curve chose on dev (32,768 tokens per domain: 64 steps of 8 x 64), so the curve is not run again.
MATCHED = _merge(DECISIVE, {
    "methods": ["base-lora", "base-lora-params", "base-lora-rank", "base-dora-params", "base-full", "own-lora",
                "joint-lora", "cat-merge", "domix", "domix-frozen-bridge", "domix-untrained"],
    "dap_curve": None,
    "pretrain": {"steps": 64},
    "finetune": {"epochs": 6.0, "eval_every": 32, "patience": 2},
    # the third fine-tuning seed runs on modules pre-trained a second time (pre-training seed 1), so that
    # the per-seed intervals hold the modules' own variance (plan.plan)
    "module_seeds": {"2": 1},
    "lr_grid": [1.0, 2.0, 4.0],
})
# commonsense: the DoMIX paper's LLM setting (a suite, see `SUITES`) on the default model. The eight
# commonsense-reasoning tasks (`domix fetch data commonsense`) are the domains: one module per task, trained on
# its training text (prompt and answer) as stage 1 trains a domain's; every method then fine-tunes once on the
# union of the tasks' training sets (`--task generate`), and each task's test set is scored by answer
# extraction (`accuracy`, the paper's protocol) and by the log-likelihood of its options (`accuracy_loglik`).
# LoRA and DoRA at rank 16 and at DoMIX's update rank N·r; the bridge ablations of the paper (P frozen at its
# start, P = I and P = I/(N·r) trained); the base model and each task's module alone as the floor.
# Sized from one measured run (2026-12-03, 2 cores shared with another benchmark, 1 thread per job): a LoRA
# step on the union (batch 8, up to 256 tokens) costs 13.2 CPU-s, peak RSS 7.9 GB; scoring a test row both
# ways ~0.55 CPU-s (zero-shot, 320 rows in 177 CPU-s). After 32 steps LoRA r16 was still at chance (mean test
# accuracy 0.350 by extraction, 0.362 by log-likelihood, chance 0.354): 96 steps (3 epochs of 32 examples per
# task) project ~30 CPU-min per LoRA run, ~45 per DoRA run, ~9-10 CPU-hours for the grid of 2 factors.
COMMONSENSE = _merge(QUICK, {
    "suite": "commonsense",
    "domains": list(COMMONSENSE_TASKS),
    "metric": "accuracy",
    "claims": "llm",
    "order_check": False,  # one library: the order check is the domain benchmark's
    "seeds": [0],
    "methods": ["zero-shot", "own-module", "base-lora", "base-lora-rank", "base-dora", "base-dora-rank", "domix",
                "domix-frozen-bridge", "domix-identity", "domix-rank"],
    "pretrain": {"seq_len": 128, "steps": 32},
    "lm_eval": {"blocks": 8},
    "finetune": {"train": 32, "dev": 16, "test": 50, "epochs": 3.0, "max_seq_len": 256, "max_new_tokens": 12,
                 "eval_every": 32, "keep_best": True, "patience": 2, "base_lora_rank": 16},
    "lr_grid": [1.0, 4.0],
})
PRESETS: dict[str, dict] = {
    "quick": QUICK,
    "full": _merge(QUICK, {  # what differs from quick
        "seeds": [0, 1, 2],
        "pretrain": {"steps": 16, "dtype": "fp32"},  # as it ran on 2026-11-25
        "lm_eval": {"blocks": 24},
        "finetune": {"train": 160, "dev": 32, "test": 250, "dtype": "fp32"},
        "mode": {"compose_steps": 16},
        "order_check_finetune": True,  # domix order B: fine-tune on the order-B library for real
    }),
    "decisive": DECISIVE,
    "matched": MATCHED,
    "commonsense": COMMONSENSE,
}
# a suite: tasks that every method fine-tunes on once, on the union of their training sets, and that are scored
# one by one (the LLM setting); its domains are its tasks, each with its training text as the corpus
SUITES = ("commonsense",)
METRICS = {"macro_f1": "macro-F1", "accuracy": "accuracy"}  # the metric a run's claims and rates are read on
# ---------------------------------------------------------------------------- learning rates
# One rule for every method: its field's standard value, with the source written down (a dev grid
# over every method's rates does not fit the decisive budget). The test split chooses nothing.
STANDARD_LR = {
    "lr": (5e-4, "LoRA's GLUE rates for RoBERTa-base, 4e-4 to 5e-4 (Hu et al. 2021)"),
    "full_lr": (5e-5, "BERT's fine-tuning range, 2e-5 to 5e-5 (Devlin et al. 2019)"),
    "mode_lr": (1e-4, "between LoRA's and full fine-tuning's (experts are full layers)"),
    "bridge_lr": (3e-3, "the DoMIX reference code's bridge rate"),
}


def selection(settings: dict, methods: list[str], rate_grid: dict | None = None) -> dict:
    """results.json's `selection`: every method's learning rate (and DoMIX's bridge or MoDE's gate
    rate) and how it was chosen; with a rate grid (`rates.py`) also its candidates (`grid`: the rates of
    each factor), their mean dev macro-F1 (`dev`) and the `chosen` rates."""
    ft, bridge_lr = settings["finetune"], settings["domix_defaults"]["bridge_lr"]
    out = {}
    for name in methods:
        m = METHODS[name]
        if m["method"] == "none":  # scored without training: no rates
            continue
        field = {"full": "full_lr", "mode": "mode_lr"}.get(m["method"], "lr")
        trains_bridge = m["method"] in ("domix", "mode") and not m.get("freeze_bridge")
        base = {"lr": ft[field], "bridge_lr": m.get("bridge_lr", bridge_lr) if trains_bridge else None}
        at = lambda f: {k: (v * f if v is not None else None) for k, v in base.items()}  # noqa: E731
        factor = settings.get("lr_scale", {}).get(name, 1.0)
        hows = []
        for key, value in base.items():
            if value is not None:
                std, source = STANDARD_LR[field if key == "lr" else "bridge_lr"]
                where = f"standard value, {source}" if value == std else "set in the run's settings"
                hows.append(f"{key} {value * factor:g}: " + (f"{factor:g} x its {where}" if rate_grid else where))
        if m.get("freeze_bridge"):
            hows.append("bridge frozen")
        out[name] = {**at(factor), "how": "; ".join(hows)}
        if rate_grid and name in rate_grid:
            g = rate_grid[name]
            out[name].update(grid=[at(f) for f in g["grid"]], factors=g["grid"], dev=g["dev"],
                             dev_by_task=g["dev_by_task"], chosen=at(factor), chosen_factor=factor)
            out[name]["how"] += (f"; chosen on dev among factors {', '.join(f'{f:g}' for f in g['grid'])} "
                                 f"(best mean dev {METRICS[settings.get('metric', 'macro_f1')]} over the tasks, first "
                                 "seed; ties to the smaller)")
    return out


NO_SAVE = 10 ** 9  # Trainer checkpoints are not needed: a job is redone whole if it dies
STAMP = "%Y-%m-%dT%H:%M:%S"  # the local time format of "finished" in job results and the history


def order_name(order) -> str:
    return ",".join(order)


def _parse_list(value, cast=str):
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return [cast(v) for v in value]


def parse_overrides(items, preset: str) -> dict:
    """`--set KEY=VALUE ...` as a nested overrides dict: KEY a dotted path to one of the preset's
    settings (`pretrain.steps`, `mode.lr_grid`), VALUE JSON (`64`, `1e-3`, `null`, `[8192]`) or a bare
    string. `null` turns a study off (`dap_curve=null`, `mode.lr_grid=null`): the run then keeps the
    preset's values, or those given beside it. Raises ValueError naming the setting that does not exist."""
    import json

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    out: dict = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        path = [k for k in key.strip().split(".") if k]
        if not eq or not path:
            raise ValueError(f"--set takes KEY=VALUE (a dotted setting, say pretrain.steps=64), not {item!r}")
        known = PRESETS[preset]
        for i, k in enumerate(path):
            if not isinstance(known, dict) or k not in known:
                where = ".".join(path[:i]) or "the top level"
                have = sorted(known) if isinstance(known, dict) else []
                raise ValueError(f"--set {key}: preset {preset} has no setting {'.'.join(path[:i + 1])!r}"
                                 + (f" (settings at {where}: {', '.join(have)})" if have else ""))
            known = known[k]
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if not _fits(known, value, study=len(path) == 1):
            raise ValueError(f"--set {key}={raw}: expected {_kind_of(known, len(path) == 1)} (the preset has {json.dumps(known)})")
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _kind_of(value, study: bool = False) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "a JSON object, or null to turn it off"
    return {list: "a JSON list" + (", or null to turn it off" if study else ""), str: "a string"}.get(type(value), type(value).__name__)


def _fits(old, new, study: bool = False) -> bool:
    """Whether `new` may replace the preset's `old`: the same kind of value (any number for a number);
    null only where the preset has a group of settings or a top-level list (a study it turns off)."""
    if old is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)):
        return isinstance(new, (int, float))
    if isinstance(old, dict):
        return new is None or isinstance(new, dict)
    if isinstance(old, list):  # a top-level list is a study's points (lr_grid): null turns the study off
        return (study and new is None) or isinstance(new, list)
    return isinstance(new, type(old))


def resolve_settings(preset: str, base: str, seeds=None, workers=None, threads=None, overrides=None,
                     task_domains: dict | None = None) -> dict:
    """A run's settings: the preset, its overrides, the machine. `task_domains` ({task: domain}, a
    user benchmark's) replaces the four built-in domains and their tasks."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    s = _merge(PRESETS[preset], overrides or {})
    s["preset"] = preset
    s["base"] = base
    s["seeds"] = _parse_list(seeds, int) or s["seeds"]
    s["workers"] = int(workers or s["workers"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    s["threads"] = int(threads or max(1, cores // s["workers"]))
    if s.get("suite") and task_domains is None:  # a suite's tasks are its domains
        unknown = [d for d in s["domains"] if d not in COMMONSENSE_TASKS]
        if unknown:
            raise ValueError(f"unknown {s['suite']} tasks {unknown}; known: {list(COMMONSENSE_TASKS)}")
        task_domains = {d: d for d in s["domains"]}
    elif task_domains is None:
        unknown = [d for d in s["domains"] if d not in DOMAINS]
        if unknown:
            raise ValueError(f"unknown domains {unknown}; known: {list(DOMAINS)}")
        task_domains = {DOMAINS[d]: d for d in s["domains"]}
    s["task_domains"] = dict(task_domains)
    s.setdefault("orders", [list(s["domains"]), list(reversed(s["domains"]))])
    s["orders"] = [list(o) for o in s["orders"]]
    if len(s["orders"]) < 2 or any(sorted(o) != sorted(s["domains"]) for o in s["orders"]):
        raise ValueError("orders must be at least two permutations of the domains")
    from ...finetune import FinetuneConfig
    from ...training import defaults

    d = defaults(FinetuneConfig)
    s["domix_defaults"] = {k: d[k] for k in ("bridge_init", "bridge_lr", "lr")}
    return s

