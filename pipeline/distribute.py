"""Running shard tasks: a local process pool, or Apache Spark (shards are the unit of work).

Both take an *iterator* of tasks and keep only a bounded number in flight, so
the CSV is streamed: memory does not grow with the number of shards.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial

from pipeline import board
from pipeline.board import Board, Post
from pipeline.worker import ShardSettings, ShardTask, process_shard, without_row

OnResult = Callable[[dict], None]
Job = Callable[[ShardTask, ShardSettings], dict]  # a module-level function (pickled by name)
DISTRIBUTORS = ("multiprocessing", "spark")
PARENT_POLL_S = 1.0  # how often a pool worker checks that its run is alive, besides its parent's sentinel
POLL_S = 1.0  # how often the pool's process looks for a worker past its posted deadline (pipeline.board)


@dataclass(frozen=True)
class Death:
    """A task whose worker process died on it. ``item``: the item of the task it had posted being on (-1: none);
    ``stuck``: the pool ended it, its decoding still going past its posted deadline, rather than it dying on its own
    (a crash, the out-of-memory killer)."""

    task: object
    item: int
    stuck: bool


OnDeath = Callable[[Death], object]  # the task to run in the dead one's place, or None


class ShardCrash(RuntimeError):
    """Shards whose worker process died outside their rows (none was posted), even when run alone."""

    def __init__(self, shards: list[int]):
        super().__init__(f"worker process died on shard(s) {shards}")
        self.shards = shards


def run_local(
    tasks: Iterable[ShardTask], settings: ShardSettings, workers: int, on_result: OnResult, job: Job = process_shard
) -> None:
    """Run tasks on ``workers`` processes, at most ``2 * workers`` submitted at a time (``run_isolated``).

    A row whose worker process dies on it (a segfault in a decoder, the OOM killer), or whose decoding is stuck in
    one call past ``--decode_timeout``, fails (``without_row``) and its shard is made again without it; a shard
    whose worker dies outside its rows, even when run alone, is reported in a :class:`ShardCrash` at the end, after
    all other shards are done.
    """
    spawn = multiprocessing.get_context("spawn")  # no fork: safe with threads and native libraries
    dead = run_isolated(tasks, settings, workers, on_result, job, spawn, partial(without_row, settings=settings))
    if dead:
        raise ShardCrash(sorted(death.task.shard for death in dead))


def run_isolated(
    tasks: Iterable,
    settings: object,
    workers: int,
    on_result: Callable,
    job: Callable,
    context,
    on_death: OnDeath = lambda death: None,
) -> list[Death]:
    """``on_result(job(task, settings))`` for every task, on ``workers`` processes of the multiprocessing
    ``context``, at most ``2 * workers`` submitted at a time. A worker that dies leaves a pool's pending results
    unanswered, which used to hang a ``multiprocessing.Pool``'s caller for ever; here:

    - A worker whose decoding is still going ``board.GRACE_S`` after its limit (stuck inside one call, which the
      limit's timer cannot stop) is ended; the other tasks in flight then run again as they were.
    - When a worker dies on its own, its task (told by its exit code: the pool ends the others with SIGTERM), or
      where that cannot tell every task that was running, is run again alone in a fresh process, so that a death is
      known to be its task's; the other tasks run again as they were.

    The death of a task known to be its own goes to ``on_death``, which may give a task to run in its place (a shard
    without the row its worker died on). Returns the deaths it gave none for."""
    dead: list[Death] = []
    tasks = iter(tasks)
    while True:
        deaths, suspects, again = _run_pool(tasks, settings, workers, on_result, job, context)
        if not (deaths or suspects or again):
            return dead
        for death in deaths:
            instead = on_death(death)
            dead.extend([death] if instead is None else [])
            again.extend([] if instead is None else [instead])
        for death in suspects:  # alone, so a death is this task's
            dead.extend(_run_alone(death.task, settings, on_result, job, context, on_death))
        tasks = itertools.chain(again, tasks)


def _run_alone(task: object, settings: object, on_result: Callable, job: Callable, context, on_death: OnDeath):
    """Run ``task`` alone, and what ``on_death`` gives in its place for as long as its worker dies; the death it
    gave nothing for, if any."""
    while True:
        deaths, suspects, again = _run_pool(iter([task]), settings, 1, on_result, job, context)
        if not (deaths or suspects or again):
            return []
        death = (deaths or suspects or [Death(task, -1, stuck=False)])[0]  # alone, a death is its own
        task = on_death(death)
        if task is None:
            return [death]


def _run_pool(
    tasks: Iterator, settings: object, workers: int, on_result: Callable, job: Callable, context
) -> tuple[list[Death], list[Death], list]:
    """Run until ``tasks`` is exhausted.

    Returns ``(deaths, suspects, again)``, all empty unless the pool broke: the deaths of the tasks whose worker
    this ended, stuck past its posted deadline; the tasks that may have killed a worker that died on its own (the
    one its exit code names, else every one that was running), with the item each had posted; and the tasks to run
    again as they are (one taken but not submitted, those queued, and the others that were running).
    """
    posts = Board(context, workers)
    pending: dict[Future, tuple[int, object]] = {}  # -> the task's number on the board, the task
    ended: dict[int, int] = {}  # the task number of each worker this ended -> the item it was on
    workers_by_pid: dict = {}  # pid -> the pool's Process, for its exit code once the pool is down
    numbers = itertools.count()
    taken, next_look = None, 0.0
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(posts,)) as pool:

        def submit(task: object) -> None:
            number = next(numbers)
            pending[pool.submit(_posted, job, number, task, settings)] = (number, task)
            workers_by_pid.update(getattr(pool, "_processes", None) or {})  # a private map: without it, no codes

        try:
            for taken in itertools.islice(tasks, 2 * workers):
                submit(taken)
                taken = None
            while pending:
                done, _ = wait(pending, timeout=max(0.0, next_look - time.monotonic()), return_when=FIRST_COMPLETED)
                if time.monotonic() >= next_look:  # every POLL_S, not after every result (thousands of short videos)
                    _look(posts, ended, pool)
                    next_look = time.monotonic() + POLL_S
                for future in done:
                    result = future.result()  # raises BrokenProcessPool if a worker died
                    del pending[future]
                    on_result(result)
                    for taken in itertools.islice(tasks, 1):
                        submit(taken)
                        taken = None
            return [], [], []
        except BrokenProcessPool:
            pass  # sorted out below, once the pool has reaped its workers (their exit codes)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return _sort_out(pending, taken, posts.posts(), ended, workers_by_pid, on_result)


def _sort_out(
    pending: dict[Future, tuple[int, object]],
    taken: object,
    posts: list[Post],
    ended: dict[int, int],
    workers_by_pid: dict,
    on_result: Callable,
) -> tuple[list[Death], list[Death], list]:
    """``_run_pool``'s answer once its pool broke: ``on_result`` of each task done, and (deaths, suspects, again)."""
    running = {post.task: post for post in posts}
    # (exception() waits for the pool to have failed them all: it fails each in turn, after the first)
    failed = {number for future, (number, _) in pending.items() if future.exception() is not None}
    on_worker = failed & running.keys()
    # A worker that died on its own is told by its exit code, as the pool ends the others with SIGTERM: when every
    # worker of the pool has a code, only one is not SIGTERM's, and that one was on a task, that task alone is the
    # suspect. Else (no map of the pool's processes, a Python that ends them otherwise) every task that was running
    # is. A suspect still runs alone before its death is taken as its own: a crash can surface in a later task than
    # the one that caused it (a heap corrupted by an earlier video), or the out-of-memory killer pick any worker.
    codes = _exit_codes(workers_by_pid)
    own = [pid for pid, code in codes.items() if code != -signal.SIGTERM]
    on_task = {running[number].pid: number for number in on_worker}
    if codes and None not in codes.values() and len(own) == 1 and own[0] in on_task:
        on_worker = {on_task[own[0]]}
    deaths, suspects, again = [], [], [taken] if taken is not None else []
    for future, (number, task) in pending.items():
        if future.exception() is None:
            on_result(future.result())
        elif number in ended:
            deaths.append(Death(task, ended[number], stuck=True))
        elif ended or (on_worker and number not in on_worker):  # well: this process ended a worker, or not the one
            again.append(task)
        else:
            suspects.append(Death(task, running[number].item if number in running else -1, stuck=False))
    return deaths, suspects, again


def _exit_codes(workers_by_pid: dict) -> dict[int, int | None]:
    """The exit code of each of the pool's workers, by pid (None: not ended, which a pool that broke has not left)."""
    return {pid: process.exitcode for pid, process in workers_by_pid.items()}


def _look(posts: Board, ended: dict[int, int], pool: ProcessPoolExecutor) -> None:
    """End the workers past their posted deadline (noting each one's task and item in ``ended``), and wake the pool
    if a worker that had posted a task is dead: CPython's ``submit`` wakes the pool's watching thread before it
    starts a new worker, so the thread can miss a worker started last, and not see it die until another task ends
    (for ever, when the other workers are stuck). Submitting a no-op makes it look again."""
    now, dead = time.monotonic(), False
    for post in posts.posts():
        state = _state(post.pid) if post.pid > 0 else "other"  # never a pid <= 0: kill() takes those for groups
        if post.task >= 0 and state in ("gone", "Z"):
            dead = True
        elif post.deadline < now and post.task not in ended and state == "child":
            ended[post.task] = post.item
            with contextlib.suppress(ProcessLookupError):  # died and reaped since its /proc was read
                os.kill(post.pid, signal.SIGKILL)
    if dead:
        pool.submit(int)  # raises BrokenProcessPool if the pool knows already


def _state(pid: int) -> str:
    """What ``pid`` is: "Z", a zombie (dead, not yet reaped); "gone"; "child", a live child of this process; "other",
    another process (a reaped worker's pid taken again); or "child" where there is no /proc to tell (not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, parent = f.read().rsplit(")", 1)[1].split()[:2]
    except FileNotFoundError:
        return "gone" if os.path.isdir("/proc") else "child"
    except (OSError, ValueError):
        return "other"
    return "Z" if state == "Z" else "child" if int(parent) == os.getpid() else "other"


def _posted(job: Callable, number: int, task: object, settings: object):
    """(In a pool worker) ``job(task, settings)``, posted on the board as the pool's task ``number``."""
    board.task(number)
    return job(task, settings)


def _start_worker(posts: Board) -> None:
    """(A pool worker's initializer) claim a slot of the pool's board, and end with the parent."""
    board.attach(posts)
    _end_with_parent()


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
