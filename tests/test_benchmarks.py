"""The GPU benchmark scripts run end to end on the CPU with the tiny model, so a GPU session finds them working."""

from __future__ import annotations

import importlib
import json
import re

import pytest
from conftest import TINY_CLIP, run_cli, tiny_variant, write_csv


def test_step_variants_times_every_lever_and_profiles(tmp_path):
    variants = "naive,ours,ours+devaug,ours+devjpeg,ours+ckpt1,ours+qkv,ours+cudnn,ours+patch+flash,ours+cls,ours+math"
    variants += ",ours+prefetch,ours+tstream,ours+tahead"
    run_cli(
        "benchmarks.step_variants",
        *("--model", TINY_CLIP, "--batches", "2x2", "--variants", variants),
        *("--steps", 1, "--warmup", 1, "--profile", 1, "--out", tmp_path),
        timeout=300,
    )  # no +compile: minutes on the CPU
    record = json.loads((tmp_path / "step_variants_cpu.json").read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == set(variants.split(","))
    assert record["complete"] is True
    assert all(r["status"] == "ok" and r["s_per_step"] > 0 and "profile" in r for r in rows.values())
    assert all(r["s_per_step_synced"] > 0 for r in rows.values())  # each step on its own, beside back to back
    # ours cuts the captions' padding (--trim_text), naive does not: the same loss up to float rounding
    assert rows["ours"]["first_loss"] == pytest.approx(rows["naive"]["first_loss"], rel=1e-6)
    assert abs(rows["ours+ckpt1"]["first_loss"] - rows["ours"]["first_loss"]) < 1e-5  # recomputed, not changed
    assert abs(rows["ours+qkv"]["first_loss"] - rows["ours"]["first_loss"]) < 1e-4  # the same function
    assert rows["ours+cudnn"]["first_loss"] == rows["ours"]["first_loss"]  # no cuDNN on the CPU: the same kernel
    # math: what kernel_bench names where it timed fastest (the CPU's noise can make it so): a lever like the others
    assert abs(rows["ours+math"]["first_loss"] - rows["ours"]["first_loss"]) < 1e-4
    assert abs(rows["ours+patch+flash"]["first_loss"] - rows["ours"]["first_loss"]) < 1e-4
    assert abs(rows["ours+cls"]["first_loss"] - rows["ours"]["first_loss"]) < 1e-4
    # +cls is counted at the FLOPs it performs: its MFU does not gain from the rows it leaves out
    flops = {v: r["flops_per_step"] for v, r in rows.items()}
    assert flops["ours+cls"] < flops["ours"] == flops["ours+qkv"] == flops["ours+patch+flash"]
    assert flops["ours"] < flops["naive"]  # and the cut captions at the FLOPs of their width (naive: 32 tokens)
    assert rows["ours+prefetch"]["first_loss"] == rows["ours"]["first_loss"]  # the same batches, copied elsewhere
    assert rows["ours+tstream"]["first_loss"] == rows["ours"]["first_loss"]  # no second stream on the CPU: the same
    # the next step's teacher queued during the step before: the same losses (one stream on the CPU)
    assert rows["ours+tahead"]["first_loss"] == rows["ours"]["first_loss"]
    assert rows["ours+tahead"]["last_loss"] == pytest.approx(rows["ours"]["last_loss"], rel=1e-4)
    # the loader's two device forms are the same pictures and crops: JPEG only adds its compression
    assert abs(rows["ours+devaug"]["first_loss"] - rows["ours+devjpeg"]["first_loss"]) < 0.05


def test_step_variants_refuses_an_unknown_lever(tmp_path):
    from benchmarks.step_variants import variant_options

    refused = (("turbo", "options:"), ("ckptx", "options:"), ("flash+cudnn", "at most one attention kernel"))
    refused += (("compile+tma", "add +autotune"),)  # TMA templates are candidates only max-autotune tunes
    refused += (("tstream+tahead", "at most one of tstream, tahead"),)
    refused += (("cdt", "add +compile"),)  # it tunes the kernels torch.compile makes
    refused += (("split", "add +qkv or +cls"),)  # it splits their projections
    for lever, says in refused:
        with pytest.raises(SystemExit, match=re.escape(says)) as refusal:
            variant_options(f"ours+{lever}")
        assert lever.split("+")[0] in str(refusal.value)
    # through the CLI (a start is seconds: once): refused before the first variant runs
    proc = run_cli("benchmarks.step_variants", "--model", TINY_CLIP, "--variants", "naive,ours+turbo", check=False)
    assert proc.returncode != 0 and "turbo" in proc.stderr and "options:" in proc.stderr
    assert "naive:" not in proc.stdout


STEP_BENCHMARKS = ["kernel_bench", "epilogue_bench", "step_variants", "train_step"]
BAD_STEP_FLAGS = [  # (flags, the start of the refusal)
    ({"model": "nope"}, "--model 'nope'"),
    ({"batches": "8x"}, "--batches"),
    ({"model": str(TINY_CLIP), "batches": "1x1", "frames": 0}, "--frames must be a whole number of at least 1"),
    ({"model": str(TINY_CLIP), "batches": "1x1", "frames": "two"}, "--frames must be a whole number of at least 1"),
]


@pytest.mark.parametrize("script", STEP_BENCHMARKS)
@pytest.mark.parametrize("flags, says", BAD_STEP_FLAGS)
def test_the_step_benchmarks_refuse_a_bad_model_batch_or_frames_before_any_work(tmp_path, script, flags, says):
    # in process: a CLI start costs seconds, and each benchmark's own check is what differs (the CLI: below)
    main = importlib.import_module(f"benchmarks.{script}").main
    with pytest.raises(SystemExit) as refusal:
        main(**flags, out=str(tmp_path / "out"))
    assert str(refusal.value).startswith(f"error: {says}") and "\n" not in str(refusal.value)
    assert not (tmp_path / "out").exists()


def test_a_step_benchmarks_refusal_reaches_the_shell_as_one_line(tmp_path):
    proc = run_cli(
        "benchmarks.kernel_bench", "--model", TINY_CLIP, "--frames", "two", "--out", tmp_path / "o", check=False
    )
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: --frames must be a whole number of at least")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_kernel_bench_times_each_attention_kernel_and_both_patch_embeddings_and_last_blocks(tmp_path):
    proc = run_cli("benchmarks.kernel_bench", "--model", TINY_CLIP, "--batches", "2x3", "--out", tmp_path, timeout=300)
    record = json.loads((tmp_path / "kernels.json").read_text())
    calls = {r["call"]: r for r in record["attention"]}
    assert set(calls) == {"student image", "student text", "teacher image", "teacher text"}
    assert calls["student image"]["batch"] == 5 * 4 and calls["student image"]["tokens"] == (32 // 8) ** 2 + 1
    teacher_text = calls["teacher text"]
    assert teacher_text["batch"] == 3 and teacher_text["mask"] and not teacher_text["backward"]
    for row in calls.values():  # on the CPU: torch's own choice, flash and math run; cuDNN's and efficient do not
        assert row["auto"] > 0 and row["math"] > 0 and row["cudnn"] is None and row["efficient"] is None
    totals = record["step_attention_s"]
    assert set(totals) == {"auto", "cudnn", "flash", "efficient", "math"}
    assert totals["math"] == pytest.approx(sum(r["math"] * r["layers"] for r in calls.values()))
    assert record["best_attention_kernel"] in totals
    patch = record["patch_embed"]
    assert patch["conv"] > 0 and patch["linear"] > 0 and patch["max_relative_difference"] < 1e-5
    block = record["last_block"]
    assert (block["images_student"], block["images_teacher"], block["tokens"]) == (5 * 4, 3 * 4, 17)
    assert block["full"] > 0 and block["cls"] > 0 and block["max_relative_difference"] < 1e-5
    assert "last block (20 + 12 images of 17 tokens): every row" in proc.stdout
    assert "to try in the step: --attention_kernel" in proc.stdout
    proc = run_cli("benchmarks.kernel_bench", "--model", TINY_CLIP, "--batches", "2x3,4x4", check=False)
    assert proc.returncode != 0 and "one LxU" in proc.stderr


def test_kernel_bench_falls_back_as_the_trainer_does_and_names_the_levers_worth_a_step():
    from benchmarks.kernel_bench import best_kernel, step_attention_s, step_levers

    rows = [  # neither cuDNN nor flash serves the masked text call: both fall back to the efficient kernel there
        {"layers": 12, "auto": 3.0, "cudnn": 2.0, "flash": 2.5, "efficient": 4.0, "math": 9.0},
        {"layers": 12, "auto": 1.0, "cudnn": None, "flash": None, "efficient": 1.0, "math": 2.0},
    ]
    totals = step_attention_s(rows)
    assert totals == {"auto": 48.0, "cudnn": 36.0, "flash": 42.0, "efficient": 60.0, "math": 132.0}
    assert best_kernel(totals) == "cudnn"
    assert best_kernel({**totals, "auto": 36.5}) == "auto"  # within 2% of the fastest: torch's own choice stays
    assert step_levers("cudnn", {"conv": 13.6, "linear": 1.0}, {"full": 3.0, "cls": 1.0}) == ["patch", "cls", "cudnn"]
    assert step_levers("auto", {"conv": 1.01, "linear": 1.0}, {"full": 1.01, "cls": 1.0}) == []
    # torch's own choice failed a call (its kernel refused it): judged without it, where it used to be a crash
    failed = [{**rows[0], "auto": None}, rows[1]]
    assert "auto" not in step_attention_s(failed) and best_kernel(step_attention_s(failed)) == "cudnn"
    assert best_kernel({}) == "auto"


def test_kernel_bench_keeps_what_it_measured_when_a_section_fails(tmp_path, monkeypatch):
    """kernels.json chooses the GPU call's LEVERS: it was written only at the end, so a failing section (a kernel a
    GPU refuses, out of memory) lost every timing, and the call went on without +cls and +patch. A failed section
    advises no lever; the file is there after each section."""
    from benchmarks import kernel_bench

    def fails(*args):
        # written before it, with the levers measured so far: a part cut off here leaves LEVERS to choose from
        written = json.loads((tmp_path / "kernels.json").read_text())
        assert written["patch_embed"]["conv"] > 0 and "cls" not in written["step_levers"]
        partial.append(written)
        raise RuntimeError("CUDA error: no kernel image is available\nmore")

    partial = []

    monkeypatch.setattr(kernel_bench, "last_block_rows", fails)
    kernel_bench.main(str(TINY_CLIP), "2x3", out=str(tmp_path))
    record = json.loads((tmp_path / "kernels.json").read_text())
    assert record["last_block"] == {"error": "RuntimeError: CUDA error: no kernel image is available\nmore"}
    assert "cls" not in record["step_levers"] and record["text_tower"]["full"] > 0
    assert kernel_bench.step_levers("auto", {"error": "x"}, {"full": 3.0, "cls": 1.0}) == ["cls"]
    assert kernel_bench.step_levers("cudnn", None, None) == ["cudnn"]  # not measured yet
    # the verdict reads a kernels.json cut off after the patch embedding, and one with a failed section (it raised
    # KeyError on both, and lost the verdict and the next call's line)
    from benchmarks.issue6_verdict import kernel_lines

    lines = kernel_lines(partial[0])
    assert len(lines) == 2 and lines[1].startswith("patch embedding alone: convolution ")
    lines = kernel_lines(record)
    assert "last block alone: failed (RuntimeError: CUDA error: no kernel image is available); its lever" in lines[2]
    assert lines[3].startswith("text tower alone: ")


def test_kernel_bench_gives_the_text_mask_in_the_dtype_the_step_gives_it_to_sdpa(monkeypatch):
    """The step's mask reaches SDPA in bf16 (CUDA autocast casts its inputs); a float32 one beside bf16 q, k, v is a
    call the memory-efficient kernel refuses, and torch's own choice with it failed unguarded."""
    import torch
    import torch.nn.functional as F

    from benchmarks import kernel_bench

    seen = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, attn_mask: seen.append(attn_mask) or q)
    kernel_bench.attention_call(2, 5, 2, 4, False, True, torch.device("cpu"), torch.bfloat16)()
    assert seen[0].dtype == torch.bfloat16 and seen[0].shape == (5, 5) and seen[0][0, 1] == float("-inf")


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
    assert record["complete"] is True
    assert all(r["videos_per_s"] > 0 for r in rows.values())
    assert rows["device"]["device_s_per_batch"] > 0 and rows["device_jpeg"]["device_s_per_batch"] > 0
    # the workers of device_jpeg hand on JPEG bytes: they decode none, so they have no share of the decode limit
    assert rows["loader"]["jpeg_per_s_per_worker"] > 0 and rows["device_jpeg"]["jpeg_per_s_per_worker"] is None


def test_loader_bench_uses_the_trainers_tokenizer_and_leaves_torchs_threads_as_they_were(train_shards, caplog):
    import torch

    from benchmarks.loader_bench import jpeg_limit, trainer_tokenizer
    from train.data import list_shards
    from train.model import TrimmedTokenizer

    assert isinstance(trainer_tokenizer(str(TINY_CLIP)), TrimmedTokenizer)  # as train.main's text_tokenizer
    assert "No pretrained weights" not in caplog.text  # open_clip's warning: the model is built only for its shape
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert jpeg_limit(list_shards(str(train_shards["unlabeled"])), seconds=0.05)[0] > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def tiny_sweep():
    """What step_variants.run_variant takes, for the tiny model on the CPU: base models, config, batches."""
    from benchmarks.harness import random_models, synthetic_batch
    from benchmarks.step_variants import NO_LEVERS
    from train import distributed
    from train.model import tokenizer_for

    cfg, models = random_models(str(TINY_CLIP), 2, distributed.init_distributed("cpu"), compile=False, **NO_LEVERS)
    base = {"student": models.student.clip, "teacher": models.teacher}
    tokenizer = tokenizer_for(str(TINY_CLIP))
    return base, cfg, {"plain": [synthetic_batch(2, 2, 32, tokenizer, seed, False) for seed in (1, 2)]}


def test_tma_variants_compile_student_and_teacher_with_the_mode_and_the_templates(monkeypatch):
    import torch

    from benchmarks import step_variants

    base, cfg, batches = tiny_sweep()
    compiled = []
    monkeypatch.setattr(step_variants.torch, "compile", lambda model, **kwargs: compiled.append(kwargs) or model)
    row = step_variants.run_variant(
        "ours+compile+cteacher+autotune+tma", base, cfg, batches, torch.device("cpu"), 1, 0, 0
    )
    options = {"max_autotune": True, "coordinate_descent_tuning": True, "triton.enable_persistent_tma_matmul": True}
    assert row["status"] == "ok" and compiled == [{"options": options}] * 2
    compiled.clear()
    step_variants.run_variant("ours+compile+cteacher+autotune", base, cfg, batches, torch.device("cpu"), 1, 0, 0)
    assert compiled == [{"mode": "max-autotune-no-cudagraphs"}] * 2
    compiled.clear()  # +cdt: the default mode with its Triton kernels' block sizes tuned
    step_variants.run_variant("ours+compile+cteacher+cdt", base, cfg, batches, torch.device("cpu"), 1, 0, 0)
    assert compiled == [{"options": {"coordinate_descent_tuning": True}}] * 2


def test_variants_run_open_clip_layers_unless_they_name_a_lever(monkeypatch):
    """The trainer's layer levers are on by default; a variant has only those it names (+qkv, +patch, +cls), on
    the student and the teacher, and its config says so."""
    import torch
    from open_clip.transformer import ResidualAttentionBlock

    from benchmarks import step_variants

    base, cfg, batches = tiny_sweep()
    seen = []

    def spy(models, optimizer, scheduler, lab, unl, cfg_v, *args, **kwargs):
        seen.append((models, cfg_v))
        return {"loss": torch.tensor(1.0)}

    monkeypatch.setattr(step_variants.loop, "train_step", spy)

    def levers(variant: str) -> list[set[str]]:
        seen.clear()
        step_variants.run_variant(variant, base, cfg, batches, torch.device("cpu"), 1, 0, 0)
        models, cfg_v = seen[-1]
        found = []
        for clip in (models.student.clip, models.teacher.clip):
            blocks = [b for b in clip.modules() if isinstance(b, ResidualAttentionBlock)]
            on = {"qkv"} if all("attention" in vars(b) for b in blocks) else set()
            on |= {"patch"} if "forward" in vars(clip.visual.conv1) else set()
            on |= {"cls"} if "forward" in vars(clip.visual.transformer) else set()
            found.append(on)
        found.append({o for o, flag in step_variants.LEVER_FLAGS.items() if getattr(cfg_v, flag)})
        return found

    assert levers("ours") == [set()] * 3
    assert levers("ours+qkv+cls") == [{"qkv", "cls"}] * 3
    assert levers("ours+patch") == [{"patch"}] * 3
    seen.clear()  # +split: the packed attention's projections split, and its flag set
    step_variants.run_variant("ours+qkv+cls+split", base, cfg, batches, torch.device("cpu"), 1, 0, 0)
    models, cfg_v = seen[-1]
    assert cfg_v.split_qkv and cfg_v.packed_qkv and cfg_v.cls_last_block
    for clip in (models.student.clip, models.teacher.clip):
        blocks = [b for b in clip.modules() if isinstance(b, ResidualAttentionBlock)]
        assert all(vars(b)["attention"].__name__ == "_split_block_attention" for b in blocks)
        assert vars(clip.visual.transformer)["forward"].__name__ == "_split_transformer_forward"


def test_a_failing_lever_is_recorded_and_the_sweep_goes_on(monkeypatch):
    import torch

    from benchmarks import harness, step_variants

    base, cfg, batches = tiny_sweep()

    def broken_step(*args, **kwargs):
        raise RuntimeError("CUDA graph capture failed")

    monkeypatch.setattr(step_variants.loop, "train_step", broken_step)
    row = step_variants.run_variant("ours", base, cfg, batches, torch.device("cpu"), 1, 0, 0)
    assert row["status"] == "error" and "CUDA graph capture failed" in row["error"]
    monkeypatch.undo()
    assert step_variants.run_variant("ours", base, cfg, batches, torch.device("cpu"), 1, 0, 0)["status"] == "ok"

    # a profiler that fails (CUPTI under CUDA graphs) keeps the variant's timing, which was handed over before it
    def broken_profile(*args, **kwargs):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    monkeypatch.setattr(harness, "profile_steps", broken_profile)
    timed = []
    row = step_variants.run_variant("ours", base, cfg, batches, torch.device("cpu"), 1, 0, 2, on_timed=timed.append)
    assert row["status"] == "ok" and row["s_per_step"] > 0 and "CUPTI_ERROR" in row["profile_error"]
    assert timed == [row]


def _rows(**videos_per_s):
    return [{"variant": v, "batch": "128x128", "status": "ok", "videos_per_s": s} for v, s in videos_per_s.items()]


def test_the_issue6_verdict_says_what_the_step_would_reach_with_only_its_matmul_convolution_and_attention_kernels():
    from benchmarks.issue6_verdict import step_lines

    # the H200 figures of the default step, with its kernels sorted as train.profiling now sorts them
    kinds = {"matmul": 0.1787, "attention": 0.0479, "fused (triton)": 0.1042, "convolution": 0.0136, "other": 0.0114}
    best = {
        **_rows(**{"ours+compile+cteacher": 709.6})[0],
        "mfu_measured": 0.4525,
        "s_per_step": 0.3608,
        "profile": {"busy_s_per_step": sum(kinds.values()), "by_kind_s_per_step": kinds},
    }
    lines = step_lines({"device": "cuda", "rows": [best, *_rows(naive=347.9)]})
    assert lines[1] == (
        "time of ours+compile+cteacher per step: matmul 178.7 ms, convolution 13.6 ms, attention 47.9 ms, the rest "
        "115.6 ms (fused (triton) 104.2, other 11.4), of 355.8 ms busy in a 360.8 ms step; with only those three kinds "
        "of kernels it would reach 68.0% MFU; 55% needs a 296.8 ms step (64.0 ms less)"
    )
    # 0.4525 * 360.8 / (178.7 + 13.6 + 47.9) = 68.0%; 0.4525 * 360.8 / 0.55 = 296.8
    # a profile with the idle time's split (train.gaps.idle_gaps, since 2026-11-28): a line before that one
    best["profile"]["idle"] = {
        "idle_s_per_step": 0.005,
        "by_size": {"under 10 us": {"gaps_per_step": 1500, "s_per_step": 0.004}},
        "largest": [{"us": 400.0, "after": "triton_red_fused_sum_0", "before": "nvjet_sm90"}],
    }
    assert step_lines({"device": "cuda", "rows": [best, *_rows(naive=347.9)]})[1:3] == [
        "the GPU in ours+compile+cteacher's profile: idle between its kernels 5.0 ms (4.0 ms in 1500 gaps under 10 "
        "us), the longest 0.40 ms after triton_red_fused_sum_0",
        lines[1],
    ]
    del best["profile"]  # a row timed without the profiler: no such line
    assert not step_lines({"device": "cuda", "rows": [best]})[1].startswith("time of")


def test_the_issue6_verdict_says_what_overlapping_the_copy_saves_and_judges_the_mfu_on_the_fastest():
    """+prefetch feeds a variant as the trainer does (its batch's copy on the prefetcher's stream): a line of what it
    saves against the same variant copied by the step, not a lever to advise; the MFU is the fastest row's."""
    from benchmarks.issue6_verdict import step_lines

    levers = "ours+compile+cteacher+qkv+cls+patch"
    rows = _rows(naive=347.9, **{levers: 780.0, f"{levers}+prefetch": 792.0})
    for row, s_per_step, mfu in zip(rows[1:], (0.3282, 0.3232), (0.498, 0.506), strict=True):
        row.update(s_per_step=s_per_step, mfu_measured=mfu)
    lines = step_lines({"device": "cuda", "rows": rows})
    assert lines[0].startswith(f"MFU at 128x128: 50.6% of the measured peak with {levers}+prefetch (target 55%)")
    assert (
        f"the batch's copy overlapped, as the trainer feeds the step: {levers}+prefetch 1.015x {levers} (5.0 ms a step)"
    ) in lines
    assert not any("worth making" in line or "prefetch together" in line for line in lines)


@pytest.mark.parametrize(
    ("option", "what", "flag"),
    [
        ("tstream", "the teacher beside the student's forward", "--teacher_stream beside"),
        ("tahead", "the next step's teacher beside the backward", "--teacher_stream ahead"),
    ],
)
def test_the_issue6_verdict_judges_the_teacher_on_its_own_stream_as_a_lever(option, what, flag):
    """+tstream and +tahead are --teacher_stream's values, off by default: each judged against the same variant
    without it, and advised only where it beats timing noise."""
    from benchmarks.issue6_verdict import step_lines

    fed = "ours+compile+cteacher+qkv+cls+patch+prefetch"
    for faster, advice in ((820.0, f"worth making the default ({flag})"), (795.0, "no gain worth a default")):
        lines = step_lines({"device": "cuda", "rows": _rows(naive=347.9, **{fed: 792.0, f"{fed}+{option}": faster})})
        said = [line for line in lines if line.startswith(f"{what}: ")]
        assert len(said) == 1 and said[0].endswith(advice)
        assert said[0].startswith(f"{what}: {fed}+{option} {faster / 792:.3f}x the step without it")


def test_the_issue6_verdict_judges_each_target_and_suggests_defaults(tmp_path):
    from benchmarks.issue6_verdict import verdict

    step = {"device": "cuda", "rows": _rows(naive=360, **{"ours+compile+cteacher": 700})}
    step["rows"] += _rows(**{"ours+compile+cteacher+devaug": 690, "ours+compile+cteacher+devjpeg": 660})
    step["rows"] += _rows(**{"ours+compile+cteacher+qkv": 693, "ours+compile+cteacher+devjpeg+qkv": 680})
    for r in step["rows"]:
        r["mfu_measured"] = r["videos_per_s"] / 1300  # 700 videos/s -> 53.8%
    step["rows"].append({"variant": "ours+compile+cteacher+graphs", "status": "error", "videos_per_s": 0})
    loader = {
        "rows": [
            {"augment_on": "loader", "workers": 6, "videos_per_s": 800},
            {"augment_on": "device", "workers": 6, "videos_per_s": 1200},  # 1.74x of 690
            {"augment_on": "device_jpeg", "workers": 6, "videos_per_s": 5000},  # 7.6x of 660
        ]
    }
    memory = {
        "device": "cuda",
        "rows": _rows(**{"ours+compile+ckpt6": 0.80, "ours+compile+ckpt": 0.90, "ours+compile+ckpt4": 0}),
    }
    for r, gib in zip(memory["rows"], (70.0, 24.0, 81.0), strict=True):
        r.update(s_per_step=r.pop("videos_per_s") or 0.7, peak_gib=gib, batch="256x256")
    # the tune part's variants are judged beside the step part's: the fastest names the MFU, each lever its gain
    tune = {
        "device": "cuda",
        "rows": _rows(**{"ours+compile+cteacher+cudnn": 721, "ours+compile+cteacher+qkv+cudnn": 800}),
    }
    tune["rows"][1].update(mfu_measured=0.56, first_step_s=200.0)
    tune["rows"].append(
        {
            **tune["rows"][1],
            "variant": "ours+compile+cteacher+qkv+cudnn+autotune",
            "videos_per_s": 810,
            "first_step_s": 420.0,
        }
    )
    tuned = "\n".join(verdict(step, None, None, tune))
    assert "MFU at 128x128: 56.0% of the measured peak with ours+compile+cteacher+qkv+cudnn+autotune" in tuned
    assert "cuDNN attention first: ours+compile+cteacher+cudnn 1.030x the step without it: worth making" in tuned
    assert "cuDNN attention first: ours+compile+cteacher+qkv+cudnn 1.154x" in tuned  # against +qkv, 693
    assert (  # against the same variant compiled in torch's default mode, with the compile time of each
        "max-autotune compile: ours+compile+cteacher+qkv+cudnn+autotune 1.012x the step without it; first step "
        "420.0 s against 200.0 s: no gain worth a default"
    ) in tuned
    assert (
        "qkv and cudnn together: ours+compile+cteacher+qkv+cudnn 1.143x the step without them: worth making the "
        "default (--packed_qkv True --attention_kernel cudnn)"
    ) in tuned
    assert verdict(None, None, None, tune)[0].startswith("MFU at 128x128: 56.0%")
    # the numerics check with both attention levers: passed, it changes nothing; failed, neither becomes a default
    numerics = {
        "device": "NVIDIA H200",
        "flags": {"compile": False, "packed_qkv": True, "attention_kernel": "cudnn"},
        "relative_loss_difference": 2.4e-4,
        "gradient_cosine": 0.99976,
        "norm_ratio": 1.0056,
        "non_finite_gradients": 0,
    }
    passed = "\n".join(verdict(step, None, None, tune, numerics))
    assert (
        "numerics on NVIDIA H200 with --attention_kernel cudnn --packed_qkv True: relative loss difference 2.4e-04 "
        "(target < 0.01), gradient cosine 0.99976 (> 0.99), norm ratio 1.0056, non-finite gradients 0: MET"
    ) in passed
    assert (
        "qkv and cudnn together: ours+compile+cteacher+qkv+cudnn 1.143x the step without them: worth making" in passed
    )
    assert "none in this OUT" not in passed
    # without numerics.json (the numerics part failed, was cut off or did not run): no lever is a default as it is
    assert (
        "qkv and cudnn together: ours+compile+cteacher+qkv+cudnn 1.143x the step without them: worth making the "
        "default (--packed_qkv True --attention_kernel cudnn) only once a numerics check with it passes: none in "
        "this OUT"
    ) in tuned
    failed = "\n".join(verdict(step, None, None, tune, {**numerics, "non_finite_gradients": 3}))
    assert "non-finite gradients 3: NOT MET" in failed
    assert (
        "qkv and cudnn together: ours+compile+cteacher+qkv+cudnn 1.143x the step without them: faster, but not a "
        "default: the numerics check with cudnn, qkv failed"
    ) in failed
    assert "worth making" not in failed  # every faster variant here uses qkv or cudnn
    patched = {**numerics, "flags": {"packed_qkv": True, "linear_patch_embed": True, "attention_kernel": "flash"}}
    assert (
        "with --attention_kernel flash --linear_patch_embed True --packed_qkv True"
        in verdict(None, None, None, None, patched)[0]
    )
    kernels = {
        "device": "NVIDIA H200",
        "batch": "128x128",
        "step_attention_s": {"auto": 0.0446, "flash": 0.0512, "math": 0.2},
        "best_attention_kernel": "auto",
        "patch_embed": {"conv": 0.0181, "linear": 0.0012},
    }
    judged = [
        "attention kernels alone on NVIDIA H200 at 128x128 (per step, fastest first): auto 44.6 ms, flash first "
        "51.2 ms, math first 200.0 ms; tried in the step: --attention_kernel auto",
        "patch embedding alone: convolution 18.10 ms, linear 1.20 ms per step (15.08x)",
    ]
    assert verdict(None, None, None, None, None, kernels) == judged  # a kernels.json from before the last block
    kernels["last_block"] = {"full": 0.0242, "cls": 0.0040}
    assert verdict(None, None, None, None, None, kernels) == [
        *judged,
        "last block alone: every row 24.20 ms, class token's row 4.00 ms per step (6.05x)",
    ]
    kernels["text_tower"] = {"context": 77, "width": 32, "full": 0.0210, "trimmed": 0.0100}
    assert verdict(None, None, None, None, None, kernels)[-1] == (
        "text tower alone: 77 tokens 21.00 ms, cut to 32 (--trim_text, the default) 10.00 ms per step (2.10x)"
    )
    cosine = "\n".join(verdict(None, None, None, None, {**numerics, "gradient_cosine": 0.95}))
    assert cosine.endswith("NOT MET")
    oom = {"device": "cuda", "rows": [{**step["rows"][1]}, {"variant": "naive", "batch": "128x128", "status": "OOM"}]}
    assert "speed-up over naive: NOT JUDGED (naive: OOM; it needs an H200 at 128+128)" in verdict(oom, None, None)
    text = "\n".join(verdict(step, loader, memory))
    assert "MFU at 128x128: 53.8% of the measured peak with ours+compile+cteacher (target 55%): NOT MET" in text
    assert "speed-up over naive: 1.94x (target 1.7x): MET" in text
    assert "variants that failed: ours+compile+cteacher+graphs" in text
    assert "packed attention: ours+compile+cteacher+qkv 0.990x the step without it: no gain worth a default" in text
    assert (
        "packed attention: ours+compile+cteacher+devjpeg+qkv 1.030x the step without it: "
        "worth making the default (--packed_qkv True)"
    ) in text
    assert "loader, --augment_on device: 1200 videos/s with 6 workers = 1.74x" in text
    # each mode's margin is over the fastest step fed as that mode feeds it: the levers raise the demand
    assert (
        "loader, --augment_on device_jpeg: 5000 videos/s with 6 workers = 7.35x the step's 680 videos/s "
        "(ours+compile+cteacher+devjpeg+qkv) (target 2.0x): MET"
    ) in text
    assert "loader, --augment_on loader: 800 videos/s with 6 workers = 1.14x the step's 700 videos/s (" in text
    assert "suggested GPU default: --augment_on device_jpeg" in text  # the only mode fed with 2x
    assert "ours+compile+ckpt4: ok (81.0 GiB)" in text  # over the cap: does not fit
    assert "256+256 under 80 GiB: MET; fastest ours+compile+ckpt6, 0.800 s/step" in text
    assert "--grad_checkpointing 6" in text

    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "step_variants_cuda.json").write_text(json.dumps(memory))
    proc = run_cli("benchmarks.issue6_verdict", "--out", tmp_path)  # the memory part alone
    assert "--grad_checkpointing 6" in proc.stdout and "MFU" not in proc.stdout
    (tmp_path / "tuned" / "tune").mkdir(parents=True)
    (tmp_path / "tuned" / "tune" / "step_variants_cuda.json").write_text(json.dumps(tune))
    proc = run_cli("benchmarks.issue6_verdict", "--out", tmp_path / "tuned")  # the tune part alone
    assert "MFU at 128x128: 56.0%" in proc.stdout and "cuDNN attention first" not in proc.stdout  # no base row
    memory = {"device": "cpu", "rows": [{k: v for k, v in r.items() if k != "peak_gib"} for r in memory["rows"]]}
    assert verdict(None, None, memory) == ["memory: not measured on cpu (no GPU memory figures)"]
    proc = run_cli("benchmarks.issue6_verdict", "--out", tmp_path / "none", check=False)
    assert proc.returncode != 0 and "gpu_step.sh" in proc.stderr


def test_epilogue_bench_times_the_mlp_half_each_way_and_keeps_going_past_a_failing_one(tmp_path, monkeypatch):
    from benchmarks import epilogue_bench

    run_cli("benchmarks.epilogue_bench", "--model", TINY_CLIP, "--batches", "1x1", "--out", tmp_path, timeout=300)
    record = json.loads((tmp_path / "epilogue.json").read_text())
    ways = {row.pop("way"): row for row in record["ways"]}
    assert record["complete"] is True and list(ways) == ["default", "autotune+tma", "autotune"]  # the cache's order
    assert record["images"] == 8 and record["tokens"] == 17 and record["layers"] == 2  # (1+1) x 4 frames, 4x4+1
    assert record["timing"].startswith("side by side")
    for row in ways.values():  # fp32 on the CPU: the same function each way
        assert row["s"] > 0 and row["s_alone"] > 0 and row["step_s"] == row["s"] * 2
        assert row["max_relative_difference"] < 1e-5
        assert row["profile"]["busy_s_per_step"] > 0 and "matmul" in row["profile"]["by_kind_s_per_step"]

    import torch

    real_way, real_rounds, compiled = epilogue_bench.way_row, epilogue_bench.side_by_side, {}

    def tma_fails(block, x, grad, mode, tma, device, dtype):
        if tma:
            raise RuntimeError("TMA descriptor creation failed")
        return real_way(block, x, grad, mode, tma, device, dtype)

    def counted_rounds(calls, device):
        compiled["before"] = torch._dynamo.utils.counters["frames"]["ok"]
        seconds = real_rounds(calls, device)
        compiled["after"] = torch._dynamo.utils.counters["frames"]["ok"]
        return seconds

    monkeypatch.setattr(epilogue_bench, "way_row", tma_fails)
    monkeypatch.setattr(epilogue_bench, "side_by_side", counted_rounds)
    record = epilogue_bench.main(model=str(TINY_CLIP), batches="1x1", device="cpu", out=str(tmp_path / "failed"))
    assert record["ways"][1] == {"way": "autotune+tma", "error": "RuntimeError: TMA descriptor creation failed"}
    assert record["ways"][2]["s"] > 0 and record["complete"] is True
    assert compiled["after"] == compiled["before"]  # the rounds ran what was compiled, compiling nothing again

    def default_fails(block, x, grad, mode, tma, device, dtype):
        if mode == "default":
            raise RuntimeError("the default way failed")
        return real_way(block, x, grad, mode, tma, device, dtype)

    monkeypatch.setattr(epilogue_bench, "way_row", default_fails)
    record = epilogue_bench.main(model=str(TINY_CLIP), batches="1x1", device="cpu", out=str(tmp_path / "no_default"))
    # nothing to compare with: not the first way that ran
    assert [row.get("max_relative_difference", "failed") for row in record["ways"]] == ["failed", None, None]


def test_the_epilogue_ways_are_timed_in_interleaved_rounds():
    import torch

    from benchmarks.epilogue_bench import side_by_side

    order = []
    calls = {way: (lambda way=way: order.append(way)) for way in ("a", "b")}
    seconds = side_by_side(calls, torch.device("cpu"), rounds=2, per_round=3)
    assert order == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4 and set(seconds) == {"a", "b"}


def test_the_issue6_verdict_reports_the_mlp_halves_each_way():
    from benchmarks.issue6_verdict import epilogue_lines

    record = {"device": "NVIDIA H200", "batch": "128x128", "layers": 12, "complete": True}
    kinds = {"fused (triton)": 0.0052, "matmul": 0.0021}  # per call: two of the products took their epilogue
    record["ways"] = [
        {"way": "default", "first_s": 14.2, "step_s": 0.1080},
        {"way": "autotune+tma", "first_s": 61.0, "step_s": 0.0900, "profile": {"by_kind_s_per_step": kinds}},
        {"way": "autotune", "error": "RuntimeError: out of resource: shared memory"},
    ]
    assert epilogue_lines(record) == [
        "MLP halves alone (the student's 12 image blocks per step, forward and backward, on NVIDIA H200 at 128x128): "
        "default 108.0 ms (first call 14.2 s), autotune+tma 90.0 ms (1.200x, first call 61.0 s, fused (triton) 62.4, "
        "matmul 25.2), autotune failed (RuntimeError: out of resource: shared memory)"
    ]
    del record["ways"][2]
    record["complete"] = False  # the time limit stopped it in its third way
    assert epilogue_lines(record)[0].endswith("matmul 25.2); stopped before its end (time limit?)")


def test_the_issue6_verdict_names_the_second_device_call(tmp_path):
    """The call a lent session makes next on the warm machine, from what the first call measured."""
    from benchmarks.issue6_verdict import DEFAULT, next_call_lines

    levers = f"{DEFAULT}+flash"  # within 2% of the default: no gain to check (that case is below)
    step = {"device": "NVIDIA H200", "rows": _rows(naive=348, **{DEFAULT: 750, levers: 760})}
    for row, seconds in zip(step["rows"], (0.736, 0.3605, 0.337), strict=True):
        row["s_per_step"] = seconds
    # max-autotune's MLP halves 1.2x faster than the default mode's: the whole step's tune is worth a call
    ways = [{"way": "default", "step_s": 0.108}, {"way": "autotune+tma", "step_s": 0.090}]
    epilogue = {"complete": True, "ways": [*ways, {"way": "autotune", "error": "RuntimeError: out of resource"}]}

    def why(seconds: int) -> str:
        return (
            f"next call, only with at least {seconds} device-seconds left (timeout_s: those seconds less 20; BUDGET: "
            "less 40): "
        )

    tune_cmd = [  # the tune part starts with 120 s of BUDGET left: 120 + 20 for the verdict + 40 + 20 to start
        why(200) + "this call did not time both max-autotune variants",
        f'next call: PARTS="tune" LEVERS={levers} TUNE_VARIANTS={levers},{levers}+autotune+tma,{levers}+autotune '
        "BUDGET=SECONDS_LEFT_LESS_40 OUT=$OUT bash benchmarks/gpu_step.sh",
    ]
    assert next_call_lines(step, None, epilogue, levers) == tune_cmd  # the tune part did not run
    assert next_call_lines(step, None, None, levers) == tune_cmd  # nor the epilogue part
    tune = {"device": "NVIDIA H200", "rows": _rows(**{f"{levers}+autotune+tma": 790})}
    assert next_call_lines(step, tune, epilogue, levers) == tune_cmd  # cut short after its first variant
    tune["rows"] += [{"variant": f"{levers}+autotune", "status": "error", "videos_per_s": 0}]
    assert next_call_lines(step, tune, epilogue, levers) == tune_cmd  # its second variant failed
    epilogue_cmd = [  # the epilogue part's 160 s first
        why(360) + "this call did not time both max-autotune variants",
        tune_cmd[1].replace('"tune"', '"epilogue tune"'),
    ]
    assert next_call_lines(step, tune, {"complete": False, "ways": ways[:1]}, levers) == epilogue_cmd
    # cut short in its third way after a faster second: that answered it, on to the tune alone
    assert next_call_lines(step, tune, {"complete": False, "ways": ways}, levers) == tune_cmd
    # the epilogue part complete, and no tuned way faster by 2%: no call (2026-11-28's H200: cuBLAS beat every
    # Triton template on the step's products)
    slow = {"complete": True, "ways": [ways[0], {"way": "autotune+tma", "step_s": 0.107}]}
    assert next_call_lines(step, None, slow, levers) == [
        "next call: none needed (max-autotune's MLP halves were no faster than torch's default mode's: at best "
        "1.009x; the whole step's tune would not gain either); give the machine back"
    ]
    failed = {"complete": True, "ways": [ways[0], {"way": "autotune", "error": "RuntimeError: out of resource"}]}
    assert "none measured" in next_call_lines(step, None, failed, levers)[0]
    # cut short in its third way, its second no faster: that says enough (+tma's candidates hold +autotune's)
    assert next_call_lines(step, None, {**slow, "complete": False}, levers) == next_call_lines(step, None, slow, levers)
    tune["rows"][1] = _rows(**{f"{levers}+autotune": 780})[0]
    done = ["next call: none needed (both max-autotune variants were timed); give the machine back"]
    assert next_call_lines(step, tune, epilogue, levers) == done
    assert next_call_lines(None, tune, None, levers) == done  # the second call itself: PARTS=tune
    none = ["next call: none (this call timed no step); give the machine back"]
    assert next_call_lines(None, None, None, levers, {"flags": {}}) == none  # a second call of other parts
    assert next_call_lines(step, tune, epilogue, "") == []  # LEVERS not given: no advice

    # the step part cut off by its time limit before the levers added to LEVERS fed: those, with the step they are
    # judged against (timed here, so cached: 20 s), in what a second call can have (270 s): +split compiles afresh
    # (90 s), +cdt compiles and tunes (180 s) and is left for later; 80 s for the call, 15 for step_variants' start
    fed = f"{levers}+prefetch"
    step["rows"].append({**step["rows"][2], "variant": fed})
    cut = {**step, "complete": False}
    assert next_call_lines(cut, tune, epilogue, levers) == [
        why(205) + f"the step part's time limit cut off {fed}+split, {fed}+cdt; on the warm machine inductor's "
        f"caches make the compile of what this call compiled short; {fed}+cdt left for a later session (the call "
        "would need 385 s)",
        f"next call: PARTS=step LEVERS={levers} STEP_VARIANTS={fed},{fed}+split BUDGET=SECONDS_LEFT_LESS_40 OUT=$OUT "
        "bash benchmarks/gpu_step.sh",
    ]
    # cut before LEVERS: LEVERS and LEVERS fed (its graph), beside the default LEVERS is judged against; the steps the
    # MFU is judged on stay whatever they cost
    early = {"device": "NVIDIA H200", "complete": False, "rows": _rows(naive=348, **{DEFAULT: 750})}
    assert next_call_lines(early, None, None, levers)[1].startswith(
        f"next call: PARTS=step LEVERS={levers} STEP_VARIANTS={DEFAULT},{levers},{fed} BUDGET="
    )
    only = {"device": "NVIDIA H200", "complete": False, "rows": _rows(naive=348)}  # LEVERS the default: named once
    assert next_call_lines(only, None, None, DEFAULT)[0].startswith(why(205))  # compiled afresh, then its graph
    assert f"STEP_VARIANTS={DEFAULT},{DEFAULT}+prefetch BUDGET" in next_call_lines(only, None, None, DEFAULT)[1]
    assert next_call_lines(step, tune, epilogue, levers) == done  # complete: the list left them out on purpose

    # +split made the fed step faster by 2% or more, and no numerics check covered it: that check next (cheap), with
    # the layer lever among LEVERS; +cdt (a compile option, which gpu_numerics does not take) needs none
    step["rows"] += _rows(**{f"{fed}+split": 760 * 1.03, f"{fed}+cdt": 760 * 1.05})
    numerics_cmd = [
        why(140) + "+split made the step faster, and no numerics check with it has run: a default needs one",
        f"next call: PARTS=numerics LEVERS={levers}+split BUDGET=SECONDS_LEFT_LESS_40 OUT=$OUT bash "
        "benchmarks/gpu_step.sh",
    ]
    assert next_call_lines(step, tune, epilogue, levers) == numerics_cmd
    checked = {"flags": {"packed_qkv": True, "split_qkv": False}}
    assert next_call_lines(step, tune, epilogue, levers, checked) == numerics_cmd  # a check without it
    checked["flags"]["split_qkv"] = True
    assert next_call_lines(step, tune, epilogue, levers, checked) == done  # checked: on to what comes next
    step["rows"][-2]["videos_per_s"] = 760 * 1.01  # within 2% of the step without it: no gain to check
    assert next_call_lines(step, tune, epilogue, levers) == done
    # the kernel LEVERS adds to the default, 2% faster than the default and not checked: its check, LEVERS as it is
    step["rows"][1]["videos_per_s"] = 700
    assert next_call_lines(step, tune, epilogue, levers) == [
        why(140) + "+flash made the step faster, and no numerics check with it has run: a default needs one",
        f"next call: PARTS=numerics LEVERS={levers} BUDGET=SECONDS_LEFT_LESS_40 OUT=$OUT bash benchmarks/gpu_step.sh",
    ]
    assert next_call_lines(step, tune, epilogue, levers, {"flags": {"attention_kernel": "flash"}}) == done

    # the CLI: the line after the verdict's, and a --levers that is not a step variant refused
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "step_variants_cuda.json").write_text(json.dumps(tune))
    proc = run_cli("benchmarks.issue6_verdict", "--out", tmp_path, "--levers", levers)
    assert proc.stdout.splitlines()[-1] == f"  {done[0]}"
    proc = run_cli("benchmarks.issue6_verdict", "--out", tmp_path, "--levers", "qkv", check=False)
    assert proc.returncode != 0 and "--levers must be a step variant that starts with" in proc.stderr


def test_the_issue6_verdict_judges_the_tma_templates_with_the_max_autotune_they_need():
    from benchmarks.issue6_verdict import lever_lines

    levers = "ours+compile+cteacher+qkv"
    rows = {r["variant"]: r for r in _rows(**{levers: 700, f"{levers}+autotune+tma": 770})}
    rows[levers]["first_step_s"], rows[f"{levers}+autotune+tma"]["first_step_s"] = 90.0, 400.0
    both = "--compile_mode max-autotune-no-cudagraphs --persistent_tma_matmul True"
    # judged against the step compiled in torch's default mode, and a default only with the mode it needs
    assert lever_lines(rows) == [
        f"max-autotune compile with persistent TMA matmul templates: {levers}+autotune+tma 1.100x the step without "
        f"them; first step 400.0 s against 90.0 s: worth making the default ({both})"
    ]
    rows.update({r["variant"]: r for r in _rows(**{f"{levers}+autotune": 760})})  # max-autotune alone, timed too
    assert lever_lines(rows) == [
        f"max-autotune compile: {levers}+autotune 1.086x the step without it: worth making the default "
        "(--compile_mode max-autotune-no-cudagraphs)",  # no first step time in that row
        f"max-autotune compile with persistent TMA matmul templates: {levers}+autotune+tma 1.100x the step without "
        f"them; 1.013x {levers}+autotune; first step 400.0 s against 90.0 s: no gain worth a default",
    ]  # within 2% of max-autotune alone
    rows[f"{levers}+autotune"]["videos_per_s"] = 740
    assert lever_lines(rows)[1].endswith(
        f"1.041x {levers}+autotune; first step 400.0 s against 90.0 s: worth making the default ({both})"
    )
    rows[f"{levers}+autotune"]["videos_per_s"] = 800  # faster without the templates: they are no default
    assert lever_lines(rows)[1].endswith(
        f"1.100x the step without them; 0.963x {levers}+autotune; first step 400.0 s "
        "against 90.0 s: no gain worth a default"
    )


def test_a_step_sweep_cut_short_keeps_the_variants_it_measured(monkeypatch, tmp_path):
    """gpu_step.sh stops a part at its time limit: the JSON written after each variant still holds the ones done."""
    from benchmarks import issue6_verdict, step_variants

    def first_then_killed(variant, *args, **kwargs):
        if variant != "naive":
            raise KeyboardInterrupt  # what the time limit's signal does in the middle of the second variant
        return {"variant": variant, "batch": "2x2", "status": "ok", "s_per_step": 0.5}

    monkeypatch.setattr(step_variants, "run_variant", first_then_killed)
    with pytest.raises(KeyboardInterrupt):
        step_variants.main(model=str(TINY_CLIP), batches="2x2", variants="naive,ours", device="cpu", out=str(tmp_path))
    record = json.loads((tmp_path / "step_variants_cpu.json").read_text())
    assert record["complete"] is False and [r["variant"] for r in record["rows"]] == ["naive"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_variants_cpu.json"]  # no temporary file left
    lines = issue6_verdict.verdict(record, None, None)
    assert lines[0] == "step: stopped before its end (time limit?); judged on the 1 row(s) it wrote"
    assert "step: no variant but naive ran" in lines
    empty = {"device": "cuda", "rows": [], "complete": False}  # stopped inside its first variant
    assert issue6_verdict.verdict(None, None, empty) == [
        "memory: stopped before its end (time limit?); judged on the 0 row(s) it wrote"
    ]


def test_gpu_numerics_runs_its_plain_reference_without_tf32_convolutions():
    """torch lets cuDNN's convolutions (the patch embedding) use TF32 by default: the plain fp32 reference was not
    all fp32 on a GPU. The flag is restored after, as it was."""
    import torch

    from benchmarks.gpu_numerics import full_fp32

    before = torch.backends.cudnn.allow_tf32
    try:
        for start in (True, False):
            torch.backends.cudnn.allow_tf32 = start
            with full_fp32():
                assert torch.backends.cudnn.allow_tf32 is False
            with full_fp32(False):
                assert torch.backends.cudnn.allow_tf32 is start
            assert torch.backends.cudnn.allow_tf32 is start
    finally:
        torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("context", [32, 77])
def test_gpu_numerics_compares_the_levers_with_the_plain_step(tmp_path, context):
    """On the CPU both sides run in fp32, so the levers must leave the loss and the gradients as they were; at
    CLIP's 77 tokens the optimised side's captions are cut, the plain side's are not."""
    from benchmarks.gpu_numerics import main as compare

    levers = dict(packed_qkv=True, attention_kernel="math", linear_patch_embed=True, cls_last_block=True)
    levers["split_qkv"] = context == 77  # the split projections too, once
    summary = compare(tiny_variant(tmp_path, "tiny", context_length=context), batch=3, **levers)
    assert summary["relative_loss_difference"] < 1e-6
    assert summary["gradient_cosine"] > 0.99999 and abs(summary["norm_ratio"] - 1) < 1e-5
    cut = summary["caption_width"]["optimised"]
    assert summary["caption_width"]["plain fp32"] == context and (cut < 77 if context == 77 else cut == 32)


def test_batch_bench_times_each_size_in_interleaved_rounds(tmp_path):
    from benchmarks.batch_bench import best_size

    proc = run_cli(
        "benchmarks.batch_bench",
        *("--model", TINY_CLIP, "--sizes", "6,1", "--videos", 3, "--texts", 5, "--repeats", 2),
        *("--seconds", 1, "--device", "cpu", "--out", tmp_path),
        timeout=300,
    )
    results = json.loads((tmp_path / "batch_bench_cpu.json").read_text())
    for rounds in (results["video_rounds_s"], results["text_rounds_s"]):
        assert sorted(rounds) == ["1", "6"] and all(len(r) == 2 and min(r) > 0 for r in rounds.values())
    assert "| videos per pass |" in proc.stdout and "| texts per pass |" in proc.stdout and "fastest: " in proc.stdout
    # a size above the count ran the count's pass: the row says so
    assert "| 6 (ran 3: all there are) |" in proc.stdout and "| 6 (ran 5: all there are) |" in proc.stdout
    assert best_size({1: [2.0, 1.0], 8: [1.5], 64: [1.0]}) == 1  # a tie goes to the smaller size
    bad = run_cli("benchmarks.batch_bench", "--model", TINY_CLIP, "--sizes", "0,x", "--out", tmp_path, check=False)
    assert bad.returncode == 1 and "error: --sizes must be a comma list" in bad.stderr


def test_the_step_benchmarks_cut_the_captions_as_the_trainer_and_count_the_flops_at_their_width(tmp_path):
    """The tiny model with CLIP's 77-token context, where 4-40 word captions get cut: step_variants' trainer variants
    and train_step run the cut captions (the trainer's default), naive and +fullpad the padded ones, with the same
    loss, each counted at its own width."""
    model = tiny_variant(tmp_path, "tiny77", context_length=77)
    run_cli(
        "benchmarks.step_variants",
        *("--model", model, "--batches", "2x3", "--variants", "naive,ours,ours+fullpad,ours+cls+fullpad"),
        *("--steps", 1, "--warmup", 0, "--out", tmp_path / "sv"),
        timeout=300,
    )
    rows = {r["variant"]: r for r in json.loads((tmp_path / "sv" / "step_variants_cpu.json").read_text())["rows"]}
    widths = {v: r["caption_width"] for v, r in rows.items()}
    assert widths["naive"] == widths["ours+fullpad"] == 77 and widths["ours"] < 77 and widths["ours"] % 8 == 0
    assert rows["ours"]["flops_per_step"] < rows["ours+fullpad"]["flops_per_step"] == rows["naive"]["flops_per_step"]
    assert rows["ours"]["first_loss"] == pytest.approx(rows["ours+fullpad"]["first_loss"], rel=1e-6)
    # train_step (the trainer's default: cut) and with --trim_text False, in one process (a CLI start each is seconds)
    from benchmarks import train_step

    results = {}
    for trim in (True, False):
        out = tmp_path / f"ts{trim}"
        train_step.main(model, batches="2x3", device="cpu", steps=1, warmup=0, trim_text=trim, out=str(out))
        record = json.loads((out / "train_step_cpu.json").read_text())
        assert record["settings"]["trim_text"] is trim
        (results[trim],) = record["results"]
    cut, full = results[True], results[False]
    # one count (the trainer's default runs the last image block on the class token only: +cls)
    assert full["caption_width"] == 77 and full["flops_per_step"] == rows["ours+cls+fullpad"]["flops_per_step"]
    assert rows["ours+cls+fullpad"]["flops_per_step"] < rows["naive"]["flops_per_step"]
    assert cut["caption_width"] < 77 and cut["caption_width"] % 8 == 0
    assert cut["flops_per_step"] < full["flops_per_step"]
    assert cut["losses"] == pytest.approx(full["losses"], rel=1e-6)
    proc = run_cli("benchmarks.kernel_bench", "--model", model, "--batches", "2x3", "--out", tmp_path, timeout=300)
    text = json.loads((tmp_path / "kernels.json").read_text())["text_tower"]
    # the same synthetic captions as step_variants' (seeds 1 and 2), cut to the same width
    assert (text["context"], text["width"], text["captions_student"], text["captions_teacher"]) == (
        77,
        widths["ours"],
        5,
        3,
    )
    assert text["full"] > 0 and text["trimmed"] > 0
    calls = {r["call"]: r for r in json.loads((tmp_path / "kernels.json").read_text())["attention"]}
    assert calls["student text"]["tokens"] == calls["teacher text"]["tokens"] == widths["ours"]  # as the step runs
    assert "text tower (5 + 3 captions): 77 tokens" in proc.stdout


def test_text_bench_times_evaluation_and_training_texts_full_and_cut(tmp_path, capsys):
    from benchmarks import text_bench

    model = tiny_variant(tmp_path, "tiny77", context_length=77)
    captions = ["Horse grazing - seperated on green screen", "Aerial shot of a winter forest, slow motion", "Sea"]
    csv = write_csv(
        tmp_path / "webvid.csv", [[str(i), c, "1", "1", "PT00H00M05S", "x.mp4"] for i, c in enumerate(captions)]
    )
    # in process (a CLI start is seconds); its CLI is run below, refusing bad input
    text_bench.main(model, str(csv), batch_size=16, train_batch=8, repeats=1, device="cpu", out=str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "text_bench_cpu.json").read_text())
    assert record["captions"].startswith("3 captions of ")
    assert record["train_width"] == {"full": 77, "cut": 16}  # the longest caption: 12 tokens
    assert set(record["eval_rounds_s"]) == {"UCF101 prompts", "captions"}
    assert all(d < 1e-5 for d in record["eval_max_difference"].values())  # the same embeddings
    assert all(len(r["full"]) == len(r["cut"]) == 1 for r in record["eval_rounds_s"].values())
    assert "| eval: UCF101 prompts, 16 per pass | 4848 |" in capsys.readouterr().out
    header_only = write_csv(tmp_path / "bad.csv", [], header=["videoid", "caption"])
    with pytest.raises(SystemExit, match="--repeats must be a whole number of at least 1"):
        text_bench.main(repeats=0, out=str(tmp_path / "refused"))
    proc = run_cli("benchmarks.text_bench", "--captions", header_only, "--out", tmp_path / "refused", check=False)
    assert proc.returncode == 1 and "no rows with a 'name' column" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "refused").exists()


def test_eval_bench_runs_end_to_end_and_records_how_it_was_run(tmp_path):
    args = ("--videos", 2, "--seconds", 1, "--workers", 1, "--repeats", 1, "--classes", 3, "--sweep", 2)
    run_cli("benchmarks.eval_bench", *args, "--device", "cpu", "--out", tmp_path, timeout=300)
    record = json.loads((tmp_path / "eval_bench_cpu.json").read_text())
    assert record["command"].endswith(
        "-m benchmarks.eval_bench " + " ".join(map(str, args)) + f" --device cpu --out {tmp_path}"
    )
    assert record["encode"]["checks_ok"] and record["settings"]["videos"] == 2
    assert (tmp_path / "eval_bench_cpu.md").read_text().strip()
    from eval import frame_cache

    (row,) = record["cache"]["rows"]
    # build_cache decodes in worker processes, even with one: their CPU is counted, and their pool is the one timed
    assert row["workers_cpu_s"] > 0
    assert row["pool_start"]["start_method"] == frame_cache.worker_context().get_start_method()
    assert row["pool_start"]["processes_answering"] == 1


def test_eval_bench_projects_the_text_encoding_to_ucf101s_101_classes():
    from benchmarks.eval_bench import UCF101_TEST_VIDEOS, bench_sweep, sweep_cost

    cache = {"videos": 10, "rows": [{"workers": 1, "wall_s": 2.0, "steady_videos_per_s": 5.0, "fixed_s": 0.5}]}
    enc = {"video_s": 1.0, "text_s": 0.3, "classes": 3}
    (row,) = bench_sweep(cache, enc, models=4)
    assert row["ratio"] == sweep_cost(2.0, 1.0, 0.3, 4)["ratio"]  # the measured run: as measured
    full = sweep_cost(0.5 + UCF101_TEST_VIDEOS / 5.0, UCF101_TEST_VIDEOS / 10, 0.3 * 101 / 3, 4)
    assert row["ucf101_projected"] == full


def test_the_step_benchmarks_cut_captions_only_where_the_trainer_would(tmp_path):
    """As the trainer's text_tokenizer: a model whose text tower the cut would change (no causal mask) keeps its
    captions at the context length in step_variants, kernel_bench and text_bench's training pass; a causal one gets
    them cut."""
    from benchmarks.harness import synthetic_batch
    from benchmarks.kernel_bench import caption_widths
    from benchmarks.step_variants import caption_width
    from benchmarks.text_bench import train_width
    from train.model import create_clip, tokenizer_for

    for name, change, cut in (("causal", {}, True), ("bidirectional", {"no_causal_mask": True}, False)):
        model = tiny_variant(tmp_path, name, context_length=77, **change)
        clip = create_clip(model)
        tokens, width = caption_widths(model, clip, 2, 3)
        pair = [synthetic_batch(n, 1, 1, tokenizer_for(model), k + 1, False) for k, n in enumerate((2, 3))]
        assert tokens.shape == (5, 77) and caption_width(pair, {"ours"}, clip) == width
        assert (width < 77) is cut
        assert train_width(clip, tokenizer_for(model), pair[0].texts + pair[1].texts) == width
        assert caption_width(pair, {"ours", "fullpad"}, clip) == caption_width(pair, {"naive"}, clip) == 77


def test_the_issue6_verdict_leaves_out_a_fast_variant_whose_loss_is_off():
    """Every variant starts from the same weights on the same batches: a first-step loss off the default's by 1e-2
    (relative) or more is a wrong result (a missing wait between streams, say), and must not name the MFU."""
    from benchmarks.issue6_verdict import DEFAULT, step_lines, wrong_losses

    fed = f"{DEFAULT}+prefetch"
    rows = _rows(naive=350, **{DEFAULT: 700, fed: 760, f"{fed}+tahead": 800, f"{fed}+tstream": 790})
    losses = (9.8539, 9.8691, 9.8650, 9.2000, float("nan"))  # the H200's naive and default; then off, and NaN
    for row, loss in zip(rows, losses, strict=True):
        row.update(first_loss=loss, last_loss=9.672, mfu_measured=row["videos_per_s"] / 1400)
    rows += [{**rows[1], "variant": f"{DEFAULT}+devjpeg", "first_loss": 3.9}]  # other crops: not compared
    step = {"device": "NVIDIA H200", "rows": rows}
    assert wrong_losses({r["variant"]: r for r in rows}) == [f"{fed}+tahead", f"{fed}+tstream"]
    lines = step_lines(step)
    assert lines[0] == (
        f"variants whose loss (first/last step) is off {DEFAULT}'s (9.86910/9.67200) by 0.01 or more (relative), "
        f"left out of the judging (a wrong result?): {fed}+tahead 9.20000/9.67200, {fed}+tstream nan/9.67200"
    )
    # right at the first step, off at the last (+tahead waits for the backward from the second step on)
    later = [{**r, "first_loss": 9.8691, "last_loss": 9.9 if r["variant"] == f"{fed}+tahead" else 9.672} for r in rows]
    assert wrong_losses({r["variant"]: r for r in later}) == [f"{fed}+tahead"]
    assert lines[1].startswith(f"MFU at 128x128: 54.3% of the measured peak with {fed} ")
    assert not any("teacher beside" in line for line in lines)  # nor judged as levers
    for row in rows:
        del row["first_loss"], row["last_loss"]  # rows without them (older records): nothing to compare
    assert step_lines(step)[0].startswith(f"MFU at 128x128: 57.1% of the measured peak with {fed}+tahead ")
    # a NaN default loss (cuDNN's NaN risk): compared with naive's; every variant off: said, not a crash
    rows[0]["first_loss"], rows[1]["first_loss"], rows[2]["first_loss"] = 9.85, float("nan"), 9.0
    assert wrong_losses({r["variant"]: r for r in rows}) == [DEFAULT, fed]  # the reference itself never
    nan = {"device": "NVIDIA H200", "rows": [{**rows[0], "first_loss": float("nan")}, rows[1]]}
    assert wrong_losses({r["variant"]: r for r in nan["rows"]}) == []  # no finite reference: nothing compared
    off = {"device": "NVIDIA H200", "rows": rows[:3]}
    assert step_lines(off)[-1] == "step: no variant but naive left to judge"


def test_the_tar_read_bench_reads_every_sample_with_both_readers(capsys):
    from benchmarks import tar_read_bench

    tar_read_bench.main(samples=10, repeats=1)
    out = capsys.readouterr().out
    assert "| ours (train.data._shard_samples) |" in out and "| webdataset tarfile_to_samples |" in out
    assert "ours / webdataset: " in out


def test_the_pool_bench_runs_both_pools_side_by_side_and_times_the_posts(capsys, monkeypatch):
    from benchmarks import pool_bench
    from pipeline import board

    monkeypatch.setattr(board, "_board", None)  # it attaches this process to its board, as a worker
    monkeypatch.setattr(board, "_slot", -1)
    pool_bench.main(workers=2, tasks=20, task_ms=5, shard_s=1, videos=20, repeats=1)
    out = capsys.readouterr().out
    for name in ("pipeline.pool", "ProcessPoolExecutor"):
        assert f"| {name}: per task, tasks that return at once (µs) |" in out
        assert f"| {name}: 1 task(s) of 1 s beside one dying, seconds to the end |" in out
    # the point of the pool: the executor's break made the other long task again from its start, ours did not
    assert "| pipeline.pool: the same, long tasks started again | 0.00 | 0.00 |" in out
    assert "| ProcessPoolExecutor: the same, long tasks started again | 1.00 | 1.00 |" in out
    assert "| a worker's posts for one video (µs) |" in out and "posts / sample: " in out
    assert "ours / ProcessPoolExecutor, seconds to the end: " in out
