"""Capacity-matched baselines: the LoRA ranks that give a baseline DoMIX's trainable parameters, or
its update rank, for the run's base model and library.

DoMIX over N modules of rank r trains, per target layer of shape d_out x d_in, the concatenated
B's (d_out · N·r) and the bridge P ((N·r)²); a LoRA of rank R trains R · (d_in + d_out). The task
head is the same for both and left out. The parameter-matched rank is the R closest to DoMIX's
count; the rank-matched one is N·r, the rank of DoMIX's update B_cat P A_cat.
"""
from __future__ import annotations


def target_shapes(base: str, targets: str = "all-linear", trust_remote_code: bool = False) -> list[tuple[int, int]]:
    """(d_out, d_in) of every layer a module targets in `base`, read from its config alone (the model is
    built on the meta device: no weights are loaded)."""
    import re

    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModel

    from ...checkpoints import resolve_base
    from ...models import target_regex

    config = AutoConfig.from_pretrained(resolve_base(base), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    pattern = re.compile(target_regex(model, targets))
    return [(m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and pattern.fullmatch(n)]


def matched_ranks(shapes: list[tuple[int, int]], n_modules: int, rank: int) -> dict:
    """The ranks of the capacity-matched baselines of DoMIX over `n_modules` modules of rank `rank`
    on layers of `shapes` [(d_out, d_in)]: {"params": the LoRA rank with the nearest trainable count
    (at least 1), "rank": N·r, "domix_params", "lora_params_per_rank", "params_lora": the count at that
    rank}, the head left out."""
    if not shapes:
        raise ValueError("no target layers: cannot match a LoRA's capacity to DoMIX's")
    nr = n_modules * rank
    domix = sum(d_out * nr + nr * nr for d_out, _ in shapes)
    per_rank = sum(d_out + d_in for d_out, d_in in shapes)
    params = max(1, round(domix / per_rank))
    return {"params": params, "rank": nr, "domix_params": domix, "lora_params_per_rank": per_rank,
            "params_lora": params * per_rank, "modules": n_modules, "module_rank": rank}


def run_capacity(settings: dict) -> dict:
    """The run's capacity-matched ranks (`settings["capacity"]`, computed once from its base, domains
    and module rank)."""
    if "capacity" not in settings:
        settings["capacity"] = matched_ranks(target_shapes(settings["base"]), len(settings["domains"]),
                                             settings["pretrain"]["rank"])
    return settings["capacity"]
