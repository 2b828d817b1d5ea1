"""train.preempt: a SIGTERM is noted, not obeyed at once; the ranks agree to stop; the loader workers live on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from conftest import REPO

from train import preempt

# a loader worker's start, in a process of its own: it says "ready", then waits (for nothing it can run out of)
WORKER = (
    "import time; from train.preempt import keep_worker_through_sigterm as k; k(); print('ready', flush=True); "
    "time.sleep(600)"
)


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_sigterm_is_noted_once_and_the_process_goes_on():
    """Under Slurm and torchrun a rank gets SIGTERM twice (from each): the second is the same stop."""
    proc = _run(
        """
        import os, signal
        from train.preempt import StopOnSignal
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            print("alive, noted", stop.received, flush=True)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "SIGTERM received: saving the run within 10 steps, then stopping",
        f"alive, noted {int(signal.SIGTERM)}",
    ]


def test_the_handlers_from_before_are_back_after_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with preempt.StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._note
    assert signal.getsignal(signal.SIGTERM) == before and stop.received is None
    assert signal.set_wakeup_fd(-1) == -1  # the watcher's wakeup fd is gone with it
    with preempt.StopOnSignal(stuck_s=0):  # --stuck_after 0: no watcher
        assert signal.set_wakeup_fd(-1) == -1
    proc = _run(
        """
        import os, signal
        from train.preempt import StopOnSignal
        with StopOnSignal():
            pass
        os.kill(os.getpid(), signal.SIGTERM)  # the default action again
        print("still alive")
        """
    )
    assert proc.returncode == -signal.SIGTERM and "still alive" not in proc.stdout


def test_a_loader_worker_lives_through_sigterm_while_its_trainer_lives():
    """Slurm signals every process of a job. A worker that died of it ended the run before the save (torch raises
    when a worker dies), and the batches it had made could no longer be read."""
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER], cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout.readline() == "ready\n"
        worker.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert worker.poll() is None
    finally:
        worker.kill()
        worker.wait()


def _ends_on_sigterm(orphan: int, ready: Path) -> bool:
    """Once ``ready`` says its handler is in place, SIGTERM the worker ``orphan``, whose parent is gone: whether it
    ends."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "ready" not in ready.read_text():
        time.sleep(0.05)
    assert _running(orphan)  # it ends of the SIGTERM below, not of anything else
    os.kill(orphan, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _running(orphan):
        time.sleep(0.1)
    return not _running(orphan)


def test_a_worker_whose_trainer_is_gone_ends_on_sigterm(tmp_path):
    said = tmp_path / "said"  # the worker's output: none of its parent's pipes, which would stay open with it
    proc = _run(
        f"""
        import pathlib, subprocess, sys, time
        worker = subprocess.Popen(
            [sys.executable, "-c", {WORKER!r}],
            stdin=subprocess.DEVNULL, stdout=open({str(said)!r}, "w"), stderr=subprocess.DEVNULL,
        )
        while "ready" not in pathlib.Path({str(said)!r}).read_text():  # its handler in place while this lives
            time.sleep(0.05)
        print(worker.pid, flush=True)  # and this process ends, leaving it
        """
    )
    assert _ends_on_sigterm(int(proc.stdout.split()[-1]), said)


def test_a_worker_started_by_multiprocessing_knows_its_trainer_even_after_it_is_gone(tmp_path):
    """A DataLoader worker whose trainer died before it set its handler: os.getppid() is already init's then, and
    the worker would have let SIGTERM pass for good."""
    said = tmp_path / "said"
    said.write_text("")
    proc = _run(
        f"""
        import multiprocessing, os, pathlib, time
        from train.preempt import keep_worker_through_sigterm

        def worker():
            null = os.open(os.devnull, os.O_WRONLY)  # not its parent's pipes, which would stay open with it
            os.dup2(null, 1)
            os.dup2(null, 2)
            while os.getppid() == parent:  # its parent ends first
                time.sleep(0.01)
            keep_worker_through_sigterm()
            pathlib.Path({str(said)!r}).write_text("ready")
            time.sleep(600)

        parent = os.getpid()
        child = multiprocessing.get_context("fork").Process(target=worker)
        child.start()
        print(child.pid, flush=True)
        os._exit(0)  # gone at once, without waiting for the child
        """
    )
    assert _ends_on_sigterm(int(proc.stdout.split()[-1]), said)


def test_a_stuck_worker_does_not_hold_the_trainers_exit():
    """A worker that lets SIGTERM pass and never ends: Python's multiprocessing SIGTERMs its daemon processes at exit
    and waits for them, for good; kill_stuck_workers ends them first."""
    proc = _run(
        """
        import atexit, multiprocessing, time
        from train.preempt import keep_worker_through_sigterm, kill_stuck_workers

        def stuck():
            keep_worker_through_sigterm()
            time.sleep(600)

        atexit.register(kill_stuck_workers)
        worker = multiprocessing.get_context("fork").Process(target=stuck, daemon=True)
        worker.start()
        time.sleep(0.5)
        print("exiting", flush=True)
        """
    )
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["exiting"], proc.stderr


def test_without_a_process_group_the_rank_agrees_with_itself():
    cpu = torch.device("cpu")
    assert preempt.agreed(None, cpu) is None
    assert preempt.agreed(int(signal.SIGTERM), cpu) == signal.SIGTERM
    stopped = preempt.Stopped(12, signal.SIGTERM)
    assert stopped.exit_code == 143 and str(stopped) == "stopped at step 12 on SIGTERM"


def _agree(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        noted = int(signal.SIGTERM) if rank == 1 else None  # only rank 1 was signalled
        torch.save(preempt.agreed(noted, torch.device("cpu")), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_when_one_received_the_signal(tmp_path):
    """A rank cannot stop alone (the others would wait for it in the step's collectives): the ranks agree."""
    import torch.multiprocessing as mp
    from test_distributed import free_port

    mp.spawn(_agree, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)] == [signal.SIGTERM, signal.SIGTERM]


# two gloo ranks in one script: rank 0 (this process) in an all-reduce that rank 1 (a fork) joins ANSWER s after rank 0
# was sent SIGTERM in it (never for a negative ANSWER; it ends with rank 0)
BLOCKED_RANK = """
    import os, signal, socket, sys, threading, time
    import torch, torch.distributed as dist
    from train import preempt

    ANSWER, PATIENT, STUCK_S, SIGNALLED = {answer}, {patient}, {stuck_s}, {signalled!r}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    parent = os.getpid()
    rank = 1 if os.fork() == 0 else 0
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=2)
    if rank == 1:
        null = os.open(os.devnull, os.O_WRONLY)  # not the test's pipes, which would stay open with it
        os.dup2(null, 1)
        os.dup2(null, 2)
        give_up = time.monotonic() + 60
        while not os.path.exists(SIGNALLED) and time.monotonic() < give_up and os.getppid() == parent:
            time.sleep(0.05)
        give_up = time.monotonic() + (ANSWER if ANSWER >= 0 else 60)
        while time.monotonic() < give_up and os.getppid() == parent:
            time.sleep(0.05)
        if ANSWER >= 0:
            dist.all_reduce(torch.ones(1))
        os._exit(0)

    def signal_rank_0():
        os.kill(parent, signal.SIGTERM)
        open(SIGNALLED, "w").close()

    threading.Timer(1.0, signal_rank_0).start()  # once rank 0 is blocked below
    start = time.monotonic()
    with preempt.StopOnSignal(stuck_s=STUCK_S) as stop:
        with preempt.patient() if PATIENT else open(os.devnull):
            dist.all_reduce(torch.ones(1))
    print(f"back after {{time.monotonic() - start:.1f}} s, noted {{stop.received}}", flush=True)
    assert signal.set_wakeup_fd(-1) == -1  # close() put back the wakeup fd it found
"""


def test_a_rank_blocked_for_good_in_a_collective_ends_soon_after_sigterm(tmp_path):
    """When a rank dies, torchrun's agent SIGTERMs the others. A rank blocked in a collective with it (NCCL waits
    for a dead peer) never came back to Python, where its handler runs, and waited out the agent's 30 s for its
    SIGKILL. Here rank 1 never answers: rank 0 ends stuck_s after the signal, saying why."""
    start = time.monotonic()
    proc = _run(BLOCKED_RANK.format(answer=-1, patient=False, stuck_s=1, signalled=str(tmp_path / "signalled")))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "back after" not in proc.stdout and time.monotonic() - start < 30
    assert "SIGTERM received, and this process has been blocked in one call for 1 s since (a collective" in proc.stderr


def test_a_rank_that_waits_on_purpose_or_is_answered_in_time_goes_on_to_its_check(tmp_path):
    """Waiting for rank 0's checkpoint write (patient) is not being stuck, however long; nor is a collective that
    completes within stuck_s: the handler then runs, and the run stops at its next check as before."""
    for answer, patient, stuck_s in ((3, True, 1), (0.5, False, 8)):
        signalled = tmp_path / f"signalled-{answer}"
        proc = _run(BLOCKED_RANK.format(answer=answer, patient=patient, stuck_s=stuck_s, signalled=str(signalled)))
        assert proc.returncode == 0, proc.stderr[-2000:]
        back = float(proc.stdout.split("back after ")[1].split()[0])
        assert back >= 1 + answer and proc.stdout.strip().endswith(f"noted {int(signal.SIGTERM)}"), proc.stdout


def test_a_forked_child_signalled_does_not_end_its_parent_as_stuck():
    """A child forked while the watcher runs inherits its pipe: its SIGTERM wrote the signal's number into the
    parent's pipe, and the parent, never signalled, ended as stuck."""
    proc = _run(
        """
        import os, signal, time
        from train.preempt import StopOnSignal
        with StopOnSignal(stuck_s=0.5) as stop:
            child = os.fork()
            if child == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # noted by the handler it inherited, in itself
                os._exit(0)
            os.waitpid(child, 0)
            time.sleep(2)
            print("alive, noted", stop.received, flush=True)
        """
    )
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "alive, noted None", proc.stderr[-2000:]
