"""Stopping on SIGTERM with the run saved: a scheduler's time limit or preemption, a pod's deletion, torchrun's agent.

Slurm sends SIGTERM to every process of a job at its time limit or preemption and SIGKILL ``KillWait`` later (30 s
by default; ``#SBATCH --signal=TERM@120`` sends it two minutes early); torchrun's agent, on its own SIGTERM, passes
one to each rank's process group and kills them ``--shutdown_timeout`` (30) s later; Kubernetes waits 30 s too.
Without a handler, Python ends at once and the run loses every step since its last save (up to ``--val_every``).

So the trainer only notes the signal (``StopOnSignal``; under Slurm and torchrun a rank gets it twice, from each)
and goes on to its next check: a log step, or every ``CHECK_EVERY`` steps where ``--log_every`` is more. There the
ranks agree (``agreed``: one all-reduce, at a step every rank reaches) to save ``latest.pt`` and stop. A rank
cannot stop alone: the others would wait for it in the step's collectives.

The loader workers get the signal too, and they must live until then: the trainer raised as soon as one of them
died (torch's SIGCHLD handler), and the batches they had made could no longer be read (each hands its tensors over
by a file descriptor that it serves itself). So a worker lets SIGTERM pass while its trainer lives
(``keep_worker_through_sigterm``). Neither torch, which SIGTERMs a worker that has not ended 5 s after it was asked
to, nor Python's multiprocessing at exit, which SIGTERMs its daemon processes and then waits for them, can then end
one: the first leaves it to end by itself once its batch is made, and the second would wait for good, so
``kill_stuck_workers``, at the trainer's exit, ends any left with SIGKILL first.

One rank cannot come back to its check: a rank blocked in a collective with a peer that died (NCCL waits for it;
gloo sees the closed connection and raises). When a rank fails, torchrun's agent SIGTERMs the others, and Python
runs a signal's handler only once the main thread is back from the call it is in, so the noted signal sat there
until the agent's SIGKILL 30 s later (without a handler the rank ended at once). So the C-level handler also wakes
a watcher thread (``signal.set_wakeup_fd``), and a rank whose handler has not run ``STUCK_S`` seconds
(``--stuck_after``) after the first signal ends there, with a line that says why. A rank waiting on purpose, for the
others' share of a validation or for rank 0 to write a checkpoint, is not stuck (``patient``). A healthy rank that
waits longer than that on a slow peer in a step when the signal comes is taken for stuck: the run then resumes from
its last save.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading

import torch

from train import distributed

STOP_SIGNALS = (signal.SIGTERM,)
# the most steps between two checks: each is an all-reduce and a host sync, which a log step makes anyway; at a
# step of up to 2-3 s (ViT-B/16 at 256+256 on one GPU), 10 steps and the save fit in torchrun's 30 s
CHECK_EVERY = 10
# seconds after a stop signal by which the main thread must be back in Python (where its handler runs), unless it
# waits on purpose (``patient``); a rank still blocked then is taken to be waiting for a peer that is gone. Well
# under the 30 s torchrun's agent gives a failed job's ranks, and far above a healthy step's wait on a peer
STUCK_S = 10.0
_patient = 0  # > 0 while the main thread waits on purpose (validation, checkpoint writes)
_watched: list[int] = []  # the watcher's pipe (read end, write end) while one runs: a forked child closes them


class Stopped(Exception):  # not an error: the run stopped as asked, its state saved
    """The run stopped on a signal at ``step``, with OUT/latest.pt saved there."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step} on {signal.Signals(signum).name}")
        self.step, self.signum = step, signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # a shell's code for a process ended by the signal (143 for SIGTERM)


class StopOnSignal:
    """Between ``start`` and ``close`` (or within a ``with`` block), a SIGTERM sets ``received`` (its number) and
    nothing more; unless the main thread is blocked in one call for ``stuck_s`` seconds after it (and not waiting on
    purpose, ``patient``): then the process ends with a line on stderr, exit code 128 + the signal's number. Outside
    the main thread (where Python runs no handler) it does nothing."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, stuck_s: float = STUCK_S):
        """``stuck_s`` 0: no watcher (a blocked rank waits for its SIGKILL)."""
        self.signals = signals
        self.stuck_s = stuck_s
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._answered = threading.Event()  # the main thread ran the handler, or close() ended the watch
        self._wakeup: int | None = None  # the write end of the watcher's pipe, while it is the wakeup fd

    def start(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {sig: signal.signal(sig, self._note) for sig in self.signals}
            self._start_watcher()
        return self

    def close(self) -> None:
        """The handlers from before ``start`` back (a signal noted stays in ``received``); the watcher ends."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        self._previous = {}
        self._answered.set()  # after the loop: what the main thread does now is not the watcher's business
        if self._wakeup is not None:
            current = signal.set_wakeup_fd(-1)
            if current != self._wakeup:  # someone's since: theirs stays
                signal.set_wakeup_fd(current)
            _watched.clear()
            os.close(self._wakeup)  # the watcher reads the end of its pipe and closes it
            self._wakeup = None

    def _start_watcher(self) -> None:
        """Have the C-level handler write each signal's number to a pipe a thread reads (``_watch``). Not where
        a wakeup fd is set already (an asyncio loop's): it stays, and a blocked rank waits for its SIGKILL."""
        if not self.stuck_s:
            return
        read, write = os.pipe()
        os.set_blocking(write, False)  # the C handler must never block; a full pipe loses bytes, not the process
        theirs = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        if theirs != -1:
            signal.set_wakeup_fd(theirs)
            os.close(read)
            os.close(write)
            return
        self._wakeup, self._answered = write, threading.Event()
        _watched[:] = [read, write]
        watcher = threading.Thread(target=self._watch, args=(read, self._answered), name="stop-on-signal watcher")
        watcher.daemon = True
        watcher.start()

    def _watch(self, read: int, answered: threading.Event) -> None:
        """(The watcher thread) at a stop signal's number in the pipe, wait ``stuck_s`` for the main thread to run
        its handler (``_note``: ``answered``), and end the process if it has not and is not waiting on purpose. Only
        the first signal counts: once answered, the run is on its way to its check and the save there."""
        try:
            while data := os.read(read, 512):  # b"" once close() has closed the write end
                signum = next((sig for sig in self.signals if sig in data), None)  # other bytes: SIGCHLD, ...
                while signum is not None and not answered.wait(self.stuck_s):
                    if not _patient:
                        _end_stuck(signum, self.stuck_s)
        finally:
            os.close(read)

    def __enter__(self) -> StopOnSignal:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _note(self, signum: int, frame) -> None:
        self._answered.set()
        if self.received is not None:  # the same stop, said again (Slurm and torchrun's agent both send it)
            return
        self.received = signum
        if distributed.is_main():
            print(
                f"{signal.Signals(signum).name} received: saving the run within {CHECK_EVERY} steps, then stopping",
                flush=True,
            )


def _end_stuck(signum: int, stuck_s: float) -> None:
    """End this process, its main thread blocked ``stuck_s`` s in one call since a stop signal: nothing can be saved.
    Written straight to fd 2, and no exit handlers run: the main thread may hold a lock they need (sys.stdout's, say,
    so its last buffered lines may be lost). The loader workers end once they see their trainer gone."""
    line = (
        f"{signal.Signals(signum).name} received, and this process has been blocked in one call for {stuck_s:g} s "
        "since (a collective waiting for a rank that died, most often): ending it now, without a save; the run "
        "resumes from its last latest.pt\n"
    )
    os.write(2, line.encode())
    os._exit(128 + signum)


@contextlib.contextmanager
def patient():
    """Around a wait on purpose, however long (for the others' share of a validation, for rank 0's checkpoint
    writes): a stop signal meanwhile is not a blocked rank's, and waits for the main thread's return."""
    global _patient
    _patient += 1
    try:
        yield
    finally:
        _patient -= 1


def _forget_watcher_in_child() -> None:
    """(After a fork, in the child) the parent's watcher is not the child's: without this a SIGTERM to the child
    wrote into the parent's pipe, and the parent, never signalled, could end as stuck."""
    if _watched:
        with contextlib.suppress(ValueError):  # raised outside the main thread (a fork's is the thread that forked)
            signal.set_wakeup_fd(-1)
        for fd in _watched:
            with contextlib.suppress(OSError):
                os.close(fd)
        _watched.clear()


os.register_at_fork(after_in_child=_forget_watcher_in_child)


def agreed(received: int | None, device: torch.device) -> int | None:
    """The signal to stop on if any rank received one (the highest number), else None. Every rank calls this at the
    same steps."""
    return distributed.all_reduce_int(received or 0, device, "max") or None


def keep_worker_through_sigterm() -> None:
    """In a loader worker: a SIGTERM does nothing while the process that started it lives (it saves the run, then
    ends its workers); after, the default action (see the module)."""
    # the process that started it, by the pid multiprocessing knows (a worker whose parent died before this runs
    # would find itself a child of init already); a process not started by multiprocessing: its parent now
    started_by = multiprocessing.parent_process()
    parent = started_by.pid if started_by is not None else os.getppid()

    def note(signum: int, frame) -> None:
        if os.getppid() != parent:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, note)


def kill_stuck_workers() -> None:
    """At exit: SIGKILL the daemon processes still running (loader workers not yet ended, or stuck), before
    multiprocessing's own exit handler SIGTERMs them, which they let pass, and waits for them."""
    workers = [process for process in multiprocessing.active_children() if process.daemon]
    if workers:
        # torch's SIGCHLD handler would report these ends as a loader failure, a traceback on the way out
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for process in workers:
            process.kill()
