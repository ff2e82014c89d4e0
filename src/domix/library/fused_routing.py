"""How fused training routes its work: each row of a stacked batch through its own domain's LoRA
(a hook on PEFT's LoRA layers), the domains shared out between passes and threads, and each domain's
optimizer steps in the order its separate run takes them."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch


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


def domains_per_pass(domains: int, stack: int | None, parallel: int = 1) -> int:
    """How many of `domains` share one forward pass: `stack`, or by default all of them shared out
    between the `parallel` threads."""
    return stack or max(1, -(-domains // parallel))
