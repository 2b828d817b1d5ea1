"""Embeddings for evaluation: cached frames -> video embeddings, prompts/queries -> text embeddings.

Frames come from the frame cache (``eval.frame_cache``) and go through the
same evaluation transform as validation (shorter side to the model's input
size, bicubic, center crop, CLIP mean/std).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from eval.frame_cache import FrameCache
from pipeline.jpeg import jpeg_size
from pipeline.writer import iter_tar_samples
from train.data import EvalTransform
from train.model import encode_text, encode_video, trim_padding, trims_text

PRECISIONS = ("auto", "bf16", "fp32")


def eval_precision(device: torch.device, precision: str = "auto") -> str:
    """What ``precision`` means on ``device``: auto is bf16 on CUDA (as training runs there) and fp32 elsewhere.
    The authors' evaluation ran fp32."""
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def eval_autocast(device: torch.device, precision: str = "auto"):
    """The context every embedding call here takes: bf16 autocast, or none (fp32), as ``eval_precision`` says."""
    if eval_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def iter_frames(cache: FrameCache, ids: list[str], frames: int) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(item id, T uint8 (3, H, W) frames) for each of ``ids`` found in the cache, reading each tar once."""
    wanted = defaultdict(dict)  # tar -> key -> id
    for item_id in ids:
        tar, key = cache.found[item_id]
        wanted[tar][key] = item_id
    for tar_path, keys in wanted.items():
        # pipeline.writer's reader (sparse and oversized members refused), the wanted samples' data only
        members = {key: dict(files) for key, files in iter_tar_samples(tar_path, set(keys))}
        for key, item_id in keys.items():
            images = [members[key][f"{k}.jpg"] for k in range(frames)]
            for data in images:  # the header's size, before libjpeg allocates it
                jpeg_size(data, whole=False)
            yield (
                item_id,
                [
                    decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
                    for b in images
                ],
            )


@torch.no_grad()
def video_embeddings(
    clip,
    cache: FrameCache,
    ids: list[str],
    frames: int,
    size: int,
    batch_size: int,
    device: torch.device,
    renormalize: bool = True,
    autocast=None,
) -> dict[str, torch.Tensor]:
    """{item id: (D,) embedding} for the items of ``ids`` found in the cache."""
    transform = EvalTransform(size)
    out: dict[str, torch.Tensor] = {}
    batch_ids, batch = [], []

    def flush() -> None:
        video = torch.stack(batch).to(device, non_blocking=True)  # (B, T, 3, S, S)
        with autocast or torch.autocast(device.type, enabled=False):
            emb = encode_video(clip, video, renormalize).float().cpu()  # (B, D)
        out.update(zip(batch_ids, emb, strict=True))
        batch_ids.clear()
        batch.clear()

    for item_id, images in iter_frames(cache, ids, frames):
        batch_ids.append(item_id)
        batch.append(transform(images))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return out


@torch.no_grad()
def text_embeddings(
    clip, tokenizer, texts: list[str], batch_size: int, device: torch.device, autocast=None, trim: bool = True
) -> torch.Tensor:
    """(N, D) L2-normalised embeddings of ``texts`` (truncated to the model's context length by the tokenizer).

    Where the model's embeddings do not depend on the padding (``train.model.trims_text``), the texts go shortest
    first and each batch is cut after its longest caption: a batch of short captions costs a fraction of CLIP's 77
    tokens each. The rows come back in the order of ``texts``. ``trim=False``: every text at the full context
    length, in the order given (``benchmarks.text_bench`` compares the two).
    """
    if not texts:
        return torch.zeros(0, 0)
    tokens = tokenizer(texts)  # (N, L)
    trim = trim and trims_text(clip)
    order = (tokens != 0).sum(dim=1).argsort(stable=True) if trim else torch.arange(len(texts))
    parts = []
    for i in range(0, len(texts), batch_size):
        batch = tokens[order[i : i + batch_size]]
        batch = trim_padding(batch) if trim else batch
        with autocast or torch.autocast(device.type, enabled=False):
            parts.append(encode_text(clip, batch.to(device)).float().cpu())
    embeddings = torch.empty(len(texts), parts[0].shape[1])
    embeddings[order] = torch.cat(parts)
    return embeddings


@torch.no_grad()
def class_embeddings(
    clip, tokenizer, prompts: list[list[str]], batch_size: int, device: torch.device, autocast=None
) -> torch.Tensor:
    """(C, D): per class, the mean of its prompts' normalised embeddings, not re-normalised, as the FitCLIP authors'
    code does (CLIP's prompt-ensembling notebook re-normalises; for the arg-max over classes of one video's scores it
    differs only through the classes' norms)."""
    flat = [p for class_prompts in prompts for p in class_prompts]
    emb = text_embeddings(clip, tokenizer, flat, batch_size, device, autocast)  # (C*K, D)
    counts = [len(p) for p in prompts]
    return torch.stack([chunk.mean(dim=0) for chunk in torch.split(emb, counts)])
