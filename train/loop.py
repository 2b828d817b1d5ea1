"""The FitCLIP training loop: steps, validation, checkpoints, fusion at the end.

One step, on every rank: a labeled batch (contrastive loss, Eq. 1-2) and an
unlabeled batch whose soft labels the frozen teacher computes on the fly
(distillation, Eq. 3-4), combined by Eq. 5. Embeddings are gathered across
ranks with gradient, so every rank computes the loss of the global batch and
DDP's gradient averaging gives exactly the single-process gradient.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.writer import atomic_write_bytes, json_bytes, remove_temporaries
from train import checkpoint, data, distributed, preempt, streams
from train.attention import attention_kernel, use_packed_attention
from train.cls_last_block import use_cls_last_block
from train.config import TrainConfig
from train.fuse import fuse_state_dicts, teacher_state_dict
from train.loss import DISTILLATION, contrastive_loss, fitclip_loss
from train.metrics import retrieval_metrics
from train.model import (
    VideoTextModel,
    check_crop,
    check_weights,
    checkpoint_blocks,
    create_clip,
    fit_problem,
    fit_width,
    freeze,
    image_size,
    load_state_dict,
    state_shapes,
    text_tokenizer,
    tokenizer_for,
)
from train.monitor import Monitor, Timer, forward_flops, peak_tflops, step_flops
from train.patch_embed import use_linear_patch_embed
from train.prefetch import Prefetcher
from train.profiling import StepProfiler, describe


@dataclass
class Progress:
    """What a checkpoint carries besides weights and optimizer."""

    step: int = 0
    best_val_loss: float = math.inf
    skipped_steps: int = 0  # as of the last settle_skips
    unsettled_skips: torch.Tensor | int = 0  # skipped on the device since then, not yet read (not saved)
    dropped_samples: int = 0  # over all ranks, as of the last sync_dropped
    unsynced_dropped: int = 0  # this rank's since then (not saved)
    # the last validation's figures, for summary.json: saved, so a run resumed at its last step keeps them
    last_val: dict = field(default_factory=dict)
    # labeled samples taken over all ranks (ranks x --batch_labeled a step): where a resumed run's labeled stream
    # goes on, whatever its number of ranks, workers or batch (train.data.IndexedShards); None: not yet known
    labeled_seen: int | None = 0
    world_size: int | None = None  # the processes of the run that saved the checkpoint (None: not saved then)
    # the labeled passes' order keeps a step from holding a video twice (train.passes); False: a run saved before
    # that, which goes on in its own order (else a resume inside a pass would take some of its samples twice). The
    # key came four commits after the guard (e7a2bd6..78f0ccd, never released): a run saved by those is taken as
    # unguarded, which only a resume inside its second or a later pass would tell
    passes_guarded: bool = True


@dataclass
class Models:
    student: VideoTextModel  # the trained module (unwrapped)
    trained: torch.nn.Module  # what the step calls: DDP and/or compiled wrapper of the student
    teacher: torch.nn.Module  # frozen VideoTextModel, compiled when the student is


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast on GPU unless fp32 is asked for; on CPU only when bf16 is asked for."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(cfg, device) else nullcontext()


def augment_on(cfg: TrainConfig, device: torch.device) -> str:
    """Where the training crop runs: as configured, or (auto) on a GPU with the JPEG decode, on a CPU in the workers.

    On a GPU "device_jpeg": of the three modes, only its 6 workers fed a compiled 128+128 H200 step with the 2x margin
    that issue 6 asks (5.2x; "device" 1.75x), for a 6% slower step (benchmarks/README.md).
    """
    if cfg.augment_on != "auto":
        return cfg.augment_on
    return "device_jpeg" if device.type == "cuda" else "loader"


def build_models(cfg: TrainConfig, dist: distributed.DistInfo) -> Models:
    """Teacher (frozen, eval, no grad, bf16 weights on GPU) and student (initialised from the teacher)."""
    teacher_clip = create_clip(cfg.model, _teacher_source(cfg), "cpu")
    student_clip = copy.deepcopy(teacher_clip)
    student_clip.logit_scale.requires_grad_(False)  # the temperature is fixed (sigma), not learned
    if cfg.packed_qkv:  # the same parameters and function, so state dicts, fusion and resume do not change
        use_packed_attention(student_clip, cfg.split_qkv)
        use_packed_attention(teacher_clip, cfg.split_qkv)
    if cfg.linear_patch_embed:  # likewise
        use_linear_patch_embed(student_clip)
        use_linear_patch_embed(teacher_clip)
    if cfg.cls_last_block:  # likewise
        use_cls_last_block(student_clip, cfg.split_qkv)
        use_cls_last_block(teacher_clip, cfg.split_qkv)
    checkpoint_blocks(student_clip, cfg.grad_checkpointing)
    student = VideoTextModel(student_clip, cfg.renormalize_video).to(dist.device)
    teacher = freeze(VideoTextModel(teacher_clip, cfg.renormalize_video)).to(dist.device)
    if dist.device.type == "cuda" and uses_bf16(cfg, dist.device):
        teacher = teacher.to(torch.bfloat16)  # frozen: bf16 weights halve its memory and time; fp32 runs keep fp32
    trained: torch.nn.Module = student
    if dist.world_size > 1:
        trained = DistributedDataParallel(
            student, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    if cfg.compile or (cfg.compile is None and dist.device.type == "cuda"):
        # measured on an H200 at 128+128 videos: 0.378 s/step with the student compiled vs 0.564 s eager, and 66 vs
        # 89 GiB. The teacher's forward is the same network; eager it ran at 31% MFU there, which makes it about a
        # fifth of the compiled step's time. Compiled it adds one graph (same code, but inference mode makes dynamo
        # trace it apart), made on the first step with no recompiles after (tested on the CPU).
        options = compile_options(cfg.compile_mode, cfg.persistent_tma_matmul, cfg.coordinate_descent_tuning)
        trained = torch.compile(trained, **options)
        teacher = torch.compile(teacher, **options)
    return Models(student, trained, teacher)


def compile_options(mode: str | None, persistent_tma_matmul: bool = False, coordinate_descent: bool = False) -> dict:
    """``torch.compile``'s keyword arguments for compile ``mode``, with Triton's persistent TMA matmul templates among
    the kernels max-autotune tunes if asked (``--persistent_tma_matmul``), and inductor's coordinate-descent tuning
    of its Triton kernels' block sizes if asked (``--coordinate_descent_tuning``; max-autotune's modes have it
    already). torch.compile takes a mode or inductor options, not both: so the mode's own options, plus those
    (applied to this compile only, not process-wide)."""
    extra = {}
    if persistent_tma_matmul:
        extra["triton.enable_persistent_tma_matmul"] = True
    if coordinate_descent:
        extra["coordinate_descent_tuning"] = True
    if not extra:
        return {"mode": mode}
    from torch._inductor import list_mode_options  # inductor's import is heavy: only when asked for

    return {"options": {**list_mode_options(mode or "default"), **extra}}


def _teacher_source(cfg: TrainConfig) -> str:
    """The teacher's weights; a random teacher (tests) is saved once in OUT so fusion and resume see the same one."""
    if cfg.teacher_weights:
        return cfg.teacher_weights
    path = Path(_teacher_weights(cfg))
    if distributed.is_main() and not path.exists():
        torch.manual_seed(cfg.seed)
        checkpoint.atomic_save(create_clip(cfg.model, "", "cpu").state_dict(), path)
    distributed.barrier()
    return str(path)


def _teacher_weights(cfg: TrainConfig) -> str:
    """The teacher's weights: the tag or file given, or the saved random initialisation (tests, benchmarks)."""
    return cfg.teacher_weights or str(Path(cfg.out) / "teacher_init.pt")


def build_optimizer(student: torch.nn.Module, cfg: TrainConfig, device: torch.device, fused: bool | None = None):
    """AdamW (fused: one kernel for every tensor; by default on a GPU) and the warmup + cosine schedule."""
    params = [p for p in student.parameters() if p.requires_grad]
    fused = device.type == "cuda" if fused is None else fused
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Ahead:
    """``--teacher_stream ahead``: the next step's unlabeled batch, taken one step early (``take_unlabeled``), and
    the teacher's embeddings of a batch, queued on the side stream during the step before the one that uses them."""

    batch: data.Batch | None = None  # the next step's unlabeled batch
    embedded: data.Batch | None = None  # the batch whose embeddings are queued
    embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # the teacher's (video, text), inference tensors


def take_unlabeled(unlabeled: Iterator[data.Batch], ahead: Ahead | None, last: bool) -> data.Batch:
    """This step's unlabeled batch: the one taken early at the step before (``--teacher_stream ahead``), else the
    next; with ``ahead``, also the next step's, taken now so that this step can queue its teacher (none after the
    ``last`` step). The batches come in the same order either way."""
    batch = ahead.batch if ahead is not None and ahead.batch is not None else next(unlabeled)
    if ahead is not None:
        ahead.batch = None if last else next(unlabeled)
    return batch


def teacher_embeddings(
    models: Models, frames: torch.Tensor, tokens: torch.Tensor, cfg: TrainConfig, side: torch.cuda.Stream | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's (video, text) embeddings, as inference tensors; queued on ``side`` if given (None: the
    current stream), where the reader must ``streams.join`` them first."""
    # the kernel order is read when SDPA is called (compiled: when the graph is traced), so it wraps the forward
    with autocast(cfg, frames.device), attention_kernel(cfg.attention_kernel), streams.on_side(side, frames, tokens):
        # one layout for the compiled graph whatever the loader mode hands over (the GPU crop's frames are strided):
        # a copy of those, on this stream, else nothing; outside inference mode, which would make an inference
        # tensor of a copy only, and a graph for each kind
        frames, tokens = frames.contiguous(), tokens.contiguous()
        with torch.inference_mode():
            return models.teacher(frames, tokens)


def teacher_ahead(
    models: Models, batch: data.Batch, cfg: TrainConfig, device: torch.device, after: torch.cuda.Event | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's embeddings of an unlabeled batch, queued on the side stream for the step that will use it
    (``--teacher_stream ahead``), after the event ``after`` only (``streams.mark``: the batch ready, the backward
    queued since not waited for)."""
    with streams.on_side(_side(cfg, device), batch.video, batch.tokens, after=after):
        frames, tokens = _on_device(batch, device)  # a batch not on the GPU yet: copied on the side stream
        return teacher_embeddings(models, frames, tokens, cfg, None)


def _on_device(batch: data.Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's frames and captions on ``device`` (already there from the prefetcher: as they are), the captions'
    width marked dynamic: compiled, one graph for every width, not one per width."""
    video, tokens = (t.to(device, non_blocking=True) for t in (batch.video, batch.tokens))
    torch._dynamo.maybe_mark_dynamic(tokens, 1)
    return video, tokens


def _side(cfg: TrainConfig, device: torch.device) -> torch.cuda.Stream | None:
    """The teacher's stream under ``--teacher_stream`` beside or ahead on a GPU; None: the step's own."""
    return streams.side_stream(device) if cfg.teacher_stream != "off" and device.type == "cuda" else None


def compute_loss(
    models: Models,
    labeled: data.Batch,
    unlabeled: data.Batch,
    cfg: TrainConfig,
    device: torch.device,
    teacher_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 5 on the global batch. One student forward over labeled and unlabeled videos together. ``teacher_out``:
    the teacher's embeddings of ``unlabeled``, queued earlier (``teacher_ahead``); else the teacher runs here."""
    n_labeled = labeled.video.shape[0]
    # Copy each (pinned) batch as it is and join on the device: joining on the host makes an unpinned copy.
    (lab_video, lab_tokens), (unl_video, unl_tokens) = (_on_device(b, device) for b in (labeled, unlabeled))
    frames = torch.cat([lab_video, unl_video])
    # each batch's captions may be cut to their own width (--trim_text): joined at the wider of the two
    width = max(lab_tokens.shape[1], unl_tokens.shape[1])
    tokens = torch.cat([fit_width(lab_tokens, width), fit_width(unl_tokens, width)])
    torch._dynamo.maybe_mark_dynamic(tokens, 1)  # compiled: one graph for every width, not one per width
    # frames (Bl+Bu, T, 3, S, S), tokens (Bl+Bu, L)
    side = _side(cfg, device)
    if teacher_out is None:  # the teacher first: on the side stream its kernels run beside the student's forward
        # the unlabeled batch's own tensors, as teacher_ahead gives them: one compiled graph for both ways
        teacher_out = teacher_embeddings(models, unl_video, unl_tokens, cfg, side)  # (Bu, D) each
    with autocast(cfg, device), attention_kernel(cfg.attention_kernel):
        video, text = models.trained(frames, tokens)  # (Bl+Bu, D) each
    streams.join(side, *teacher_out)
    teacher_video, teacher_text = teacher_out
    # inference tensors cannot enter autograd graphs; clone() makes plain tensors of them.
    teacher_video, teacher_text = teacher_video.clone(), teacher_text.clone()
    gather = distributed.gather_with_grad
    contrastive = contrastive_loss(gather(video[:n_labeled]), gather(text[:n_labeled]), cfg.sigma)
    distill = DISTILLATION[cfg.distillation](
        gather(video[n_labeled:]),
        gather(text[n_labeled:]),
        distributed.gather_no_grad(teacher_video),
        distributed.gather_no_grad(teacher_text),
        cfg.sigma,
    )
    total = fitclip_loss(contrastive, distill, cfg.lam)
    return total, {"contrastive": contrastive.detach(), "distillation": distill.detach()}


def train_step(
    models, optimizer, scheduler, labeled, unlabeled, cfg, device, progress: Progress, ahead: Ahead | None = None
) -> dict:
    """One optimizer step; a non-finite loss or gradient norm (on any rank) skips it without touching the weights.

    Returns the step's loss, its parts and the gradient norm, and ``finite`` (1.0, or 0.0 for a skipped step), as
    tensors: converting every step would stall the GPU queue; ``_log`` converts once per window. With ``ahead``
    (``--teacher_stream ahead``): the teacher's embeddings of ``unlabeled`` if the step before queued them, and
    those of ``ahead.batch`` queued for the next step while this step's backward runs."""
    optimizer.zero_grad(set_to_none=True)
    ready = ahead.embeddings if ahead is not None and ahead.embedded is unlabeled else None
    # the next batch is on its way to the GPU (the prefetcher's copy, waited for on this stream); this step is not
    batch_ready = streams.mark(_side(cfg, device)) if ahead is not None else None
    loss, parts = compute_loss(models, labeled, unlabeled, cfg, device, ready)
    loss.backward()
    if ahead is not None:  # queued after the backward, waiting only for the batch: the GPU runs the two side by side
        ahead.embedded = ahead.batch
        if ahead.batch is not None:
            ahead.embeddings = teacher_ahead(models, ahead.batch, cfg, device, batch_ready)
        else:
            ahead.embeddings = None
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(models.student.parameters(), max_norm)
    # The gradients are checked as well as the loss: a kernel can return non-finite gradients for a finite loss
    # (reported of cuDNN's attention backward in some versions), and one such step would make every weight NaN.
    finite = (torch.isfinite(loss) & torch.isfinite(grad_norm)).float()
    if distributed.get_world_size() > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    # the learning rate this step trains at (the scheduler's step below sets the next step's)
    lr = optimizer.param_groups[0]["lr"]
    result = {"loss": loss.detach(), **parts, "grad_norm": grad_norm.detach(), "finite": finite, "lr": lr}
    if optimizer.defaults.get("fused"):
        # Skipped on the device, with no wait for the GPU, so the host queues the next step meanwhile: where
        # found_inf is 1, the fused AdamW kernel leaves weights, moments and step count as they were (GradScaler's
        # way). The schedule steps on; settle_skips takes it back when it reads the skips, once per log window.
        optimizer.found_inf = 1.0 - finite
        optimizer.step()
        scheduler.step()
        progress.unsettled_skips = progress.unsettled_skips + optimizer.found_inf
        return result
    if finite.item() < 1:  # the one wait for the GPU, after the backward has been queued
        optimizer.zero_grad(set_to_none=True)
        progress.skipped_steps += 1
        return result
    optimizer.step()
    scheduler.step()
    return result


def settle_skips(progress: Progress, scheduler) -> None:
    """Count the steps skipped on the device since the last call, and take the learning-rate schedule back by as
    many: it advanced for them, and a skipped step is no step (as on the host path). Every rank skips the same
    steps (their check is all-reduced), so each reads its own count."""
    if isinstance(progress.unsettled_skips, int):
        return
    skipped = round(float(progress.unsettled_skips))
    progress.unsettled_skips = 0
    if skipped:
        progress.skipped_steps += skipped
        # one step short of where the skips leave it, then the scheduler's own step: its epoch and learning rate
        scheduler.last_epoch -= skipped + 1
        scheduler.step()


def validation_loader(student: VideoTextModel, cfg: TrainConfig, device: torch.device, tokenizer):
    """The validation set's loader, made once per run: its workers persist from one validation to the next (each
    validation starts a new pass through them). So it forks once, at the start, where a loader made at each
    validation forked mid-run, and a fork made while a thread is starting or ending (the last validation loader's
    queue feeder, closing late on a loaded machine) can leave the new worker deadlocked in CPython's fork handling
    (``_PyThreadState_DeleteExcept``): its rank then waits on it forever (seen once under torchrun, 2 ranks on 2
    cores, with 4 test processes beside them)."""
    stream = data.validation_stream(
        cfg.val, cfg.frames, data.EvalTransform(image_size(student.clip)), tokenizer, cfg.val_batch, cfg.val_max
    )
    return data.loader(stream, min(cfg.workers, 2), device.type == "cuda", cfg.seed)


@torch.no_grad()
def validate(student: VideoTextModel, cfg: TrainConfig, device: torch.device, loader) -> dict[str, float]:
    """The student's labeled contrastive loss on the validation set at a fixed batch size, and text->video R@k.

    Every rank embeds its share of the videos; the embeddings are gathered and put
    back in file order, so the numbers do not depend on the number of ranks or workers. ``loader``: the run's
    ``validation_loader``.
    """
    student.eval()
    indices, videos, texts = [], [], []
    for batch in loader:
        with autocast(cfg, device):
            v, t = student(batch.video.to(device), batch.tokens.to(device))
        indices.append(batch.index)
        videos.append(v.float().cpu())
        texts.append(t.float().cpu())
    student.train()
    shards = distributed.all_gather_object((_cat(indices, torch.long), _cat(videos), _cat(texts)))
    index = torch.cat([s[0] for s in shards])
    order = index.argsort()
    video, text = torch.cat([s[1] for s in shards])[order], torch.cat([s[2] for s in shards])[order]
    n = video.shape[0]
    metrics = {"loss": validation_loss(video, text, cfg.val_batch, cfg.sigma), "videos": n}
    metrics.update(retrieval_metrics(text @ video.T))  # queries: texts, candidates: videos
    return metrics


def validation_loss(video: torch.Tensor, text: torch.Tensor, batch: int, sigma: float) -> float:
    """The mean contrastive loss over batches of ``batch`` videos in order: a fixed batch, as the loss depends on
    it (the paper's model selection). When ``batch`` does not divide the count, the last batch is the last
    ``batch`` videos, overlapping the one before: every video is scored, and no batch is smaller than the others
    (with 127 videos in batches of 64, the last 63 used to be left out)."""
    n = video.shape[0]
    size = min(batch, n)
    starts = list(range(0, n - size + 1, size))
    if n % size:
        starts.append(n - size)
    return float(torch.stack([contrastive_loss(video[i : i + size], text[i : i + size], sigma) for i in starts]).mean())


def _cat(parts: list[torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def save_latest(models: Models, optimizer, scheduler, cfg: TrainConfig, progress: Progress) -> None:
    if distributed.is_main():
        checkpoint.atomic_save(
            {
                "step": progress.step,
                "student": models.student.clip.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "config": cfg.to_dict(),
                "best_val_loss": progress.best_val_loss,
                "skipped_steps": progress.skipped_steps,
                "dropped_samples": progress.dropped_samples,
                "last_val": progress.last_val,
                "labeled_seen": progress.labeled_seen,
                "passes_guarded": progress.passes_guarded,
                "world_size": distributed.get_world_size(),
            },
            Path(cfg.out) / checkpoint.LATEST,
        )
    distributed.barrier()


def save_best(models: Models, cfg: TrainConfig, progress: Progress, val: dict) -> None:
    if distributed.is_main():
        checkpoint.atomic_save(
            {
                "step": progress.step,
                "student": models.student.clip.state_dict(),
                "config": cfg.to_dict(),
                "val": val,
                "val_identity": data.validation_identity(cfg.val) if cfg.val else None,  # a resume's --val is this set
            },
            Path(cfg.out) / checkpoint.BEST,
        )


def config_changes(saved: dict, current: dict) -> list[str]:
    """The flags whose values differ between a checkpoint's config and this run's (``--resume`` always does). A
    file named relative to the folder then and absolute now (train.main records --model's and --teacher_weights'
    files absolute since 2026-11-28) is the same flag."""
    return [
        f"--{k} {saved[k]!r} -> {current[k]!r}"
        for k in current
        if k != "resume" and k in saved and saved[k] != current[k] and not _same_file(saved[k], current[k])
    ]


def _same_file(a: object, b: object) -> bool:
    return isinstance(a, str) and isinstance(b, str) and bool(a and b) and Path(a).resolve() == Path(b).resolve()


def seed_process(seed: int, rank: int, step: int) -> None:
    """Seed this process's torch and Python random numbers from --seed, its rank and the step it starts at: with
    --workers 0 they draw the crops and flips, which must differ between the ranks and be the same for the same
    seed. A resumed run starts afresh from its step (a checkpoint held rank 0's state only, which every rank took)."""
    value = seed + 7919 * rank + 1_000_003 * step
    torch.manual_seed(value)
    random.seed(value)


def loader_seed(seed: int, stream: int, rank: int) -> int:
    """The seed of a stream's DataLoader. Its workers draw the crops and flips, which must differ between the
    streams and between the ranks (with one seed, the i-th video of every rank got the same crop)."""
    return seed + stream + 7919 * rank


def sync_dropped(progress: Progress, device: torch.device) -> None:
    """Add every rank's dropped samples since the last sync to the run's count. Each rank reads its own shards, so
    rank 0's count alone is not the run's. Every rank calls this at the same steps (log, validation)."""
    progress.dropped_samples += distributed.all_reduce_int(progress.unsynced_dropped, device)
    progress.unsynced_dropped = 0


def apply_hyper_parameters(optimizer, scheduler, cfg: TrainConfig) -> None:
    """This run's --lr, --weight_decay and --betas over the ones a restored optimizer and scheduler carry (their
    load_state_dict brings back the checkpoint's), at the schedule's current point. A resumed run with the same
    flags is unchanged."""
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group.update(
            initial_lr=cfg.lr,
            lr=cfg.lr * factor(scheduler.last_epoch),
            weight_decay=cfg.weight_decay,
            betas=tuple(cfg.betas),
        )


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this run's choice of kernel: the saved parameter groups carry
    the saving run's (a CPU run's fused=False), and a fused AdamW's group that says otherwise fails at the first
    step that passes ``found_inf`` (``train_step`` reads the choice from ``optimizer.defaults``)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for key in ("fused", "foreach", "capturable"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


def restore(path: Path, models: Models, optimizer, scheduler, progress: Progress) -> dict:
    """Load a run's state from ``path`` into the models, optimizer, scheduler and progress; returns its config."""
    state = checkpoint.load(path)
    problem = fit_problem(state["student"], state_shapes(models.student.clip))
    if not problem:
        models.student.clip.load_state_dict(state["student"])
        try:
            load_optimizer(optimizer, state["optimizer"])
        except ValueError as e:  # parameter groups of another model or recipe
            problem = str(e)
    if problem:  # a model that cannot be built on the meta device, or another optimizer layout
        raise checkpoint.another_model(path, state, problem)
    scheduler.load_state_dict(state["scheduler"])
    progress.step = state["step"]
    progress.best_val_loss = state["best_val_loss"]
    progress.skipped_steps = state["skipped_steps"]
    progress.dropped_samples = state.get("dropped_samples", 0)
    progress.last_val = state.get("last_val", {})  # not in checkpoints from before it was saved
    progress.labeled_seen = state.get("labeled_seen")  # nor this: _train counts it from the step
    progress.world_size = state.get("world_size")
    progress.passes_guarded = state.get("passes_guarded", False)
    return state.get("config", {})


def run(cfg: TrainConfig) -> dict:
    """Train, validate, checkpoint and fuse as ``cfg`` says. Returns the final summary (also OUT/summary.json)."""
    folders = (cfg.labeled, cfg.unlabeled) + ((cfg.val,) if cfg.val else ())
    for folder in folders:
        data.check_frames(folder, cfg.frames)  # a missing or empty folder, or too few frames, before any model
    # at least 2 videos: one pair's loss is 0
    val_videos = data.check_validation(cfg.val, cfg.val_max) if cfg.val else cfg.val_batch
    check_crop(cfg.model, cfg.crop)
    check_weights(cfg.model, cfg.teacher_weights)  # a missing file or unknown tag, before the download and OUT
    dist = distributed.init_distributed(cfg.device)
    out = Path(cfg.out)
    # before anything is built or written into OUT: a weights-only file, another model's run, nothing to train
    resume_from = checkpoint.resume_path(
        out, cfg.resume, cfg.model, cfg.steps, bool(cfg.val) and cfg.fuse, (cfg.val, cfg.val_batch)
    )
    _check_ranks_agree(resume_from)
    out.mkdir(parents=True, exist_ok=True)
    lock = checkpoint.lock_run(out) if distributed.is_main() else None
    if lock is not None:  # a save killed mid-way left its temporary file (a ViT-B/16 latest.pt is ~1.8 GB)
        remove_temporaries(out)
    if distributed.is_main():
        for warning in (line for folder in folders for line in data.shard_warnings(folder)):
            print(warning, file=sys.stderr)
    if distributed.is_main() and val_videos < cfg.val_batch:  # validation_loss takes min(batch, videos)
        print(
            f"note: {val_videos} validation videos, fewer than --val_batch {cfg.val_batch}: the validation loss (the "
            f"model-selection criterion) is over batches of {val_videos}"
        )
    try:
        summary = _train(cfg, dist, resume_from)
    finally:
        distributed.cleanup()
        if lock is not None:
            lock.close()
    return summary


def _check_ranks_agree(resume_from: Path | None) -> None:
    """Refuse a run whose processes would resume from different checkpoints, or some from none: each finds its own
    (``--resume auto`` looks in OUT), and an OUT on each node's own disk gives each node its own, or none. DDP would
    then average the gradients of models at different steps and weights, and the ranks would end at different
    steps, one waiting for the others for good. Told apart by content, not path: a shared folder may be mounted at
    another path on each node."""
    found = distributed.all_gather_object(None if resume_from is None else checkpoint_digest(resume_from))
    if len(set(found)) > 1:
        mine = distributed.get_rank()
        said = "; ".join(
            f"rank {rank}: " + ("nothing" if f is None else f"a checkpoint of {f[0]} bytes, digest {f[1][:12]}")
            for rank, f in enumerate(found)
        )
        raise checkpoint.CheckpointError(
            f"the processes would not resume from the same checkpoint (this is rank {mine}, resuming from "
            f"{resume_from or 'nothing'}; {said}): give --out a folder every node sees (a shared filesystem), and "
            "--resume a file every node can read"
        )


def checkpoint_digest(path: Path, edge: int = 1 << 20) -> tuple[int, str]:
    """``path``'s size and a hash of its first and last MiB: two checkpoints of one model are the same size, and
    differ at the start (the pickled step, optimizer state) and in the weights' bytes."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(edge))
        f.seek(max(size - edge, 0))
        digest.update(f.read(edge))
    return size, digest.hexdigest()


def _train(cfg: TrainConfig, dist: distributed.DistInfo, resume_from: Path | None) -> dict:
    # one seed on every rank while the models are built: DDP hands rank 0's student to the others, but nothing
    # would hand them its teacher, and a teacher of random weights (a model config without --teacher_weights)
    # would differ between ranks
    torch.manual_seed(cfg.seed)
    if distributed.is_main():
        print("train.main config:\n" + json.dumps(cfg.to_dict(), indent=1))
    models = build_models(cfg, dist)
    optimizer, scheduler = build_optimizer(models.student, cfg, dist.device)
    progress = Progress()
    if resume_from is not None:
        saved = restore(resume_from, models, optimizer, scheduler, progress)
        if progress.labeled_seen is None:  # a checkpoint from before labeled_seen was saved: its readers took
            # about the first steps x ranks x batch samples, with its own batch and (not saved) as many ranks as now
            progress.labeled_seen = progress.step * dist.world_size * saved.get("batch_labeled", cfg.batch_labeled)
        apply_hyper_parameters(optimizer, scheduler, cfg)
        # the best loss is that of a best.pt in OUT: a run resumed from another folder's latest.pt has none yet,
        # and keeping that folder's best would leave it without one (nothing better to save) and without fitclip.pt
        here = (Path(cfg.out) / checkpoint.BEST).is_file()
        best = checkpoint.best_val_loss(cfg.out) if here else None  # None also for a damaged one: replaced
        progress.best_val_loss = math.inf if best is None else min(progress.best_val_loss, best)
        if distributed.is_main():
            print(f"resumed from {resume_from} at step {progress.step}")
            if here and best is None:
                print(
                    f"warning: {Path(cfg.out) / checkpoint.BEST} cannot be read (damaged); the run's next "
                    "validation replaces it",
                    file=sys.stderr,
                )
            if progress.step >= cfg.steps:
                print(f"note: the checkpoint is at step {progress.step}, --steps is {cfg.steps}: nothing to train")
            changes = config_changes(saved, cfg.to_dict())
            if changes:  # often meant (more --steps), sometimes a typo in a relaunch: say so once
                print(f"note: this run's flags differ from the checkpoint's: {', '.join(changes)}")
            if progress.world_size not in (None, dist.world_size):  # the batches are per process
                then = progress.world_size * saved.get("batch_labeled", cfg.batch_labeled)
                print(
                    f"note: the checkpoint was saved by a run of {progress.world_size} process(es), this one has "
                    f"{dist.world_size}: the batches are per process, so the contrastive loss's labeled batch goes "
                    f"from {then} to {dist.world_size * cfg.batch_labeled} videos"
                )
    seed_process(cfg.seed, dist.rank, progress.step)
    if distributed.is_main():  # after the restore: a checkpoint of another model leaves no config behind
        atomic_write_bytes(Path(cfg.out) / "config.json", json_bytes(cfg.to_dict()))
    tokenizer = text_tokenizer(models.student.clip, tokenizer_for(cfg.model), cfg.trim_text)
    size = cfg.crop or image_size(models.student.clip)
    # A resumed run goes on through the labeled passes where it stopped (the same permutations, past the samples
    # it trained on). Its unlabeled shards are drawn at random with replacement: there a new seed (a new draw,
    # not a replay of the first batches) is as good as the old position. So are new crops.
    seed = cfg.seed + progress.step
    # each stream's crops from a generator of its own: with --workers 0 on a GPU both are drawn in the prefetchers'
    # two threads, where one shared generator made the crops depend on the threads' timing
    transform = [data.TrainTransform(size, cfg.crop_scale, seed=f"{seed}-{kind}") for kind in range(2)]
    where = augment_on(cfg, dist.device)
    pin = dist.device.type == "cuda"
    val_loader = None
    if cfg.val:  # its workers forked first, before the training loaders' threads (validation_loader says why)
        val_loader = validation_loader(models.student, cfg, dist.device, tokenizer)
        iter(val_loader)
    streams = (
        data.labeled_stream(
            cfg.labeled,
            cfg.frames,
            transform[0],
            tokenizer,
            cfg.batch_labeled,
            cfg.seed,
            where,
            progress.labeled_seen,
            progress.passes_guarded,
        ),
        data.unlabeled_stream(
            cfg.unlabeled, cfg.frames, transform[1], tokenizer, cfg.batch_unlabeled, seed, where, cfg.shuffle_buffer
        ),
    )
    # batches reach the step on the device: copied (and cropped, if `where` says so) one step ahead
    labeled, unlabeled = (
        Prefetcher(iter(data.loader(stream, cfg.workers, pin, loader_seed(seed, k, dist.rank))), dist.device, size)
        for k, stream in enumerate(streams)
    )
    monitor = Monitor(cfg, distributed.is_main(), cfg.steps, progress.step)
    flops = _flops_per_step(models, cfg, size, tokenizer, dist.device)
    peak = peak_tflops(dist.device, cfg.peak_tflops)
    timer, window = Timer(), []
    ahead = Ahead() if cfg.teacher_stream == "ahead" else None
    profiler = _profiler(cfg, dist, progress.step, monitor)
    # SIGTERM: save and stop at the next check (a log step, or every 10 steps); blocked --stuck_after s: end
    stop = preempt.StopOnSignal(stuck_s=cfg.stuck_after)
    try:
        try:
            stop.start()
            while progress.step < cfg.steps:
                profiler.begin(progress.step)
                t0 = time.perf_counter()
                lab, unl = next(labeled), take_unlabeled(unlabeled, ahead, last=progress.step + 1 >= cfg.steps)
                timer.data += time.perf_counter() - t0
                if progress.step == 0 and distributed.is_main():
                    monitor.log_samples(*data.sample_grid(lab), step=0)
                progress.unsynced_dropped += lab.dropped + unl.dropped
                result = train_step(models, optimizer, scheduler, lab, unl, cfg, dist.device, progress, ahead)
                progress.step += 1
                progress.labeled_seen += dist.world_size * cfg.batch_labeled
                timer.steps += 1
                if peak:  # counted once per captions' width (a forward of one video): only where an MFU is logged
                    timer.flops += flops(max(lab.tokens.shape[1], unl.tokens.shape[1]))
                monitor.advance()
                window.append(result)
                profiled = profiler.end(progress.step)
                if profiled is not None:
                    _log_profile(monitor, profiled, progress.step)
                    timer.reset()  # the profiler slows the host: its steps are not training throughput
                if progress.step % cfg.log_every == 0 or progress.step == cfg.steps:
                    _log(monitor, window, timer, cfg, dist, peak, scheduler, progress)
                    window = []
                if progress.step % min(cfg.log_every, preempt.CHECK_EVERY) == 0 and progress.step < cfg.steps:
                    _stop_if_asked(stop, models, optimizer, scheduler, cfg, dist, progress)
                if progress.step % cfg.val_every == 0 or progress.step == cfg.steps:
                    for prefetcher in (labeled, unlabeled):
                        prefetcher.settle()  # its thread idle while validation runs
                    _validate_and_save(models, optimizer, scheduler, cfg, dist, monitor, progress, val_loader)
                    timer.reset()  # validation and saving are not training throughput
        finally:
            stop.close()
            profiler.close()
            for prefetcher in (labeled, unlabeled):
                prefetcher.close()
        summary = _finish(models, cfg, progress)
    except preempt.Stopped as stopped:  # saved, to be resumed: W&B shows the run preempted, not failed
        monitor.finish(exit_code=stopped.exit_code, preempting=True)
        raise
    except BaseException:  # an error, Ctrl-C: the W&B run is marked failed (it showed as a success)
        monitor.finish(exit_code=1)
        raise
    ends = {"val/best_loss": summary["best_val_loss"], "fused": summary.get("fused")}  # the runs table's columns
    monitor.finish({k: v for k, v in ends.items() if v is not None})
    return summary


def _stop_if_asked(stop: preempt.StopOnSignal, models, optimizer, scheduler, cfg, dist, progress) -> None:
    """At a check step (every rank's: a log step, or every preempt.CHECK_EVERY steps where --log_every is more): if
    any rank received SIGTERM, save latest.pt here on every rank's word and raise ``Stopped`` (train.preempt). A
    validation due at this step is skipped: the resumed run's next one is --val_every steps on."""
    signum = preempt.agreed(stop.received, dist.device)
    if signum is not None:
        sync_dropped(progress, dist.device)  # latest.pt counts every rank's dropped samples and skipped steps
        settle_skips(progress, scheduler)  # (a log step has just counted them: nothing more to add then)
        save_latest(models, optimizer, scheduler, cfg, progress)
        raise preempt.Stopped(progress.step, signum)


def _profiler(cfg: TrainConfig, dist, step: int, monitor: Monitor) -> StepProfiler:
    """--profile_steps: the steps after the first log window of this (re)start, so compilation and the
    loader workers' start-up are not in it."""
    start = (step // cfg.log_every + 1) * cfg.log_every
    profiler = StepProfiler(
        cfg.profile_steps, start, cfg.steps, cfg.val_every, dist.device, Path(cfg.out) / "profile", dist.rank
    )
    if cfg.profile_steps and profiler.planned < cfg.profile_steps:
        monitor.warn_once(
            "profile",
            f"--profile_steps {cfg.profile_steps}: only {profiler.planned} step(s) after step {start} come before "
            f"the run's end or the next validation (--steps {cfg.steps}, --val_every {cfg.val_every}, --log_every "
            f"{cfg.log_every}); profiling {profiler.planned}",
        )
    return profiler


def _log_profile(monitor: Monitor, summary: dict, step: int) -> None:
    first, last = summary["first_step"], step
    monitor.log_text(
        f"profile of steps {first}-{last}: {describe(summary, summary['wall_s_per_step'])}; trace {summary['trace']}"
    )
    metrics = {"profile/busy_fraction": summary["busy_s_per_step"] / summary["wall_s_per_step"]}
    metrics.update({f"profile/{kind.split()[0]}_ms": 1e3 * s for kind, s in summary["by_kind_s_per_step"].items()})
    monitor.log(metrics, step=step)


def _log(monitor, window, timer, cfg, dist, peak, scheduler, progress) -> None:
    sync_dropped(progress, dist.device)
    settle_skips(progress, scheduler)
    metrics = {
        "train/lr": window[-1]["lr"] if window else scheduler.get_last_lr()[0],  # that of the window's last step
        "train/skipped_steps": progress.skipped_steps,
        "train/dropped_samples": progress.dropped_samples,
    }
    # the window's means over the steps that were not skipped (a skipped step's figures may be NaN)
    finite = torch.stack([r["finite"] for r in window]) > 0 if window else None
    done = int(finite.sum()) if window else 0
    for key in ("loss", "contrastive", "distillation", "grad_norm"):
        if done:
            values = torch.stack([r[key].float() for r in window])
            metrics[f"train/{key}"] = float(torch.where(finite, values, 0.0).sum() / done)
    # throughput over the steps since the timer's reset (a log, a validation or a profile), which need not be the
    # whole window; none when a profile just ended
    if timer.steps:
        elapsed = timer.elapsed()
        videos = timer.steps * (cfg.batch_labeled + cfg.batch_unlabeled) * dist.world_size
        metrics["train/videos_per_s"] = videos / elapsed
        metrics["train/data_wait"] = timer.data / elapsed
        if peak and timer.flops:
            metrics["train/mfu"] = timer.flops / elapsed / (peak * 1e12)
    if dist.device.type == "cuda":
        metrics["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
    monitor.log(metrics, step=progress.step)
    hint = starvation_hint(metrics.get("train/data_wait", 0.0), cfg, dist.device)
    if hint and progress.step > cfg.log_every:  # the first window includes the workers' start-up
        monitor.warn_once("starved", hint)
    timer.reset()


def starvation_hint(data_wait: float, cfg: TrainConfig, device: torch.device) -> str | None:
    """What to do when a GPU waited for data more than a fifth of the time (CPU runs share cores: no advice)."""
    if device.type != "cuda" or data_wait <= 0.2:
        return None
    advice = f"raise --workers (now {cfg.workers} per stream)"
    if augment_on(cfg, device) != "device_jpeg":
        advice += ", or let the GPU decode the JPEGs too: --augment_on device_jpeg"
    return f"the GPU waited for data {100 * data_wait:.0f}% of the time: {advice} (README: Training)"


@preempt.patient()  # ranks wait for the slowest one's share of validation, and for rank 0's writes: not stuck
def _validate_and_save(models, optimizer, scheduler, cfg, dist, monitor, progress, loader) -> None:
    sync_dropped(progress, dist.device)  # latest.pt (and summary.json after the last one) count every rank's
    settle_skips(progress, scheduler)  # and every skipped step, with the schedule where it belongs
    val = {}
    if cfg.val:
        val = validate(models.student, cfg, dist.device, loader)
        monitor.log({f"val/{k}": v for k, v in val.items()}, step=progress.step)
        monitor.log_text(
            f"step {progress.step}: val loss {val['loss']:.4f}, text->video R@1 {val['R@1']:.1f} "
            f"R@5 {val['R@5']:.1f} R@10 {val['R@10']:.1f} ({val['videos']} videos)"
        )
        if val["loss"] < progress.best_val_loss:
            progress.best_val_loss = val["loss"]
            save_best(models, cfg, progress, val)
    progress.last_val = val
    save_latest(models, optimizer, scheduler, cfg, progress)


def _finish(models: Models, cfg: TrainConfig, progress: Progress) -> dict:
    """Keep best.pt (the last step when there is no validation), fuse it with the teacher, write summary.json."""
    out = Path(cfg.out)
    summary = {
        "steps": progress.step,
        "skipped_steps": progress.skipped_steps,
        "dropped_samples": progress.dropped_samples,
        "best_val_loss": progress.best_val_loss if math.isfinite(progress.best_val_loss) else None,  # no validation
        "last_val": progress.last_val,
    }
    if distributed.is_main():
        if not cfg.val:
            save_best(models, cfg, progress, {})
        if cfg.fuse:
            teacher = teacher_state_dict(cfg.model, _teacher_weights(cfg))
            fused = fuse_state_dicts(teacher, load_state_dict(out / checkpoint.BEST), cfg.alpha)
            checkpoint.atomic_save(fused, out / checkpoint.FUSED)
            summary["fused"] = str(out / checkpoint.FUSED)
            print(f"fused best.pt with the teacher (alpha {cfg.alpha}) -> {out / checkpoint.FUSED}")
        atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=1, default=str) + "\n").encode())
    distributed.barrier()
    return summary


def _flops_per_step(models: Models, cfg: TrainConfig, size: int, tokenizer, device: torch.device):
    """FLOPs of one step on one rank as a function of its captions' width in tokens (for MFU), counted once per width
    from the forward of one video and a caption of that width; 0 if counting fails."""
    frames = torch.zeros(1, cfg.frames, 3, size, size, device=device)
    caption = tokenizer(["a video"]).to(device)  # (1, L): SOT, 2 word pieces, EOT, padding; fit_width sets L
    failed = []

    @functools.cache
    def flops(width: int) -> int:
        if failed:
            return 0
        try:
            per_video = forward_flops(models.student, frames, fit_width(caption, width))
        except Exception as e:  # FLOP counting is best-effort monitoring, never a reason to stop training
            failed.append(e)
            if distributed.is_main():
                print(f"warning: FLOP counting failed ({type(e).__name__}: {e}); no MFU will be logged")
            return 0
        return step_flops(per_video, per_video, cfg.batch_labeled, cfg.batch_unlabeled)

    return flops
