"""The shared step loop of fused training: every step, one batch of each active domain through the
routed base (in passes of `stack` domains, `parallel` of them at once), then each domain's own
unscale, clip, optimizer step and schedule. A domain that fails stops; the others go on."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch

from ..lm import _plain_head, next_token_loss, next_token_pairs
from .fused_routing import _routed, _Rows, _threads_each, domains_per_pass


class FusedSteps:
    """What the passes of every step share: the rows routed to each domain's LoRA, each domain's
    parameters, the fp16 loss scaler, the autocast and the device; `fail` as `pretrain_fused` takes it."""

    def __init__(self, peft, runs: list, params: dict, device, dtype: str, fail=None):
        self.peft, self.runs, self.params, self.device, self.fail = peft, runs, params, device, fail
        self.causal, self.head = _plain_head(peft)
        self.rows = _Rows()
        self.autocast = runs[0]["trainer"].accelerator.autocast
        # fp16 gradients underflow without loss scaling: one scaler over every domain's optimizer (each is
        # unscaled and stepped, or skipped on inf, on its own; the scale is updated once per step)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None
        self.step = 0

    def run(self, failed, stack: int | None, parallel: int, progress: bool) -> None:
        """Every step until each domain has taken its steps or failed (`failed(cfg, error)` records it)."""
        from tqdm.auto import tqdm

        self.peft.to(self.device).train()
        active = list(self.runs)
        bar = tqdm(total=max(r["steps"] for r in self.runs), desc="fused steps", disable=not progress)
        pool = ThreadPoolExecutor(parallel, thread_name_prefix="domix-fused") if parallel > 1 else None
        with _routed(self.peft, self.rows), pool or nullcontext(), _threads_each(parallel):
            while active:
                group = self._fetch(active, failed)
                step_loss = {id(r): 0.0 for r, _, _ in group}
                for r, e in self._backward(group, step_loss, domains_per_pass(len(group), stack, parallel), pool):
                    failed(r["cfg"], e)  # this domain stops, the others go on
                    active.remove(r)
                    self._drop_grads(r)
                self._optimize(group, step_loss, active, failed)
                self.step += 1
                bar.update()
        bar.close()

    def _fetch(self, active: list, failed) -> list:
        """The step's [(run, samples, token count)], each active domain's next batch (if that fails, it stops)."""
        group = []
        for r in list(active):
            try:
                if self.fail:
                    self.fail(r["cfg"].domain, self.step, "batch")
                samples, n_items = next(r["batches"])
                group.append((r, samples, n_items))
            except Exception as e:  # noqa: BLE001 — this domain stops, the others go on
                failed(r["cfg"], e)
                active.remove(r)
        return group

    def _backward(self, group: list, step_loss: dict, per: int, pool) -> list:
        """The step's passes, `per` domains each, in turn or in `pool`; returns [(run, exception)] of the failed."""
        micro = max((len(s) for _, s, _ in group), default=0)
        chunks = [group[i:i + per] for i in range(0, len(group), per)]
        if pool is None:
            return [x for chunk in chunks for x in self._isolated(chunk, micro, step_loss)]
        return [x for got in pool.map(self._isolated, chunks, [micro] * len(chunks), [step_loss] * len(chunks))
                for x in got]

    def _passes(self, chunk: list, micro: int, step_loss: dict) -> None:
        """Forward and backward passes of one chunk of domains, micro-batch after micro-batch."""
        device, scaler = self.device, self.scaler
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
            self.rows.spans = spans
            with self.autocast():
                decoder = self.causal.get_decoder()
                hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                total = 0.0
                for (r, _, n), (_, s, e) in zip(parts, spans):  # each domain's loss, as `pretrain`'s
                    if self.fail:
                        self.fail(r["cfg"].domain, self.step, "pass")
                    loss = next_token_loss(*next_token_pairs(hidden[s:e], labels[s:e]), self.head.weight, n)
                    step_loss[id(r)] += loss.item()  # the step's loss, as the Trainer sums it
                    total = total + loss
            (scaler.scale(total) if scaler else total).backward()

    def _isolated(self, chunk: list, micro: int, step_loss: dict) -> list:
        """`_passes` of a chunk; if it raises, again one domain at a time (its gradients and loss reset), so
        that only a domain that fails alone stops. Returns [(run, exception)] of the domains that failed."""
        try:
            self._passes(chunk, micro, step_loss)
            return []
        except Exception as e:  # noqa: BLE001 — which domain? each alone says
            if len(chunk) == 1:
                return [(chunk[0][0], e)]
        lost = []
        for item in chunk:
            self._drop_grads(item[0])
            step_loss[id(item[0])] = 0.0
        for item in chunk:
            try:
                self._passes([item], micro, step_loss)
            except Exception as e:  # noqa: BLE001
                lost.append((item[0], e))
        return lost

    def _optimize(self, group: list, step_loss: dict, active: list, failed) -> None:
        """Each active domain of the step unscales, clips, steps and schedules alone; then the scale is updated."""
        scaler = self.scaler
        for r, _, _ in group:
            if r not in active:
                continue
            t, name = r["trainer"], r["cfg"].domain
            try:
                if scaler:
                    scaler.unscale_(t.optimizer)
                if t.args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params[name], t.args.max_grad_norm)
                scaler.step(t.optimizer) if scaler else t.optimizer.step()
                t.lr_scheduler.step()
                self._drop_grads(r)
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

    def _drop_grads(self, r: dict) -> None:
        """The gradients of run `r`'s domain, gone."""
        for p in self.params[r["cfg"].domain]:
            p.grad = None

