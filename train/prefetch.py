"""Batches onto the training device one step ahead, cropped there when the loader left the crop to it.

On a GPU, the next batch's host-to-device copy (and its JPEG decode and crop, see
``train.augment``) is issued on a side CUDA stream before the current step is
launched, so it overlaps the step instead of preceding it. On a CPU there is
nothing to overlap, and batches are prepared when asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from train import augment
from train.data import Batch, stack_videos


def to_device(batch: Batch, device: torch.device, size: int) -> Batch:
    """The batch with its frames and tokens on ``device``, crops applied: video (B, T, 3, size, size) uint8."""
    tokens = batch.tokens.to(device, non_blocking=True)
    if batch.jpegs is not None:
        frames = stack_videos(_decode(batch, device))  # (B, T, 3, H, W), padded to the largest
    elif batch.crops is not None:
        frames = batch.video.to(device, non_blocking=True).permute(0, 1, 4, 2, 3)  # (B, T, H, W, 3) -> (B, T, 3, H, W)
    else:
        frames = batch.video.to(device, non_blocking=True)
    if batch.crops is not None:
        frames = augment.resized_crop(frames, batch.crops.to(device, non_blocking=True), size)
    return dataclasses.replace(batch, video=frames, tokens=tokens, crops=None, jpegs=None, jpeg_sizes=None)


def _decode(batch: Batch, device: torch.device) -> list[list[torch.Tensor]]:
    """The batch's JPEG files decoded on ``device``: B lists of T (3, H, W) uint8.

    All at once (nvjpeg's batched decode on a GPU). If that fails, file by file, and
    on the CPU (libjpeg) for any the device cannot decode; a file neither can decode
    is an error that names its video (the workers already refused truncated files).
    """
    t = batch.jpeg_sizes.shape[1]
    files = list(batch.jpegs.split(batch.jpeg_sizes.flatten().tolist()))  # B*T files, views of one buffer
    try:
        decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = [_decode_one(f, device, batch.keys[i // t], i % t) for i, f in enumerate(files)]
    return [decoded[i : i + t] for i in range(0, len(files), t)]


def _decode_one(data: torch.Tensor, device: torch.device, key: str, frame: int) -> torch.Tensor:
    for where in dict.fromkeys((device, torch.device("cpu"))):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=where).to(device)
        except RuntimeError as e:
            error = e
    raise RuntimeError(
        f"frame {frame} of video {key!r} is a damaged JPEG ({str(error).strip().splitlines()[-1]}); "
        "re-shard that video, or train with --augment_on device, whose loader workers skip such samples"
    ) from error


class Prefetcher:
    """Iterates over ``batches``, handing out each one on ``device`` (see the module docstring)."""

    def __init__(self, batches: Iterator[Batch], device: torch.device, size: int):
        self.batches, self.device, self.size = batches, device, size
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: tuple[Batch, torch.cuda.Event] | None = None

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Batch:
        if self.stream is None:
            return to_device(next(self.batches), self.device, self.size)
        batch, ready = self.ahead if self.ahead is not None else self._issue()
        try:
            self.ahead = self._issue()  # queued on the side stream now, so it runs while the caller's step runs
        except StopIteration:  # a finite source: hand out the last batch, stop at the next call
            self.ahead = None
            self.batches = iter(())
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        for tensor in (batch.video, batch.tokens):
            tensor.record_stream(current)  # made on the side stream, used on this one: keep it until then
        return batch

    def _issue(self) -> tuple[Batch, torch.cuda.Event]:
        """Take the next batch and queue its preparation on the side stream."""
        raw = next(self.batches)
        with torch.cuda.stream(self.stream):
            batch = to_device(raw, self.device, self.size)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return batch, ready
