"""Running shard tasks: a local process pool, or Apache Spark (shards are the unit of work).

Both take an *iterator* of tasks and keep only a bounded number in flight, so
the CSV is streamed: memory does not grow with the number of shards.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from functools import partial

from pipeline.pool import run_isolated
from pipeline.worker import ShardSettings, ShardTask, process_shard, without_row

OnResult = Callable[[dict], None]
Job = Callable[[ShardTask, ShardSettings], dict]  # a module-level function (pickled by name)
DISTRIBUTORS = ("multiprocessing", "spark")


class ShardCrash(RuntimeError):
    """Shards whose worker process died outside their rows (none was posted), twice."""

    def __init__(self, shards: list[int]):
        super().__init__(f"worker process died on shard(s) {shards}")
        self.shards = shards


def run_local(
    tasks: Iterable[ShardTask], settings: ShardSettings, workers: int, on_result: OnResult, job: Job = process_shard
) -> None:
    """Run tasks on ``workers`` processes, one shard to a worker at a time (``pipeline.pool.run_isolated``).

    A row whose worker process dies on it twice (a segfault in a decoder, the OOM killer), or whose decoding is stuck
    in one call past ``--decode_timeout``, fails (``without_row``) and its shard is made again without it; the other
    workers go on with theirs. A shard whose worker dies outside its rows, twice, is reported in a
    :class:`ShardCrash` at the end, after all other shards are done.
    """
    spawn = multiprocessing.get_context("spawn")  # no fork: safe with threads and native libraries
    dead = run_isolated(tasks, settings, workers, on_result, job, spawn, partial(without_row, settings=settings))
    if dead:
        raise ShardCrash(sorted(death.task.shard for death in dead))


def run_spark(
    tasks: Iterable[ShardTask],
    settings: ShardSettings,
    workers: int,
    on_result: OnResult,
    batch: int | None = None,
    window: int = 3,
) -> None:
    """Run tasks as Spark jobs of ``batch`` shards each (default: the cluster's parallelism), ``window`` jobs at a
    time: a job is submitted as soon as one ends, so the cores a job's last shards leave free take the next job's
    shards. (Jobs that ran one after another each waited for their slowest shard, one with many download time-outs,
    with the cluster's other cores idle meanwhile.)

    Uses the active Spark session, or creates one: with ``spark-submit`` the
    master comes from its configuration; otherwise local mode with ``workers``
    cores. ``settings.out_dir`` must be a folder every executor can write (a
    shared filesystem on a cluster).
    """
    spark = _spark_session(workers)
    context = spark.sparkContext
    batch = batch or max(1, context.defaultParallelism)
    job = partial(process_shard, settings=settings)

    def run_job(chunk: list[ShardTask]) -> list[dict]:  # in a thread of its own: Spark runs such jobs side by side
        return context.parallelize(chunk, len(chunk)).map(job).collect()

    # on a failure or Ctrl-C, the jobs still in flight are cancelled: a run stops, not just its driver
    run_windowed(chunks(tasks, batch), run_job, window, on_result, cancel=context.cancelAllJobs)


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` consecutive items (the last may be shorter), taken as they are asked for."""
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def run_windowed(
    jobs: Iterator[list],
    run_job: Callable[[list], list[dict]],
    window: int,
    on_result: OnResult,
    cancel: Callable[[], None] = lambda: None,
) -> None:
    """``run_job(chunk)`` for each chunk of ``jobs``, ``window`` at a time in threads, a new one as soon as one
    ends; ``on_result`` of each of its results, in this thread. Chunks are taken from ``jobs`` only as they are
    submitted (the CSV is streamed). If a job fails (or Ctrl-C), ``cancel()`` stops those running, before this
    waits for their threads."""
    with ThreadPoolExecutor(window, thread_name_prefix="spark-job") as pool:
        pending: set[Future] = set()
        try:
            while True:
                while len(pending) < window and (chunk := next(jobs, None)) is not None:
                    pending.add(pool.submit(run_job, chunk))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    for stats in future.result():
                        on_result(stats)
        except BaseException:
            for future in pending:
                future.cancel()
            cancel()
            raise


def _spark_session(workers: int):
    try:
        from pyspark import SparkConf
        from pyspark.sql import SparkSession
    except ImportError as e:
        raise RuntimeError(
            "--distributor spark needs pyspark: pip install '/path/to/fitclip[spark]' (this checkout), and Java 17+"
            " on PATH"
        ) from e
    conf = SparkConf()
    builder = SparkSession.builder.appName("fitclip-shard").config("spark.ui.showConsoleProgress", "false")
    if not conf.contains("spark.master"):  # not under spark-submit: local mode on this machine
        # Executors must run the same Python (and so see the same packages) as this driver.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = builder.master(f"local[{workers}]").config("spark.ui.enabled", "false")
    return builder.getOrCreate()


RUNNERS: dict[str, Callable[..., None]] = {"multiprocessing": run_local, "spark": run_spark}
