"""The output folders' lock: one holder at a time, never a forked child (a DataLoader or Pool worker), and a
short wait for a holder that is going away."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from pipeline import cli
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
            if flags & os.O_EXCL and lock.exists():
                raise FileExistsError(17, "File exists", str(path))
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

    # on NFS, flock is a whole-file fcntl lock, which a file opened to read cannot take (EBADF): that was taken for
    # a filesystem without flock, and the folder was left unlocked, open to two runs at once
    import errno
    import fcntl

    real_flock = fcntl.flock

    def nfs_flock(handle, operation):
        if not handle.writable():
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    with pytest.raises(folder_lock.FolderLockError, match=f"cannot lock {lock}: another user made it .* chmod g\\+w"):
        lock_folder(tmp_path)
    with pytest.raises(SystemExit) as e:  # the CLIs say it in one line
        cli.fire_main(lambda: lock_folder(tmp_path), argv=[])
    assert str(e.value.code).startswith(f"error: cannot lock {lock}: another user made it")


def test_a_lock_file_is_made_group_writable_in_a_folder_its_group_may_write(tmp_path, monkeypatch):
    """Else, under the usual umask, the next member of the group could open it to read only."""
    shared, own = tmp_path / "shared", tmp_path / "own"
    shared.mkdir()
    own.mkdir()
    shared.chmod(0o775)
    own.chmod(0o755)
    before = os.umask(0o022)
    try:
        for folder in (shared, own):
            lock_folder(folder).close()
    finally:
        os.umask(before)
    assert (shared / ".lock").stat().st_mode & 0o777 == 0o664
    assert (own / ".lock").stat().st_mode & 0o777 == 0o644


def test_a_lock_file_that_cannot_be_made_is_said_so(tmp_path, monkeypatch):
    from pipeline import folder_lock

    real_open = os.open

    def os_open(path, flags, *args):
        if Path(path).parent == tmp_path and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", os_open)
    with pytest.raises(folder_lock.FolderLockError, match=f"cannot make the lock file {tmp_path / '.lock'}: no perm"):
        lock_folder(tmp_path)
