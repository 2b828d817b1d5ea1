"""A process pool in which a worker that dies costs its own task only.

``concurrent.futures.ProcessPoolExecutor`` cannot lose one worker. When one died (a decoder's segfault, the
out-of-memory killer, or the end of one stuck inside a call into FFmpeg, ``pipeline.board``), it failed every task
it held and ended its other workers: the shards they were making, up to 1,000 videos each, started again from their
first video, and which task had killed the worker had to be told from the exit codes of the workers it had ended.
Here each worker has a pipe of its own and one task at a time, so the pool knows whose task each death is; a new
worker takes the dead one's place, and the others go on.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler

from pipeline import board
from pipeline.board import Board

PARENT_POLL_S = 1.0  # how often a pool worker checks that its run is alive, besides its parent's sentinel
POLL_S = 1.0  # how often the pool's process looks for a worker past its posted deadline (pipeline.board)
STOP_S = 10.0  # how long the workers are given to end once told to, before they are killed
START_TRIES = 3  # workers in a row that end before they are ready, before the pool gives up


@dataclass(frozen=True)
class Death:
    """A task whose worker process died on it. ``item``: the item of the task it had posted being on (-1: none);
    ``stuck``: the pool ended it, its decoding still going past its posted deadline, rather than it dying on its own
    (a crash, the out-of-memory killer); ``code``: the worker's exit code (-N: ended by signal N)."""

    task: object
    item: int
    stuck: bool
    code: int | None = None


OnDeath = Callable[[Death], object]  # the task to run in the dead one's place, or None


def how_it_ended(code: int | None) -> str:
    """Words for a dead worker's exit code, for a failure's detail."""
    if code is None or code >= 0:
        return f"it exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"it was ended by signal {-code}"
    if name == "SIGKILL":
        return "it was killed (SIGKILL: the out-of-memory killer, most often)"
    crash = name in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE")
    return f"it was ended by {name}{': a crash' if crash else ''}"


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a pool worker (as the ``__cause__`` of that exception here)."""

    def __str__(self) -> str:
        return f"\n{self.args[0]}"


class WorkerStartError(RuntimeError):
    """``START_TRIES`` pool worker processes in a row that ended before they could take a task."""


@dataclass
class _Entry:
    task: object
    deaths: int = 0  # how many times a worker died on this task on its own


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    slot: int
    entry: _Entry | None = None  # its task
    ready: bool = False  # it has said it is ready for a task
    sent: bool = False  # its task has gone to it (a starting worker's waits until it is ready)
    ended: int | None = None  # the item it was on when the pool ended it, stuck past its deadline


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
    ``context``, one task to a worker at a time; ``tasks`` are taken only as workers are free for them (streamed).

    - A worker whose decoding is still going ``board.GRACE_S`` after its limit (stuck inside one call, which the
      limit's timer cannot stop) is ended: a death, known to be its task's.
    - A worker that dies on its own has its task run once more by another process (a crash can surface in a later
      task than the one that caused it, or the out-of-memory killer pick any worker); a second death is its own.

    The death of a task known to be its own goes to ``on_death``, which may give a task to run in its place (a shard
    without the row its worker died on). A new worker takes a dead one's place; the others go on with their tasks.
    Returns the deaths ``on_death`` gave none for. An exception a task raises is raised here (its traceback from the
    worker as its cause), after the other workers are ended.
    """
    return _Pool(tasks, settings, workers, job, context, on_death).run(on_result)


class _Pool:
    """``run_isolated``'s state: the workers by slot, their board, and the tasks to run again."""

    def __init__(self, tasks: Iterable, settings: object, workers: int, job: Callable, context, on_death: OnDeath):
        self.tasks, self.settings, self.job, self.context, self.on_death = iter(tasks), settings, job, context, on_death
        self.posts = Board(context, workers)
        self.crew: list[_Worker | None] = [None] * workers
        self.again: deque[_Entry] = deque()  # to run before the rest of ``tasks``
        self.dead: list[Death] = []
        self.failed_starts = 0  # workers in a row that ended before they were ready

    def run(self, on_result: Callable) -> list[Death]:
        next_look = time.monotonic() + POLL_S
        try:
            while True:
                self.fill()
                crew = [worker for worker in self.crew if worker is not None]
                if not any(worker.entry is not None or worker.ended is not None for worker in crew):
                    break  # (one ended as stuck is waited for: its slot then takes the tasks left, if any)
                ready = set(wait([w.conn for w in crew] + [w.process.sentinel for w in crew], _until(next_look)))
                if time.monotonic() >= next_look:  # every POLL_S, not after every result (thousands of short videos)
                    _look(crew, self.posts)
                    # a death whose pipes a process forked since holds open is seen here: its sentinel never closes
                    ready |= {w.process.sentinel for w in crew if not w.process.is_alive()}
                    next_look = time.monotonic() + POLL_S
                results, error = [], None
                for worker in crew:
                    if worker.conn in ready:
                        try:
                            data = worker.conn.recv_bytes()
                        except (EOFError, OSError):  # it died (its answer cut short, or none)
                            self.died(worker)
                            continue
                        try:
                            results.extend(self.heard(worker, _loads(data, "answer")))
                        except Exception as e:  # raised once the results in hand are handed on
                            error = error or e
                    elif worker.process.sentinel in ready and not worker.conn.poll():
                        self.died(worker)
                try:
                    if error is None:
                        self.fill()  # the next tasks go out before this process handles the results
                finally:  # (written by their workers: a failure here must not leave them uncounted)
                    for result in results:
                        on_result(result)
                if error is not None:
                    raise error
        except BaseException:
            _stop(self.crew, failed=True)
            raise
        _stop(self.crew, failed=False)
        return self.dead

    def take(self) -> _Entry | None:
        return self.again.popleft() if self.again else next((_Entry(task) for task in self.tasks), None)

    def fill(self) -> None:
        """A task for each ready worker without one, and a new worker for each empty slot, while there are tasks."""
        for slot, worker in enumerate(self.crew):
            if worker is not None and (not worker.ready or worker.ended is not None):
                continue  # starting; or ended as stuck, just as its task was done (its death is no task's)
            if worker is None or worker.entry is None:
                entry = self.take()
                if entry is None:
                    continue
                if worker is None:
                    self.start(slot, entry)  # its task goes to it once it is ready
                    continue
                worker.entry, worker.sent = entry, False
            if not worker.sent:
                self.send(worker)

    def start(self, slot: int, entry: _Entry) -> None:
        """A new worker in ``slot``, listed before it starts, so that a Ctrl-C from here on ends it too. Daemonic:
        should one still be left, this process's exit ends it rather than wait for it."""
        ours, theirs = self.context.Pipe()
        self.posts.clear(slot)
        process = self.context.Process(
            target=_serve, args=(theirs, self.posts, slot), name=f"pool-worker-{slot}", daemon=True
        )
        self.crew[slot] = _Worker(process, ours, slot, entry)
        try:
            process.start()
        finally:
            theirs.close()

    def send(self, worker: _Worker) -> None:
        """Send a ready worker its task. One that died idle never had it: the task goes back first in line. One whose
        pipe breaks during the send died taking it (a task larger than the pipe holds is read as it is sent)."""
        if not worker.process.is_alive():
            self.again.appendleft(worker.entry)
            worker.entry = None
            self.bury(worker)
            return
        data = _dumps((self.job, worker.entry.task, self.settings))  # a task that cannot be pickled raises here
        try:
            worker.conn.send_bytes(data)
        except OSError:
            self.died(worker)  # (or it died idle just now: its task is then run once more than it needs)
        else:
            worker.sent = True

    def heard(self, worker: _Worker, message: tuple) -> list:
        """Act on a worker's message; the results it brings."""
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            self.failed_starts = 0
            return []
        if kind == "raised":
            _, pickled, summary, trace = message
            try:
                error = ForkingPickler.loads(pickled)
            except Exception:  # an exception class this process cannot rebuild (or import)
                error = RuntimeError(f"a pool worker's task raised {summary}")
            raise error from RemoteTraceback(trace)
        worker.entry = None
        return [message[1]]

    def died(self, worker: _Worker) -> None:
        """A worker is dead: its task runs once more, or its death goes to ``on_death``."""
        death = self.bury(worker)
        if death is None:
            return
        entry = worker.entry
        if not death.stuck and not entry.deaths:  # once more, in another process: is the death its own?
            self.again.appendleft(_Entry(entry.task, 1))
            return
        instead = self.on_death(death)
        if instead is None:
            self.dead.append(death)
        else:
            self.again.appendleft(_Entry(instead))

    def bury(self, worker: _Worker) -> Death | None:
        """Reap a dead worker and empty its slot; the death of the task it had, if any. A worker that ended before it
        was ready leaves its task to the next; ``START_TRIES`` of them in a row are an error (a new one would fail as
        well: an import that fails in a spawned worker)."""
        worker.process.join(STOP_S)
        if worker.process.is_alive():  # its pipe closed, the process not yet gone
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
        self.crew[worker.slot] = None
        code = worker.process.exitcode
        if not worker.ready:
            self.failed_starts += 1
            if self.failed_starts >= START_TRIES:
                raise WorkerStartError(
                    f"{START_TRIES} worker processes in a row ended as they started (the last: {how_it_ended(code)});"
                    " see the error they printed above"
                )
            self.again.appendleft(worker.entry)
            return None
        if worker.entry is None:
            return None
        stuck = worker.ended is not None
        item = worker.ended if stuck else self.posts.post(worker.slot).item
        return Death(worker.entry.task, item, stuck, code)


def _until(next_look: float) -> float:
    return max(0.0, next_look - time.monotonic())


def _look(crew: list[_Worker], posts: Board) -> None:
    """End the workers past their posted deadline (SIGKILL), noting the item each was on. Only this process reaps
    its workers, so a pid it signals is still its worker's, even dead."""
    now = time.monotonic()
    for worker in crew:
        if worker.entry is None or worker.ended is not None:
            continue
        post = posts.post(worker.slot)
        if post.deadline < now and worker.process.is_alive():
            worker.ended = post.item
            worker.process.kill()


def _stop(crew: list[_Worker | None], failed: bool) -> None:
    """End every worker: told to (they are idle) when all went well; otherwise SIGTERM, which ends a task as Ctrl-C
    would (its temporary tar removed). Those still there ``STOP_S`` later, or at a second Ctrl-C, are killed."""
    workers = [worker for worker in crew if worker is not None]
    started = [worker for worker in workers if worker.process.pid is not None]
    try:
        for worker in started:
            with contextlib.suppress(OSError):
                if failed:
                    worker.process.terminate()
                else:
                    worker.conn.send(None)
        end = time.monotonic() + STOP_S
        for worker in started:
            worker.process.join(_until(end))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
    except BaseException:
        for worker in started:
            with contextlib.suppress(OSError):
                worker.process.kill()
        raise
    finally:
        for worker in workers:
            worker.conn.close()


_stopping = False  # (in a worker) the pool's process ended its task: no answer is wanted


def _serve(conn: Connection, posts: Board, slot: int) -> None:
    """(A pool worker's main) run the tasks ``conn`` brings, one at a time, and send back each one's answer."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the pool's process's: it ends its workers (SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
        board.attach(posts, slot)
        _end_with_parent()
        conn.send(("ready",))
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):  # the pool's process is gone
                return
            try:
                message = _loads(data, "task")
            except Exception as e:  # a class a spawned worker cannot import
                _answer(conn, _raised(e))
                continue
            if message is None:
                return
            job, task, settings = message
            try:
                answer = ("done", job(task, settings))
            except BaseException as e:
                if _stopping:
                    return
                answer = _raised(e)
            _answer(conn, answer)
    except (KeyboardInterrupt, EOFError, OSError):  # told to end (SIGTERM), or the pool's process is gone
        return


def _raised(error: BaseException) -> tuple:
    """The answer for a task that raised ``error`` (in an ``except`` block): the exception pickled on its own, so that
    one the pool's process cannot rebuild still gets there as its summary and trace."""
    try:
        pickled = _dumps(error)
    except Exception:
        pickled = b""
    return ("raised", pickled, f"{type(error).__name__}: {error}", traceback.format_exc())


def _answer(conn: Connection, answer: tuple) -> None:
    try:
        data = _dumps(answer)
    except Exception as e:  # the result cannot be pickled
        data = _dumps(_raised(RuntimeError(f"a pool worker could not send its task's result: {type(e).__name__}: {e}")))
    conn.send_bytes(data)


def _dumps(message: object) -> bytes:
    """A message pickled, apart from its sending: an error here is the message's, one in the pipe is a death."""
    return bytes(ForkingPickler.dumps(message))


def _loads(data: bytes, what: str) -> object:
    """A message unpickled, apart from its receiving (see ``_dumps``); a failure names what it was."""
    try:
        return ForkingPickler.loads(data)
    except Exception as e:
        raise RuntimeError(f"a pool {what} could not be unpickled: {type(e).__name__}: {e}") from e


def _on_sigterm(signum, frame) -> None:
    """End the task in hand as Ctrl-C would (its clean-up runs); once, so that the clean-up is not cut short."""
    global _stopping
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stopping = True
    raise KeyboardInterrupt


def _end_with_parent() -> None:
    """(In a pool worker) end this worker when the process that started it dies. Killed with SIGKILL, a run's pool
    cannot stop its workers: they went on with the tasks queued to them, then waited for ever, and a late one deleted
    or overwrote what the next run into the same folder had written (it holds no lock)."""
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
