"""pipeline.time_limit: a SIGALRM limit that stops a block running in Python, such as PyAV's decoding loop."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from pipeline import synthetic
from pipeline.frames import decode_frames
from pipeline.time_limit import TimeLimit, time_limit


def test_a_block_past_its_limit_is_stopped_and_the_handler_from_before_is_back():
    before = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(TimeLimit, match=r"took more than 0.2 s"):
        with time_limit(0.2):
            while True:  # Python steps: the handler runs between them
                pass
    assert 0.2 <= time.monotonic() - start < 5
    assert signal.getsignal(signal.SIGALRM) == before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_block_within_its_limit_or_without_one_runs_whole():
    with time_limit(5):
        pass
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # the timer is off: nothing fires later
    with time_limit(0):  # no limit
        time.sleep(0.05)


def test_outside_the_main_thread_there_is_no_limit():
    """Python runs signal handlers in the main thread only: a limit set elsewhere could not stop its block."""
    done = []

    def run():
        with time_limit(0.01):
            time.sleep(0.1)
        done.append(True)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert done == [True]


def test_pyav_decoding_is_stopped_mid_video(tmp_path):
    """PyAV comes back to Python after each packet: a decode stops within one packet of its limit."""
    path = tmp_path / "long.mp4"
    synthetic.write_index_clip(path, 250)
    start = time.monotonic()
    decode_frames(path, 4, 64)
    whole = time.monotonic() - start
    with pytest.raises(TimeLimit):
        with time_limit(whole / 20):
            decode_frames(path, 4, 64)
