"""`make gpu-check`: domix end to end on a CUDA device, in bf16 and fp16, checked and timed.

For each precision: stage 1 (two domain modules, one process each, as `pretrain` runs them), the
same two fused in one process (`pretrain_fused`), DoMIX fine-tuning over them on a classification
task, and both exports (merged weights, PEFT LoRA). Each stage runs twice: timed (`--steps`), and
watched (2 steps under a dispatch mode that counts every matrix product run on the CPU: the check
fails if there is one). Then the equalities the CPU path guarantees are checked on the device:

- the fused modules train as the separate ones do (mean losses within 1e-3, 2e-2 in half precision);
- the task model, its merged export and its PEFT LoRA export give the same logits (fp32);
- stage 1 in fp32 gives the same losses and module on the device as on the CPU (tolerance 1e-3).

Writes `OUT/gpu-check.json`: per precision the step times, peak CUDA memory and losses; the checks
with their measured differences; the device and library versions. Exit status 1 when a check fails.
Needs the default model and the benchmark data (`domix fetch`), or `--base` and `--data`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .measure import peak_cuda_mb, reset_cuda_peak

STAGES = ("pretrain", "fused", "finetune", "export")
MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_efficient_attention", "convolution")


class CpuMatmuls:
    """A dispatch mode that counts the matrix products (and attention kernels) run on the CPU, by op."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts: dict[str, int] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in MATMULS:
                    import torch

                    devices = {a.device.type for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)}
                    if "cpu" in devices:
                        counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.counts, self._mode = counts, Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _stages(work: Path, base: str, corpora: dict, task: dict, device: str, dtype: str, steps: int) -> dict:
    """Run every stage once in `work`; {stage: {time_s, step_time_s, peak_mib, ...}}."""
    from ..export import export
    from ..finetune import finetune
    from ..library.fused import pretrain_fused
    from ..library.pretrain import PretrainConfig, pretrain

    common = dict(base=base, rank=4, alpha=8, max_steps=steps, batch_size=4, seq_len=128, lr=5e-4, device=device,
                  dtype=dtype, eval_blocks=4, save_steps=0, progress=False, overwrite=True)
    out = {}

    def timed(name, fn):
        reset_cuda_peak(device)
        t = time.perf_counter()
        result = fn()
        peak = peak_cuda_mb(device)
        out[name] = {"time_s": round(time.perf_counter() - t, 2), "peak_mib": None if peak is None else round(peak, 1)}
        return result

    metas = timed("pretrain", lambda: [pretrain(domain=d, data=[p], library=str(work / "lib"), **common)
                                       for d, p in corpora.items()])
    out["pretrain"].update(step_time_s=round(sum(m["train_time_s"] for m in metas) / (steps * len(metas)), 4),
                           losses={m["domain"]: m["train_loss"] for m in metas})
    fused = timed("fused", lambda: pretrain_fused(
        [PretrainConfig(domain=d, data=[p], library=str(work / "fused"), **common) for d, p in corpora.items()],
        progress=False))
    failed = {d: r["error"] for d, r in fused.items() if r["status"] == "failed"}
    if failed:
        raise RuntimeError(f"fused stage 1 failed: {failed}")
    out["fused"]["losses"] = {d: r["meta"]["train_loss"] for d, r in fused.items()}
    ft = timed("finetune", lambda: finetune(train=task["train"], eval=task["eval"], out=str(work / "task"),
                                            library=str(work / "lib"), base=base, max_steps=steps, batch_size=8,
                                            max_seq_len=128, device=device, dtype=dtype, save_steps=0,
                                            eval_every=10 ** 6, progress=False, overwrite=True))
    out["finetune"].update(step_time_s=ft["step_time_s"], train_loss=ft["train_loss"], macro_f1=ft["macro_f1"])
    timed("export", lambda: [export(work / "task", work / f"export-{f}", f, overwrite=True)
                             for f in ("merged", "peft-lora")])
    return out


def _export_logits(work: Path, texts: list[str], device: str) -> dict:
    """Logits of the task model and of its two exports on `texts`, all in fp32 on `device`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from ..finetune import load_task_model

    model, tok, spec = load_task_model(work / "task", device=device)
    merged = AutoModelForSequenceClassification.from_pretrained(work / "export-merged").to(device)
    lora_base = AutoModelForSequenceClassification.from_pretrained(spec["base_path"], num_labels=len(spec["labels"]))
    lora = PeftModel.from_pretrained(lora_base, work / "export-peft-lora").to(device)
    out = {}
    with torch.no_grad():  # one text at a time: no padding, whatever the base's pad token
        for name, m in (("task", model), ("merged", merged), ("peft-lora", lora)):
            m = m.float().eval()
            out[name] = torch.cat([m(**tok(t, return_tensors="pt").to(device)).logits.float().cpu() for t in texts])
    return out


def _stage1_fp32(work: Path, base: str, corpus: str, device: str) -> dict:
    """One module in fp32 (4 steps): its losses and tensors."""
    from safetensors.torch import load_file

    from ..library.pretrain import pretrain

    meta = pretrain(domain="ref", data=[corpus], library=str(work), base=base, rank=4, alpha=8, max_steps=4,
                    batch_size=4, seq_len=128, lr=5e-4, device=device, dtype="fp32", eval_blocks=4, save_steps=0,
                    progress=False, overwrite=True)
    return {"losses": [h["loss"] for h in meta["loss_history"]],
            "tensors": load_file(str(work / "ref" / "adapter_model.safetensors"))}


def run(out: Path, base: str, data: Path, device: str, precisions: list[str], steps: int) -> dict:
    import torch

    from ..data.tasks import read_jsonl
    from ..training import versions

    corpora = {d: str(data / "corpora" / f"{d}.txt") for d in ("bio", "news")}
    task = {"train": str(data / "tasks" / "product-sentiment" / "train.jsonl"),
            "eval": str(data / "tasks" / "product-sentiment" / "dev.jsonl")}
    texts = [r["text"] for r in read_jsonl(task["eval"], ("text", "label"))[:8]]
    report = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device, "base": base,
              "steps": steps, "versions": versions(), "precisions": {}, "watched_cpu_matmuls": {}, "checks": {}}
    checks = report["checks"]
    for dtype in precisions:
        work = out / "work" / dtype
        report["precisions"][dtype] = _stages(work, base, corpora, task, device, dtype, steps)
        with CpuMatmuls() as watch:
            _stages(out / "work" / f"{dtype}-watched", base, corpora, task, device, dtype, 2)
        if device != "cpu":  # (on the CPU, `cpu_matmuls` shows the watch at work)
            checks[f"{dtype}: no matrix product on the CPU"] = {"ok": not watch.counts, "cpu_matmuls": watch.counts}
        report["watched_cpu_matmuls"][dtype] = watch.counts
        runs, tol = report["precisions"][dtype], 1e-3 if dtype == "fp32" else 2e-2
        gap = max(abs(runs["fused"]["losses"][d] - loss) / abs(loss) for d, loss in runs["pretrain"]["losses"].items())
        checks[f"{dtype}: fused stage 1 = separate runs"] = {"ok": gap < tol, "max_relative_loss_diff": gap}
        logits = _export_logits(work, texts, device)
        for name in ("merged", "peft-lora"):
            diff = (logits[name] - logits["task"]).abs().max().item()
            checks[f"{dtype}: {name} export = task model"] = {"ok": diff < 1e-3, "max_abs_diff": diff}
    here, there = (_stage1_fp32(out / "work" / f"fp32-{d}", base, corpora["bio"], d) for d in ("cpu", device))
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(here["losses"], there["losses"]))
    tensor_diff = max((here["tensors"][k].float() - there["tensors"][k].float()).abs().max().item()
                      for k in here["tensors"])
    checks[f"fp32 stage 1: {device} = cpu"] = {"ok": loss_diff < 1e-3 and tensor_diff < 1e-3,
                                               "max_relative_loss_diff": loss_diff, "max_abs_tensor_diff": tensor_diff}
    report["ok"] = all(c["ok"] for c in checks.values())
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m domix.bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/gpu-check", help="where gpu-check.json (and the runs, under work/) go")
    ap.add_argument("--device", default="cuda", help="the device to check (cuda, cuda:N; cpu runs the same "
                                                      "stages on the CPU, a dry run of the check itself)")
    ap.add_argument("--precisions", default="bf16,fp16", help="comma list of fp32, bf16, fp16")
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps of each timed stage")
    ap.add_argument("--base", default="smollm2-135m", help="the base model (default: the offline default)")
    ap.add_argument("--data", default=None, help="benchmark data folder (corpora/, tasks/); default: domix's "
                                                 "cache, built from the PyPI packages when absent")
    a = ap.parse_args(argv)
    import torch

    from ..io import write_json

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: this machine has no CUDA device (torch.cuda.is_available() is False); "
              "--device cpu runs the check's stages on the CPU")
        return 2
    if a.data is None:
        from ..data.benchmark import build_benchmark_data
        from ..fetch import cache_dir

        build_benchmark_data()
        data = cache_dir() / "data"
    else:
        data = Path(a.data)
    out = Path(a.out)
    report = run(out, a.base, data, a.device, [p.strip() for p in a.precisions.split(",") if p.strip()], a.steps)
    write_json(out / "gpu-check.json", report)
    for name, c in report["checks"].items():
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {name}  {json.dumps({k: v for k, v in c.items() if k != 'ok'})}")
    for dtype, stages in report["precisions"].items():
        print(f"{dtype}: " + ", ".join(f"{s} {v['time_s']} s (peak {v['peak_mib']} MiB)" for s, v in stages.items()))
    print(f"wrote {out / 'gpu-check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
