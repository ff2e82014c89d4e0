"""How MoDE blocks run inside a Hugging Face model: the forward hooks that feed them the
backbone's hidden states and call arguments, the remembered attention mask, and the room
their layers take in the KV cache (`ModeHooks`, the wiring half of `layer.Mode`).

The backbone is never rewritten: the block is attached with forward hooks (the first layer
of the block remembers x, the last layer's output is replaced by y), so the layer list, the
config, the state-dict keys and the base fingerprint all stay the base model's, and every head
(causal LM, masked LM, classification) works unchanged. Expert layer i is made like backbone
layer `expert_sources(span, k)[i]` (copied from it, or of its kind) and receives exactly the
arguments that layer receives (attention mask, rotary position embeddings, position ids,
cache): models such as Gemma-3 give sliding-window and full-attention layers different ones.
They use layer indices L, L+1, ... so their keys and values extend the same KV cache (with
cache entries of their source layers' kind) without touching the backbone's entries.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ..models import backbone


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer layers (e.g. `model.layers` of Llama, `encoder.layer` of BERT)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, mod in backbone(model).named_modules():
        if isinstance(mod, nn.ModuleList) and n and len(mod) == n and len({type(m) for m in mod}) == 1:
            return mod
    raise ValueError(f"cannot find the {n} transformer layers of {type(model).__name__}")


def expert_sources(span: tuple[int, int], k: int) -> list[int]:
    """The backbone layer each of a block's k expert layers is made like (copied from, or of the same
    kind: attention type, mask, rotary embeddings): the block's last k layers; with more expert layers
    than the block has, the first of them repeats."""
    start, end = span
    return [max(start, end - k + i) for i in range(k)]


def _output(out):
    """A layer's hidden states: transformers 5 layers return a tensor, older ones a tuple."""
    return out[0] if isinstance(out, tuple) else out


try:  # transformers >= 5 records hidden states/attentions with hooks on every layer of the class
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older transformers collect outputs in the model's loop
    _active_collector = None


@contextmanager
def _not_recorded():
    """Expert layers are of the backbone's class; keep them out of `output_hidden_states`/`attentions`."""
    if _active_collector is None:
        yield
        return
    token = _active_collector.set(None)
    try:
        yield
    finally:
        _active_collector.reset(token)


def _reserve_cache(cache, num_layers: int, sources: list[int | None]) -> None:
    """Make room for the expert layers' keys/values after the backbone's in a transformers cache:
    `sources[c]` is the backbone layer whose kind of cache entry (full, or sliding-window as in
    Gemma-3's local layers) the expert layer with cache index `num_layers + c` needs (None: a
    full entry, for a gate's context)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise NotImplementedError(f"MoDE experts cannot use a {type(cache).__name__} cache; use DynamicCache")
    if getattr(cache, "layer_class_to_replicate", None) is not None:  # grows itself, one kind for every layer
        return
    while len(layers) < num_layers + len(sources):
        source = sources[len(layers) - num_layers]
        src = DynamicLayer() if source is None else layers[source]
        if type(src) is DynamicSlidingWindowLayer:
            layers.append(DynamicSlidingWindowLayer(sliding_window=src.sliding_window))
        elif type(src) is DynamicLayer:
            layers.append(DynamicLayer())
        else:
            raise NotImplementedError(f"MoDE experts cannot use a cache of {type(src).__name__} layers; use "
                                      "DynamicCache")


class ModeHooks:
    """The wiring of `layer.Mode` into a backbone: its `attach`/`detach`, the hooks they install,
    and switches for what its blocks' forwards record. Mixed into `Mode`, whose `layout`, `blocks`,
    `n_experts`, `gate_context` and hook state (`_handles`, `_inputs`, `_calls`, `_mask`) it uses."""

    def attach(self, layers: nn.ModuleList, model: nn.Module | None = None) -> None:
        """Hook the blocks into `layers`; a gate context "mean" also needs the `model` they belong
        to (to see its calls' attention masks)."""
        if self._handles:
            raise RuntimeError("this MoDE is already attached")
        if self.gate_context == "mean":
            if model is None:
                raise ValueError("gates with context 'mean' need the model (its attention mask): attach(layers, model)")
            # on the transformer body, which gets the mask both from the head's forward and from callers of
            # the body alone (`lm.lm_loss`): a mask remembered at the head would outlive its call there
            self._handles.append(backbone(model).register_forward_pre_hook(self._remember_mask, with_kwargs=True))
        k = self.layout.expert_layers
        for b, (start, end) in enumerate(self.layout.spans):
            for i in sorted({start, *expert_sources((start, end), k)}):
                self._handles.append(layers[i].register_forward_pre_hook(partial(self._enter, b, i, i == start),
                                                                         with_kwargs=True))
            # prepend: runs before any output-recording hook, so recorded hidden states are the mixed ones
            self._handles.append(layers[end - 1].register_forward_hook(partial(self._exit, b), with_kwargs=True,
                                                                       prepend=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()
        self._calls.clear()
        self._mask = None

    def _remember_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _enter(self, b: int, i: int, first: bool, module, args, kwargs):
        # hooks run once per forward even under gradient checkpointing (transformers checkpoints `forward`)
        if first:
            self._inputs[b] = args[0] if args else kwargs["hidden_states"]
        # hidden states were the first positional argument, or are dropped from kwargs
        self._calls[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})

    def _exit(self, b: int, module, args, kwargs, output):
        x = self._inputs.pop(b)
        span = self.layout.spans[b]
        calls = [self._calls[i] for i in expert_sources(span, self.layout.expert_layers)]
        for i in range(*span):
            self._calls.pop(i, None)
        cache = next((calls[-1][1][key] for key in ("cache", "past_key_values", "past_key_value")
                      if calls[-1][1].get(key) is not None), None)
        context = self.gate_context == "mean"
        index = None  # with a cache and context gates: the cache layer of this block's context
        if cache is not None:
            sources = self.cache_sources()
            _reserve_cache(cache, self.layout.num_layers, sources + [None] * len(self.blocks) * context)
            index = self.layout.num_layers + len(sources) + b
        y = self.blocks[b](x, _output(output), calls, mask=self._mask if context else None,
                           cache=cache if context else None, cache_index=index)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def cache_sources(self) -> list[int]:
        """For each expert layer in cache-index order (block, expert, layer; after the backbone's
        layers, as `make_expert` numbers them), the backbone layer it is made like. With gate
        context "mean", one cache layer per block follows them."""
        k = self.layout.expert_layers
        return [i for span in self.layout.spans for _ in range(self.n_experts) for i in expert_sources(span, k)]

    @contextmanager
    def recording_routing(self):
        """Within: every forward adds its tokens' gate weights; yields a function returning (when
        called inside) the mean weight of [backbone, *experts] over the tokens seen, averaged over
        the blocks."""
        for blk in self.blocks:
            blk.routing = []

        def mean() -> list[float]:
            per_block = [sum(s for s, _ in blk.routing) / max(1, sum(n for _, n in blk.routing))
                         for blk in self.blocks]
            return (sum(per_block) / len(per_block)).tolist()

        try:
            yield mean
        finally:
            for blk in self.blocks:
                blk.routing = None

    @contextmanager
    def routing_targets(self, route: torch.Tensor):
        """Within: forwards compute the routing loss of a batch whose row i comes from the corpus of
        expert `route[i]` (-1: of none). Yields a function returning (when called inside) its mean
        over the blocks, or None when no row had an expert."""
        for blk in self.blocks:
            blk.route, blk.route_losses = route, []

        def loss() -> torch.Tensor | None:
            losses = [t for blk in self.blocks for t in blk.route_losses]
            return torch.stack(losses).mean() if losses else None

        try:
            yield loss
        finally:
            for blk in self.blocks:
                blk.route, blk.route_losses = None, []
