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
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..io import atomic_dir, write_json
from .store import META, Library, entry_name

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


def _cast_input(module, x, dtype):
    """The input cast PEFT's LoRA forward applies before A: its private `_cast_input_dtype` (PEFT 0.15
    and later: it may leave the input as it is), else the plain cast of the versions before it."""
    cast = getattr(module, "_cast_input_dtype", None)
    return cast(x, dtype) if cast is not None else x.to(dtype)


class _Rows:
    """Which rows of the stacked batch belong to which domain, read by the LoRA hooks; per thread,
    since with `parallel` threads each runs passes of its own domains."""

    def __init__(self):
        self._local = threading.local()

    @property
    def spans(self) -> list[tuple[str, int, int]]:
        return getattr(self._local, "spans", [])

    @spans.setter
    def spans(self, value: list[tuple[str, int, int]]) -> None:
        self._local.spans = value

    def hook(self, module, args, output):
        x = args[0]
        parts = []
        for name, s, e in self.spans:
            if name not in module.lora_A:  # this domain's LoRA does not adapt this layer
                parts.append(output[s:e])
                continue
            xa = _cast_input(module, x[s:e], module.lora_A[name].weight.dtype)
            delta = module.lora_B[name](module.lora_A[name](module.lora_dropout[name](xa))) * module.scaling[name]
            parts.append((output[s:e] + delta).to(output.dtype))  # as PEFT's LoRA forward adds it
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@contextmanager
def _routed(peft_model, rows: _Rows):
    """PEFT's adapter path off, each row through its own domain's LoRA (hooks on every LoRA layer).

    The layers' own flag is set, not `disable_adapter()`: that also sets `requires_grad=False` on
    every adapter, and re-enabling trains only the active one."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    handles = [m.register_forward_hook(rows.hook) for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m in layers:
            m._disable_adapters = False
        for h in handles:
            h.remove()


@contextmanager
def _threads_each(parallel: int):
    """Within: the intra-op threads shared out between `parallel` threads running passes at once,
    not multiplied (each thread's operators take their own team of that many)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // parallel))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batches(trainer, loader, device):
    """The separate run's optimizer steps of one domain: its Trainer's `loader`, epoch after epoch
    (`set_epoch` as `Trainer.train` sets it), in `get_batch_samples` groups with their token count."""
    ga = trainer.args.gradient_accumulation_steps
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        inner = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)
        it, n = iter(loader), len(loader)
        for start in range(0, n, ga):
            yield trainer.get_batch_samples(it, min(ga, n - start), device)
        epoch += 1


def _history(losses: list[float], every: int) -> list[dict]:
    """The Trainer's `loss_history` from a run's per-step losses: every `every` steps, the mean
    loss of the steps since the last entry (rounded as the Trainer logs it)."""
    return [{"step": k, "loss": round(sum(losses[k - every:k]) / every, 4)}
            for k in range(every, len(losses) + 1, every)]


def domains_per_pass(domains: int, stack: int | None, parallel: int = 1) -> int:
    """How many of `domains` share one forward pass: `stack`, or by default all of them shared out
    between the `parallel` threads."""
    return stack or max(1, -(-domains // parallel))


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
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import set_seed

    from ..checkpoints import resolve_base
    from ..data.corpus import load_documents, pack, pack_heldout, split_heldout
    from ..lm import _plain_head, lm_collator, lm_loss, next_token_loss, next_token_pairs
    from ..models import fingerprint, load_model, load_tokenizer, target_regex
    from ..training import build_trainer, run_record, run_seed, setup, total_steps

    check_fusable(configs)
    if stack is not None and stack < 1:
        raise ValueError(f"--fused-stack must be at least 1, not {stack}")
    if parallel < 1:
        raise ValueError(f"--fused-parallel must be at least 1, not {parallel}")
    if parallel > 1 and (dropped := [c.domain for c in configs if c.dropout]):
        raise ValueError(f"--fused-parallel runs domains in threads that would share the random stream of LoRA "
                         f"dropout ({', '.join(dropped)}): train them with dropout 0 or without --fused-parallel")
    from .pretrain_all import _module_complete

    results, todo = {}, []
    for c in configs:
        if (meta := _module_complete(c)) is not None:
            results[c.domain] = {"domain": c.domain, "status": "skipped", "meta": meta}
        else:
            todo.append(c)
    if not todo:
        return {c.domain: results[c.domain] for c in configs}

    def failed(c, e: BaseException) -> None:
        results[c.domain] = {"domain": c.domain, "status": "failed", "error": f"{type(e).__name__}: {e}",
                             "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))}

    first = todo[0]
    device = setup(first)
    t0 = time.time()
    tokenizer = load_tokenizer(first.base, first.trust_remote_code)
    model, objective = load_model(first.base, head="lm", objective=first.objective, dtype=first.dtype,
                                  trust_remote_code=first.trust_remote_code)
    if objective != "clm" or _plain_head(model) is None:
        raise ValueError("--fused trains next-token modules of a decoder with a plain LM head; train "
                         f"{first.base} without --fused")
    base_fp = fingerprint(model)
    model.to(device)  # the held-out scores too run where training does
    collator = lm_collator(tokenizer, objective)

    # -- each domain's data, as `pretrain` prepares it; a domain whose data fails is reported
    runs = []
    for c in todo:
        try:
            entry_name(c.domain, "domain")
            docs = load_documents(c.data, c.text_field)
            train_docs, held_docs = split_heldout(docs)
            blocks = pack(train_docs, tokenizer, c.seq_len)
            held = pack_heldout(held_docs, tokenizer, c.seq_len, max_blocks=c.eval_blocks)
            base_held = lm_loss(model, held, tokenizer, objective, c.batch_size, seed=0) if held else None
            runs.append({"cfg": c, "seed": run_seed(c.domain, c.seed), "blocks": blocks, "held": held,
                         "docs": (len(train_docs), len(held_docs)), "base_held": base_held,
                         "steps": total_steps(c, len(blocks))})
        except Exception as e:  # noqa: BLE001 — reported per domain
            failed(c, e)

    # -- the adapters, each initialised where `pretrain` initialises its own
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
    if peft is None:
        return {c.domain: results[c.domain] for c in configs}
    params = {r["cfg"].domain: [] for r in runs}
    for n, p in peft.named_parameters():
        if (m := _LORA_PARAM.search(n)) and m["adapter"] in params:
            params[m["adapter"]].append(p)

    # -- each domain's Trainer (never trained): the separate run's data order, optimizer, schedule
    work = Path(tempfile.mkdtemp(prefix=".fused-", dir=Library(first.library).path
                                 if Library(first.library).path.is_dir() else None))
    try:
        for r in runs:
            c, name = r["cfg"], r["cfg"].domain
            for n, ps in params.items():
                for p in ps:
                    p.requires_grad_(n == name)  # the optimizer takes what requires grad
            trainer = build_trainer(peft, c, work=work / name, train_dataset=r["blocks"], steps=r["steps"],
                                    seed=r["seed"], data_collator=collator, lm_objective=objective, logs=False)
            trainer.create_optimizer_and_scheduler(num_training_steps=r["steps"])
            set_seed(r["seed"])  # `Trainer.train` seeds before it builds its loader
            loader = trainer.get_train_dataloader()
            r.update(trainer=trainer, batches=_batches(trainer, loader, device), losses=[])
        for ps in params.values():
            for p in ps:
                p.requires_grad_(True)

        causal, head = _plain_head(peft)
        rows = _Rows()
        peft.to(device).train()
        autocast = runs[0]["trainer"].accelerator.autocast
        # fp16 gradients underflow without loss scaling: one scaler over every domain's optimizer (each is
        # unscaled and stepped, or skipped on inf, on its own; the scale is updated once per step)
        scaler = torch.amp.GradScaler(device.type) if first.dtype == "fp16" else None

        def passes(chunk: list, micro: int, step_loss: dict) -> None:
            """Forward and backward passes of one chunk of domains, micro-batch after micro-batch."""
            for k in range(micro):
                parts = [(r, s[k], n) for r, s, n in chunk if k < len(s)]
                if not parts:
                    continue
                ids = torch.cat([b["input_ids"] for _, b, _ in parts]).to(device)
                labels = torch.cat([b["labels"] for _, b, _ in parts]).to(device)
                mask = torch.cat([b["attention_mask"] for _, b, _ in parts]).to(device)
                spans, start = [], 0
                for r, b, _ in parts:
                    spans.append((r["cfg"].domain, start, start + len(b["input_ids"])))
                    start += len(b["input_ids"])
                rows.spans = spans
                with autocast():
                    hidden = causal.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                    total = 0.0
                    for (r, _, n), (_, s, e) in zip(parts, spans):  # each domain's loss, as `pretrain`'s
                        if fail:
                            fail(r["cfg"].domain, step, "pass")
                        loss = next_token_loss(*next_token_pairs(hidden[s:e], labels[s:e]), head.weight, n)
                        step_loss[id(r)] += loss.item()  # the step's loss, as the Trainer sums it
                        total = total + loss
                (scaler.scale(total) if scaler else total).backward()

        def isolated(chunk: list, micro: int, step_loss: dict) -> list:
            """`passes` of a chunk; if it raises, again one domain at a time (its gradients and loss reset), so
            that only a domain that fails alone stops. Returns [(run, exception)] of the domains that failed."""
            try:
                passes(chunk, micro, step_loss)
                return []
            except Exception as e:  # noqa: BLE001 — which domain? each alone says
                if len(chunk) == 1:
                    return [(chunk[0][0], e)]
            lost = []
            for item in chunk:
                for p in params[item[0]["cfg"].domain]:
                    p.grad = None
                step_loss[id(item[0])] = 0.0
            for item in chunk:
                try:
                    passes([item], micro, step_loss)
                except Exception as e:  # noqa: BLE001
                    lost.append((item[0], e))
            return lost

        active = list(runs)
        bar = tqdm(total=max(r["steps"] for r in runs), desc="fused steps", disable=not progress)
        step = 0
        pool = ThreadPoolExecutor(parallel, thread_name_prefix="domix-fused") if parallel > 1 else None
        with _routed(peft, rows), pool or nullcontext(), _threads_each(parallel):
            while active:
                group = []
                for r in list(active):
                    try:
                        if fail:
                            fail(r["cfg"].domain, step, "batch")
                        samples, n_items = next(r["batches"])
                        group.append((r, samples, n_items))
                    except Exception as e:  # noqa: BLE001 — this domain stops, the others go on
                        failed(r["cfg"], e)
                        active.remove(r)
                micro = max((len(s) for _, s, _ in group), default=0)
                step_loss = {id(r): 0.0 for r, _, _ in group}
                per = domains_per_pass(len(group), stack, parallel)
                chunks = [group[i:i + per] for i in range(0, len(group), per)]
                if pool is None:
                    lost = [x for chunk in chunks for x in isolated(chunk, micro, step_loss)]
                else:
                    lost = [x for got in pool.map(isolated, chunks, [micro] * len(chunks), [step_loss] * len(chunks))
                            for x in got]
                for r, e in lost:  # this domain stops, the others go on
                    failed(r["cfg"], e)
                    active.remove(r)
                    for p in params[r["cfg"].domain]:
                        p.grad = None
                for r, _, _ in group:
                    if r not in active:
                        continue
                    t, name = r["trainer"], r["cfg"].domain
                    try:
                        if scaler:
                            scaler.unscale_(t.optimizer)
                        if t.args.max_grad_norm > 0:
                            torch.nn.utils.clip_grad_norm_(params[name], t.args.max_grad_norm)
                        scaler.step(t.optimizer) if scaler else t.optimizer.step()
                        t.lr_scheduler.step()
                        for p in params[name]:
                            p.grad = None
                    except Exception as e:  # noqa: BLE001
                        failed(r["cfg"], e)
                        active.remove(r)
                        continue
                    r["losses"].append(step_loss[id(r)])
                    r["done"] = r.get("done", 0) + 1
                    if r["done"] >= r["steps"]:
                        active.remove(r)
                if scaler and any(r in active or r.get("done", 0) >= r["steps"] for r, _, _ in group):
                    scaler.update()  # after the domains' steps (none stepped: nothing to update)
                step += 1
                bar.update()
        bar.close()
        train_time = time.time() - t0

        # -- score and write every module that finished, as `pretrain` does
        peft.eval()
        for r in runs:
            c, name = r["cfg"], r["cfg"].domain
            if name in results:  # failed
                continue
            try:
                peft.set_adapter(name)
                held = lm_loss(peft, r["held"], tokenizer, objective, c.batch_size, seed=0) if r["held"] else None
                meta = {
                    "kind": "lora", "domain": name, "base": c.base, "base_fingerprint": base_fp, "objective": objective,
                    "rank": c.rank, "alpha": c.alpha, "targets": c.targets,
                    "target_modules": peft.peft_config[name].target_modules, "seed": c.seed, "module_seed": r["seed"],
                    "data": [str(p) for p in c.data], "documents": r["docs"][0], "heldout_documents": r["docs"][1],
                    **run_record(c, steps=r["steps"], seq_len=c.seq_len, processes=1,
                                 train_loss=sum(r["losses"]) / max(1, len(r["losses"])),
                                 loss_history=_history(r["losses"], r["trainer"].args.logging_steps),
                                 trainable_params=sum(p.numel() for p in params[name]), t0=t0,
                                 train_time=train_time, device=device),
                    "fused": {"domains": [x["cfg"].domain for x in runs], "train_time_s": round(train_time, 2)},
                    "heldout_loss": held["loss"] if held else None, "heldout_tokens": held["tokens"] if held else 0,
                    "base_heldout_loss": r["base_held"]["loss"] if r["base_held"] else None, **c.extra,
                }
                with atomic_dir(Library(c.library).path / name, overwrite=c.overwrite) as stage:
                    tmp = stage / ".adapter"
                    peft.save_pretrained(tmp, selected_adapters=[name])
                    saved = tmp / name if (tmp / name).is_dir() else tmp  # PEFT nests adapters other than "default"
                    for f in saved.iterdir():
                        if f.is_file():
                            shutil.move(str(f), stage / f.name)
                    shutil.rmtree(tmp)
                    write_json(stage / META, meta)
                results[name] = {"domain": name, "status": "done", "meta": meta}
            except Exception as e:  # noqa: BLE001
                failed(c, e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {c.domain: results[c.domain] for c in configs}
