"""A worker stuck inside one call that --decode_timeout's timer cannot stop is ended, and the row a worker dies on
costs that row only, while the other workers go on (pipeline.board, pipeline.pool, worker.without_row)."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import shutil
import signal
import time
from functools import partial

import pytest
from crash_jobs import record_shard, shard_tasks, shard_with_bad_rows, starts, stuck_on_shard_1

from pipeline import board, pool
from pipeline.distribute import run_local
from pipeline.pool import Death, run_isolated
from pipeline.source import Row
from pipeline.time_limit import limit_of, stuck_too_long
from pipeline.worker import WORKER_DIED, ShardSettings, ShardTask, without_row
from pipeline.writer import iter_tar_samples, stats_path, tar_path

FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")


def test_a_worker_posts_its_item_and_deadline_and_the_pool_reads_them(monkeypatch):
    posts = board.Board(FORK, 2)
    assert posts.post(0) == posts.post(1) == board.Post(-1, math.inf)
    monkeypatch.setattr(board, "_board", None)  # this process posts as a worker below; both are put back after
    monkeypatch.setattr(board, "_slot", -1)
    with board.item(3), board.deadline(1):  # outside a pool worker: nothing, and no error
        pass
    assert posts.post(0) == posts.post(1) == board.Post(-1, math.inf)
    board.attach(posts, 1)
    with board.item(12):
        assert posts.post(1) == board.Post(12, math.inf)
        before = time.monotonic()
        with board.deadline(5):
            post = posts.post(1)
            assert before + 5 + board.GRACE_S <= post.deadline <= time.monotonic() + 5 + board.GRACE_S
        with board.deadline(0):  # no limit, no deadline
            assert posts.post(1).deadline == math.inf
        assert posts.post(1) == board.Post(12, math.inf)
    assert posts.post(1) == board.Post(-1, math.inf)  # out of the item: a death now (writing the tar) is no row's
    assert posts.post(0) == board.Post(-1, math.inf)  # the other slot is untouched
    with board.item(4), board.deadline(5):
        posts.clear(1)  # for the next worker in the slot, its last one dead in the middle of the block
        assert posts.post(1) == board.Post(-1, math.inf)


@pytest.mark.timeout(60)
def test_a_worker_stuck_in_one_call_is_ended_and_the_others_go_on(tmp_path):
    """Shard 1's decoding never comes back to Python, so its 0.5 s timer cannot stop it: the run used to wait for it
    for ever. Its worker is ended 0.5 s (the grace) past the limit, and the other worker goes on with shard 0 (3 s),
    not made again from its start as when the whole pool broke."""
    results = []
    start = time.monotonic()
    dead = run_isolated(
        shard_tasks(5),
        ShardSettings(out_dir=str(tmp_path)),
        2,
        results.append,
        stuck_on_shard_1,
        FORK,
    )
    assert [(d.task.shard, d.item, d.stuck, d.code) for d in dead] == [(1, -1, True, -signal.SIGKILL)]
    assert sorted(r["shard"] for r in results) == [0, 2, 3, 4]
    assert sorted(starts(tmp_path)) == [0, 1, 2, 3, 4]  # each once: the stuck one is not tried again
    assert time.monotonic() - start < 30


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
    assert failures[1]["detail"].endswith("it exited with code 11"), failures
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


def test_a_worker_that_dies_on_its_own_costs_its_task_and_the_others_go_on(tmp_path):
    """Each task in flight was run again (alone, one after another, when the dead worker could not be told): at 16
    workers and 1,000 videos a shard, half an hour on one core per death. Only the dead worker's task is run again
    (once, to tell a death of its own), while shard 0 (4 s) goes on in the other worker."""
    from crash_jobs import crash_on_shard_3

    results = []
    dead = run_isolated(
        [ShardTask(i, (), "fp") for i in (0, 3, 4, 5, 6)],
        ShardSettings(out_dir=str(tmp_path)),
        2,
        results.append,
        crash_on_shard_3,
        SPAWN,
    )
    assert [(d.task.shard, d.item, d.stuck, d.code) for d in dead] == [(3, -1, False, 7)]
    assert sorted(r["shard"] for r in results) == [0, 4, 5, 6]
    assert sorted(starts(tmp_path)) == [0, 3, 3, 4, 5, 6]


def test_a_task_whose_worker_dies_is_run_once_more_before_it_is_blamed(tmp_path):
    """A crash can surface in a later task than the one that caused it: shard 1 leaves a thread that ends its worker
    0.5 s later, on shard 2. Blamed at once, shard 2 failed; run once more, it is made."""
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


def test_the_look_ends_only_a_busy_live_worker_past_its_deadline():
    """The look reads each worker's posted deadline: a worker past it is killed and the item it was on noted; one
    within it, one idle (a deadline left from a death in its slot), one already dead, or one ended before, is not."""
    posts = board.Board(FORK, 5)
    crew = []
    for slot in range(5):
        process = FORK.Process(target=time.sleep, args=(0 if slot == 3 else 60,))
        process.start()
        crew.append(pool._Worker(process, None, slot, entry=pool._Entry("task"), ready=True))
    crew[1].entry = None
    crew[4].ended = 2
    try:
        crew[3].process.join()
        past = time.monotonic() - 1
        posts._values[:] = [7, past, 8, past, 9, math.inf, 5, past, 6, past]
        pool._look(crew, posts)
        assert [worker.ended for worker in crew] == [7, None, None, None, 2]
        crew[0].process.join(10)
        assert crew[0].process.exitcode == -signal.SIGKILL
        assert all(worker.process.is_alive() for worker in (crew[1], crew[2], crew[4]))
    finally:
        for worker in crew:
            worker.process.kill()
            worker.process.join()


def test_a_task_whose_worker_dies_taking_it_is_given_up_not_run_for_ever(tmp_path):
    """A worker that died taking its task had posted nothing, so the task was submitted again, for ever. It is that
    task's death: run once more, then given up."""
    from crash_jobs import KillsOnArrival

    results = []
    dead = run_isolated(shard_tasks(3), KillsOnArrival(), 2, results.append, record_shard, FORK)
    assert sorted((d.task.shard, d.item, d.stuck, d.code) for d in dead) == [(i, -1, False, 3) for i in range(3)]
    assert results == []


def test_a_worker_that_dies_sending_its_result_is_its_tasks_death_and_no_task_is_lost(tmp_path):
    """A worker dying after its task's code (pickling the result) had cleared its post: the task looked queued, and
    alone it was neither a result nor a death, so it was lost without a word. The pool knows each worker's task."""
    from crash_jobs import dies_sending_shard_1

    results = []
    dead = run_isolated(
        shard_tasks(3),
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
    """The look reads each worker's posts and polls its process: after every result, a cache of thousands of short
    videos would pay it thousands of times a second."""
    looks = []
    real = pool._look
    monkeypatch.setattr(pool, "_look", lambda *args: looks.append(time.monotonic()) or real(*args))
    results = []
    start = time.monotonic()
    run_isolated(
        shard_tasks(200),
        ShardSettings(out_dir=str(tmp_path)),
        2,
        results.append,
        record_shard,
        FORK,
    )
    assert len(results) == 200
    assert len(looks) <= (time.monotonic() - start) / pool.POLL_S + 1, (len(looks), time.monotonic() - start)
    assert all(b - a >= pool.POLL_S * 0.99 for a, b in itertools.pairwise(looks))
