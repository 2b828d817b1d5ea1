"""`make demo` runs the same code path, reduced (fewer, shorter videos)."""

from __future__ import annotations

import json

from conftest import run_cli


def test_demo_runs_and_reuses_its_work(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("pipeline.demo", "--out", out, "--videos", 6, "--seconds", 2, "--labeled", 3, "--workers", 1)
    assert "What was produced" in proc.stdout
    assert (out / "frames.png").stat().st_size > 0
    assert json.loads((out / "shards" / "labeled" / "subset.json").read_text())["n"] == 3
    again = run_cli("pipeline.demo", "--out", out, "--videos", 6, "--seconds", 2, "--labeled", 3, "--workers", 1)
    assert "reusing" in again.stdout and "already complete" in again.stdout and "nothing to do" in again.stdout
