"""Process pool: bounded streaming, and a worker that dies is isolated instead of killing the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crash_jobs import crash_on_shard_3, record_shard, shard_tasks

from pipeline.distribute import ShardCrash, run_local
from pipeline.worker import ShardSettings


def test_every_task_runs_once(tmp_path):
    results = []
    run_local(shard_tasks(9), ShardSettings(out_dir=str(tmp_path)), 2, results.append, job=record_shard)
    assert sorted(r["shard"] for r in results) == list(range(9))


def test_a_crashing_shard_is_isolated_and_reported(tmp_path):
    results = []
    with pytest.raises(ShardCrash) as e:
        run_local(shard_tasks(8), ShardSettings(out_dir=str(tmp_path)), 2, results.append, job=crash_on_shard_3)
    assert e.value.shards == [3]
    assert sorted(r["shard"] for r in results) == [0, 1, 2, 4, 5, 6, 7]


def test_tasks_are_pulled_lazily(tmp_path):
    """The pool never holds more than 2 * workers tasks: the CSV is streamed, not loaded."""
    pulled = []

    def source():
        for task in shard_tasks(10):
            pulled.append(task.shard)
            yield task

    results = []

    def on_result(stats):
        results.append(stats)
        assert len(pulled) - len(results) <= 4  # in flight, with 2 workers

    run_local(source(), ShardSettings(out_dir=str(tmp_path)), 2, on_result, job=record_shard)
    assert len(results) == 10


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (dead, not yet reaped by init) counts as gone
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_forked_workers_end_with_their_run_though_a_later_fork_holds_its_pipes(tmp_path):
    """With fork, a process forked after the pool started inherits the write ends of the pipes whose closing tells
    the workers that their parent died (eval's frame cache forks its pool): they waited for ever."""
    script = (
        "import sys, threading, time, multiprocessing\n"
        "from pathlib import Path\n"
        "sys.path.insert(0, 'tests')\n"
        "from crash_jobs import note_pid_and_wait\n"
        "from pipeline.pool import run_isolated\n"
        "from pipeline.worker import ShardSettings, ShardTask\n"
        "fork = multiprocessing.get_context('fork')\n"
        f"out = Path({str(tmp_path)!r})\n"
        "def later():\n"
        "    while len(list(out.glob('worker-*.pid'))) < 2: time.sleep(0.05)\n"
        "    other = fork.Process(target=time.sleep, args=(60,)); other.start()\n"
        "    (out / '.other.pid').write_text(str(other.pid)); (out / '.other.pid').rename(out / 'other.pid')\n"
        "threading.Thread(target=later, daemon=True).start()\n"
        "run_isolated([ShardTask(i, (), 'fp') for i in range(4)], ShardSettings(out_dir=str(out)), 2, print, "
        "note_pid_and_wait, fork)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    pids = []
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "other.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [int(p.read_text()) for p in tmp_path.glob("worker-*.pid")]
        assert len(pids) == 2 and (tmp_path / "other.pid").read_text()
    finally:
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
    try:
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [pid for pid in pids if _alive(pid)]
        assert not alive, f"workers {alive} outlived their run"
    finally:
        for pid in [*pids, int((tmp_path / "other.pid").read_text())]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_workers_end_with_a_run_killed_by_sigkill(tmp_path):
    """kill -9 of the run's own process (not its group): its workers used to finish their queued shards, then wait
    for ever, and a late one deleted or overwrote what the next run into the folder had written."""
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from crash_jobs import note_pid_and_wait\n"
        "from pipeline.distribute import run_local\n"
        "from pipeline.worker import ShardSettings, ShardTask\n"
        f"run_local([ShardTask(i, (), 'fp') for i in range(4)], ShardSettings(out_dir={str(tmp_path)!r}), 2, "
        "print, job=note_pid_and_wait)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("worker-*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [int(p.read_text()) for p in tmp_path.glob("worker-*.pid")]
        assert len(pids) == 2
    finally:
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [pid for pid in pids if _alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their run"


def test_spark_jobs_run_in_a_window_so_a_slow_one_does_not_hold_back_the_next():
    """Spark ran its batches one after another: each waited for its slowest shard (one with many download
    time-outs) while the cluster's other cores stood idle. Now the next job starts as soon as one ends."""
    import threading

    from pipeline.distribute import chunks, run_windowed

    third_done = threading.Event()
    started, results = [], []

    def run_job(chunk):
        started.append(chunk[0])
        if chunk[0] == 0:  # the slow job: it ends only once the third one has
            assert third_done.wait(10), "the jobs after the slow one never ran"
        if chunk[0] == 4:
            third_done.set()
        return [{"shard": n} for n in chunk]

    run_windowed(chunks(range(9), 2), run_job, 2, results.append)
    assert sorted(r["shard"] for r in results) == list(range(9))
    assert sorted(started[:2]) == [0, 2] and started[2] == 4 and sorted(started) == [0, 2, 4, 6, 8]
    assert [list(c) for c in chunks(range(5), 2)] == [[0, 1], [2, 3], [4]]


def test_a_failed_spark_job_cancels_the_others_and_is_raised():
    import threading

    from pipeline.distribute import chunks, run_windowed

    cancelled = threading.Event()

    def run_job(chunk):
        if chunk[0] == 0:
            raise RuntimeError("executor lost")
        assert cancelled.wait(10)  # a running job ends when Spark cancels it
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="executor lost"):
        run_windowed(chunks(range(6), 1), run_job, 3, lambda stats: None, cancel=cancelled.set)
    assert cancelled.is_set()
