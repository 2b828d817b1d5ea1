"""The naive FitCLIP step against the trainer's step and its optimised variants, side by side on one device.

    python -m benchmarks.step_variants [--model ViT-B-16-quickgelu] [--batches 128x128] \\
        [--variants naive,ours,ours+compile,ours+compile+ckpt] [--steps 10] [--warmup 3] [--out DIR]

naive: what a straightforward open_clip implementation does: separate student
forwards for the labeled and the unlabeled batch, the teacher in fp32 weights
under bf16 autocast with no_grad, plain (for-each) AdamW, the batch joined on
the host. ours: ``train.loop.train_step`` as the trainer runs it (one student
forward over both batches, teacher in bf16 weights under inference mode, fused
AdamW, per-batch pinned copies). +compile: ``torch.compile`` of the student;
+ckpt: activation checkpointing of every block of the student, +ckptN: of the first
N blocks of each tower (``train.model.checkpoint_blocks``). Every variant starts from the
same weights and sees the same batches; the loss of its first step is reported
so numerics can be compared. MFU is against the datasheet bf16 peak and a bf16
matmul peak measured in the same run.

+qkv: student and teacher attend on views of the packed QKV projection (``train.attention``, ``--packed_qkv``),
without nn.MultiheadAttention's layout copies. +cudnn / +flash / +efficient / +math: SDPA tries that kernel first
(``--attention_kernel``; torch's own order puts cuDNN's first on H100/H200 with a recent cuDNN, flash first
elsewhere). +patch: the patch embedding as one matrix product instead of a convolution (``train.patch_embed``,
``--linear_patch_embed``). +cls: the ViT's last block for the class token only (``train.cls_last_block``,
``--cls_last_block``); its rows' MFU counts the FLOPs it performs, about 6.9% fewer for ViT-B/16, not those it skips.
+split (with +qkv or +cls): q, k and v from three products instead of one (``--split_qkv``), so that the backward
does not copy their gradients into the packed layout.
+cteacher: the teacher compiled as well (``--compile``). The trainer's GPU default is
ours+compile+cteacher+qkv+patch+cls: the three layer levers are on by default since the H200 run of 2026-11-28.
Captions: every variant but naive gets them cut after the longest of its batch, as the trainer's loader cuts them
(``--trim_text``, its default); +fullpad keeps them padded to the model's context length (``--trim_text False``),
as naive does. The FLOPs of each row are counted at its captions' width (``caption_width`` in the JSON).
+autotune: compile with mode="max-autotune-no-cudagraphs" (minutes of autotuning first); +tma (with +autotune):
Triton's persistent TMA matmul templates join the kernels it tunes (``--persistent_tma_matmul``,
``train.loop.compile_options``); +cdt: inductor's coordinate-descent tuning of its Triton kernels' block sizes,
without max-autotune's matrix-product tuning (``--coordinate_descent_tuning``); +graphs: with mode="reduce-overhead"
(CUDA graphs: no launch gaps, static input copies). +devaug / +devjpeg: the batches arrive as the loader hands
them with ``augment_on`` "device" / "device_jpeg" (frames at the shards' 454x256, or their JPEG files, plus each
video's crop) and pass through ``train.prefetch.Prefetcher``: the copy, the decode and the crop of the next
batch are issued by its thread on a side stream while the step runs, and are
inside the timed step. +prefetch: the plain batches (cropped already, as
``--augment_on loader`` hands them) pass through the same Prefetcher, as the
trainer feeds every mode: their host-to-device copy overlaps the step on the side
stream instead of running on the step's own stream before its kernels.
Their pixels are smooth random pictures rather than noise, so their loss differs.
+tstream: the teacher's forward on a second CUDA stream, queued before the student's forward and run beside it
(``--teacher_stream beside``, ``train.streams``); +tahead: the next step's teacher there, beside this step's backward
(``--teacher_stream ahead``). The same kernels: each reuses the compiled code of the variant without it.

Timing: the timed steps run twice, each on its own (the GPU waited for before and
after each; their median is ``s_per_step_synced``, the measure of the 2026-11-26
H200 figures), then as many back to back with one wait at the end, as the
trainer runs them: the host queues a step while the GPU runs the one before.
Their mean is ``s_per_step``, which the rates and the MFU use.

--profile N: after timing, N more steps of each variant run under
torch.profiler; the GPU's busy time per step (kernels and copies), split into
matmul / attention / fused (Triton) / copy / optimizer / other, is reported
against the timed step, with the top kernels, in the JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import encode_jpeg

from benchmarks.args import CKPT, checkpointed_blocks
from benchmarks.harness import (
    LEVER_FLAGS,
    NO_LEVERS,
    checked_args,
    device_problems,
    failure,
    measure_matmul_tflops,
    profile_or_error,
    random_models,
    synthetic_batch,
)
from pipeline.cli import comma_list, count_problems, fire_main, folder_problems, number_problems, refuse
from pipeline.writer import atomic_write_bytes, json_bytes
from train import distributed, loop
from train.attention import use_packed_attention
from train.cls_last_block import use_cls_last_block
from train.data import Batch, TrainTransform
from train.loss import DISTILLATION, contrastive_loss, fitclip_loss
from train.model import (
    VideoTextModel,
    checkpoint_blocks,
    fit_width,
    image_size,
    normalize_frames,
    tokenizer_for,
    trim_padding,
    trims_text,
)
from train.monitor import forward_flops, peak_tflops, step_flops
from train.patch_embed import use_linear_patch_embed
from train.prefetch import Prefetcher
from train.profiling import describe, sync

KERNEL_OPTIONS = ("cudnn", "flash", "efficient", "math")  # --attention_kernel values a variant may name
VARIANT_OPTIONS = ("naive", "ours", "compile", "cteacher", "autotune", "graphs", "ckpt", "devaug", "devjpeg", "qkv")
VARIANT_OPTIONS += ("patch", "cls", "split", "tma", "cdt", "fullpad", "prefetch", *KERNEL_OPTIONS)
TEACHER_OPTIONS = {"tstream": "beside", "tahead": "ahead"}  # variant option -> --teacher_stream
VARIANT_OPTIONS += tuple(TEACHER_OPTIONS)
COMPILE_MODES = {"autotune": "max-autotune-no-cudagraphs", "graphs": "reduce-overhead"}  # else torch's default
SHARD_FRAME = (256, 454)  # (height, width) of the frames pipeline.shard --size 256 makes of 16:9 videos


def loader_batch(n: int, frames: int, size: int, tokenizer, seed: int, jpeg: bool, pin: bool) -> Batch:
    """What the loader hands over with augment_on "device" (jpeg False) or "device_jpeg" (jpeg True).

    Frames are smooth random pictures at the shards' size (JPEG files of realistic size, quality 90 as
    pipeline.shard writes them); crops are drawn by the trainer's TrainTransform.
    """
    g = torch.Generator().manual_seed(seed)
    height, width = SHARD_FRAME
    distinct = min(n * frames, 64)
    low = torch.rand(distinct, 3, 9, 16, generator=g) * 255
    pictures = F.interpolate(low, size=(height, width), mode="bicubic").clamp(0, 255).to(torch.uint8)  # (K, 3, H, W)
    pick = [i % distinct for i in range(n * frames)]
    transform = TrainTransform(size, seed=str(seed))
    crops = torch.stack([transform.params(height, width) for _ in range(n)])
    batch = dataclasses.replace(synthetic_batch(n, frames, 1, tokenizer, seed, False), crops=crops)
    if jpeg:
        files = [encode_jpeg(p, quality=90) for p in pictures]
        batch.video = torch.zeros(0, dtype=torch.uint8)
        batch.jpegs = torch.cat([files[i] for i in pick])
        batch.jpeg_sizes = torch.tensor([files[i].numel() for i in pick]).view(n, frames)
    else:  # (n, T, H, W, 3), the layout libjpeg decodes to
        batch.video = pictures[pick].permute(0, 2, 3, 1).reshape(n, frames, height, width, 3).contiguous()
    return batch.pin_memory() if pin else batch


def full_width(options: set[str], clip: torch.nn.Module) -> bool:
    """Whether a variant's captions stay padded to the model's context length: naive (what open_clip's tokenizer
    gives), +fullpad (``--trim_text False``), or a model whose text tower the cut would change
    (``train.model.trims_text``, as the trainer's ``text_tokenizer`` decides). The others' are cut as the trainer's
    loader cuts them."""
    return bool(options & {"naive", "fullpad"}) or not trims_text(clip)


def as_captioned(batch: Batch, options: set[str], clip: torch.nn.Module) -> Batch:
    """``batch`` with its captions as the variant's step gets them (``full_width``): cut after the longest
    (``train.model.trim_padding``), pinned again where they were."""
    if full_width(options, clip):
        return batch
    tokens = trim_padding(batch.tokens)
    return dataclasses.replace(batch, tokens=tokens.pin_memory() if batch.tokens.is_pinned() else tokens)


def caption_width(pair: list[Batch], options: set[str], clip: torch.nn.Module) -> int:
    """The width in tokens of the captions a variant's step runs (its two batches joined at the wider)."""
    return max(as_captioned(b, options, clip).tokens.shape[1] for b in pair)


def as_float_batch(batch: Batch) -> Batch:
    """The same pixels as a naive loader hands them over: CLIP-normalised float32 on the host (4x the bytes)."""
    return dataclasses.replace(batch, video=normalize_frames(batch.video))


def naive_step(student, teacher_fp32, optimizer, lab: Batch, unl: Batch, cfg, device) -> dict:
    """The straightforward step (see the module docstring)."""
    optimizer.zero_grad(set_to_none=True)
    frames = torch.cat([lab.video, unl.video]).to(device)  # joined on the host: an unpinned copy
    tokens = torch.cat([lab.tokens, unl.tokens]).to(device)
    n = lab.video.shape[0]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with amp:
        lv, lt = student(frames[:n], tokens[:n])
        uv, ut = student(frames[n:], tokens[n:])
        with torch.no_grad():
            tv, tt = teacher_fp32(frames[n:], tokens[n:])
    contrastive = contrastive_loss(lv, lt, cfg.sigma)
    distill = DISTILLATION[cfg.distillation](uv, ut, tv, tt, cfg.sigma)
    loss = fitclip_loss(contrastive, distill, cfg.lam)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach()}


def variant_problems(variant: str) -> list[str]:
    """A line for what is wrong with a ``--variants`` entry ("ours+compile+ckpt6"): an unknown lever (with the list of
    known ones), two attention kernels, +tma without +autotune, +cdt without +compile, +split without +qkv or +cls."""
    options = set(variant.split("+"))
    unknown = {o for o in options if o not in VARIANT_OPTIONS and not CKPT.fullmatch(o)}
    says = f"--variants {variant!r}:"
    if unknown:
        return [f"{says} unknown {sorted(unknown)}; options: {', '.join(VARIANT_OPTIONS)}, ckptN (N blocks)"]
    if len(options & set(KERNEL_OPTIONS)) > 1:
        return [f"{says} name at most one attention kernel of {', '.join(KERNEL_OPTIONS)}"]
    if len(options & set(TEACHER_OPTIONS)) > 1:
        return [f"{says} name at most one of {', '.join(TEACHER_OPTIONS)} (where the teacher runs)"]
    if "tma" in options and "autotune" not in options:
        return [f"{says} +tma adds kernels that only max-autotune tunes; add +autotune"]
    if "cdt" in options and "compile" not in options:
        return [f"{says} +cdt tunes the kernels torch.compile makes; add +compile"]
    if "split" in options and not options & {"qkv", "cls"}:
        return [f"{says} +split splits the projections of the packed attention; add +qkv or +cls"]
    return []


def variant_options(variant: str) -> set[str]:
    """The levers of a variant ("ours+compile+ckpt6"); one ``variant_problems`` refuses is a one-line ``error:``
    exit."""
    refuse(variant_problems(variant))
    return set(variant.split("+"))


def variants_problems(variants: list[str]) -> list[str]:
    """What is wrong with the ``--variants`` list: empty, or an entry ``variant_problems`` refuses."""
    if not variants:
        return ["--variants must name at least one variant (e.g. naive,ours,ours+compile)"]
    return [line for variant in variants for line in variant_problems(variant)]


def with_levers(model: torch.nn.Module, options: set[str]) -> torch.nn.Module:
    """``model`` (an open_clip CLIP, or a VideoTextModel around one) with the layout levers the options name, in
    place: +qkv (``train.attention``), +patch (``train.patch_embed``), +cls (``train.cls_last_block``), +split (q,
    k and v of those from three products)."""
    if "qkv" in options:
        use_packed_attention(model, "split" in options)
    if "patch" in options:
        use_linear_patch_embed(model)
    if "cls" in options:
        use_cls_last_block(model, "split" in options)
    return model


def run_variant(
    variant: str, base_models, cfg, batches: dict, device, steps: int, warmup: int, profile: int, on_timed=None
) -> dict:
    """Time one variant; ``on_timed(row)`` gets the row once timed, before its profile (which may fail or run out
    of time without losing the timing)."""
    options = variant_options(variant)
    cfg_v = dataclasses.replace(
        cfg,
        compile="compile" in options,
        grad_checkpointing=checkpointed_blocks(options),
        attention_kernel=next((k for k in KERNEL_OPTIONS if k in options), cfg.attention_kernel),
        teacher_stream=next((TEACHER_OPTIONS[o] for o in TEACHER_OPTIONS if o in options), "off"),
        **{flag: option in options for option, flag in LEVER_FLAGS.items()},  # what with_levers applies, on record
    )
    student_clip = with_levers(copy.deepcopy(base_models["student"]), options)
    student_clip.logit_scale.requires_grad_(False)
    checkpoint_blocks(student_clip, cfg_v.grad_checkpointing)
    student = VideoTextModel(student_clip, cfg.renormalize_video).to(device)
    batches = {source: [as_captioned(b, options, student_clip) for b in pair] for source, pair in batches.items()}
    lab, unl = batches["plain"]
    row = {"variant": variant, "batch": f"{lab.video.shape[0]}x{unl.video.shape[0]}"}
    row["caption_width"] = max(lab.tokens.shape[1], unl.tokens.shape[1])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prefetchers: list[Prefetcher] = []
    try:
        if "naive" in options:
            teacher = base_models["teacher_fp32"]()
            params = [p for p in student.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)

            lab_f, unl_f = as_float_batch(lab), as_float_batch(unl)

            def step():
                return naive_step(student, teacher, optimizer, lab_f, unl_f, cfg, device)
        else:
            mode = next((COMPILE_MODES[o] for o in COMPILE_MODES if o in options), None)
            compiling = loop.compile_options(mode, "tma" in options, "cdt" in options)
            trained = torch.compile(student, **compiling) if cfg_v.compile else student
            teacher = base_models["teacher"]
            if options & LEVER_FLAGS.keys():  # on a copy: the other variants keep open_clip's own layers
                teacher = with_levers(copy.deepcopy(teacher), options)
            if "cteacher" in options:
                teacher = torch.compile(teacher, **compiling)
            models = loop.Models(student, trained, teacher)
            optimizer, scheduler = loop.build_optimizer(student, cfg_v, device)
            source = "devjpeg" if "devjpeg" in options else "devaug" if "devaug" in options else "plain"
            size = image_size(student.clip)
            if source == "plain" and "prefetch" not in options:  # copied by the step itself, on its own stream
                labeled, unlabeled = (itertools.repeat(b) for b in batches["plain"])
            else:
                prefetchers = [Prefetcher(itertools.repeat(b), device, size) for b in batches[source]]
                labeled, unlabeled = prefetchers

            ahead = loop.Ahead() if cfg_v.teacher_stream == "ahead" else None

            def step():  # with +tahead, as the trainer's loop: the next unlabeled batch taken one step early
                lab, unl = next(labeled), loop.take_unlabeled(unlabeled, ahead, last=False)
                return loop.train_step(models, optimizer, scheduler, lab, unl, cfg_v, device, loop.Progress(), ahead)

        times, losses = [], []
        start_compile = time.perf_counter()
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            result = step()
            losses.append(float(result["loss"]))
            sync(device)
            if i == 0:
                row["first_step_s"] = round(time.perf_counter() - start_compile, 2)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        # then as many back to back, as the trainer runs them: the host queues the next step while the GPU runs this
        # one (with the fused AdamW the step never waits for the GPU: its skip is the kernel's). What training gets:
        # the row's s/step.
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            result = step()
        losses.append(float(result["loss"]))
        sync(device)
        row.update(s_per_step=(time.perf_counter() - t0) / steps, s_per_step_synced=statistics.median(times))
        row.update(first_loss=losses[0], last_loss=losses[-1], status="ok")
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if on_timed is not None:
            on_timed(row)
        if profile:
            row.update(profile_or_error(step, device, profile, row["s_per_step"]))
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM", peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)
    except Exception as e:  # a lever that fails (a compile mode, a decode) is a result; the sweep goes on
        row.update(status="error", error=failure(e))
        traceback.print_exc()
    finally:
        for prefetcher in prefetchers:  # its thread and the batch it holds on the GPU go before the next variant
            prefetcher.close()
    return row


def keep_row(record: dict, path: Path, videos: int, flops: float, measured: float, datasheet: float, row: dict) -> None:
    """Add a timed row's rates (``videos`` and ``flops`` per step), put the row in the record (once), and write the
    record atomically: called when a variant is timed and again after its profile, so a run stopped by a time limit
    keeps what it measured."""
    if row["status"] == "ok" and "videos_per_s" not in row:
        s = row["s_per_step"]
        row["flops_per_step"] = flops
        row["videos_per_s"] = videos / s
        row["tflops"] = flops / s / 1e12
        row["mfu_measured"] = row["tflops"] / measured if measured else None
        row["mfu_datasheet"] = row["tflops"] / datasheet if datasheet else None
    if not any(r is row for r in record["rows"]):
        record["rows"].append(row)
    atomic_write_bytes(path, json_bytes(record))


def main(
    model: str = "ViT-B-16-quickgelu",
    batches: str = "128x128",
    variants: str = "naive,ours,ours+compile",
    steps: int = 10,
    warmup: int = 3,
    frames: int = 4,
    device: str = "auto",
    memory_gib: float = 0.0,
    profile: int = 0,
    out: str = "benchmarks/output",
) -> None:
    """Time each variant at each batch (LxU) in one run.

    Args:
        model: open_clip model name or model-config JSON (random weights, nothing is downloaded).
        batches: comma list of LxU batches (L labeled + U unlabeled videos) to time every variant at, e.g. 128x128.
        variants: comma list of step variants, each naive or ours with +levers, e.g. ours+compile+ckpt6; levers
            compile, cteacher, autotune, tma, graphs, ckpt or ckptN, devaug, devjpeg, prefetch, tstream, tahead,
            qkv, patch, cls, fullpad, cudnn, flash, efficient or math (what each does is in
            benchmarks/step_variants.py's module docstring).
        steps: timed steps per variant and batch, twice: each on its own, waiting for the GPU before and after it
            (their median is s_per_step_synced), then as many back to back with one wait at the end, as the
            trainer runs them (their mean is s_per_step, which the rates and the MFU use).
        warmup: untimed steps before them; the first step's time, compiling included, is reported apart.
        frames: frames per video.
        device: auto, cuda or cpu.
        memory_gib: cap the GPU memory this process may use (e.g. 80 to check an H100's budget on an H200).
        profile: profile this many extra steps of each variant (GPU busy time by kernel kind).
        out: folder of the JSON record, step_variants_DEVICE.json, written after each variant.
    """
    variant_list = comma_list(variants)
    problems = count_problems({"steps": (steps, 1), "warmup": (warmup, 0), "frames": (frames, 1)})
    problems += count_problems({"profile": (profile, 0)}) + number_problems({"memory_gib": (memory_gib, 0, None)})
    problems += device_problems(device) + folder_problems({"out": out})
    # a typo in --variants is refused now, not after the variants before it have run
    batch_list = checked_args(model, batches, problems + variants_problems(variant_list))
    dist = distributed.init_distributed(device)
    dev = dist.device
    if memory_gib and dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(memory_gib) / total), dev)
    # eager bases with open_clip's own layers: each variant compiles its own and adds its own levers (with_levers)
    cfg, models = random_models(model, frames, dist, compile=False, **NO_LEVERS)
    student = models.student.clip.cpu()
    fp32_teacher = copy.deepcopy(models.student).eval().requires_grad_(False)

    def on_device() -> torch.nn.Module:
        """A copy on the GPU for the naive step only, freed with it: kept there, its 0.6 GiB (ViT-B/16) was in every
        later variant's peak_gib."""
        return copy.deepcopy(fp32_teacher).to(dev)

    base = {"student": student, "teacher": models.teacher, "teacher_fp32": on_device}
    tokenizer = tokenizer_for(model)
    size = image_size(base["student"])
    video, caption = torch.zeros(1, frames, 3, size, size, device=dev), tokenizer(["a video"]).to(dev)

    @functools.cache
    def video_flops(cls: bool, width: int) -> int:
        """FLOPs of one video's forward and its caption ``width`` tokens wide; with +cls those of the model it runs
        (the FLOPs the step performs)."""
        # Count on a model in train mode: in eval mode without gradients nn.MultiheadAttention takes a fused fast
        # path whose projections FlopCounterMode does not see (96 instead of 146 GFLOP for a ViT-B/16 video).
        clip = with_levers(copy.deepcopy(base["student"]), {"cls"} if cls else set())
        model = VideoTextModel(clip, cfg.renormalize_video).to(dev).train()
        return forward_flops(model, video, fit_width(caption, width))

    per_video = video_flops(False, caption.shape[1])
    measured = measure_matmul_tflops(dev)
    datasheet = peak_tflops(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"step_variants: {name}, torch {torch.__version__}, {model}, {frames} frames of {size}px, "
        f"{per_video / 1e9:.2f} GFLOP per video forward, bf16 peak measured {measured:.0f} TFLOP/s "
        f"(datasheet {datasheet:.0f})" + (f", memory capped at {memory_gib} GiB" if memory_gib else ""),
        flush=True,
    )
    rows = []
    record = {
        "device": name,
        "torch": torch.__version__,
        "model": model,
        "frames": frames,
        "per_video_flops": per_video,
        "peak_measured_tflops": measured,
        "peak_datasheet_tflops": datasheet,
        "memory_gib": memory_gib,
        "rows": rows,
        "complete": False,
    }
    Path(str(out)).mkdir(parents=True, exist_ok=True)
    path = Path(str(out)) / f"step_variants_{name.lower().replace(' ', '-')}.json"
    pin = dev.type == "cuda"
    for n_lab, n_unl in batch_list:
        sizes = (n_lab, n_unl)
        batches = {"plain": [synthetic_batch(n, frames, size, tokenizer, k + 1, pin) for k, n in enumerate(sizes)]}
        for source, jpeg in (("devaug", False), ("devjpeg", True)):
            if any(source in v.split("+") for v in variant_list):
                batches[source] = [
                    loader_batch(n, frames, size, tokenizer, k + 1, jpeg, pin) for k, n in enumerate(sizes)
                ]
        for variant in variant_list:
            options = variant_options(variant)
            counted = video_flops("cls" in options, caption_width(batches["plain"], options, base["student"]))
            flops = step_flops(counted, counted, n_lab, n_unl)
            keep = functools.partial(keep_row, record, path, n_lab + n_unl, flops, measured, datasheet)
            row = run_variant(variant, base, cfg, batches, dev, steps, warmup, profile, on_timed=keep)
            keep(row)
            print(
                f"  {row['batch']} {variant}: "
                + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in row.items()
                    if k not in ("variant", "batch", "profile", "profile_error")
                ),
                flush=True,
            )
            if "profile" in row and dev.type == "cuda":
                print(f"    {describe(row['profile'], row['s_per_step'])}", flush=True)
    naive = {r["batch"]: r for r in rows if r["variant"] == "naive" and r["status"] == "ok"}
    print(
        "\n| batch | variant | s/step | videos/s | vs naive | TFLOP/s | MFU (measured peak) | MFU (datasheet) | "
        "peak GiB | first step s | loss (first step) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['batch']} | {r['variant']} | {r['status']} | | | | | | {r.get('peak_gib', 0):.1f} | | |")
            continue
        speedup = r["videos_per_s"] / naive[r["batch"]]["videos_per_s"] if r["batch"] in naive else float("nan")
        mfu_m = f"{100 * r['mfu_measured']:.1f}%" if r.get("mfu_measured") else "n/a"
        mfu_d = f"{100 * r['mfu_datasheet']:.1f}%" if r.get("mfu_datasheet") else "n/a"
        print(
            f"| {r['batch']} | {r['variant']} | {r['s_per_step']:.4f} | {r['videos_per_s']:.1f} | {speedup:.2f}x | "
            f"{r['tflops']:.1f} | {mfu_m} | {mfu_d} | {r.get('peak_gib', float('nan')):.1f} | "
            f"{r['first_step_s']} | {r['first_loss']:.5f} |"
        )
    record["complete"] = True
    atomic_write_bytes(path, json_bytes(record))
    print(f"wrote {path}")
    failed = [r["variant"] for r in rows if r["status"] == "error"]
    if failed:
        raise SystemExit(f"step_variants: {', '.join(failed)} failed (tracebacks above; the others were measured)")


if __name__ == "__main__":
    fire_main(main)
