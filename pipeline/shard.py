"""CLI: turn a WebVid-style CSV into webdataset shards of N pre-sampled frames + caption per video.

    python -m pipeline.shard --src webvid.csv --out shards/webvid [--workers N]
        [--samples_per_shard 1000] [--frames 4] [--size 256] [--video_root DIR]
        [--distributor multiprocessing|spark]

Re-running the same command resumes: complete shards are kept, missing or
half-written ones are (re)made. With --retry_failed it also tries again the videos of
complete shards that failed for a reason that may pass (a timeout, a dropped
connection, HTTP 429 or 5xx), copying the shards' other samples. The output format is
specified in shards/README.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from pipeline.cli import (
    count_problems,
    fire_main,
    folder_problems,
    positive_problems,
    switch_problems,
    write_failed,
)
from pipeline.cpus import usable_cpus
from pipeline.distribute import DISTRIBUTORS, RUNNERS, ShardCrash
from pipeline.fetch import FetchConfig, is_transient
from pipeline.folder_lock import lock_folder
from pipeline.source import Columns, CsvError, count_rows, iter_rows, read_header
from pipeline.time_limit import decode_timeout_problems
from pipeline.worker import SampleSettings, ShardSettings, ShardTask, fingerprint
from pipeline.writer import INDEX_NAME, read_stats, remove_temporaries, shard_name, write_index


class UsageError(ValueError):
    """Bad arguments; the message says what to change."""


@dataclass
class Totals:
    """Running counts for the progress bar and the final summary."""

    shards_done: int = 0
    shards_skipped: int = 0
    videos: int = 0
    videos_made: int = 0  # in shards written by this run (for the rate)
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    last_shard: int = -1
    retried: int = 0  # videos fetched again by --retry_failed
    recovered: int = 0  # of those, the ones that made a sample this time

    def add(self, stats: dict, skipped: bool) -> None:
        retry = stats.get("retry")
        if skipped:
            self.shards_skipped += 1
        elif retry:  # copied samples were not made again: only the retried videos count for the rate
            self.shards_done += 1
            self.videos_made += retry["retried"]
            self.retried += retry["retried"]
            self.recovered += retry["recovered"]
        else:
            self.shards_done += 1
            self.videos_made += stats["count"]
        self.videos += stats["count"]
        self.ok += stats["ok"]
        self.failed.update(stats["failed"])


def plan_tasks(
    src: Path,
    columns: Columns,
    video_root: Path | None,
    samples_per_shard: int,
    settings: ShardSettings,
    totals: Totals,
    retry_failed: bool = False,
) -> Iterator[tuple[ShardTask | None, dict | None]]:
    """Stream the CSV into shard tasks: ``(task, None)`` to run, or ``(None, stats)`` for a complete shard.

    Shard i holds data rows [i * samples_per_shard, (i + 1) * samples_per_shard).
    A shard is complete if its stats file exists and records the same
    fingerprint (rows and sample settings) as this run computes. With
    ``retry_failed`` a complete shard with transient failures is a task too,
    which carries its stats (``ShardTask.previous``).
    """
    rows = iter_rows(src, columns, video_root)
    for shard in itertools.count():
        chunk = tuple(itertools.islice(rows, samples_per_shard))
        if not chunk:
            return
        totals.last_shard = shard
        task = ShardTask(shard, chunk, fingerprint(chunk, settings.sample))
        stats = read_stats(settings.out_dir, shard)
        if stats is None or stats.get("fingerprint") != task.fingerprint:
            yield task, None
        elif retry_failed and any(is_transient(f) for f in stats.get("failures", ())):
            yield replace(task, previous=stats), None
        else:
            yield None, stats


def validate(
    out,
    workers,
    samples_per_shard,
    frames,
    size,
    quality,
    video_root,
    distributor,
    timeout,
    retries,
    max_mb,
    retry_failed=False,
    progress=True,
    decode_timeout=0,
) -> None:
    """Check the arguments before any work; raise :class:`UsageError` saying what to change."""
    counts = {"workers": (workers, 1), "samples_per_shard": (samples_per_shard, 1), "frames": (frames, 1)}
    problems = count_problems({**counts, "size": (size, 0), "retries": (retries, 0)})
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        problems.append(f"--quality must be a whole number from 1 to 100, got {quality!r}")
    if distributor not in DISTRIBUTORS:
        problems.append(f"--distributor must be one of {', '.join(DISTRIBUTORS)}, got {distributor!r}")
    if distributor == "spark":
        if importlib.util.find_spec("pyspark") is None:
            problems.append("--distributor spark needs pyspark: pip install '/path/to/fitclip[spark]' (this checkout)")
        elif not (shutil.which("java") or os.environ.get("JAVA_HOME")):
            problems.append("--distributor spark needs Java 17+: put java on PATH or set JAVA_HOME")
    if video_root is not None and not Path(video_root).is_dir():
        problems.append(f"--video_root {video_root} is not a directory")
    problems += positive_problems({"timeout": timeout, "max_mb": max_mb})
    problems += decode_timeout_problems(decode_timeout)
    problems += switch_problems({"retry_failed": retry_failed, "progress": progress})
    problems += folder_problems({"out": out})
    if problems:
        raise UsageError("; ".join(problems))


@contextlib.contextmanager
def locked(out_dir: Path):
    """Hold an exclusive lock on ``out_dir`` so two runs never write the same shards at once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = lock_folder(out_dir)
    if handle is None:
        raise UsageError(f"another pipeline.shard run is writing {out_dir}; wait for it or use another --out")
    with handle:
        yield


def main(
    src: str,
    out: str = "shards/webvid",
    workers: int | None = None,
    samples_per_shard: int = 1000,
    frames: int = 4,
    size: int = 256,
    quality: int = 90,
    video_root: str | None = None,
    distributor: str = "multiprocessing",
    id_col: str = "videoid",
    caption_col: str = "name",
    url_col: str = "contentUrl",
    page_dir_col: str = "page_dir",
    duration_col: str = "duration",
    timeout: float = 60.0,
    retries: int = 2,
    max_mb: float = 200.0,
    retry_failed: bool = False,
    progress: bool = True,
    decode_timeout: float = 120.0,
) -> None:
    """Shard a WebVid-style CSV into webdataset tars of N frames + caption per video.

    Args:
        src: the CSV (WebVid columns videoid,name,page_idx,page_dir,duration,contentUrl; any order).
        out: output folder for {shard:06d}.tar and {shard:06d}_stats.json.
        workers: worker processes (default: the cores this process may use, as its CPU affinity and a container's
            CPU quota allow, so a Slurm job's and not the whole node's); with Spark, the cores in local mode.
        samples_per_shard: CSV rows per shard (failed videos leave a shard smaller).
        frames: N frames per video, at the midpoints of N equal segments of the clip.
        size: shorter side of the stored frames in pixels, never upscaled (0 keeps the original).
        quality: JPEG quality of the stored frames.
        video_root: find videos as DIR/{page_dir}/{videoid}.mp4 instead of the URL column.
        distributor: multiprocessing (one machine) or spark (a cluster, or local mode).
        id_col: name of the video id column.
        caption_col: name of the caption column.
        url_col: name of the column with an http(s) URL or a file path (relative to the CSV's folder).
        page_dir_col: name of the column with the sub-folder under --video_root (a CSV without the default column:
            the videos are --video_root's own files).
        duration_col: name of the ISO 8601 duration column (stored as csv_duration; part of each shard's fingerprint).
        timeout: seconds for one whole download attempt.
        retries: extra attempts after a transient download failure (with backoff).
        max_mb: downloads larger than this many MiB fail as too_large.
        retry_failed: also remake complete shards whose videos failed for a reason that may pass (a timeout,
            an unreachable host, HTTP 429 or 5xx, a decode past --decode_timeout); those videos are fetched
            again, the shard's samples copied.
        progress: show a progress bar.
        decode_timeout: seconds one video's decoding may take (0 for no limit, else at most a day); past it the
            video fails as decode_timeout, which --retry_failed tries again.
    """
    workers = usable_cpus() if workers is None else workers
    src, out = str(src), str(out)  # fire turns "2024" into an int
    video_root = None if video_root is None else str(video_root)
    try:
        validate(
            out,
            workers,
            samples_per_shard,
            frames,
            size,
            quality,
            video_root,
            distributor,
            timeout,
            retries,
            max_mb,
            retry_failed,
            progress,
            decode_timeout,
        )
        columns = Columns(str(id_col), str(caption_col), str(url_col), str(page_dir_col), str(duration_col))
        read_header(src, columns, video_root)
    except (UsageError, CsvError) as e:
        sys.exit(f"error: {e}")
    out_dir = Path(out)
    settings = ShardSettings(
        out_dir=str(out_dir),
        sample=SampleSettings(frames=frames, size=size, quality=quality),
        fetch=FetchConfig(timeout=float(timeout), retries=retries, max_bytes=int(max_mb * 2**20)),
        decode_timeout=float(decode_timeout),
    )
    try:
        with locked(out_dir):
            code = run(
                Path(src),
                columns,
                Path(video_root) if video_root else None,
                samples_per_shard,
                settings,
                workers,
                distributor,
                progress,
                retry_failed,
            )
    except UsageError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: complete shards are kept; rerun the same command to finish the rest")
    except OSError as e:  # a row's own read errors are failures in its shard's stats: this is OUT's, or the CSV's
        # where OUT could not even be made, there is nothing yet to keep or go on from
        kept = "; complete shards are kept, and rerunning the same command makes the rest" if out_dir.is_dir() else ""
        sys.exit(f"error: {_os_problem(e, out_dir)}{kept}")
    sys.exit(code)


def _os_problem(error: OSError, out_dir: Path) -> str:
    """What failed, and what to do about it: a write into OUT (a full disk), or the reading of a file outside it
    (the CSV)."""
    name = Path(error.filename).resolve() if isinstance(error.filename, str) and error.filename else None
    if name is not None and out_dir.resolve() not in (name, *name.parents):
        return f"reading {error.filename} failed: {error}. Check that it can be read"
    return write_failed(
        error, out_dir, "A shard is larger than this filesystem or ulimit -f allows: lower --samples_per_shard"
    )


def run(
    src: Path,
    columns: Columns,
    video_root: Path | None,
    samples_per_shard: int,
    settings: ShardSettings,
    workers: int,
    distributor: str,
    progress: bool = True,
    retry_failed: bool = False,
) -> int:
    """Make every missing shard (and with ``retry_failed`` retry the transient failures of complete ones); print a
    summary. Returns the process exit code."""
    out_dir = Path(settings.out_dir)
    remove_temporaries(out_dir)
    total_rows = count_rows(src)
    shards = -(-total_rows // samples_per_shard)
    print(
        f"pipeline.shard: {total_rows} rows in {src} -> {out_dir}/ ({samples_per_shard} per shard, "
        f"{settings.sample.frames} frames, size {settings.sample.size}, {workers} {distributor} worker(s))",
        flush=True,
    )
    totals = Totals()
    bar = tqdm(total=total_rows, unit="video", disable=not progress, smoothing=0.1, dynamic_ncols=True)
    start = time.monotonic()

    def on_result(stats: dict, skipped: bool = False) -> None:
        totals.add(stats, skipped)
        bar.update(stats["count"])
        bar.set_postfix(ok=totals.ok, failed=sum(totals.failed.values()), refresh=False)

    planned = []

    def to_run() -> Iterator[ShardTask]:
        unfinished = False
        for task, stats in plan_tasks(src, columns, video_root, samples_per_shard, settings, totals, retry_failed):
            if task is None:
                on_result(stats, skipped=True)
                continue
            if not unfinished:  # before the folder changes: until this run ends, readers refuse it
                write_index(out_dir, shards, src, finished=False)
                unfinished = True
            yield task
        planned.append(totals.last_shard + 1)

    crashed: list[int] = []
    try:
        RUNNERS[distributor](to_run(), settings, workers, on_result)
    except ShardCrash as e:
        crashed = e.shards
    finally:
        bar.close()
    elapsed = time.monotonic() - start
    if planned:  # every shard was made or tried (a crashed one stays missing: the readers say so)
        shards = planned[0]  # the CSV's rows as read, which the quick count may miscount
        write_index(out_dir, shards, src, finished=True)
    print_summary(totals, elapsed, out_dir, crashed)
    warn_stale(out_dir, shards - 1)
    if totals.videos and not totals.ok:  # every row failed (a decoder that cannot open any file, or no video at all)
        print(
            f"error: none of the {totals.videos} videos made a sample; see the reasons above and the failures in "
            f"{out_dir}/*_stats.json",
            file=sys.stderr,
        )
        return 1
    return 1 if crashed else 0


def print_summary(totals: Totals, elapsed: float, out_dir: Path, crashed: list[int]) -> None:
    rate = totals.videos_made / elapsed if elapsed > 0 else 0.0
    failed = sum(totals.failed.values())
    print(
        f"done in {elapsed:.1f} s: {totals.shards_done} shard(s) written, {totals.shards_skipped} already complete; "
        f"{totals.videos} videos: {totals.ok} ok, {failed} failed; {rate:.1f} videos/s"
    )
    if totals.retried:
        print(f"retried {totals.retried} video(s) that had failed transiently: {totals.recovered} made it this time")
    if failed:
        reasons = ", ".join(f"{reason} {count}" for reason, count in totals.failed.most_common())
        print(f"failed by reason: {reasons} (per-video details in {out_dir}/*_stats.json)")
    if totals.last_shard >= 0:
        print(f"shards: {out_dir}/{{{shard_name(0)}..{shard_name(totals.last_shard)}}}.tar")
    if crashed:
        print(
            f"error: a worker process died on shard(s) {crashed} outside any of their videos (reading or writing "
            "their tars, twice, in two processes), so they were not written; rerun to retry them.",
            file=sys.stderr,
        )


def warn_stale(out_dir: Path, last_shard: int) -> None:
    """Say so if the folder holds shards past the last one this CSV makes (from another run): readers skip them, as
    the folder's index says, but they take space."""
    stale = sorted(
        p.name
        for p in itertools.chain(out_dir.glob("*.tar"), out_dir.glob("*_stats.json"))
        if p.name[:6].isdigit() and int(p.name[:6]) > last_shard
    )
    if stale:
        print(
            f"warning: {out_dir} holds {len(stale)} file(s) past the last shard of this CSV "
            f"(e.g. {stale[0]}), from an earlier run with other input. Training and pipeline.subset skip them "
            f"(they read the shards {out_dir / INDEX_NAME} lists); remove them to free their space.",
            file=sys.stderr,
        )


def cli() -> None:
    """The installed command (setup.cfg's console_scripts)."""
    fire_main(main, texts=True)


if __name__ == "__main__":
    cli()
