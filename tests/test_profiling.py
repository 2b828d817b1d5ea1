"""--profile_steps: where a step's time goes (train.profiling), and throughput counted over the timed steps only."""

from __future__ import annotations

import gzip
import json
import random
from types import SimpleNamespace

import pytest
import torch
from test_train import tiny_config

from train import loop
from train.config import resolve
from train.gaps import GAP_BOUNDS_US, idle_gaps
from train.monitor import Monitor, Timer
from train.profiling import (
    StepProfiler,
    describe,
    kernel_kind,
    profile_window,
    summarize,
    union_s,
)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT", "matmul"),
        ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
        ("triton_per_fused_add_native_layer_norm_0", "fused (triton)"),
        # names from the profile of the compiled step on an H200 (benchmarks/gpu_runs/2026-11-26-h200-a)
        ("triton_poi_fused__scaled_dot_product_cudnn_attention_add_clone_select_transpose_view_3", "fused (triton)"),
        ("triton_poi_fused__to_copy__unsafe_view_add_clone_squeeze_transpose_unsqueeze_view_4", "fused (triton)"),
        ("triton_poi_fused_cat_7", "fused (triton)"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_kernel0_0", "attention"),
        ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*, void*)", "attention"),
        ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)", "attention"),
        ("void precomputed_convolve_sgemm<__nv_bfloat16, 128, 6, 7, 3, 3, 5, 1, false>(int, int, int)", "convolution"),
        ("sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
        ("aten::convolution_backward", "convolution"),
        ("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_bias_TNN", "matmul"),
        ("Memcpy HtoD (Pinned -> Device)", "copy"),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float>", "copy"),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
        # CPU operators, for a profile without a GPU
        ("aten::addmm", "matmul"),
        ("aten::bmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::_fused_adamw_", "optimizer"),
        ("aten::copy_", "copy"),
        ("aten::mul", "other"),
        ("aten::mmm", "other"),
    ],
)
def test_kernels_are_sorted_into_kinds(name, kind):
    assert kernel_kind(name) == kind


def test_union_s_matches_a_brute_force_count():
    rng = random.Random(0)
    for _ in range(200):
        spans = [(a, a + rng.randint(0, 20)) for a in (rng.randint(0, 100) for _ in range(rng.randint(0, 8)))]
        covered = {t for start, end in spans for t in range(start, end)}  # unit cells [t, t + 1)
        assert union_s(spans) == len(covered)


def test_idle_gaps_match_a_brute_force_count():
    """The idle time between the first kernel and the last, split into gaps by size, against unit cells."""
    rng = random.Random(1)
    small, large = (int(b) for b in GAP_BOUNDS_US)
    for _ in range(300):
        kernels = []
        for i in range(rng.randint(1, 10)):
            start = rng.randint(0, 400)
            kernels.append((start, start + rng.randint(0, 60), f"k{i}"))  # empty ones too: they split no gap
        steps = rng.randint(1, 3)
        idle = idle_gaps(kernels, steps, top=3)
        spans = [k for k in kernels if k[1] > k[0]] or [(0, 0, "")]  # the window: from the first real kernel on
        lo, hi = min(k[0] for k in spans), max(k[1] for k in spans)
        covered = {t for start, end, _ in kernels for t in range(start, end)}
        free = [t for t in range(lo, hi) if t not in covered]
        assert idle["idle_s_per_step"] == pytest.approx(len(free) / 1e6 / steps)
        runs = []  # maximal runs of uncovered cells: the gaps
        for t in free:
            if runs and runs[-1][1] == t:
                runs[-1][1] = t + 1
            else:
                runs.append([t, t + 1])
        sizes = sorted((end - start for start, end in runs), reverse=True)
        counts = [sum(s < small for s in sizes), sum(small <= s < large for s in sizes), sum(s >= large for s in sizes)]
        assert [c["gaps_per_step"] * steps for c in idle["by_size"].values()] == pytest.approx(counts)
        assert [g["us"] for g in idle["largest"]] == sizes[:3]
        for gap in idle["largest"]:  # named by a kernel that ends where it starts, and one that starts where it ends
            assert any(
                any(n == gap["after"] and e == a for _, e, n in kernels)
                and any(n == gap["before"] and s == b for s, _, n in kernels)
                for a, b in runs
                if b - a == gap["us"]
            ), (kernels, gap)


def test_the_profile_line_says_where_the_idle_time_lies():
    kernels = [("gemm", 0, 100), ("triton_a", 103, 150), ("triton_b", 155, 160), ("gemm", 400, 500)]
    kernels += [("adam", 530, 540)]
    events = [_kernel(name, start, end) for name, start, end in kernels]
    summary = summarize(SimpleNamespace(key_averages=lambda: events, events=lambda: events), steps=1)
    assert summary["idle"]["largest"][0] == {"us": 240, "after": "triton_b", "before": "gemm"}
    assert describe(summary, 600e-6).endswith(
        "; idle between its kernels 0.3 ms (0.0 ms in 2 gaps under 10 us, 0.0 ms in 1 gaps 10-100 us, 0.2 ms in 1 "
        "gaps 100 us and over), the longest 0.24 ms after triton_b"
    )


def _kernel(name, start, end, annotation=False):
    """A profiler event of a kernel (or, with ``annotation``, of kineto's span of a record_function) on the GPU."""
    from torch.autograd import DeviceType

    return SimpleNamespace(
        key=name,
        name=name,
        device_type=DeviceType.CUDA,
        self_device_time_total=end - start,
        count=1,
        time_range=SimpleNamespace(start=start, end=end),
        is_user_annotation=annotation,
    )


def test_a_gpu_profile_counts_time_on_overlapping_streams_once():
    """The teacher's and the prefetcher's streams run kernels beside the step's: busy time summed over kernels could
    exceed the step (and said the GPU idled less than not at all); it is now their union. Each kind is still a sum.
    max-autotune's template kernels (triton_tem_) are matrix products, not fused elementwise kernels."""
    kernel = _kernel
    events = [
        kernel("sm90_xmma_gemm_bf16", 0, 100),  # the student, on the step's stream
        kernel("triton_tem_fused_addmm_0", 60, 160),  # the teacher beside it, on its own stream
        kernel("triton_per_fused_native_layer_norm_1", 170, 180),
        kernel("Memcpy HtoD (Pinned -> Device)", 150, 175),  # the next batch's copy, on the prefetcher's stream
        # a span kineto draws on the GPU's timeline for a record_function (AdamW.step): no kernel, and it covers
        # the gaps between the kernels inside it, the idle time busy_s_per_step is there to show
        kernel("Optimizer.step#AdamW.step", 0, 400, annotation=True),
    ]
    prof = SimpleNamespace(key_averages=lambda: events, events=lambda: events)
    summary = summarize(prof, steps=2)
    assert summary["busy_s_per_step"] == pytest.approx(180 / 1e6 / 2)  # 0-180 µs, once
    assert summary["kernel_s_per_step"] == pytest.approx(235 / 1e6 / 2)
    assert summary["by_kind_s_per_step"] == pytest.approx(
        {"matmul": 200 / 2e6, "copy": 25 / 2e6, "fused (triton)": 10 / 2e6}
    )
    assert kernel_kind("triton_tem_fused_convolution_2") == "convolution"


def test_the_profile_window_stops_at_the_runs_end_and_before_a_validation():
    assert profile_window(10, 5, last=100, val_every=50) == (10, 15)
    assert profile_window(10, 5, last=12, val_every=50) == (10, 12)
    assert profile_window(10, 5, last=100, val_every=13) == (10, 13)  # step 13 validates: not training
    assert profile_window(10, 5, last=100, val_every=10) == (10, 15)  # the validation at 10 is behind


def test_a_cpu_profile_counts_operators_per_step():
    x, w = torch.randn(64, 256), torch.randn(256, 256)
    steps = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            (x @ w).relu().sum()
    summary = summarize(prof, steps)
    assert summary["device"] == "cpu" and summary["steps"] == steps
    kinds = summary["by_kind_s_per_step"]
    assert kinds["matmul"] > 0 and summary["busy_s_per_step"] == pytest.approx(sum(kinds.values()))
    mm = next(k for k in summary["top_kernels"] if k["name"] == "aten::mm")
    assert mm["calls_per_step"] == 1  # per step, not per profile


def test_profile_steps_is_checked():
    for value in (-1, 1.5, True):
        with pytest.raises(ValueError, match="--profile_steps must be a whole number of at least 0"):
            resolve("demo", profile_steps=value)


def test_a_run_profiles_the_steps_after_its_first_log_window(train_shards, tmp_path, capsys, monkeypatch):
    logged = {}
    monkeypatch.setattr(Monitor, "log", lambda self, metrics, step: logged.setdefault(step, {}).update(metrics))
    out = tmp_path / "run"
    cfg = tiny_config(train_shards, out, steps=6, val_every=6, log_every=2, profile_steps=2, fuse=False)
    loop.run(cfg)

    printed = capsys.readouterr().out
    assert "profile of steps 3-4: CPU busy" in printed and "matmul" in printed
    files = sorted(p.name for p in (out / "profile").iterdir())
    assert files == ["rank0.json", "rank0.pt.trace.json.gz"]  # no temporary file left
    summary = json.loads((out / "profile" / "rank0.json").read_text())
    assert summary["steps"] == 2 and summary["first_step"] == 3 and summary["by_kind_s_per_step"]["matmul"] > 0
    assert 0 < summary["busy_s_per_step"] < summary["wall_s_per_step"]
    trace = json.loads(gzip.decompress((out / "profile" / "rank0.pt.trace.json.gz").read_bytes()))
    assert any(e.get("name") == "aten::addmm" for e in trace["traceEvents"])
    # the profiled steps (3-4) count for no throughput: the log at step 4 has none, the others do
    assert "profile/busy_fraction" in logged[4] and "train/videos_per_s" not in logged[4]
    assert all("train/videos_per_s" in logged[s] for s in (2, 6)) and "train/loss" in logged[4]


def test_a_short_run_profiles_what_it_can_and_says_so(train_shards, tmp_path, capsys):
    out = tmp_path / "run"
    loop.run(tiny_config(train_shards, out, steps=4, val_every=4, log_every=2, profile_steps=5, fuse=False))
    printed = capsys.readouterr().out
    assert "--profile_steps 5: only 2 step(s) after step 2" in printed and "profile of steps 3-4" in printed


def test_throughput_counts_the_steps_since_a_validation_not_the_whole_window(train_shards, tmp_path, monkeypatch):
    """A validation inside a log window resets the timer; videos/s must count only the steps timed after it."""
    logged = {}
    monkeypatch.setattr(Monitor, "log", lambda self, metrics, step: logged.setdefault(step, {}).update(metrics))
    monkeypatch.setattr(Timer, "elapsed", lambda self: 1.0)
    out = tmp_path / "run"
    loop.run(tiny_config(train_shards, out, steps=4, val_every=3, log_every=2, fuse=False))
    per_step = 4 + 4  # labeled + unlabeled videos, one rank
    assert logged[2]["train/videos_per_s"] == 2 * per_step
    assert logged[4]["train/videos_per_s"] == 1 * per_step  # step 4 alone: step 3 was before the validation


def test_an_unfinished_profile_writes_nothing(tmp_path):
    profiler = StepProfiler(3, 0, 10, 100, torch.device("cpu"), tmp_path / "profile", 0)
    profiler.begin(0)
    assert profiler.end(1) is None  # the window is steps 1-3
    profiler.close()
    assert not (tmp_path / "profile").exists()
