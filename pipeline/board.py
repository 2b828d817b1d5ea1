"""What each pool worker is on, posted in shared memory where the process that runs the pool reads it.

Two things need it (``pipeline.pool``):

- **A call into FFmpeg that never returns** (a demuxer going round in circles inside one ``av_read_frame`` on a
  damaged file). ``--decode_timeout``'s timer cannot stop it: Python runs the timer's handler only between two of
  its own steps. The pool then waited for that worker for ever, and the run never ended. Now a worker posts when
  its decoding must be over by; the pool's process ends it (SIGKILL) ``GRACE_S`` after that.
- **A worker that dies** (a decoder's segfault, the out-of-memory killer, or the end above). The item it had posted
  names the video that killed it, so a shard can be made again without that one video rather than not at all.

Each worker has one slot, given by the pool's process: the item of its task it is on (a shard's row), and the
monotonic time its current decoding must end by (inf: no limit). ``time.monotonic`` is the same clock in every
process of a Linux machine. The pool knows which task and pid each worker has; only these two change inside a task.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

GRACE_S = 30.0  # past --decode_timeout, how long a decoding stuck inside one call is given before its worker ends
_FIELDS = 2  # item, deadline
_NONE = -1.0  # no item


@dataclass(frozen=True)
class Post:
    """What one worker had posted."""

    item: int  # the item of its task it was on; -1 for none
    deadline: float  # monotonic seconds; inf for none


class Board:
    """One slot per worker of one pool. Made by the pool's process, handed to each worker as it starts, with the
    slot it posts in (``attach``)."""

    def __init__(self, context, workers: int):
        # No lock around the posts: a worker killed while it held one (ended as stuck just as its decoding ended, or
        # by the out-of-memory killer) would block the pool's process for ever. Each field is one aligned 8-byte
        # write, whole to any reader, and the pool acts only on posts that stay still: a worker stuck, or dead.
        self._values = context.RawArray("d", [_NONE, math.inf] * workers)

    def post(self, slot: int) -> Post:
        """What the worker in ``slot`` has posted, now."""
        item, deadline = self._values[_FIELDS * slot : _FIELDS * slot + _FIELDS]
        return Post(int(item), deadline)

    def clear(self, slot: int) -> None:
        """Empty ``slot`` for the worker that takes it next (its last one dead)."""
        self._values[_FIELDS * slot : _FIELDS * slot + _FIELDS] = [_NONE, math.inf]

    def _set(self, slot: int, offset: int, value: float) -> None:
        self._values[_FIELDS * slot + offset] = value


# This process's board and slot, when it is a pool worker (``attach``); otherwise posting is a no-op.
_board: Board | None = None
_slot = -1


def attach(board: Board, slot: int) -> None:
    """(In a pool worker, at its start) post in ``slot`` of ``board``."""
    global _board, _slot
    _board, _slot = board, slot


def _post(offset: int, value: float) -> None:
    if _board is not None and _slot >= 0:
        _board._set(_slot, offset, value)


@contextlib.contextmanager
def item(number: int):
    """Post that this worker is on ``number``, an item of its task (a shard's row), for the block: a death in it is
    that item's, and one after it (writing the shard's tar) no item's."""
    _post(0, number)
    try:
        yield
    finally:
        _post(0, _NONE)


@contextlib.contextmanager
def deadline(seconds: float):
    """Post that the block (one video's decoding, under a ``seconds`` timer that should stop it) must be over
    ``GRACE_S`` after that timer: past it, the pool's process ends this worker. 0: no limit."""
    if not seconds:
        yield
        return
    _post(1, time.monotonic() + seconds + GRACE_S)  # read when the block starts: a test's worker may lower it
    try:
        yield
    finally:
        _post(1, math.inf)
