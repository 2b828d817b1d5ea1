"""The naive FitCLIP step against the trainer's step and its optimised variants, side by side on one device.

    python -m benchmarks.step_variants [--model ViT-B-16-quickgelu] [--batches 128x128] \\
        [--variants naive,ours,ours+compile,ours+compile+ckpt] [--steps 10] [--warmup 3] [--out DIR]

naive: what a straightforward open_clip implementation does: separate student
forwards for the labeled and the unlabeled batch, the teacher in fp32 weights
under bf16 autocast with no_grad, plain (for-each) AdamW, the batch joined on
the host. ours: ``train.loop.train_step`` as the trainer runs it (one student
forward over both batches, teacher in bf16 weights under inference mode, fused
AdamW, per-batch pinned copies). +compile: ``torch.compile`` of the student;
+ckpt: activation checkpointing in the student. Every variant starts from the
same weights and sees the same batches; the loss of its first step is reported
so numerics can be compared. MFU is against the datasheet bf16 peak and a bf16
matmul peak measured in the same run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import fire
import torch

from train import distributed, loop
from train.config import resolve
from train.data import Batch
from train.loss import DISTILLATION, contrastive_loss, fitclip_loss
from train.model import VideoTextModel, image_size, normalize_frames, tokenizer_for
from train.monitor import forward_flops, peak_tflops, step_flops


def synthetic_batch(n: int, frames: int, size: int, tokenizer, seed: int, pin: bool) -> Batch:
    g = torch.Generator().manual_seed(seed)
    words = ["red", "circle", "moving", "left", "over", "a", "striped", "background", "dog", "runs", "beach"]
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (8,), generator=g)) for _ in range(n)]
    video = torch.randint(0, 256, (n, frames, 3, size, size), generator=g, dtype=torch.uint8)  # as the loader gives
    batch = Batch(video, tokenizer(texts), texts, [str(i) for i in range(n)], torch.arange(n), 0)
    return batch.pin_memory() if pin else batch


def as_float_batch(batch: Batch) -> Batch:
    """The same pixels as a naive loader hands them over: CLIP-normalised float32 on the host (4x the bytes)."""
    return dataclasses.replace(batch, video=normalize_frames(batch.video))


def naive_step(student, teacher_fp32, optimizer, lab: Batch, unl: Batch, cfg, device) -> dict:
    """The straightforward step (see the module docstring)."""
    optimizer.zero_grad(set_to_none=True)
    frames = torch.cat([lab.video, unl.video]).to(device)  # joined on the host: an unpinned copy
    tokens = torch.cat([lab.tokens, unl.tokens]).to(device)
    n = lab.video.shape[0]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with amp:
        lv, lt = student(frames[:n], tokens[:n])
        uv, ut = student(frames[n:], tokens[n:])
        with torch.no_grad():
            tv, tt = teacher_fp32(frames[n:], tokens[n:])
    contrastive = contrastive_loss(lv, lt, cfg.sigma)
    distill = DISTILLATION[cfg.distillation](uv, ut, tv, tt, cfg.sigma)
    loss = fitclip_loss(contrastive, distill, cfg.lam)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach()}


def measure_peak_bf16(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def run_variant(variant: str, base_models, cfg, lab, unl, device, steps: int, warmup: int) -> dict:
    options = set(variant.split("+"))
    cfg_v = dataclasses.replace(cfg, compile="compile" in options, grad_checkpointing="ckpt" in options)
    student_clip = copy.deepcopy(base_models["student"])
    student_clip.logit_scale.requires_grad_(False)
    if cfg_v.grad_checkpointing:
        student_clip.set_grad_checkpointing(True)
    student = VideoTextModel(student_clip, cfg.renormalize_video).to(device)
    row = {"variant": variant, "batch": f"{lab.video.shape[0]}x{unl.video.shape[0]}"}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if "naive" in options:
            teacher = base_models["teacher_fp32"]
            params = [p for p in student.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)

            lab_f, unl_f = as_float_batch(lab), as_float_batch(unl)

            def step():
                return naive_step(student, teacher, optimizer, lab_f, unl_f, cfg, device)
        else:
            trained = torch.compile(student) if cfg_v.compile else student
            models = loop.Models(student, trained, base_models["teacher"])
            optimizer, scheduler = loop.build_optimizer(student, cfg_v, device)

            def step():
                return loop.train_step(models, optimizer, scheduler, lab, unl, cfg_v, device, loop.Progress())

        times, losses = [], []
        start_compile = time.perf_counter()
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            result = step()
            losses.append(float(result["loss"]))
            _sync(device)
            if i == 0:
                row["first_step_s"] = round(time.perf_counter() - start_compile, 2)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        row.update(s_per_step=statistics.median(times), first_loss=losses[0], last_loss=losses[-1], status="ok")
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM", peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)
    return row


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(
    model: str = "ViT-B-16-quickgelu",
    batches: str = "128x128",
    variants: str = "naive,ours,ours+compile",
    steps: int = 10,
    warmup: int = 3,
    frames: int = 4,
    device: str = "auto",
    memory_gib: float = 0.0,
    out: str = "benchmarks/output",
) -> None:
    """Time each variant at each batch (LxU) in one run.

    Args:
        memory_gib: cap the GPU memory this process may use (e.g. 80 to check an H100's budget on an H200).
    """
    dist = distributed.init_distributed(device)
    dev = dist.device
    if memory_gib and dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(memory_gib) / total), dev)
    batch_list = [
        tuple(int(x) for x in b.split("x"))
        for b in (batches.split(",") if isinstance(batches, str) else [str(b) for b in batches])
    ]
    variant_list = variants.split(",") if isinstance(variants, str) else list(variants)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve(
            "paper",
            model=model,
            teacher_weights="",
            out=tmp,
            frames=frames,
            wandb="off",
            progress=False,
            device=dev.type,
        )
        models = loop.build_models(cfg, dist)
    base = {
        "student": models.student.clip.cpu(),
        "teacher": models.teacher,
        "teacher_fp32": copy.deepcopy(models.student).to(dev).eval().requires_grad_(False),
    }
    tokenizer = tokenizer_for(model)
    size = image_size(base["student"])
    # Count on a model in train mode: in eval mode without gradients nn.MultiheadAttention takes a fused fast path
    # whose projections FlopCounterMode does not see (96 instead of 146 GFLOP for a ViT-B/16 video).
    counted = VideoTextModel(copy.deepcopy(base["student"]), cfg.renormalize_video).to(dev).train()
    per_video = forward_flops(
        counted, torch.zeros(1, frames, 3, size, size, device=dev), tokenizer(["a video"]).to(dev)
    )
    del counted
    measured = measure_peak_bf16(dev)
    datasheet = peak_tflops(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"step_variants: {name}, torch {torch.__version__}, {model}, {frames} frames of {size}px, "
        f"{per_video / 1e9:.2f} GFLOP per video forward, bf16 peak measured {measured:.0f} TFLOP/s "
        f"(datasheet {datasheet:.0f})" + (f", memory capped at {memory_gib} GiB" if memory_gib else ""),
        flush=True,
    )
    rows = []
    for n_lab, n_unl in batch_list:
        lab = synthetic_batch(n_lab, frames, size, tokenizer, 1, dev.type == "cuda")
        unl = synthetic_batch(n_unl, frames, size, tokenizer, 2, dev.type == "cuda")
        flops = step_flops(per_video, per_video, n_lab, n_unl)
        for variant in variant_list:
            row = run_variant(variant, base, cfg, lab, unl, dev, steps, warmup)
            if row["status"] == "ok":
                s = row["s_per_step"]
                row["videos_per_s"] = (n_lab + n_unl) / s
                row["tflops"] = flops / s / 1e12
                row["mfu_measured"] = row["tflops"] / measured if measured else None
                row["mfu_datasheet"] = row["tflops"] / datasheet if datasheet else None
            rows.append(row)
            print(
                f"  {row['batch']} {variant}: "
                + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in row.items()
                    if k not in ("variant", "batch")
                ),
                flush=True,
            )
    naive = {r["batch"]: r for r in rows if r["variant"] == "naive" and r["status"] == "ok"}
    print(
        "\n| batch | variant | s/step | videos/s | vs naive | TFLOP/s | MFU (measured peak) | MFU (datasheet) | "
        "peak GiB | first step s | loss (first step) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['batch']} | {r['variant']} | {r['status']} | | | | | | {r.get('peak_gib', 0):.1f} | | |")
            continue
        speedup = r["videos_per_s"] / naive[r["batch"]]["videos_per_s"] if r["batch"] in naive else float("nan")
        mfu_m = f"{100 * r['mfu_measured']:.1f}%" if r.get("mfu_measured") else "n/a"
        mfu_d = f"{100 * r['mfu_datasheet']:.1f}%" if r.get("mfu_datasheet") else "n/a"
        print(
            f"| {r['batch']} | {r['variant']} | {r['s_per_step']:.4f} | {r['videos_per_s']:.1f} | {speedup:.2f}x | "
            f"{r['tflops']:.1f} | {mfu_m} | {mfu_d} | {r.get('peak_gib', float('nan')):.1f} | "
            f"{r['first_step_s']} | {r['first_loss']:.5f} |"
        )
    Path(out).mkdir(parents=True, exist_ok=True)
    record = {
        "device": name,
        "torch": torch.__version__,
        "model": model,
        "frames": frames,
        "per_video_flops": per_video,
        "peak_measured_tflops": measured,
        "peak_datasheet_tflops": datasheet,
        "rows": rows,
    }
    path = Path(out) / f"step_variants_{name.lower().replace(' ', '-')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    fire.Fire(main)
