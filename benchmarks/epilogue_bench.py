"""The MLP half of an image block compiled three ways, alone at the step's shapes: what max-autotune, with and
without Triton's persistent TMA matmul templates, saves where it can take bias and QuickGELU into the products.

    python -m benchmarks.epilogue_bench [--model ViT-B-16-quickgelu] [--batches 128x128] [--frames 4] [--device auto]
        [--out DIR]

A whole step's max-autotune tunes some 50 matrix products and every fused kernel, for minutes; this tunes the 6
products of one MLP, so ``benchmarks/gpu_step.sh`` (epilogue part) answers in one call what ``step_variants
+autotune+tma`` may not finish. The MLP half is ``x + ls_2(mlp(ln_2(x)))`` of the image tower's first block
(open_clip's ``ResidualAttentionBlock``: c_fc, QuickGELU, c_proj), as the student runs it: forward and backward
over (L+U)*T frames of its tokens, under bf16 autocast on the GPU. The ways (``train.loop.compile_options``), in
this order:

- ``default``: torch.compile's default mode, the trainer's GPU default;
- ``autotune+tma``: ``max-autotune-no-cudagraphs`` with ``--persistent_tma_matmul``;
- ``autotune``: ``max-autotune-no-cudagraphs``; after ``autotune+tma``, its candidates' times all come from
  inductor's autotune cache, which skips a product only when it has every candidate's time.

Each way: its first call (compile and tuning), its median time per call, that times the tower's layers (the
student's image blocks per step; the teacher's forward is left out), its largest difference to the default
way's output, and a profile of 2 calls (``train.profiling``: time by kernel kind and the top kernels; a product that
took its epilogue runs as a Triton template, ``triton_tem_...``, which counts as "fused (triton)"). Each way is timed
alone right after its compile (``s_alone``), so that a time limit keeps it; once every way is compiled, they are
timed again side by side, in ``ROUNDS`` interleaved rounds, and that median is ``s`` (``"timing"`` says which ``s``
is). Prints each way; with ``--out DIR`` also writes ``DIR/epilogue.json`` after each way and after the rounds
(without it, nothing is written).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.harness import (
    call_times,
    failure,
    image_tokens,
    kernel_setup,
    profile_or_error,
    relative_difference,
    time_call,
    training_call,
)
from pipeline.cli import fire_main
from pipeline.writer import atomic_write_bytes, json_bytes
from train.loop import compile_options
from train.profiling import sync

WAYS = (  # name, compile mode, --persistent_tma_matmul
    ("default", "default", False),
    ("autotune+tma", "max-autotune-no-cudagraphs", True),
    ("autotune", "max-autotune-no-cudagraphs", False),
)


def mlp_half(block: torch.nn.Module):
    """The second half of open_clip's ``ResidualAttentionBlock.forward``: the MLP and its residual add."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    return forward


ROUNDS, CALLS = 5, 4  # the side-by-side timing: rounds, each timing every way's CALLS calls after one untimed call


def way_row(block, x, grad, mode: str, tma: bool, device, dtype) -> tuple[dict, torch.Tensor, Callable]:
    """One way: the first call's seconds, then the median seconds of a forward and backward; its output, and its
    call (for the side-by-side rounds)."""
    # Each way has its own compiled function: dynamo keeps one entry per backend on the code object, so that they
    # can run side by side (a torch._dynamo.reset() here would make the earlier ways compile again when called)
    compiled = torch.compile(mlp_half(block), **compile_options(mode, tma))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    call = training_call(compiled, (x,), grad, [x, *block.parameters()], autocast)
    sync(device)
    start = time.perf_counter()
    out = call()
    sync(device)
    row = {"first_s": round(time.perf_counter() - start, 2), "s": time_call(call, device)}
    # which kernels ran: a product that took its epilogue is a Triton template ("triton_tem_...") there
    row.update(profile_or_error(call, device, 2, row["s"]))
    return row, out.detach().float(), call


def side_by_side(calls: dict[str, Callable], device, rounds: int = ROUNDS, per_round: int = CALLS) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, timed in interleaved rounds: each round times every call
    ``per_round`` times, after one untimed call, so that a slow moment of the machine hits every way alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name] += call_times(call, device, warmup=1, iters=per_round)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def main(
    model: str = "ViT-B-16-quickgelu", batches: str = "128x128", frames: int = 4, device: str = "auto", out: str = ""
) -> dict:
    """Time the MLP half of an image block compiled each way at the student's rows; with --out DIR, write
    DIR/epilogue.json.

    Args:
        model: open_clip model name or model-config JSON (random weights, nothing is downloaded).
        batches: the step's batch as one LxU (L labeled + U unlabeled videos), e.g. 128x128; the block runs over the
            student's (L+U) x frames images.
        frames: frames per video.
        device: auto, cuda or cpu; bf16 autocast on a GPU, fp32 on the CPU.
        out: folder to write epilogue.json into; "" = print only, write nothing.
    """
    setup = kernel_setup(model, batches, device, frames, out)
    n_lab, n_unl, dev, dtype, clip, name = setup
    tower = clip.visual.transformer
    block = copy.deepcopy(tower.resblocks[0]).to(dev)
    tokens = image_tokens(clip)
    images = (n_lab + n_unl) * frames
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(images, tokens, tower.width, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
    grad = torch.randn(x.shape, device=dev, dtype=dtype, generator=gen)
    layers = len(tower.resblocks)
    print(
        f"epilogue_bench: {name}, torch {torch.__version__}, {model}, the MLP half of an image block over {images} "
        f"images of {tokens} tokens (the student's at {n_lab}+{n_unl}, {frames} frames), {dtype}, {layers} layers"
    )
    record = {
        **setup.header(model, frames),
        "images": images,
        "tokens": tokens,
        "layers": layers,
        "ways": [],  # in the order they ran (a list: the JSON's keys are sorted)
        "complete": False,
    }
    path = Path(str(out)) / "epilogue.json" if out else None
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
    torch._dynamo.reset()  # fresh compiles; inductor's caches on disk stay, as in a second run
    reference, calls = None, {}
    for way, mode, tma in WAYS:
        try:
            row, output, calls[way] = way_row(block, x, grad, mode, tma, dev, dtype)
        except Exception as e:  # a way that fails to compile or run is a result; the others still count
            row, output = {"error": failure(e)}, None
            print(f"  {way}: failed: {row['error']}", flush=True)
        if output is not None:
            if way == "default":
                reference = output
            row["s_alone"] = row["s"]
            row["step_s"] = row["s"] * layers
            # against the default way's output; None where that failed
            row["max_relative_difference"] = relative_difference(reference, output) if reference is not None else None
            difference = row["max_relative_difference"]
            print(
                f"  {way}: first call {row['first_s']} s, {1e3 * row['s']:.3f} ms per call alone, "
                f"{1e3 * row['step_s']:.1f} ms per step ({layers} layers); largest difference "
                + (f"{difference:.1e} of the largest output" if difference is not None else "n/a (no default way)"),
                flush=True,
            )
        record["ways"].append({"way": way, **row})
        record["timing"] = "alone, right after each compile"
        if path:
            atomic_write_bytes(path, json_bytes(record))
    if calls:
        seconds = side_by_side(calls, dev)
        for row in record["ways"]:
            if row["way"] in seconds:
                row["s"] = seconds[row["way"]]
                row["step_s"] = row["s"] * layers
        record["timing"] = f"side by side: {ROUNDS} interleaved rounds of {CALLS} calls each, median"
        print(
            "  side by side: "
            + ", ".join(
                f"{way} {1e3 * s:.3f} ms per call, {1e3 * s * layers:.1f} ms per step" for way, s in seconds.items()
            ),
            flush=True,
        )
    record["complete"] = True
    if path:
        atomic_write_bytes(path, json_bytes(record))
    return record


if __name__ == "__main__":
    fire_main(main, serialize=lambda record: None)  # main printed it already
