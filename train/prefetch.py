"""Batches onto the training device one step ahead, cropped there when the loader left the crop to it.

On a GPU, one background thread takes the next batch from the loader and issues
its host-to-device copy (and its JPEG decode and crop, see ``train.augment``) on
a side CUDA stream while the current step runs, so it overlaps the step instead
of preceding it. A thread rather than the step's own: nvjpeg's batched decode
does its Huffman stage on the host. Done by the step's thread (47 ms per 128-video
batch on an H200 machine, the device's share), it left the GPU idle for 13% of a
128+128 step, and the thread cut the decode's cost to the step from 15% to 9%
(benchmarks/README.md). torch ops release the GIL, so the step's launches go on
meanwhile. On a CPU there is nothing to overlap, and batches are prepared when
asked for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from train import augment
from train.data import Batch, stack_videos

log = logging.getLogger(__name__)


def to_device(batch: Batch, device: torch.device, size: int) -> Batch:
    """The batch with its frames and tokens on ``device``, crops applied: video (B, T, 3, size, size) uint8."""
    if batch.jpegs is not None:
        batch, videos = _replace_damaged(batch, _decode(batch, device))
        frames = stack_videos(videos)  # (B, T, 3, H, W), padded to the largest
    elif batch.crops is not None:
        frames = batch.video.to(device, non_blocking=True).permute(0, 1, 4, 2, 3)  # (B, T, H, W, 3) -> (B, T, 3, H, W)
    else:
        frames = batch.video.to(device, non_blocking=True)
    tokens = batch.tokens.to(device, non_blocking=True)
    if batch.crops is not None:
        frames = augment.resized_crop(frames, batch.crops.to(device, non_blocking=True), size)
    return dataclasses.replace(batch, video=frames, tokens=tokens, crops=None, jpegs=None, jpeg_sizes=None)


def _decode(batch: Batch, device: torch.device) -> list[list[torch.Tensor | None]]:
    """The batch's JPEG files decoded on ``device``: B lists of T (3, H, W) uint8, None for a damaged file.

    All at once (nvjpeg's batched decode on a GPU). If that fails, file by file, and
    on the CPU (libjpeg) for any the device cannot decode; a file neither can decode
    is damaged inside its data (the workers refused truncated files and broken markers).
    """
    t = batch.jpeg_sizes.shape[1]
    files = list(batch.jpegs.split(batch.jpeg_sizes.flatten().tolist()))  # B*T files, views of one buffer
    if device.type == "cuda":
        # nvjpeg writes its outputs from a stream of its own, which waits for nothing of ours (torchvision's
        # decode_jpegs_cuda), into memory allocated on this one, the prefetcher's: maybe the previous batch's,
        # freed while the kernels that read it (the stack, the crop) are still queued here
        torch.cuda.current_stream(device).synchronize()
    try:
        decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = [_decode_one(f, device) for f in files]
    return [decoded[i : i + t] for i in range(0, len(files), t)]


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    for where in dict.fromkeys((device, torch.device("cpu"))):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=where).to(device)
        except RuntimeError:
            pass
    return None


def _replace_damaged(batch: Batch, videos: list[list[torch.Tensor | None]]) -> tuple[Batch, list]:
    """The batch with each video that has a damaged frame replaced by another video of the batch (with its caption
    and crop), counted in ``dropped``, as the loader workers skip what they find broken. Skipping would shrink this
    rank's batch alone, and the contrastive loss gathers equal batches from every rank; a video repeated once in a
    batch is one pair that is its own negative. An error if every video of the batch is damaged."""
    damaged = [b for b, video in enumerate(videos) if any(f is None for f in video)]
    if not damaged:
        return batch, videos
    good = [b for b in range(len(videos)) if b not in damaged]
    for b in damaged:
        frame = next(t for t, f in enumerate(videos[b]) if f is None)
        log.warning(
            "video %r: frame %d is a damaged JPEG; replaced in its batch (re-shard that video)", batch.keys[b], frame
        )
    if not good:
        raise RuntimeError(
            f"every video of a batch has a damaged JPEG (e.g. {batch.keys[damaged[0]]!r}): re-shard them, or train "
            "with --augment_on device, whose loader workers skip such samples"
        )
    donors = [good[i % len(good)] for i in range(len(damaged))]
    take = list(range(len(videos)))
    for b, donor in zip(damaged, donors, strict=True):
        take[b] = donor
    rows = torch.tensor(take)
    replaced = dataclasses.replace(
        batch,
        tokens=batch.tokens[rows],
        texts=[batch.texts[i] for i in take],
        keys=[batch.keys[i] for i in take],
        index=batch.index[rows],
        crops=None if batch.crops is None else batch.crops[rows],
        dropped=batch.dropped + len(damaged),
    )
    return replaced, [videos[i] for i in take]


class Prefetcher:
    """Iterates over ``batches``, handing out each one on ``device`` (see the module docstring).

    ``background``: prepare the next batch in a thread while the caller's step runs (default: on a GPU only). An
    error in preparing a batch (a damaged JPEG, a loader error) is raised by the ``next`` that would have returned it.
    ``close`` stops the thread; the trainer calls it when it ends.
    """

    def __init__(self, batches: Iterator[Batch], device: torch.device, size: int, background: bool | None = None):
        if device.type == "cuda" and device.index is None:  # the thread's current device would be cuda:0, not ours
            device = torch.device("cuda", torch.cuda.current_device())
        self.batches, self.device, self.size = batches, device, size
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if background is None:
            background = device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, "prefetch", initializer=self._enter_device) if background else None
        self.ahead: Future | _Deferred | None = None

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Batch:
        pending = self.ahead if self.ahead is not None else self._start()
        self.ahead = None
        prepared = pending.result()  # a preparation error is raised here, in the caller's thread
        if prepared is None:  # a finite source ended
            self.close()
            raise StopIteration
        if self.pool is not None:
            self.ahead = self._start()  # the next batch is prepared while the caller's step runs
        batch, ready = prepared
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for tensor in (batch.video, batch.tokens):
                tensor.record_stream(current)  # made on the side stream, used on this one: keep it until then
        return batch

    def settle(self) -> None:
        """Wait until the thread has prepared the batch it is on (before a fork: a thread inside a lock at the fork
        leaves that lock held in the child; and before validation, which then has the host to itself)."""
        if isinstance(self.ahead, Future):
            wait([self.ahead])

    def close(self) -> None:
        """Stop the background thread, dropping a batch it is still preparing. For the end of a run: a batch asked
        for after this is prepared in the caller's thread, maybe while the old thread is still inside the loader."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool, self.ahead = None, None

    def _start(self) -> Future | _Deferred:
        if self.pool is None:
            return _Deferred(self._prepare)
        return self.pool.submit(self._prepare)

    def _enter_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the CUDA device is per thread; allocations follow it

    def _prepare(self) -> tuple[Batch, torch.cuda.Event | None] | None:
        """The next batch on the device and the event its preparation recorded on the side stream; None at the end."""
        try:
            raw = next(self.batches)
        except StopIteration:
            return None
        if self.stream is None:
            return to_device(raw, self.device, self.size), None
        with torch.cuda.stream(self.stream):
            batch = to_device(raw, self.device, self.size)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return batch, ready


class _Deferred:
    """A preparation run when its result is asked for: the Future-like stand-in when there is no thread."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def result(self):
        return self.fn()
