"""How many CPUs this process may use: the default number of worker processes.

``os.cpu_count()`` counts the machine's cores, those of other jobs too. A Slurm job or ``taskset`` limits the cores a
process may run on (its CPU affinity), and a container (Docker's ``--cpus``, a Kubernetes CPU limit) may cap its CPU
time with a cgroup quota that no affinity shows. A pool of one process per machine core then queues on the few cores
it got, each process holding a decoder's memory: 128 workers on a 16-core allocation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"


def usable_cpus(root: str | Path = CGROUP_ROOT, proc_cgroup: str | Path = PROC_CGROUP) -> int:
    """The CPUs this process may use: its CPU affinity (``os.process_cpu_count`` on Python 3.13+, which also
    honours ``PYTHON_CPU_COUNT``), capped by the cgroup's CPU quota rounded up (1.5 CPUs: 2). At least 1."""
    if hasattr(os, "process_cpu_count"):
        cpus = os.process_cpu_count() or 1
    elif hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0)) or 1
    else:
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root, proc_cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def cgroup_cpu_quota(root: str | Path = CGROUP_ROOT, proc_cgroup: str | Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup, in CPUs (quota / period), the smallest along its path up to ``root``
    (a parent's quota caps its children's); None where none is set or none can be read (not Linux, no cgroup
    filesystem). cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2's one line: 0::/PATH
            quotas += [_v2_quota(d / "cpu.max") for d in _along(Path(root), path)]
        elif "cpu" in controllers.split(","):  # v1: N:cpu,cpuacct:/PATH, mounted under any of those names
            mounts = [Path(root) / name for name in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu")]
            mount = next((m for m in mounts if m.is_dir()), None)
            if mount is not None:
                quotas += [_v1_quota(d) for d in _along(mount, path)]
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def _along(mount: Path, path: str) -> list[Path]:
    """The folders from ``mount/path`` up to ``mount``; just ``mount`` where ``path`` is not under it (a container
    whose cgroup namespace is its own shows the host's path, and its mount is its own cgroup)."""
    here = mount / path.strip().lstrip("/")
    if not here.is_dir():
        return [mount]
    return [here, *[p for p in here.parents if p.is_relative_to(mount)]]


def _v2_quota(file: Path) -> float | None:
    """``cpu.max``'s ``QUOTA PERIOD`` in CPUs; None for ``max`` (no limit), a missing file or one not understood."""
    try:
        quota, period = file.read_text().split()[:2]
        return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None
    except (OSError, ValueError):  # "max", no file, no cpu controller here
        return None


def _v1_quota(folder: Path) -> float | None:
    """``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in CPUs; None for -1 (no limit) or a file missing."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
