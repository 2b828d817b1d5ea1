"""Stand-ins for process_shard, importable by spawned worker processes (tests/ is on their sys.path)."""

import os


def shard_tasks(n: int) -> list:
    """Shard tasks 0..n-1 of no rows, for the stand-ins here."""
    from pipeline.worker import ShardTask  # (imported when asked: spawned workers import this module)

    return [ShardTask(i, (), "fp") for i in range(n)]


def record_shard(task, settings):
    return {"shard": task.shard, "count": 0, "ok": 0, "failed": {}}


def note_start(task, settings):
    """Add the task's shard to OUT/starts, one line a start (appends this short are whole)."""
    with open(os.path.join(settings.out_dir, "starts"), "a") as f:
        f.write(f"{task.shard}\n")


def starts(out_dir) -> list[int]:
    """The shards started, in order (note_start)."""
    with open(os.path.join(out_dir, "starts")) as f:
        return [int(line) for line in f]


def crash_on_shard_3(task, settings):
    """Shard 3's worker vanishes (like a segfault in a decoder) once shard 0, which takes 4 s, is running."""
    import time
    from pathlib import Path

    note_start(task, settings)
    if task.shard == 0:
        Path(settings.out_dir, "0.running").touch()
        time.sleep(4)
    if task.shard == 3:
        while not Path(settings.out_dir, "0.running").exists():
            time.sleep(0.01)
        os._exit(7)
    return record_shard(task, settings)


def note_pid_and_wait(task, settings):
    """Write this worker's pid into OUT, then take a long time: a shard in flight when its run is killed."""
    import time
    from pathlib import Path

    # whole or not there: a test that saw the file before its pid was written read "" (a rename is atomic)
    Path(settings.out_dir, f".worker-{task.shard}.pid").write_text(str(os.getpid()))
    Path(settings.out_dir, f".worker-{task.shard}.pid").rename(Path(settings.out_dir, f"worker-{task.shard}.pid"))
    time.sleep(60)
    return record_shard(task, settings)


def stuck_in_one_call():
    """Like a call into FFmpeg that never returns to Python: the limit's SIGALRM is never handled (blocked here, as
    it is never looked at inside such a call), and the process waits for ever."""
    import signal
    import time

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    while True:
        time.sleep(60)


def stuck_on_shard_1(task, settings):
    """Shard 1's "decoding" under a 0.5 s limit never ends; shard 0 takes 3 s (it is running when shard 1's worker
    is ended, 1 to 2 s in); the other shards are recorded."""
    import time

    from pipeline import board
    from pipeline.time_limit import decode_limit

    board.GRACE_S = 0.5
    note_start(task, settings)
    if task.shard == 1:
        with decode_limit(0.5, 4, ""):
            stuck_in_one_call()
    if task.shard == 0:
        time.sleep(3)
    return record_shard(task, settings)


def shard_with_bad_rows(task, settings):
    """The real process_shard, its decoding of a video named crash*.mp4 ending the process, and of one named
    stuck*.mp4 stuck in one call (a 0.5 s grace past --decode_timeout)."""
    from pathlib import Path

    from pipeline import board, worker

    board.GRACE_S = 0.5
    real = worker.decode_frames

    def decode(source, *args, **kwargs):
        name = Path(source).name
        if name.startswith("crash"):
            os._exit(11)
        if name.startswith("stuck"):
            stuck_in_one_call()
        return real(source, *args, **kwargs)

    worker.decode_frames = decode
    return worker.process_shard(task, settings)


class KillsOnArrival:
    """Settings whose unpickling ends the process: a worker that dies taking its task, before it can post it."""

    out_dir = "."

    def __reduce__(self):
        return os._exit, (3,)


class _KillsWhenSent:
    def __reduce__(self):
        os._exit(5)


def dies_sending_shard_1(task, settings):
    """Shard 1's job ends, and its worker dies pickling the result: after the task's own code."""
    return _KillsWhenSent() if task.shard == 1 else record_shard(task, settings)


def dies_writing_its_tar(task, settings):
    """The real process_shard, its worker dying as it commits the shard's tar: after every row."""
    from pipeline import worker

    def commit(self):
        os._exit(9)

    worker.TarShardWriter.commit = commit
    return worker.process_shard(task, settings)


def leaves_a_crash_behind_on_shard_1(task, settings):
    """Shard 1 starts a thread that ends its worker 0.5 s later, while it works on shard 2 (1 s); its task ends."""
    import threading
    import time

    if task.shard == 1:
        threading.Timer(0.5, os._exit, (7,)).start()
    if task.shard == 2:
        time.sleep(1)
    return record_shard(task, settings)


def raises_on_shard_1(task, settings):
    """Shard 1 raises once shard 0 is running; shard 0 would take a minute, and notes when it is cut short."""
    import time
    from pathlib import Path

    out = Path(settings.out_dir)
    if task.shard == 0:
        (out / "0.running").touch()
        try:
            time.sleep(60)
        finally:
            (out / "0.cleaned").touch()
    if task.shard == 1:
        while not (out / "0.running").exists():
            time.sleep(0.01)
        raise ValueError("shard 1 is bad")
    return record_shard(task, settings)
