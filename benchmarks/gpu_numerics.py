"""GPU check: the optimised step (bf16 autocast, bf16 teacher, torch.compile) against the plain fp32 step.

    python -m benchmarks.gpu_numerics [--model ViT-B-16-quickgelu] [--batch 16]

Same weights, same uint8 batches: prints the loss of each and the cosine similarity and norm ratio of the
student's gradients. Expected: loss within ~1e-2 relative, gradient cosine > 0.99 (bf16 tolerance).
"""

from __future__ import annotations

import copy
import dataclasses

import fire
import torch

from benchmarks.harness import random_models, synthetic_batch
from train import distributed, loop
from train.model import VideoTextModel, freeze, image_size, tokenizer_for


def main(model: str = "ViT-B-16-quickgelu", batch: int = 16, frames: int = 4) -> None:
    dist = distributed.init_distributed("auto")
    dev = dist.device
    fast, models = random_models(model, frames, dist, compile=dev.type == "cuda")  # bf16 teacher, compiled student
    plain_cfg = dataclasses.replace(fast, precision="fp32", compile=False)
    student = VideoTextModel(copy.deepcopy(models.student.clip), fast.renormalize_video).to(dev)
    teacher = freeze(VideoTextModel(copy.deepcopy(models.student.clip), fast.renormalize_video)).to(dev)
    plain = loop.Models(student, student, teacher)  # fp32 everywhere, eager
    tok = tokenizer_for(model)
    size = image_size(student.clip)
    lab = synthetic_batch(batch, frames, size, tok, 1, dev.type == "cuda")
    unl = synthetic_batch(batch, frames, size, tok, 2, dev.type == "cuda")
    results = {}
    for name, m, cfg in (("plain fp32", plain, plain_cfg), ("optimised", models, fast)):
        m.student.zero_grad(set_to_none=True)
        loss, _ = loop.compute_loss(m, lab, unl, cfg, dev)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in m.student.parameters() if p.grad is not None])
        results[name] = (float(loss), grads)
        print(f"{name}: loss {float(loss):.6f}, grad norm {float(grads.norm()):.6f}", flush=True)
    (l32, g32), (l16, g16) = results["plain fp32"], results["optimised"]
    cosine = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
    print(
        f"relative loss difference {abs(l16 - l32) / abs(l32):.2e}; gradient cosine {cosine:.5f}; "
        f"norm ratio {float(g16.norm() / g32.norm()):.4f}"
    )


if __name__ == "__main__":
    fire.Fire(main)
