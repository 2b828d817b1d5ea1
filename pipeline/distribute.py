"""Running shard tasks: a local process pool, or Apache Spark (shards are the unit of work).

Both take an *iterator* of tasks and keep only a bounded number in flight, so
the CSV is streamed: memory does not grow with the number of shards.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from functools import partial

from pipeline.worker import ShardSettings, ShardTask, process_shard

OnResult = Callable[[dict], None]
Job = Callable[[ShardTask, ShardSettings], dict]  # a module-level function (pickled by name)
DISTRIBUTORS = ("multiprocessing", "spark")
PARENT_POLL_S = 1.0  # how often a pool worker checks that its run is alive, besides its parent's sentinel


class ShardCrash(RuntimeError):
    """Shards whose worker process died (e.g. a decoder crash) even when run alone."""

    def __init__(self, shards: list[int]):
        super().__init__(f"worker process died on shard(s) {shards}")
        self.shards = shards


def run_local(
    tasks: Iterable[ShardTask], settings: ShardSettings, workers: int, on_result: OnResult, job: Job = process_shard
) -> None:
    """Run tasks on ``workers`` processes, at most ``2 * workers`` submitted at a time.

    If a worker process dies (a segfault in a decoder, the OOM killer), the
    shards that were in flight are rerun one at a time in fresh processes, so
    the one that kills its worker is identified; such shards are reported in a
    :class:`ShardCrash` at the end, after all other shards are done.
    """
    spawn = multiprocessing.get_context("spawn")  # no fork: safe with threads and native libraries
    crashed = run_isolated(tasks, settings, workers, on_result, job, spawn)
    if crashed:
        raise ShardCrash(sorted(t.shard for t in crashed))


def run_isolated(tasks: Iterable, settings: object, workers: int, on_result: Callable, job: Callable, context) -> list:
    """``on_result(job(task, settings))`` for every task, on ``workers`` processes of the multiprocessing
    ``context``, at most ``2 * workers`` submitted at a time; returns the tasks whose worker process died even when
    run alone (the tasks in flight when a worker dies are rerun one at a time in fresh processes, so that the one
    that kills its worker is identified, and the others are not lost). A worker that dies leaves a pool's pending
    results unanswered, which used to hang a ``multiprocessing.Pool``'s caller for ever."""
    crashed = []
    tasks = iter(tasks)
    while True:
        suspects, unstarted = _run_pool(tasks, settings, workers, on_result, job, context)
        if not suspects and not unstarted:
            return crashed
        for task in suspects:  # alone, so a crash is this task's
            again, _ = _run_pool(iter([task]), settings, 1, on_result, job, context)
            crashed.extend(again)
        tasks = itertools.chain(unstarted, tasks)


def _run_pool(
    tasks: Iterator, settings: object, workers: int, on_result: Callable, job: Callable, context
) -> tuple[list, list]:
    """Run until ``tasks`` is exhausted.

    Returns ``(suspects, unstarted)``, both empty unless the pool broke: then the
    tasks that were running when a worker died, and one taken but not submitted.
    """
    pending: dict[Future, object] = {}
    taken = None
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_end_with_parent) as pool:
        try:
            for taken in itertools.islice(tasks, 2 * workers):
                pending[pool.submit(job, taken, settings)] = taken
                taken = None
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()  # raises BrokenProcessPool if a worker died
                    del pending[future]
                    on_result(result)
                    for taken in itertools.islice(tasks, 1):
                        pending[pool.submit(job, taken, settings)] = taken
                        taken = None
        except BrokenProcessPool:
            suspects = []
            for future, task in pending.items():
                if future.done() and not future.cancelled() and future.exception() is None:
                    on_result(future.result())
                else:
                    suspects.append(task)
            return suspects, [taken] if taken is not None else []
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return [], []


def _end_with_parent() -> None:
    """(A pool worker's initializer) end this worker when the process that started it dies. Killed with SIGKILL, a
    run's pool cannot stop its workers: they went on with the tasks queued to them, then waited for ever, and a late
    one deleted or overwrote what the next run into the same folder had written (it holds no lock)."""
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="end-with-parent").start()


def _watch_parent(ppid: int) -> None:
    """Wait until the parent ``ppid`` is gone, then end this process (``os._exit``). The parent's sentinel (a pipe
    that closes with it) says so at once; with fork, a process the parent forks later holds that pipe open too, so
    the parent id is also checked every ``PARENT_POLL_S`` (the orphan is handed to another process)."""
    parent = multiprocessing.parent_process()
    while os.getppid() == ppid:
        if parent is not None:
            parent.join(PARENT_POLL_S)
            if not parent.is_alive():
                break
        else:
            time.sleep(PARENT_POLL_S)
    os._exit(1)


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
