"""The Markdown table of `domix bench dap`'s result: what `run` stores as its `table`."""
from __future__ import annotations

from .measure import mib


def table(res: dict) -> str:
    """The Markdown table of a `domix bench dap` result (its `table`): the runs, the many-module
    and DDP runs when measured, the ratios against their targets (or the theory), a load note."""
    s = res["settings"]
    lines = [f"DAP efficiency — base {s['base']}, {s['steps']} timed steps (+{s['warmup_steps']} warm-up), "
             f"batch {s['batch_size']} × seq {s['seq_len']}, {s['threads']} threads, torch {s['torch']}, "
             f"repeats {s['repeats']}, {s.get('dtype', 'fp32')} on {s.get('device', 'cpu')}" + (" (LoRA runs: frozen base in "
             f"{s.get('dtype')}; full-ft: fp32 weights + autocast)" if s.get("dtype", "fp32") != "fp32" else "")
             + (", gradient checkpointing in every run" if s.get("gradient_checkpointing") else ""), "",
             "| run | tokens/s | step time (s, median) | fastest step (s) | CPU s/step | peak RSS (MB) | "
             "peak CUDA (MiB) | trainable params | load avg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["runs"].items():
        load = max(max(x["loadavg_before"], x["loadavg_after"]) for x in res["raw"][name])
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['step_time_s']:.3f} | {r['step_time_min_s']:.3f} | "
                     f"{r['step_cpu_s']:.3f} | {r['peak_rss_mb']:.0f} | {mib(r.get('peak_cuda_mb'))} | "
                     f"{r['trainable_params']:,} | {load:.1f} |")
    sc = res.get("scale") or {}
    if "separate" in sc:
        p = sc["separate"]
        lines += ["", f"Many modules, end to end (loading included), {p['domains']} modules of {s['steps']} (+"
                      f"{s['warmup_steps']}) steps, 2 threads in all:", "",
                  "| run | tokens/s | wall (s) | peak RSS (MB) |", "|---|---:|---:|---:|",
                  f"| {p['domains']} separate processes, 2 at a time, 1 thread each | {p['tokens'] / p['wall_s']:.1f} | "
                  f"{p['wall_s']:.1f} | {p['peak_rss_mb_sum']:.0f} (sum) |"]
        for f in (sc[k] for k in ("fused", "fused_stack1", "fused_parallel") if k in sc):
            how = "all domains per forward pass" if f.get("stack", f["domains"]) == f["domains"] else \
                f"{f['stack']} domain(s) per forward pass"
            if f.get("parallel", 1) > 1:
                how += f", {f['parallel']} passes at once in threads"
            lines.append(f"| fused, one process, 2 threads, {how} | {f['tokens'] / f['wall_s']:.1f} | "
                         f"{f['wall_s']:.1f} | {f['peak_rss_mb']:.0f} |")
    if "ddp_1" in sc:
        one, two = sc["ddp_1"], sc["ddp_2"]
        lines += ["", "One module on DDP processes (1 thread each, the same batch per process):", "",
                  "| processes | tokens/s | step time (s) |", "|---|---:|---:|",
                  f"| 1 | {one['tokens_per_s']:.1f} | {one['step_time_s']:.3f} |",
                  f"| 2 | {two['tokens_per_s']:.1f} | {two['step_time_s']:.3f} |"]
    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|:-:|"]
    for name, v in res["ratios"].items():
        t = res["targets"].get(name)
        if t:
            lines.append(f"| {name} | {v:.3f} | {t['op']} {t['target']} | {'yes' if t['met'] else 'NO'} |")
        elif name.startswith("step_time_lora_over_full"):
            lines.append(f"| {name} | {v:.3f} | ≈{res['theory']['step_time_lora_over_full']:.2f} (theory) | |")
        else:
            lines.append(f"| {name} | {v:.3f} | | |")
    load = max(max(x["loadavg_before"], x["loadavg_after"]) for v in res["raw"].values() for x in v)
    if load > (s["cpu_count"] or 1) + 0.5:
        lines += ["", f"Note: the 1-min load average reached {load:.1f} on {s['cpu_count']} CPUs during the runs; "
                      f"other work shared the machine, so the timing ratios are noisy (compare the *_best ratios)."]
    return "\n".join(lines)
