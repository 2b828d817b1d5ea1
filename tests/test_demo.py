"""`make demo` in reduced form (fewer videos and steps), through the same code path, and its chance check."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from demo.__main__ import chance_check, main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", out, "--quick", timeout=600)
    assert "[5/5]" in proc.stdout and "Demo finished" in proc.stdout
    for model in ("CLIP (teacher)", "Student", "FitCLIP"):
        for dataset in ("ucf101", "msrvtt"):
            record = json.loads((out / "results" / model / f"{dataset}.json").read_text())
            assert record["num_found"] == record["num_expected"] > 0
    assert (out / "results_alpha_sweep" / "alpha_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "run" / "wandb").glob("offline-run-*"))
    assert (out / "run" / "fitclip.pt").is_file()
    again = run_cli("demo", "--out", out, "--quick", timeout=600)
    assert "synthetic world: reusing" in again.stdout and "teacher: reusing" in again.stdout
    assert "already complete" in again.stdout and "nothing to do" in again.stdout
    # a full run into the quick demo's folder would reuse its small world: refused before any work
    with pytest.raises(SystemExit) as e:
        main(out=str(out))
    assert str(e.value) == (
        f"error: --out {out} holds a demo made with --quick True, and this run asks for the full sizes: use another "
        "--out, or remove it"
    )


def test_bad_flags_are_refused_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("notes")
    for flags, says in (
        ({"quick": "no"}, "error: --quick must be True or False, got 'no'"),  # "no" would count as true
        ({"out": str(tmp_path / "a_file")}, f"error: --out {tmp_path / 'a_file'} is a file; give a folder"),
    ):
        with pytest.raises(SystemExit) as e:
            main(**{"out": str(tmp_path / "demo"), **flags})
        assert str(e.value).startswith(says)
        assert not (tmp_path / "demo").exists()


def test_chance_check_flags_models_near_chance():
    def record(model, dataset, metrics, found=40):
        return {"model": model, "dataset": dataset, "metrics": metrics, "num_found": found}

    good = [record("A", "ucf101", {"top1": 60.0}), record("A", "msrvtt", {"R@5": 50.0})]
    assert chance_check(good) == []
    bad = [record("B", "ucf101", {"top1": 14.0}), record("B", "msrvtt", {"R@5": 13.0})]
    problems = chance_check(bad)
    assert len(problems) == 2 and "B on ucf101: top-1 14.0" in problems[0] and "chance (12.5)" in problems[0]
