"""pipeline.time_limit: a SIGALRM limit that stops a block running in Python, such as PyAV's decoding loop."""

from __future__ import annotations

import signal
import threading
import time
import traceback

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
    assert signal.getsignal(signal.SIGALRM) == before


def test_a_block_within_its_limit_or_without_one_runs_whole():
    outer = signal.getitimer(signal.ITIMER_REAL)[0]  # pytest-timeout's (300 s here), if it runs one
    with time_limit(5):
        pass
    after = signal.getitimer(signal.ITIMER_REAL)[0]  # ours is off (nothing of it fires later), the outer one back
    assert outer - 1 < after <= outer if outer else after == 0
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
    """PyAV comes back to Python after each packet: a decode stops within one packet of its limit, inside
    pipeline.frames (a 640x360 clip with one keyframe: its sampled frames take some 200 frames' decoding)."""
    path = tmp_path / "long.mp4"
    synthetic.write_index_clip(path, 250, width=640, height=360)
    assert len(decode_frames(path, 4, 64).images) == 4  # whole without a limit
    with pytest.raises(TimeLimit) as stopped:
        with time_limit(0.005):
            decode_frames(path, 4, 64)
    assert any(frame.filename.endswith("pipeline/frames.py") for frame in traceback.extract_tb(stopped.tb))


def test_an_outer_timer_is_put_back_with_what_it_had_left():
    """pytest-timeout (and anything else) may run a SIGALRM timer of its own: the block's limit took it over and
    left it off, so the test's own time limit was gone after the first video."""
    fired = []
    saved = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout's own, if it runs one: put back after
    before = signal.signal(signal.SIGALRM, lambda *_: fired.append(time.monotonic()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        start = time.monotonic()
        with time_limit(5):
            time.sleep(0.1)
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 0.2 < left <= 0.4 + 1e-3
        while not fired and time.monotonic() - start < 5:
            time.sleep(0.01)
        assert fired and 0.45 < fired[0] - start < 2  # the outer timer's own handler, about when it was due
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        if saved[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *saved)
