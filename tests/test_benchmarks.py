"""The GPU benchmark scripts run end to end on the CPU with the tiny model, so a GPU session finds them working."""

from __future__ import annotations

import json

from conftest import TINY_CLIP, run_cli


def test_step_variants_times_every_lever_and_profiles(tmp_path):
    variants = "naive,ours,ours+devaug,ours+devjpeg,ours+ckpt1"  # +compile/+cteacher: 20 s of compiling, run by hand
    run_cli(
        "benchmarks.step_variants",
        *("--model", TINY_CLIP, "--batches", "2x2", "--variants", variants),
        *("--steps", 1, "--warmup", 1, "--profile", 1, "--out", tmp_path),
        timeout=300,
    )
    record = json.loads((tmp_path / "step_variants_cpu.json").read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == set(variants.split(","))
    assert all(r["status"] == "ok" and r["s_per_step"] > 0 and "profile" in r for r in rows.values())
    assert rows["ours"]["first_loss"] == rows["naive"]["first_loss"]
    assert abs(rows["ours+ckpt1"]["first_loss"] - rows["ours"]["first_loss"]) < 1e-5  # recomputed, not changed
    # the loader's two device forms are the same pictures and crops: JPEG only adds its compression
    assert abs(rows["ours+devaug"]["first_loss"] - rows["ours+devjpeg"]["first_loss"]) < 0.05


def test_step_variants_refuses_an_unknown_lever(tmp_path):
    for lever in ("turbo", "ckptx"):
        variants = f"naive,ours+{lever}"  # refused before the first variant runs
        proc = run_cli("benchmarks.step_variants", "--model", TINY_CLIP, "--variants", variants, check=False)
        assert proc.returncode != 0 and lever in proc.stderr and "options:" in proc.stderr
        assert "naive:" not in proc.stdout


def test_loader_bench_measures_each_place_the_crop_runs(train_shards, tmp_path):
    run_cli(
        "benchmarks.loader_bench",
        *("--shards", train_shards["unlabeled"], "--workers", 1, "--batch", 4, "--batches", 2, "--settle", 4),
        *("--model", TINY_CLIP, "--size", 32, "--out", tmp_path),
        timeout=300,
    )
    record = json.loads((tmp_path / "loader_bench.json").read_text())
    rows = {r["augment_on"]: r for r in record["rows"]}
    assert set(rows) == {"loader", "device", "device_jpeg"}
    assert all(r["videos_per_s"] > 0 for r in rows.values())
    assert rows["device"]["device_s_per_batch"] > 0 and rows["device_jpeg"]["device_s_per_batch"] > 0


def test_a_failing_lever_is_recorded_and_the_sweep_goes_on(monkeypatch):
    import torch

    from benchmarks import step_variants
    from benchmarks.harness import random_models, synthetic_batch
    from train import distributed
    from train.model import tokenizer_for

    cfg, models = random_models(str(TINY_CLIP), 2, distributed.init_distributed("cpu"), compile=False)
    base = {"student": models.student.clip, "teacher": models.teacher}
    tokenizer = tokenizer_for(str(TINY_CLIP))
    batches = {"plain": [synthetic_batch(2, 2, 32, tokenizer, seed, False) for seed in (1, 2)]}

    def broken_step(*args, **kwargs):
        raise RuntimeError("CUDA graph capture failed")

    monkeypatch.setattr(step_variants.loop, "train_step", broken_step)
    row = step_variants.run_variant("ours", base, cfg, batches, torch.device("cpu"), 1, 0, 0)
    assert row["status"] == "error" and "CUDA graph capture failed" in row["error"]
    monkeypatch.undo()
    assert step_variants.run_variant("ours", base, cfg, batches, torch.device("cpu"), 1, 0, 0)["status"] == "ok"
