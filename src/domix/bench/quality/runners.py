"""The jobs themselves, one per kind, as they run in a worker process (`_work`): training,
merging modules, held-out LM evaluation and fine-tuning, each timed per optimizer step, with the
process's own CPU time and peak RSS."""
from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from pathlib import Path

from ...io import write_json
from .collect import _mean
from .settings import NO_SAVE, STAMP


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
    from ...library.pretrain import PretrainConfig, pretrain

    clock = _clock()
    meta = pretrain(PretrainConfig(**spec["config"]), callbacks=[clock])
    return {"step_time_s": clock.step_time(), "step_cpu_s": clock.step_time(cpu=True),
            "train_time_s": meta["train_time_s"], "steps": meta["steps"],
            "tokens": meta["tokens"], "trainable_params": meta["trainable_params"],
            "train_loss": meta["train_loss"], "module_seed": meta["module_seed"]}


def _run_ncl(spec: dict, out: str) -> dict:
    """The domains in turn, each stage starting from the previous stage's full checkpoint.
    A complete stage is reused (resume); earlier stages' weights are dropped once the next exists."""
    from ...library.pretrain import PretrainConfig, pretrain

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
    from ...mode.train import ComposeConfig, ModePretrainConfig, compose, pretrain_expert

    clock = _clock()
    if "domain" in spec["config"]:
        meta = pretrain_expert(ModePretrainConfig(**spec["config"]), callbacks=[clock])
    else:
        meta = compose(ComposeConfig(**spec["config"]), callbacks=[clock])
    return {"step_time_s": clock.step_time(), "step_cpu_s": clock.step_time(cpu=True),
            "train_time_s": meta["train_time_s"], "steps": meta["steps"], "tokens": meta["tokens"],
            "trainable_params": meta["trainable_params"], "train_loss": meta["train_loss"],
            "params": meta.get("params")}


def _run_merge(spec: dict, out: str) -> dict:
    """The domain modules merged into one library entry by PEFT (`domix library merge`)."""
    from ...library.merge import merge_modules

    out = Path(out)
    meta = merge_modules(spec["library"], spec["modules"], spec["combination"], out.name, base=spec["base"],
                         weights=spec["weights"], density=spec["density"], seed=spec["seed"], into=out.parent,
                         overwrite=True)
    return {"modules": meta["merged"]["modules"], "combination": meta["merged"]["combination"],
            "rank": meta["rank"], "merge_time_s": meta["merge_time_s"]}


def _run_lm_eval(spec: dict, out: str) -> dict:
    """Held-out LM loss and next-token (masked-token) accuracy of one model on every held-out text;
    of `{"mixture": [expert dirs]}`, the MoDE experts' Bayesian mixture (`mixture_lm_loss`), which a
    masked-LM base skips (a posterior from the text so far needs next-token predictions)."""
    from ...data.corpus import load_documents, pack
    from ...library.loading import load_with_module
    from ...lm import lm_loss, mixture_lm_loss
    from ...mode.model import load_mode_model
    from ...models import load_model, load_tokenizer

    m, by_position = spec["model"], spec.get("by_position", False)
    score = None  # blocks -> lm_loss's record
    if "mixture" in m:
        loaded = [load_mode_model(d, head="lm") for d in m["mixture"]]
        if any(objective != "clm" for _, objective, _ in loaded):
            return {"loss": {}, "accuracy": {}, "tokens": {}, "skipped": "a masked-LM base: no next-token mixture"}
        base = loaded[0][2]["base"]
        score = lambda blocks: mixture_lm_loss([x[0] for x in loaded], blocks, spec["batch_size"],  # noqa: E731
                                               by_position=by_position)
    elif "mode" in m:
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
    score = score or (lambda blocks: lm_loss(model, blocks, tok, objective, spec["batch_size"], seed=0,  # noqa: E731
                                             by_position=by_position))
    loss, accuracy, tokens, positions = {}, {}, {}, {}
    for name, path in spec["heldout"].items():
        r = score(pack(load_documents([path]), tok, spec["seq_len"], max_blocks=spec["blocks"]))
        loss[name], accuracy[name], tokens[name] = round(r["loss"], 5), round(r["accuracy"], 5), r["tokens"]
        if "position_loss" in r:
            positions[name] = r["position_loss"]
    return {"loss": loss, "accuracy": accuracy, "tokens": tokens, **({"position_loss": positions} if positions else {})}


def _score_suite(model, tokenizer, tests: dict, max_seq_len: int, max_new_tokens: int) -> dict:
    """Each of a suite's test sets scored by every protocol (`choice_metrics`): {"tests": {task: scores},
    "test_predictions": {task: {"y_true", "y_pred", "y_pred_loglik", "y_pred_cloze"}}}."""
    from ...data.tasks import read_jsonl
    from ...finetune import evaluate_rows

    task = {"task": "generate", "max_seq_len": max_seq_len, "max_new_tokens": max_new_tokens}
    out = {"tests": {}, "test_predictions": {}}
    for name, path in tests.items():
        r = evaluate_rows(model, tokenizer, task, read_jsonl(path, ("prompt", "answer", "choices")), predictions=True)
        out["test_predictions"][name] = {k: r.pop(k) for k in ("y_true", "y_pred", "y_pred_loglik", "y_pred_cloze")
                                         if k in r}
        out["tests"][name] = {**{k: r[k] for k in ("accuracy", "accuracy_loglik", "accuracy_cloze", "answered",
                                                   "examples") if k in r}, "generations": r["generations"][:5]}
    return out


def _run_score(spec: dict, out: str) -> dict:
    """A model scored on test sets without fine-tuning: the base (zero-shot) or the base with one module."""
    from ...library.loading import load_with_module
    from ...models import load_model, load_tokenizer

    m = spec["model"]
    if m.get("module"):
        model, _ = load_with_module(m["base"], m["library"], m["module"], dtype=spec["dtype"])
    else:
        model, _ = load_model(m["base"], head="lm", dtype=spec["dtype"])
    t0 = time.time()
    scored = _score_suite(model, load_tokenizer(m["base"]), spec["tests"], spec["max_seq_len"], spec["max_new_tokens"])
    return {**scored, "score_time_s": round(time.time() - t0, 2),
            "total_params": sum(p.numel() for p in model.parameters()), "trainable_params": 0}


def _run_finetune(spec: dict, out: str) -> dict:
    from ...data.tasks import read_jsonl
    from ...finetune import FinetuneConfig, evaluate_rows, finetune
    from ...models import load_tokenizer

    clock = _clock()
    cfg = FinetuneConfig(**spec["config"], out=out, overwrite=True, progress=False, save_steps=NO_SAVE)
    metrics = finetune(cfg, callbacks=[clock])
    if "tests" in spec:  # a suite: the union's model on each task's test set
        return _suite_result(spec, out, cfg, metrics, clock)
    # the test set is scored once, after training, by the model that was saved; its predictions
    # are kept for the verdicts' paired bootstrap
    tspec = json.loads((Path(out) / "task.json").read_text())
    task = {"task": "classify", "labels": tspec["labels"], "max_seq_len": tspec["max_seq_len"], "where": spec["test"]}
    test = evaluate_rows(clock.model, load_tokenizer(out), task, read_jsonl(spec["test"], ("text", "label")),
                         predictions=True)
    if spec.get("drop_weights"):
        (Path(out) / "model.safetensors").unlink(missing_ok=True)
    keep = ("accuracy", "macro_f1", "per_class_f1", "confusion_matrix", "examples", "labels")
    return {"dev": {k: metrics["eval"][k] for k in ("accuracy", "macro_f1", "examples")},
            "test": {k: test[k] for k in keep if k in test},
            "trainable_params": metrics["trainable_params"], "total_params": metrics["total_params"],
            "train_time_s": metrics["train_time_s"], "step_time_s": clock.step_time(),
            "step_cpu_s": clock.step_time(cpu=True), "steps": metrics["steps"], "steps_run": metrics["steps_run"],
            "kept_step": metrics["kept_step"],
            "dev_curve": [[h["step"], round(h["eval_macro_f1"], 4)] for h in metrics.get("history", [])
                          if "eval_macro_f1" in h],
            "train_loss": metrics["train_loss"], "bridge_blocks": metrics.get("bridge_blocks"),
            "weights_dropped": bool(spec.get("drop_weights")),
            **({"modules_chosen": metrics["module_selection"]["chosen"]} if "module_selection" in metrics else {}),
            "test_predictions": {"y_true": test["y_true"], "y_pred": test["y_pred"]}}


def _suite_result(spec: dict, out: str, cfg, metrics: dict, clock) -> dict:
    from ...models import load_tokenizer

    t0 = time.time()
    scored = _score_suite(clock.model, load_tokenizer(out), spec["tests"], cfg.max_seq_len, cfg.max_new_tokens)
    if spec.get("drop_weights"):
        (Path(out) / "model.safetensors").unlink(missing_ok=True)
    return {"dev": {k: metrics["eval"][k] for k in ("accuracy", "accuracy_loglik", "accuracy_cloze", "answered",
                                                    "examples") if k in metrics["eval"]},
            **scored, "score_time_s": round(time.time() - t0, 2),
            "trainable_params": metrics["trainable_params"], "total_params": metrics["total_params"],
            "train_time_s": metrics["train_time_s"], "step_time_s": clock.step_time(),
            "step_cpu_s": clock.step_time(cpu=True), "steps": metrics["steps"], "steps_run": metrics["steps_run"],
            "kept_step": metrics["kept_step"],
            "dev_curve": [[h["step"], round(h["eval_loss"], 4)] for h in metrics.get("history", []) if "eval_loss" in h],
            "train_loss": metrics["train_loss"], "bridge_blocks": metrics.get("bridge_blocks"),
            "weights_dropped": bool(spec.get("drop_weights"))}


RUNNERS = {"pretrain": _run_pretrain, "ncl": _run_ncl, "mode-pretrain": _run_mode, "mode-compose": _run_mode,
           "merge": _run_merge, "lm-eval": _run_lm_eval, "finetune": _run_finetune,
           "score": _run_score}


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

    from ...training import quiet

    torch.set_num_threads(payload["threads"])
    quiet()
    t0, c0 = time.time(), _cpu_s()
    try:
        out = RUNNERS[payload["kind"]](payload["spec"], payload["out"])
    except Exception as e:  # reported per job; jobs that do not need it still run
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    return {**out, "status": "done", "wall_s": round(time.time() - t0, 2), "cpu_s": round(_cpu_s() - c0, 2),
            "peak_rss_mb": _peak_rss_mb(),
            "threads": payload["threads"], "finished": time.strftime(STAMP)}

