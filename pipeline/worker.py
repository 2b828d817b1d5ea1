"""The unit of work: turn one shard's rows into ``{shard}.tar`` + ``{shard}_stats.json``.

Runs in a worker process (process pool or Spark executor). Every video either
becomes a sample or a counted failure with a reason; nothing a video does can
stop the shard.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline import board
from pipeline.fetch import FetchConfig, FetchError, fetch, is_transient
from pipeline.frames import FrameError, decode_frames, encode_jpeg
from pipeline.jpeg import MAX_FRAME_PIXELS
from pipeline.pool import how_it_ended
from pipeline.source import Row
from pipeline.time_limit import RETRY_LONGER, decode_limit, stuck_failure
from pipeline.writer import (
    MAX_MEMBER_BYTES,
    TarShardWriter,
    atomic_write_bytes,
    iter_tar_samples,
    json_bytes,
    shard_name,
    stats_path,
    tar_path,
)

UNEXPECTED_ERROR = "unexpected_error"
WORKER_DIED = "worker_died"  # the process making the row's sample died on it
FRAME_TOO_LARGE = "frame_too_large"  # stored frames the shard readers would refuse
# 2: the sampler shows videos as players do (rotation, MP4 edit lists, AV1); csv_duration is fingerprinted.
# 3: non-square pixels are made square (pipeline.frames.displayed_size); an MP4 that cannot seek to its first
# frame is decoded from its start instead of failing
# 4: a sampling instant on a frame's start takes that frame (computed in exact fractions; floats could take the one
# before, whenever the frame count is a multiple of 2 x --frames); a Matroska or WebM file cut short is truncated
FORMAT_VERSION = 4


@dataclass(frozen=True)
class SampleSettings:
    """What each sample is made of; part of every shard's fingerprint."""

    frames: int = 4  # N frames per video, at the midpoints of N equal segments
    size: int = 256  # shorter side of the stored frames in pixels (never upscaled)
    quality: int = 90  # JPEG quality


@dataclass(frozen=True)
class ShardSettings:
    """Everything a worker needs besides the rows."""

    out_dir: str
    sample: SampleSettings = field(default_factory=SampleSettings)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    # seconds one video's decoding may take (0: no limit); past it the row fails as decode_timeout, a failure that
    # may pass (--retry_failed). Not part of the fingerprint: it changes no sample, only which rows are given up
    decode_timeout: float = 120.0


@dataclass(frozen=True)
class ShardTask:
    shard: int
    rows: tuple[Row, ...]
    fingerprint: str  # of the rows and the sample settings; a shard whose stats hold it is done
    # the stats of the complete shard this task remakes to retry its transient failures (pipeline.shard
    # --retry_failed): its samples are copied from its tar, its other failures kept; None = make every row
    previous: dict | None = None
    # (row index, reason, detail) of the rows a worker process died on while making this shard (without_row): they
    # fail, transiently, without being tried again in this run
    died: tuple[tuple[int, str, str], ...] = ()


def fingerprint(rows: tuple[Row, ...], sample: SampleSettings) -> str:
    """Hash of what determines a shard's content; if unchanged, a complete shard is kept on resume."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, asdict(sample)]).encode())
    for r in rows:
        record = [r.index, r.videoid, r.key, r.caption, r.location, r.error, r.csv_duration]
        h.update(json.dumps(record, ensure_ascii=True).encode("ascii", "backslashreplace"))
        h.update(b"\n")
    return h.hexdigest()


def make_sample(
    row: Row, sample: SampleSettings, fetch_config: FetchConfig, decode_timeout: float = 0
) -> list[tuple[str, bytes]]:
    """The tar members of one video: N JPEG frames, the caption, the metadata.

    Raises:
        FetchError, FrameError: the video cannot become a sample.
    """
    source = fetch(row.location, fetch_config)
    with decode_limit(decode_timeout, sample.frames, RETRY_LONGER):
        clip = decode_frames(source, sample.frames, sample.size)
    meta = {
        "videoid": row.videoid,
        "source": row.location,
        "row": row.index,
        "duration": round(clip.duration, 6),
        "csv_duration": row.csv_duration,
        "timestamps": [round(t, 6) for t in clip.timestamps],
        "frame_times": [round(t, 6) for t in clip.frame_times],
        "width": clip.width,
        "height": clip.height,
    }
    width, height = clip.images[0].size  # as stored: --size 0 keeps a video's own
    if width * height > MAX_FRAME_PIXELS:  # frames the trainer and the evaluation would refuse to decode
        raise FrameError(
            FRAME_TOO_LARGE,
            f"{width}x{height} frames, over the {MAX_FRAME_PIXELS:,} pixels a stored frame may have: "
            "give --size (e.g. 256)",
        )
    members = [(f"{k}.jpg", encode_jpeg(im, sample.quality)) for k, im in enumerate(clip.images)]
    largest = max(len(data) for _, data in members)
    if largest > MAX_MEMBER_BYTES:  # one the shard readers refuse
        raise FrameError(
            FRAME_TOO_LARGE,
            f"a {largest:,}-byte JPEG frame, over the {MAX_MEMBER_BYTES:,} bytes a shard member may have: give a "
            "lower --quality or --size",
        )
    members.append(("json", json_bytes(meta)))
    members.append(("txt", row.caption.encode("utf-8")))
    return members


def process_shard(task: ShardTask, settings: ShardSettings) -> dict:
    """Write the shard's tar, then its stats (which mark it complete). Returns the stats.

    With ``task.previous`` (a retry of a complete shard's transient failures) the rows that made samples before are
    copied from the shard's tar, the rows that failed for good keep their failure, and only the rows that failed
    transiently are fetched again; the tar comes out as if those had not failed the first time. The old tar and
    stats stay in place until the new tar is complete.
    """
    start = time.monotonic()
    stats_file = stats_path(settings.out_dir, task.shard)
    previous = _PreviousSamples(tar_path(settings.out_dir, task.shard)) if task.previous is not None else None
    if previous is None:  # a shard being remade is not complete: drop its old stats before touching its tar
        stats_file.unlink(missing_ok=True)
    died = {index: (reason, detail) for index, reason, detail in task.died}
    old_failures = (task.previous or {}).get("failures", ())
    kept = {f["row"]: {**f, "transient": False} for f in old_failures if not is_transient(f)}  # failures for good
    failures: list[dict] = []
    copied = retried = 0
    with TarShardWriter(settings.out_dir, task.shard) as writer:
        for row in task.rows:
            if row.index in kept:
                failures.append(kept[row.index])
                continue
            members = previous.take(row.key) if previous is not None else None
            if members is not None:
                writer.add_sample(row.key, members)
                copied += 1
                continue
            if row.error:
                failures.append(_failure(row, *row.error))
                continue
            if row.index in died:
                failures.append(_failure(row, *died[row.index], transient=True))
                continue
            retried += previous is not None
            try:
                with board.item(row.index):  # the row to blame if this process dies in it (pool.run_isolated)
                    members = make_sample(row, settings.sample, settings.fetch, settings.decode_timeout)
            except (FetchError, FrameError) as e:
                failures.append(_failure(row, e.reason, e.detail, getattr(e, "transient", False)))
                continue
            except Exception as e:  # a bug or a library surprise: count it, keep going, keep the trace
                detail = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3)[-800:]}"
                failures.append(_failure(row, UNEXPECTED_ERROR, detail))
                continue
            writer.add_sample(row.key, members)
        if previous is not None:  # a retry: its old tar is read, and its old stats no longer describe the new one
            previous.close()
            stats_file.unlink(missing_ok=True)
        tar_file = writer.commit()
    stats = {
        "shard": shard_name(task.shard),
        "count": len(task.rows),
        "ok": writer.samples,
        "failed": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "failures": failures,
        "rows": [task.rows[0].index, task.rows[-1].index] if task.rows else [],
        "tar_bytes": tar_file.stat().st_size,
        "seconds": round(time.monotonic() - start, 3),
        "settings": asdict(settings.sample),
        "fingerprint": task.fingerprint,
        "format_version": FORMAT_VERSION,
    }
    if previous is not None:
        stats["retry"] = {"copied": copied, "retried": retried, "recovered": writer.samples - copied}
    atomic_write_bytes(stats_file, json_bytes(stats))
    return stats


class _PreviousSamples:
    """The samples of the shard's tar, read as the rows come: the tar holds them in row order, so a retry reads it
    once, one sample at a time. If it cannot be read (gone, cut short), the rows it no longer gives are made
    again."""

    def __init__(self, path: Path):
        self._samples = iter_tar_samples(path)
        self._next = self._read()

    def _read(self) -> tuple[str, list[tuple[str, bytes]]] | None:
        try:
            return next(self._samples, None)
        except (OSError, tarfile.TarError):
            return None

    def take(self, key: str) -> list[tuple[str, bytes]] | None:
        """The members of sample ``key`` if it comes next, else None."""
        if self._next is None or self._next[0] != key:
            return None
        members, self._next = self._next[1], self._read()
        return members

    def close(self) -> None:
        self._samples.close()


def without_row(death, settings: ShardSettings) -> ShardTask | None:
    """The shard task of ``death`` (a ``pool.Death``) made again without the row its worker process died on,
    that row failing as ``DECODE_TIMEOUT`` (stuck in one call past ``--decode_timeout``) or ``WORKER_DIED``; None if
    the worker died outside its rows. Both are transient: ``--retry_failed`` tries the row again (an out-of-memory
    kill, or a busy machine's slow decoding, may not happen again)."""
    task: ShardTask = death.task
    if death.item < 0 or any(index == death.item for index, _, _ in task.died):
        return None
    if death.stuck:
        stuck = stuck_failure(settings.sample.frames, settings.decode_timeout, RETRY_LONGER)
        failure = (stuck.reason, stuck.detail)
    else:
        failure = (WORKER_DIED, f"the process making its sample died: {how_it_ended(death.code)}")
    return replace(task, died=(*task.died, (death.item, *failure)))


def _failure(row: Row, reason: str, detail: str, transient: bool = False) -> dict:
    return {"videoid": row.videoid, "row": row.index, "reason": reason, "detail": detail, "transient": transient}
