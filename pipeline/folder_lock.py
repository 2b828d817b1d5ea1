"""One writer per output folder: an exclusive ``flock`` on ``FOLDER/.lock``, held by this process alone.

Sharding, training and the evaluation frame cache each lock the folder they write. Two things let a run that was
just killed (``kill -9``, the OOM killer) hold its folder for a moment, so a run started right after it could be
refused as "another run" (the rare failure of the kill-and-resume test in tests/test_train.py):

- A forked child (a DataLoader or multiprocessing Pool worker) inherits the lock's open file, and a ``flock`` lasts
  until the last copy is closed: a worker orphaned by the kill of its trainer kept the folder locked after the
  trainer died (about 0.2 s measured; a DataLoader worker checks for its parent every 5 s). Forked children
  therefore close their copy at once.
- The kernel releases a dead process's ``flock`` a moment after the process is gone (up to 18 ms measured, with
  no process holding the file), and a large process takes a while to die. So a busy lock is tried again for
  ``GRACE_S`` before it counts as another run's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO

LOCK_NAME = ".lock"
GRACE_S = 5.0  # how long a busy lock is retried before it is taken as another live run's
_RETRY_S = 0.02
_held: weakref.WeakSet[IO] = weakref.WeakSet()  # this process's lock files: closed in each forked child


def _close_in_child() -> None:
    for handle in list(_held):
        with contextlib.suppress(OSError):  # already closed underneath: nothing left to let go
            handle.close()


os.register_at_fork(after_in_child=_close_in_child)


def lock_folder(folder: str | Path, on_wait: Callable[[], None] | None = None, grace: float = GRACE_S) -> IO | None:
    """Lock ``folder/.lock``; close the returned file to release it (the lock also ends with this process).

    If another process still holds it after ``grace`` seconds of retries: None, or with ``on_wait``, call it once
    and wait for the lock. Filesystems without ``flock`` (some network mounts) give the file unlocked: a lock there
    would refuse every run.
    """
    handle = _open_lock_file(Path(folder) / LOCK_NAME)
    deadline = time.monotonic() + grace
    while not _try_lock(handle):
        if time.monotonic() < deadline:
            time.sleep(_RETRY_S)
        elif on_wait is None:
            handle.close()
            return None
        else:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
            break
    _held.add(handle)
    return handle


class FolderLockError(PermissionError):
    """The folder's lock file can be neither made nor locked by this user; the CLIs say it in one line
    (``pipeline.cli.fire_main``, and train.main, which runs fire itself)."""


def _open_lock_file(path: Path) -> IO:
    """The lock file, made if missing (group-writable in a folder its group may write: it is shared), else opened to
    write, else to read: another member of a group that shares the folder made it, 0644 under the usual umask, and
    ``open(path, "w")`` failed with a PermissionError traceback. A local ``flock`` takes a file opened either way."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        try:
            return os.fdopen(os.open(path, os.O_RDWR), "r+")
        except PermissionError:
            return open(path)
    except PermissionError:
        raise FolderLockError(
            f"cannot make the lock file {path}: no permission to write in {path.parent}; give a folder you can write"
        ) from None
    with contextlib.suppress(OSError):  # a filesystem that keeps no group bits: as the umask made it
        if os.stat(path.parent).st_mode & stat.S_IWGRP:
            os.fchmod(fd, os.fstat(fd).st_mode | stat.S_IRGRP | stat.S_IWGRP)
    return os.fdopen(fd, "r+")


def _try_lock(handle: IO) -> bool:
    """False if another open file holds the lock; True if this one now does, or if the filesystem has no flock.
    Raises FolderLockError for a lock file opened to read where the filesystem locks only files opened to write
    (NFS, where flock is a whole-file fcntl lock: EBADF): unlocked, two runs could write the folder at once."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno == errno.EBADF and not handle.writable():
            handle.close()
            raise FolderLockError(
                f"cannot lock {handle.name}: another user made it and this user may not write it, and this "
                f"filesystem locks only files open to write; ask its owner to run chmod g+w {handle.name}, or "
                "remove it while no run uses the folder"
            ) from None
    return True
