"""Streams of shard samples for training and validation (webdataset 1.x), transforms, collation.

Three streams, all over the shard format of ``shards/README.md``:

- *labeled* (the 4.5K subset): infinite, in passes; every pass visits every
  sample once across all ranks and loader workers, in a new order. A tar index
  (headers only) gives random access, and each reader (rank x worker) takes
  every ``readers``-th sample of the pass's permutation, so it works with fewer
  shards than readers.
- *unlabeled* (all of WebVid): infinite, resampled: each reader draws shards at
  random (seeded) and shuffles samples in a buffer. No node splitting is needed
  and no rank can run dry, so DDP never waits on an uneven stream.
- *validation*: one deterministic pass through the same index, split by sample
  across readers; every sample carries its global index so results can be put
  back in order.

Corrupt tar members and undecodable JPEGs are skipped and counted (each batch
reports how many its worker dropped since the previous batch), never slept on.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
import webdataset as wds
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, RandomResizedCrop

log = logging.getLogger(__name__)
_dropped = 0  # per loader-worker process: samples skipped since the last batch


class DataError(ValueError):
    """A shard folder that cannot be used; the message says what to do."""


def list_shards(folder: str | Path) -> list[str]:
    """The complete shards (tar with its ``_stats.json``) of a folder, in order."""
    path = Path(folder)
    if not str(folder) or not path.is_dir():
        raise DataError(
            f"shard folder {str(folder)!r} does not exist; make it with python -m pipeline.shard "
            "(or pipeline.subset for the labeled set)"
        )
    tars = sorted(str(t) for t in path.glob("[0-9]*.tar") if t.with_name(f"{t.stem}_stats.json").is_file())
    if not tars:
        raise DataError(
            f"{folder} holds no complete shard ({{NNNNNN}}.tar with its _stats.json); "
            "run python -m pipeline.shard to make them, or let it finish"
        )
    return tars


def _reader() -> tuple[int, int]:
    """(reader id, number of readers) over ranks x loader workers."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * workers + worker, world * workers


def count_and_continue(exn: Exception) -> bool:
    """webdataset handler: log, count, go on (webdataset's warn_and_continue sleeps 0.5 s per error)."""
    global _dropped
    _dropped += 1
    if _dropped <= 3:
        log.warning("skipping a broken shard member: %s", exn)
    return True


# ----------------------------------------------------------------------------------------------------------
# Transforms: one crop and flip per video, applied to all its frames


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop (scale 0.5-1) + horizontal flip, the same for all frames of a video; stays uint8."""

    size: int
    scale: tuple[float, float] = (0.5, 1.0)

    def __call__(self, frames: list[torch.Tensor]) -> torch.Tensor:  # T x (3, H, W) uint8 -> (T, 3, S, S) uint8
        i, j, h, w = RandomResizedCrop.get_params(frames[0], list(self.scale), [3 / 4, 4 / 3])
        interpolation = random.choice([InterpolationMode.BILINEAR, InterpolationMode.BICUBIC])
        video = torch.stack(frames)  # (T, 3, H, W)
        video = TF.resized_crop(video, i, j, h, w, [self.size, self.size], interpolation=interpolation, antialias=True)
        if random.random() < 0.5:
            video = video.flip(-1)
        return video  # uint8: normalised on the device (train.model.encode_video), a quarter of the bytes to move


@dataclass(frozen=True)
class EvalTransform:
    """Shorter side to ``size`` (bicubic), center crop; uint8 (CLIP mean/std are applied on the device)."""

    size: int

    def __call__(self, frames: list[torch.Tensor]) -> torch.Tensor:
        video = torch.stack(frames)
        video = TF.resize(video, [self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(video, [self.size, self.size])


# ----------------------------------------------------------------------------------------------------------
# Samples and batches


def decode_sample(sample: dict, frames: int, transform: Callable) -> dict | None:
    """Shard sample -> {"video": (T, 3, S, S), "text": str, "key": str, "index": int}; None if broken (counted)."""
    global _dropped
    try:
        images = []
        for k in range(frames):
            data = torch.frombuffer(bytearray(sample[f"{k}.jpg"]), dtype=torch.uint8)
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB))
        text = sample["txt"].decode("utf-8")
        return {
            "video": transform(images),
            "text": text,
            "key": sample["__key__"],
            "index": sample.get("__index__", -1),
        }
    except Exception as e:  # missing member, corrupt JPEG, bad UTF-8: skip and count
        _dropped += 1
        if _dropped <= 3:
            log.warning("skipping sample %s: %s", sample.get("__key__"), e)
        return None


@dataclass
class Batch:
    video: torch.Tensor  # (B, T, 3, S, S) uint8 pixels (or already-normalised floats)
    tokens: torch.Tensor  # (B, L)
    texts: list[str]
    keys: list[str]
    index: torch.Tensor  # (B,) global sample index (validation) or -1
    dropped: int  # samples this loader worker skipped since its previous batch

    def pin_memory(self) -> Batch:
        self.video, self.tokens = self.video.pin_memory(), self.tokens.pin_memory()
        return self


def make_collate(tokenizer) -> Callable[[list[dict]], Batch]:
    def collate(samples: list[dict]) -> Batch:
        global _dropped
        dropped, _dropped = _dropped, 0
        texts = [s["text"] for s in samples]
        return Batch(
            video=torch.stack([s["video"] for s in samples]),
            tokens=tokenizer(texts),
            texts=texts,
            keys=[s["key"] for s in samples],
            index=torch.tensor([s["index"] for s in samples]),
            dropped=dropped,
        )

    return collate


# ----------------------------------------------------------------------------------------------------------
# Sources


class IndexedShards:
    """Random access to the samples of a few shards (the labeled set, validation), through a tar index.

    Called with no argument, it yields raw samples (``{"__key__", "__index__", ext: bytes}``)
    of this reader's share: ``passes`` passes (``None`` = forever), each pass a
    new permutation of all samples when ``shuffle`` (seeded by seed and pass),
    split across readers as ``order[reader::readers]``.
    """

    def __init__(self, urls: list[str], seed: int = 0, shuffle: bool = True, passes: int | None = None):
        self.samples = _index_tars(urls)
        if not self.samples:
            raise DataError(f"the shards {urls[0]}... hold no samples")
        self.seed, self.shuffle, self.passes = seed, shuffle, passes

    def __len__(self) -> int:
        return len(self.samples)

    def __call__(self) -> Iterator[dict]:
        reader, readers = _reader()
        files: dict[str, object] = {}
        try:
            for epoch in itertools.count() if self.passes is None else range(self.passes):
                order = list(range(len(self.samples)))
                if self.shuffle:
                    random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
                for index in order[reader::readers]:
                    yield self._read(index, files)
        finally:
            for f in files.values():
                f.close()

    def _read(self, index: int, files: dict) -> dict:
        url, key, members = self.samples[index]
        f = files.get(url) or files.setdefault(url, open(url, "rb"))
        sample = {"__key__": key, "__index__": index}
        for ext, (offset, size) in members.items():
            f.seek(offset)
            sample[ext] = f.read(size)
        return sample


def _index_tars(urls: list[str]) -> list[tuple[str, str, dict[str, tuple[int, int]]]]:
    """(tar, key, {ext: (data offset, size)}) for every sample, in shard order (reads headers only)."""
    samples = []
    for url in urls:
        with tarfile.open(url, mode="r:") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                k, _, ext = os.path.basename(info.name).partition(".")
                if k != key and members:
                    samples.append((url, key, members))
                    members = {}
                key = k
                members[ext] = (info.offset_data, info.size)
            if members:
                samples.append((url, key, members))
    return samples


def _batches(source, frames: int, transform: Callable, tokenizer, batch: int, partial: bool) -> list:
    return [
        source,
        wds.map(lambda s: decode_sample(s, frames, transform)),
        wds.select(lambda s: s is not None),
        wds.batched(batch, collation_fn=make_collate(tokenizer), partial=partial),
    ]


def labeled_stream(folder, frames, transform, tokenizer, batch, seed) -> wds.DataPipeline:
    """Forever, in passes over all labeled samples, reshuffled each pass."""
    return wds.DataPipeline(
        *_batches(IndexedShards(list_shards(folder), seed), frames, transform, tokenizer, batch, False)
    )


def unlabeled_stream(folder, frames, transform, tokenizer, batch, seed) -> wds.DataPipeline:
    """Forever: shards drawn at random per reader (seeded by rank), samples shuffled in a buffer."""
    rank = int(os.environ.get("RANK", 0))
    source = [
        wds.ResampledShards(list_shards(folder), seed=seed + 1000 * rank, deterministic=True),
        wds.tarfile_to_samples(handler=count_and_continue),
        wds.shuffle(1000, initial=100, rng=random.Random(f"{seed}-{rank}")),
    ]
    return wds.DataPipeline(*source, *_batches(None, frames, transform, tokenizer, batch, False)[1:])


def validation_stream(folder, frames, transform, tokenizer, batch, limit: int = 0) -> wds.DataPipeline:
    """One pass in shard order, split across readers; each sample keeps its global index."""
    shards = IndexedShards(list_shards(folder), shuffle=False, passes=1)
    if limit:
        shards.samples = shards.samples[:limit]
    return wds.DataPipeline(*_batches(shards, frames, transform, tokenizer, batch, True))


def loader(pipeline: wds.DataPipeline, workers: int, pin: bool, seed: int) -> torch.utils.data.DataLoader:
    """A DataLoader over a pipeline that batches by itself (batch_size=None)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
    )


def sample_grid(batch: Batch, count: int = 4) -> tuple[torch.Tensor, list[str]]:
    """(3, count*S, T*S) de-normalised frames of the first videos of a batch, and their captions (for W&B)."""
    videos = batch.video[:count].float() / 255  # (n, T, 3, S, S)
    rows = [torch.cat(list(v), dim=-1) for v in videos]  # each (3, S, T*S)
    return torch.cat(rows, dim=-2).clamp(0, 1), batch.texts[:count]
