"""A worker stuck inside one call that --decode_timeout's timer cannot stop is ended, and the row a worker dies on
costs that row only (pipeline.board, distribute.run_isolated, worker.without_row)."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import shutil
import time
from functools import partial

import pytest
from crash_jobs import record_shard, shard_with_bad_rows, stuck_on_shard_1

from pipeline import board, distribute
from pipeline.distribute import Death, run_isolated, run_local
from pipeline.source import Row
from pipeline.time_limit import limit_of, stuck_too_long
from pipeline.worker import WORKER_DIED, ShardSettings, ShardTask, without_row
from pipeline.writer import iter_tar_samples, stats_path, tar_path

FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")


def test_a_worker_posts_its_task_item_and_deadline_and_the_pool_reads_them(monkeypatch):
    posts = board.Board(FORK, 2)
    assert posts.posts() == []
    monkeypatch.setattr(board, "_board", None)  # this process posts as a worker below; both are put back after
    monkeypatch.setattr(board, "_slot", -1)
    with board.item(3), board.deadline(1):  # outside a pool worker: nothing, and no error
        board.task(2)
    board.attach(posts)
    assert posts.posts() == [board.Post(os.getpid(), -1, -1, math.inf)]
    board.task(7)
    with board.item(12):
        assert posts.posts() == [board.Post(os.getpid(), 7, 12, math.inf)]
        before = time.monotonic()
        with board.deadline(5):
            (post,) = posts.posts()
            assert before + 5 + board.GRACE_S <= post.deadline <= time.monotonic() + 5 + board.GRACE_S
        with board.deadline(0):  # no limit, no deadline
            assert posts.posts()[0].deadline == math.inf
        assert posts.posts()[0].deadline == math.inf and posts.posts()[0].item == 12
    # out of the item, the task stays posted until the next: a death sending its result is the task's, no item's
    assert posts.posts() == [board.Post(os.getpid(), 7, -1, math.inf)]
    board.task(8)
    assert posts.posts() == [board.Post(os.getpid(), 8, -1, math.inf)]
    board.attach(posts)
    board.attach(posts)  # a third worker of a 2-worker pool gets no slot, and posts nothing
    assert len(posts.posts()) == 2 and board._slot == -1


@pytest.mark.timeout(60)
def test_a_worker_stuck_in_one_call_is_ended_and_the_others_finish(tmp_path, monkeypatch):
    """Shard 1's decoding never comes back to Python, so its 0.5 s timer cannot stop it: the run used to wait for it
    for ever. Its worker is ended 0.5 s (the grace) past the limit, and every other shard is done, in a pool: the
    break was this process's doing, so none of them is a suspect to run alone."""
    alone = spy_alone(monkeypatch)
    results = []
    start = time.monotonic()
    dead = run_isolated(
        [ShardTask(i, (), "fp") for i in range(5)],
        ShardSettings(out_dir=str(tmp_path)),
        2,
        results.append,
        stuck_on_shard_1,
        FORK,
    )
    assert [(d.task.shard, d.item, d.stuck) for d in dead] == [(1, -1, True)]
    assert sorted(r["shard"] for r in results) == [0, 2, 3, 4] and alone == []
    assert time.monotonic() - start < 30


def spy_alone(monkeypatch) -> list[int]:
    """The shards run alone (as suspects), in order."""
    alone = []
    real = distribute._run_alone

    def spy(task, *args):
        alone.append(task.shard)
        return real(task, *args)

    monkeypatch.setattr(distribute, "_run_alone", spy)
    return alone


def row(index: int, video) -> Row:
    return Row(index, f"v{index}", key=f"v{index}", caption=f"caption {index}", location=str(video))


@pytest.mark.timeout(120)
def test_a_row_that_kills_or_sticks_its_worker_costs_that_row_not_its_shard(tmp_path, videos):
    """A decoder's crash on one row lost its whole shard (1,000 videos), run after run; a call into FFmpeg that never
    returned held the run for ever. Now each fails as its row's failure, and the shard is written without it."""
    src = tmp_path / "src"
    src.mkdir()
    names = ["a", "crash", "b", "c", "stuck", "d"]
    for name in names:
        shutil.copy(videos["idx60"], src / f"{name}.mp4")
    rows = [row(i, src / f"{name}.mp4") for i, name in enumerate(names)]
    out = tmp_path / "out"
    out.mkdir()
    settings = ShardSettings(out_dir=str(out), decode_timeout=1)
    tasks = [ShardTask(0, tuple(rows[:3]), "fp0"), ShardTask(1, tuple(rows[3:]), "fp1")]
    results = []
    run_local(tasks, settings, 2, results.append, job=shard_with_bad_rows)

    assert sorted(r["shard"] for r in results) == ["000000", "000001"]
    keys = {shard: [key for key, _ in iter_tar_samples(tar_path(out, shard))] for shard in (0, 1)}
    assert keys == {0: ["v0", "v2"], 1: ["v3", "v5"]}
    failures = {f["row"]: f for shard in (0, 1) for f in json.loads(stats_path(out, shard).read_text())["failures"]}
    assert sorted(failures) == [1, 4], failures
    assert failures[1]["reason"] == WORKER_DIED and failures[1]["transient"], failures
    assert failures[4]["reason"] == "decode_timeout" and failures[4]["transient"], failures
    assert failures[4]["detail"].startswith(stuck_too_long(4, 1)), failures
    assert "--retry_failed" in failures[4]["detail"]
    assert limit_of(f"decode_timeout: {failures[4]['detail']}") == 1


def test_a_death_outside_the_rows_or_on_a_row_it_died_on_before_gives_no_task():
    task = ShardTask(0, (), "fp")
    settings = ShardSettings(out_dir=".")
    assert without_row(Death(task, -1, stuck=False), settings) is None
    again = without_row(Death(task, 5, stuck=False), settings)
    assert again.died == ((5, WORKER_DIED, again.died[0][2]),)
    assert without_row(Death(again, 5, stuck=True), settings) is None
    stuck = without_row(Death(again, 6, stuck=True), settings)
    assert [d[:2] for d in stuck.died] == [(5, WORKER_DIED), (6, "decode_timeout")]


@pytest.mark.parametrize("codes", ["known", "unknown"])
def test_a_worker_that_dies_is_told_by_its_exit_code_else_the_running_tasks_run_alone(tmp_path, monkeypatch, codes):
    """Each task in flight was run again alone, one after another: twice the workers' number of whole shards (at 16
    workers and 1,000 videos a shard, half an hour on one core per death). The dead worker is told by its exit code
    (the pool ends the others with SIGTERM), so only its task is; where the codes are not known, only the tasks that
    were running are (queued ones, on no worker's slot, cannot have killed it)."""
    from crash_jobs import crash_on_shard_3

    if codes == "unknown":
        monkeypatch.setattr(distribute, "_exit_codes", lambda workers_by_pid: dict.fromkeys(workers_by_pid))
    alone = spy_alone(monkeypatch)
    results = []
    dead = run_isolated(
        [ShardTask(i, (), "fp") for i in (0, 3, 4, 5, 6)],
        ShardSettings(out_dir=str(tmp_path)),
        2,
        results.append,
        crash_on_shard_3,
        SPAWN,
    )
    assert [(d.task.shard, d.item, d.stuck) for d in dead] == [(3, -1, False)]
    assert sorted(r["shard"] for r in results) == [0, 4, 5, 6]
    assert alone == ([3] if codes == "known" else [0, 3])


def test_a_task_named_by_an_exit_code_is_still_run_alone_before_it_is_blamed(tmp_path):
    """A crash can surface in a later task than the one that caused it: shard 1 leaves a thread that ends its worker
    0.5 s later, on shard 2. Blamed on its exit code alone, shard 2 failed; run alone, it is made."""
    from crash_jobs import leaves_a_crash_behind_on_shard_1

    results = []
    dead = run_isolated(
        [ShardTask(i, (), "fp") for i in (1, 2, 3)],
        ShardSettings(out_dir=str(tmp_path)),
        1,
        results.append,
        leaves_a_crash_behind_on_shard_1,
        SPAWN,
    )
    assert dead == [] and sorted(r["shard"] for r in results) == [1, 2, 3]


def test_the_pool_ends_only_a_live_child_past_its_deadline_and_is_woken_for_a_dead_one():
    """A worker that died (a zombie until the pool reaps it, or reaped) keeps its posts: it is not "ended" as stuck,
    and no other process that took its pid is. The pool is woken instead, to see it dead."""
    import signal
    import subprocess
    import sys

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while distribute._state(zombie.pid) != "Z":
        time.sleep(0.01)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()
    spawner = (  # the grandchild must not hold the capture pipe open, or run() waits for it
        "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"
    )
    grandchild = int(subprocess.run([sys.executable, "-c", spawner], capture_output=True, text=True).stdout)

    class Pool:
        def __init__(self):
            self.submitted = []

        def submit(self, fn):
            self.submitted.append(fn)

    def look(*slots):
        posts = board.Board(FORK, len(slots))
        posts._claimed.value = len(slots)
        posts._values[:] = [value for slot in slots for value in slot]
        ended, pool = {}, Pool()
        distribute._look(posts, ended, pool)
        return ended, pool.submitted

    try:
        past = time.monotonic() - 1
        assert look((-1, 0, 5, past), (0, 1, 5, past)) == ({}, [])  # kill() takes a pid <= 0 for a process group
        assert look((grandchild, 0, 5, past), (zombie.pid, -1, -1, past)) == ({}, [])  # no child; idle
        for dead in (zombie.pid, reaped.pid):
            assert look((dead, 2, 5, past)) == ({}, [int])
        assert look((live.pid, 3, 7, math.inf)) == ({}, [])
        assert look((live.pid, 3, 7, past)) == ({3: 7}, [])
        assert live.wait(10) == -signal.SIGKILL
        assert distribute._state(grandchild) == "other"
    finally:
        live.kill()
        zombie.wait()
        os.kill(grandchild, signal.SIGKILL)


def test_a_task_whose_worker_dies_before_it_posts_it_is_given_up_not_run_for_ever(tmp_path):
    """A worker that died taking its task had posted nothing, so every task looked queued (well) and was submitted
    again, for ever. When no task was on a worker, each is a suspect, and run alone its death is its own."""
    from crash_jobs import KillsOnArrival

    results = []
    dead = run_isolated(
        [ShardTask(i, (), "fp") for i in range(3)], KillsOnArrival(), 2, results.append, record_shard, FORK
    )
    assert sorted((d.task.shard, d.item, d.stuck) for d in dead) == [(0, -1, False), (1, -1, False), (2, -1, False)]
    assert results == []


def test_a_worker_that_dies_sending_its_result_is_its_tasks_death_and_no_task_is_lost(tmp_path):
    """A worker dying after its task's code (pickling the result) had cleared its post: the task looked queued, and
    alone it was neither a result nor a death, so it was lost without a word."""
    from crash_jobs import dies_sending_shard_1

    results = []
    dead = run_isolated(
        [ShardTask(i, (), "fp") for i in range(3)],
        ShardSettings(out_dir=str(tmp_path)),
        2,
        results.append,
        dies_sending_shard_1,
        FORK,
    )
    assert [(d.task.shard, d.item, d.stuck) for d in dead] == [(1, -1, False)]
    assert sorted(r["shard"] for r in results) == [0, 2]


def test_a_death_after_the_rows_is_no_rows_and_the_shard_is_reported(tmp_path, videos):
    """A worker dying as it wrote the shard's tar was blamed on the last row it had made: that row failed as
    worker_died, the shard was made again, and so on back, one whole shard per row."""
    from crash_jobs import dies_writing_its_tar

    settings = ShardSettings(out_dir=str(tmp_path))
    task = ShardTask(0, (row(0, videos["idx60"]), row(1, videos["idx60"])), "fp")
    dead = run_isolated([task], settings, 1, print, dies_writing_its_tar, FORK, partial(without_row, settings=settings))
    assert [(d.task, d.item, d.stuck) for d in dead] == [(task, -1, False)]


def test_the_pool_looks_at_the_posts_once_a_second_not_after_every_result(tmp_path, monkeypatch):
    """The look reads each worker's /proc entry: after every result, a cache of thousands of short videos paid it
    thousands of times a second."""
    looks = []
    real = distribute._look
    monkeypatch.setattr(distribute, "_look", lambda *args: looks.append(time.monotonic()) or real(*args))
    results = []
    start = time.monotonic()
    run_isolated(
        [ShardTask(i, (), "fp") for i in range(200)],
        ShardSettings(out_dir=str(tmp_path)),
        2,
        results.append,
        record_shard,
        FORK,
    )
    assert len(results) == 200
    assert len(looks) <= (time.monotonic() - start) / distribute.POLL_S + 1, (len(looks), time.monotonic() - start)
    assert all(b - a >= distribute.POLL_S * 0.99 for a, b in itertools.pairwise(looks))
