"""The unit of work: turn one shard's rows into ``{shard}.tar`` + ``{shard}_stats.json``.

Runs in a worker process (process pool or Spark executor). Every video either
becomes a sample or a counted failure with a reason; nothing a video does can
stop the shard.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field

from pipeline.fetch import FetchConfig, FetchError, fetch
from pipeline.frames import FrameError, decode_frames, encode_jpeg
from pipeline.source import Row
from pipeline.writer import TarShardWriter, atomic_write_bytes, json_bytes, shard_name, stats_path

UNEXPECTED_ERROR = "unexpected_error"
# 2: the sampler shows videos as players do (rotation, MP4 edit lists, AV1); csv_duration is fingerprinted
FORMAT_VERSION = 2


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


@dataclass(frozen=True)
class ShardTask:
    shard: int
    rows: tuple[Row, ...]
    fingerprint: str  # of the rows and the sample settings; a shard whose stats hold it is done


def fingerprint(rows: tuple[Row, ...], sample: SampleSettings) -> str:
    """Hash of what determines a shard's content; if unchanged, a complete shard is kept on resume."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, asdict(sample)]).encode())
    for r in rows:
        record = [r.index, r.videoid, r.key, r.caption, r.location, r.error, r.csv_duration]
        h.update(json.dumps(record, ensure_ascii=True).encode("ascii", "backslashreplace"))
        h.update(b"\n")
    return h.hexdigest()


def make_sample(row: Row, sample: SampleSettings, fetch_config: FetchConfig) -> list[tuple[str, bytes]]:
    """The tar members of one video: N JPEG frames, the caption, the metadata.

    Raises:
        FetchError, FrameError: the video cannot become a sample.
    """
    source = fetch(row.location, fetch_config)
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
    members = [(f"{k}.jpg", encode_jpeg(im, sample.quality)) for k, im in enumerate(clip.images)]
    members.append(("json", json_bytes(meta)))
    members.append(("txt", row.caption.encode("utf-8")))
    return members


def process_shard(task: ShardTask, settings: ShardSettings) -> dict:
    """Write the shard's tar, then its stats (which mark it complete). Returns the stats."""
    start = time.monotonic()
    # A shard being remade is not complete: drop its old stats before touching its tar.
    stats_path(settings.out_dir, task.shard).unlink(missing_ok=True)
    failures: list[dict] = []
    with TarShardWriter(settings.out_dir, task.shard) as writer:
        for row in task.rows:
            if row.error:
                failures.append(_failure(row, *row.error))
                continue
            try:
                members = make_sample(row, settings.sample, settings.fetch)
            except (FetchError, FrameError) as e:
                failures.append(_failure(row, e.reason, e.detail))
                continue
            except Exception as e:  # a bug or a library surprise: count it, keep going, keep the trace
                detail = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3)[-800:]}"
                failures.append(_failure(row, UNEXPECTED_ERROR, detail))
                continue
            writer.add_sample(row.key, members)
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
    atomic_write_bytes(stats_path(settings.out_dir, task.shard), json_bytes(stats))
    return stats


def _failure(row: Row, reason: str, detail: str) -> dict:
    return {"videoid": row.videoid, "row": row.index, "reason": reason, "detail": detail}
