"""The tests' own way of running a CLI (conftest.run_cli): a time limit ends the command with its children."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import end_group, run_cli


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, which no one may reap in a container, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_ending_a_command_ends_its_children_too():
    child = subprocess.Popen(
        ["bash", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    grandchild = int(child.stdout.readline())
    assert running(grandchild)
    end_group(child)
    child.stdout.close()
    deadline = time.monotonic() + 5
    while running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(grandchild) and child.returncode is not None


def test_a_command_past_its_time_limit_is_ended():
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("timeit", "-n", "1000000000", "pass", timeout=1)
    assert time.monotonic() - start < 15
