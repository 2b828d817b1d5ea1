"""The demo's teacher, made the paper's way in miniature: a tiny CLIP trained on still images only.

CLIP never saw video; neither does this teacher. It learns colours, shapes and
backgrounds from single frames and their captions, with the same contrastive
loss (Eq. 1-2) the trainer uses.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from demo.world import stills
from train.checkpoint import atomic_save
from train.data import TrainTransform
from train.loss import contrastive_loss
from train.model import create_clip, encode_text, image_size, normalize_frames, tokenizer_for


def pretrain_teacher(
    model: str,
    out: Path,
    images: int = 4000,
    steps: int = 400,
    batch: int = 128,
    lr: float = 1e-3,
    sigma: float = 0.05,
    seed: int = 0,
) -> dict:
    """Train a randomly initialised CLIP of config ``model`` on stills; save its state dict to ``out``."""
    torch.manual_seed(seed)
    clip = create_clip(model, "")
    clip.train()
    tokenizer = tokenizer_for(model)
    size = image_size(clip)
    transform = TrainTransform(size, (0.6, 1.0), seed=str(seed))
    data = stills(images, seed)
    pixels = [torch.from_numpy(image).permute(2, 0, 1).contiguous() for image, _ in data]  # (3, H, W) uint8
    tokens = tokenizer([caption for _, caption in data])  # (N, L)
    params = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=generator)
        images_b = normalize_frames(torch.cat([transform([pixels[i]]) for i in idx.tolist()]))  # (B, 3, S, S)
        image_emb = torch.nn.functional.normalize(clip.encode_image(images_b), dim=-1)
        text_emb = encode_text(clip, tokens[idx])
        loss = contrastive_loss(image_emb, text_emb, sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    atomic_save(clip.state_dict(), out)
    return {
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": round(time.perf_counter() - start, 1),
    }
