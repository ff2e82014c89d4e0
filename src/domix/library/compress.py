"""`library compress`: a smaller copy of a LoRA module. Each layer's update, delta = scaling · B A,
is re-factorised by SVD and truncated to a lower rank; the result is an ordinary PEFT LoRA again
(per-layer ranks in `rank_pattern`, alpha = rank per layer, so every layer's scaling is 1)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_dir, write_json
from ..options import DEVICES, option
from .importing import plain_lora_problem
from .store import META, Library, LibraryError, entry_name

@dataclass(kw_only=True)
class CompressOptions:
    """Options of `domix library compress`."""

    library: str = option(help="library directory (the new entry is written there too)")
    module: str = option(help="the LoRA module to compress")
    out: str = option(help="name of the new entry")
    rank: int | None = option(None, "keep this rank in every layer (below the module's rank)")
    energy: float | None = option(None, "instead: per layer, the smallest rank keeping this fraction (0 < E <= 1) of "
                                        "the update's squared singular values; 1.0 keeps every nonzero one (the "
                                        "same update)")
    base: str | None = option(None, "default: the base the module was trained on")
    device: str = option("auto", "where the held-out loss is scored", choices=DEVICES)
    eval_blocks: int | None = option(None, "held-out blocks scored before and after, as the module's pretrain "
                                           "--eval-blocks (default: pretrain's default)")
    text_field: str | None = option(None, "as the module's pretrain --text-field, for .jsonl/.json/.csv corpora "
                                          "(default: pretrain's default)")
    overwrite: bool = option(False, "replace an existing entry of that name")


ENERGY_TOL = 1e-12  # `energy` 1.0 keeps every singular value above float noise (a lossless re-factorisation)


def svd_factors(A, B, scaling: float):
    """(U·S, S, Vh) of delta = scaling · B A, from the r x r core of the factors' QR decompositions
    (never the d_out x d_in product), in float64. B' = (U·S)[:, :k], A' = Vh[:k] keep rank k."""
    import torch

    qb, rb = torch.linalg.qr(B.double() * scaling)
    qa, ra = torch.linalg.qr(A.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return (qb @ u) * s, s, vh @ qa.T


def kept_rank(s, rank: int | None, energy: float | None) -> int:
    """Rank kept of singular values `s` (descending): `rank`, or the smallest whose share of the
    squared singular values reaches `energy`. At least 1 (PEFT's minimum); a zero update keeps 1."""
    import torch

    if rank is not None:
        return min(rank, s.numel())
    e = (s.double() ** 2).cumsum(0)
    if e[-1] <= 0:
        return 1
    return int(torch.searchsorted(e / e[-1], torch.tensor(energy - ENERGY_TOL, dtype=torch.float64))) + 1


def heldout_blocks(meta: dict, tokenizer, eval_blocks: int | None = None, text_field: str | None = None):
    """(blocks, note): the held-out blocks `pretrain` scored the module on — `split_heldout` and
    `pack_heldout` of its recorded corpus and seq_len — or (None, why not). `domix.json` does not
    record `eval_blocks` and `text_field`: the given ones, else pretrain's defaults, are used."""
    from ..data.corpus import load_documents, pack_heldout, split_heldout
    from ..training import LMTrainOptions

    data = meta.get("data")
    if not data:
        return None, "the module records no corpus: held-out loss not scored"
    gone = [p for p in data if not Path(p).exists()]
    if gone:
        return None, f"the module's corpus {gone[0]} no longer exists: held-out loss not scored"
    docs = load_documents(data, text_field or meta.get("text_field", LMTrainOptions.text_field))
    blocks = pack_heldout(split_heldout(docs)[1], tokenizer, meta.get("seq_len", LMTrainOptions.seq_len),
                          max_blocks=eval_blocks or meta.get("eval_blocks", LMTrainOptions.eval_blocks))
    return blocks, None if blocks is not None else "the corpus's held-out documents fill no block: not scored"


def compress_module(library: str | Path, module: str, out: str, rank: int | None = CompressOptions.rank,
                    energy: float | None = CompressOptions.energy, base: str | None = CompressOptions.base,
                    overwrite: bool = CompressOptions.overwrite, device: str = CompressOptions.device,
                    dtype: str | None = None, eval_blocks: int | None = CompressOptions.eval_blocks,
                    text_field: str | None = CompressOptions.text_field, trust_remote_code: bool = False) -> dict:
    """Write `out`, the LoRA module `module` of `library` re-factorised per layer to `rank`, or per
    layer to the smallest rank keeping `energy` of the update's squared singular values (1.0 keeps
    them all: the same update, possibly at a lower rank). Written atomically; returns its
    `compressed` record.

    `domix.json` is the source's, with `rank`/`alpha` (the largest kept rank), `heldout_loss` and
    `heldout_tokens` (after compression; null when not scored) updated and the `compressed` record
    added: source, requested rank/energy, per-layer kept rank and energy, overall kept energy
    (kept σ² over all σ², all layers), and the held-out LM loss before and after, scored like
    `pretrain`'s `heldout_loss` (null, with a note, when the module's corpus is gone). The base
    is held in the module's training dtype unless `dtype` is given."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer

    from ..checkpoints import resolve_base
    from ..lm import lm_loss
    from ..lora import lora_pairs
    from ..models import fingerprint, load_model, load_tokenizer, select_device

    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of --rank and --energy")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be at least 1, not {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"--energy must be in (0, 1], not {energy}")
    entry_name(out)
    if out == module:
        raise ValueError(f"--out must name a new entry, not the module '{module}' itself")
    lib = Library(library)
    src = lib.get(module).require("lora")
    cfg = json.loads((src.path / "adapter_config.json").read_text())
    shapes = src.shapes()
    problem = plain_lora_problem(cfg, shapes)
    if problem:
        raise LibraryError(f"module '{module}' {problem}")
    src_rank = max(a[0] for a, _ in lora_pairs(shapes).values())
    if rank is not None and rank >= src_rank:
        raise ValueError(f"--rank {rank} does not compress module '{module}' of rank {src_rank}: give a lower rank")
    dest = lib.path / out
    if dest.exists() and not overwrite:
        raise LibraryError(f"module '{out}' already exists in library {lib.path}; pass --overwrite to replace it")

    meta = src.meta
    base = base or meta["base"]
    dev = select_device(device)
    tokenizer = load_tokenizer(base, trust_remote_code)
    model, objective = load_model(base, head="lm", objective=meta.get("objective", "auto"),
                                  dtype=dtype or meta.get("dtype") or "fp32", trust_remote_code=trust_remote_code)
    src.check_base(fingerprint(model))
    src.tensors()  # a truncated or corrupt file fails here with the module's name
    blocks, note = heldout_blocks(meta, tokenizer, eval_blocks, text_field)
    batch = meta.get("batch_size", 8)

    def score(m):
        return lm_loss(m.to(dev), blocks, tokenizer, objective, batch, seed=0) if blocks is not None else None

    base_score = score(model)  # the base on the same blocks: what share of the module's gain survives
    peft_model = PeftModel.from_pretrained(model, str(src.path))  # PEFT's own per-layer r and scaling
    before = score(peft_model)
    factors, layers, kept_sq, total_sq = {}, {}, 0.0, 0.0
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            us, s, vh = svd_factors(m.lora_A["default"].weight.detach().cpu(),
                                    m.lora_B["default"].weight.detach().cpu(), m.scaling["default"])
            k = kept_rank(s, rank, energy)
            sq = s ** 2
            all_sq, k_sq = sq.sum().item(), sq[:k].sum().item()
            layer = name.removeprefix("base_model.model.")
            factors[layer] = (vh[:k], us[:, :k])
            layers[layer] = {"rank": k, "energy": k_sq / all_sq if all_sq > 0 else 1.0}
            kept_sq, total_sq = kept_sq + k_sq, total_sq + all_sq

    ranks = {n: v["rank"] for n, v in layers.items()}
    r0 = max(ranks.values())  # the config's r is the module's rank; lower layers go in rank_pattern
    new_cfg = LoraConfig(r=r0, lora_alpha=r0, target_modules=sorted(ranks), lora_dropout=0.0, bias="none",
                         rank_pattern={n: r for n, r in ranks.items() if r != r0},
                         alpha_pattern={n: r for n, r in ranks.items() if r != r0},  # alpha = r: scaling 1
                         task_type=cfg.get("task_type"))
    small = get_peft_model(peft_model.unload(), new_cfg)
    small.peft_config["default"].base_model_name_or_path = cfg.get("base_model_name_or_path") or resolve_base(base)
    inner = small.base_model.model
    with torch.no_grad():
        for layer, (a, b) in factors.items():
            m = inner.get_submodule(layer)
            m.lora_A["default"].weight.copy_(a)
            m.lora_B["default"].weight.copy_(b)
    after = score(small)

    record = {
        "source": module, "source_rank": src_rank, "requested": {"rank": rank, "energy": energy},
        "rank": r0, "layers": layers, "energy": kept_sq / total_sq if total_sq > 0 else 1.0,
        "params_before": sum(math.prod(s) for s in shapes.values()),
        "params_after": sum(a.numel() + b.numel() for a, b in factors.values()),
        "heldout_loss_base": base_score["loss"] if base_score else None,
        "heldout_loss_before": before["loss"] if before else None,
        "heldout_loss_after": after["loss"] if after else None,
        # the share of the module's held-out gain over the base that the compressed copy keeps
        "kept_gain": ((base_score["loss"] - after["loss"]) / (base_score["loss"] - before["loss"])
                      if before and after and base_score and base_score["loss"] != before["loss"] else None),
        "heldout_tokens": after["tokens"] if after else None, "heldout_blocks": len(blocks) if blocks else None,
        "heldout_note": note,
    }
    new_meta = {**meta, "rank": record["rank"], "alpha": float(record["rank"]),
                "heldout_loss": record["heldout_loss_after"], "heldout_tokens": record["heldout_tokens"],
                "compressed": record}
    with atomic_dir(dest, overwrite=overwrite) as stage:
        small.save_pretrained(stage)
        write_json(stage / META, new_meta)
    return {"module": out, "library": str(lib.path), **record}
