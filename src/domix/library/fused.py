"""`pretrain-all --fused`: the LoRA modules of a config trained in one process that holds the frozen
base once.

Every step stacks one batch of each domain; the base runs once over all rows (one GEMM per layer
for every domain), and each row passes through its own domain's LoRA only (a thin product per
domain, added by a forward hook on PEFT's LoRA layers while PEFT's own adapter path is off). Each
domain's loss is the chunked next-token loss of its rows, so the summed loss gives each module
exactly its own gradient; each module then clips, steps and schedules alone.

A module equals the one `pretrain` trains separately, to float tolerance: each domain has its
own transformers `Trainer` (built as `pretrain` builds it, never trained) that supplies what
the separate run's Trainer uses — its data loader and epochs, its token count per step, its
optimizer and schedule — and its adapter is initialised right after `set_seed(module_seed)`, as
`get_peft_model` initialises it there. On our CPU (fp32, one thread) the modules came out bitwise
equal to the separate runs; in general equality is to float tolerance, since a matrix product
over the stacked rows may be blocked differently than over one domain's rows (more threads, GPUs).

With `parallel` P > 1 the passes of different domains run at the same time in P threads of the
one process, each on its own share of the cores (`--threads` / P intra-op threads), still over
the one copy of the base: on CPUs, where a single process's extra intra-op threads mostly wait
on each other, this is what makes one job as fast as separate processes. Each domain's passes
stay in one thread, in order, so its module is the same as with P = 1.

Next-token (decoder) bases only: masked-LM masking draws from the global random stream inside
the collator, which interleaved domains would share (as LoRA dropout would, which threads refuse).
"""
from __future__ import annotations

import re
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_dir, write_json
from .fused_routing import _batches, domains_per_pass
from .fused_steps import FusedSteps
from .store import META, Library, entry_name

__all__ = ["check_fusable", "domains_per_pass", "pretrain_fused"]  # domains_per_pass: from fused_routing

SAME = ("base", "seq_len", "dtype", "device", "objective", "trust_remote_code")
_LORA_PARAM = re.compile(r"\.lora_[AB]\.(?P<adapter>[^.]+)\.weight$")


def check_fusable(configs: list) -> None:
    """Refuse configs one fused job cannot train together, naming what differs."""
    for key in SAME:
        values = {getattr(c, key) for c in configs}
        if len(values) > 1:
            by = "; ".join(f"{c.domain}: {getattr(c, key)}" for c in configs)
            hint = " (group the domains by seq_len into separate runs)" if key == "seq_len" else ""
            raise ValueError(f"--fused trains domains of one {key} together; these differ ({by}){hint}")
    for c in configs:
        if c.full:
            raise ValueError(f"--fused trains LoRA modules; domain '{c.domain}' is full-weight (full: true)")
        if c.resume:
            raise ValueError("--fused runs are not resumable: rerun without --resume (finished modules are kept)")
        if c.gradient_checkpointing:
            raise ValueError("--fused does not recompute activations (--gradient-checkpointing): train without it")


def pretrain_fused(configs: list, progress: bool = True, fail=None, stack: int | None = None,
                   parallel: int = 1) -> dict:
    """Train the LoRA modules of `configs` (PretrainConfig, one base) in one process and write
    each library entry as `pretrain` writes it. Returns {domain: {"domain", "status", "meta" |
    "error"}}: a domain that fails (its data, or mid-run) is reported and the others finish.

    `stack`: how many domains' batches share one forward and backward pass (default: all, shared
    out between the `parallel` threads). The activations held at once grow with it; with 1 the
    domains take turns through the one base, whose weights are still held once. `parallel`: how
    many of those passes run at the same time, in threads that share the cores. The modules are
    the same either way (to float tolerance).
    In fp16 the shared backward is loss-scaled (one `GradScaler` over every domain's optimizer), as the
    Trainer scales a separate run's. A pass that raises is run again one domain at a time, so that only the
    domain that fails stops. `fail(domain, step, where)` (tests) may raise to simulate a failure of a
    domain's step: fetching its batch (`where="batch"`) or inside the shared pass (`"pass"`)."""
    from ..training import setup

    _check_options(configs, stack, parallel)
    results, todo = _skip_finished(configs)
    if not todo:
        return results.of(configs)
    first = todo[0]
    device = setup(first)
    t0 = time.time()
    base = _load_base(first, device)
    runs = _prepare(todo, base, results)
    peft = _add_adapters(base.model, runs)
    if peft is None:
        return results.of(configs)
    params = _lora_params(peft, runs)
    work = _work_dir(first)
    try:
        _build_trainers(peft, runs, params, base, work)
        FusedSteps(peft, runs, params, device, first.dtype, fail).run(results.failed, stack, parallel, progress)
        _write_modules(peft, runs, params, base, results, t0, train_time=time.time() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results.of(configs)


class _Results(dict):
    """Each domain's result by name: skipped, failed (with its error and traceback) or done."""

    def failed(self, c, e: BaseException) -> None:
        """Record that the domain of `c` failed with `e`."""
        self[c.domain] = {"domain": c.domain, "status": "failed", "error": f"{type(e).__name__}: {e}",
                          "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))}

    def of(self, configs: list) -> dict:
        """The results of `configs`, in their order."""
        return {c.domain: self[c.domain] for c in configs}


@dataclass
class _Base:
    """The frozen base every domain shares, loaded once, and what goes with it."""

    tokenizer: object
    model: object
    objective: str
    fingerprint: str
    collator: object
    device: object


def _check_options(configs: list, stack: int | None, parallel: int) -> None:
    """Refuse what one fused job cannot do: configs that differ, `stack` or `parallel` under 1, dropout in threads."""
    check_fusable(configs)
    if stack is not None and stack < 1:
        raise ValueError(f"--fused-stack must be at least 1, not {stack}")
    if parallel < 1:
        raise ValueError(f"--fused-parallel must be at least 1, not {parallel}")
    if parallel > 1 and (dropped := [c.domain for c in configs if c.dropout]):
        raise ValueError(f"--fused-parallel runs domains in threads that would share the random stream of LoRA "
                         f"dropout ({', '.join(dropped)}): train them with dropout 0 or without --fused-parallel")


def _skip_finished(configs: list) -> tuple[_Results, list]:
    """The modules already in their library, as skipped results, and the configs still to train."""
    from .pretrain_all import _module_complete

    results, todo = _Results(), []
    for c in configs:
        if (meta := _module_complete(c)) is not None:
            results[c.domain] = {"domain": c.domain, "status": "skipped", "meta": meta}
        else:
            todo.append(c)
    return results, todo


def _load_base(c, device) -> _Base:
    """The base of `c` on `device`, refused unless it is a decoder with a plain LM head."""
    from ..lm import _plain_head, lm_collator
    from ..models import fingerprint, load_model, load_tokenizer

    tokenizer = load_tokenizer(c.base, c.trust_remote_code)
    model, objective = load_model(c.base, head="lm", objective=c.objective, dtype=c.dtype,
                                  trust_remote_code=c.trust_remote_code)
    if objective != "clm" or _plain_head(model) is None:
        raise ValueError("--fused trains next-token modules of a decoder with a plain LM head; train "
                         f"{c.base} without --fused")
    base_fp = fingerprint(model)
    model.to(device)  # the held-out scores too run where training does
    return _Base(tokenizer, model, objective, base_fp, lm_collator(tokenizer, objective), device)


def _prepare(todo: list, base: _Base, results: _Results) -> list[dict]:
    """Each domain's run, its data prepared as `pretrain` prepares it; a domain whose data fails is reported."""
    from ..data.corpus import prepare_corpus
    from ..lm import lm_loss
    from ..training import run_seed, total_steps

    runs = []
    for c in todo:
        try:
            entry_name(c.domain, "domain")
            corpus = prepare_corpus(c, base.tokenizer)
            held = corpus.heldout
            base_held = lm_loss(base.model, held, base.tokenizer, base.objective, c.batch_size, seed=0) if held else None
            runs.append({"cfg": c, "seed": run_seed(c.domain, c.seed), "blocks": corpus.train, "held": held,
                         "docs": (corpus.documents, corpus.heldout_documents), "base_held": base_held,
                         "steps": total_steps(c, len(corpus.train))})
        except Exception as e:  # noqa: BLE001 — reported per domain
            results.failed(c, e)
    return runs


def _add_adapters(model, runs: list):
    """The PEFT model with each run's adapter, initialised where `pretrain` initialises its own; None without runs."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from ..checkpoints import resolve_base
    from ..models import target_regex

    peft = None
    regex = {r["cfg"].targets: target_regex(model, r["cfg"].targets) for r in runs}  # of the plain model
    for r in runs:
        c = r["cfg"]
        set_seed(r["seed"])
        lcfg = LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, bias="none", task_type="CAUSAL_LM",
                          target_modules=regex[c.targets])
        if peft is None:
            peft = get_peft_model(model, lcfg, adapter_name=c.domain)
        else:
            peft.add_adapter(c.domain, lcfg)
        peft.peft_config[c.domain].base_model_name_or_path = resolve_base(c.base)
    return peft


def _lora_params(peft, runs: list) -> dict:
    """Each run's LoRA parameters, by domain."""
    params = {r["cfg"].domain: [] for r in runs}
    for n, p in peft.named_parameters():
        if (m := _LORA_PARAM.search(n)) and m["adapter"] in params:
            params[m["adapter"]].append(p)
    return params


def _work_dir(c) -> Path:
    """A scratch folder for the Trainers' output, in the library when it exists."""
    library = Library(c.library).path
    return Path(tempfile.mkdtemp(prefix=".fused-", dir=library if library.is_dir() else None))


def _build_trainers(peft, runs: list, params: dict, base: _Base, work: Path) -> None:
    """Each domain's Trainer (never trained): the separate run's data order, optimizer, schedule."""
    from transformers import set_seed

    from ..training import build_trainer

    for r in runs:
        c, name = r["cfg"], r["cfg"].domain
        for n, ps in params.items():
            for p in ps:
                p.requires_grad_(n == name)  # the optimizer takes what requires grad
        trainer = build_trainer(peft, c, work=work / name, train_dataset=r["blocks"], steps=r["steps"],
                                seed=r["seed"], data_collator=base.collator, lm_objective=base.objective, logs=False)
        trainer.create_optimizer_and_scheduler(num_training_steps=r["steps"])
        set_seed(r["seed"])  # `Trainer.train` seeds before it builds its loader
        loader = trainer.get_train_dataloader()
        r.update(trainer=trainer, batches=_batches(trainer, loader, base.device), losses=[])
    for ps in params.values():
        for p in ps:
            p.requires_grad_(True)


def _write_modules(peft, runs: list, params: dict, base: _Base, results: _Results, t0: float,
                   train_time: float) -> None:
    """Score and write every module that finished, as `pretrain` does."""
    peft.eval()
    for r in runs:
        c, name = r["cfg"], r["cfg"].domain
        if name in results:  # failed
            continue
        try:
            peft.set_adapter(name)
            meta = _meta(peft, r, runs, params[name], base, t0, train_time)
            _save(peft, c, name, meta)
            results[name] = {"domain": name, "status": "done", "meta": meta}
        except Exception as e:  # noqa: BLE001
            results.failed(c, e)


def _meta(peft, r: dict, runs: list, params: list, base: _Base, t0: float, train_time: float) -> dict:
    """The library record of run `r`'s finished module (its adapter active), with its held-out loss."""
    from ..lm import lm_loss
    from ..training import run_record

    c, name = r["cfg"], r["cfg"].domain
    held = lm_loss(peft, r["held"], base.tokenizer, base.objective, c.batch_size, seed=0) if r["held"] else None
    return {
        "kind": "lora", "domain": name, "base": c.base, "base_fingerprint": base.fingerprint,
        "objective": base.objective, "rank": c.rank, "alpha": c.alpha, "targets": c.targets,
        "target_modules": peft.peft_config[name].target_modules, "seed": c.seed, "module_seed": r["seed"],
        "data": [str(p) for p in c.data], "documents": r["docs"][0], "heldout_documents": r["docs"][1],
        **run_record(c, steps=r["steps"], seq_len=c.seq_len, processes=1,
                     train_loss=sum(r["losses"]) / max(1, len(r["losses"])),
                     loss_history=_history(r["losses"], r["trainer"].args.logging_steps),
                     trainable_params=sum(p.numel() for p in params), t0=t0,
                     train_time=train_time, device=base.device),
        "fused": {"domains": [x["cfg"].domain for x in runs], "train_time_s": round(train_time, 2)},
        "heldout_loss": held["loss"] if held else None, "heldout_tokens": held["tokens"] if held else 0,
        "base_heldout_loss": r["base_held"]["loss"] if r["base_held"] else None, **c.extra,
    }


def _save(peft, c, name: str, meta: dict) -> None:
    """Write the adapter `name` and its record `meta` as the library entry `pretrain` writes."""
    with atomic_dir(Library(c.library).path / name, overwrite=c.overwrite) as stage:
        tmp = stage / ".adapter"
        peft.save_pretrained(tmp, selected_adapters=[name])
        saved = tmp / name if (tmp / name).is_dir() else tmp  # PEFT nests adapters other than "default"
        for f in saved.iterdir():
            if f.is_file():
                shutil.move(str(f), stage / f.name)
        shutil.rmtree(tmp)
        write_json(stage / META, meta)


def _history(losses: list[float], every: int) -> list[dict]:
    """The Trainer's `loss_history` from a run's per-step losses: every `every` steps, the mean
    loss of the steps since the last entry (rounded as the Trainer logs it)."""
    return [{"step": k, "loss": round(sum(losses[k - every:k]) / every, 4)}
            for k in range(every, len(losses) + 1, every)]
