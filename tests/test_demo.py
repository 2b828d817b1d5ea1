"""`make demo` in reduced form (fewer videos and steps), through the same code path, and its chance check."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from demo import __main__ as demo
from demo.__main__ import chance_check, main, result_problems


@pytest.mark.slow
@pytest.mark.timeout(900)  # two runs: about 130 s and 60 s on an idle 2-core machine
def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", out, "--quick", timeout=500)
    assert "[5/5]" in proc.stdout and "Demo finished" in proc.stdout
    for model in ("CLIP (teacher)", "Student", "FitCLIP"):
        for dataset in ("ucf101", "msrvtt"):
            record = json.loads((out / "results" / model / f"{dataset}.json").read_text())
            assert record["num_found"] == record["num_expected"] > 0
    assert (out / "results_alpha_sweep" / "alpha_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "run" / "wandb").glob("offline-run-*"))
    assert (out / "run" / "fitclip.pt").is_file()
    # the same folder spelled otherwise: every stage still finds its work (the subset failed on this)
    again = run_cli("demo", "--out", f"{tmp_path}/./demo/", "--quick", timeout=300)
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


def test_a_path_with_a_comma_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(out=str(tmp_path / "a,b"))
    assert str(e.value) == (
        f"error: --out {tmp_path / 'a,b'}: the demo hands its files to eval.run in comma lists; use a path without "
        "commas"
    )
    assert not (tmp_path / "a,b").exists()


def test_a_failing_stage_ends_the_demo_in_one_line(tmp_path, monkeypatch, capfd):
    with pytest.raises(demo.StageFailed) as e:  # a real command of the demo, failing as a user would see it
        demo._run(["pipeline.subset", "--src", tmp_path / "none", "--out", tmp_path / "o"])
    assert e.value.code == 1 and e.value.command.startswith("python -m pipeline.subset --src ")
    assert "is not a directory of shards" in capfd.readouterr().err

    def fails(root, sizes):
        raise demo.StageFailed("python -m pipeline.shard --src x", 2)

    monkeypatch.setattr(demo, "make_world", fails)
    with pytest.raises(SystemExit) as e:
        main(out=str(tmp_path / "d"), quick=True)
    assert str(e.value) == (
        "error: the demo stopped: `python -m pipeline.shard --src x` exited with 2 (its message is above). Finished "
        "stages are reused when you run the demo again."
    )


def test_a_world_cut_short_is_made_again_from_scratch(tmp_path, monkeypatch):
    from demo import world

    cut = tmp_path / "world" / "val" / "videos" / "000"
    cut.mkdir(parents=True)
    (cut / ".2000003.tmp-6f45682dff7a.mp4").write_bytes(b"half a video")  # a killed run's; no done.json
    made = []

    def writer(name):
        def write(root, count, seed):
            root.mkdir(parents=True)
            made.append(name)

        return write

    for name in ("write_webvid", "write_ucf101", "write_msrvtt"):
        monkeypatch.setattr(world, name, writer(name))
    demo.make_world(tmp_path, demo.QUICK)
    assert not list((tmp_path / "world").rglob(".*.tmp-*")) and len(made) == 4
    assert (tmp_path / "world" / "done.json").is_file()


def test_the_demo_needs_every_model_scored_on_every_video_of_both_benchmarks():
    def record(model, dataset, found=40, expected=40):
        return {
            "model": model,
            "dataset": dataset,
            "metrics": {"top1": 60.0},
            "num_found": found,
            "num_expected": expected,
        }

    complete = [record(m, d) for m in demo.MODELS for d in demo.DATASETS]
    assert result_problems(complete) == []
    assert result_problems([]) == [f"{m} on {d}: no result" for m in demo.MODELS for d in demo.DATASETS]
    skipped = {"model": "Student", "dataset": "msrvtt", "skipped": True, "reason": "MSRVTT_JSFUSION_test.csv missing"}
    partial = record("FitCLIP", "ucf101", found=30)
    rest = [r for r in complete if (r["model"], r["dataset"]) not in {("Student", "msrvtt"), ("FitCLIP", "ucf101")}]
    assert result_problems([*rest, skipped, partial]) == [
        "Student on msrvtt: not scored (MSRVTT_JSFUSION_test.csv missing)",
        "FitCLIP on ucf101: 30 of 40 videos scored",
    ]


def test_chance_check_flags_models_near_chance():
    def record(model, dataset, metrics, found=40):
        return {"model": model, "dataset": dataset, "metrics": metrics, "num_found": found}

    good = [record("A", "ucf101", {"top1": 60.0}), record("A", "msrvtt", {"R@5": 50.0})]
    assert chance_check(good) == []
    bad = [record("B", "ucf101", {"top1": 14.0}), record("B", "msrvtt", {"R@5": 13.0})]
    problems = chance_check(bad)
    assert len(problems) == 2 and "B on ucf101: top-1 14.0" in problems[0] and "chance (12.5)" in problems[0]
