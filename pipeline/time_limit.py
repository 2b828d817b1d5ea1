"""A time limit on one video's decoding, so that no video can hold a worker of the shard pipeline or of the
evaluation's frame cache for good.

FFmpeg decodes as fast as the file lets it: a long video with one keyframe, or a huge frame size, can take many
minutes for the 4 frames a sample needs, and a damaged file can send a demuxer round in circles. The limit is a
SIGALRM timer whose handler raises ``TimeLimit``. Python runs the handler between two of its own steps, and PyAV
comes back to Python after each packet it demuxes or decodes, so a slow video stops within one packet. A single
call into FFmpeg that never returns is not stopped by the timer: the decoding also posts its deadline on the pool's
board (``pipeline.board``), and the pool's process ends the worker ``board.GRACE_S`` after it.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time

from pipeline import board
from pipeline.cli import number_problems
from pipeline.frames import FrameError

DECODE_TIMEOUT = "decode_timeout"  # the failure reason of a video whose decoding ran past --decode_timeout
MAX_DECODE_S = 86_400  # --decode_timeout's largest (0: no limit)
RETRY_LONGER = ": give --decode_timeout more seconds and rerun with --retry_failed"  # pipeline.shard's hint
_TOOK = re.compile(r"took more than (\S+) s\b")


class TimeLimit(Exception):
    """The block ran past its limit."""

    def __init__(self, seconds: float):
        super().__init__(f"took more than {seconds:g} s")
        self.seconds = seconds


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``TimeLimit`` inside the block once it has run ``seconds`` (0: no limit). In the main thread only,
    where Python runs signal handlers (a pool or Spark worker runs its task there); elsewhere, no limit.

    After the block the SIGALRM handler from before is back, and so is a timer that ran before it (pytest-timeout's,
    say), with what it had left less the block's time: an outer timer due during the block fires right after it."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = True

    def expired(signum, frame):
        if armed:  # not once the block is over: a signal still pending then is this timer's, and spent
            raise TimeLimit(seconds)

    previous = signal.signal(signal.SIGALRM, expired)
    start, outer = time.monotonic(), (0.0, 0.0)
    try:
        outer = signal.setitimer(signal.ITIMER_REAL, seconds)  # armed inside the try: its finally always runs
        yield
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer[0] - (time.monotonic() - start), 1e-6), outer[1])


@contextlib.contextmanager
def decode_limit(seconds: float, frames: int, hint: str):
    """``time_limit`` around one video's decoding, its ``TimeLimit`` made the video's failure: a transient
    ``FrameError`` (``DECODE_TIMEOUT``), said in ``took_too_long``'s words followed by ``hint`` (what to do)."""
    try:
        with board.deadline(seconds), time_limit(seconds):
            yield
    except TimeLimit:
        raise FrameError(DECODE_TIMEOUT, f"{took_too_long(frames, seconds)}{hint}", transient=True) from None


def stuck_failure(frames: int, seconds: float, hint: str) -> FrameError:
    """The failure of a video whose decoding ``decode_limit``'s timer could not stop, stuck inside one call into
    FFmpeg until the pool ended its worker: ``decode_limit``'s own, in ``stuck_too_long``'s words."""
    return FrameError(DECODE_TIMEOUT, f"{stuck_too_long(frames, seconds)}{hint}", transient=True)


def decode_timeout_problems(seconds: object) -> list[str]:
    """A line if ``--decode_timeout`` is not a number of seconds from 0 (no limit) to a day. A day at most: the timer
    refuses (OverflowError) from about 1e10 s, which failed every video as an unexpected error."""
    return [f"{line} (0 for no limit)" for line in number_problems({"decode_timeout": (seconds, 0, MAX_DECODE_S)})]


def took_too_long(frames: int, seconds: float) -> str:
    """What a video past its decode limit gets told (``limit_of`` reads the limit back)."""
    return (
        f"decoding its {frames} frames took more than {seconds:g} s (a long video with few keyframes, or a huge "
        "frame size)"
    )


def stuck_too_long(frames: int, seconds: float) -> str:
    """What a video gets told whose decoding its limit's timer could not stop, stuck inside one call into FFmpeg
    (``limit_of`` reads the limit back)."""
    return (
        f"{took_too_long(frames, seconds)}, and was stuck inside one call into FFmpeg {board.GRACE_S:g} s later, so "
        "its worker process was ended"
    )


def limit_of(reason: str) -> float | None:
    """The limit a ``DECODE_TIMEOUT`` failure ran past, from its reason (``took_too_long``'s words); None for any
    other reason."""
    match = _TOOK.search(reason) if reason.startswith(DECODE_TIMEOUT) else None
    try:
        return float(match.group(1)) if match else None
    except ValueError:
        return None
