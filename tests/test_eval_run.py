"""`eval.run` and `eval.tag` end to end on tiny benchmark layouts with generated videos and a tiny random model."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_CLIP, run_cli
from PIL import Image

from eval import report
from eval.datasets.base import RETRIEVAL, EvalDataset, Item
from eval.datasets.fixtures import MISSING, make_layouts, ucf101_missing_id
from pipeline import synthetic
from train.model import create_clip


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    layouts = make_layouts(root / "data")
    weights = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        weights[name] = root / f"{name}.pt"
        torch.save(create_clip(str(TINY_CLIP)).state_dict(), weights[name])
    return root, layouts, weights


def test_zero_shot_suite_end_to_end(bench):
    root, _, w = bench
    out = root / "results"
    proc = run_cli(
        "eval.run",
        "--model",
        TINY_CLIP,
        "--weights",
        f"{w['teacher']},{w['student']},fuse:{w['teacher']}:{w['student']}:0.4",
        "--names",
        "CLIP,Student,FitCLIP",
        "--data_root",
        root / "data",
        "--out",
        out,
        "--workers",
        2,
        "--batch_size",
        4,
        timeout=300,
    )
    for model in ("CLIP", "Student", "FitCLIP"):
        for dataset in ("ucf101", "moments", "msrvtt", "youcook2", "didemo"):
            record = json.loads((out / model / f"{dataset}.json").read_text())
            assert record["num_found"] + record["num_missing"] == record["num_expected"]
            missing = MISSING[dataset] if dataset != "ucf101" else ucf101_missing_id()
            assert record["num_missing"] == 1 and record["missing"] == [missing]
            assert record["config"]["model"] == str(TINY_CLIP) and record["code_version"]
            assert record["weights_id"].startswith(("sha256:", "fuse:sha256:"))  # each model named by content
            assert record["frame_cache"]["size"] == 224  # the tiny model's 32 px input: never below 224
            metrics = record["metrics"]
            keys = ("top1", "top5", "mean_per_class") if dataset in ("ucf101", "moments") else ("R@1", "R@5", "MdR")
            assert all(0 <= metrics[k] <= 100 or k == "MdR" for k in keys)
            # the console line rounds as summary.md does (half up; a whole MdR without decimals)
            line = next(line for line in proc.stdout.splitlines() if line.startswith(f"{model} / {dataset}: "))
            shown = line.split(": ", 1)[1].rsplit(" (", 1)[0].split(", ")
            assert sorted(shown) == sorted(f"{k} {report.format_value(v, k)}" for k, v in metrics.items() if k != "num")
    summary = (out / "summary.md").read_text()
    assert "Table 1a: UCF101" in summary and "Table 2c: DiDeMo" in summary and "| FitCLIP |" in summary
    # rows in --names order (they came sorted by name: CLIP, FitCLIP, Student)
    ours = ("| CLIP ", "| Student ", "| FitCLIP ")
    rows = [line.split(" | ")[0] for line in summary.splitlines() if line.startswith(ours)]
    assert rows[:3] == ["| CLIP", "| Student", "| FitCLIP"], rows
    assert "Table 2a: MSR-VTT" in proc.stdout
    # the fused model's numbers come from the fused weights, not from either parent
    fused = json.loads((out / "FitCLIP" / "msrvtt.json").read_text())
    assert fused["weights"].startswith("fuse:")
    # DiDeMo: one candidate per video file (the fixture names one file twice), and the choice is recorded
    didemo = json.loads((out / "FitCLIP" / "didemo.json").read_text())
    assert didemo["num_expected"] == 5 and didemo["config"]["didemo_merge_same_video"] is True
    # frames were decoded once into the cache and reused by all three models
    manifests = list((out / "cache").glob("*/manifest.json"))
    assert len(manifests) == 5


def test_missing_annotations_are_reported_as_skipped_and_strict_fails(bench, tmp_path):
    root, layouts, w = bench
    data = tmp_path / "data"
    import shutil

    shutil.copytree(layouts["msrvtt"], data / "msrvtt")
    out = tmp_path / "results"
    proc = run_cli(
        "eval.run",
        "--model",
        TINY_CLIP,
        "--weights",
        w["teacher"],
        "--names",
        "T",
        "--data_root",
        data,
        "--out",
        out,
        "--workers",
        1,
        "--datasets",
        "msrvtt,ucf101",
    )
    assert "skipping ucf101" in proc.stderr
    skipped = json.loads((out / "T" / "ucf101.json").read_text())
    assert skipped["skipped"] and "ucf101" in skipped["path"]
    strict = run_cli(
        "eval.run",
        "--model",
        TINY_CLIP,
        "--weights",
        w["teacher"],
        "--data_root",
        data,
        "--out",
        tmp_path / "strict",
        "--workers",
        1,
        "--datasets",
        "msrvtt",
        "--strict",
        check=False,
    )
    assert strict.returncode != 0 and "--strict" in strict.stderr and MISSING["msrvtt"] in strict.stderr


def test_bad_arguments_fail_clearly(bench, tmp_path):
    from eval import run

    root, _, w = bench
    (tmp_path / "notes.pt").write_text("not weights")
    shutil.copyfile(w["teacher"], tmp_path / "a,b.pt")
    for args, message in (
        # weights are checked before any video is decoded: a typo in the last entry costs seconds, not the cache
        ({"weights": f"{w['teacher']},{tmp_path / 'typo.pt'}"}, "weights file not found"),
        ({"weights": "openai"}, "neither a weights file nor a pretrained tag of tiny-clip"),
        ({"weights": str(tmp_path / "notes.pt")}, "not a state dict torch can load"),
        ({"model": str(REPO / "train" / "model_configs" / "demo-clip.json")}, "does not fit demo-clip"),
        ({"weights": f"fuse:{w['teacher']}:{w['student']}"}, "write fuse:TEACHER:STUDENT:ALPHA"),
        (
            {"alpha_sweep": (0, 1.5), "teacher": str(w["teacher"]), "student": str(w["student"])},
            "--alpha_sweep takes a comma list of numbers from 0 to 1 (e.g. 0,0.4,1), got '1.5'",
        ),
        ({"alpha_sweep": "abc", "student": str(w["student"])}, "--alpha_sweep takes a comma list of numbers"),
        # scored twice into one folder, and plotted twice
        ({"alpha_sweep": "0,0.4,0.40,1", "student": str(w["student"])}, "--alpha_sweep names 0.4 twice"),
        ({"alpha_sweep": "0.1234567,0.1234568", "student": str(w["student"])}, "--alpha_sweep names 0.123457 twice"),
        ({"device": "gpu"}, "--device must be auto, cuda or cpu, got 'gpu'"),
        ({"cache": str(tmp_path / "notes.pt")}, f"--cache {tmp_path / 'notes.pt'} is a file; give a folder"),
        ({"suite": "nope"}, "--suite"),
        ({"datasets": "kinetics"}, "unknown dataset"),
        ({"weights": f"{w['teacher']},{w['student']}", "names": "one"}, "--names has 1"),
        ({"alpha_sweep": "0,1"}, "--student"),
        ({"data_root": str(tmp_path / "empty")}, "no dataset found"),
        ({"model": "ViT-B-16-typo"}, "quickgelu"),
        ({"weights": str(w["teacher"]), "names": "a/b"}, "no slashes"),
        ({"weights": str(w["teacher"]), "names": "a\\b"}, "no slashes"),  # failed only after the work
        ({"weights": str(w["teacher"]), "names": "summary.md"}, "OUT holds files and folders of that name"),
        ({"weights": f"{w['teacher']},{w['student']}", "names": "x,x"}, "two models would be named x"),
        ({"weights": ""}, "--weights names no model"),  # decoded every video for no model
        # an empty TEACHER (or STUDENT) said "write fuse:TEACHER:STUDENT:ALPHA", once per alpha of a sweep
        ({"weights": f"fuse::{w['student']}:0.4"}, "its TEACHER is empty; give an open_clip pretrained tag"),
        ({"alpha_sweep": "0,1", "teacher": "", "student": str(w["student"])}, "--alpha_sweep: --teacher is empty"),
        ({"renormalize_video": "no"}, "--renormalize_video must be True or False, got 'no'"),
        ({"strict": "yes"}, "--strict must be True or False"),
        ({"batch_size": 0}, "--batch_size must be a whole number of at least 1, got 0"),
        ({"frames": "four"}, "--frames must be a whole number of at least 1"),
        ({"precision": "fp16"}, "--precision must be one of auto, bf16, fp32, got 'fp16'"),
        ({"decode_timeout": -5}, "--decode_timeout must be a number from 0 to 86400, got -5 (0 for no limit)"),
        ({"progress": "no"}, "--progress must be True or False, got 'no'"),
        # fire gives ['x/a,b.pt'] as a list, and comma_list splits its items too: "not found" twice, and no why
        ({"weights": [str(tmp_path / "a,b.pt")]}, "--weights is split at commas, and "),
    ):
        kwargs = {"model": str(TINY_CLIP), "weights": str(w["teacher"]), "data_root": str(root / "data"), **args}
        kwargs["out"] = str(tmp_path / "o")
        with pytest.raises(SystemExit) as e:
            run.main(**kwargs)
        assert message in str(e.value.code), (args, e.value.code)
        assert not (tmp_path / "o").exists(), args  # nothing decoded, nothing written
    # a refused sweep is still a sweep: --weights (its default, openai, does not fit the tiny model) is not named
    with pytest.raises(SystemExit) as e:
        sweep = {"alpha_sweep": "0,2", "teacher": str(w["teacher"]), "student": str(w["student"])}
        run.main(model=str(TINY_CLIP), data_root=str(root / "data"), out=str(tmp_path / "o"), **sweep)
    assert str(e.value.code) == "error: --alpha_sweep takes a comma list of numbers from 0 to 1 (e.g. 0,0.4,1), got '2'"


def test_a_checkpoint_that_does_not_fit_the_model_names_the_one_it_was_trained_with(bench, tmp_path):
    """The README's examples leave --model at its default: a best.pt of another model was refused with "pass the
    --model they were trained with", which its own config records."""
    from eval import run, tag

    root, layouts, w = bench
    best = tmp_path / "best.pt"
    torch.save({"step": 1, "student": torch.load(w["teacher"]), "config": {"model": str(TINY_CLIP)}}, best)
    demo = str(REPO / "train" / "model_configs" / "demo-clip.json")
    said = f"; its checkpoint was trained with --model {TINY_CLIP}"
    with pytest.raises(SystemExit) as e:
        run.main(model=demo, weights=str(best), data_root=str(root / "data"), out=str(tmp_path / "o"))
    assert "does not fit demo-clip" in str(e.value.code) and said in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        tag.main(str(layouts["msrvtt"] / "videos"), query="a dog", model=demo, weights=str(best), device="cpu")
    assert said in str(e.value.code)
    run.main(model=str(TINY_CLIP), weights=str(best), data_root=str(root / "data"), out=str(tmp_path / "p"), workers=1)


def test_every_wrong_flag_is_named_in_one_line(bench, tmp_path):
    """As the other CLIs do: one error line naming each wrong flag, not the first group's alone."""
    from eval import run

    root, _, w = bench
    kwargs = {
        "model": str(TINY_CLIP),
        "weights": f"{w['teacher']},{tmp_path / 'typo.pt'}",
        "data_root": str(root / "data"),
    }
    wrong = {"suite": "nope", "wandb": "maybe", "strict": "yes", "batch_size": 0, "device": "gpu"}
    with pytest.raises(SystemExit) as e:
        run.main(**kwargs, **wrong, out=str(tmp_path / "o"))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    for flag in wrong:
        assert f"--{flag} " in message, (flag, message)
    assert "weights file not found" in message and "typo.pt" in message  # the weights are checked with the flags
    with pytest.raises(SystemExit) as e:
        run.main(**(kwargs | {"model": "ViT-B-16-typo"}), batch_size=0, out=str(tmp_path / "o"))
    assert "--batch_size " in str(e.value.code) and "quickgelu" in str(e.value.code)  # and the model's
    assert not (tmp_path / "o").exists()


def test_a_run_stopped_mid_way_leaves_no_old_summary_beside_its_new_records(bench, tmp_path, monkeypatch):
    """summary.md is rebuilt from every record at the end: a run stopped before then (here, failing on its first
    model, or refused by --strict) must not leave the last run's tables beside the records it replaced, and makes
    them from the records in OUT (it used to leave none)."""
    from eval import run

    root, _, w = bench
    out = tmp_path / "o"
    out.mkdir()
    (out / report.SUMMARY_NAME).write_text("| the last run's table |")

    def stopped(*args, **kwargs):
        raise RuntimeError("stopped")

    monkeypatch.setattr(run, "run", stopped)
    with pytest.raises(SystemExit):
        run.main(model=str(TINY_CLIP), weights=str(w["teacher"]), data_root=str(root / "data"), out=str(out))
    assert not (out / report.SUMMARY_NAME).exists()  # no record in OUT: no tables

    record = {"dataset": "msrvtt", "metrics": {"R@1": 1.0}, "num_expected": 1, "num_found": 1, "num_missing": 0}
    record.update(model="earlier", missing=[], weights="x", config={}, code_version="abc1234")
    report.write_result(out, "earlier", "msrvtt", record)

    def strict(*args, **kwargs):
        raise SystemExit("error: --strict and 1 msrvtt video(s) are missing")

    monkeypatch.setattr(run, "run", strict)
    with pytest.raises(SystemExit):
        run.main(model=str(TINY_CLIP), weights=str(w["teacher"]), data_root=str(root / "data"), out=str(out))
    assert "| earlier |" in (out / report.SUMMARY_NAME).read_text()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    (out / report.SUMMARY_NAME).unlink()
    monkeypatch.setattr(run, "run", ctrl_c)
    with pytest.raises(SystemExit) as e:  # it was a traceback
        run.main(model=str(TINY_CLIP), weights=str(w["teacher"]), data_root=str(root / "data"), out=str(out))
    assert str(e.value.code).startswith(f"interrupted: the records scored so far are in {out} (with their tables")
    assert "| earlier |" in (out / report.SUMMARY_NAME).read_text()


def test_a_tag_whose_weights_cannot_be_had_fails_before_the_decoding(bench, tmp_path, monkeypatch):
    """--weights openai offline with an empty HF cache: every video was decoded, then the weights failed to load."""
    from huggingface_hub import constants

    from eval import run
    from train import model

    root, _, _ = bench
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model.tag_unavailable.cache_clear()
    kwargs = {"model": "ViT-B-16-quickgelu", "data_root": str(root / "data"), "out": str(tmp_path / "o")}
    with pytest.raises(SystemExit) as e:
        run.main(weights="openai", **kwargs)
    says = f"cannot load weights 'openai' for ViT-B-16-quickgelu: the HF cache ({tmp_path / 'hub'}) does not hold"
    assert says in str(e.value.code) and "HF_HUB_OFFLINE is set" in str(e.value.code)
    assert not (tmp_path / "o").exists()  # nothing decoded, nothing written

    # cached (as huggingface_hub lays a file out), the check passes offline; not cached, it asks the Hub
    snapshot = tmp_path / "hub" / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    model.tag_unavailable.cache_clear()
    assert model.tag_unavailable("ViT-B-16-quickgelu", "openai") == ""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model, "hub_unreachable", lambda: "")  # the Hub answers: fetched when loaded
    model.tag_unavailable.cache_clear()
    assert model.tag_unavailable("ViT-B-16-quickgelu", "openai") == ""
    model.tag_unavailable.cache_clear()


def test_a_name_rescored_with_other_weights_on_fewer_datasets_is_refused(bench, tmp_path, monkeypatch):
    """summary.md's row of a name is made of every record of that name in OUT: scoring the name again with other
    weights on some datasets only made a row of two models' numbers, its Models table naming one of them."""
    from eval import run

    root, _, w = bench
    out = tmp_path / "o"
    cfg = run.EvalConfig(model=str(TINY_CLIP), data_root="", out=str(out))
    for dataset in ("msrvtt", "didemo"):
        record = {"dataset": dataset, "metrics": {"R@1": 1.0}, "num_expected": 1, "num_found": 1, "num_missing": 0}
        record.update(model="T", missing=[], weights=str(w["teacher"]), config=asdict(cfg), code_version="abc1234")
        report.write_result(out, "T", dataset, record)
    scored = []
    monkeypatch.setattr(run, "run", lambda cfg, models, datasets, *a: scored.append([d.name for d in datasets]) or [])
    common = dict(model=str(TINY_CLIP), names="T", data_root=str(root / "data"), out=str(out))
    with pytest.raises(SystemExit) as e:
        run.main(weights=str(w["student"]), datasets="msrvtt", **common)
    assert str(e.value.code) == (
        f"error: {out / 'T'} holds T's didemo results, scored with {w['teacher']} (as it was then) or other "
        f"settings; this run scores T with {w['student']}, and summary.md would mix the two in one row: give "
        "another --names, score those datasets again (--datasets), or delete their files there"
    )
    with pytest.raises(SystemExit):  # other settings: --frames
        run.main(weights=str(w["teacher"]), datasets="msrvtt", frames=2, **common)
    assert scored == []
    run.main(weights=str(w["teacher"]), datasets="msrvtt", **common)  # the same model and settings: its row is one
    run.main(weights=str(w["student"]), datasets="msrvtt,didemo", **common)  # every record replaced
    assert scored == [["msrvtt"], ["msrvtt", "didemo"]]
    # what ran, not what was asked: a GPU's bf16 (auto) beside this CPU's fp32 (auto again) would mix in one row
    record.update(dataset="didemo", weights=str(w["teacher"]), precision="bf16")
    report.write_result(tmp_path / "gpu", "T", "didemo", record)
    on_cpu = {**common, "out": str(tmp_path / "gpu"), "device": "cpu", "weights": str(w["teacher"])}
    with pytest.raises(SystemExit, match="holds T's didemo results"):
        run.main(datasets="msrvtt", **on_cpu)
    run.main(datasets="msrvtt", precision="bf16", **on_cpu)
    assert scored[-1] == ["msrvtt"]


def test_a_name_rescored_from_the_same_path_after_the_file_changed_is_refused(bench, tmp_path, monkeypatch):
    """Records name their weights by content: training that went on rewrote best.pt at the same path, and its row
    mixed the old model's numbers with the new one's; the same file under another spelling is the same model."""
    from eval import run

    root, _, w = bench
    out, best = tmp_path / "o", tmp_path / "best.pt"
    shutil.copy(w["teacher"], best)
    cfg = run.EvalConfig(model=str(TINY_CLIP), data_root="", out=str(out))
    record = {"dataset": "didemo", "metrics": {"R@1": 1.0}, "num_expected": 1, "num_found": 1, "num_missing": 0}
    record.update(model="T", missing=[], weights=str(best), weights_id=run.weights_id(str(best)), config=asdict(cfg))
    report.write_result(out, "T", "didemo", {**record, "code_version": "abc1234"})
    monkeypatch.setattr(run, "run", lambda *a: [])
    common = dict(model=str(TINY_CLIP), names="T", data_root=str(root / "data"), out=str(out), datasets="msrvtt")
    run.main(weights=f"{tmp_path}/./best.pt", **common)  # the same file
    shutil.copy(w["student"], best)  # training went on
    with pytest.raises(SystemExit) as e:
        run.main(weights=str(best), **common)
    assert f"holds T's didemo results, scored with {best} (as it was then)" in str(e.value.code)
    assert run.weights_id(f"fuse:openai:{best}:0.4") == f"fuse:openai:{run.weights_id(str(best))}:0.4"


def test_a_malformed_annotation_file_is_an_error_line(bench, tmp_path):
    """A classInd.txt that does not fit the test list: a traceback, now one error line naming the dataset."""
    from eval import run

    root, _, w = bench
    lists = tmp_path / "data" / "ucf101" / "ucfTrainTestlist"
    shutil.copytree(root / "data" / "ucf101" / "ucfTrainTestlist", lists)
    (lists / "classInd.txt").write_text("1 SomethingElse\n")
    with pytest.raises(SystemExit) as e:
        run.main(
            model=str(TINY_CLIP), weights=str(w["teacher"]), data_root=str(tmp_path / "data"), out=str(tmp_path / "o")
        )
    assert str(e.value.code).startswith("error: ucf101: ") and "--datasets" in str(e.value.code)
    assert not (tmp_path / "o").exists()


def test_one_run_writes_an_out_at_a_time_and_clears_a_killed_runs_temporaries(bench, tmp_path, monkeypatch):
    """Two runs into one OUT would replace each other's records and summary: the second is refused while the first
    holds OUT/.lock. Under the lock, the temporaries a killed run left beside the records and the summary go."""
    from eval import run
    from pipeline.folder_lock import lock_folder

    root, _, w = bench
    out = tmp_path / "o"
    (out / "teacher").mkdir(parents=True)
    (out / "other").mkdir()  # a model of a killed run that this one does not score
    left = [out / ".summary.md.tmp-0123456789ab", out / "teacher" / ".ucf101.json.tmp-0123456789ab"]
    left.append(out / "other" / ".msrvtt.json.tmp-0123456789ab")
    for path in left:
        path.write_text("half a record")
    kept = out / "teacher" / "notes.txt"
    kept.write_text("mine")
    args = {"model": str(TINY_CLIP), "weights": str(w["teacher"]), "names": "teacher", "data_root": str(root / "data")}
    monkeypatch.setattr(run, "lock_folder", lambda folder: lock_folder(folder, grace=0.0))
    with lock_folder(out):
        with pytest.raises(SystemExit) as e:
            run.main(**args, out=str(out))
    held = out / ".lock"
    assert str(e.value) == f"error: another run is writing {out} (it holds {held}): wait for it or give another --out"
    assert all(path.exists() for path in left)  # not the refused run's to touch

    def stopped(*args, **kwargs):
        raise RuntimeError("stopped")

    monkeypatch.setattr(run, "run", stopped)
    with pytest.raises(SystemExit):
        run.main(**args, out=str(out))
    assert not any(path.exists() for path in left)
    assert kept.read_text() == "mine"
    handle = lock_folder(out, grace=0.0)  # let go again, by the stopped run too
    assert handle is not None
    handle.close()


@pytest.mark.slow
def test_alpha_sweep_plots_metrics_against_alpha(bench, tmp_path):
    root, _, w = bench
    out = tmp_path / "sweep"
    run_cli(
        "eval.run",
        "--model",
        TINY_CLIP,
        "--alpha_sweep",
        "0,0.5,1",
        "--teacher",
        w["teacher"],
        "--student",
        w["student"],
        "--data_root",
        root / "data",
        "--out",
        out,
        "--datasets",
        "ucf101,msrvtt",
        "--cache",
        tmp_path / "cache",
        "--workers",
        1,
        "--wandb",
        "offline",
        timeout=300,
    )
    png = out / "alpha_sweep.png"
    assert list((out / "wandb").glob("offline-run-*/*.wandb"))  # the table and the plot, logged offline
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    a0 = json.loads((out / "alpha=0" / "msrvtt.json").read_text())["metrics"]
    run_cli(
        "eval.run",
        "--model",
        TINY_CLIP,
        "--weights",
        w["teacher"],
        "--names",
        "T",
        "--data_root",
        root / "data",
        "--out",
        tmp_path / "teacher",
        "--datasets",
        "msrvtt",
        "--cache",
        tmp_path / "cache",
        "--workers",
        1,
    )
    teacher = json.loads((tmp_path / "teacher" / "T" / "msrvtt.json").read_text())["metrics"]
    assert a0 == teacher  # alpha 0 is the teacher exactly


def run_tag(folder, weights, out, *flags, check: bool = True):
    """``eval.tag`` on ``folder`` with the tiny model and ``weights``, writing ``out``, with ``flags`` (its labels or
    query)."""
    return run_cli(
        "eval.tag", "--videos", folder, *flags, "--model", TINY_CLIP, "--weights", weights, "--out", out, check=check
    )


def test_tag_and_search_own_videos(bench, tmp_path):
    root, layouts, w = bench
    folder = tmp_path / "videos"  # a copy: the bench's folder is the other tests' too
    shutil.copytree(layouts["msrvtt"] / "videos", folder)
    (folder / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "tags.csv"
    proc = run_tag(folder, w["teacher"], out, "--labels", "a red screen,a green screen,a blue screen", "--top", 2)
    assert "skipped unreadable" in proc.stderr and "broken.mp4" in proc.stderr
    rows = list(csv.DictReader(out.open()))
    videos = {r["video"] for r in rows}
    assert len(videos) == 4 and all(r["rank"] in ("1", "2") for r in rows)
    assert all(0 <= float(r["probability"]) <= 1 for r in rows)
    search = run_tag(folder, w["teacher"], tmp_path / "search.csv", "--query", "a red screen")
    ranked = list(csv.DictReader((tmp_path / "search.csv").open()))
    assert [r["rank"] for r in ranked] == ["1", "2", "3", "4"] and "  1. " in search.stdout
    bad = run_cli("eval.tag", "--videos", folder, "--model", TINY_CLIP, check=False)
    assert bad.returncode != 0 and "--labels" in bad.stderr


def test_default_names_for_weights_entries_are_folder_safe():
    from eval.run import default_name

    assert default_name("openai") == "openai"
    assert default_name("runs/x/best.pt") == "runs_x_best"
    assert default_name("/abs/fitclip.safetensors") == "abs_fitclip"
    assert default_name("fuse:openai:runs/x/best.pt:0.4") == "fuse_openai_runs_x_best.pt_0.4"
    assert "/" not in default_name("../../etc/passwd")


def test_didemo_merging_can_be_turned_off(bench):
    from eval import run

    root, _, _ = bench
    cfg = run.EvalConfig(model=str(TINY_CLIP), data_root=str(root / "data"), out="unused")
    (merged,), _ = run.load_datasets(["didemo"], cfg, {})
    (apart,), _ = run.load_datasets(["didemo"], replace(cfg, didemo_merge_same_video=False), {})
    assert len(merged.items) == 5 and len(apart.items) == 6


def test_cached_frames_are_as_large_as_the_model_input(tmp_path):
    """A 240 px model gets 240 px frames in the cache, not 224 px ones upsampled by its transform."""
    from eval import run

    config = json.loads(TINY_CLIP.read_text())
    config["vision_cfg"].update(image_size=240, patch_size=48)
    model = tmp_path / "tiny-clip-240.json"
    model.write_text(json.dumps(config))
    weights = tmp_path / "tiny240.pt"
    torch.save(create_clip(str(model)).state_dict(), weights)
    items = [
        Item(id=f"v{i}", video=str(synthetic.write_index_clip(tmp_path / f"v{i}.mp4", 8 + i, 640, 480)), text="t")
        for i in range(2)
    ]
    cfg = run.EvalConfig(model=str(model), data_root="", out=str(tmp_path / "out"), device="cpu", workers=1)
    (record,) = run.run(cfg, [("m", str(weights))], [EvalDataset("msrvtt", RETRIEVAL, items)], [], strict=False)
    (shard,) = (tmp_path / "out" / "cache").glob("*/*.tar")
    with tarfile.open(shard) as t:
        frame = Image.open(io.BytesIO(t.extractfile("v0.0.jpg").read()))
    assert min(frame.size) == 240  # from a 640x480 source: the shorter side at the model's input size
    assert record["frame_cache"]["size"] == 240 and record["num_found"] == 2
    assert run.cache_settings(str(TINY_CLIP), 4).size == 224


def test_tag_numeric_labels_and_a_folder_with_nothing_readable(bench, tmp_path):
    from eval import tag

    _, layouts, w = bench
    common = {"model": str(TINY_CLIP), "weights": str(w["teacher"]), "device": "cpu"}
    out = tmp_path / "tags.csv"
    tag.main(str(layouts["msrvtt"] / "videos"), labels=(1, 2), out=str(out), **common)  # fire's --labels "1,2"
    assert {r["label"] for r in csv.DictReader(out.open())} == {"1", "2"}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.mp4").write_bytes(b"not a video")
    (broken / "b.mkv").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        tag.main(str(broken), query="a dog", out=str(tmp_path / "search.csv"), **common)
    message = str(e.value.code)
    assert message.startswith("error: ") and str(broken) in message and "2 video file" in message
    assert not (tmp_path / "search.csv").exists()


def test_tag_without_cache_removes_its_frames_and_those_a_killed_run_left(tmp_path, monkeypatch):
    """eval.tag without --cache decodes into a temporary folder of the system's temp folder and removes it; one that
    a killed run left (its lock let go) goes at the next run; a live run's (locked) stays."""
    import os
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from eval import tag
    from pipeline.writer import temporary_name

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    target = tmp_path / tag.TEMPORARY_CACHE
    left = temporary_name(target)
    (left / "ucf").mkdir(parents=True)
    (left / "ucf" / "000000.tar").write_bytes(b"frames")
    old = time.time() - 60
    os.utime(left, (old, old))
    live = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, time; from pipeline.writer import hold_temporary, temporary_name\n"
            f"tmp = temporary_name({str(target)!r}); os.mkdir(tmp); hold_temporary(os.open(tmp, os.O_RDONLY))\n"
            "os.utime(tmp, (0, 0)); print(tmp, flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        running = Path(live.stdout.readline().strip())
        with tag.cache_root(None) as root:
            assert root.is_dir() and root.parent == tmp_path and root.name.startswith(f".{tag.TEMPORARY_CACHE}.tmp-")
            assert root.stat().st_mode & 0o777 == 0o700  # other users of the machine may not read the frames
            (root / "frames").write_bytes(b"decoded")
            assert not left.exists() and running.is_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == [running.name]
    finally:
        live.kill()
    with tag.cache_root(tmp_path / "kept") as root:
        assert root == tmp_path / "kept"


def test_tag_with_a_full_disk_under_its_frames_says_so_in_one_line(bench, tmp_path, monkeypatch):
    """A full temporary folder (often a small /tmp) ended in a raw OSError traceback; eval.run said it in a line."""
    import errno
    import tempfile

    from eval import tag

    root, layouts, w = bench
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tag, "embed_folder", full)
    common = {"model": str(TINY_CLIP), "weights": str(w["teacher"]), "device": "cpu", "labels": "a,b"}
    with pytest.raises(SystemExit) as e:
        tag.main(str(layouts["msrvtt"] / "videos"), **common)
    assert str(e.value.code) == (
        f"error: writing the temporary frame cache in {tmp_path} failed: [Errno 28] No space left on device. Free "
        "space on its disk (or raise the quota), or set TMPDIR to (or pass --cache) a folder on a disk with room"
    )
    assert list(tmp_path.iterdir()) == []  # the temporary cache is gone
    with pytest.raises(SystemExit) as e:
        tag.main(str(layouts["msrvtt"] / "videos"), cache=str(tmp_path / "kept"), **common)
    assert str(e.value.code).endswith("or pass --cache a folder on a disk with room")

    def quota(*args):  # not the frames: a download of the weights into the HF cache
        raise OSError(errno.EDQUOT, "Disk quota exceeded", "/home/u/.cache/huggingface/blobs/x")

    monkeypatch.setattr(tag, "embed_folder", quota)
    with pytest.raises(SystemExit) as e:
        tag.main(str(layouts["msrvtt"] / "videos"), **common)
    assert str(e.value.code).startswith("error: writing /home/u/.cache/huggingface/blobs/x failed: [Errno 122]")


def test_tag_labels_from_a_file_and_a_kept_cache(bench, tmp_path, capsys, monkeypatch):
    """--labels_file keeps each line's text (commas, 1.10); --cache serves a second run without decoding and decodes
    only a video added since; the results do not depend on the cache."""
    from eval import tag

    _, layouts, w = bench
    videos = tmp_path / "videos"
    videos.mkdir()
    for clip in sorted((layouts["msrvtt"] / "videos").glob("video*.mp4"))[:3]:
        (videos / clip.name).write_bytes(clip.read_bytes())
    names = tmp_path / "labels.txt"
    names.write_text("a red screen, bright\n\n  1.10  \nsnow\n", encoding="utf-8")
    common = {"model": str(TINY_CLIP), "weights": str(w["teacher"]), "device": "cpu", "workers": 1, "top": 3}
    runs = {}
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the uncached run's cache goes
    for run, cache in (("uncached", ""), ("first", tmp_path / "cache"), ("second", tmp_path / "cache")):
        out = tmp_path / f"{run}.csv"
        tag.main(str(videos), labels_file=str(names), out=str(out), cache=str(cache), batch_size=2, **common)
        runs[run] = (out.read_text(), capsys.readouterr().err)
    rows = list(csv.DictReader(io.StringIO(runs["first"][0])))
    assert {r["label"] for r in rows} == {"a red screen, bright", "1.10", "snow"} and len(rows) == 9
    assert runs["uncached"][0] == runs["first"][0] == runs["second"][0]
    assert "decoding tag" in runs["first"][1] and "decoding" not in runs["second"][1]
    assert not list((tmp_path / "tmp").iterdir())  # the uncached run's temporary cache is gone
    added = sorted((layouts["msrvtt"] / "videos").glob("video*.mp4"))[3]
    (videos / "sub").mkdir()
    (videos / "sub" / added.name).write_bytes(added.read_bytes())
    tag.main(str(videos), query="snow", out=str(tmp_path / "search.csv"), cache=str(tmp_path / "cache"), **common)
    assert "re-decoding 1 of 4 videos (1 new)" in capsys.readouterr().err
    assert len(list(csv.DictReader((tmp_path / "search.csv").open()))) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": "a,b", "labels_file": "LABELS"}, "give --labels or --labels_file, not both"),
        ({"labels_file": "EMPTY"}, "holds no labels: write one label per line"),
        ({"labels_file": "NOFILE"}, "cannot read it as UTF-8 text"),
        ({"labels": "a,b", "top": 0}, "--top must be a whole number of at least 1, got 0"),
        ({"query": "a dog", "workers": 1.5}, "--workers must be a whole number"),
        ({"query": "a dog", "decode_timeout": "abc"}, "--decode_timeout must be a number from 0 to 86400, got 'abc'"),
        ({"query": "a dog", "progress": "no"}, "--progress must be True or False, got 'no'"),
        ({"labels": "a", "weights": "nope.pt"}, "nope.pt"),
        ({"labels": "a", "cache": "LABELS/cache"}, "cannot make that folder"),
        ({"labels": "a", "out": "NOFILE/tags.csv"}, "give a file name in an existing folder"),
        ({"labels": "a", "out": "FOLDER"}, "is a folder; give the CSV file to write (e.g. "),
        ({"labels": "a", "weights": ""}, "--weights is empty; give an open_clip pretrained tag"),  # random weights
    ],
)
def test_tag_bad_input_fails_before_decoding(bench, tmp_path, kwargs, message):
    from eval import tag

    _, layouts, w = bench
    files = {"LABELS": tmp_path / "labels.txt", "EMPTY": tmp_path / "empty.txt", "NOFILE": tmp_path / "none.txt"}
    files["LABELS"].write_text("a\n")
    files["EMPTY"].write_text("\n \n")
    files["FOLDER"] = tmp_path
    for name, path in files.items():  # a path inside another, e.g. a folder under a file
        kwargs = {k: v.replace(f"{name}/", f"{path}/") if isinstance(v, str) else v for k, v in kwargs.items()}
    kwargs = {k: str(files[v]) if v in files else v for k, v in kwargs.items()}
    kwargs = {
        "model": str(TINY_CLIP),
        "weights": str(w["teacher"]),
        "device": "cpu",
        "cache": str(tmp_path / "cache"),
        **kwargs,
    }
    with pytest.raises(SystemExit) as e:
        tag.main(str(layouts["msrvtt"] / "videos"), **kwargs)
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)
    assert not (tmp_path / "cache").exists()  # nothing decoded


def test_tag_names_every_problem_in_one_line(bench, tmp_path):
    """As eval.run does: the labels, the folder, the counts, the device and the weights in one error line."""
    from eval import tag

    _, _, w = bench
    wrong = {"labels": "a", "query": "a dog", "top": 0, "device": "gpu", "weights": str(tmp_path / "nope.pt")}
    with pytest.raises(SystemExit) as e:
        tag.main(str(tmp_path / "no_videos"), model=str(TINY_CLIP), **wrong)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    said = ("--videos ", "give either --labels", "--top must be", "--device must be", "nope.pt")
    assert all(part in message for part in said), message


def test_tag_warns_when_fire_read_a_label_as_a_number(bench, tmp_path, capsys):
    from eval import tag

    _, layouts, w = bench
    common = {"model": str(TINY_CLIP), "weights": str(w["teacher"]), "device": "cpu", "workers": 1}
    tag.main(str(layouts["msrvtt"] / "videos"), labels=(1.1, 2, "snow"), out=str(tmp_path / "t.csv"), **common)
    err = capsys.readouterr().err
    assert "warning: --labels 1.1 reached us as number(s)" in err and "--labels_file" in err
    assert {r["label"] for r in csv.DictReader((tmp_path / "t.csv").open())} == {"1.1", "2", "snow"}
    tag.main(str(layouts["msrvtt"] / "videos"), query=1.1, out=str(tmp_path / "q.csv"), **common)  # --query 1.10
    assert "warning: --query 1.1 reached us as number(s)" in capsys.readouterr().err  # it searched in silence


def test_tag_batch_sizes_follow_the_device():
    from eval import tag

    assert tag.batch_sizes(0, torch.device("cpu")) == tag.CPU_BATCHES == (1, 64)
    assert tag.batch_sizes(0, torch.device("cuda")) == (64, 64)
    assert tag.batch_sizes(5, torch.device("cpu")) == (5, 5)


def test_a_fused_entry_splits_teacher_and_student_whose_paths_hold_colons(tmp_path):
    """An --alpha_sweep over a teacher file in a folder named with a colon (a timestamp, say) took the teacher to
    end at that colon: 'weights file not found', after the other models were scored."""
    from eval.run import parse_fuse

    folder = tmp_path / "2026-11-27T10:00"
    (folder / "run").mkdir(parents=True)
    teacher, student = folder / "teacher.pt", folder / "run" / "best.pt"
    teacher.write_bytes(b"")
    student.write_bytes(b"")
    assert parse_fuse(f"fuse:{teacher}:{student}:0.4") == (str(teacher), str(student), 0.4)
    assert parse_fuse(f"fuse:openai:{student}:1") == ("openai", str(student), 1.0)
    assert parse_fuse("fuse:openai:runs/x/best.pt:0.4") == ("openai", "runs/x/best.pt", 0.4)  # no file: first colon


def test_wandb_that_cannot_reach_its_server_ends_in_one_line_after_the_results_are_written(
    bench, tmp_path, monkeypatch
):
    from eval import run

    root, _, w = bench
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    out = tmp_path / "o"
    monkeypatch.setattr(run, "run", lambda *a: [])  # the scoring is tested elsewhere: only the logging here
    with pytest.raises(SystemExit) as e:
        run.main(
            model=str(TINY_CLIP),
            weights=str(w["teacher"]),
            data_root=str(root / "data"),
            out=str(out),
            datasets="msrvtt",
            wandb="online",
        )
    assert str(e.value.code).startswith("error: --wandb online: logging to W&B failed (CommError: ")
    assert str(e.value.code).endswith(
        f"the results are in {out} (summary.md); rerun with --wandb offline to keep a W&B run to upload later"
    )


def test_a_full_disk_ends_the_run_in_one_line(bench, tmp_path, monkeypatch):
    """A write that fails (the frame cache, a record) on a full disk was a traceback."""
    import errno

    from eval import run

    root, _, w = bench

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run, "run", full)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        run.main(model=str(TINY_CLIP), weights=str(w["teacher"]), data_root=str(root / "data"), out=str(out))
    assert str(e.value.code) == (
        f"error: writing {out} (or the frame cache, {out / 'cache'}) failed: [Errno 28] No space left on device. "
        "Free space on its disk (or raise the quota); the records scored so far are kept, and the frame cache keeps "
        "the datasets it had finished decoding"
    )

    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(run, "run", broken)  # not a want of room: the error as it is, not a fix that does not apply
    with pytest.raises(OSError, match="Input/output error"):
        run.main(model=str(TINY_CLIP), weights=str(w["teacher"]), data_root=str(root / "data"), out=str(out))


def test_a_dataset_with_no_video_found_is_named_and_with_none_found_the_run_fails(bench, tmp_path):
    """Annotation files in place but the video folder elsewhere: every metric was empty, and the run exited 0."""
    from eval import run

    root, layouts, w = bench
    data = tmp_path / "data"
    for name in ("ucf101", "msrvtt"):
        shutil.copytree(layouts[name], data / name)
    shutil.rmtree(data / "ucf101" / "UCF-101")
    common = dict(model=str(TINY_CLIP), weights=str(w["teacher"]), names="T", data_root=str(data), workers=1)
    proc = run_cli(
        "eval.run",
        *[f"--{k}={v}" for k, v in common.items()],
        "--datasets=ucf101,msrvtt",
        f"--out={tmp_path / 'o'}",
        timeout=300,
    )
    assert "warning: ucf101: none of its" in proc.stderr and "check --data_root or --ucf101_root" in proc.stderr
    assert "warning: msrvtt" not in proc.stderr
    with pytest.raises(SystemExit) as e:
        run.main(**common, datasets="ucf101", out=str(tmp_path / "p"))
    assert str(e.value.code) == "error: no video of ucf101 was found or decoded (see above)"


def test_decode_timeout_reaches_the_frame_cache_of_eval_run_and_eval_tag(bench, tmp_path, capsys):
    """--decode_timeout is the limit each video's decoding gets (1 microsecond here: no video makes it)."""
    from eval import run, tag

    root, layouts, w = bench
    common = dict(model=str(TINY_CLIP), weights=str(w["teacher"]), workers=1, decode_timeout=1e-06)
    with pytest.raises(SystemExit) as e:
        run.main(**common, data_root=str(root / "data"), datasets="ucf101", out=str(tmp_path / "o"), progress=False)
    assert str(e.value.code) == "error: no video of ucf101 was found or decoded (see above)"
    err = capsys.readouterr().err
    assert "decoding ucf101" not in err  # --progress False: no bar (eval.tag's below has one)
    assert "frame cache ucf101: " in err and " video(s) ran past their decode time limit " in err
    assert "more than 1e-06 s); give --decode_timeout more seconds (0: no limit)" in err
    assert "ran past --decode_timeout: give it more seconds (0 for no limit)" in err  # the warning of no video
    manifest = json.loads(next((tmp_path / "o" / "cache").glob("ucf101-*/manifest.json")).read_text())
    reasons = {r.split(":")[0] for r in manifest["missing"].values()}
    assert reasons == {"decode_timeout", "missing_file"}  # the fixture's one absent video is still just absent
    with pytest.raises(SystemExit) as e:
        tag.main(str(layouts["msrvtt"] / "videos"), query="a dog", device="cpu", **common)
    assert "could be read" in str(e.value.code)
    err = capsys.readouterr().err
    assert "warning: skipped unreadable " in err and ": decode_timeout: decoding its 4 frames took more than" in err
    assert "decoding tag: " in err


def test_tag_names_the_files_it_leaves_out_and_keeps_a_label_given_twice_once(bench, tmp_path, capsys):
    """Files of other extensions were left out without a word (.flv and .ogv among them), and a label given twice
    split its probability between its copies."""
    from eval import tag

    _, layouts, w = bench
    folder = tmp_path / "videos"
    shutil.copytree(layouts["msrvtt"] / "videos", folder)
    first = sorted(folder.glob("video*.mp4"))[0]
    shutil.copy(first, folder / "flash.flv")  # the container is read by its content: an .flv extension is a video
    (folder / "notes.txt").write_text("x")
    (folder / "README").write_text("x")
    (folder / ".clip.mp4.tmp-0123").write_bytes(b"")  # hidden: another run's, neither taken nor counted
    out = tmp_path / "tags.csv"
    tag.main(str(folder), labels="red,blue,red", top=3, out=str(out), model=str(TINY_CLIP), weights=str(w["teacher"]))
    err = capsys.readouterr().err
    assert "warning: label(s) red given more than once: each is kept once" in err
    assert (
        f"note: left out 2 file(s) under {folder} that are not videos by their extension (.txt 1, no extension 1)"
        in err
    )
    rows = list(csv.DictReader(out.open()))
    assert "flash.flv" in {Path(r["video"]).name for r in rows}
    assert sorted(r["label"] for r in rows if Path(r["video"]).name == "flash.flv") == ["blue", "red"]


@pytest.mark.parametrize("name", ["ucf101", "msrvtt", "youcook2"])
def test_scores_match_a_reference_built_one_video_and_one_text_at_a_time(bench, tmp_path, monkeypatch, name):
    """The scores the metrics are computed from (and the labels), against scores built here from the cached
    frames, one item at a time: each video's frames through the image tower, each class's templates averaged, each
    query's own text. Texts matched to the wrong videos, class labels off by one, or one template in place of
    their mean all left the 0-100 range checks alone (the metrics are tested against brute force elsewhere)."""
    import torch.nn.functional as F

    from eval import run
    from eval.datasets import DATASETS
    from eval.features import iter_frames
    from train.data import EvalTransform
    from train.model import image_size, normalize_frames, tokenizer_for

    root, layouts, w = bench
    cfg = run.EvalConfig(model=str(TINY_CLIP), data_root=str(root / "data"), out=str(tmp_path), batch_size=3, workers=1)
    dataset = DATASETS[name](layouts[name])
    cache = run.build_cache(dataset, tmp_path / "cache", run.cache_settings(cfg.model, cfg.frames), 1)
    clip = run.load_model(cfg.model, str(w["student"]), torch.device("cpu"))
    tokenizer = tokenizer_for(cfg.model)
    scored = {}
    for metrics in ("classification_metrics", "retrieval_metrics"):
        real = getattr(run, metrics)
        monkeypatch.setattr(run, metrics, lambda *args, real=real: scored.setdefault("args", args) and real(*args))
    record = run.evaluate(clip, tokenizer, dataset, cache, cfg, torch.device("cpu"))

    found = [item for item in dataset.items if item.id in cache.found]
    transform = EvalTransform(image_size(clip))
    with torch.no_grad():

        def text(s: str) -> torch.Tensor:
            return F.normalize(clip.encode_text(tokenizer([s])), dim=-1)[0]

        videos = []
        for item in found:
            ((_, images),) = iter_frames(cache, [item.id], cfg.frames)
            per_frame = F.normalize(clip.encode_image(normalize_frames(transform(images))), dim=-1)  # (T, D)
            videos.append(F.normalize(per_frame.mean(dim=0), dim=-1))
        video = torch.stack(videos)
        if dataset.task == run.CLASSIFICATION:
            assert len(dataset.templates) > 1  # so that their mean is seen
            classes = torch.stack(
                [
                    torch.stack([text(t.replace("{}", c)) for t in dataset.templates]).mean(dim=0)
                    for c in dataset.classes
                ]
            )
            expected = (video @ classes.T, torch.tensor([i.label for i in found]))
        else:
            expected = (torch.stack([text(i.text) for i in found]) @ video.T,)
    assert record["num_found"] == len(found) > 2 and record["metrics"]
    got = scored["args"]
    assert len(got) == len(expected) and torch.allclose(got[0], expected[0], atol=1e-5)
    assert len(expected) == 1 or torch.equal(got[1], expected[1])


def test_precision_chooses_bf16_autocast_or_fp32_and_the_record_says_which_ran(bench, tmp_path, monkeypatch):
    """Evaluation ran under bf16 autocast on every GPU, while the authors' evaluation, which the README said its
    flags reproduce, ran fp32. auto keeps bf16 on CUDA and fp32 elsewhere; the record names what ran."""
    from eval import run
    from eval.datasets import DATASETS

    root, layouts, w = bench
    cfg = run.EvalConfig(model=str(TINY_CLIP), data_root=str(root / "data"), out=str(tmp_path), batch_size=3, workers=1)
    dataset = DATASETS["msrvtt"](layouts["msrvtt"])
    cache = run.build_cache(dataset, tmp_path / "cache", run.cache_settings(cfg.model, cfg.frames), 1)
    clip = run.load_model(cfg.model, str(w["student"]), torch.device("cpu"))
    scores = {}
    real = run.retrieval_metrics
    for precision in ("auto", "fp32", "bf16"):
        monkeypatch.setattr(run, "retrieval_metrics", lambda s, p=precision: scores.setdefault(p, s) is s and real(s))
        record = run.evaluate(
            clip, run.tokenizer_for(cfg.model), dataset, cache, replace(cfg, precision=precision), torch.device("cpu")
        )
        assert record["precision"] == ("fp32" if precision == "auto" else precision)  # auto on the CPU: fp32
    assert torch.equal(scores["auto"], scores["fp32"])
    assert not torch.equal(scores["bf16"], scores["fp32"])
    assert torch.allclose(scores["bf16"], scores["fp32"], atol=0.05)
    from eval.features import eval_precision

    assert (
        eval_precision(torch.device("cuda"), "auto") == "bf16"
        and eval_precision(torch.device("cuda"), "fp32") == "fp32"
    )


def test_tag_a_video_whose_file_name_is_not_utf8(bench, tmp_path):
    """``caf\\xe9.mp4`` (a Latin-1 name) stopped eval.tag with a UnicodeEncodeError where the frame cache's record
    was written, after the decoding; the CSV names it as JSON does, escaped."""
    root, layouts, w = bench
    folder = tmp_path / "videos"
    folder.mkdir()
    source = next((layouts["msrvtt"] / "videos").iterdir())
    os.link(source, os.fsencode(folder) + b"/caf\xe9.mp4")
    out = tmp_path / "tags.csv"
    proc = run_tag(folder, w["teacher"], out, "--labels", "red,green", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert {r["video"] for r in csv.DictReader(out.open(encoding="utf-8"))} == {str(folder / "caf\\udce9.mp4")}


def test_tag_finds_the_videos_of_a_linked_folder_once(tmp_path):
    """``Path.rglob`` (Python 3.11) does not follow links to folders: a folder of links to others was tagged without
    their videos, and nothing said so. A link back up is walked once."""
    from eval.tag import find_videos

    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "a.mp4").write_bytes(b"")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.MP4").write_bytes(b"")
    (tmp_path / "other" / "notes.txt").write_text("x")
    (tmp_path / "own" / "more").symlink_to(tmp_path / "other")
    (tmp_path / "own" / "again").symlink_to(tmp_path / "other")
    (tmp_path / "own" / "loop").symlink_to(tmp_path / "own")
    videos, others = find_videos(tmp_path / "own")
    assert [p.name for p in videos] == ["a.mp4", "b.MP4"] and others == {".txt": 1}
