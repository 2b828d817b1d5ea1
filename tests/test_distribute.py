"""Process pool: bounded streaming, and a worker that dies is isolated instead of killing the run."""

from __future__ import annotations

import pytest
from crash_jobs import crash_on_shard_3, record_shard

from pipeline.distribute import ShardCrash, run_local
from pipeline.worker import ShardSettings, ShardTask


def tasks(n):
    for i in range(n):
        yield ShardTask(i, (), "fp")


def test_every_task_runs_once(tmp_path):
    results = []
    run_local(tasks(9), ShardSettings(out_dir=str(tmp_path)), 2, results.append, job=record_shard)
    assert sorted(r["shard"] for r in results) == list(range(9))


def test_a_crashing_shard_is_isolated_and_reported(tmp_path):
    results = []
    with pytest.raises(ShardCrash) as e:
        run_local(tasks(8), ShardSettings(out_dir=str(tmp_path)), 2, results.append, job=crash_on_shard_3)
    assert e.value.shards == [3]
    assert sorted(r["shard"] for r in results) == [0, 1, 2, 4, 5, 6, 7]


def test_tasks_are_pulled_lazily(tmp_path):
    """The pool never holds more than 2 * workers tasks: the CSV is streamed, not loaded."""
    pulled = []

    def source():
        for task in tasks(10):
            pulled.append(task.shard)
            yield task

    results = []

    def on_result(stats):
        results.append(stats)
        assert len(pulled) - len(results) <= 4  # in flight, with 2 workers

    run_local(source(), ShardSettings(out_dir=str(tmp_path)), 2, on_result, job=record_shard)
    assert len(results) == 10
