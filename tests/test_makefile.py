"""The Makefile's venv step: `make demo` and `make test` on a machine where an earlier make was cut short."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def venv_steps(venv: Path, python: str = sys.executable) -> str:
    """The Makefile's recipe lines that check the Python and make the venv, for ``venv``, as one shell command."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(STAMP): setup.cfg pyproject.toml\n")[1].split("\n\n")[0]
    lines = [x.strip().lstrip("@") for x in recipe.splitlines() if "pip install" not in x and "touch" not in x]
    command = " && ".join(f"( {x} )" for x in lines if not x.startswith("#"))  # each line a shell of its own, as make
    return (
        command.replace("$(PY)", f"{venv}/bin/python")
        .replace("$(PYTHON)", python)
        .replace("$(VENV)", str(venv))
        .replace("$(MAKECMDGOALS)", "test")
        .replace("$(NEW_ENOUGH)", makefile.split("NEW_ENOUGH := ")[1].splitlines()[0])
    )


def test_a_venv_cut_short_before_its_pip_is_made_again(tmp_path):
    venv = tmp_path / "v"
    # what a Ctrl-C early in `python -m venv` leaves: a python, no pip (every pip install after it failed)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    assert subprocess.run([venv / "bin/python", "-m", "pip", "--version"], capture_output=True).returncode != 0
    subprocess.run(venv_steps(venv), shell=True, check=True, cwd=ROOT)
    assert subprocess.run([venv / "bin/python", "-m", "pip", "--version"], capture_output=True).returncode == 0
    (venv / "kept").write_text("x")
    subprocess.run(venv_steps(venv), shell=True, check=True, cwd=ROOT)  # a whole venv: left as it is
    assert (venv / "kept").exists()


def test_a_python_older_than_3_10_is_refused_in_one_line(tmp_path):
    """pip said "No matching distribution found for webdataset<2,>=1.0", and never why."""
    fake = tmp_path / "python3.9"  # a Python that says it is 3.9 to `python -c CODE`
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.version_info = (3, 9, 18)\nexec(sys.argv[2])\n")
    fake.chmod(0o755)
    proc = subprocess.run(venv_steps(tmp_path / "v", str(fake)), shell=True, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and not (tmp_path / "v").exists()
    assert (
        proc.stderr.strip()
        == f"error: {fake} is Python 3.9; FitCLIP needs 3.10 or newer: make PYTHON=python3.11 (or another) test"
    )


def test_a_good_venv_is_kept_whatever_python3_is(tmp_path):
    """The version check refused a working venv of 3.11 once setup.cfg changed, where python3 is a 3.9."""
    fake = tmp_path / "python3.9"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.version_info = (3, 9, 18)\nexec(sys.argv[2])\n")
    fake.chmod(0o755)
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    (venv / "kept").write_text("x")
    subprocess.run(venv_steps(venv, str(fake)), shell=True, check=True, cwd=ROOT)
    assert (venv / "kept").exists()


def test_a_venv_of_an_older_python_is_made_again(tmp_path):
    """A .venv left by a make with PYTHON=python3.9 kept its pip, so every make after it reused it and failed."""
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")  # what a Python 3.9 says to the version check
    (venv / "bin" / "python").chmod(0o755)
    (venv / "stale").write_text("x")
    subprocess.run(venv_steps(venv), shell=True, check=True, cwd=ROOT)
    assert not (venv / "stale").exists()
    version = subprocess.run(
        [venv / "bin/python", "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    )
    assert version.stdout.strip() == str(sys.version_info[:2])
