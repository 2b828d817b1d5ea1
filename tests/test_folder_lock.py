"""The output folders' lock: one holder at a time, never a forked child (a DataLoader or Pool worker), and a
short wait for a holder that is going away."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

from pipeline.folder_lock import lock_folder


def test_one_holder_at_a_time(tmp_path):
    held = lock_folder(tmp_path)
    assert held is not None
    assert lock_folder(tmp_path, grace=0) is None
    held.close()
    again = lock_folder(tmp_path, grace=0)
    assert again is not None
    again.close()


def test_a_lock_freed_within_the_grace_is_taken(tmp_path):
    """A run killed a moment ago: its lock goes a few milliseconds after it (the kernel's release)."""
    held = lock_folder(tmp_path)
    threading.Timer(0.3, held.close).start()
    start = time.monotonic()
    taken = lock_folder(tmp_path, grace=30)
    assert taken is not None and 0.2 < time.monotonic() - start < 30
    taken.close()
    held = lock_folder(tmp_path)
    start = time.monotonic()
    assert lock_folder(tmp_path, grace=0.3) is None and time.monotonic() - start >= 0.3  # held all along: refused
    held.close()


def _wait(started, release) -> None:
    started.set()
    release.wait(60)


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """A trainer killed while its DataLoader worker lives on (orphaned) must leave the folder free: the worker's
    inherited copy of the lock file is closed when it forks."""
    fork = multiprocessing.get_context("fork")
    started, release = fork.Event(), fork.Event()
    held = lock_folder(tmp_path)
    child = fork.Process(target=_wait, args=(started, release))
    child.start()
    try:
        assert started.wait(60)
        held.close()  # the trainer's own copy: the only one left
        again = lock_folder(tmp_path, grace=0)
        assert again is not None
        again.close()
    finally:
        release.set()
        child.join(60)


def test_a_waiting_holder_is_told_once(tmp_path):
    held = lock_folder(tmp_path)
    told, got = [], []
    waiter = threading.Thread(target=lambda: got.append(lock_folder(tmp_path, on_wait=lambda: told.append(1), grace=0)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and told == [1]  # waiting, said once
    held.close()
    waiter.join(60)
    assert not waiter.is_alive() and got[0] is not None
    got[0].close()


def test_a_lock_file_this_user_may_not_write_still_locks(tmp_path, monkeypatch):
    """In a folder a group shares, the lock file another member made is 0644 under the usual umask: opening it to
    write failed with a PermissionError traceback. It is opened to read then, and flock locks it all the same."""
    import builtins

    from pipeline import folder_lock

    lock = tmp_path / folder_lock.LOCK_NAME
    lock.write_text("")
    real_open = os.open

    def os_open(path, flags, *args):
        if Path(path) == lock and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    def builtin_open(path, mode="r", *args, **kwargs):
        if Path(path) == lock and set(mode) & set("wa+"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(folder_lock, "open", builtin_open, raising=False)
    held = lock_folder(tmp_path)
    assert held is not None
    assert lock_folder(tmp_path, grace=0) is None  # another run is refused: the lock is held
    held.close()
    again = lock_folder(tmp_path, grace=0)
    assert again is not None
    again.close()
