"""What a benchmark measures in the process of its run (`bench dap`, `bench finetune`, `make gpu-check`):
the end of each optimizer step (a CUDA step ends when its kernels do), peak RSS and peak CUDA
memory; and how a peak that may be absent reads in a table."""
from __future__ import annotations

import time


def sync() -> None:
    """Wait for the CUDA kernels queued so far (nothing to wait for without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def step_timer():
    """A Trainer callback that stamps every optimizer step (`begin`, `end`: wall clock; `cpu_end`:
    this process's CPU time) and notes the RSS, parameters and precision at train start."""
    import psutil
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Stamps every optimizer step; notes the RSS and trainable parameters at train start."""

        def __init__(self):
            self.begin: list[float] = []
            self.end: list[float] = []
            self.cpu_end: list[float] = []  # this process's CPU time (all threads)
            self.rss_loaded = 0
            self.trainable = self.total = None
            self.weights_dtype, self.checkpointing = None, None  # what the run really trained with

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.rss_loaded = psutil.Process().memory_info().rss
            if model is not None:
                self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                self.total = sum(p.numel() for p in model.parameters())
                body = model.get_base_model() if hasattr(model, "get_base_model") else model
                self.weights_dtype = str(body.get_input_embeddings().weight.dtype).replace("torch.", "")
                self.checkpointing = bool(getattr(body, "is_gradient_checkpointing", False))

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync()  # a CUDA step ends when its kernels do, not when Python has queued them
            self.end.append(time.perf_counter())
            self.cpu_end.append(time.process_time())

    return StepTimer()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB; `ru_maxrss` is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_cuda_mb(device: str) -> float | None:
    """This process's peak CUDA memory allocated by torch (MiB) on a CUDA `device`; None elsewhere."""
    import torch

    return torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 20 if device.startswith("cuda") else None


def reset_cuda_peak(device: str) -> None:
    """Start `peak_cuda_mb` afresh on a CUDA `device` (cached blocks released first); nothing elsewhere."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def mib(v) -> str:
    """A peak in MiB for a table cell: '–' where there is none (not on a CUDA device)."""
    return "–" if v is None else f"{v:.0f}"
