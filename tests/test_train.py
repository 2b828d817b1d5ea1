"""The trainer: config, a full CPU run in process, torchrun with 2 gloo ranks, resume, skipped steps, W&B offline."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import REPO, TINY_CLIP, kill_tree, run_cli, signal_job

from train import checkpoint, loop
from train.config import TrainConfig, paper, reference, resolve
from train.fuse import fuse_state_dicts
from train.model import load_state_dict
from train.prefetch import Prefetcher


def tiny_run(shards: dict[str, Path], out: Path) -> dict:
    """The settings of a tiny run (demo recipe, tiny model, 4 steps), shared by the in-process and CLI tests."""
    return dict(
        model=str(TINY_CLIP),
        teacher_weights="",
        labeled=str(shards["labeled"]),
        unlabeled=str(shards["unlabeled"]),
        val=str(shards["val"]),
        out=str(out),
        steps=4,
        val_every=2,
        log_every=2,
        batch_labeled=4,
        batch_unlabeled=4,
        val_batch=4,
        wandb="off",
        progress=False,
    )


def tiny_config(shards: dict[str, Path], out: Path, **overrides) -> TrainConfig:
    return resolve("demo", **{**tiny_run(shards, out), "workers": 0, **overrides})


def cli_args(shards: dict[str, Path], out: Path, **overrides) -> list[str]:
    values = {"recipe": "demo", **tiny_run(shards, out), "workers": 1, **overrides}
    args = []
    for key, value in values.items():
        args += [f"--{key}", str(value)]
    return args


def test_recipes_hold_the_stated_hyper_parameters():
    p, r = paper(), reference()
    assert (p.sigma, p.lam, p.lr, p.distillation, p.alpha, p.frames) == (0.05, 1e-4, 3e-5, "ce", 0.4, 4)
    assert (r.sigma, r.lam, r.lr, r.distillation, r.weight_decay) == (0.015, 1e-4, 3e-6, "kl", 0.01)
    assert (r.batch_labeled, r.batch_unlabeled, r.precision, r.renormalize_video) == (8, 8, "fp32", False)
    assert resolve("reference", lr=1e-5).lr == 1e-5  # every hyper-parameter is a flag
    with pytest.raises(ValueError, match="unknown flag.*--nope.*valid flags"):
        resolve("paper", nope=1)
    with pytest.raises(ValueError, match="--sigma"):
        resolve("paper", sigma=0)
    with pytest.raises(ValueError, match="--recipe"):
        resolve("fancy")
    # an unknown recipe hid every other problem; the flags are checked against the paper's then
    with pytest.raises(ValueError) as e:
        resolve("papr", step=3, lr="abc", steps=0)
    said = str(e.value).split("; ")
    assert said[0] == "--recipe must be one of paper, reference, demo, got 'papr'"
    assert said[1] == "unknown flag(s) --step (did you mean --steps?)" and said[2].startswith("valid flags: --alpha ")
    assert said[3:] == [
        "--lr must be a number of at least 0, got 'abc'",
        "--steps must be a whole number of at least 1, got 0",
    ]


def test_help_lists_every_flag_with_what_it_does():
    """main takes **flags (an unknown flag then fails with the list of valid ones), so fire would hand --help to it
    as a flag; the CLI turns it (and -h) into fire's help. Each flag's line says what it does, from its config
    comment."""
    from train.main import _command

    assert _command(["--steps", "3", "-h"]) == _command(["--help"]) == ["--", "--help"]
    assert _command(["--steps", "3"]) == ["--steps", "3"]
    proc = run_cli("train.main", "--help")
    shown = proc.stdout + proc.stderr  # fire writes its help to stderr when not on a terminal
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name}=" in shown
    described = re.findall(r"^ {8}(\S.*)$", shown, flags=re.M)  # each flag's lines: type, default, text
    texts = [line for line in described if not line.startswith(("Type:", "Default:"))]
    assert len(texts) == len(dataclasses.fields(TrainConfig))
    assert not any(t.startswith("(by recipe") for t in texts)  # none without a description
    assert any(t.startswith("cut each batch's captions after its longest one") for t in texts)  # a comment above
    assert "Additional flags" not in shown  # an unknown flag is refused (below)
    # each default shown is the default recipe's (paper); where the recipes differ, the text gives each one's value
    defaults = dict(re.findall(r"^ {4}(?:-\w, )?--(\w+)=\w+\n {8}Type: .*\n {8}Default: (.*)$", shown, flags=re.M))
    paper = resolve("paper")
    assert defaults == {f.name: repr(getattr(paper, f.name)) for f in dataclasses.fields(TrainConfig)}
    assert "(by recipe: paper 0.05, reference 0.015, demo 0.05)" in shown  # --sigma
    # sigma, lam, distillation, renormalize_video, lr, steps, precision, val_every, val_batch, device, workers,
    # log_every and wandb; the other 36 fields (recipe aside) are the same in every recipe
    assert shown.count("(by recipe: ") == 13


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"lr": "abc"}, "--lr must be a number of at least 0, got 'abc'"),  # fire hands a word over as a str
        ({"lr": -1e-5}, "--lr must be a number of at least 0, got -1e-05"),
        ({"sigma": 0}, "--sigma must be a number greater than 0, got 0"),
        ({"weight_decay": -1}, "--weight_decay must be a number of at least 0, got -1"),
        ({"grad_clip": "abc"}, "--grad_clip must be a number of at least 0, got 'abc'"),
        ({"peak_tflops": "abc"}, "--peak_tflops must be a number of at least 0, got 'abc'"),
        ({"lam": 2}, "--lam must be a number from 0 to 1, got 2"),
        ({"stuck_after": -1}, "--stuck_after must be a number from 0 to 3600, got -1"),
        ({"betas": 0.9}, "--betas must be two numbers separated by a comma, got 0.9"),  # one number, not a pair
        ({"betas": (1.5, 0.9)}, "--betas must be two numbers in [0, 1) (e.g. 0.9,0.999), got (1.5, 0.9)"),
        ({"crop_scale": (0.5, "abc")}, "--crop_scale must be two numbers separated by a comma, got (0.5, 'abc')"),
        ({"crop_scale": (0.5, 2)}, "--crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got (0.5, 2.0)"),
        ({"warmup_steps": "abc"}, "--warmup_steps must be a whole number of at least 0, got 'abc'"),
        ({"seed": 1.5}, "--seed must be a whole number of at least 0, got 1.5"),
        ({"device": "cuda"}, "--device cuda, but no CUDA GPU is visible to torch; pass --device cpu or auto"),
        ({"val": True}, "--val needs a value (fire reads a bare --val as True)"),  # was a TypeError traceback
        (
            {"run_name": 1.5},
            "--run_name 1.5 reached us as a number, not as the text typed; quote it twice (--run_name \"'...'\")",
        ),
    ],
)
def test_bad_numbers_and_devices_are_refused_in_one_line_before_work(
    flags, message, train_shards, tmp_path, monkeypatch
):
    """Each as fire hands it over: one error line naming the flag (no traceback from a comparison or from AdamW), and
    no run folder made."""
    from train import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    with pytest.raises(SystemExit) as e:
        main.main(recipe="demo", **{**tiny_run(train_shards, tmp_path / "run"), **flags})
    assert str(e.value) == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_a_number_given_for_a_text_flag_is_the_text_typed():
    """fire hands --out 2024 over as the int 2024 (it failed with a TypeError traceback in Path): given back as the
    text typed. It also reads 2024_06_01 as 20240601 and 0x1F as 31, which are not: refused, with the fix."""
    from train.main import typed_texts

    argv = ["--out", "2024", "--run_name=7", "--steps", "10", "--val", "2024_06_01", "--resume", "0x1F"]
    flags = {"out": 2024, "run_name": 7, "steps": 10, "val": 20240601, "resume": 31}
    assert typed_texts(flags, argv) == {"out": "2024", "run_name": "7", "steps": 10, "val": 20240601, "resume": 31}
    with pytest.raises(ValueError) as e:
        resolve("demo", val=20240601)
    assert (
        str(e.value) == "--val 20240601 reached us as a number, not as the text typed; quote it twice (--val \"'...'\")"
    )


def test_cli_rejects_bad_input_before_work(tmp_path):
    proc = run_cli("train.main", "--nope", "1", check=False)
    assert proc.returncode != 0 and "unknown flag" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(
        "train.main",
        "--recipe",
        "demo",
        "--model",
        TINY_CLIP,
        "--teacher_weights",
        "",
        "--labeled",
        tmp_path / "none",
        "--unlabeled",
        tmp_path / "none",
        "--out",
        tmp_path / "run",
        "--wandb",
        "off",
        check=False,
    )
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "pipeline" in proc.stderr


def test_a_bad_model_or_teacher_is_refused_before_any_model_is_built(train_shards, tmp_path):
    from train.main import main

    (tmp_path / "notes.pt").write_text("not weights")
    (tmp_path / "broken.json").write_text('{"embed_dim": ')
    (tmp_path / "empty.json").write_text("{}")  # open_clip skips it in silence: the run failed after its start
    for flags, message in (
        ({"model": "ViT-B-16-typo"}, "neither an open_clip model name, a .json config nor one of ours"),
        ({"model": str(tmp_path / "broken.json")}, "not a valid model-config JSON"),
        ({"teacher_weights": str(tmp_path / "runs" / "best.pt")}, "weights file not found"),
        ({"teacher_weights": "openai_typo"}, "neither a weights file nor a pretrained tag of tiny-clip"),
        ({"teacher_weights": str(tmp_path / "notes.pt")}, "not a state dict torch can load"),
        ({"frames": 8}, "--frames 8: the samples in"),  # used to drop every sample and hang
        ({"frames": 2}, "hold 4 frames, the midpoints of 4 segments"),  # used to train on each clip's first half
        ({"out": str(REPO / "README.md")}, "README.md is a file; give a folder"),  # was a bare "[Errno 17]"
        ({"crop": 24}, "--crop 24: " + str(TINY_CLIP) + " takes 32x32 frames"),  # used to fail at the first forward
        ({"val_max": -1}, "--val_max must be a whole number of at least 0"),
        ({"workers": -1}, "--workers must be a whole number of at least 0"),
        ({"val_batch": 1}, "--val_batch must be a whole number of at least 2, got 1"),  # every validation scored 0
        ({"model": str(tmp_path / "empty.json")}, "not an open_clip model config: it lacks embed_dim, vision_cfg"),
    ):
        out = tmp_path / "run"
        with pytest.raises(SystemExit) as e:
            main("demo", **{**tiny_run(train_shards, out), **flags})
        assert message in str(e.value.code), (flags, e.value.code)
        assert not out.exists(), flags


def test_every_wrong_flag_is_named_in_one_refusal(train_shards, tmp_path, monkeypatch):
    """The checks of the model, device, --out, --wandb, the shard folders, the weights and --resume waited for the
    config's to pass: --lr -1 --wandb online named --lr only, and each relaunch failed on the next problem."""
    from train.main import checked, main

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    flags = {**tiny_run(train_shards, tmp_path / "run"), "lr": -1, "wandb": "online", "crop": 24}
    flags.update(unlabeled=str(tmp_path / "nope"), out=str(REPO / "README.md"), labeled="")
    with pytest.raises(SystemExit) as e:
        main("demo", **flags)
    message = str(e.value.code)
    assert message.startswith("error: --lr must be a number of at least 0") and message.count("\n") == 0
    for part in ("--crop 24: ", "README.md is a file", "--wandb online: no W&B", "--labeled is missing", "nope"):
        assert part in message, part
    flags = {**tiny_run(train_shards, tmp_path / "run"), "teacher_weights": str(tmp_path / "x.pt"), "frames": 2}
    inputs = ("hold 4 frames", "not found: " + str(tmp_path / "x.pt"), "y.pt: no")
    with pytest.raises(SystemExit) as e:  # with a valid config: the inputs' problems, all of them
        main("demo", **{**flags, "resume": str(tmp_path / "y.pt")})
    assert all(p in str(e.value.code) for p in inputs)
    with pytest.raises(SystemExit) as e:  # and with a refused one: the weights and --resume did wait for it
        main("demo", **{**flags, "resume": str(tmp_path / "y.pt"), "lr": -1})
    assert all(p in str(e.value.code) for p in ("--lr must be", *inputs)), e.value.code
    assert not (tmp_path / "run").exists()
    # each wrong flag once: a bare choice flag, a crop or frame count out of range, an unhashable --recipe
    for bad, said in (
        ({"device": True}, ["--device must be one of auto, cuda, cpu, got True"]),
        ({"crop": -5}, ["--crop must be a whole number of at least 0, got -5"]),
        ({"frames": -1}, ["--frames must be a whole number of at least 1, got -1"]),
        (
            {"labeled": 0},
            ["--labeled 0 reached us as a number, not as the text typed; quote it twice (--labeled \"'...'\")"],
        ),
    ):
        _, problems = checked("demo", {**tiny_run(train_shards, tmp_path / "run"), **bad})
        assert problems == said, (bad, problems)
    _, problems = checked(["paper"], tiny_run(train_shards, tmp_path / "run"))  # it was a TypeError traceback
    assert problems == ["--recipe must be one of paper, reference, demo, got ['paper']"]


def test_a_damaged_labeled_or_validation_tar_is_skipped_not_fatal(train_shards, tmp_path, caplog):
    """A tar cut short in --labeled stopped the run at its start, in --val at its first validation (with nothing
    saved), with tarfile's traceback. Its samples before the cut are used, the rest skipped with a warning."""
    shards = dict(train_shards)
    for name in ("labeled", "val"):
        shards[name] = tmp_path / name
        shutil.copytree(train_shards[name], shards[name])
        tar = shards[name] / "000001.tar"
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    summary = loop.run(tiny_config(shards, tmp_path / "run", steps=2, val_every=2))
    assert summary["steps"] == 2 and 0 < summary["last_val"]["videos"] < 8
    assert (tmp_path / "run" / checkpoint.LATEST).is_file()
    warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage() or "cut short" in r.getMessage()]
    assert any(str(shards["val"] / "000001.tar") in m for m in warned), warned
    assert any(str(shards["labeled"] / "000001.tar") in m for m in warned), warned


def test_the_validation_loader_forks_its_workers_once_per_run(train_shards, tmp_path, monkeypatch, recwarn):
    """A loader made at each validation forked its workers mid-run; one such fork, made while a thread was ending,
    deadlocked the new worker in CPython's fork handling and hung a torchrun job. The run makes one, at its start,
    whose workers persist, and every validation is still a whole pass in file order."""
    from train import data

    made, forked = [], []
    stream = data.validation_stream
    monkeypatch.setattr(data, "validation_stream", lambda *a, **k: made.append(1) or stream(*a, **k))
    start = torch.utils.data.dataloader._MultiProcessingDataLoaderIter.__init__

    def counted(self, loader):
        forked.append(loader.num_workers)
        start(self, loader)

    monkeypatch.setattr(torch.utils.data.dataloader._MultiProcessingDataLoaderIter, "__init__", counted)
    summary = loop.run(tiny_config(train_shards, tmp_path / "run", steps=4, val_every=1, workers=1))
    assert len(made) == 1 and summary["last_val"]["videos"] == 8
    assert forked == [1, 1, 1]  # the validation loader's worker, then the two training loaders': no more
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]  # validation records no graph


def test_validation_scores_the_videos_in_file_order_whatever_the_workers(train_shards, tmp_path):
    """Against the loss and R@k of embeddings computed one video at a time, in the order of the validation shards:
    with 0 loader workers and with 2 (whose batches arrive interleaved, and are put back in order)."""
    from eval.metrics import retrieval_metrics
    from pipeline.writer import iter_tar_samples
    from train import data, distributed
    from train.model import image_size, tokenizer_for

    cfg = tiny_config(train_shards, tmp_path / "run", val_batch=3)
    models = loop.build_models(cfg, distributed.init_distributed("cpu"))
    tokenizer = tokenizer_for(cfg.model)
    transform = data.EvalTransform(image_size(models.student.clip))
    videos, texts = [], []
    with torch.no_grad():
        for key, members in (s for url in data.list_shards(cfg.val) for s in iter_tar_samples(url)):  # file order
            decoded = data.decode_sample({"__key__": key, **dict(members)}, cfg.frames, transform)
            v, t = models.student(decoded["video"][None], tokenizer([decoded["text"]]))
            videos.append(v)
            texts.append(t)
    video, text = torch.cat(videos), torch.cat(texts)
    expected = {"loss": loop.validation_loss(video, text, 3, cfg.sigma), "videos": 8}
    expected.update(retrieval_metrics(text @ video.T))
    for workers in (0, 2):
        loader = data.loader(
            data.validation_stream(cfg.val, cfg.frames, transform, tokenizer, cfg.val_batch), workers, False, 0
        )
        got = loop.validate(models.student, dataclasses.replace(cfg, workers=workers), torch.device("cpu"), loader)
        assert got.keys() == expected.keys() and got["videos"] == 8
        assert all(got[k] == pytest.approx(expected[k], rel=1e-4, abs=1e-4) for k in expected), (workers, got)


def test_a_run_writes_checkpoints_and_a_fused_open_clip_model(train_shards, tmp_path):
    out = tmp_path / "run"
    summary = loop.run(tiny_config(train_shards, out))
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert summary["last_val"]["videos"] == 8 and 0 <= summary["last_val"]["R@1"] <= 100

    latest = torch.load(out / checkpoint.LATEST, weights_only=True)
    assert latest["step"] == 4
    assert latest["config"]["recipe"] == "demo" and latest["config"]["steps"] == 4
    assert {"student", "optimizer", "scheduler", "best_val_loss"} <= set(latest)
    best = torch.load(out / checkpoint.BEST, weights_only=True)
    assert best["val"]["loss"] == pytest.approx(summary["best_val_loss"])
    assert json.loads((out / "config.json").read_text())["model"] == str(TINY_CLIP)

    # the student moved away from the teacher
    teacher = load_state_dict(out / "teacher_init.pt")
    student = best["student"]
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    # fitclip.pt = 0.6 * teacher + 0.4 * student, a plain open_clip state dict
    fused = torch.load(out / checkpoint.FUSED, weights_only=True)
    expected = fuse_state_dicts(teacher, student, 0.4)
    assert fused.keys() == teacher.keys()
    assert all(torch.allclose(fused[k], expected[k]) for k in fused)
    name = "tiny-clip"
    open_clip.add_model_config(str(TINY_CLIP))
    model = open_clip.create_model(name, pretrained=str(out / checkpoint.FUSED))
    assert all(torch.equal(v, fused[k]) for k, v in model.state_dict().items())

    with pytest.raises(FileExistsError, match="--resume auto"):
        loop.run(tiny_config(train_shards, out))


def test_fuse_clears_the_temporary_a_killed_fuse_left(tmp_path):
    """train.fuse writes a whole model under a temporary name: one left by a killed run goes on the next."""
    from pipeline.writer import temporary_name
    from train import fuse
    from train.model import create_clip

    weights = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        weights[name] = tmp_path / f"{name}.pt"
        torch.save(create_clip(str(TINY_CLIP)).state_dict(), weights[name])
    out = tmp_path / "fitclip.pt"
    left = temporary_name(out)
    left.write_bytes(b"half a model")
    old = time.time() - 60
    os.utime(left, (old, old))
    fuse.fuse(str(TINY_CLIP), str(weights["teacher"]), str(weights["student"]), 0.4, str(out))
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fitclip.pt", "student.pt", "teacher.pt"]
    assert torch.load(out, weights_only=True).keys() == torch.load(weights["teacher"], weights_only=True).keys()


@pytest.mark.parametrize("augment_on", ["device", "device_jpeg"])
def test_a_run_with_the_crop_on_the_device(train_shards, tmp_path, augment_on):
    """The GPU default (the workers only decode, or not even that) through real loader workers, on the CPU."""
    out = tmp_path / "run"
    cfg = tiny_config(train_shards, out, steps=2, fuse=False, workers=1, augment_on=augment_on)
    summary = loop.run(cfg)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0 and summary["dropped_samples"] == 0
    assert math.isfinite(summary["best_val_loss"])


def test_a_run_with_the_teacher_ahead_trains_the_same_weights(train_shards, tmp_path):
    """--teacher_stream ahead through a whole run: each unlabeled batch taken one step early, across a validation,
    and none after the last step (on the CPU the teacher runs on the one stream). It trains the same weights as
    off: with --workers 0 taking a batch early drew the next labeled crops from the global generator after the
    unlabeled ones, so the weights differed."""
    weights = {}
    for mode in ("off", "ahead"):
        cfg = tiny_config(train_shards, tmp_path / mode, steps=3, val_every=2, fuse=False, teacher_stream=mode)
        summary = loop.run(cfg)
        assert summary["steps"] == 3 and summary["dropped_samples"] == 0 and math.isfinite(summary["best_val_loss"])
        weights[mode] = torch.load(tmp_path / mode / "latest.pt", map_location="cpu", weights_only=False)["student"]
    assert weights["off"].keys() == weights["ahead"].keys()
    assert all(torch.equal(weights["off"][k], weights["ahead"][k]) for k in weights["off"])


def test_a_run_whose_prefetchers_prepare_in_a_thread_as_on_a_gpu(train_shards, tmp_path, monkeypatch):
    """The GPU's prefetch thread (on the CPU here) through a whole run: loader workers, validation forking its own
    while the thread lives (the trainer settles it first), and the thread stopped at the end."""
    made = []

    def threaded(batches, device, size):
        made.append(Prefetcher(batches, device, size, background=True))
        return made[-1]

    monkeypatch.setattr(loop, "Prefetcher", threaded)
    cfg = tiny_config(train_shards, tmp_path / "run", steps=4, val_every=2, fuse=False, workers=1)
    summary = loop.run(cfg)
    assert summary["steps"] == 4 and summary["dropped_samples"] == 0 and math.isfinite(summary["best_val_loss"])
    assert len(made) == 2 and all(p.pool is None for p in made)  # both threads stopped when the run ended


def test_resume_auto_continues_from_latest(train_shards, tmp_path, capsys):
    out = tmp_path / "run"
    loop.run(tiny_config(train_shards, out, steps=2, fuse=False))
    first = torch.load(out / checkpoint.LATEST, weights_only=True)
    capsys.readouterr()
    cfg = tiny_config(train_shards, out, steps=4, resume="auto", lr=2e-4, weight_decay=0.5)
    summary = loop.run(cfg)
    printed = capsys.readouterr().out.splitlines()
    note = next(line for line in printed if line.startswith("note: this run's flags"))
    assert all(f in note for f in ("--steps 2 -> 4", "--fuse False -> True", "--lr", "--weight_decay")), note
    # --progress False: the last step's metrics (a log window ends there) as a console line instead of the bar's
    logged = [line for line in printed if line.startswith("step 4: train loss ")]
    assert len(logged) == 1 and "contrastive " in logged[0] and "videos_per_s " in logged[0], printed
    assert "distillation " in logged[0]  # the README's sign of a healthy run, shown with --wandb off too
    assert summary["steps"] == 4
    resumed = torch.load(out / checkpoint.LATEST, weights_only=True)
    assert resumed["step"] == 4
    assert resumed["optimizer"]["state"][0]["step"] == first["optimizer"]["state"][0]["step"] + 2
    # the new --lr and --weight_decay are the ones used (load_state_dict used to bring back the checkpoint's)
    group = resumed["optimizer"]["param_groups"][0]
    factor = loop.build_optimizer(torch.nn.Linear(1, 1), cfg, torch.device("cpu"))[1].lr_lambdas[0]
    assert (
        (group["initial_lr"], group["weight_decay"])
        == (2e-4, 0.5)
        != (first["optimizer"]["param_groups"][0]["initial_lr"], first["optimizer"]["param_groups"][0]["weight_decay"])
    )
    assert group["lr"] == pytest.approx(2e-4 * factor(4)) and resumed["scheduler"]["base_lrs"] == [2e-4]


def test_each_rank_draws_its_own_crops(train_shards, monkeypatch):
    """The loader workers of rank 0 and rank 1 draw different crops; the same rank draws the same ones again."""
    from train import data
    from train.model import tokenizer_for

    transform = data.TrainTransform(32, (0.5, 1.0))

    def crops(rank: int) -> torch.Tensor:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = data.labeled_stream(
            train_shards["labeled"], 4, transform, tokenizer_for(str(TINY_CLIP)), 4, 0, "device"
        )
        return next(iter(data.loader(stream, 1, False, loop.loader_seed(0, 0, rank)))).crops

    assert torch.equal(crops(0), crops(0))
    assert not torch.equal(crops(0), crops(1))


def test_each_rank_draws_its_own_unlabeled_samples(train_shards, monkeypatch):
    """The unlabeled stream's shards and shuffle are seeded by rank: with one seed, every rank trained on the same
    unlabeled batches. The same rank draws the same ones again."""
    from train import data
    from train.model import tokenizer_for

    def keys(rank: int) -> list[list[str]]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = data.unlabeled_stream(
            train_shards["unlabeled"], 4, data.TrainTransform(32), tokenizer_for(str(TINY_CLIP)), 4, 0
        )
        return [b.keys for b in itertools.islice(iter(data.loader(stream, 0, False, 0)), 4)]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_learning_rate_warms_up_linearly_then_holds_or_follows_a_cosine(schedule):
    """Against the closed form (the test compared the schedule with itself): --warmup_steps 2, --steps 6; the
    cosine reaches 0 at the step after the last."""
    cfg = resolve("demo", labeled="l", unlabeled="u", out="o", lr=1e-3, warmup_steps=2, steps=6, schedule=schedule)
    optimizer, scheduler = loop.build_optimizer(torch.nn.Linear(2, 2), cfg, torch.device("cpu"))
    seen = []
    for _ in range(6):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    after = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)] if schedule == "cosine" else [1.0] * 4
    assert seen == pytest.approx([1e-3 * f for f in (0.5, 1.0, *after)], rel=1e-9)


@pytest.fixture
def labeled_keys(monkeypatch) -> list[list[str]]:
    """The keys of the labeled batch of each step that loop.train_step runs from now on, in order."""
    seen = []
    step = loop.train_step
    monkeypatch.setattr(
        loop,
        "train_step",
        lambda models, opt, sched, lab, *a: seen.append(lab.keys) or step(models, opt, sched, lab, *a),
    )
    return seen


@pytest.mark.parametrize("workers, resumed_workers", [(0, 2), (2, 0)])
def test_a_resumed_run_trains_on_the_labeled_batches_it_would_have_had(
    train_shards, tmp_path, labeled_keys, workers, resumed_workers
):
    """8 labeled samples in batches of 3: a run stopped after step 3 and resumed to step 6, with another number of
    loader workers, trains on the labeled batches a straight run has at steps 4-6 (it used to start a new pass with
    a new permutation, and then to go on exactly only with the same workers)."""
    seen = labeled_keys

    def run(out, steps, workers, **flags):
        seen.clear()
        flags = {"batch_labeled": 3, **flags}
        loop.run(tiny_config(train_shards, out, steps=steps, val_every=3, fuse=False, workers=workers, **flags))
        return list(seen)

    straight = run(tmp_path / "a", 6, workers)
    run(tmp_path / "b", 3, workers)
    state = checkpoint.load(tmp_path / "b" / "latest.pt")
    assert state.pop("labeled_seen") == 9
    assert run(tmp_path / "b", 6, resumed_workers, resume="auto") == straight[3:]
    (tmp_path / "c").mkdir()  # a checkpoint from before labeled_seen was saved: counted from its step
    torch.save(state, tmp_path / "c" / "old.pt")
    assert run(tmp_path / "c", 6, resumed_workers, resume=str(tmp_path / "c" / "old.pt")) == straight[3:]
    # with another --batch_labeled: counted with the checkpoint's batch of 3, not this run's 2 (its first batch is
    # the first 2 samples of step 4's)
    (tmp_path / "d").mkdir()
    torch.save(state, tmp_path / "d" / "old.pt")
    resumed = run(tmp_path / "d", 4, resumed_workers, resume=str(tmp_path / "d" / "old.pt"), batch_labeled=2)
    assert resumed == [straight[3][:2]]


def test_a_run_saved_before_the_passes_guard_goes_on_in_its_own_order(train_shards, tmp_path, labeled_keys):
    """A checkpoint without ``passes_guarded`` took its passes in plain permutations (train.passes): resumed inside
    a pass, it takes the rest of that pass as it began it, not the guarded order (which would take some samples of
    the pass twice and others not at all). A new run saves that it is guarded."""
    from train import data

    seen = labeled_keys
    loop.run(tiny_config(train_shards, tmp_path / "a", steps=3, val_every=3, fuse=False, batch_labeled=3))
    state = checkpoint.load(tmp_path / "a" / "latest.pt")
    assert state.pop("passes_guarded") is True and state["labeled_seen"] == 9
    (tmp_path / "b").mkdir()
    torch.save(state, tmp_path / "b" / "old.pt")
    seen.clear()
    cfg = tiny_config(train_shards, tmp_path / "b", steps=6, val_every=3, fuse=False, batch_labeled=3)
    loop.run(dataclasses.replace(cfg, resume=str(tmp_path / "b" / "old.pt")))

    def keys(guarded: bool) -> list[list[str]]:
        source = data.IndexedShards(data.list_shards(train_shards["labeled"]), seed=cfg.seed, guarded=guarded)
        taken = [s["__key__"] for s in itertools.islice(source(), 18)]  # one reader: the sequence itself
        return [taken[i : i + 3] for i in range(9, 18, 3)]

    assert seen == keys(guarded=False) != keys(guarded=True)  # pass 1 differs at places 9 and 11
    assert checkpoint.load(tmp_path / "b" / "latest.pt")["passes_guarded"] is False  # and goes on so


def test_a_run_resumed_into_another_folder_ends_with_its_own_best_and_fused_model(train_shards, tmp_path, capsys):
    """--resume A/latest.pt --out B: B has no best.pt, so A's best loss must not stand. With it (and a learning rate
    too small to improve on A), B never saved a best.pt and the run failed at the end: weights file not found."""
    first = tmp_path / "a"
    loop.run(tiny_config(train_shards, first, steps=2, fuse=False))
    second = tmp_path / "b"
    summary = loop.run(tiny_config(train_shards, second, steps=3, resume=str(first / checkpoint.LATEST), lr=1e-30))
    assert (second / checkpoint.BEST).is_file() and (second / checkpoint.FUSED).is_file()
    assert summary["best_val_loss"] == summary["last_val"]["loss"]
    capsys.readouterr()
    loop.run(tiny_config(train_shards, second, steps=2, resume="auto"))  # a checkpoint past --steps: say so
    assert "note: the checkpoint is at step 3, --steps is 2: nothing to train" in capsys.readouterr().out

    # into a third folder with nothing left to train: no validation there, no best.pt to fuse (it failed at the end,
    # "weights file not found"); refused before anything is built or written
    from train.main import main

    third = tmp_path / "c"
    with pytest.raises(SystemExit) as e:
        main("demo", **{**tiny_run(train_shards, third), "steps": 2, "resume": str(first / checkpoint.LATEST)})
    assert f"--resume {first / checkpoint.LATEST} is at step 2 and --steps is 2: nothing to train into {third}" in (
        str(e.value.code)
    )
    assert f"fuse {first / checkpoint.BEST} with python -m train.fuse" in str(e.value.code) and not third.exists()
    # and so does train.loop.run called directly (as benchmarks and scripts call it)
    with pytest.raises(checkpoint.CheckpointError, match="nothing to train into"):
        loop.run(tiny_config(train_shards, third, steps=2, resume=str(first / checkpoint.LATEST)))
    assert not third.exists()


def test_a_resume_that_would_choose_its_best_by_another_measure_is_refused(train_shards, tmp_path):
    """Resumed without --val, a run kept its last step as best.pt in place of the validated one (and fused that),
    while summary.json still gave the old best loss; with another --val or --val_batch its losses were compared
    with one they do not compare with."""
    from train.main import main

    out = tmp_path / "run"
    loop.run(tiny_config(train_shards, out, steps=2, fuse=False))
    best = checkpoint.load(out / checkpoint.BEST)
    assert best["val"]  # chosen by validation
    chosen = (
        f"{out / checkpoint.BEST} was chosen by its validation loss on --val {train_shards['val']} with --val_batch 4"
    )
    for flags, now in (
        ({"val": ""}, "no --val (the last step would be kept as best)"),
        ({"val_batch": 3}, f"--val {train_shards['val']} --val_batch 3"),
        ({"val": str(train_shards["labeled"])}, f"--val {train_shards['labeled']} --val_batch 4"),
    ):
        with pytest.raises(SystemExit) as e:
            main("demo", **{**tiny_run(train_shards, out), "steps": 4, "resume": "auto", **flags})
        assert f"{chosen}, and this run gives {now}" in str(e.value.code)
        assert f"Resume with --val {train_shards['val']} --val_batch 4, or move best.pt out of {out}" in str(
            e.value.code
        )
        with pytest.raises(checkpoint.CheckpointError, match="another measure"):  # loop.run, called directly
            loop.run(tiny_config(train_shards, out, steps=4, resume="auto", fuse=False, **flags))
    assert checkpoint.load(out / checkpoint.BEST)["step"] == best["step"]
    # the same folder spelled otherwise is the same measure; and a best.pt moved away lets the run choose anew
    same = f"{train_shards['val']}/./"
    loop.run(tiny_config(train_shards, out, steps=3, resume="auto", fuse=False, val=same))
    (out / checkpoint.BEST).rename(tmp_path / "kept.pt")
    loop.run(tiny_config(train_shards, out, steps=4, resume="auto", fuse=False, val=""))
    assert checkpoint.load(out / checkpoint.BEST)["step"] == 4


def test_a_resume_tells_its_validation_set_by_content_not_by_path(train_shards, tmp_path, monkeypatch):
    """best.pt's --val was compared by path, as typed: a job resumed from another working directory was refused as
    validating elsewhere (and told to pass the relative path, which did not exist there), and so would a tree moved,
    or a shared folder mounted at another path on another node. best.pt records the set's identity now. An older
    best.pt's relative --val is said to be relative to the folder its run started in."""
    from train.main import main

    shards = tmp_path / "data"
    shutil.copytree(train_shards["val"].parent, shards)
    first = tmp_path / "a" / "proj"
    first.mkdir(parents=True)
    (first / "shards").symlink_to(shards)
    monkeypatch.chdir(first)
    typed = {name: f"shards/{Path(train_shards[name]).name}" for name in ("labeled", "unlabeled", "val")}
    main("demo", **{**tiny_run(train_shards, Path("runs/x")), **typed, "steps": 2, "fuse": False, "workers": 0})
    out = first / "runs" / "x"
    best = checkpoint.load(out / checkpoint.BEST)
    assert best["config"]["val"] == typed["val"] and best["val_identity"]

    monkeypatch.chdir(tmp_path)  # another folder, the absolute paths
    absolute = {name: str(first / typed[name]) for name in typed}
    main("demo", **{**tiny_run(train_shards, out), **absolute, "steps": 3, "fuse": False, "resume": "auto"})
    assert checkpoint.load(out / checkpoint.LATEST)["step"] == 3
    (tmp_path / "a").rename(tmp_path / "b")  # the tree moved: reached by another path
    moved = tmp_path / "b" / "proj"
    monkeypatch.chdir(moved)
    main("demo", **{**tiny_run(train_shards, Path("runs/x")), **typed, "steps": 4, "fuse": False, "resume": "auto"})
    assert checkpoint.load(moved / "runs" / "x" / checkpoint.LATEST)["step"] == 4

    out = moved / "runs" / "x"
    monkeypatch.chdir(tmp_path)
    absolute = {name: str(moved / typed[name]) for name in typed}
    best = checkpoint.load(out / checkpoint.BEST)
    del best["val_identity"]  # as an older run recorded it: the path as typed only
    # typed relative to the folder its run started in (a later step's best, from the runs above with absolute paths,
    # would have recorded those)
    best["config"]["val"] = typed["val"]
    torch.save(best, out / checkpoint.BEST)
    with pytest.raises(SystemExit) as e:
        main("demo", **{**tiny_run(train_shards, out), **absolute, "steps": 5, "resume": "auto"})
    assert f"Resume with --val {typed['val']} --val_batch 4 (as typed then: relative to the folder that run was" in (
        str(e.value.code)
    )
    best["val_identity"] = "0" * 32  # the same folder, whose shards changed
    torch.save(best, out / checkpoint.BEST)
    monkeypatch.chdir(moved)
    with pytest.raises(SystemExit) as e:
        main("demo", **{**tiny_run(train_shards, Path("runs/x")), **typed, "steps": 5, "resume": "auto"})
    assert f"--val {typed['val']} --val_batch 4 (the same folder, but its shards have changed since)" in str(
        e.value.code
    )


def test_a_validation_set_of_one_video_is_refused_and_one_smaller_than_its_batch_is_named(
    train_shards, tmp_path, capsys
):
    """One validation video: its loss is 0 at every validation, and best.pt stayed at the first one (and was
    fused); fewer videos than --val_batch: the criterion was silently a smaller batch's."""
    from train.data import DataError, sample_count
    from train.main import main

    assert sample_count(train_shards["val"]) == 8
    says = f"--val {train_shards['val']}: 1 validation video(s) with --val_max 1; the validation loss needs at least 2"
    with pytest.raises(SystemExit) as e:
        main("demo", **{**tiny_run(train_shards, tmp_path / "a"), "val_max": 1})
    assert says in str(e.value.code) and not (tmp_path / "a").exists()
    with pytest.raises(DataError, match="needs at least 2"):  # train.loop.run, called directly
        loop.run(tiny_config(train_shards, tmp_path / "a", val_max=1))
    loop.run(tiny_config(train_shards, tmp_path / "b", steps=2, val_batch=16, fuse=False))
    assert "note: 8 validation videos, fewer than --val_batch 16: the validation loss" in capsys.readouterr().out


def test_a_resumed_run_goes_on_from_the_checkpoints_student(train_shards, tmp_path):
    """Every resume test checked steps, the optimizer and the batches, none the weights: a resume that left the
    student as built (the teacher's initial weights) passed them all."""
    out = tmp_path / "run"
    loop.run(tiny_config(train_shards, out, steps=2, val="", fuse=False))
    saved = checkpoint.load(out / checkpoint.LATEST)["student"]
    initial = torch.load(out / "teacher_init.pt", weights_only=True)  # where the student started
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)  # two steps moved it
    loop.run(tiny_config(train_shards, out, steps=2, val="", fuse=False, resume="auto"))  # nothing left to train
    kept = checkpoint.load(out / checkpoint.BEST)["student"]  # without --val: the student as the run ends
    assert kept.keys() == saved.keys() and all(torch.equal(kept[k], saved[k]) for k in saved)


def test_a_run_without_validation_writes_strict_json(train_shards, tmp_path):
    """No validation: the best loss stays infinite, which json.dumps wrote as the bare word Infinity."""
    out = tmp_path / "run"
    loop.run(tiny_config(train_shards, out, steps=2, val="", fuse=False))

    def refuse(constant):
        raise ValueError(constant)

    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert summary["best_val_loss"] is None and summary["steps"] == 2


def test_the_validation_loss_scores_every_video_in_batches_of_one_size():
    torch.manual_seed(0)
    video = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)

    def brute(starts, size):
        return sum(float(loop.contrastive_loss(video[i : i + size], text[i : i + size], 0.05)) for i in starts) / len(
            starts
        )

    assert loop.validation_loss(video, text, 3, 0.05) == pytest.approx(brute([0, 3, 4], 3))  # the last 3: 4, 5, 6
    assert loop.validation_loss(video[:6], text[:6], 3, 0.05) == pytest.approx(brute([0, 3], 3))
    assert loop.validation_loss(video, text, 64, 0.05) == pytest.approx(brute([0], 7))


def test_wandb_online_without_credentials_is_refused_before_any_work(train_shards, tmp_path, monkeypatch):
    """wandb.init refused it only once the trainer had built its models (eval.run: once every model was scored)."""
    from eval.run import main as eval_main
    from train.main import main

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main("demo", **{**tiny_run(train_shards, out), "wandb": "online"})
    assert "--wandb online: no W&B credentials found" in str(e.value.code) and not out.exists()
    with pytest.raises(SystemExit) as e:
        eval_main(model=str(TINY_CLIP), weights="", data_root=str(tmp_path), out=str(out), wandb="online")
    assert "--wandb online: no W&B credentials found" in str(e.value.code) and not out.exists()
    (tmp_path / "netrc").write_text("machine wandb.example.org login user password x\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a self-hosted server the user logged in to
    from train.monitor import online_problems

    assert online_problems("online") == []
    # no home folder (HOME unset, a user the machine does not know): wandb.init raised "Could not determine home
    # directory" after the models were built, and --wandb auto's credentials check before it
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    for mode in ("online", "offline"):
        assert online_problems(mode)[0].startswith(f"--wandb {mode}: W&B keeps its settings in the home folder")
    assert online_problems("off") == online_problems("auto") == []
    with pytest.raises(SystemExit) as e:
        main("demo", **{**tiny_run(train_shards, out), "wandb": "offline"})
    assert "set HOME or WANDB_CONFIG_DIR to a folder you can write, or pass --wandb off" in str(e.value.code)
    assert not out.exists()
    from train.monitor import wandb_mode

    assert wandb_mode("auto") == "off"  # the default logs nothing then (the trainer warns), rather than failing
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # where wandb.init then keeps them
    assert online_problems("offline") == [] and wandb_mode("auto") == "online"  # the netrc above


def test_wandb_auto_with_credentials_but_no_server_logs_offline(train_shards, tmp_path, monkeypatch, capsys):
    """A compute node with WANDB_API_KEY set and no network: wandb.init raised CommError after its timeout, and the
    run ended in a traceback. --wandb auto now goes on offline; --wandb online, asked for by name, still fails."""
    from train.monitor import Monitor

    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    cfg = tiny_config(train_shards, tmp_path / "run", wandb="auto")
    (tmp_path / "run").mkdir()
    monitor = Monitor(cfg, is_main=True, total_steps=2, start_step=0)
    try:
        assert monitor.run.settings.mode == "offline" and list((tmp_path / "run" / "wandb").glob("offline-run-*"))
        assert "warning: --wandb auto: W&B online failed (CommError" in capsys.readouterr().err
    finally:
        monitor.run.finish()
    with pytest.raises(Exception, match="127.0.0.1:9"):
        Monitor(dataclasses.replace(cfg, wandb="online"), is_main=True, total_steps=2, start_step=0)


def test_a_checkpoint_saved_with_another_adamw_kernel_resumes_with_this_runs():
    """A CPU run's checkpoint (unfused AdamW) resumed on a GPU (fused): the saved groups said fused=False, and the
    fused path's first step (found_inf) failed with "Expected grad_scale and found_inf to be None"."""
    cfg = resolve("demo", labeled="l", unlabeled="u", out="o")
    model = torch.nn.Linear(4, 4)
    saved, _ = loop.build_optimizer(model, cfg, torch.device("cpu"), fused=False)
    model(torch.randn(2, 4)).sum().backward()
    saved.step()
    optimizer, _ = loop.build_optimizer(model, cfg, torch.device("cpu"), fused=True)  # fused AdamW runs on CPUs too
    loop.load_optimizer(optimizer, saved.state_dict())
    assert [g["fused"] for g in optimizer.param_groups] == [True] and optimizer.state[model.weight]["step"] == 1
    before = model.weight.detach().clone()
    optimizer.found_inf = torch.tensor(0.0)  # as train_step sets it for a fused AdamW
    optimizer.step()
    assert not torch.equal(model.weight, before)


def test_each_rank_and_step_seeds_its_own_random_numbers():
    """With --workers 0 the trainer's process draws the crops (torch) and flips (Python's random): the same for the
    same seed, rank and step, different between ranks. A resumed run used to give every rank rank 0's state."""
    import random

    def draw(seed: int, rank: int, step: int) -> tuple[float, float]:
        loop.seed_process(seed, rank, step)
        return float(torch.rand(())), random.random()

    assert draw(0, 1, 5) == draw(0, 1, 5)
    assert len({draw(0, 0, 5), draw(0, 1, 5), draw(0, 0, 6), draw(1, 0, 5)}) == 4


def test_the_same_seed_trains_the_same_weights(train_shards, tmp_path):
    """--workers 0 (the crops drawn in the trainer's process): Python's random was not seeded, so two runs with one
    seed trained different weights."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        loop.run(tiny_config(train_shards, out, steps=2, fuse=False))
    a, b = (torch.load(out / checkpoint.LATEST, weights_only=True)["student"] for out in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumed_at_its_last_step_keeps_its_summary_and_clears_a_killed_saves_temporary(train_shards, tmp_path):
    """make demo run again resumes a finished run: summary.json must still hold the last validation (it was written
    empty), and the temporary file of a save killed mid-way (gigabytes for ViT-B/16) is removed under the run's
    lock."""
    out = tmp_path / "run"
    first = loop.run(tiny_config(train_shards, out, steps=2, fuse=False))
    assert first["last_val"]["videos"] > 0
    stale = out / f".{checkpoint.LATEST}.tmp-0123456789ab"
    stale.write_bytes(b"half a checkpoint")
    again = loop.run(tiny_config(train_shards, out, steps=2, fuse=False, resume="auto"))
    assert again["last_val"] == first["last_val"]
    assert json.loads((out / "summary.json").read_text())["last_val"] == first["last_val"]
    assert not stale.exists() and (out / checkpoint.LATEST).is_file()


def test_resume_keeps_the_best_that_best_pt_holds(train_shards, tmp_path):
    """A crash after best.pt was saved but before latest.pt leaves latest.pt with an older best: the resumed
    run must not replace best.pt with a worse model."""
    out = tmp_path / "run"
    loop.run(tiny_config(train_shards, out, steps=2, fuse=False))
    best = torch.load(out / checkpoint.BEST, weights_only=True)
    best["val"]["loss"] = -1.0  # as if a better validation had been saved just before the crash
    checkpoint.atomic_save(best, out / checkpoint.BEST)
    assert checkpoint.best_val_loss(out) == -1.0
    summary = loop.run(tiny_config(train_shards, out, steps=4, resume="auto", fuse=False))
    assert summary["best_val_loss"] == -1.0
    assert torch.load(out / checkpoint.BEST, weights_only=True)["step"] == 2
    # a damaged best.pt (a disk error; a save is atomic) was a traceback on resuming: the next validation replaces it
    (out / checkpoint.BEST).write_bytes((out / checkpoint.BEST).read_bytes()[:1000])
    assert checkpoint.best_val_loss(out) is None
    with pytest.raises(checkpoint.CheckpointError, match="holds no readable best.pt to fuse; give more --steps"):
        loop.run(tiny_config(train_shards, out, steps=4, resume="auto"))  # nothing to train: nothing replaces it
    summary = loop.run(tiny_config(train_shards, out, steps=6, resume="auto", fuse=False))
    assert torch.load(out / checkpoint.BEST, weights_only=True)["step"] == 6 and summary["best_val_loss"] < math.inf


def test_processes_that_would_resume_from_different_checkpoints_are_refused(train_shards, tmp_path, monkeypatch):
    """An OUT on each node's own disk: rank 0's node resumed at step 40, another node's ranks started at 0, DDP
    averaged the gradients of the two, and the job hung at the end (the ranks at different steps). Checkpoints are
    told apart by content: two of one model at other steps are the same size, and one folder may be mounted at
    another path on each node."""
    loop.run(tiny_config(train_shards, tmp_path / "a", steps=2, val="", fuse=False))
    loop.run(tiny_config(train_shards, tmp_path / "b", steps=4, val="", fuse=False))
    a, b = (tmp_path / run / checkpoint.LATEST for run in "ab")
    assert a.stat().st_size == b.stat().st_size and loop.checkpoint_digest(a) != loop.checkpoint_digest(b)
    elsewhere = tmp_path / "mounted_elsewhere"
    elsewhere.symlink_to(tmp_path / "a")
    gathered = {}  # what each rank found, as all_gather_object gives it
    monkeypatch.setattr(loop.distributed, "all_gather_object", lambda mine: [mine, gathered["other"]])
    for other, agree in ((elsewhere / checkpoint.LATEST, True), (b, False), (None, False)):
        gathered["other"] = None if other is None else loop.checkpoint_digest(other)
        if agree:
            loop._check_ranks_agree(a)
            continue
        with pytest.raises(checkpoint.CheckpointError) as e:
            loop._check_ranks_agree(a)
        assert str(e.value).startswith(
            f"the processes would not resume from the same checkpoint (this is rank 0, "
            f"resuming from {a}; rank 0: a checkpoint of {a.stat().st_size} bytes"
        )
        assert str(e.value).endswith(
            "give --out a folder every node sees (a shared filesystem), and --resume a file every node can read"
        )
    monkeypatch.setattr(loop.distributed, "all_gather_object", lambda mine: [mine, mine])
    loop._check_ranks_agree(None)


def test_a_run_resumed_on_another_number_of_processes_says_its_batch_changed(train_shards, tmp_path, capsys):
    out = tmp_path / "run"
    loop.run(tiny_config(train_shards, out, steps=2, fuse=False))
    state = torch.load(out / checkpoint.LATEST, weights_only=True)
    assert state["world_size"] == 1
    checkpoint.atomic_save({**state, "world_size": 4}, out / checkpoint.LATEST)  # as if saved by 4 ranks
    capsys.readouterr()
    loop.run(tiny_config(train_shards, out, steps=3, resume="auto", fuse=False))
    batch = tiny_config(train_shards, out).batch_labeled
    assert (
        f"note: the checkpoint was saved by a run of 4 process(es), this one has 1: the batches are per process, so "
        f"the contrastive loss's labeled batch goes from {4 * batch} to {batch} videos"
    ) in capsys.readouterr().out


def test_resume_from_a_named_checkpoint_and_refusals_of_files_that_cannot_resume(train_shards, tmp_path, monkeypatch):
    """--resume PATH continues another folder's run; weights-only files and another model's run are refused
    with the fix, before anything is written into the new OUT."""
    first = tmp_path / "first"
    loop.run(tiny_config(train_shards, first, steps=2, fuse=True))
    summary = loop.run(tiny_config(train_shards, tmp_path / "next", steps=4, resume=str(first / checkpoint.LATEST)))
    assert summary["steps"] == 4
    assert torch.load(tmp_path / "next" / checkpoint.LATEST, weights_only=True)["step"] == 4

    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for name, message in (
        (first / checkpoint.BEST, "not a training checkpoint (no optimizer"),
        (first / checkpoint.FUSED, "not a training checkpoint (no step, student"),
        (tmp_path / "notes.txt", "not a checkpoint torch can load"),
    ):
        out = tmp_path / f"from_{name.stem}"
        proc = run_cli("train.main", *cli_args(train_shards, out, resume=name), check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()  # refused before the folder was made

    deeper = json.loads(TINY_CLIP.read_text())
    deeper["vision_cfg"]["layers"] = 3
    (tmp_path / "tiny-clip-3.json").write_text(json.dumps(deeper))
    deeper_run = tiny_config(
        train_shards, tmp_path / "other", model=str(tmp_path / "tiny-clip-3.json"), resume=str(first / "latest.pt")
    )
    with pytest.raises(checkpoint.CheckpointError, match=f"trained with --model {TINY_CLIP}.*resblocks.2"):
        loop.run(deeper_run)
    assert not (tmp_path / "other").exists()  # refused before any model was built or OUT made

    # a model that cannot be built on the meta device is checked when the checkpoint loads, after the build
    monkeypatch.setattr(checkpoint, "expected_shapes", lambda name: None)
    with pytest.raises(checkpoint.CheckpointError, match=f"trained with --model {TINY_CLIP}.*resblocks.2"):
        loop.run(deeper_run)
    assert not (tmp_path / "other" / "config.json").exists()


def test_a_second_run_into_one_folder_is_refused(tmp_path):
    held = checkpoint.lock_run(tmp_path)
    with pytest.raises(FileExistsError, match="another train.main run is writing"):
        checkpoint.lock_run(tmp_path, grace=0)  # the wait for a run killed a moment ago: tests/test_folder_lock.py
    held.close()  # the first run ends: the folder is free again
    checkpoint.lock_run(tmp_path).close()


class NanGradient(torch.autograd.Function):
    """The identity forward, NaN gradients backward: a kernel that fails in the backward only."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


NON_FINITE = {  # a parameter -> a loss whose value or gradient is not finite
    "loss": lambda p: p.sum() * float("nan"),
    "gradients of a finite loss": lambda p: NanGradient.apply(p).sum() * 0,
}


def _no_host_wait(*args, **kwargs):
    raise AssertionError("the step waited for the device")


@pytest.mark.parametrize("fused", [False, True], ids=["host", "fused"])
@pytest.mark.parametrize("what", list(NON_FINITE))
def test_a_non_finite_loss_or_gradient_skips_the_step_and_keeps_the_weights(
    train_shards, tmp_path, monkeypatch, what, fused
):
    """Skipped on the host (a wait for the device) with a plain AdamW; on the device with the fused one (the GPU
    default), without a wait: the kernel leaves weights, moments and step count, settle_skips counts the skip and
    takes the schedule back."""
    cfg = tiny_config(train_shards, tmp_path / "run", warmup_steps=4)
    (tmp_path / "run").mkdir()
    from train import distributed

    models = loop.build_models(cfg, distributed.init_distributed("cpu"))
    optimizer, scheduler = loop.build_optimizer(models.student, cfg, torch.device("cpu"), fused=fused)
    first_lr = scheduler.get_last_lr()
    before = {k: v.clone() for k, v in models.student.state_dict().items()}

    def non_finite(models, *args):
        loss = NON_FINITE[what](next(models.student.parameters()))
        return loss, {"contrastive": torch.tensor(0.0), "distillation": torch.tensor(0.0)}

    monkeypatch.setattr(loop, "compute_loss", non_finite)
    progress = loop.Progress()
    with monkeypatch.context() as m:
        if fused:
            for conversion in ("item", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, conversion, _no_host_wait)
        result = loop.train_step(models, optimizer, scheduler, None, None, cfg, torch.device("cpu"), progress)
    loop.settle_skips(progress, scheduler)
    assert float(result["finite"]) == 0 and progress.skipped_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in models.student.state_dict().items())
    assert scheduler.last_epoch == 0 and scheduler.get_last_lr() == first_lr  # no schedule step
    assert [group["lr"] for group in optimizer.param_groups] == first_lr
    moments = [t for state in optimizer.state.values() for t in state.values()]
    assert all(not t.any() for t in moments)  # none, or zeros and a step count of 0
    loop.settle_skips(progress, scheduler)  # read once
    assert progress.skipped_steps == 1 and scheduler.last_epoch == 0


def test_a_log_windows_means_leave_out_its_skipped_steps(train_shards, tmp_path):
    """A window's train/loss and the rest are means over its steps that were not skipped (whose figures may be NaN),
    read once per window; the skips a fused optimizer made on the device are counted there."""
    from types import SimpleNamespace

    from train.monitor import Timer

    cfg = tiny_config(train_shards, tmp_path / "run", warmup_steps=4)
    optimizer, scheduler = loop.build_optimizer(torch.nn.Linear(1, 1), cfg, torch.device("cpu"), fused=True)
    for _ in range(2):  # two steps taken, one of them skipped on the device (no gradients here: nothing moves)
        optimizer.step()
        scheduler.step()

    def result(loss, finite):
        parts = {"contrastive": torch.tensor(loss / 2), "distillation": torch.tensor(loss / 4)}
        parts |= {"grad_norm": torch.tensor(1.0), "finite": torch.tensor(finite), "lr": cfg.lr * (1 + finite) / 4}
        return {"loss": torch.tensor(loss), **parts}

    window = [result(2.0, 1.0), result(float("nan"), 0.0), result(4.0, 1.0)]
    progress = loop.Progress(step=3, unsettled_skips=torch.tensor(1.0))
    logged = {}
    monitor = SimpleNamespace(log=lambda metrics, step: logged.update(metrics), warn_once=lambda *a: None)
    dist = SimpleNamespace(device=torch.device("cpu"), world_size=1)
    loop._log(monitor, window, Timer(), cfg, dist, None, scheduler, progress)
    assert logged["train/loss"] == 3.0 and logged["train/contrastive"] == 1.5 and logged["train/distillation"] == 0.75
    assert logged["train/skipped_steps"] == 1 and scheduler.last_epoch == 1  # one step taken
    assert scheduler.get_last_lr()[0] == pytest.approx(cfg.lr * 2 / 4)  # warmup: (1 + 1) / 4 of it, the next step's
    assert logged["train/lr"] == window[-1]["lr"]  # the rate the window's last step trained at
    logged.clear()
    loop._log(monitor, [result(float("nan"), 0.0)], Timer(), cfg, dist, None, scheduler, progress)
    assert "train/loss" not in logged and logged["train/skipped_steps"] == 1  # a window of skipped steps: no mean


def test_a_skipped_step_then_a_good_one_move_the_weights_as_on_the_host(train_shards, tmp_path, monkeypatch):
    """After settle_skips, the fused optimizer's device-side skip has left the run where the host path leaves it:
    the next good step makes the same update (the same schedule point, Adam's first step again)."""
    from train import distributed

    weights = {}
    for fused in (False, True):
        cfg = tiny_config(train_shards, tmp_path / f"run{fused}", warmup_steps=4)
        Path(cfg.out).mkdir()
        torch.manual_seed(0)
        models = loop.build_models(cfg, distributed.init_distributed("cpu"))
        optimizer, scheduler = loop.build_optimizer(models.student, cfg, torch.device("cpu"), fused=fused)
        param = next(models.student.parameters())
        initial = param.detach().clone()
        losses = iter([param.sum() * float("nan"), (param.float() ** 2).sum()])

        def scripted(models, *args, losses=losses):
            return next(losses), {"contrastive": torch.tensor(0.0), "distillation": torch.tensor(0.0)}

        monkeypatch.setattr(loop, "compute_loss", scripted)
        progress = loop.Progress()
        for _ in range(2):
            loop.train_step(models, optimizer, scheduler, None, None, cfg, torch.device("cpu"), progress)
            loop.settle_skips(progress, scheduler)
        assert progress.skipped_steps == 1 and scheduler.last_epoch == 1
        weights[fused] = param.detach().clone()
        assert not torch.allclose(weights[fused], initial)  # the good step moved them
    assert torch.allclose(weights[True], weights[False], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
class _RecordedRun:
    """What the trainer asks of a W&B run, recorded (wandb.init replaced)."""

    def __init__(self):
        self.logged, self.summary, self.finished = [], {}, []

    def define_metric(self, name, **options):
        pass

    def log(self, data, **options):
        self.logged.append(data)

    def finish(self, exit_code=0, **options):
        self.finished.append(exit_code)


def test_the_wandb_run_ends_with_the_best_loss_and_its_exit_code_and_logs_each_steps_learning_rate(
    train_shards, tmp_path, monkeypatch
):
    """The runs table showed the last val/loss, not the model-selection figure; a failed or stopped run was marked
    a success (exit code 0); train/lr was the next step's rate (read after the scheduler's step)."""
    import wandb

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: runs.append(_RecordedRun()) or runs[-1])
    cfg = tiny_config(train_shards, tmp_path / "a", wandb="offline", log_every=1, warmup_steps=4, lr=1e-3)
    summary = loop.run(cfg)
    run = runs[-1]
    assert run.finished == [0] and run.summary == {"val/best_loss": summary["best_val_loss"], "fused": summary["fused"]}
    loop.run(dataclasses.replace(cfg, resume="auto"))  # nothing left to train: no W&B run of nothing beside it
    assert runs == [run]
    rates = {row["trainer/step"]: row["train/lr"] for row in run.logged if "train/lr" in row}
    assert rates == {1: pytest.approx(2.5e-4), 2: pytest.approx(5e-4), 3: pytest.approx(7.5e-4), 4: pytest.approx(1e-3)}

    real = loop.train_step

    def fails_at_step_3(*args, **kwargs):
        if args[7].step == 2:
            raise RuntimeError("a step that fails")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", fails_at_step_3)
    with pytest.raises(RuntimeError, match="a step that fails"):
        loop.run(tiny_config(train_shards, tmp_path / "b", wandb="offline"))
    assert runs[-1].finished == [1]


def test_torchrun_two_ranks_with_wandb_offline(train_shards, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "train.main",
        *cli_args(train_shards, out, wandb="offline", profile_steps=1),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no credentials: offline
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["last_val"]["videos"] == 8
    assert "step 4: val loss" in proc.stdout + proc.stderr
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (out / checkpoint.FUSED).is_file()
    # --profile_steps: every rank profiles step 3 (after the first log window) and writes its own trace
    assert "profile of steps 3-3" in proc.stdout + proc.stderr
    profiles = sorted(p.name for p in (out / "profile").iterdir())
    assert profiles == [f"rank{r}{ext}" for r in (0, 1) for ext in (".json", ".pt.trace.json.gz")]


@pytest.mark.slow
def test_a_full_disk_ends_a_run_with_one_line_and_keeps_the_last_save(train_shards, tmp_path):
    """A write that fails (a file-size limit here, as a full disk would) ended in two tracebacks (the OSError, then
    torch's "unexpected pos"); it is one line that names the cause and how to go on, and no temporary stays."""
    import resource

    out = tmp_path / "run"
    loop.run(tiny_config(train_shards, out, steps=2, fuse=False))
    limit = (out / checkpoint.LATEST).stat().st_size // 2  # the next save fails part-way
    proc = subprocess.run(
        [sys.executable, "-m", "train.main", *cli_args(train_shards, out, resume="auto", wandb="off")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert "File too large" in line and "ulimit -f" in line and "--resume auto" in line
    assert torch.load(out / checkpoint.LATEST, weights_only=True)["step"] == 2 and not list(out.glob(".*tmp*"))


def test_ctrl_c_ends_a_run_with_one_line_that_says_how_to_go_on(train_shards, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group: the trainer and its loader workers) printed a traceback."""
    import signal

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.main", *cli_args(train_shards, out, steps=400, val_every=2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # with Ctrl-C's default action in the trainer, even where pytest was started with SIGINT ignored (`pytest &`
    # from a script): Python then leaves it ignored, and the run went on
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not (out / checkpoint.LATEST).exists():
        time.sleep(0.2)
    time.sleep(1)  # mid-training, past the first save
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    assert f"interrupted: {out}/latest.pt holds the run as of its last save" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]


def _run_until_saved(cmd: list[str], out: Path, log: Path, at_step: int) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (output to ``log``, shown when a run does not get far enough) and
    return once OUT/latest.pt is at ``at_step`` or later, or the run has ended, or 240 s have passed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        latest = out / checkpoint.LATEST
        if latest.exists() and torch.load(latest, weights_only=True)["step"] >= at_step:
            break
        time.sleep(0.2)
    return proc


def _signal_mid_run(cmd: list[str], out: Path, log: Path, at_step: int) -> tuple[subprocess.Popen, int]:
    """Run ``cmd`` until OUT/latest.pt is at ``at_step`` (``_run_until_saved``), then SIGTERM each of its processes,
    as Slurm signals every process of a job: torchrun's agent, the trainers, the loader workers (and torchrun's
    agent signals each trainer's process group again). Returns the process, ended, and how many processes were
    signalled."""
    import signal

    proc = _run_until_saved(cmd, out, log, at_step)
    signalled = signal_job(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    finally:
        kill_tree(proc.pid)
    return proc, len(signalled)


def _stopped_at(text: str, out: Path) -> int:
    (line,) = [x for x in text.splitlines() if x.startswith("stopped at step")]  # from rank 0 only
    step = int(line.split()[3])
    assert line == (
        f"stopped at step {step} on SIGTERM: {out / checkpoint.LATEST} holds the run there; rerun the same command "
        "with --resume auto to go on from there"
    )
    return step


def test_validation_and_saves_wait_on_purpose_and_steps_do_not(train_shards, tmp_path, monkeypatch):
    """A rank waits for the others' share of a validation and for rank 0's checkpoint writes, however long they take:
    a SIGTERM then is not a rank blocked for good (preempt.patient). A step is not such a wait."""
    from train import preempt

    seen = {}
    for name in ("validate", "save_latest", "save_best", "train_step"):
        real = getattr(loop, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.setdefault(_name, set()).add(preempt._patient)
            return _real(*args, **kwargs)

        monkeypatch.setattr(loop, name, spy)
    loop.run(tiny_config(train_shards, tmp_path / "run", steps=4, val_every=2, fuse=False))
    assert seen == {"validate": {1}, "save_latest": {1}, "save_best": {1}, "train_step": {0}}
    assert preempt._patient == 0


def test_sigterm_saves_the_run_within_10_steps_and_a_resume_goes_on_from_there(train_shards, tmp_path):
    """A scheduler's time limit or preemption (SIGTERM to the trainer and its loader workers) ended the run at once,
    losing the steps since the last save (up to --val_every). It now saves latest.pt at the next check, every 10
    steps where --log_every is more (25 here), and exits 143, with a line that says how to go on."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = cli_args(train_shards, out, steps=400, val_every=50, log_every=25, workers=2)
    proc, signalled = _signal_mid_run([sys.executable, "-m", "train.main", *args], out, log, at_step=50)
    text = log.read_text(errors="replace")
    assert proc.returncode == 143 and "Traceback" not in text, text[-3000:]
    assert signalled >= 1 + 2 * 2, signalled  # the trainer and its two streams' workers (and validation's)
    stopped_at = _stopped_at(text, out)
    saved = torch.load(out / checkpoint.LATEST, weights_only=True)
    assert saved["step"] == stopped_at and stopped_at % 10 == 0 and 50 < stopped_at < 400, text[-3000:]
    assert saved["labeled_seen"] == stopped_at * 4
    rerun = run_cli("train.main", *cli_args(train_shards, out, steps=stopped_at + 2, resume="auto"))
    assert f"resumed from {out / checkpoint.LATEST} at step {stopped_at}" in rerun.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == stopped_at + 2


@pytest.mark.slow
def test_torchrun_ranks_stop_at_the_same_log_step_on_sigterm(train_shards, tmp_path):
    """Under torchrun every rank stops at the same log step, where rank 0 saves: a rank that stopped alone would
    leave the others waiting. Each rank gets SIGTERM twice (Slurm's and the agent's), its workers too."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = cli_args(train_shards, out, steps=400, val_every=20, log_every=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "train.main", *args]
    proc, signalled = _signal_mid_run(cmd, out, log, at_step=20)
    text = log.read_text(errors="replace")
    assert signalled >= 1 + 2 * 3, signalled  # the agent, and each rank with its two streams' workers
    stopped_at = _stopped_at(text, out)
    saved = torch.load(out / checkpoint.LATEST, weights_only=True)
    assert saved["step"] == stopped_at and stopped_at % 3 == 0 and 20 < stopped_at < 400, text[-3000:]
    assert saved["labeled_seen"] == stopped_at * 2 * 4 and saved["world_size"] == 2
    assert "Traceback" not in text.split("stopped at step")[0], text[-3000:]  # the agent's own report comes after
    assert proc.returncode != 0  # torchrun's agent, itself signalled, reports the stop


@pytest.mark.slow
def test_torchrun_run_killed_mid_way_resumes(train_shards, tmp_path):
    """kill -9 the whole torchrun job after a checkpoint; the same command with --resume auto finishes it."""
    out = tmp_path / "run"
    args = cli_args(train_shards, out, steps=40, val_every=2, resume="auto")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "train.main", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the log is shown if the first run does not get far enough (this failed once, its output lost). Not a busy port
    # 29500: for one node without --master_port torchrun takes a free port (c10d on localhost:0); it passed with
    # 29500 held
    log = tmp_path / "first_run.log"
    proc = _run_until_saved(cmd, out, log, at_step=4)
    kill_tree(proc.pid)  # returns once no process of the job is left; the rerun's lock waits out the kernel's release
    proc.wait()
    assert (out / checkpoint.LATEST).exists(), log.read_text(errors="replace")[-3000:]
    killed_at = torch.load(out / checkpoint.LATEST, weights_only=True)["step"]
    assert 4 <= killed_at < 40, log.read_text(errors="replace")[-3000:]
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in rerun.stderr.splitlines() if "error:" in line]  # a rank's own, above the tracebacks
    assert rerun.returncode == 0, "\n".join(errors) + "\n...\n" + rerun.stderr[-2000:]
    resumed = [line for line in rerun.stdout.splitlines() if "resumed" in line]
    assert resumed == [f"resumed from {out / checkpoint.LATEST} at step {killed_at}"], rerun.stdout[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 40


@pytest.mark.slow
@pytest.mark.parametrize(
    "levers",
    [{}, {"split_qkv": True}, {"packed_qkv": False, "linear_patch_embed": False, "cls_last_block": False}],
)
def test_compiled_student_and_teacher_match_eager_without_recompiling(train_shards, tmp_path, levers):
    """--compile (the GPU default) compiles the teacher too: the same losses, and graphs made once, on step 1, also
    when the captions' widths change from step to step and differ between the two batches (--trim_text), when the
    frames come strided as the GPU crop hands them, and when the teacher is queued a step early (--teacher_stream
    ahead); with the layer levers (the default), with --split_qkv too, and with open_clip's own layers."""
    from torch._dynamo.utils import counters

    from train import distributed
    from train.model import TrimmedTokenizer, tokenizer_for

    torch.manual_seed(0)
    frames = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    tokenizer = TrimmedTokenizer(tokenizer_for(str(TINY_CLIP)))
    captions = (["a red square", "a blue circle"], ["a red square turning slowly in the middle of a blue field"] * 2)
    short, long = (loop.data.Batch(frames, tokenizer(c), c, ["k1", "k2"], torch.tensor([0, 1]), 0) for c in captions)
    assert short.tokens.shape[1] == 8 and long.tokens.shape[1] == 16
    # the GPU crop's frames are strided (channels last); the teacher takes each unlabeled batch as it comes
    strided = dataclasses.replace(long, video=frames.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3))
    assert not strided.video.is_contiguous()
    batches = [(short, long), (long, short), (short, short), (short, strided), (long, long), (short, short)]
    losses, graphs = {}, []
    for compiled in (False, True):
        # a tiny lr: Adam's first update moves every weight whose gradient is not exactly 0 by about lr, so a
        # gradient of 1e-12 in one mode and 0 in the other would part the two runs (at full width as well); the
        # losses of steps 2 and 3 are then those of the same weights, at other widths
        cfg = tiny_config(train_shards, tmp_path / f"run{compiled}", compile=compiled, lr=1e-9, **levers)
        Path(cfg.out).mkdir()
        models = loop.build_models(cfg, distributed.init_distributed("cpu"))
        assert isinstance(models.teacher, torch._dynamo.eval_frame.OptimizedModule) == compiled
        optimizer, scheduler = loop.build_optimizer(models.student, cfg, torch.device("cpu"))
        losses[compiled], cpu = [], torch.device("cpu")
        ahead = loop.Ahead()  # the last two steps as --teacher_stream ahead runs them: the teacher queued a step early
        for i, (labeled, unlabeled) in enumerate(batches):
            early = ahead if i >= len(batches) - 2 else None
            if early is not None:
                early.batch = batches[i + 1][1] if i + 1 < len(batches) else None
            step = loop.train_step(models, optimizer, scheduler, labeled, unlabeled, cfg, cpu, loop.Progress(), early)
            losses[compiled].append(float(step["loss"]))
            graphs.append(counters["stats"]["unique_graphs"])
    assert ahead.embedded is None and ahead.embeddings is None  # the last step queued none
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    steps = len(batches)
    made = [g - graphs[0] for g in graphs[steps:]]  # graphs made by the compiled steps: on the first only
    assert graphs[:steps] == [graphs[0]] * steps and made[0] >= 2 and made == [made[0]] * steps  # student + teacher


@pytest.mark.parametrize("value", [-1, "half", 1.5])
def test_grad_checkpointing_is_checked(value):
    with pytest.raises(ValueError, match="--grad_checkpointing must be True"):
        resolve("demo", grad_checkpointing=value)


def test_activation_checkpointing_gives_the_same_first_step(train_shards, tmp_path):
    """Checkpointing trades memory for compute; the loss and the update must not change."""
    from train import distributed

    results = []
    for flag in (False, True, 1):
        cfg = tiny_config(train_shards, tmp_path / f"run{flag}", grad_checkpointing=flag)
        Path(cfg.out).mkdir()
        models = loop.build_models(cfg, distributed.init_distributed("cpu"))
        torch.manual_seed(0)
        frames = torch.randn(2, 4, 3, 32, 32)
        from train.model import tokenizer_for

        tokens = tokenizer_for(cfg.model)(["a red square", "a blue circle"])
        batch = loop.data.Batch(frames, tokens, ["a", "b"], ["k1", "k2"], torch.tensor([0, 1]), 0)
        optimizer, scheduler = loop.build_optimizer(models.student, cfg, torch.device("cpu"))
        step = loop.train_step(models, optimizer, scheduler, batch, batch, cfg, torch.device("cpu"), loop.Progress())
        results.append((float(step["loss"]), next(models.student.parameters()).detach().clone()))
    for loss, weights in results[1:]:
        assert results[0][0] == pytest.approx(loss, rel=1e-5)
        assert torch.allclose(results[0][1], weights, atol=1e-6)


def test_the_config_records_the_model_json_and_teacher_file_as_absolute_paths(train_shards, tmp_path, monkeypatch):
    """config.json recorded --model tiny-clip.json as typed: train.fuse, which takes it from the checkpoint, found no
    such file when run from another folder."""
    from train import fuse
    from train import main as train_main

    here = tmp_path / "here"
    here.mkdir()
    shutil.copy(TINY_CLIP, here / "tiny-clip.json")
    from train.model import create_clip

    torch.save(create_clip(str(TINY_CLIP)).state_dict(), here / "w.pt")
    monkeypatch.chdir(here)
    ran = []
    monkeypatch.setattr(loop, "run", ran.append)
    train_main.main(
        "demo", **{**tiny_run(train_shards, tmp_path / "out"), "model": "tiny-clip.json", "teacher_weights": "w.pt"}
    )
    assert (ran[0].model, ran[0].teacher_weights) == (str(here / "tiny-clip.json"), str(here / "w.pt"))
    tags = train_main.with_absolute_files(dataclasses.replace(ran[0], teacher_weights="openai"))
    assert tags.teacher_weights == "openai" and train_main.with_absolute_files(tags) == tags

    # a checkpoint of an earlier run, with the paths as typed, fused from another folder: the error says why
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": "tiny-clip.json", "teacher_weights": "w.pt"}
    torch.save({"step": 1, "student": torch.load(here / "w.pt", weights_only=True), "config": config}, run / "best.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        fuse.main(student=str(run / "best.pt"), out=str(tmp_path / "f.pt"))
    assert "--model tiny-clip.json and --teacher w.pt: as the checkpoint records it, relative to the folder" in str(
        e.value
    )
    monkeypatch.chdir(here)
    fuse.main(student=str(run / "best.pt"), out=str(tmp_path / "f.pt"))  # from there: found
    assert (tmp_path / "f.pt").is_file()


def test_a_resume_names_changed_flags_but_not_a_file_now_written_absolute(tmp_path, monkeypatch):
    """Checkpoints from before recorded --model tiny-clip.json as typed; a resume, which records it absolute, printed
    it as a changed flag."""
    (tmp_path / "tiny-clip.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    saved = {"model": "tiny-clip.json", "teacher_weights": "", "lr": 1e-5, "resume": "", "out": "o"}
    current = {**saved, "model": str(tmp_path / "tiny-clip.json"), "lr": 2e-5, "resume": "auto"}
    assert loop.config_changes(saved, current) == ["--lr 1e-05 -> 2e-05"]
    assert loop.config_changes(saved, {**current, "model": "ViT-B-16-quickgelu"})[0].startswith("--model ")
    assert (
        loop.config_changes({**saved, "out": ""}, {**current, "out": str(tmp_path)})[-1] == f"--out '' -> '{tmp_path}'"
    )


def test_a_task_srun_started_without_torchrun_is_warned_that_it_trains_alone(
    train_shards, tmp_path, monkeypatch, capsys
):
    from train import main as train_main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setattr(loop, "run", lambda cfg: None)
    train_main.main("demo", **tiny_run(train_shards, tmp_path / "out"))
    assert "warning: this process is one of 4 tasks that srun started without torchrun" in capsys.readouterr().err


def test_loader_workers_out_of_shared_memory_is_one_line(train_shards, tmp_path, monkeypatch):
    """Docker's 64 MB /dev/shm: torch's traceback, whose last line named neither --shm-size nor --workers."""
    from train import main as train_main

    for said in (
        "unable to allocate shared memory(shm) for file </torch_123_456_0>: Success (0)",
        "DataLoader worker (pid 123) is killed by signal: Bus error. It is possible that dataloader's workers are out "
        "of shared memory. Please try to raise your shared memory limit.",
    ):

        def out_of_shm(cfg, said=said):
            raise RuntimeError(said)

        monkeypatch.setattr(loop, "run", out_of_shm)
        with pytest.raises(SystemExit) as e:
            train_main.main("demo", **tiny_run(train_shards, tmp_path / "out"))
        assert str(e.value.code).startswith("error: the loader workers ran out of shared memory (/dev/shm holds ")
        assert "--shm-size 8g" in str(e.value.code) and "--resume auto" in str(e.value.code)

    for other in ("CUDA error: an illegal access", "out of resource: shared memory, Required: 233472"):  # (Triton's)
        monkeypatch.setattr(loop, "run", lambda cfg, other=other: (_ for _ in ()).throw(RuntimeError(other)))
        with pytest.raises(RuntimeError, match=other):  # any other RuntimeError keeps its traceback
            train_main.main("demo", **tiny_run(train_shards, tmp_path / "out"))


def test_a_lock_file_train_main_can_neither_make_nor_take_is_one_line(train_shards, tmp_path, monkeypatch):
    """The other CLIs say FolderLockError in one line through pipeline.cli.fire_main; train.main runs fire itself,
    and it ended in a PermissionError traceback."""
    from pipeline.folder_lock import FolderLockError
    from train import main as train_main

    def locked_out(cfg):
        raise FolderLockError(f"cannot make the lock file {tmp_path / 'out' / '.lock'}: no permission to write")

    monkeypatch.setattr(loop, "run", locked_out)
    with pytest.raises(SystemExit) as e:
        train_main.main("demo", **tiny_run(train_shards, tmp_path / "out"))
    assert str(e.value.code) == f"error: cannot make the lock file {tmp_path / 'out' / '.lock'}: no permission to write"


def test_a_batch_of_one_video_over_every_process_is_refused_where_its_loss_has_weight(
    train_shards, tmp_path, monkeypatch
):
    """A contrastive loss over one pair is 0, and so is the distillation over one video: --batch_labeled 1 on one
    process trained nothing of the labeled set, silently (as --val_batch 1 scored 0). Two processes of one video
    each are a batch of two; a loss --lam gives no weight may have a batch of one."""
    from train.main import batch_of_one_problems

    cfg = tiny_config(train_shards, tmp_path / "run", batch_labeled=1, batch_unlabeled=1)
    assert batch_of_one_problems(cfg, 1) == [
        "--batch_labeled 1 on 1 process(es): the contrastive loss over a batch of one video is 0, so it would train "
        "nothing; give 2 or more (the batch is per process)",
        "--batch_unlabeled 1 on 1 process(es): the distillation loss over a batch of one video is 0, so it would "
        "train nothing; give 2 or more (the batch is per process)",
    ]
    assert batch_of_one_problems(cfg, 2) == []
    assert [line.split()[0] for line in batch_of_one_problems(dataclasses.replace(cfg, lam=0.0), 1)] == [
        "--batch_labeled"
    ]
    assert batch_of_one_problems(dataclasses.replace(cfg, lam=1.0, batch_unlabeled=4), 1) == []
    monkeypatch.setenv("WORLD_SIZE", "1")
    proc = run_cli(
        "train.main",
        "--labeled",
        train_shards["labeled"],
        "--unlabeled",
        train_shards["unlabeled"],
        "--out",
        tmp_path / "cli",
        "--batch_labeled",
        1,
        "--model",
        TINY_CLIP,
        "--teacher_weights",
        "",
        check=False,
    )
    assert proc.returncode != 0 and "--batch_labeled 1 on 1 process(es)" in proc.stderr, proc.stderr
    assert not (tmp_path / "cli").exists()


def test_a_learning_rate_of_zero_keeps_the_student_as_it_starts(train_shards, tmp_path):
    """--lr 0 was refused; it runs the whole pipeline with the student left at the teacher's weights (a baseline)."""
    out = tmp_path / "run"
    loop.run(tiny_config(train_shards, out, steps=2, lr=0.0, fuse=False))
    student = torch.load(out / checkpoint.LATEST, weights_only=True)["student"]
    teacher = torch.load(out / "teacher_init.pt", weights_only=True)  # the student starts as the teacher
    assert student.keys() == teacher.keys() and all(torch.equal(student[k], v) for k, v in teacher.items())
