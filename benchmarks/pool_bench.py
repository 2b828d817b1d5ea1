"""Benchmark: ``pipeline.pool.run_isolated`` against ``concurrent.futures.ProcessPoolExecutor``, side by side in one
run, and what a worker's posts (``pipeline.board``) cost per video.

    python -m benchmarks.pool_bench [--workers 2] [--tasks 2000] [--task_ms 20] [--shard_s 4] [--videos 200]
        [--repeats 3]

Four measurements, each round running both pools one after the other on the spawn context (as ``pipeline.shard``):

1. **Per-task cost**: ``--tasks`` tasks that return at once: the time between two results, from the first to the
   last (the workers' start left out). Ours sends one task to a worker at a time, so a worker waits one round trip
   between tasks; the executor queues them ahead.
2. **Short tasks** (eval's frame cache sends one video a task): ``--tasks`` / 10 tasks of ``--task_ms`` ms (a sleep,
   so the cores are not the limit): the time between two results, times the workers, over ``--task_ms``.
3. **One death among long tasks** (shards): ``--workers`` - 1 tasks of ``--shard_s`` s, beside one whose worker
   dies ``--shard_s`` / 2 after they have all started (a decoder's crash). The executor's pool breaks and ends the
   others, which are then made again from their start, as ``pipeline.distribute`` did before (the dying task alone
   first, and a no-op submitted once a second while a worker is dead, or the executor may not see the death until
   another task ends): the long tasks started again, and the time to the end.
4. **Posts**: in this process, attached to a board as a worker is, ``--videos`` rounds of a worker's posts for one
   video (its row; its decoding's deadline set and cleared), beside ``make_sample`` of a WebVid-like clip (596x336,
   25 fps, 18 s, H.264; 4 frames decoded and JPEG-encoded); and the pool's look (every ``pool.POLL_S``) over
   ``--workers`` live workers.

Prints markdown tables with every round and the medians.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from pipeline import board, pool, synthetic
from pipeline.cli import count_problems, fire_main, positive_problems, refuse
from pipeline.fetch import FetchConfig
from pipeline.source import Row
from pipeline.worker import SampleSettings, make_sample


def nothing(task: int, settings: object) -> int:
    return task


def sleep_ms(task: int, milliseconds: float) -> int:
    time.sleep(milliseconds / 1000)
    return task


def long_or_dying(task: int, settings: tuple[float, str, int]) -> int:
    """Each task notes that it started (a file in ``folder``). Task -1's process ends ``seconds`` / 2 after all
    ``workers`` tasks have started (so that the others are running then, however slow their start); the others take
    ``seconds``."""
    seconds, folder, workers = settings
    Path(folder, f"started-{task}-{os.getpid()}-{time.monotonic_ns()}").touch()
    if task < 0:
        while len(os.listdir(folder)) < workers:
            time.sleep(0.01)
        time.sleep(seconds / 2)
        os._exit(11)
    time.sleep(seconds)
    return task


def _ours(tasks: list, settings: object, workers: int, job) -> tuple[float, list, list[float]]:
    """Seconds to the end, the results (and ``dead:TASK`` for each death), and when each result came."""
    start = time.perf_counter()
    results, times = [], []

    def on_result(result):
        results.append(result)
        times.append(time.perf_counter())

    dead = pool.run_isolated(tasks, settings, workers, on_result, job, multiprocessing.get_context("spawn"))
    return time.perf_counter() - start, [*results, *(f"dead:{death.task}" for death in dead)], times


def _executors(tasks: list, settings: object, workers: int, job) -> tuple[float, list, list[float]]:
    """As ``_ours``, on an executor as ``pipeline.distribute`` ran them before: after a worker's death, the task that
    killed it (told by its exit code: here the one below 0) is run alone, and the others that did not finish are run
    again in a new executor, from their start."""
    start = time.perf_counter()
    results, times = [], []
    context = multiprocessing.get_context("spawn")
    todo = list(tasks)
    while todo:
        queue, futures, unsent = iter(todo), {}, []  # at most 2 x workers submitted at a time, as distribute kept
        with ProcessPoolExecutor(workers, mp_context=context) as executor:
            pending: set = set()
            for task in itertools.islice(queue, 2 * workers):
                _submit(executor, job, task, settings, futures, pending, unsent)
            while pending:
                done, pending = wait(pending, timeout=pool.POLL_S, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.exception() is None:
                        times.append(time.perf_counter())
                        for task in itertools.islice(queue, 1):
                            _submit(executor, job, task, settings, futures, pending, unsent)
                if any(process.exitcode is not None for process in executor._processes.values()):
                    # as distribute's look did: CPython's executor can miss the death of the worker it started
                    # last until another task ends (its submit wakes it)
                    with contextlib.suppress(BrokenProcessPool, RuntimeError):
                        executor.submit(int)
        todo = [*unsent, *queue]
        for future, task in futures.items():
            if future.exception() is None:
                results.append(future.result())
            elif task >= 0:
                todo.append(task)
            else:
                with ProcessPoolExecutor(1, mp_context=context) as alone:
                    try:
                        results.append(alone.submit(job, task, settings).result())
                    except BrokenProcessPool:
                        results.append(f"dead:{task}")
    return time.perf_counter() - start, results, times


def _submit(executor, job, task: int, settings, futures: dict, pending: set, unsent: list) -> None:
    try:
        future = executor.submit(job, task, settings)
    except BrokenProcessPool:
        unsent.append(task)
        return
    futures[future] = task
    pending.add(future)


def _between(times: list[float]) -> float:
    """Seconds between two results, from the first to the last (the workers' start left out)."""
    return (times[-1] - times[0]) / (len(times) - 1)


def _started_again(folder: Path) -> int:
    """How many times a long task (not the dying one) was started after its first: its work so far lost."""
    tasks = [name.split("-")[1] for name in os.listdir(folder) if not name.startswith("started--")]
    return len(tasks) - len(set(tasks))


def main(
    workers: int = 2,
    tasks: int = 2000,
    task_ms: float = 20,
    shard_s: float = 4,
    videos: int = 200,
    repeats: int = 3,
) -> None:
    """Time both pools and the posts, side by side.

    Args:
        workers: worker processes of each pool.
        tasks: tasks that return at once; a tenth of them for the short tasks.
        task_ms: the short tasks' milliseconds.
        shard_s: the long tasks' seconds.
        videos: rounds of a worker's posts, and a twentieth of them of make_sample.
        repeats: rounds of everything.
    """
    refuse(
        count_problems({"workers": (workers, 1), "tasks": (tasks, 10), "videos": (videos, 20), "repeats": (repeats, 1)})
        + positive_problems({"task_ms": task_ms, "shard_s": shard_s})
    )
    rows: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    short = tasks // 10
    long = [-1, *range(workers - 1)]  # the dying one first: it starts beside the others
    for _ in range(repeats):
        for name, run in (("pipeline.pool", _ours), ("ProcessPoolExecutor", _executors)):
            _, results, times = run(list(range(tasks)), None, workers, nothing)
            assert sorted(results) == list(range(tasks)), name
            note(f"{name}: per task, tasks that return at once (µs)", _between(times) * 1e6)
            _, results, times = run(list(range(short)), task_ms, workers, sleep_ms)
            assert sorted(results) == list(range(short)), name
            note(
                f"{name}: {short} tasks of {task_ms:g} ms, time per task / ideal",
                _between(times) * workers * 1000 / task_ms,
            )
            with tempfile.TemporaryDirectory() as folder:
                seconds, results, _ = run(long, (shard_s, folder, workers), workers, long_or_dying)
                assert sorted(map(str, results)) == sorted(map(str, [*long[1:], "dead:-1"])), (name, results)
                note(f"{name}: {workers - 1} task(s) of {shard_s:g} s beside one dying, seconds to the end", seconds)
                note(f"{name}: the same, long tasks started again", _started_again(Path(folder)))
    names = (
        "a worker's posts for one video (µs)",
        "make_sample of one WebVid-like clip (µs)",
        f"the pool's look over {workers} live workers (µs)",
    )
    for name, values in zip(names, _posts_and_look(videos, workers, repeats), strict=True):
        rows[name] = values

    print("| what | per round | median |\n|---|---|---|")
    for name, values in rows.items():
        each = ", ".join(f"{v:,.2f}" if v < 100 else f"{v:,.0f}" for v in values)
        print(f"| {name} | {each} | {statistics.median(values):,.2f} |")
    for what in ("per task, tasks that return at once", "time per task / ideal", "seconds to the end"):
        ours, theirs = (statistics.median(v) for k, v in rows.items() if what in k)
        print(f"ours / ProcessPoolExecutor, {what}: {ours / theirs:.2f}")
    post, make = (statistics.median(v) for k, v in rows.items() if k.startswith(("a worker", "make_sample")))
    print(f"posts / sample: {post / make:.2e}")


def _posts_and_look(videos: int, workers: int, repeats: int) -> tuple[list[float], list[float], list[float]]:
    """Per round: µs of a worker's posts for one video, of one make_sample, and of one look over live workers."""
    context = multiprocessing.get_context("spawn")
    posts = board.Board(context, workers)
    board.attach(posts, 0)  # this process posts as a pool worker does
    crew = []
    for slot in range(workers):
        process = context.Process(target=time.sleep, args=(120,))
        process.start()
        crew.append(pool._Worker(process, None, slot, entry=pool._Entry(slot), ready=True))
    posting, making, looking = [], [], []
    try:
        with tempfile.TemporaryDirectory() as folder:
            clip = synthetic.write_webvid_like_clip(Path(folder) / "clip.mp4")
            row = Row(0, "v0", key="v0", caption="a caption", location=str(clip))
            make_sample(row, SampleSettings(), FetchConfig(), 120)  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                for i in range(videos):
                    with board.item(i), board.deadline(120):
                        pass
                posting.append((time.perf_counter() - start) / videos * 1e6)
                start = time.perf_counter()
                for _ in range(videos // 20):
                    make_sample(row, SampleSettings(), FetchConfig(), 0)
                making.append((time.perf_counter() - start) / (videos // 20) * 1e6)
                start = time.perf_counter()
                for _ in range(videos):  # as the pool's loop does once a POLL_S: the look, and each worker polled
                    pool._look(crew, posts)
                    [worker.process.is_alive() for worker in crew]
                looking.append((time.perf_counter() - start) / videos * 1e6)
    finally:
        board.attach(None, -1)
        for worker in crew:
            worker.process.kill()
            worker.process.join()
    return posting, making, looking


if __name__ == "__main__":
    fire_main(main)
