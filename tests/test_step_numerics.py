"""The optimised step computes what the plain fp32 step computes: same loss and gradients within bf16 tolerance."""

from __future__ import annotations

import dataclasses

import torch
from conftest import TINY_CLIP

from train import distributed, loop
from train.config import resolve
from train.data import Batch
from train.model import normalize_frames, tokenizer_for


def batches(n: int = 6) -> tuple[Batch, Batch]:
    g = torch.Generator().manual_seed(0)
    tok = tokenizer_for(str(TINY_CLIP))
    out = []
    for offset in (0, n):
        texts = [f"a {c} shape number {offset + i}" for i, c in enumerate(["red", "blue", "green"] * (n // 3))]
        video = torch.randint(0, 256, (n, 4, 3, 32, 32), generator=g, dtype=torch.uint8)
        out.append(Batch(video, tok(texts), texts, [str(i) for i in range(n)], torch.arange(n), 0))
    return out[0], out[1]


def loss_and_grads(models, cfg, lab, unl) -> tuple[float, torch.Tensor]:
    models.student.zero_grad(set_to_none=True)
    loss, _ = loop.compute_loss(models, lab, unl, cfg, torch.device("cpu"))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in models.student.parameters() if p.grad is not None])
    return float(loss.detach()), grads


def tiny_fp32(out, **overrides):
    """A plain fp32 CPU config of the tiny model and its models (teacher and student from one random init)."""
    cfg = resolve(
        "paper",
        model=str(TINY_CLIP),
        teacher_weights="",
        out=str(out),
        precision="fp32",
        wandb="off",
        progress=False,
        device="cpu",
        **overrides,
    )
    return cfg, loop.build_models(cfg, distributed.init_distributed("cpu"))


def test_bf16_step_matches_fp32_step_within_bf16_tolerance(tmp_path):
    cfg, models = tiny_fp32(tmp_path, lam=0.5)
    lab, unl = batches()
    loss32, grad32 = loss_and_grads(models, cfg, lab, unl)
    loss16, grad16 = loss_and_grads(models, dataclasses.replace(cfg, precision="bf16"), lab, unl)
    assert abs(loss16 - loss32) / loss32 < 2e-2
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert cosine > 0.99, cosine
    assert abs(grad16.norm() / grad32.norm() - 1) < 5e-2


def test_uint8_frames_normalised_on_the_device_equal_host_normalised_floats(tmp_path):
    cfg, models = tiny_fp32(tmp_path)
    lab, unl = batches()
    loss_u8, grad_u8 = loss_and_grads(models, cfg, lab, unl)
    as_float = [dataclasses.replace(b, video=normalize_frames(b.video)) for b in (lab, unl)]
    loss_f, grad_f = loss_and_grads(models, cfg, *as_float)
    assert loss_u8 == loss_f
    assert torch.equal(grad_u8, grad_f)
