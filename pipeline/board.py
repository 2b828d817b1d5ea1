"""What each pool worker is doing, posted in shared memory where the process that runs the pool reads it.

Two things need it:

- **A call into FFmpeg that never returns** (a demuxer going round in circles inside one ``av_read_frame`` on a
  damaged file). ``--decode_timeout``'s timer cannot stop it: Python runs the timer's handler only between two of
  its own steps. The pool then waited for that worker for ever, and the run never ended. Now a worker posts when
  its decoding must be over by; the pool's process ends it (SIGKILL) ``GRACE_S`` after that.
- **A worker that dies** (a decoder's segfault, the out-of-memory killer, or the end above). The item it had posted
  names the video that killed it, so a shard can be made again without that one video rather than not at all.

Each worker has one slot: its pid, the number of the task it runs (given by the pool's process), the item of that
task it is on (a shard's row), and the monotonic time its current decoding must end by (inf: no limit).
``time.monotonic`` is the same clock in every process of a Linux machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

GRACE_S = 30.0  # past --decode_timeout, how long a decoding stuck inside one call is given before its worker ends
_FIELDS = 4  # pid, task, item, deadline
_NONE = -1.0  # no pid, task or item


@dataclass(frozen=True)
class Post:
    """What one worker had posted."""

    pid: int
    task: int  # the pool's number for the task it runs or ran last; -1 before its first
    item: int  # the item of the task it was on; -1 for none
    deadline: float  # monotonic seconds; inf for none


class Board:
    """One slot per worker of one pool, claimed in the order the workers start. Made by the pool's process, handed to
    each worker by its initializer (``attach``)."""

    def __init__(self, context, workers: int):
        # No lock around the posts: a worker killed while it held one (ended as stuck just as its decoding ended, or
        # by the out-of-memory killer) would block the pool's process for ever. Each field is one aligned 8-byte
        # write, whole to any reader, and the pool acts only on posts that stay still: a worker stuck, or dead.
        self._values = context.RawArray("d", [_NONE, _NONE, _NONE, math.inf] * workers)
        self._claimed = context.RawValue("i", 0)
        self._claiming = context.Lock()  # between starting workers only
        self.workers = workers

    def posts(self) -> list[Post]:
        """Every claimed slot, as it is now."""
        values = self._values[: _FIELDS * self._claimed.value]
        slots = [values[i : i + _FIELDS] for i in range(0, len(values), _FIELDS)]
        return [Post(int(pid), int(task), int(item), deadline) for pid, task, item, deadline in slots]

    def _claim(self) -> int:
        with self._claiming:
            slot = self._claimed.value
            if slot >= self.workers:
                return -1
            self._values[_FIELDS * slot : _FIELDS * slot + _FIELDS] = [os.getpid(), _NONE, _NONE, math.inf]
            self._claimed.value += 1  # after the slot is written: the pool reads only the claimed ones
            return slot

    def _set(self, slot: int, offset: int, value: float) -> None:
        self._values[_FIELDS * slot + offset] = value


# This process's board and slot, when it is a pool worker that claimed one (``attach``); otherwise posting is a no-op.
_board: Board | None = None
_slot = -1


def attach(board: Board) -> None:
    """(In a pool worker, at its start) claim a slot of ``board`` for this process's posts."""
    global _board, _slot
    _board, _slot = board, board._claim()


def _post(offset: int, value: float) -> None:
    if _board is not None and _slot >= 0:
        _board._set(_slot, offset, value)


def task(number: int) -> None:
    """Post that this worker runs the pool's task ``number``. It stays posted until the next one: a worker that dies
    after its task's code, sending its result, died on that task."""
    _post(2, _NONE)
    _post(1, number)


@contextlib.contextmanager
def item(number: int):
    """Post that this worker is on ``number``, an item of its task (a shard's row), for the block: a death in it is
    that item's, and one after it (writing the shard's tar) no item's."""
    _post(2, number)
    try:
        yield
    finally:
        _post(2, _NONE)


@contextlib.contextmanager
def deadline(seconds: float):
    """Post that the block (one video's decoding, under a ``seconds`` timer that should stop it) must be over
    ``GRACE_S`` after that timer: past it, the pool's process ends this worker. 0: no limit."""
    if not seconds:
        yield
        return
    _post(3, time.monotonic() + seconds + GRACE_S)  # read when the block starts: a test's worker may lower it
    try:
        yield
    finally:
        _post(3, math.inf)
