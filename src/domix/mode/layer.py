"""The MoDE block: domain experts beside a frozen backbone block, mixed by a token-level gate.

The backbone's L layers are split into B contiguous blocks. Block b gets, per domain j, an
expert f_j of k layers of the backbone's own layer class, run on the block's input x, with a
d × d output map W_j, and a gate a(x) = softmax(V x̂ + c) with N+1 outputs (index 0 is the
backbone path; x̂ is x scaled to unit RMS per token, see `_rms`). The block's output is

    y = f_bb(x) + Σ_j a_j(x) · W_j (f_j(x) − f_bb(x))

which is the paper's mixture a_bb·f_bb(x) + Σ_j a_j·g_j(x) (the a's sum to one) with expert
outputs g_j(x) = f_bb(x) + W_j(f_j(x) − f_bb(x)): W_j = I gives exactly the paper's form
a_bb·f_bb(x) + Σ_j a_j·f_j(x). W_j starts at zero, as LoRA's B and ControlNet's zero
convolutions do: the starting model *is* the backbone (bit for bit), and the gradient of W_j
is a_j · (f_j(x) − f_bb(x)) ⊗ ∂L/∂y — of the size of the model's own activations from the first
step (an expert copied from the block's last k layers differs from the block's output) — so
after one step every expert parameter trains at full strength. (The earlier form
y + s·Σ_j a_j (f_j(x) − f_bb(x)) with a scalar s initialised to 0 gave the experts and the gate
no gradient at step one and scaled every later one by a small, slowly growing s.)

How the blocks are attached to the backbone (forward hooks, call arguments, KV cache): `hooks`.

With gate context "mean" (`ModeBlock.gate_input`) the gate reads [x̂, m] where m is the mean
x̂ over the tokens this token sees; the model's 2-D attention mask (remembered by a forward
pre-hook on the model) keeps padding out of m, and in decoding each block keeps its earlier
tokens' x̂ in one more cache layer after the experts'.

With gate form "routed" (`ModeBlock.weights`) the weights factor into a router and each
expert's own gate: a_j = p_j · q_j with p = softmax(V [x̂, m] + c) over the N experts (what the
text is) and q_j = sigmoid(u_j · x̂ + e_j) the per-token weight expert j's own 2-way gate gave it
alone (loaded with the expert; it trains with the expert), and a_bb = 1 − Σ_j a_j. A router
sure of domain j gives its tokens exactly expert j's own block outputs, so a composition only
has to learn which text is whose — a classification — instead of re-learning every expert's
per-token weights in one softmax.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .hooks import ModeHooks, _not_recorded, _output, expert_sources, find_layers

PAPER_BLOCKS, PAPER_EXPERT_LAYERS = 3, 2  # MoDE (arXiv 2410.10181): 18-layer backbone, 3 blocks x 2 expert layers


def default_layout(num_layers: int) -> tuple[int, int]:
    """(blocks, expert layers): the paper's 3 blocks x 2 layers (an expert is a third of its
    6-layer block), shrunk for shallow backbones so that an expert is at most a third of its
    block, and at least one layer. 30 layers -> (3, 2); 12 -> (3, 1); 4 -> (2, 1)."""
    blocks = min(PAPER_BLOCKS, max(1, num_layers // 2))
    return blocks, min(PAPER_EXPERT_LAYERS, max(1, (num_layers // blocks) // 3))


@dataclass(frozen=True)
class Layout:
    """Where the MoDE blocks sit in a backbone; an expert fits a model only under the same layout."""

    num_layers: int
    blocks: int
    expert_layers: int
    layer_class: str
    hidden_size: int

    def __post_init__(self):
        if not 1 <= self.blocks <= self.num_layers:
            raise ValueError(f"--blocks must be between 1 and the number of layers ({self.num_layers}), "
                             f"not {self.blocks}")
        if self.expert_layers < 1:
            raise ValueError(f"--expert-layers must be at least 1, not {self.expert_layers}")

    @property
    def spans(self) -> list[tuple[int, int]]:
        """[start, end) layer indices of each block; the first L mod B blocks hold one layer more."""
        size, extra = divmod(self.num_layers, self.blocks)
        out, start = [], 0
        for b in range(self.blocks):
            end = start + size + (b < extra)
            out.append((start, end))
            start = end
        return out

    def describe(self) -> str:
        return (f"{self.blocks} blocks x {self.expert_layers} expert layers over {self.num_layers} "
                f"{self.layer_class} layers of width {self.hidden_size}")

    def to_dict(self) -> dict:
        return {**asdict(self), "spans": [list(s) for s in self.spans]}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(**{k: d[k] for k in ("num_layers", "blocks", "expert_layers", "layer_class", "hidden_size")})


def layout_for(model: nn.Module, blocks: int | None = None, expert_layers: int | None = None) -> Layout:
    layers = find_layers(model)
    b, k = default_layout(len(layers))
    return Layout(num_layers=len(layers), blocks=blocks or b, expert_layers=expert_layers or k,
                  layer_class=type(layers[0]).__name__, hidden_size=model.config.hidden_size)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """The gate reads the block input scaled to unit RMS per token (no parameters): residual streams
    carry outlier dimensions/tokens (SmolLM2: RMS ~250 in mid layers, ~0.1 at the embeddings) that
    would otherwise dominate a linear gate and make its learning rate depend on depth."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


GATE_FORMS = ("softmax", "routed")
GATE_FORM_HELP = ("how the gates weigh the paths: softmax (one (N+1)-way softmax over the backbone and the experts: "
                  "the paper's) or routed (a router picks the expert from the text, p_j, and each expert keeps the "
                  "per-token gate it learned alone, q_j: expert j gets p_j·q_j, the backbone the rest; a router sure of "
                  "a text's domain gives it exactly that expert's own outputs)")
GATE_CONTEXTS = ("token", "mean")
GATE_CONTEXT_HELP = ("what the gates read: token (each token's block input: the paper's token-level gate) or mean "
                     "(also the mean block input of the text the token sees: the text so far in a decoder, the whole "
                     "text in an encoder)")


class ModeBlock(nn.Module):
    """N experts (each an `nn.ModuleList` of k layers) and their (N+1)-way gate for one block.

    The gate reads the block input per token (`context` "token"), or that and the mean block
    input over the tokens this token sees ("mean": a causal prefix mean in a decoder, the whole
    sequence's mean in an encoder; padding excluded). A single token often cannot tell which
    domain its text is from (a linear probe at SmolLM2's block inputs: 45-75 % of held-out tokens
    of four domains), the text so far mostly can."""

    def __init__(self, experts: list[nn.ModuleList], hidden_size: int, context: str = "token", causal: bool = True,
                 form: str = "softmax"):
        super().__init__()
        if context not in GATE_CONTEXTS:
            raise ValueError(f"unknown gate context {context!r} ({' or '.join(GATE_CONTEXTS)})")
        if form not in GATE_FORMS:
            raise ValueError(f"unknown gate form {form!r} ({' or '.join(GATE_FORMS)})")
        self.context, self.causal, self.form = context, causal, form
        self.experts = nn.ModuleList(experts)
        p = next(self.experts.parameters())
        self.out = nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=False, device=p.device, dtype=p.dtype)
                                 for _ in experts)
        width = hidden_size * (2 if context == "mean" else 1)
        self.gate = nn.Linear(width, len(experts) + (form == "softmax"), device=p.device, dtype=p.dtype)
        # row j: expert j's own gate (trained alone, 2-way) as log-odds of the expert over the backbone,
        # weight w_1 - w_0 and bias c_1 - c_0 (`load_expert_state`). Form "routed": a layer of the model,
        # trained with the expert. Form "softmax": only the routing loss reads it, as a buffer that is not
        # saved, [weight, bias] per row, NaN where unknown
        if form == "routed":
            self.own = nn.Linear(hidden_size, len(experts), device=p.device, dtype=p.dtype)
            with torch.no_grad():
                self.own.weight.zero_()
                self.own.bias.zero_()
        else:
            self.register_buffer("own_gate", torch.full((len(experts), hidden_size + 1), float("nan"),
                                                        device=p.device, dtype=p.dtype), persistent=False)
        with torch.no_grad():
            for w in self.out:
                w.weight.zero_()  # W_j = 0: the block computes the backbone exactly
        self.reset_gate()
        self.routing: list | None = None  # `Mode.recording_routing`
        self.route: torch.Tensor | None = None  # `Mode.routing_targets`: each row's own expert (-1: none)
        self.route_losses: list[torch.Tensor] = []

    @torch.no_grad()
    def reset_gate(self) -> None:
        """Fresh gate: uniform softmax over the backbone and the experts (form "routed": over the experts)."""
        self.gate.weight.zero_()
        self.gate.bias.zero_()

    def gate_input(self, xh: torch.Tensor, mask: torch.Tensor | None = None, cache=None,
                   cache_index: int | None = None) -> torch.Tensor:
        """What the gate reads for the normalised block input `xh` [batch, tokens, hidden]: `xh`,
        or with context "mean" `[xh, mean]`. `mask` [batch, >= tokens] (1: a real token; its last
        columns are these tokens) keeps padding out of the mean. With a transformers `cache`
        (decoding), the earlier tokens' inputs are kept in its layer `cache_index`, so a token's
        mean covers the whole text so far, and beam reordering or cropping of the cache applies."""
        if self.context == "token":
            return xh
        t = xh.shape[1]
        w = (torch.ones(xh.shape[:2], device=xh.device) if mask is None else mask[:, -t:]).to(torch.float32)[..., None]
        v = xh.float() * w
        if cache is not None:
            v, w = (u[:, 0] for u in cache.update(v[:, None], w[:, None], cache_index))
        if self.causal:
            mean = (v.cumsum(1) / w.cumsum(1).clamp_min(1))[:, -t:]
        else:
            mean = (v.sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)).expand(-1, t, -1)
        return torch.cat([xh, mean.to(xh.dtype)], -1)

    def weights(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache=None,
                cache_index: int | None = None) -> torch.Tensor:
        """The weights [a_bb, a_1, ..., a_N] of each token of the block input `x` (see the module
        docstring; `mask`, `cache`, `cache_index`: see `gate_input`)."""
        xh = _rms(x)
        logits = self.gate(self.gate_input(xh, mask, cache, cache_index))
        if self.form == "softmax":
            return torch.softmax(logits, dim=-1)
        a = torch.softmax(logits.float(), dim=-1) * torch.sigmoid(self.own(xh).float())
        return torch.cat([1 - a.sum(-1, keepdim=True), a], -1).to(x.dtype)

    def routing_loss(self, x: torch.Tensor, route: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the gate on rows of an expert's corpus (`route[i]` >= 0). Form "routed":
        of the router against that expert. Form "softmax": against what that expert's own gate gave
        alone: per token, weight q = sigmoid(own log-odds) for the expert, 1 - q for the backbone,
        0 for every other expert. At either optimum a token of expert j's corpus gets exactly the
        block output of expert j alone, `f_bb + q W_j (f_j - f_bb)`. The caller detaches x, so
        that the loss trains the gate alone (not the earlier blocks' experts)."""
        rows = route >= 0
        r = route[rows]
        xh = _rms(x[rows])
        logp = torch.log_softmax(self.gate(self.gate_input(xh, None if mask is None else mask[rows])).float(), dim=-1)
        column = r + (self.form == "softmax")  # the expert's output of the gate (softmax: after the backbone's)
        own_logp = logp.gather(-1, column[:, None, None].expand(-1, logp.shape[1], 1)).squeeze(-1)
        if self.form == "routed":
            return -own_logp.mean()
        own = self.own_gate[r].float()
        if torch.isnan(own).any():
            raise ValueError("the routing loss needs each expert's own gate, which library experts carry; these "
                             "experts have none (pass --routing-loss 0)")
        q = torch.sigmoid(torch.einsum("btd,bd->bt", xh.float(), own[:, :-1]) + own[:, -1:])
        return -((1 - q) * logp[..., 0] + q * own_logp).mean()

    def forward(self, x: torch.Tensor, y: torch.Tensor, calls: list[tuple[tuple, dict]],
                mask: torch.Tensor | None = None, cache=None, cache_index: int | None = None) -> torch.Tensor:
        """Mix the backbone block's output `y` with the experts run on the block input `x`.

        `calls[i]` is what expert layer i's source backbone layer (`expert_sources`) was called
        with, its hidden states excluded: masks, position embeddings, cache — per layer, since
        models such as Gemma-3 give sliding and full attention layers different masks and
        rotary embeddings. `mask`, `cache`, `cache_index`: see `gate_input`."""
        a = self.weights(x, mask, cache, cache_index)
        if self.route is not None and bool((self.route >= 0).any()):
            self.route_losses.append(self.routing_loss(x.detach(), self.route.to(x.device), mask))
        if self.routing is not None:  # `Mode.recording_routing`: the gate's mean weights over these tokens
            self.routing.append((a.detach().float().reshape(-1, a.shape[-1]).sum(0), a[..., 0].numel()))
        delta = torch.zeros_like(y)
        with _not_recorded():
            for j, expert in enumerate(self.experts):
                h = x
                for layer, (args, kwargs) in zip(expert, calls):
                    h = _output(layer(h, *args, **kwargs))
                delta = delta + a[..., j + 1:j + 2] * self.out[j](h - y)
        return y + delta


class Mode(ModeHooks, nn.Module):
    """All MoDE blocks of a model, `model.domix_mode`; `attach` hooks them into the backbone's layers."""

    def __init__(self, layout: Layout, names: list[str], blocks: list[ModeBlock]):
        super().__init__()
        if len(blocks) != layout.blocks:
            raise ValueError(f"{len(blocks)} blocks for a layout of {layout.blocks}")
        self.layout = layout
        self.names = list(names)
        self.blocks = nn.ModuleList(blocks)
        self._handles: list = []
        self._inputs: dict[int, torch.Tensor] = {}
        self._calls: dict[int, tuple[tuple, dict]] = {}  # backbone layer index -> its call's other arguments
        self._mask: torch.Tensor | None = None  # the model call's 2-D attention mask (gate context "mean")

    @property
    def n_experts(self) -> int:
        return len(self.names)

    def extra_repr(self) -> str:
        return f"experts={self.names}, {self.layout.describe()}"

    @property
    def gate_context(self) -> str:
        return self.blocks[0].context

    @property
    def gate_form(self) -> str:
        return self.blocks[0].form

    # ---- state ---------------------------------------------------------------------------
    def expert_parameters(self) -> list[nn.Parameter]:
        """The experts' layers and their output maps W_j (and their own gates, form "routed")."""
        return [p for blk in self.blocks for part in (blk.experts, blk.out, getattr(blk, "own", None)) if part is not None
                for p in part.parameters()]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gates' linear layers (V, c)."""
        return [p for blk in self.blocks for p in blk.gate.parameters()]

    def param_counts(self) -> dict:
        per_expert = sum(p.numel() for blk in self.blocks for part in (blk.experts[0], blk.out[0])
                         for p in part.parameters())
        per_expert += sum(blk.own.in_features + 1 for blk in self.blocks if blk.form == "routed")  # its own gate
        gates = sum(p.numel() for p in self.gate_parameters())
        return {"per_expert": per_expert, "experts": per_expert * self.n_experts, "gates": gates,
                "total": per_expert * self.n_experts + gates}

    def expert_state(self, j: int, gate: bool = False) -> dict[str, torch.Tensor]:
        """Expert j's tensors under library keys `blocks.<b>.layers.<i>.…` (with its gate if asked)."""
        out = {}
        for b, blk in enumerate(self.blocks):
            out.update({f"blocks.{b}.layers.{k}": v for k, v in blk.experts[j].state_dict().items()})
            out[f"blocks.{b}.out.weight"] = blk.out[j].weight
            if gate:
                out.update({f"blocks.{b}.gate.weight": blk.gate.weight, f"blocks.{b}.gate.bias": blk.gate.bias})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def load_expert_state(self, j: int, tensors: dict[str, torch.Tensor], gate: bool = False) -> None:
        """Fill expert j from library tensors (strict: names and shapes must fit this layout);
        with `gate`, also its own trained gate (only for a model of that one expert)."""
        gate_keys = {f"blocks.{b}.{n}" for b in range(len(self.blocks)) for n in ("gate.weight", "gate.bias")}
        used = set(gate_keys)
        for b, blk in enumerate(self.blocks):
            prefix = f"blocks.{b}.layers."
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            blk.experts[j].load_state_dict(sd, strict=True)
            used |= {prefix + k for k in sd}
            if f"blocks.{b}.out.weight" not in tensors:
                raise ValueError(f"no output map blocks.{b}.out.weight: an expert of an earlier domix (its per-block "
                                 "scale form); train it again with this domix")
            blk.out[j].load_state_dict({"weight": tensors[f"blocks.{b}.out.weight"]}, strict=True)
            used.add(f"blocks.{b}.out.weight")
        unexpected = sorted(set(tensors) - used)
        if unexpected:
            raise ValueError(f"tensors that do not belong to this layout: {unexpected[:5]}")
        with torch.no_grad():  # the expert's own gate as log-odds over the backbone (for the routing loss)
            for b, blk in enumerate(self.blocks):
                w, c = tensors.get(f"blocks.{b}.gate.weight"), tensors.get(f"blocks.{b}.gate.bias")
                if w is not None and c is not None and w.shape[0] == 2:
                    if blk.form == "routed":
                        blk.own.weight[j] = w[1] - w[0]
                        blk.own.bias[j] = c[1] - c[0]
                    else:
                        blk.own_gate[j, :-1] = w[1] - w[0]
                        blk.own_gate[j, -1] = c[1] - c[0]
        if gate:
            if self.n_experts != 1:
                raise ValueError("an expert's own gate fits only a model of that one expert")
            missing = sorted(gate_keys - set(tensors))
            if missing:
                raise ValueError(f"the expert has no trained gate tensors {missing[:3]}")
            with torch.no_grad():
                for b, blk in enumerate(self.blocks):
                    blk.gate.weight.copy_(tensors[f"blocks.{b}.gate.weight"])
                    blk.gate.bias.copy_(tensors[f"blocks.{b}.gate.bias"])


def make_expert(model: nn.Module, layers: nn.ModuleList, span: tuple[int, int], k: int, init: str | None,
                first_index: int) -> nn.ModuleList:
    """k layers of the backbone's class for the block `span`.

    `copy`: the block's last k backbone layers (needs k <= block length); `random`: fresh
    layers with the model's own initialisation; None: placeholders (of the same layers' kind)
    that saved tensors are loaded into next."""
    start, end = span
    if init == "copy":
        if k > end - start:
            raise ValueError(f"--expert-init copy takes the last {k} layers of each block, but a block has only "
                             f"{end - start}; use fewer --expert-layers, fewer --blocks, or --expert-init random")
        sources = [layers[i] for i in range(end - k, end)]
    elif init in ("random", None):
        sources = [layers[i] for i in expert_sources(span, k)]  # templates: their attention types, sizes
    else:
        raise ValueError(f"unknown --expert-init {init!r} (copy or random)")
    memo = {id(model.config): model.config}  # share the config object (attention implementation etc.)
    out = []
    for i, src in enumerate(sources):
        layer = copy.deepcopy(src, memo=dict(memo))
        for m in layer.modules():
            for hooks in (m._forward_hooks, m._forward_pre_hooks, getattr(m, "_forward_hooks_with_kwargs", {}),
                          getattr(m, "_forward_pre_hooks_with_kwargs", {})):
                hooks.clear()  # hooks of the source layer (MoDE's own, output recorders) are not the expert's
            if hasattr(m, "layer_idx"):
                m.layer_idx = first_index + i
        if init == "random":
            for p in layer.parameters():
                p._is_hf_initialized = False
            for m in layer.modules():
                model._init_weights(m)
        layer.requires_grad_(True)
        out.append(layer)
    return nn.ModuleList(out)
