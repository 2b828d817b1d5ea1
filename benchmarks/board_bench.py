"""Benchmark: what the pool's board (``pipeline.board``) costs a shard worker per video, next to making that video's
sample, and what the pool's process pays per look at its workers' posts.

    python -m benchmarks.board_bench [--videos 200] [--workers 16] [--repeats 3]

In one process attached to a board (as a pool worker is), each round times ``--videos`` rounds of a worker's posts
for one video (its row, then its decoding's deadline set and cleared: 3 writes to shared memory) and, interleaved,
``pipeline.worker``'s ``make_sample`` of a WebVid-like clip (596x336, 25 fps, 18 s, H.264; 4 frames decoded and
JPEG-encoded). It also times ``distribute._look`` over ``--workers`` posted slots (run every ``distribute.POLL_S``
seconds). Prints the medians and the share of a video's time the posts take.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipeline import board, distribute, synthetic
from pipeline.cli import count_problems, fire_main, refuse
from pipeline.fetch import FetchConfig
from pipeline.source import Row
from pipeline.worker import SampleSettings, make_sample


class _Pool:
    """Stands in for the executor: ``_look`` submits to it only when a worker is dead, which none is here."""

    def submit(self, fn):
        raise AssertionError("no worker is dead here")


def main(videos: int = 200, workers: int = 16, repeats: int = 3) -> None:
    """Time the posts and a sample side by side.

    Args:
        videos: videos per round.
        workers: posted slots the pool's look goes over.
        repeats: rounds.
    """
    refuse(count_problems({"videos": (videos, 1), "workers": (workers, 1), "repeats": (repeats, 1)}))
    context = multiprocessing.get_context("spawn")
    posts = board.Board(context, workers)
    board.attach(posts)  # this process posts as a pool worker does; the other slots stand for its peers, idle
    for slot in range(1, workers):
        posts._values[4 * slot : 4 * slot + 4] = [os.getpid(), -1, -1, math.inf]
    posts._claimed.value = workers
    posting, making, looking = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        clip = synthetic.write_webvid_like_clip(Path(folder) / "clip.mp4")
        row = Row(0, "v0", key="v0", caption="a caption", location=str(clip))
        make_sample(row, SampleSettings(), FetchConfig(), 120)  # warm-up
        board.task(0)
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(videos):
                with board.item(i), board.deadline(120):
                    pass
            posting.append((time.perf_counter() - start) / videos)
            start = time.perf_counter()
            for _ in range(max(1, videos // 20)):
                make_sample(row, SampleSettings(), FetchConfig(), 0)
            making.append((time.perf_counter() - start) / max(1, videos // 20))
            start = time.perf_counter()
            for _ in range(videos):
                distribute._look(posts, {}, _Pool())
            looking.append((time.perf_counter() - start) / videos)
    post, make, look = (statistics.median(v) for v in (posting, making, looking))
    print("| what | per round | median |\n|---|---|---|")
    for name, values in (
        ("a worker's posts for one video", posting),
        ("make_sample of one WebVid-like clip", making),
        (f"the pool's look over {workers} slots", looking),
    ):
        rounds = ", ".join(f"{v * 1e6:,.1f} µs" for v in values)
        print(f"| {name} | {rounds} | {statistics.median(values) * 1e6:,.1f} µs |")
    print(f"posts / sample: {post / make:.2e} ({post * 1e6:.1f} µs of {make * 1e3:.1f} ms)")
    print(f"the look: {look * 1e6:.0f} µs every {distribute.POLL_S:g} s ({look / distribute.POLL_S:.1e} of a core)")


if __name__ == "__main__":
    fire_main(main)
