"""Benchmark of one FitCLIP training step, exactly as the trainer runs it, on synthetic batches.

    python -m benchmarks.train_step [--model ViT-B-16-quickgelu|path/to/config.json] [--batch_labeled 128]
        [--batch_unlabeled 128] [--batches LxU,LxU,...] [--frames 4] [--steps 10] [--warmup 3] [--recipe paper]
        [--device auto] [--precision RECIPE'S] [--peak_tflops 0] [--compile False] [--grad_checkpointing False]
        [--trim_text True] [--threads 0] [--seed 0] [--out benchmarks/output]

What runs is the trainer's own code: ``train.loop.build_models`` (random teacher weights, ``teacher_weights=""``,
saved into a temporary run folder as the trainer does; the student is initialised from it, the teacher is frozen and
in bf16 on GPU), ``train.loop.build_optimizer`` (AdamW, fused on GPU) and ``train.loop.train_step`` (host-to-device
copy of both batches, one student forward over labeled + unlabeled videos, teacher forward on the unlabeled batch,
Eq. 5, backward, gradient norm, optimizer and scheduler step). Only the data loader is replaced: each configuration
uses one fixed pair of synthetic :class:`train.data.Batch` objects (random pixels in [0, 1] normalised with the CLIP
mean/std, shape (B, T, 3, S, S); random captions of 4-40 words tokenised by the model's tokenizer, so the SOT/EOT
layout is real, and cut after the longest of each batch as the trainer's loader cuts them unless ``--trim_text
False``), pinned on GPU as the trainer's loader pins them.

A *pair* is one video-caption pair: a step over ``L x U`` (L labeled + U unlabeled videos) processes L + U pairs.
FLOPs are counted as the trainer's MFU counts them (``train.monitor``): the student's forward of one video (T frames
+ its caption) counted by ``FlopCounterMode``, times 3 (forward + backward) for all L + U pairs, plus one teacher
forward (same architecture) for the U unlabeled pairs, with the caption as wide as the step's (``caption_width`` in
the JSON); activation recomputation (``--grad_checkpointing``) is not counted (model FLOPs, not hardware FLOPs).

For every ``LxU`` of ``--batches`` (default: the single ``--batch_labeled x --batch_unlabeled``) the student is reset
to its initial weights, a fresh optimizer is built, ``--warmup`` steps run untimed and ``--steps`` steps are timed one
by one (``torch.cuda.synchronize()`` before and after each on GPU). A configuration that runs out of GPU memory is
reported as OOM and the sweep goes on. On GPU the run also measures the real dense bf16 matmul peak (8192^3, 3
warm-ups, 10 timed) and reports MFU against it as well as against the datasheet value. Prints a markdown table and
writes ``--out/train_step_<device>.json``. Exits 1 if a step had a non-finite loss or no configuration ran.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.args import parse_batches
from benchmarks.harness import (
    batches_problems,
    checked_config,
    device_problems,
    measure_matmul_tflops,
    model_problems,
    synthetic_batch,
    time_call,
)
from pipeline.cli import count_problems, fire_main, folder_problems, number_problems, refuse, switch_problems
from pipeline.writer import atomic_write_bytes, json_bytes
from train import data, distributed, loop, monitor
from train.config import TrainConfig
from train.model import fit_width, image_size, text_tokenizer, tokenizer_for
from train.profiling import sync

INPUT_COPY_REPEATS = 3


def main(
    model: str = "ViT-B-16-quickgelu",
    batch_labeled: int = 128,
    batch_unlabeled: int = 128,
    batches: str = "",
    frames: int = 4,
    steps: int = 10,
    warmup: int = 3,
    recipe: str = "paper",
    device: str = "auto",
    precision: str = "",
    peak_tflops: float = 0.0,
    compile: bool = False,
    grad_checkpointing: bool | int = False,
    trim_text: bool = True,
    threads: int = 0,
    seed: int = 0,
    out: str = "benchmarks/output",
) -> None:
    """Time the FitCLIP training step; see the module docstring.

    Args:
        model: open_clip model name or model-config JSON (random weights, nothing is downloaded).
        batch_labeled: labeled videos per step (used when --batches is not given).
        batch_unlabeled: unlabeled videos per step (used when --batches is not given).
        batches: comma list of LxU configurations to sweep, e.g. 32x32,64x64,128x128.
        frames: frames per video.
        steps: timed steps per configuration.
        warmup: untimed steps before them.
        recipe: trainer recipe (paper, reference, demo): loss form, sigma, lr, precision default.
        device: auto, cuda or cpu.
        precision: "" = the recipe's (paper: auto = bf16 autocast on GPU; reference: fp32), or auto, bf16, fp32.
        peak_tflops: accelerator peak for MFU; 0 = the trainer's datasheet lookup (none on CPU).
        compile: torch.compile the student and the teacher, as the trainer's --compile.
        grad_checkpointing: activation checkpointing in the student, as the trainer's --grad_checkpointing; True
            checkpoints every block, a number N the first N blocks of each tower, False or 0 none.
        trim_text: cut the captions after the longest of each batch, as the trainer's --trim_text (its default).
        threads: torch CPU threads (torch.set_num_threads); 0 = torch's default.
        seed: seed of the weights and of the synthetic batches.
        out: folder of the JSON record.
    """
    problems = model_problems(model) + (batches_problems(batches) if batches else [])  # else the two sizes below
    problems += count_problems(
        {"batch_labeled": (batch_labeled, 1), "batch_unlabeled": (batch_unlabeled, 1), "frames": (frames, 1)}
    )
    problems += count_problems({"steps": (steps, 1), "warmup": (warmup, 0), "threads": (threads, 0), "seed": (seed, 0)})
    problems += number_problems({"peak_tflops": (peak_tflops, 0, None)})
    problems += switch_problems({"compile": compile, "trim_text": trim_text}) + device_problems(device)
    refuse(problems + folder_problems({"out": out}))
    configs = parse_batches(batches or f"{batch_labeled}x{batch_unlabeled}")
    overrides = {"precision": precision} if precision else {}  # else the recipe's own (reference: fp32)
    cfg = checked_config(  # the recipe, --precision and --grad_checkpointing: TrainConfig's checks, before any work
        recipe,
        **overrides,
        model=model,
        teacher_weights="",  # random weights; build_models saves them as RUN/teacher_init.pt (a temporary RUN)
        device=device,
        frames=frames,
        batch_labeled=configs[0][0],
        batch_unlabeled=configs[0][1],
        peak_tflops=float(peak_tflops),
        compile=compile,
        grad_checkpointing=grad_checkpointing,
        trim_text=trim_text,
        seed=seed,
        wandb="off",
        progress=False,
    )
    if threads > 0:
        torch.set_num_threads(threads)
    dist = distributed.init_distributed(device)
    if dist.world_size > 1:
        raise SystemExit("error: benchmarks.train_step measures one process; run it without torchrun")
    bench = set_up(cfg, dist)
    print(bench.headline(), flush=True)
    rows = []
    for n_labeled, n_unlabeled in configs:
        cfg_lu = dataclasses.replace(bench.cfg, batch_labeled=n_labeled, batch_unlabeled=n_unlabeled)
        row = run_config(bench, cfg_lu, warmup, steps)
        row.update(bench.rates(row))
        rows.append(row)
        print(f"  {n_labeled}x{n_unlabeled}: {row_summary(row)}", flush=True)

    out_dir = Path(str(out))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"train_step_{device_slug(bench.device)}.json"
    atomic_write_bytes(path, json_bytes(bench.record(configs, warmup, steps, rows)))
    print()
    print(markdown_table(rows, bench.device, bool(bench.datasheet), bool(bench.measured)))
    print(f"\nwrote {path}")
    bad = [r for r in rows if r["status"] not in ("ok", "OOM")]
    if bad or not any(r["status"] == "ok" for r in rows):
        raise SystemExit(1)


@dataclass
class Bench:
    """What every configuration shares: the models as the trainer builds them, and the per-run measurements."""

    cfg: TrainConfig
    models: loop.Models
    initial: dict[str, torch.Tensor]  # the student's initial weights (CPU), restored before each configuration
    tokenizer: object  # the trainer's: captions cut after the longest of each batch unless --trim_text False
    size: int  # frame size S
    device: torch.device
    per_video: int  # FLOPs of the student's forward of one video and its caption at the full context length
    per_video_at: Callable[[int], int]  # the same with the caption that many tokens wide
    datasheet: float  # peak TFLOP/s from the trainer's lookup or --peak_tflops; 0 = unknown
    measured: float  # measured dense bf16 matmul TFLOP/s (GPU); 0 on CPU
    bf16: bool  # the step runs under bf16 autocast
    build_s: float
    machine: dict

    def headline(self) -> str:
        return (
            f"train_step: {self.machine['device_name']}, torch {torch.__version__}, model {self.cfg.model} "
            f"({self.size}x{self.size}, {self.cfg.frames} frames), recipe {self.cfg.recipe}, "
            f"{'bf16 autocast' if self.bf16 else 'fp32'}, models built in {self.build_s:.1f} s, "
            f"student forward {self.per_video / 1e9:.2f} GFLOP per video (captions at the full context length)"
            + (
                f", measured bf16 matmul peak {self.measured:.0f} TFLOP/s (datasheet {self.datasheet:.0f})"
                if self.measured
                else ""
            )
        )

    def rates(self, row: dict) -> dict:
        """FLOPs per step and per pair; pairs/s, achieved TFLOP/s and MFU (None without a peak) when it ran."""
        lab, unl = row["labeled"], row["unlabeled"]
        per_video = self.per_video_at(row["caption_width"]) if "caption_width" in row else self.per_video
        flops = monitor.step_flops(per_video, per_video, lab, unl)
        rates = {"flops_per_step": flops, "flops_per_pair": flops / (lab + unl)}
        if row["status"] != "ok":  # OOM or non-finite loss: no rate to report
            return rates
        achieved = flops / row["s_per_step"] / 1e12
        rates.update(
            pairs_per_s=(lab + unl) / row["s_per_step"],
            tflops_achieved=achieved,
            mfu_datasheet=achieved / self.datasheet if self.datasheet else None,
            mfu_measured_peak=achieved / self.measured if self.measured else None,
        )
        return rates

    def record(self, configs: list[tuple[int, int]], warmup: int, steps: int, rows: list[dict]) -> dict:
        """The run's JSON record: settings, machine, peaks and every configuration's figures."""
        return {
            "benchmark": "train_step",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.train_step", *sys.argv[1:]]),
            "pair": "one video-caption pair; a step over LxU processes L + U pairs",
            "settings": {
                "model": self.cfg.model,
                "image_size": self.size,
                "frames": self.cfg.frames,
                "recipe": self.cfg.recipe,
                "precision": self.cfg.precision,
                "bf16_autocast": self.bf16,
                "teacher_dtype": str(next(self.models.teacher.parameters()).dtype),
                "compile": self.cfg.compile,
                "grad_checkpointing": self.cfg.grad_checkpointing,
                "trim_text": self.cfg.trim_text,
                "warmup_steps": warmup,
                "timed_steps": steps,
                "seed": self.cfg.seed,
                "batches": [f"{lab}x{unl}" for lab, unl in configs],
            },
            "machine": self.machine,
            "build_models_s": self.build_s,
            "student_forward_flops_per_video": self.per_video,
            "peak_tflops_datasheet": self.datasheet,
            "peak_tflops_measured_bf16_matmul": self.measured,
            "results": rows,
            "config": {**self.cfg.to_dict(), "out": "(temporary)"},
        }


def set_up(cfg: TrainConfig, dist: distributed.DistInfo) -> Bench:
    """Build the models with the trainer's ``build_models`` (random teacher saved in a temporary run folder),
    count the FLOPs of one video, and measure the GPU's bf16 matmul peak."""
    dev = dist.device
    with tempfile.TemporaryDirectory(prefix="train_step_") as run_dir:
        cfg = dataclasses.replace(cfg, out=run_dir)
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        models = loop.build_models(cfg, dist)
        build_s = time.perf_counter() - t0
    tokenizer = tokenizer_for(cfg.model)
    size = cfg.crop or image_size(models.student.clip)
    per_video_at = functools.cache(lambda width: count_forward_flops(models, cfg.frames, size, tokenizer, dev, width))
    context = tokenizer(["a video"]).shape[1]  # the full width: counted once, for the header and uncut rows alike
    return Bench(
        cfg=cfg,
        models=models,
        initial={k: v.detach().to("cpu", copy=True) for k, v in models.student.state_dict().items()},
        tokenizer=text_tokenizer(models.student.clip, tokenizer, cfg.trim_text),
        size=size,
        device=dev,
        per_video=per_video_at(context),
        per_video_at=per_video_at,
        datasheet=monitor.peak_tflops(dev, cfg.peak_tflops),
        measured=measure_matmul_tflops(dev),
        bf16=isinstance(loop.autocast(cfg, dev), torch.autocast),
        build_s=build_s,
        machine=machine_info(dev),
    )


def run_config(bench: Bench, cfg: TrainConfig, warmup: int, steps: int) -> dict:
    """Warm-up then timed ``train_step`` calls for one LxU; OOM is caught, reported and cleaned up."""
    models, dev = bench.models, bench.device
    row = {"labeled": cfg.batch_labeled, "unlabeled": cfg.batch_unlabeled, "status": "ok"}
    models.student.load_state_dict(bench.initial)  # every configuration starts from the same weights
    optimizer = scheduler = labeled = unlabeled = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        optimizer, scheduler = loop.build_optimizer(models.student, cfg, dev)
        pin = dev.type == "cuda"
        seed = cfg.seed * 1_000_003 + cfg.batch_labeled * 1009 + cfg.batch_unlabeled
        labeled = synthetic_batch(cfg.batch_labeled, cfg.frames, bench.size, bench.tokenizer, seed, pin)
        unlabeled = synthetic_batch(cfg.batch_unlabeled, cfg.frames, bench.size, bench.tokenizer, seed + 1, pin)
        row["caption_width"] = max(labeled.tokens.shape[1], unlabeled.tokens.shape[1])
        progress = loop.Progress()
        times, results = [], []
        for i in range(warmup + steps):
            if i == warmup:
                load = LoadMeter()
            sync(dev)
            t0 = time.perf_counter()
            result = loop.train_step(models, optimizer, scheduler, labeled, unlabeled, cfg, dev, progress)
            sync(dev)
            elapsed = time.perf_counter() - t0
            results.append({k: float(v) if isinstance(v, torch.Tensor) else v for k, v in result.items()})
            if i >= warmup:
                times.append(elapsed)
        loop.settle_skips(progress, scheduler)  # the steps a fused optimizer skipped on the device
        row["other_load_cores"] = load.other_cores()
        row.update(timing(times))
        row["losses"] = [r["loss"] for r in results]
        last = results[-1]
        row.update({k: last.get(k, float("nan")) for k in ("loss", "contrastive", "distillation", "grad_norm")})
        row["skipped_steps"] = progress.skipped_steps
        if progress.skipped_steps or not all(math.isfinite(x) for x in row["losses"]):
            row["status"] = "non-finite loss"
        row["input_copy_ms"] = input_copy_ms(labeled, unlabeled, dev)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        row["status"] = "OOM"
    finally:
        # Drop every reference to the step's tensors before emptying the cache (the exception is gone here).
        models.student.zero_grad(set_to_none=True)
        del optimizer, scheduler, labeled, unlabeled
        gc.collect()
        if dev.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            torch.cuda.empty_cache()
    if dev.type != "cuda":
        row["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return row


def _is_oom(error: BaseException) -> bool:
    """CUDA out of memory, raised by the caching allocator or by cuBLAS/cuDNN while allocating their workspace."""
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(
        marker in text for marker in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
    )


class LoadMeter:
    """CPU time used by *other* processes since creation, in cores: /proc/stat busy time minus this process's."""

    def __init__(self) -> None:
        self.wall, self.own, self.busy = time.perf_counter(), time.process_time(), _busy_seconds()

    def other_cores(self) -> float | None:
        busy = _busy_seconds()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.wall
        return max(0.0, (busy - self.busy) - (time.process_time() - self.own)) / wall


def _busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine (all cores) since boot; None where /proc/stat is missing."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def timing(times: list[float]) -> dict:
    return {
        "s_per_step": statistics.median(times),
        "s_per_step_min": min(times),
        "s_per_step_max": max(times),
        "step_times_s": times,
    }


def input_copy_ms(labeled: data.Batch, unlabeled: data.Batch, dev: torch.device) -> dict:
    """Median ms of the step's input transfer: the trainer's ``torch.cat`` on the host then ``.to(device)``, and the
    alternative of copying each (pinned) batch and concatenating on the device."""

    width = max(labeled.tokens.shape[1], unlabeled.tokens.shape[1])  # captions cut to two widths: joined at one

    def trainer_way():
        torch.cat([labeled.video, unlabeled.video]).to(dev, non_blocking=True)
        torch.cat([fit_width(b.tokens, width) for b in (labeled, unlabeled)]).to(dev, non_blocking=True)

    def copy_then_cat():
        torch.cat([labeled.video.to(dev, non_blocking=True), unlabeled.video.to(dev, non_blocking=True)])
        torch.cat([fit_width(b.tokens.to(dev, non_blocking=True), width) for b in (labeled, unlabeled)])

    result = {}
    for name, fn in (("trainer_cat_then_copy", trainer_way), ("copy_then_cat", copy_then_cat)):
        result[name] = 1000 * time_call(fn, dev, warmup=0, iters=INPUT_COPY_REPEATS)
    return result


def count_forward_flops(models, frames: int, size: int, tokenizer, dev: torch.device, width: int) -> int:
    """FLOPs of the student's forward of one video and its caption ``width`` tokens wide, as the trainer's
    ``_flops_per_step`` counts."""
    video = torch.zeros(1, frames, 3, size, size, device=dev)  # (1, T, 3, S, S)
    tokens = tokenizer(["a video"]).to(dev)  # (1, L)
    return monitor.forward_flops(models.student, video, fit_width(tokens, width))


def machine_info(dev: torch.device) -> dict:
    info = {
        "device_type": dev.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except Exception:  # version string only; never a reason to fail
        pass
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(
            device_name=torch.cuda.get_device_name(dev),
            cuda=torch.version.cuda,
            gpu_memory_gib=props.total_memory / 2**30,
            gpu_count=torch.cuda.device_count(),
        )
    else:
        info["device_name"] = f"CPU: {info['cpu']} ({info['torch_threads']} torch threads)"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_slug(dev: torch.device) -> str:
    if dev.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


def row_summary(row: dict) -> str:
    if row["status"] == "OOM":
        return f"OOM (peak {row['peak_memory_gib']:.1f} GiB allocated before the failure)"
    text = f"{row['s_per_step']:.4f} s/step, {_rate(row.get('pairs_per_s', 0))} pairs/s, loss {row.get('loss')}"
    return text if row["status"] == "ok" else f"{row['status']}: {text}"


def markdown_table(rows: list[dict], dev: torch.device, has_datasheet: bool, has_measured: bool) -> str:
    memory = "peak GPU memory GiB" if dev.type == "cuda" else "process max RSS GiB (cumulative)"
    header = [
        "L x U",
        "s/step (median)",
        "pairs/s",
        "GFLOP/pair",
        "TFLOP/s",
        "MFU (datasheet)" if has_datasheet else "MFU",
        *(["MFU (measured bf16 peak)"] if has_measured else []),
        memory,
        *(["other load (cores)"] if dev.type != "cuda" else []),
        "input copy ms (cat+copy / copy+cat)",
        "loss first -> last (contrastive, distillation)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        ok = r["status"] == "ok"
        copy = r.get("input_copy_ms", {})
        n_rates = 5 + has_measured
        rates = (
            [
                f"{r['s_per_step']:.4f}",
                _rate(r["pairs_per_s"]),
                f"{r['flops_per_pair'] / 1e9:.4g}",
                f"{r['tflops_achieved']:.3g}",
                _percent(r["mfu_datasheet"]),
                *([_percent(r["mfu_measured_peak"])] if has_measured else []),
            ]
            if ok
            else [r["status"], *["-"] * (n_rates - 1)]
        )
        cells = [
            f"{r['labeled']}x{r['unlabeled']}",
            *rates,
            f"{r['peak_memory_gib']:.2f}",
            *([_number(r.get("other_load_cores"))] if dev.type != "cuda" else []),
            f"{copy['trainer_cat_then_copy']:.1f} / {copy['copy_then_cat']:.1f}" if copy else "-",
            f"{r['losses'][0]:.4f} -> {r['loss']:.4f} ({r['contrastive']:.4f}, {r['distillation']:.4f})"
            if "losses" in r
            else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rate(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    fire_main(main)
