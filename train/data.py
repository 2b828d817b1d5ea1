"""Streams of shard samples for training and validation (webdataset 1.x), transforms, collation.

Three streams, all over the shard format of ``shards/README.md``:

- *labeled* (the 4.5K subset): infinite, in passes; every pass visits every
  sample once across all ranks and loader workers, in a new order. A tar index
  (headers only) gives random access to the passes' permutations laid end to
  end, and each step takes the next ranks x batch samples of that sequence, a
  slice per rank. So it works with fewer shards, or samples, than readers, and a
  resumed run goes on where it stopped, with any number of ranks or workers.
- *unlabeled* (all of WebVid): infinite, resampled: each reader draws shards at
  random (seeded) and shuffles samples in a buffer. No node splitting is needed
  and no rank can run dry, so DDP never waits on an uneven stream.
- *validation*: one deterministic pass through the same index, split by sample
  across readers; every sample carries its global index so results can be put
  back in order.

Corrupt tar members and undecodable JPEGs are skipped and counted (each batch
reports how many its worker dropped since the previous batch), never slept on;
``DRY_LIMIT`` of them in a row stop the stream with a DataError. Every stream
reads tars with ``pipeline.writer``'s reader, which refuses sparse and oversized
members before reading them, and every JPEG's header is read before it is
decoded (a shard from elsewhere can declare gigabytes in a few bytes).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import itertools
import logging
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
import webdataset as wds
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from pipeline import writer
from pipeline.jpeg import jpeg_size
from pipeline.source import MAX_CAPTION_CHARS
from train import preempt
from train.passes import longest_clean_run, pass_order

log = logging.getLogger(__name__)
_dropped = 0  # per loader-worker process: samples skipped since the last batch
_streak = 0  # per loader-worker process: broken samples and shard members since the last good sample
_logged = 0  # per loader-worker process: broken samples and shard members logged, over its whole life
LOG_LIMIT = 3  # logged per loader-worker process; the rest are counted (train/dropped_samples) only
DRY_LIMIT = 1000  # broken in a row after which a stream gives up


class DataError(ValueError):
    """A shard folder that cannot be used; the message says what to do."""


def list_shards(folder: str | Path) -> list[str]:
    """The complete shards of a folder, in order: those its index (``shards.json``) lists (:class:`ShardListing`;
    :func:`shard_warnings` names those left out). A folder whose pipeline.shard has not finished is refused."""
    return [str(writer.tar_path(folder, n)) for n in shard_listing(folder).ok]


def shard_listing(folder: str | Path) -> writer.ShardListing:
    """``pipeline.writer.list_folder`` of a shard folder given as ``folder``, refused (:class:`DataError`) if it
    is not one, holds no complete shard, or is being made."""
    path = Path(folder)
    if str(folder) and path.is_file():
        raise DataError(
            f"shard folder {str(folder)!r} is a file; give the folder that holds the shards ({path.parent} if it "
            "is one of them)"
        )
    if not str(folder) or not path.is_dir():
        raise DataError(
            f"shard folder {str(folder)!r} does not exist; make it with python -m pipeline.shard "
            "(or pipeline.subset for the labeled set)"
        )
    try:
        listing = writer.list_folder(path)
    except ValueError as e:  # a damaged shards.json, or a pipeline.shard that has not finished
        raise DataError(str(e)) from None
    if not listing.ok:
        past = f" (its {writer.INDEX_NAME} lists none; {len(listing.past)} past that are an earlier CSV's)"
        raise DataError(
            f"{folder} holds no complete shard ({{NNNNNN}}.tar with its _stats.json)"
            + (past if listing.past else "")
            + "; run python -m pipeline.shard to make them, or let it finish"
        )
    return listing


def shard_warnings(folder: str | Path) -> list[str]:
    """A line for each kind of shard of ``folder`` that :func:`list_shards` leaves out."""
    return shard_listing(folder).warnings()


def sample_count(folder: str | Path) -> int:
    """The samples of a folder's complete shards, from their stats (no tar is read)."""
    return sum(shard_listing(folder).ok.values())


def validation_identity(folder: str | Path) -> str:
    """What tells a validation set apart, whatever path names it: a digest of its complete shards' names and sizes.
    best.pt records it, and a resume compares it (train.checkpoint.selection_problem): the same folder reached by
    another path (from another working directory, moved, mounted elsewhere on another node) is the same set."""
    shards = [(Path(tar).name, os.path.getsize(tar)) for tar in list_shards(folder)]
    return hashlib.blake2b(repr(shards).encode(), digest_size=16).hexdigest()


def check_validation(folder: str | Path, limit: int = 0) -> int:
    """The videos a validation on ``folder`` scores (at most ``limit``; 0 = all); refused below 2: the contrastive
    loss of one pair is 0, so every validation scored 0 and best.pt stayed at the first one, which was fused."""
    count = sample_count(folder)
    count = min(count, limit) if limit else count
    if count < 2:
        raise DataError(
            f"--val {folder}: {count} validation video(s)"
            + (f" with --val_max {limit}" if limit else "")
            + "; the validation loss needs at least 2 (the loss of one pair is 0, so best.pt would stay at the first "
            'validation): give a bigger validation set, or --val "" to keep the last step as best.pt'
        )
    return count


def check_frames(folder: str | Path, frames: int) -> None:
    """Refuse a --frames other than the number of frames the folder's samples hold (read from the first sample's
    tar headers). Fewer: every sample would be dropped, and an endless stream of dropped samples never yields a
    batch. More: a sample's N frames are the midpoints of N equal segments of its clip (``pipeline.frames``), so
    the first --frames of them would cover only the start of each clip, and no subset of them is the midpoints of
    --frames segments that evaluation samples."""
    first = next((members for url in list_shards(folder) for _, members in _tar_samples(url)), None)
    if first is None:  # no sample at all: the streams say so
        return
    have = next(k for k in itertools.count() if f"{k}.jpg" not in first)
    if have < frames:
        raise DataError(
            f"--frames {frames}: the samples in {folder} hold {have} frames; pass --frames {have}, or "
            f"re-shard with python -m pipeline.shard --frames {frames}"
        )
    if have > frames:
        raise DataError(
            f"--frames {frames}: the samples in {folder} hold {have} frames, the midpoints of {have} segments of "
            f"each clip, and their first {frames} would cover only the first {frames}/{have} of it; pass --frames "
            f"{have}, or re-shard with python -m pipeline.shard --frames {frames}"
        )


def _rank() -> tuple[int, int]:
    """(this process's rank, number of ranks), from torchrun's environment; (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _worker() -> tuple[int, int]:
    """(this loader worker's id, number of workers) of this rank's loader; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _broken(message: str, *args) -> None:
    """Count a broken sample or shard member (logging the first few); a DataError after DRY_LIMIT in a row. The
    training streams are endless: one whose every shard or sample is broken would otherwise spin forever, and
    webdataset drops a stage's None results before a later stage could count them."""
    global _dropped, _streak, _logged
    _dropped += 1
    _streak += 1
    if _logged < LOG_LIMIT:  # not _dropped, which each batch resets: a broken sample was logged on every pass
        _logged += 1
        log.warning(message + ("" if _logged < LOG_LIMIT else " (further ones are counted, not logged)"), *args)
    if _streak >= DRY_LIMIT:
        _streak = 0
        raise DataError(
            f"{DRY_LIMIT} samples or shard members in a row could not be read (see the warnings above); check the "
            "shards with python -m pipeline.shard's _stats.json, or re-shard them"
        )


# ----------------------------------------------------------------------------------------------------------
# Transforms: one crop and flip per video, applied to all its frames


CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratios, as in the authors' code


def crop_box(height: int, width: int, scale: tuple[float, float], rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop: torchvision's ``RandomResizedCrop.get_params`` (ten tries
    of an area share in ``scale`` and an aspect ratio uniform in log space, else the center crop clamped to the
    ratios), drawing from ``rng``: torchvision's draws from the process's global generators, which the two streams'
    prefetch threads share with --workers 0 on a GPU, so the crops depended on the threads' timing."""
    area = height * width
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(low, high))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    if width / height < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif width / height > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class TrainTransform:
    """RandomResizedCrop (scale 0.5-1) + horizontal flip, the same for all frames of a video; stays uint8.

    ``params`` draws a crop (see ``train.augment``); calling the transform applies it
    here, in the loader worker. With ``augment_on="device"`` the workers only draw it and
    ``train.augment.resized_crop`` applies the crops of a whole batch on the device:
    the same crops for the same seed, the same pixels up to rounding. Each transform draws from a generator of its
    own, seeded by ``seed``, the rank and the loader worker's id: the trainer gives each stream its own seed.
    """

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    seed: str = "0"
    _generator: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (pid, Random)

    def generator(self) -> random.Random:
        """This transform's random generator in this process (a forked loader worker makes its own: one process
        per worker), seeded by ``seed``, the rank and the worker's id."""
        if self._generator is None or self._generator[0] != os.getpid():
            (rank, _), (worker, _) = _rank(), _worker()
            self._generator = (os.getpid(), random.Random(f"{self.seed}-{rank}-{worker}"))
        return self._generator[1]

    def params(self, height: int, width: int) -> torch.Tensor:
        """(6,) top, left, height, width, flip, bicubic for a video of height x width pixels."""
        rng = self.generator()
        i, j, h, w = crop_box(height, width, self.scale, rng)
        bicubic = rng.random() < 0.5  # bilinear or bicubic, as the authors' code chooses
        flip = rng.random() < 0.5
        return torch.tensor([i, j, h, w, flip, bicubic], dtype=torch.float32)

    def __call__(self, frames: list[torch.Tensor]) -> torch.Tensor:  # T x (3, H, W) uint8 -> (T, 3, S, S) uint8
        i, j, h, w, flip, bicubic = (int(v) for v in self.params(*frames[0].shape[-2:]))
        interpolation = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
        video = torch.stack(frames)  # (T, 3, H, W)
        video = TF.resized_crop(video, i, j, h, w, [self.size, self.size], interpolation=interpolation, antialias=True)
        return video.flip(-1) if flip else video  # uint8: normalised on the device, a quarter of the bytes to move


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


def decode_sample(sample: dict, frames: int, transform: Callable, augment_on: str = "loader") -> dict | None:
    """Shard sample -> {"video", "text", "key", "index"} (+ "crop"); None if broken (counted).

    augment_on (see ``TrainConfig.augment_on``) "loader": video is the transformed (T, 3, S, S).
    "device": video is the T decoded frames, each (H, W, 3), and crop the transform's draw
    (applied by ``train.augment``). "device_jpeg": no decoding here; "jpegs" holds the T
    encoded frames (bytes), decoded on the device.
    """
    try:
        out = {"text": sample["txt"].decode("utf-8"), "key": sample["__key__"], "index": sample.get("__index__", -1)}
        if len(out["text"]) > MAX_CAPTION_CHARS:  # pipeline.shard fails such rows; a shard from elsewhere may not
            raise ValueError(
                f"a caption of {len(out['text']):,} characters, over the {MAX_CAPTION_CHARS:,} a caption may have"
            )
        if augment_on == "device_jpeg":
            out["jpegs"] = [sample[f"{k}.jpg"] for k in range(frames)]
            out["crop"] = transform.params(*_same_size([jpeg_size(f) for f in out["jpegs"]]))
            return out
        files = [sample[f"{k}.jpg"] for k in range(frames)]
        for data in files:  # the header's size, before libjpeg allocates it (a header can declare gigapixels)
            jpeg_size(data, whole=False)
        images = [
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB) for data in files
        ]
        _same_size([tuple(image.shape[-2:]) for image in images])
        if augment_on == "device":
            # (H, W, 3): decode_jpeg's own layout behind its (3, H, W) view, so collate's one copy is a memcpy
            out["video"] = [image.permute(1, 2, 0) for image in images]
            out["crop"] = transform.params(*images[0].shape[-2:])
        else:
            out["video"] = transform(images)
        return out
    except KeyError as e:  # a missing member: name it as such (the bare KeyError read "'txt'")
        _broken("skipping sample %s: it has no %s member", sample.get("__key__"), e)
        return None
    except Exception as e:  # corrupt JPEG, bad UTF-8: skip and count
        _broken("skipping sample %s: %s: %s", sample.get("__key__"), type(e).__name__, e)
        return None


def _same_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The frames' common (height, width); frames of different sizes cannot share one crop."""
    if len(set(sizes)) != 1:
        raise ValueError(f"frames of different sizes {sorted(set(sizes))}")
    return sizes[0]


@dataclass
class Batch:
    """A batch of videos and captions; what loaders yield and the step consumes.

    video is (B, T, 3, S, S) uint8 when the loader cropped it. When the device crops
    (``augment_on`` "device"/"device_jpeg"), video is (B, T, H, W, 3), the layout
    libjpeg decodes to, at the shards' size, zero-padded to the largest in the batch
    (or empty while ``jpegs`` holds the encoded frames: all JPEG files of the batch back to back, one
    tensor, so that it crosses from the worker as one block; ``jpeg_sizes`` (B, T) splits it),
    ``crops`` (B, 6) holds each video's crop, and
    ``train.prefetch.to_device`` turns it into the cropped form.
    """

    video: torch.Tensor  # (B, T, 3, S, S) uint8 pixels (or already-normalised floats)
    tokens: torch.Tensor  # (B, L)
    texts: list[str]
    keys: list[str]
    index: torch.Tensor  # (B,) global sample index (validation) or -1
    dropped: int  # samples this loader worker skipped since its previous batch
    crops: torch.Tensor | None = None  # (B, 6): crops still to apply (train.augment)
    jpegs: torch.Tensor | None = None  # (N,) uint8: the encoded frames still to decode, back to back
    jpeg_sizes: torch.Tensor | None = None  # (B, T) their sizes in bytes

    def pin_memory(self) -> Batch:
        self.video, self.tokens = self.video.pin_memory(), self.tokens.pin_memory()
        if self.crops is not None:  # JPEG files are not: nvjpeg reads them on the host
            self.crops = self.crops.pin_memory()
        return self


def make_collate(tokenizer) -> Callable[[list[dict]], Batch]:
    def collate(samples: list[dict]) -> Batch:
        global _dropped
        dropped, _dropped = _dropped, 0
        texts = [s["text"] for s in samples]
        crops = torch.stack([s["crop"] for s in samples]) if "crop" in samples[0] else None
        jpegs = jpeg_sizes = None
        if "jpegs" in samples[0]:
            files = [f for s in samples for f in s["jpegs"]]
            jpegs = torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8)
            jpeg_sizes = torch.tensor([len(f) for f in files]).view(len(samples), -1)
            video = torch.zeros(0, dtype=torch.uint8)
        else:  # device crops: (B, T, H, W, 3) as decoded; else (B, T, 3, S, S)
            video = stack_videos([s["video"] for s in samples])
        return Batch(
            video=video,
            tokens=tokenizer(texts),
            texts=texts,
            keys=[s["key"] for s in samples],
            index=torch.tensor([s["index"] for s in samples]),
            dropped=dropped,
            crops=crops,
            jpegs=jpegs,
            jpeg_sizes=jpeg_sizes,
        )

    return collate


def stack_videos(videos: list) -> torch.Tensor:
    """Videos (each a tensor or a list of T frames, all frames of one rank) -> (B, T, *frame shape), each
    dimension the largest of the batch, smaller frames zero-padded at its end (bottom/right for pixels).

    On the frames' device; inside a loader worker the batch is made in shared memory, so it
    crosses to the main process without another copy (as torch's default_collate does).
    """
    frames = [list(v) for v in videos]  # B x T x frame
    first = frames[0][0]
    shape = [max(f.shape[d] for video in frames for f in video) for d in range(first.dim())]
    out = _batch_tensor((len(frames), len(frames[0]), *shape), first.dtype, first.device)
    for b, video in enumerate(frames):
        if any(list(f.shape) != shape for f in video):
            out[b].zero_()
        for t, frame in enumerate(video):
            out[b, t][tuple(slice(0, n) for n in frame.shape)] = frame
    return out


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when called in a loader worker."""
    if torch.utils.data.get_worker_info() is None or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    elem = torch.empty(0, dtype=dtype)
    storage = elem.untyped_storage()._new_shared(math.prod(shape) * elem.element_size())
    return elem.new_empty(0).set_(storage).view(shape)


# ----------------------------------------------------------------------------------------------------------
# Sources


class IndexedShards:
    """Random access to the samples of a few shards (the labeled set, validation), through a tar index.

    Called with no argument, it yields raw samples (``{"__key__", "__index__", ext: bytes}``) of this reader's
    share of a sequence of ``passes`` passes (``None`` = forever), each pass a new permutation of all samples when
    ``shuffle`` (seeded by seed and pass; ``train.passes``: a pass's head keeps clear of the last one's tail, so a
    step that spans two passes holds no video twice), laid end to end. The sequence is cut into slices of
    ``batch`` samples, dealt as a run's steps take them: loader batch t of every rank's loader (made by its worker
    t % workers, the DataLoader's round-robin) holds, on rank k of K, the slice at ``start + t*K*batch + k*batch``.
    So a step takes the next K*batch samples of the sequence whatever the number of ranks and workers; every reader
    yields, even with fewer samples than readers; and each sample comes once per pass over all readers.

    ``start`` (a resumed run's ``labeled_seen``): the samples of the sequence the run took before. A resumed run
    goes on through the same passes in the same order with any number of ranks, loader workers or batch (to
    within the broken samples skipped before, each of which moved its reader on by one).

    ``limit``: only the first ``limit`` samples in shard order (0: all); the shards after them are not read.
    """

    def __init__(
        self,
        urls: list[str],
        seed: int = 0,
        shuffle: bool = True,
        passes: int | None = None,
        start: int = 0,
        batch: int = 1,
        limit: int = 0,
        guarded: bool = True,
    ):
        self.samples = _index_tars(urls, limit)
        self.guarded = guarded  # train.passes.pass_order's: False for a run saved before the guard
        if not self.samples:
            raise DataError(f"the shards {urls[0]}... hold no samples")
        self.seed, self.shuffle, self.passes = seed, shuffle, passes
        self.start, self.batch = start, batch

    def __len__(self) -> int:
        return len(self.samples)

    def positions(self) -> Iterator[int]:
        """This reader's places in the sequence, in order (see the class)."""
        rank, ranks = _rank()
        worker, workers = _worker()
        for t in itertools.count(worker, workers):  # the loader batches this worker makes
            first = self.start + (t * ranks + rank) * self.batch
            yield from range(first, first + self.batch)

    def __call__(self) -> Iterator[dict]:
        n = len(self.samples)
        end = None if self.passes is None else self.passes * n
        files: dict[str, object] = {}
        epoch, order = -1, []
        try:
            for position in self.positions():
                if end is not None and position >= end:
                    return
                if position // n != epoch:
                    epoch = position // n
                    order = pass_order(n, self.seed, epoch, self.guarded) if self.shuffle else list(range(n))
                yield self._read(order[position % n], files)
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


def _index_tars(urls: list[str], limit: int = 0) -> list[tuple[str, str, dict[str, tuple[int, int]]]]:
    """(tar, key, {ext: (data offset, size)}) for every sample, in shard order, or for the first ``limit`` (0: all):
    the shards after those are not read. Reads headers only."""
    samples = ((url, key, members) for url in urls for key, members in _tar_samples(url))
    return list(itertools.islice(samples, limit or None))


def _tar_samples(url: str) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {ext: (data offset, size)}) of each sample of one tar, in order, as its headers are read (a caller
    that stops early reads no further). A tar cut short (a copy or a disk that failed) gives the samples before the
    cut, with a warning: the streams skip broken shard members, and the labeled and validation sets go through
    this index, where one damaged tar used to stop the run with a traceback (at its first validation, with nothing
    saved). tarfile raises on a cut inside a member's data, but ends in silence on one at or inside a header; the
    end-of-archive block that every complete tar ends with tells the two apart."""
    last, count, previous = None, 0, None
    try:
        with writer.open_tar(url) as tar:
            for key, members in writer.tar_groups(tar):  # a sample comes once the next one starts, or at the end
                if last:
                    count, previous = count + 1, set(last[1])
                    yield last
                last = key, {ext: (info.offset_data, info.size) for ext, info in members}
            end = tar.offset  # where tarfile stopped: the end-of-archive block, if the tar is whole
    except (tarfile.TarError, EOFError, OSError) as e:  # cut inside a member's data: the sample being read is cut
        if last:  # whole: the one after it had started
            count += 1
            yield last
        _warn_damaged(url, e, count)
        return
    if not _ends_whole(url, end):  # cut at or inside a header: each member read is whole, the last sample may not be
        if last and set(last[1]) == previous:
            count += 1
            yield last
        _warn_damaged(url, tarfile.ReadError("no end-of-archive block where its headers end"), count)
        return
    if last:
        yield last


def _ends_whole(url: str, end: int) -> bool:
    """Whether the end-of-archive block that every complete tar ends with is at ``end`` (False if unreadable)."""
    try:
        with open(url, "rb") as f:
            f.seek(end)
            return f.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)
    except OSError:
        return False


_damaged: set[str] = set()  # tars warned of in this process (train.main's checks and the run index some twice)


def _warn_damaged(url: str, error: Exception, count: int) -> None:
    if url in _damaged:
        return
    _damaged.add(url)
    log.warning(
        "%s is damaged (%s): using its first %d samples and skipping the rest; re-make it with pipeline.shard "
        "(delete its _stats.json and rerun the same command)",
        url,
        error,
        count,
    )


def decoded(samples: Iterator[dict], frames: int, transform: Callable, augment_on: str = "loader") -> Iterator[dict]:
    """``decode_sample`` of each sample, without the broken ones (counted; a DataError after DRY_LIMIT in a row)."""
    global _streak
    for sample in samples:
        out = decode_sample(sample, frames, transform, augment_on)
        if out is not None:
            _streak = 0
            yield out


def _batches(source, frames, transform, tokenizer, batch: int, partial: bool, augment_on: str = "loader") -> list:
    return [
        source,
        functools.partial(decoded, frames=frames, transform=transform, augment_on=augment_on),
        wds.batched(batch, collation_fn=make_collate(tokenizer), partial=partial),
    ]


def labeled_stream(
    folder, frames, transform, tokenizer, batch, seed, augment_on="loader", start: int = 0, guarded: bool = True
) -> wds.DataPipeline:
    """Forever, in passes over all labeled samples, reshuffled each pass; ``start``: the samples a resumed run
    took before, to go on where it stopped (``IndexedShards``); ``guarded``: train.passes's guard between passes
    (False: a run saved before it, which goes on in the order it began)."""
    source = IndexedShards(list_shards(folder), seed, start=start, batch=batch, guarded=guarded)
    rank, ranks = _rank()
    step, n = ranks * batch, len(source)
    spans = n % step or start % step  # some step spans two passes (else the steps split each pass)
    clean = longest_clean_run(n) if guarded else 1
    # the same video twice in a step: a false negative for the contrastive loss
    if rank == 0 and (step > n or (spans and step > clean)):
        when = "every step" if step > n else "the steps that span two passes over the set"
        log.warning(
            "a step takes %d labeled videos (%d ranks x --batch_labeled %d) from a set of %d: some come twice in %s, "
            "where the contrastive loss takes each copy for another video; lower --batch_labeled (a step of at most "
            "%d never holds one twice)",
            step,
            ranks,
            batch,
            n,
            when,
            clean,
        )
    return wds.DataPipeline(*_batches(source, frames, transform, tokenizer, batch, False, augment_on))


def unlabeled_stream(
    folder, frames, transform, tokenizer, batch, seed, augment_on="loader", shuffle_buffer: int = 1000
) -> wds.DataPipeline:
    """Forever: shards drawn at random per reader (seeded by rank), samples shuffled in a buffer of
    ``shuffle_buffer`` samples per reader."""
    rank, _ = _rank()
    source = [
        wds.ResampledShards(list_shards(folder), seed=seed + 1000 * rank, deterministic=True),
        _shard_samples,
        functools.partial(_shuffled, seed=f"{seed}-{rank}", bufsize=shuffle_buffer),
    ]
    return wds.DataPipeline(*source, *_batches(None, frames, transform, tokenizer, batch, False, augment_on)[1:])


def _shard_samples(shards: Iterator[dict]) -> Iterator[dict]:
    """The samples of each shard ``{"url": path}``, as webdataset's ``tarfile_to_samples`` gives them, read with
    pipeline.writer's reader as the other streams are: it refuses sparse and oversized members before reading them,
    where webdataset reads whatever size a header declares into memory (a 10 KB tar can declare terabytes). A
    damaged shard gives the samples before the damage, and is counted."""
    for shard in shards:
        url, count = shard["url"], 0
        try:
            for key, members in writer.iter_tar_samples(url):
                count += 1
                yield {"__key__": key, "__url__": url, **dict(members)}
        except (tarfile.TarError, EOFError, OSError) as e:
            _broken("skipping the rest of %s: %s", url, e)
        else:
            if not count:  # counted, or a folder of such tars would be drawn from forever
                _broken("skipping %s: it holds no sample", url)


def _shuffled(samples: Iterator[dict], seed: str, bufsize: int = 1000) -> Iterator[dict]:
    """Samples shuffled in a buffer by a random generator of this loader worker's own (seeded by ``seed`` and the
    worker's id). One made with the pipeline, in the main process, was copied into every forked worker: workers
    reading the same shards (a folder of fewer shards than workers) gave the same samples in the same order, so
    every unlabeled batch came --workers times. The first sample leaves once a tenth of the buffer has filled."""
    worker, _ = _worker()
    yield from wds.shuffle(bufsize, max(1, bufsize // 10), rng=random.Random(f"{seed}-{worker}"))(samples)


def validation_stream(folder, frames, transform, tokenizer, batch, limit: int = 0) -> wds.DataPipeline:
    """One pass in shard order, split across readers; each sample keeps its global index."""
    # --val_max: only the shards that hold them are indexed (every shard was, before the cut: 2,500 shards took
    # 341 s and 4.3 GB on each rank)
    shards = IndexedShards(list_shards(folder), shuffle=False, passes=1, limit=limit)
    return wds.DataPipeline(*_batches(shards, frames, transform, tokenizer, batch, True))


# A batch its workers have not handed over after this long ends the run ("DataLoader timed out"): a shard read that
# hangs (a stale network mount) stalled its rank, and every other rank waited in the next collective with no word,
# for the process group's timeout (10 min with NCCL, 30 with gloo), or for good
LOADER_TIMEOUT_S = 600


def loader(pipeline: wds.DataPipeline, workers: int, pin: bool, seed: int) -> torch.utils.data.DataLoader:
    """A DataLoader over a pipeline that batches by itself (batch_size=None)."""
    if workers:
        _kill_stuck_workers_at_exit()
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,  # batches in flight per worker (shared memory: see README)
        generator=generator,
        worker_init_fn=_new_worker,
        timeout=LOADER_TIMEOUT_S if workers > 0 else 0,  # with no worker, a hang is in this process: no timer
    )


@functools.cache
def _kill_stuck_workers_at_exit() -> None:
    atexit.register(preempt.kill_stuck_workers)  # after multiprocessing's exit handler, so it runs before it


def _new_worker(worker_id: int) -> None:
    """A forked worker counts its own skipped samples, not those its parent had not yet handed out. It lives through
    a SIGTERM while its trainer lives: the trainer saves the run first (train.preempt)."""
    global _dropped, _streak, _logged
    _dropped = _streak = _logged = 0
    preempt.keep_worker_through_sigterm()


def sample_grid(batch: Batch, count: int = 4) -> tuple[torch.Tensor, list[str]]:
    """(3, count*S, T*S) de-normalised frames of the first videos of a batch, and their captions (for W&B)."""
    videos = batch.video[:count].float().cpu() / 255  # (n, T, 3, S, S)
    rows = [torch.cat(list(v), dim=-1) for v in videos]  # each (3, S, T*S)
    return torch.cat(rows, dim=-2).clamp(0, 1), batch.texts[:count]
