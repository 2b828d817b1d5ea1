"""Where a training step's time goes: torch.profiler over a few steps, the device's time by kind of kernel.

``python -m train.main ... --profile_steps 5`` profiles 5 steps after the first log
window (so that torch.compile and the loader workers' start-up stay out of it). Each rank
writes its trace to ``OUT/profile/rank{R}.pt.trace.json.gz`` (open it in
https://ui.perfetto.dev or TensorBoard's profiler plugin) and its summary to
``OUT/profile/rank{R}.json``; rank 0 prints the summary and logs it to W&B.
``benchmarks.step_variants --profile`` makes the same summary.

The kinds come from the kernels' names: fused (the Triton kernels torch.compile writes: norms,
activations, residual adds, layout copies), copy, attention (SDPA's flash, memory-efficient or
cuDNN kernels), optimizer (fused AdamW), convolution (cuDNN's; the ViT's patch embedding unless
``--linear_patch_embed``), matmul (cuBLAS / CUTLASS GEMMs), other. The busy time against
the steps' wall time says how long the device idled (launch gaps, host syncs, waiting
for data): it counts the time in which any kernel ran, once, where kernels on several
streams overlap (each kind's time is its kernels' sum). The idle time between kernels is
split by the gaps' sizes (``train.gaps.idle_gaps``): many gaps of a few µs are kernel boundaries
(fewer kernels or CUDA graphs remove them), a few long ones are the GPU waiting for the host.
The kinds say which part of the work to speed up. On a CPU the summary counts the self time
of PyTorch's operators instead of kernels.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

from pipeline.writer import atomic_write_bytes, json_bytes
from train.gaps import describe_idle, idle_gaps

KERNEL_KINDS = {  # first match wins, on the lower-cased kernel (or CPU operator) name
    # first: a Triton kernel is one torch.compile fused, whatever its name says it does ("..._attention_...clone")
    "fused (triton)": r"^triton_",
    "copy": r"memcpy|memset|copy_kernel|cat_|catarray|^aten::(copy_|cat|_to_copy)$",
    # cuDNN's attention backward runs two helper kernels besides its flash kernel: dot(dO, O) and dQ's conversion
    "attention": r"flash|fmha|attention|sdpa|efficient|dot_do_o|convert_dq",
    "optimizer": r"adam|multi_tensor|foreach|fused_adam",
    # before matmul: cuDNN names some convolutions "...sgemm" or "...implicit_gemm"
    "convolution": r"convolve|conv2d|convolution|implicit_gemm|wgrad|dgrad|im2col",
    "matmul": r"gemm|matmul|cutlass|xmma|nvjet|sm\d+_|cublas|wgmma|^aten::(add|b|baddb)?mm$",
}


def kernel_kind(name: str) -> str:
    lower = name.lower()
    if lower.startswith("triton_tem_"):  # max-autotune's templates: a matrix product (or convolution), epilogue fused
        return "convolution" if "conv" in lower else "matmul"
    return next((kind for kind, pattern in KERNEL_KINDS.items() if re.search(pattern, lower)), "other")


def summarize(prof, steps: int, top: int = 25) -> dict:
    """Busy time per step, by kind, and the top kernels, of a finished ``torch.profiler.profile``.

    With CUDA activity, the device's kernels and copies; without (a CPU run), the self time of
    ``aten::`` operators (Python overhead and the profiler's own events are left out).
    """
    events = prof.key_averages()
    on_gpu = any(event.device_type == DeviceType.CUDA for event in events)
    kernels = []
    for event in events:
        if on_gpu:
            if not _is_kernel(event):
                continue
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            if not event.key.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        kernels.append((event.key, us / 1e6 / steps, event.count / steps))
    kinds: dict[str, float] = {}
    for name, seconds, _ in kernels:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + seconds
    ranked = sorted(kernels, key=lambda k: -k[1])[:top]
    named = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events() if _is_kernel(e)] if on_gpu else []
    spans = [(start, end) for start, end, _ in named]
    summary = {
        "device": "cuda" if on_gpu else "cpu",
        "steps": steps,
        # kernels on several streams (the prefetcher's, the teacher's) overlap: their sum would count that time twice
        "busy_s_per_step": union_s(spans) / 1e6 / steps if spans else sum(kinds.values()),
        "kernel_s_per_step": sum(kinds.values()),
        "by_kind_s_per_step": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": n[:160], "s_per_step": t, "calls_per_step": c} for n, t, c in ranked],
    }
    if named:
        summary["idle"] = idle_gaps(named, steps)
    return summary


def _is_kernel(event) -> bool:
    """Whether a profiler event is work on the GPU: kineto's spans of record_function ranges on its timeline
    (Optimizer.step#AdamW.step) are not; they hold the kernels inside them, and the gaps between those."""
    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def union_s(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the ``(start, end)`` intervals: the time in which at least one of them ran."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def describe(summary: dict, step_s: float | None = None) -> str:
    """One line: busy ms per step (and its share of ``step_s``), then each kind's ms."""
    busy = summary["busy_s_per_step"]
    share = f" ({100 * busy / step_s:.0f}% of {1e3 * step_s:.1f} ms)" if step_s else ""
    kinds = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in summary["by_kind_s_per_step"].items())
    where = "GPU" if summary["device"] == "cuda" else "CPU"
    gaps = f"; {describe_idle(summary['idle'])}" if summary.get("idle") else ""
    return f"{where} busy {1e3 * busy:.1f} ms per step{share}: {kinds}{gaps}"


def profile_window(start: int, steps: int, last: int, val_every: int) -> tuple[int, int]:
    """The steps to profile, as (first, end) counts of finished steps: after ``start``, ``steps`` of them,
    cut short by the run's end (``last``) and by the next validation (not training, so not profiled)."""
    next_val = (start // val_every + 1) * val_every
    return start, min(start + steps, last, next_val)


class StepProfiler:
    """Profiles the steps of one window of a training run (see the module docstring).

    Call ``begin(step)`` before every step and ``end(step)`` after it, with the count of
    finished steps; ``end`` returns the summary once, when the window closes.
    """

    def __init__(self, steps: int, start: int, last: int, val_every: int, device: torch.device, out: Path, rank: int):
        self.first, self.end_at = profile_window(start, steps, last, val_every)
        self.device, self.out, self.rank = device, out, rank
        self.prof = None
        self.t0 = 0.0

    @property
    def planned(self) -> int:
        return max(0, self.end_at - self.first)

    def begin(self, step: int) -> None:
        if self.planned and step == self.first and self.prof is None:
            from torch.profiler import profile

            self.prof = profile(activities=activities(self.device))
            sync(self.device)
            self.prof.start()
            self.t0 = time.perf_counter()

    def end(self, step: int) -> dict | None:
        if self.prof is None or step < self.end_at:
            return None
        sync(self.device)
        wall = (time.perf_counter() - self.t0) / self.planned
        self.prof.stop()
        summary = {**summarize(self.prof, self.planned), "first_step": self.first + 1, "wall_s_per_step": wall}
        self.out.mkdir(parents=True, exist_ok=True)
        # written under a temporary name and renamed: an interrupted run leaves no half-written trace
        trace = self.out / f"rank{self.rank}.pt.trace.json.gz"
        partial = self.out / f".rank{self.rank}.partial.json.gz"  # export_chrome_trace gzips a path ending .gz
        self.prof.export_chrome_trace(str(partial))
        os.replace(partial, trace)
        summary["trace"] = str(trace)
        atomic_write_bytes(self.out / f"rank{self.rank}.json", json_bytes(summary))
        self.prof = None
        return summary

    def close(self) -> None:
        """Stops a profile a failed run left open; nothing is written."""
        if self.prof is not None:
            self.prof.stop()
            self.prof = None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings must include it); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def activities(device: torch.device) -> list:
    """What torch.profiler records: the host's operators, and the kernels and copies on a GPU."""
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
