"""DoMIX's order check without its cost: when the modules pre-trained in domain order B are bitwise
equal to order A's, order B's fine-tunes are order A's computation on the same inputs."""
from __future__ import annotations

from pathlib import Path

from .settings import order_name


def _reuse_order_b(jobs: dict, runs: list, settings: dict, domains: list[str]) -> tuple[dict, list]:
    """When order B's modules are bitwise equal to order A's, its domix fine-tunes are the same
    computation on the same inputs: point them at order A's jobs instead of running them again."""
    orders = [order_name(o) for o in settings["orders"]]
    libs = [Path(jobs[f"module/{i + 1}/{domains[0]}"].out).parent for i in range(2)]
    eq = _module_tensors_equal(libs[0], libs[1], domains)
    if not eq or not all(eq.values()):
        return jobs, runs
    first = {(t, s): n for m, t, s, o, n in runs if m == "domix" and o == orders[0]}
    new_runs, drop = [], set()
    for m, t, s, o, n in runs:
        if m == "domix" and o != orders[0] and (t, s) in first:
            drop.add(n)
            n = first[(t, s)]
        new_runs.append((m, t, s, o, n))
    still = {n for *_, n in new_runs}
    return {k: v for k, v in jobs.items() if k not in drop or k in still}, new_runs


def _module_tensors_equal(lib_a: Path, lib_b: Path, domains: list[str]) -> dict:
    """{domain: whether its module's tensors in the two libraries are bitwise equal (None: one is missing)}."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for d in domains:
        fa, fb = lib_a / d / "adapter_model.safetensors", lib_b / d / "adapter_model.safetensors"
        if not (fa.is_file() and fb.is_file()):
            out[d] = None
            continue
        a, b = load_file(str(fa)), load_file(str(fb))
        out[d] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return out
