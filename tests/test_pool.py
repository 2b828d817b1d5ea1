"""pipeline.pool: a task's exception, Ctrl-C and a worker that cannot start end the run cleanly and at once; a
worker that dies idle loses no task."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
from crash_jobs import raises_on_shard_1, record_shard, shard_tasks

from pipeline import pool
from pipeline.pool import RemoteTraceback, WorkerStartError, how_it_ended, run_isolated
from pipeline.worker import ShardSettings, ShardTask

FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")


@pytest.mark.timeout(60)
def test_a_tasks_exception_is_raised_with_its_trace_and_the_other_workers_are_ended_cleanly(tmp_path):
    """The executor waited for every task in flight to end (a shard is minutes) before the error was raised. Now the
    other workers are ended at once, as Ctrl-C would end them: their clean-up runs (a shard's temporary tar)."""
    start = time.monotonic()
    with pytest.raises(ValueError, match="shard 1 is bad") as e:
        run_isolated(
            shard_tasks(4),
            ShardSettings(out_dir=str(tmp_path)),
            2,
            print,
            raises_on_shard_1,
            SPAWN,
        )
    assert time.monotonic() - start < 30  # shard 0 would take 60 s
    assert isinstance(e.value.__cause__, RemoteTraceback) and "raises_on_shard_1" in str(e.value.__cause__)
    assert (tmp_path / "0.cleaned").exists()


@pytest.mark.timeout(60)
def test_ctrl_c_ends_the_workers_and_their_clean_up_runs(tmp_path):
    """The workers leave Ctrl-C (SIGINT, sent to the terminal's whole process group) to the pool's process, which
    ends them with SIGTERM: one SIGINT each cut their clean-up short when it came twice."""

    def on_result(result):
        while not (tmp_path / "0.running").exists():
            time.sleep(0.01)
        for process in [*multiprocessing.active_children(), None]:  # as the terminal does: to every process
            os.kill(process.pid if process else os.getpid(), signal.SIGINT)
        time.sleep(5)

    with pytest.raises(KeyboardInterrupt):
        run_isolated(
            [ShardTask(i, (), "fp") for i in (0, 2)],
            ShardSettings(out_dir=str(tmp_path)),
            2,
            on_result,
            raises_on_shard_1,
            FORK,
        )
    assert (tmp_path / "0.cleaned").exists()


def _dies_at_once(*args) -> None:
    os._exit(4)


def test_a_worker_that_ends_as_it_starts_is_an_error_not_a_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "_serve", _dies_at_once)  # fork: the worker runs it as it is here
    with pytest.raises(WorkerStartError, match="exited with code 4"):
        run_isolated([ShardTask(0, (), "fp")], ShardSettings(out_dir=str(tmp_path)), 1, print, record_shard, FORK)


def test_a_worker_that_dies_idle_is_replaced_and_no_task_is_lost(tmp_path):
    """A worker that dies between two tasks (its answer sent) takes no task with it: the next goes to a new one."""
    from crash_jobs import leaves_a_crash_behind_on_shard_1

    results = []
    dead = run_isolated(
        [ShardTask(i, (), "fp") for i in (1, 3, 4)],  # no shard 2 to be on when the thread ends the worker
        ShardSettings(out_dir=str(tmp_path)),
        1,
        lambda result: results.append(result) or time.sleep(1 if result["shard"] == 1 else 0),
        leaves_a_crash_behind_on_shard_1,
        FORK,
    )
    assert dead == [] and [r["shard"] for r in results] == [1, 3, 4]


def test_how_it_ended_names_the_signal():
    assert how_it_ended(-signal.SIGKILL) == "it was killed (SIGKILL: the out-of-memory killer, most often)"
    assert how_it_ended(-signal.SIGSEGV) == "it was ended by SIGSEGV: a crash"
    assert how_it_ended(-signal.SIGTERM) == "it was ended by SIGTERM"
    assert how_it_ended(3) == "it exited with code 3"
    assert how_it_ended(-200) == "it was ended by signal 200"


class _HeldOpen:
    """The fork context, but its pipes' worker ends also held open here (as a process forked in another thread at
    the wrong moment holds them): a worker's death closes neither its pipe nor, with ``sentinel``, its sentinel."""

    def __init__(self, sentinel: bool):
        self.held: list[int] = []
        self.sentinel = sentinel

    def __getattr__(self, name):
        return getattr(FORK, name)

    def Pipe(self):  # noqa: N802 (the context's name)
        ours, theirs = FORK.Pipe()
        self.held.append(os.dup(theirs.fileno()))
        return ours, theirs

    def Process(self, *args, **kwargs):  # noqa: N802
        process = FORK.Process(*args, **kwargs)
        if self.sentinel:
            process.never, other_end = os.pipe()  # read by the test's Process class's sentinel
            self.held.extend([process.never, other_end])
        return process


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sentinel", [False, True], ids=["pipe-held", "pipe-and-sentinel-held"])
def test_a_death_is_seen_though_its_pipe_or_its_sentinel_is_held_open(tmp_path, monkeypatch, sentinel):
    """Its pipe held open, a dead worker is seen by its sentinel; both held, by the look (it polls each process)."""
    from crash_jobs import dies_sending_shard_1

    class Process(FORK.Process):
        sentinel = property(
            lambda self: getattr(self, "never", None) or multiprocessing.process.BaseProcess.sentinel.fget(self)
        )

    monkeypatch.setattr(FORK, "Process", Process)
    context = _HeldOpen(sentinel)
    results = []
    try:
        dead = run_isolated(
            shard_tasks(3),
            ShardSettings(out_dir=str(tmp_path)),
            2,
            results.append,
            dies_sending_shard_1,
            context,
        )
    finally:
        for fd in context.held:
            os.close(fd)
    assert [(d.task.shard, d.item, d.stuck) for d in dead] == [(1, -1, False)]
    assert sorted(r["shard"] for r in results) == [0, 2]


class _Unreadable:
    """A task or result whose unpickling raises ``error`` (as a class a spawned worker cannot import would, or a
    module that fails to open a file as it is imported)."""

    def __init__(self, error: Exception):
        self.error = error

    def __reduce__(self):
        return _refuse, (self.error,)


def _refuse(error: Exception):
    raise error


@pytest.mark.parametrize("error", [ImportError("no module named 'elsewhere'"), OSError("libelsewhere.so")])
def test_a_task_the_worker_cannot_read_is_an_error_here_not_a_death(tmp_path, error):
    """Else it ends its worker (with a traceback, or quietly for an OSError, taken for the pipe's), twice, and a
    shard is reported as a crash."""
    with pytest.raises(RuntimeError, match=f"a pool task could not be unpickled: {type(error).__name__}: ") as e:
        run_isolated([_Unreadable(error)], ShardSettings(out_dir=str(tmp_path)), 1, print, record_shard, FORK)
    assert isinstance(e.value.__cause__, RemoteTraceback)


def gives_an_unreadable_answer(task, settings):
    return _Unreadable(FileNotFoundError("gone"))


@pytest.mark.timeout(60)
def test_an_answer_this_process_cannot_read_is_an_error_not_a_death(tmp_path):
    """An OSError unpickling it was taken for the pipe's: the worker, alive, was waited for 10 s, killed, twice."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="a pool answer could not be unpickled: FileNotFoundError: "):
        run_isolated([0], None, 1, print, gives_an_unreadable_answer, FORK)
    assert time.monotonic() - start < 5


def test_a_result_that_cannot_be_pickled_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="a pool worker could not send its task's result: TypeError: "):
        run_isolated([0], None, 1, print, gives_a_lock, FORK)


def gives_a_lock(task, settings):
    import threading

    return threading.Lock()


def test_results_in_hand_are_handed_on_when_the_tasks_fail(tmp_path):
    """A task source that raises (a CSV row that cannot be read) lost the results already received: their shards
    were written, and missing from the run's totals."""

    def tasks():
        yield ShardTask(0, (), "fp")
        yield ShardTask(1, (), "fp")
        raise ValueError("bad CSV row")

    results = []
    with pytest.raises(ValueError, match="bad CSV row"):
        run_isolated(tasks(), ShardSettings(out_dir=str(tmp_path)), 1, results.append, record_shard, FORK)
    assert [r["shard"] for r in results] == [0, 1]


def test_workers_that_end_as_they_start_are_an_error_only_three_in_a_row(tmp_path, monkeypatch):
    """Starts 0 and 1 end at once, 2 runs (its task ends it), 3 and 4 end, 5 runs: never three in a row."""
    from crash_jobs import crash_on_shard_3

    real = pool._serve

    def every_third_lives(*args):
        n = 0
        while True:
            try:
                os.close(os.open(tmp_path / f"start-{n}", os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                n += 1
        if n % 3 != 2:
            os._exit(4)
        return real(*args)

    monkeypatch.setattr(pool, "_serve", every_third_lives)
    (tmp_path / "0.running").touch()  # crash_on_shard_3 waits for it
    dead = run_isolated(
        [ShardTask(3, (), "fp")], ShardSettings(out_dir=str(tmp_path)), 1, print, crash_on_shard_3, FORK
    )
    assert [(d.task.shard, d.code) for d in dead] == [(3, 7)]
    assert len(list(tmp_path.glob("start-*"))) == 6


@pytest.mark.timeout(60)
def test_a_task_whose_worker_dies_reading_it_counts_as_its_death(tmp_path, monkeypatch):
    """A task larger than the pipe holds is read as it is sent: a worker that died reading it (the out-of-memory
    killer) broke the send, which was taken for a worker that had died idle, so the task went to a new worker, and
    another, for ever (612 workers in 8 s). It is the task's death: run once more, then given up."""
    from multiprocessing.connection import Connection

    parent, real = os.getpid(), Connection._recv_bytes

    def dies_reading(self, *args):
        if os.getpid() != parent:  # in a worker (forked: it has this too)
            self._recv(1000)
            os._exit(9)
        return real(self, *args)

    monkeypatch.setattr(Connection, "_recv_bytes", dies_reading)
    started = []
    real_start = pool._Pool.start
    monkeypatch.setattr(pool._Pool, "start", lambda self, *args: started.append(1) or real_start(self, *args))
    task = ShardTask(0, (), "x" * 4_000_000)
    dead = run_isolated([task], ShardSettings(out_dir=str(tmp_path)), 1, print, record_shard, FORK)
    assert [(d.task, d.item, d.stuck, d.code) for d in dead] == [(task, -1, False, 9)]
    assert len(started) == 2


class TwoArguments(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")


def raises_two_arguments(task, settings):
    raise TwoArguments(3, "bad")


def test_an_exception_this_process_cannot_rebuild_still_comes_with_its_summary_and_trace(tmp_path):
    with pytest.raises(RuntimeError, match=r"a pool worker's task raised TwoArguments: 3: bad") as e:
        run_isolated(
            [ShardTask(0, (), "fp")], ShardSettings(out_dir=str(tmp_path)), 1, print, raises_two_arguments, FORK
        )
    assert "raises_two_arguments" in str(e.value.__cause__)


def test_a_worker_that_ends_once_as_it_starts_is_replaced(tmp_path, monkeypatch):
    """An out-of-memory kill of a worker as it starts ended a run of thousands of shards."""
    real = pool._serve

    def first_dies(*args):
        try:
            os.close(os.open(tmp_path / "first", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return real(*args)
        os._exit(4)

    monkeypatch.setattr(pool, "_serve", first_dies)
    results = []
    assert (
        run_isolated(
            [ShardTask(0, (), "fp")], ShardSettings(out_dir=str(tmp_path)), 1, results.append, record_shard, FORK
        )
        == []
    )
    assert [r["shard"] for r in results] == [0]


INTERRUPTED_AS_A_WORKER_STARTS = """
import multiprocessing, os, sys
from multiprocessing.connection import Connection
sys.path.insert(0, 'tests')
from crash_jobs import record_shard
from pipeline import pool
from pipeline.worker import ShardSettings, ShardTask
parent, real, calls = os.getpid(), Connection.close, []
def close(self):
    real(self)
    if os.getpid() == parent and not calls:  # the pool's first close: the worker's end, just after it started
        calls.append(1)
        raise KeyboardInterrupt
Connection.close = close
try:
    pool.run_isolated([ShardTask(0, (), 'fp')], ShardSettings(out_dir=sys.argv[1]), 1, print, record_shard,
                      multiprocessing.get_context('fork'))
except KeyboardInterrupt:
    print('interrupted', multiprocessing.active_children(), flush=True)
"""


def test_ctrl_c_as_a_worker_starts_ends_it_too(tmp_path):
    """A worker started but not yet listed was left out of the ending: the interpreter then waited for it at exit,
    for ever (it never read its task)."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_AS_A_WORKER_STARTS, str(tmp_path)],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout == "interrupted []\n", (proc.stdout, proc.stderr[-2000:])


def gives(task, settings):
    return task


def test_a_worker_ended_as_stuck_just_as_its_task_was_done_leaves_no_task_unrun(tmp_path, monkeypatch):
    """Its answer came, so it had no task, and it gets none (its death would be blamed on it): the run then saw no
    worker with a task and ended, the tasks left unrun. It waits for that death, and a new worker takes the rest."""
    real = pool._Pool.heard

    def heard(self, worker, message):
        results = real(self, worker, message)
        if results == [0]:  # as if the look had found its deadline past just before the answer came
            worker.ended = -1
            worker.process.kill()
        return results

    monkeypatch.setattr(pool._Pool, "heard", heard)
    results = []
    assert run_isolated([0, 1, 2], None, 1, results.append, gives, FORK) == []
    assert results == [0, 1, 2]
