"""GPU check: the optimised step (bf16 autocast, bf16 teacher, torch.compile) against the plain fp32 step.

    python -m benchmarks.gpu_numerics [--model ViT-B-16-quickgelu] [--batch 16] [--compile True] \
        [--packed_qkv True] [--split_qkv False] [--attention_kernel auto] [--linear_patch_embed True] \
        [--cls_last_block True] [--teacher_stream off] [--out DIR]

Same weights, same uint8 batches and captions (cut after the longest of each batch on the optimised side, as the
trainer's loader cuts them, ``--trim_text``; at the full context length on the plain side): prints the loss of each
and the cosine similarity and norm ratio of the student's gradients. Expected: loss within ~1e-2 relative, gradient
cosine > 0.99 (bf16 tolerance). The optimised side takes the trainer's speed flags (``--compile``, on the GPU only;
``--packed_qkv``; ``--split_qkv``; ``--attention_kernel``; ``--linear_patch_embed``; ``--cls_last_block``;
``--teacher_stream``, which checks that the two streams are joined where they must be: with ``ahead`` the
teacher's embeddings are queued before the step, as the step before queues them); the plain side is always
open_clip's own layers, eager, in fp32. With ``--out`` the figures, the flags and the non-finite gradient count are
also written to ``DIR/numerics.json``, which ``benchmarks.issue6_verdict`` judges.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from benchmarks.harness import NO_LEVERS, model_problems, random_models, synthetic_batch
from pipeline.cli import count_problems, fire_main, folder_problems, refuse, switch_problems
from pipeline.writer import atomic_write_bytes, json_bytes
from train import distributed, loop
from train.config import ATTENTION_KERNELS, TEACHER_STREAMS
from train.model import VideoTextModel, create_clip, freeze, image_size, text_tokenizer, tokenizer_for


@contextlib.contextmanager
def full_fp32(on: bool = True):
    """cuDNN's convolutions (the patch embedding's) without TF32 inside, as the plain fp32 reference needs: torch
    lets them use TF32 by default (torch.backends.cudnn.allow_tf32), its matrix products not."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = old and not on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def flag_problems(
    model, batch, frames, compile, attention_kernel, out, switches: dict, teacher_stream="off"
) -> list[str]:
    """A line for each flag out of range, checked before any model is built: ``switches`` are the levers that must be
    True or False."""
    problems = model_problems(model) + count_problems({"batch": (batch, 1), "frames": (frames, 1)})
    problems += switch_problems({"compile": compile, **switches})
    if attention_kernel not in ATTENTION_KERNELS:
        problems.append(f"--attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}, got {attention_kernel!r}")
    if teacher_stream not in TEACHER_STREAMS:
        problems.append(f"--teacher_stream must be one of {', '.join(TEACHER_STREAMS)}, got {teacher_stream!r}")
    return problems + folder_problems({"out": out})


def main(
    model: str = "ViT-B-16-quickgelu",
    batch: int = 16,
    frames: int = 4,
    compile: bool = True,
    packed_qkv: bool = True,
    split_qkv: bool = False,
    attention_kernel: str = "auto",
    linear_patch_embed: bool = True,
    cls_last_block: bool = True,
    teacher_stream: str = "off",
    out: str = "",
) -> dict:
    """Run the optimised step and the plain fp32 step on the same weights and batches; print their losses, the
    gradient cosine and norm ratio (with --out DIR, also write DIR/numerics.json), and return them.

    Args:
        model: open_clip model name or model-config JSON (random weights, nothing is downloaded).
        batch: videos in each of the labeled and the unlabeled batch.
        frames: frames per video.
        compile: torch.compile the optimised side's student and teacher, as the trainer's --compile (on a GPU
            only; on the CPU both sides run eager).
        packed_qkv: the optimised side attends on views of the packed QKV projection (the trainer's --packed_qkv;
            this and the last two levers below default to the trainer's defaults, on).
        split_qkv: the optimised side's packed attention takes q, k and v from three products (the trainer's
            --split_qkv).
        attention_kernel: the SDPA kernel the optimised side tries first (the trainer's --attention_kernel), one of
            auto, cudnn, flash, efficient or math.
        linear_patch_embed: the optimised side's patch embedding as one matrix product (the trainer's
            --linear_patch_embed).
        cls_last_block: the optimised side's last image block for the class token only (the trainer's
            --cls_last_block).
        teacher_stream: where the optimised side's teacher runs (the trainer's --teacher_stream; on the GPU only):
            off, beside (on a second CUDA stream, beside the student's forward) or ahead (queued on it before the
            step, as the step before queues it in training).
        out: folder to write numerics.json into; "" = print only, write nothing.
    """
    levers = dict(
        packed_qkv=packed_qkv,
        split_qkv=split_qkv,
        attention_kernel=attention_kernel,
        linear_patch_embed=linear_patch_embed,
        cls_last_block=cls_last_block,
        teacher_stream=teacher_stream,
    )
    switches = {name: value for name, value in levers.items() if name not in ("attention_kernel", "teacher_stream")}
    refuse(flag_problems(model, batch, frames, compile, attention_kernel, out, switches, teacher_stream))
    dist = distributed.init_distributed("auto")
    dev = dist.device
    # bf16 teacher on the GPU, the student compiled there; a flag out of range exits with TrainConfig's message
    fast, models = random_models(model, frames, dist, compile=compile and dev.type == "cuda", **levers)
    flags = {"compile": bool(fast.compile), **levers}
    print(f"gpu_numerics: {model}, " + ", ".join(f"{k} {v}" for k, v in flags.items()))
    # its models are built afresh below (open_clip's own layers); its config says so, and runs one stream
    plain_cfg = dataclasses.replace(
        fast, precision="fp32", compile=False, teacher_stream="off", attention_kernel="auto", **NO_LEVERS
    )

    def plain_clip() -> torch.nn.Module:  # the same weights in a model built afresh: open_clip's own layers
        clip = create_clip(model)
        clip.load_state_dict(models.student.clip.state_dict())
        return clip

    student = VideoTextModel(plain_clip(), fast.renormalize_video).to(dev)
    teacher = freeze(VideoTextModel(plain_clip(), fast.renormalize_video)).to(dev)
    plain = loop.Models(student, student, teacher)  # fp32 everywhere, eager
    size = image_size(student.clip)
    # the same captions: at the full context length for the plain step, cut as the trainer's loader cuts them
    # (--trim_text, its default) for the optimised one
    tokenizers = {"plain fp32": tokenizer_for(model)}
    tokenizers["optimised"] = text_tokenizer(models.student.clip, tokenizers["plain fp32"], fast.trim_text)
    results, widths = {}, {}
    for name, m, cfg in (("plain fp32", plain, plain_cfg), ("optimised", models, fast)):
        lab, unl = (synthetic_batch(batch, frames, size, tokenizers[name], k, dev.type == "cuda") for k in (1, 2))
        widths[name] = max(lab.tokens.shape[1], unl.tokens.shape[1])
        m.student.zero_grad(set_to_none=True)
        with full_fp32(name == "plain fp32"):
            # --teacher_stream ahead: the teacher's embeddings queued on the side stream first, as the step before does
            ready = loop.teacher_ahead(m, unl, cfg, dev) if cfg.teacher_stream == "ahead" else None
            loss, _ = loop.compute_loss(m, lab, unl, cfg, dev, ready)
            loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in m.student.parameters() if p.grad is not None])
        results[name] = (float(loss.detach()), grads)
        print(f"{name}: loss {results[name][0]:.6f}, grad norm {float(grads.norm()):.6f}", flush=True)
    (l32, g32), (l16, g16) = results["plain fp32"], results["optimised"]
    cosine = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
    summary = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
        "model": model,
        "batch": batch,
        "flags": flags,
        "caption_width": widths,
        "non_finite_gradients": int((~torch.isfinite(g16)).sum()),
        "loss_plain": l32,
        "loss_optimised": l16,
        "relative_loss_difference": abs(l16 - l32) / abs(l32),
        "gradient_cosine": cosine,
        "norm_ratio": float(g16.norm() / g32.norm()),
    }
    print(
        f"relative loss difference {summary['relative_loss_difference']:.2e}; gradient cosine {cosine:.5f}; "
        f"norm ratio {summary['norm_ratio']:.4f}; non-finite gradients {summary['non_finite_gradients']}"
    )
    if out:
        Path(str(out)).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(str(out)) / "numerics.json", json_bytes(summary))
    return summary


if __name__ == "__main__":
    fire_main(main, serialize=lambda summary: None)  # main printed it already
