"""What the benchmark scripts share around a measurement: the device, synthetic batches, the trainer's models.

Each script measures one thing; these are the pieces around the measurement that
must not differ between them (the same synthetic inputs, the same models). They wait for
the device with ``train.profiling.sync``, as the trainer's profile does.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from benchmarks.args import parse_batches
from pipeline.cli import count_problems, folder_problems, raised_problems, refuse
from train import data, distributed, loop
from train.config import TrainConfig, resolve
from train.model import create_clip, device_problems, image_size, register_model
from train.profiling import activities, summarize, sync

MATMUL_N = 8192  # the bf16 matmul of the measured peak: (N, N) @ (N, N)
MATMUL_WARMUP, MATMUL_ITERS = 3, 10
WORDS = (
    "a man woman child dog cat car city street beach sunset river mountain forest kitchen chef cooks pasta "
    "playing guitar piano football basketball running jumping dancing slow motion aerial view of the timelapse "
    "clouds over old town at night close up hands typing on laptop keyboard young girl smiling in park with "
    "friends drone shot waves crashing rocks people walking crowded market snow falling trees autumn leaves"
).split()


def resolve_device(device) -> torch.device:
    """The device ``--device`` names (auto: CUDA where torch sees a GPU, else the CPU); one ``error:`` line for a
    value ``device_problems`` refuses."""
    refuse(device_problems(device))
    return torch.device(distributed.device_choice(device))


def model_problems(model) -> list[str]:
    """A line if ``--model`` is neither an open_clip model name nor a readable model-config JSON
    (``train.model.register_model``'s message, which names the flag); nothing is built."""
    return raised_problems(lambda name: register_model(str(name)), model)


def batches_problems(batches) -> list[str]:
    """A line if ``--batches`` is not a comma list of LxU (``benchmarks.args.parse_batches``'s message)."""
    return raised_problems(parse_batches, batches)


def measure_matmul_tflops(dev: torch.device) -> float:
    """Dense bf16 matmul TFLOP/s of this GPU, the denominator of every benchmark's measured MFU: (N, N) @ (N, N),
    N = 8192, mean over 10 after 3 warm-ups, timed with CUDA events (the GPU's own clock, no launch overhead).
    0.0 on a device that is not a GPU: no measured peak, no measured MFU."""
    if dev.type != "cuda":
        return 0.0
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(MATMUL_N, MATMUL_N, device=dev, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(MATMUL_N, MATMUL_N, device=dev, dtype=torch.bfloat16, generator=gen)
    c = torch.empty_like(a)
    for _ in range(MATMUL_WARMUP):
        torch.matmul(a, b, out=c)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(dev)
    start.record()
    for _ in range(MATMUL_ITERS):
        torch.matmul(a, b, out=c)
    end.record()
    torch.cuda.synchronize(dev)
    seconds = start.elapsed_time(end) / 1000 / MATMUL_ITERS
    del a, b, c
    torch.cuda.empty_cache()
    return 2 * MATMUL_N**3 / seconds / 1e12


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """The largest difference of ``other`` to ``reference``, as a share of the reference's largest magnitude: how the
    benchmarks compare two ways of computing the same function."""
    return float((other.float() - reference.float()).abs().max() / reference.float().abs().max())


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds of ``fn()``, waiting for the device around each call."""
    return statistics.median(call_times(fn, device, warmup, iters))


def call_times(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn()`` after ``warmup`` untimed ones, waiting for the device around
    each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def image_tokens(clip: torch.nn.Module) -> int:
    """Tokens per image in the image tower of open_clip ``clip``: one per patch of its square input, plus the class
    token."""
    return (image_size(clip) // clip.visual.conv1.kernel_size[0]) ** 2 + 1


def training_call(
    fn: Callable[..., torch.Tensor], inputs: tuple, grad: torch.Tensor, trained: list, autocast
) -> Callable[[], torch.Tensor]:
    """One training call of ``fn`` as the step makes it, for ``time_call``: ``fn(*inputs)`` under ``autocast``,
    its backward with gradient ``grad`` (in the output's dtype), then the ``trained`` tensors' gradients cleared so
    that calls do not accumulate them; returns the output."""

    def call() -> torch.Tensor:
        with autocast:
            out = fn(*inputs)
        out.backward(grad.to(out.dtype))
        for tensor in trained:
            tensor.grad = None
        return out

    return call


def failure(e: BaseException) -> str:
    """A failure as the benchmarks record it: the exception's type and the start of its message."""
    return f"{type(e).__name__}: {str(e).strip()[:300]}"


def profile_or_error(step: Callable[[], object], device: torch.device, steps: int, step_s: float) -> dict:
    """``{"profile": profile_steps(...)}``, or ``{"profile_error": ...}`` with the traceback printed: the profiler
    (CUPTI) failing is not the measured thing failing, whose timing the caller keeps."""
    try:
        return {"profile": profile_steps(step, device, steps, step_s)}
    except Exception as e:
        traceback.print_exc()
        return {"profile_error": failure(e)}


def profile_steps(step: Callable[[], object], device: torch.device, steps: int, step_s: float) -> dict:
    """GPU busy time per step by kernel kind (``train.profiling``), against the unprofiled step time."""
    from torch.profiler import profile

    with profile(activities=activities(device)) as prof:
        for _ in range(steps):
            step()
        sync(device)
    summary = summarize(prof, steps)
    return {**summary, "busy_fraction_of_step": summary["busy_s_per_step"] / step_s if step_s else None}


CAPTION_WORDS = 40  # the longest synthetic caption, in words


def synthetic_batch(n: int, frames: int, size: int, tokenizer, seed: int, pin: bool) -> data.Batch:
    """A :class:`train.data.Batch` of ``n`` random videos (uint8 pixels, as the loader gives) and random captions."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (n, frames, 3, size, size), generator=gen, dtype=torch.uint8)  # (B, T, 3, S, S)
    rng = random.Random(seed)
    # 4-40 words of one token each: 24 tokens on average and 42 at most, as the 20 real WebVid captions of the
    # shared test CSV (4-33 words, 21 tokens on average, 42 at most), so a batch is cut (--trim_text) to their 48
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(4, CAPTION_WORDS))) for _ in range(n)]
    batch = data.Batch(
        video=video,
        tokens=tokenizer(texts),  # (B, L) int64: SOT, word pieces, EOT, zero padding
        texts=texts,
        keys=[f"synthetic{seed}_{i:06d}" for i in range(n)],
        index=torch.full((n,), -1, dtype=torch.long),
        dropped=0,
    )
    return batch.pin_memory() if pin else batch


def checked_args(model: str, batches, problems: Sequence[str] = ()) -> list[tuple[int, int]]:
    """A benchmark CLI's ``--model`` and ``--batches``, checked before any work with the ``problems`` its other flags
    have: the (L, U) batches, or a one-line ``error:`` exit that says what to change."""
    refuse(model_problems(model) + batches_problems(batches) + list(problems))
    return parse_batches(batches)


class KernelSetup(NamedTuple):
    """What a benchmark of kernels alone at the step's shapes starts from (``kernel_setup``)."""

    n_lab: int  # labeled videos of the step
    n_unl: int  # unlabeled videos
    device: torch.device
    dtype: torch.dtype  # what the step runs them in: bf16 on the GPU (autocast), fp32 on the CPU
    clip: torch.nn.Module  # the model, random weights, on the CPU
    name: str  # the device's name, for the records

    def header(self, model: str, frames: int) -> dict:
        """The fields such a benchmark's record starts with: what ran, where, at which shapes."""
        batch = f"{self.n_lab}x{self.n_unl}"
        return dict(
            device=self.name, torch=torch.__version__, model=model, batch=batch, frames=frames, dtype=str(self.dtype)
        )


def kernel_setup(model: str, batches: str, device: str, frames: int, out: str) -> KernelSetup:
    """The step's one LxU batch and its frames per video, the device, dtype and model; the flags, ``--out`` too, are
    checked first (a one-line ``error:`` exit)."""
    problems = count_problems({"frames": (frames, 1)}) + device_problems(device) + folder_problems({"out": out})
    if not batches_problems(batches) and len(parse_batches(batches)) > 1:
        problems.append(f"--batches takes one LxU here (the step's batch), got {batches!r}")
    ((n_lab, n_unl),) = checked_args(model, batches, problems)
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return KernelSetup(n_lab, n_unl, dev, dtype, create_clip(model), name)


def checked_config(recipe: str, **overrides) -> TrainConfig:
    """``train.config.resolve``, for a benchmark CLI: a value out of range is a one-line ``error:`` exit, with
    TrainConfig's message naming the flag, before any work."""
    try:
        return resolve(recipe, **overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# step_variants' option -> the trainer's layer-lever flag; the trainer's defaults turn the first three on, and
# NO_LEVERS leaves open_clip's own layers (step_variants' bases, gpu_numerics' plain side)
LEVER_FLAGS = {"qkv": "packed_qkv", "patch": "linear_patch_embed", "cls": "cls_last_block", "split": "split_qkv"}
NO_LEVERS = {flag: False for flag in LEVER_FLAGS.values()}


def random_models(model: str, frames: int, dist: distributed.DistInfo, **overrides) -> tuple[TrainConfig, loop.Models]:
    """The paper recipe's config (checked: ``checked_config``) and the trainer's models (``train.loop.build_models``)
    with random weights."""
    with tempfile.TemporaryDirectory() as tmp:  # build_models saves the random teacher there
        cfg = checked_config(
            "paper",
            model=model,
            teacher_weights="",
            out=tmp,
            frames=frames,
            wandb="off",
            progress=False,
            device=dist.device.type,
            **overrides,
        )
        return cfg, loop.build_models(cfg, dist)
