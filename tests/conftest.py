"""Shared fixtures: generated videos (no downloads), CSV writing, running the CLIs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from pipeline import synthetic

REPO = Path(__file__).resolve().parents[1]

# Each pytest-xdist worker's torch, and the CLIs it starts, get their share of the CPUs: with all of them each, 2
# workers on 2 cores oversubscribed OpenMP's threads, and the suite took 1,000 s of test time instead of 713 s.
# Set before torch is imported (it reads this once); a test that sets its own threads still does. Only in a worker:
# the controller's environment is the workers'.
if "PYTEST_XDIST_WORKER" in os.environ:
    _CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _SHARE = max(1, _CPUS // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_SHARE))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules with slow tests first, whole (their module fixtures are made once), test_demo's first of them:
    pytest-xdist hands tests out in this order, and the demo's (over a minute), started last, kept one worker busy
    while the others had finished."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)


write_csv = synthetic.write_csv  # tests write their CSVs as the generators do


def run_cli(module: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would; returns the completed process (text output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", module, *map(str, args)]
    # in a process group of its own: a time limit (ours or pytest-timeout's) ends it with its children, torchrun's
    # agent included, which then stops its workers; else they ran on, on the cores the next tests need
    # errors: output that names a file whose name is not UTF-8 holds its bytes, read as Python reads such names
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="surrogateescape",
        cwd=REPO,
        env=env,
        start_new_session=True,
    ) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except BaseException:
            end_group(child)
            raise
    proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def end_group(child: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM to ``child``'s process group (torchrun's agent stops its workers on it), SIGKILL after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Small generated clips, made once per test session.

    ``idx100``: 100 frames at 25 fps (4 s), frame i shows the number i, H.264 with B-frames, GOP 30.
    ``idx60``: 60 frames (2.4 s), the same kind. ``idx3``: only 3 frames. ``audio``: audio only.
    """
    root = tmp_path_factory.mktemp("videos")
    return {
        "idx100": synthetic.write_index_clip(root / "idx100.mp4", 100, gop=30),
        "idx60": synthetic.write_index_clip(root / "idx60.mp4", 60),
        "idx3": synthetic.write_index_clip(root / "idx3.mp4", 3),
        "audio": synthetic.write_audio_only(root / "audio.m4a"),
    }


def expected_indices(num_frames: int, fps: float, n: int = 4) -> list[int]:
    """Brute-force reference: the frame shown at t_k = (k + 0.5) * D / n of a constant-rate clip starting at 0, in
    exact arithmetic (a t_k on a frame's start takes that frame)."""
    fps = Fraction(fps)
    duration = num_frames / fps
    result = []
    for k in range(n):
        t = (2 * k + 1) * duration / (2 * n)
        # the last frame whose start time i / fps is <= t
        result.append(max(i for i in range(num_frames) if i / fps <= t))
    return result


TINY_CLIP = REPO / "tests" / "data" / "tiny-clip.json"


def assert_close_at_scale(actual, expected, rel: float = 1e-5, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with the absolute tolerance at ``rel`` of ``expected``'s largest magnitude (and
    the relative one at ``10 * rel``).

    Why: two equal computations that add their terms in another order (a gradient summed over fewer rows, another
    kernel) differ by float32 rounding of their *largest* terms, so an entry that cancels to near 0 is off by an
    amount set by the tensor's scale, not by its own value. Which CPU kernel runs (AVX2 or AVX-512) changes the order:
    a fixed ``atol=1e-6`` failed on an AMD EPYC VM for a bias gradient of scale 9 (off by 1.9e-6, 2e-7 of the scale).
    A real mistake is off by far more than 1e-5 of the scale (the default, for gradients; outputs, after fewer sums,
    use 1e-6).
    """
    import torch

    atol = rel * max(expected.detach().abs().max().item(), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=10 * rel, atol=atol, msg=msg)


def tiny_variant(folder: Path, name: str, **text_cfg) -> str:
    """The tiny model with ``text_cfg`` changed (e.g. CLIP's 77-token context, where captions get cut), as a
    model-config JSON ``folder/name.json`` of its own."""
    config = json.loads(TINY_CLIP.read_text())
    config["text_cfg"].update(text_cfg)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> dict[str, Path]:
    """Generated training data through the real pipeline: unlabeled (16 videos), labeled subset (8), val (8)."""
    root = tmp_path_factory.mktemp("train_data")
    train_csv = synthetic.make_webvid_sample(root / "train", count=16, seconds=1.2, width=64, height=48, seed=0)
    val_csv = synthetic.make_webvid_sample(root / "val", count=8, seconds=1.2, width=64, height=48, seed=100)
    shards = {
        "unlabeled": root / "shards" / "unlabeled",
        "val": root / "shards" / "val",
        "labeled": root / "shards" / "labeled",
    }
    common = ["--samples_per_shard", 5, "--size", 48, "--workers", 1, "--progress", "False"]
    run_cli("pipeline.shard", "--src", train_csv, "--out", shards["unlabeled"], *common)
    run_cli("pipeline.shard", "--src", val_csv, "--out", shards["val"], *common)
    run_cli(
        "pipeline.subset",
        "--src",
        shards["unlabeled"],
        "--out",
        shards["labeled"],
        "--n",
        8,
        "--seed",
        0,
        "--samples_per_shard",
        3,
    )
    return shards


def _processes() -> dict[int, tuple[str, int, int]]:
    """Every process: pid -> (state, parent pid, session id), from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        table[int(stat.parent.name)] = (fields[0], int(fields[1]), int(fields[3]))
    return table


def _job(pid: int, sessions: set[int]) -> list[int]:
    """The running processes of the job ``pid`` started: it, its descendants and everyone in the sessions they lead
    (``sessions`` gathers those, across calls)."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for child, (_, parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(children.get(p, []))
    sessions |= {table[p][2] for p in tree if p in table and table[p][2] in tree}  # sessions the tree leads
    return [p for p, (state, _, sid) in table.items() if (p in tree or sid in sessions) and state != "Z"]


def signal_job(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to every running process of the job ``pid`` started, as Slurm signals every process of a job
    step (its cgroup): torchrun's agent, the ranks, their loader workers. Returns their pids."""
    running = _job(pid, set())
    for p in running:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return running


def kill_tree(pid: int, timeout: float = 60) -> None:
    """SIGKILL a process, its descendants and everyone in the sessions they lead (torchrun starts its workers in
    their own sessions), round after round until none is left running; then every file they held is closed.

    Killed processes take a while to die (under load, longer than the half second the kill-and-resume test used to
    sleep), and one still dying holds its run's lock: the resume right after the kill was refused as "another run",
    about once in 40 runs. One round is not enough either: a DataLoader worker forked while its trainer is being
    killed is orphaned, so no longer a descendant, but it stays in its trainer's session."""
    import signal

    sessions: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        running = _job(pid, sessions)
        if not running:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {running} still running {timeout} s after SIGKILL")
        for p in running:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def with_a_sparse_member(folder: Path, dst: Path, declared: int) -> Path:
    """A copy of shard folder ``folder`` at ``dst`` whose 000001.tar has its second sample's first frame stored as a
    sparse member: 10 bytes in the file, ``declared`` bytes when read (what a shared tar could hold)."""
    import io
    import shutil
    import tarfile

    shutil.copytree(folder, dst)
    tar_path = dst / "000001.tar"
    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    second = list(dict.fromkeys(info.name.split(".")[0] for info, _ in members))[1]  # in file order
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.name == f"{second}.0.jpg":
                data = data[:10]
                info.size = len(data)
                info.pax_headers = {
                    "GNU.sparse.size": str(declared),
                    "GNU.sparse.numblocks": "1",
                    "GNU.sparse.offset": "0",
                    "GNU.sparse.numbytes": str(len(data)),
                }
            tar.addfile(info, io.BytesIO(data))
    return tar_path
