"""pipeline.cpus: the default worker count follows the CPU affinity and the cgroup's CPU quota, not the machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import cpus


def v2_tree(root: Path, path: str, limits: dict[str, str]) -> Path:
    """A cgroup v2 mount at ``root`` holding ``path``, with ``cpu.max`` of each folder in ``limits`` (relative)."""
    (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for folder, value in limits.items():
        (root / folder / "cpu.max").write_text(value + "\n")
    proc = root.parent / "proc_cgroup"
    proc.write_text(f"0::{path}\n")
    return proc


def v1_tree(root: Path, mount: str, path: str, quota: int, period: int = 100_000) -> Path:
    folder = root / mount / path.lstrip("/")
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (folder / "cpu.cfs_period_us").write_text(f"{period}\n")
    proc = root.parent / "proc_cgroup"
    proc.write_text(f"12:memory:/other\n4:{mount}:{path}\n1:name=systemd:{path}\n")
    return proc


@pytest.fixture(params=["process_cpu_count", "sched_getaffinity"])
def affinity(monkeypatch, request):
    """usable_cpus' affinity set to ``n`` CPUs, read as Python 3.13+ reads it (os.process_cpu_count), and as the
    Pythons before (os.sched_getaffinity)."""

    def set_to(n: int) -> None:
        if request.param == "process_cpu_count":
            monkeypatch.setattr(os, "process_cpu_count", lambda: n, raising=False)
        else:
            monkeypatch.delattr(os, "process_cpu_count", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 128)

    return set_to


def test_the_affinity_counts_not_the_machine(affinity, tmp_path):
    affinity(16)  # a Slurm job's 16 cores of a 128-core node
    assert cpus.usable_cpus(tmp_path / "none", tmp_path / "no_proc_file") == 16


@pytest.mark.parametrize(("limit", "expected"), [("400000 100000", 4), ("150000 100000", 2), ("max 100000", 16)])
def test_a_v2_quota_caps_the_count_rounded_up(affinity, tmp_path, limit, expected):
    affinity(16)
    root = tmp_path / "cgroup"
    proc = v2_tree(root, "/kubepods/pod1/c1", {"kubepods/pod1/c1": limit})
    assert cpus.usable_cpus(root, proc) == expected


def test_a_parents_v2_quota_caps_its_childs(affinity, tmp_path):
    affinity(64)
    root = tmp_path / "cgroup"
    proc = v2_tree(root, "/a/b/c", {"a": "300000 100000", "a/b": "800000 100000", "a/b/c": "max 100000"})
    assert cpus.cgroup_cpu_quota(root, proc) == 3.0
    assert cpus.usable_cpus(root, proc) == 3


def test_a_container_with_its_own_cgroup_namespace_reads_its_mount(affinity, tmp_path):
    """/proc/self/cgroup may name a path the container's mount does not hold: the mount is the container's cgroup."""
    affinity(32)
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("200000 100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/docker/0123abcd\n")
    assert cpus.usable_cpus(root, proc) == 2


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_a_v1_quota_caps_the_count(affinity, tmp_path, mount):
    affinity(8)
    root = tmp_path / "cgroup"
    proc = v1_tree(root, mount, "/docker/abc", quota=250_000)
    assert cpus.usable_cpus(root, proc) == 3


def test_no_quota_and_unreadable_files_leave_the_affinity(affinity, tmp_path):
    affinity(6)
    root = tmp_path / "cgroup"
    proc = v1_tree(root, "cpu,cpuacct", "/", quota=-1)
    assert cpus.cgroup_cpu_quota(root, proc) is None and cpus.usable_cpus(root, proc) == 6
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("garbage")
    assert cpus.usable_cpus(root, proc) == 6
    proc.write_text("0::/\n")  # v2 without a cpu controller at the root: no cpu.max
    assert cpus.usable_cpus(root, proc) == 6


def test_a_tiny_quota_still_leaves_one_worker(affinity, tmp_path):
    affinity(4)
    root = tmp_path / "cgroup"
    proc = v2_tree(root, "/", {"": "10000 100000"})
    assert cpus.usable_cpus(root, proc) == 1


def test_this_machine_reads_a_positive_count():
    n = cpus.usable_cpus()
    assert isinstance(n, int) and 1 <= n <= (os.cpu_count() or 1)


def test_pipeline_shard_defaults_to_the_usable_cpus(monkeypatch, tmp_path):
    """Not os.cpu_count(): on a cluster node that is every job's cores."""
    from pipeline import shard

    monkeypatch.setattr(shard, "usable_cpus", lambda: 3)
    seen = []
    monkeypatch.setattr(shard, "validate", lambda out, workers, *rest: (seen.append(workers), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        shard.main(str(tmp_path / "x.csv"), str(tmp_path / "out"), progress=False)
    assert seen == [3]
