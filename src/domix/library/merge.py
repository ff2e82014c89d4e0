"""`domix library merge`: the usual LoRA merge baselines, computed by PEFT itself.

The chosen LoRA modules are loaded as named adapters on the base and combined with PEFT's
`add_weighted_adapter` (`linear`, `ties` or `dare_ties`); the merged adapter is written as a new
library entry of kind lora, so that anything taking a module (`finetune --init-module`,
`eval-lm --module`, plain PEFT) takes it too.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..options import option
from .store import META, Library, LibraryError, entry_name, one_base

COMBINATIONS = ("linear", "ties", "dare_ties")
# `add_weighted_adapter(density=None)` fails for the pruning merges: they take the value of PEFT's
# model-merging guide (also TIES' "keep the top 20 %")
DEFAULT_DENSITY = 0.2


def float_list(text: str) -> list[float]:
    """A comma list of numbers (`--weights 0.5,0.25,0.25`)."""
    return [float(x) for x in text.split(",") if x.strip()]


@dataclass(kw_only=True)
class MergeOptions:
    """Options of `domix library merge`."""

    library: str = option(help="library directory (the merged entry is written there too)")
    modules: str = option(help="comma list of at least 2 LoRA modules of one base and one rank")
    combination: str = option(help="PEFT's combination_type", choices=COMBINATIONS)
    out: str = option(help="name of the merged entry")
    density: float | None = option(None, f"ties/dare_ties: fraction of each module's values kept (default: "
                                         f"{DEFAULT_DENSITY})")
    # given as one comma list on the command line (`--weights 1,2`), parsed into the list merge_modules takes
    weights: str | None = option(None, "comma list, one weight per module (default: 1/N each)", parse=float_list)
    base: str | None = option(None, "default: the base the modules were trained on")
    seed: int = option(0, "seeds dare_ties' random drop")
    overwrite: bool = option(False, "replace an existing entry of that name")


def merge_modules(library: str | Path, modules, combination: str, out: str, base: str | None = MergeOptions.base,
                  weights: list[float] | None = None, density: float | None = MergeOptions.density,
                  seed: int = MergeOptions.seed, into: str | Path | None = None,
                  overwrite: bool = MergeOptions.overwrite) -> dict:
    """Merge the LoRA `modules` of `library` (a comma list or a list of names, at least 2) with
    PEFT's `add_weighted_adapter(combination_type=combination)` and write the result atomically as
    entry `out` of `into` (default: the same library).

    `weights` default to 1/N each; `density` (ties, dare_ties) to `DEFAULT_DENSITY`. `seed` seeds
    dare_ties' random drop. `base` defaults to the base the modules were trained on. Refuses
    modules of other kinds or of different bases, unequal ranks (PEFT's merges keep one rank r)
    and an unknown combination. Returns the entry's metadata (its `domix.json`)."""
    import peft
    import torch
    from peft import PeftModel

    from ..io import atomic_dir, write_json
    from ..models import fingerprint, load_model

    if combination not in COMBINATIONS:
        raise ValueError(f"unknown combination {combination!r}; known: {', '.join(COMBINATIONS)}")
    entry_name(out)
    mods = Library(library).select(modules, kind="lora")
    if len(mods) < 2:
        raise LibraryError(f"a merge needs at least 2 modules; got {len(mods)} ({', '.join(m.name for m in mods)})")
    dest = Library(into or library).path / out
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists (overwrite replaces it)")
    one_base(mods)
    configs = [json.loads((m.path / "adapter_config.json").read_text()) for m in mods]
    ranks = {m.name: c["r"] for m, c in zip(mods, configs)}
    if len(set(ranks.values())) > 1 or any(c.get("rank_pattern") for c in configs):
        raise LibraryError(f"PEFT's {combination} merge needs modules of one rank; got "
                           + ", ".join(f"{n} r={r}" for n, r in ranks.items()))
    n = len(mods)
    weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} modules")
    if combination == "linear":
        if density is not None:
            raise ValueError("density applies to ties and dare_ties merges only")
    else:
        density = DEFAULT_DENSITY if density is None else float(density)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1]; got {density}")

    t0 = time.time()
    base = base or mods[0].meta["base"]
    model, objective = load_model(base, head="lm", objective=mods[0].meta.get("objective", "auto"))
    base_fp = fingerprint(model)
    for m in mods:
        m.check_base(base_fp)
        m.tensors()  # a truncated file fails here, with the module's name
    names = [f"m{i}" for i in range(n)]  # adapter names: library names may hold characters PEFT's dicts refuse
    merged = PeftModel.from_pretrained(model, str(mods[0].path), adapter_name=names[0])
    for name, m in zip(names[1:], mods[1:]):
        merged.load_adapter(str(m.path), adapter_name=name)
    torch.manual_seed(seed)  # dare_ties drops at random
    # "default": PEFT's save_pretrained writes that adapter at the top of the directory
    merged.add_weighted_adapter(names, weights, adapter_name="default", combination_type=combination,
                                density=density)
    with atomic_dir(dest, overwrite=overwrite) as stage:
        merged.save_pretrained(stage, selected_adapters=["default"])
        acfg = json.loads((stage / "adapter_config.json").read_text())
        targets = {m.meta.get("targets") for m in mods}
        meta = {
            "kind": "lora", "domain": out, "base": base, "base_fingerprint": base_fp, "objective": objective,
            "rank": acfg["r"], "alpha": acfg["lora_alpha"],
            "targets": targets.pop() if len(targets) == 1 else "merged",
            "target_modules": acfg["target_modules"], "seed": seed,
            "merged": {"modules": [m.name for m in mods], "combination": combination, "weights": weights,
                       "density": density, "peft": peft.__version__},
            "data": [p for m in mods for p in m.meta.get("data") or []],
            "steps": 0, "tokens": sum(m.meta.get("tokens") or 0 for m in mods), "heldout_loss": None,
            "merge_time_s": round(time.time() - t0, 2),
        }
        write_json(stage / META, meta)
    return meta
