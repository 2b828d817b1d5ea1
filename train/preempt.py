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
"""

from __future__ import annotations

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
    nothing more. Outside the main thread (where Python runs no handler) it does nothing."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def start(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {sig: signal.signal(sig, self._note) for sig in self.signals}
        return self

    def close(self) -> None:
        """The handlers from before ``start`` back (a signal noted stays in ``received``)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _note(self, signum: int, frame) -> None:
        if self.received is not None:  # the same stop, said again (Slurm and torchrun's agent both send it)
            return
        self.received = signum
        if distributed.is_main():
            print(
                f"{signal.Signals(signum).name} received: saving the run within {CHECK_EVERY} steps, then stopping",
                flush=True,
            )


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
