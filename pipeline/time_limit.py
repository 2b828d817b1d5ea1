"""A time limit on one video's decoding, so that no video can hold a shard's worker for good.

FFmpeg decodes as fast as the file lets it: a long video with one keyframe, or a huge frame size, can take many
minutes for the 4 frames a sample needs, and a damaged file can send a demuxer round in circles. The limit is a
SIGALRM timer whose handler raises ``TimeLimit``. Python runs the handler between two of its own steps, and PyAV
comes back to Python after each packet it demuxes or decodes, so a slow video stops within one packet. A single
call into FFmpeg that never returns is not stopped: the pool then sees its worker busy for good.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class TimeLimit(Exception):
    """The block ran past its limit."""

    def __init__(self, seconds: float):
        super().__init__(f"took more than {seconds:g} s")
        self.seconds = seconds


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``TimeLimit`` inside the block once it has run ``seconds`` (0: no limit). In the main thread only,
    where Python runs signal handlers (a pool or Spark worker runs its task there); elsewhere, no limit. After the
    block the timer is off and the SIGALRM handler from before is back."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TimeLimit(seconds)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
