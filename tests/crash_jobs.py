"""Stand-ins for process_shard, importable by spawned worker processes (tests/ is on their sys.path)."""

import os


def record_shard(task, settings):
    return {"shard": task.shard, "count": 0, "ok": 0, "failed": {}}


def crash_on_shard_3(task, settings):
    if task.shard == 3:
        os._exit(7)  # like a segfault in a decoder: the process vanishes
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
