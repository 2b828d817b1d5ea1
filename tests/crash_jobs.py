"""Stand-ins for process_shard, importable by spawned worker processes (tests/ is on their sys.path)."""

import os


def record_shard(task, settings):
    return {"shard": task.shard, "count": 0, "ok": 0, "failed": {}}


def crash_on_shard_3(task, settings):
    if task.shard == 3:
        os._exit(7)  # like a segfault in a decoder: the process vanishes
    return record_shard(task, settings)
