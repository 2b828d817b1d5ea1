"""The Makefile's venv step: `make demo` and `make test` on a machine where an earlier make was cut short."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def venv_step(venv: Path) -> str:
    """The Makefile's recipe line that makes the venv, for ``venv``, as a shell command."""
    (line,) = [x.strip() for x in (ROOT / "Makefile").read_text().splitlines() if "-m venv" in x]
    return (
        line.replace("$(PY)", f"{venv}/bin/python").replace("$(PYTHON)", sys.executable).replace("$(VENV)", str(venv))
    )


def test_a_venv_cut_short_before_its_pip_is_made_again(tmp_path):
    venv = tmp_path / "v"
    # what a Ctrl-C early in `python -m venv` leaves: a python, no pip (every pip install after it failed)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    assert subprocess.run([venv / "bin/python", "-m", "pip", "--version"], capture_output=True).returncode != 0
    subprocess.run(venv_step(venv), shell=True, check=True, cwd=ROOT)
    assert subprocess.run([venv / "bin/python", "-m", "pip", "--version"], capture_output=True).returncode == 0
    (venv / "kept").write_text("x")
    subprocess.run(venv_step(venv), shell=True, check=True, cwd=ROOT)  # a whole venv: left as it is
    assert (venv / "kept").exists()
