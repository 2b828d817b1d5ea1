"""Typed training configuration and the named recipes.

Two recipes reproduce FitCLIP (see ``../shared/REFERENCE.md`` in the design repo
and the README): ``paper`` is what the paper states, ``reference`` is what the
authors' public code ran to produce the released checkpoint. ``demo`` is a tiny
CPU run for ``make demo`` and the tests. Every field is also a CLI flag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.cli import (
    count_problems,
    number_problems,
    pair_problems,
    positive_problems,
    switch_problems,
    text_problem,
    unknown_flags_line,
)

PRECISIONS = ("auto", "bf16", "fp32")
AUGMENT_ON = ("auto", "loader", "device", "device_jpeg")
TEACHER_STREAMS = ("off", "beside", "ahead")  # --teacher_stream: where the teacher's forward runs
WANDB_MODES = ("auto", "online", "offline", "off")
SCHEDULES = ("constant", "cosine")
DISTILLATIONS = ("ce", "kl")
ATTENTION_KERNELS = ("auto", "cudnn", "flash", "efficient", "math")  # the SDPA kernel tried first (train.attention)
# torch.compile modes the trainer allows. The CUDA-graph modes ("reduce-overhead", "max-autotune") are left out: a
# graph replay overwrites the outputs of the step before, which the trainer keeps until its next log.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
DEVICES = ("auto", "cuda", "cpu")  # --device (train.model.device_problems, train.distributed.init_distributed)
CHOICES = {  # the text flags that take one of a few values
    "precision": PRECISIONS,
    "wandb": WANDB_MODES,
    "schedule": SCHEDULES,
    "distillation": DISTILLATIONS,
    "device": DEVICES,
    "augment_on": AUGMENT_ON,
    "attention_kernel": ATTENTION_KERNELS,
    "compile_mode": COMPILE_MODES,
    "teacher_stream": TEACHER_STREAMS,
}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run depends on. Printed at start, stored in every checkpoint."""

    # --- data (folders made by pipeline.shard / pipeline.subset)
    labeled: str = ""  # labeled shards (the 4.5K subset): contrastive loss, cycled forever, reshuffled each pass
    unlabeled: str = ""  # unlabeled shards (all of WebVid): distillation loss, resampled streaming
    val: str = ""  # validation shards (WebVid val); "" = no validation (best.pt is then the last step)
    # run folder: latest.pt, best.pt, fitclip.pt, config.json, summary.json, wandb/ (and teacher_init.pt, profile/
    # when used)
    out: str = "runs/fitclip"

    # --- model
    model: str = "ViT-B-16-quickgelu"  # open_clip model name, or path to an open_clip model-config JSON
    teacher_weights: str = "openai"  # open_clip pretrained tag, a local .pt/.safetensors state dict, or "" (random)

    # --- recipe (Eq. 1-5)
    recipe: str = "paper"  # which preset the defaults came from (informational once resolved)
    sigma: float = 0.05  # temperature of the similarity logits, the student's and the teacher's soft labels alike
    lam: float = 1e-4  # lambda in Eq. 5: weight of the distillation loss
    distillation: str = "ce"  # "ce": cross-entropy to teacher soft labels (paper); "kl": KL * 1/sigma^2 (code)
    renormalize_video: bool = True  # L2-normalise the mean of the frame embeddings (the authors' code does not)
    frames: int = 4  # frames per video: as many as the shards hold (pipeline.shard --frames made them)
    # training crop size: 0 or the model's input size (its position embeddings fix it); 0 = that size (224 for ViT-B/16)
    crop: int = 0
    crop_scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop scale range
    # where the crop/resize/flip runs: "auto" = "device_jpeg" on GPU, "loader" on CPU; "loader" (the workers),
    # "device" (workers decode JPEG, the GPU crops a whole batch at once), "device_jpeg" (the GPU decodes too)
    augment_on: str = "auto"

    # --- optimisation
    lr: float = 3e-5  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay (on all parameters, as the authors' code)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (beta1, beta2)
    schedule: str = "constant"  # "constant" or "cosine" (after warmup, down to 0 at the step after the last)
    warmup_steps: int = 0  # the learning rate rises linearly to --lr over this many steps
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping
    steps: int = 1000  # optimizer steps
    batch_labeled: int = 8  # labeled videos per rank per step
    batch_unlabeled: int = 8  # unlabeled videos per rank per step
    precision: str = "auto"  # "auto": bf16 autocast on GPU, fp32 on CPU; or "bf16" / "fp32"
    # activation checkpointing in the student: True = every transformer block, N = the first N blocks of each tower
    # (each costs ~1/3 more compute and frees its activations; use the smallest N that fits), False/0 = none
    grad_checkpointing: bool | int = False
    compile: bool | None = None  # torch.compile student and teacher; None = on GPU (1.5x faster there), off on CPU
    # "max-autotune-no-cudagraphs" also tunes matmul and Triton kernel configurations (minutes at the first step)
    compile_mode: str = "default"
    # with compile_mode "max-autotune-no-cudagraphs": Triton's persistent TMA matmul templates join the matrix-product
    # kernels it tunes (Hopper and newer; inductor's triton.enable_persistent_tma_matmul). Inductor fuses the bias and
    # QuickGELU after a product into it only where a Triton template, fused, beats cuBLAS unfused; these templates load
    # with Hopper's TMA on a persistent grid, as cuBLAS's own kernels do there (train.loop.compile_options)
    persistent_tma_matmul: bool = False
    # inductor's coordinate-descent tuning of its Triton kernels' block sizes (the step's fused elementwise and
    # normalisation kernels, about a fifth of its GPU time on an H200) at the first step, without max-autotune's
    # matrix-product tuning, whose Triton templates lost to cuBLAS on every large product it tuned there (2026-11-28)
    coordinate_descent_tuning: bool = False
    # self-attention on views of the packed QKV projection, without nn.MultiheadAttention's copies (train.attention).
    # This, --linear_patch_embed and --cls_last_block are on by default: the same function and parameters, 1.30x the
    # step together on an H200 (benchmarks/README.md, 2026-11-28); models they cannot serve are left as they are
    packed_qkv: bool = True
    # with the packed QKV attention (--packed_qkv, --cls_last_block): q, k and v each from its own matrix product over
    # its slice of the packed weight, which spares the backward a copy of their gradients into the packed layout
    # (train.attention.packed_attention; the same function and parameters)
    split_qkv: bool = False
    # the SDPA kernel tried first (train.attention): "auto" = torch's order (cuDNN's first on H100/H200 with a recent
    # cuDNN, flash first elsewhere), or cudnn/flash/efficient/math
    attention_kernel: str = "auto"
    # the ViT's patch embedding as one matrix product instead of a convolution (train.patch_embed)
    linear_patch_embed: bool = True
    # the ViT's last block for the class token only, the one row its embedding uses (train.cls_last_block)
    cls_last_block: bool = True
    # cut each batch's captions after its longest one (to a multiple of 8 tokens) instead of CLIP's 77: the same
    # embeddings for models whose text attention is causal (train.model.trims_text), and text-tower work in
    # proportion to the batch's longest caption; other models are left as they are
    trim_text: bool = True
    # the teacher's forward on a second CUDA stream (train.streams), where the GPU may overlap its matrix products
    # with the student's memory-bound kernels: "beside" the student's forward of the same step; "ahead": the next
    # step's unlabeled batch, taken one step early, beside this step's backward; "off": one stream. No second
    # stream on the CPU ("ahead" still takes each batch a step early). The second stream keeps its own cached memory:
    # about the teacher's largest activations more (estimated 1-2 GiB for 128 unlabeled ViT-B/16 videos). On an H200
    # with the layer levers neither gained (1.002x beside, 0.998x ahead; benchmarks/README.md, 2026-11-28)
    teacher_stream: str = "off"
    seed: int = 0  # seeds the random teacher of a run without weights, the data order and the crops

    # --- validation, checkpoints, fusion
    val_every: int = 100  # steps between validations (and latest.pt saves)
    val_batch: int = 64  # fixed batch (at least 2) of the validation contrastive loss (the model-selection criterion)
    val_max: int = 0  # at most this many validation videos; 0 = all
    # "" = fresh run (refuses an OUT with latest.pt); "auto" = continue from OUT/latest.pt if there is one, else start
    # fresh; or the path of a latest.pt to continue
    resume: str = ""
    alpha: float = 0.4  # fusion weight of the student: theta = (1 - alpha) * teacher + alpha * student
    fuse: bool = True  # fuse best.pt with the teacher at the end into OUT/fitclip.pt

    # --- runtime and monitoring
    device: str = "auto"  # "auto", "cuda" or "cpu"
    workers: int = 4  # data-loading processes per stream (labeled, unlabeled) and rank; validation uses at most 2
    # samples each loader worker of the unlabeled stream shuffles among, still encoded (about 0.23 MB each at the
    # shards' default 256 px): host memory of about workers x this x 0.23 MB per rank, once the buffers have filled
    shuffle_buffer: int = 1000
    # steps between logs of the training metrics: to W&B, and to the progress bar or (--progress False) a console line
    log_every: int = 10
    wandb: str = "auto"  # "auto": online with credentials, else offline; "online", "offline", "off"
    wandb_project: str = "fitclip"  # W&B project of the run
    run_name: str = ""  # W&B run name; "" = the out folder's name
    peak_tflops: float = 0.0  # accelerator peak for MFU; 0 = look up the GPU model (no MFU on CPU)
    progress: bool = True  # console progress bar on rank 0
    # profile this many steps after the first log window: traces in OUT/profile/, GPU time by kernel kind in the log
    profile_steps: int = 0
    # seconds after a SIGTERM by which a rank still blocked in one call (a collective waiting for a rank that died,
    # most often) ends without a save, rather than at torchrun's SIGKILL 30 s on; 0 = wait for the SIGKILL
    stuck_after: float = 10.0

    def __post_init__(self) -> None:
        problems = self._text_problems()
        # numbers next: fire hands --lr abc over as a str, which the comparisons below could not take
        problems += number_problems(
            {
                "lam": (self.lam, 0, 1),
                "alpha": (self.alpha, 0, 1),
                "weight_decay": (self.weight_decay, 0, None),
                "grad_clip": (self.grad_clip, 0, None),
                "peak_tflops": (self.peak_tflops, 0, None),
                "lr": (self.lr, 0, None),  # 0: the whole pipeline with the student kept as it starts (a baseline)
                "stuck_after": (self.stuck_after, 0, 3600),
            }
        )
        problems += positive_problems({"sigma": self.sigma})
        problems += pair_problems({"betas": self.betas, "crop_scale": self.crop_scale})
        if not pair_problems({"betas": self.betas}) and not all(0 <= b < 1 for b in self.betas):
            problems.append(f"--betas must be two numbers in [0, 1) (e.g. 0.9,0.999), got {self.betas!r}")
        # --val_batch at least 2: the contrastive loss of one pair is 0, so every validation scored 0 and best.pt
        # stayed the first one
        problems += count_problems(
            {"warmup_steps": (self.warmup_steps, 0), "seed": (self.seed, 0), "val_batch": (self.val_batch, 2)}
        )
        positive = ("steps", "batch_labeled", "batch_unlabeled", "frames", "val_every", "log_every", "shuffle_buffer")
        problems += count_problems({name: (getattr(self, name), 1) for name in positive})
        for name, allowed in CHOICES.items():  # any value, text or not: the line names the choices
            if getattr(self, name) not in allowed:
                problems.append(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        names = ("renormalize_video", "packed_qkv", "linear_patch_embed", "cls_last_block", "persistent_tma_matmul")
        names += ("split_qkv", "coordinate_descent_tuning", "trim_text", "fuse", "progress")
        switches = {n: getattr(self, n) for n in names}
        if self.compile is not None:  # None: compile on the GPU only
            switches["compile"] = self.compile
        problems += switch_problems(switches)
        if self.persistent_tma_matmul is True and self.compile_mode != "max-autotune-no-cudagraphs":
            problems.append(
                "--persistent_tma_matmul True adds kernels that only max-autotune tunes: give it with "
                f"--compile_mode max-autotune-no-cudagraphs (got --compile_mode {self.compile_mode!r})"
            )
        if self.coordinate_descent_tuning is True and self.compile is False:
            problems.append(
                "--coordinate_descent_tuning True tunes the kernels torch.compile makes, and --compile is False: "
                "leave --compile out (on by default on a GPU), or leave --coordinate_descent_tuning out"
            )
        if self.split_qkv is True and self.packed_qkv is not True and self.cls_last_block is not True:
            problems.append(
                "--split_qkv True splits the projections of the packed attention, which neither --packed_qkv nor "
                "--cls_last_block is running: give --packed_qkv True (the default), or leave --split_qkv out"
            )
        ckpt = self.grad_checkpointing
        if not isinstance(ckpt, (bool, int)) or ckpt < 0:
            problems.append(
                f"--grad_checkpointing must be True (every block), False, or a number of blocks >= 0, got {ckpt!r}"
            )
        problems += count_problems(
            {name: (getattr(self, name), 0) for name in ("profile_steps", "val_max", "workers", "crop")}
        )
        lo_hi = self.crop_scale
        if not pair_problems({"crop_scale": lo_hi}) and not (0 < lo_hi[0] <= lo_hi[1] <= 1):
            problems.append(f"--crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if problems:
            raise ValueError("; ".join(problems))

    def _text_problems(self) -> list[str]:
        """A line for each text field (paths, names) that is not text, as fire hands it over
        (``pipeline.cli.text_problem``; ``train.main.typed_texts`` gives back the numbers typed as they are, as
        ``--out 2024``). The choices (``CHOICES``) are checked against their values, whatever the value."""
        return [
            line
            for f in dataclasses.fields(self)
            if f.name in TEXT_FIELDS and f.name not in CHOICES and (line := text_problem(f.name, getattr(self, f.name)))
        ]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# the text flags (paths, names, choices), which fire may hand over as numbers or switches
TEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.type == "str")


def paper(**overrides) -> TrainConfig:
    """What the paper states: sigma 0.05, lambda 1e-4 (cross-entropy distillation), AdamW lr 3e-5, alpha 0.4."""
    return TrainConfig(**{"recipe": "paper", **overrides})


def reference(**overrides) -> TrainConfig:
    """What the authors' public code runs (it produced the released checkpoint).

    sigma 0.015 for student and teacher; distillation as KL(teacher || student) times 1/sigma^2 with a 0.9999 /
    0.0001 labeled/unlabeled split (effective distillation weight ~0.44); AdamW lr 3e-6 constant, weight decay
    0.01; 8 + 8 videos per GPU; fp32; frame embeddings averaged without re-normalising; validation every 30 steps.

    Not as that code, as the shard format fixes it (README, Training): each video's frames are the 4 stored segment
    midpoints, where it drew one random frame per segment, and the teacher sees the student's frames and crop, where
    each drew its own.
    """
    values = dict(
        recipe="reference",
        sigma=0.015,
        lam=1e-4,
        distillation="kl",
        lr=3e-6,
        weight_decay=0.01,
        schedule="constant",
        batch_labeled=8,
        batch_unlabeled=8,
        precision="fp32",
        renormalize_video=False,
        val_every=30,
    )
    return TrainConfig(**{**values, **overrides})


def demo(**overrides) -> TrainConfig:
    """A tiny CPU run (the paper recipe's losses, a larger lr and lambda so a few steps show learning)."""
    values = dict(
        recipe="demo",
        lam=0.5,
        lr=1e-3,
        steps=40,
        batch_labeled=8,
        batch_unlabeled=8,
        val_every=20,
        val_batch=16,
        workers=1,
        log_every=5,
        device="cpu",
        wandb="offline",
    )
    return TrainConfig(**{**values, **overrides})


RECIPES = {"paper": paper, "reference": reference, "demo": demo}


def preset(recipe: object) -> Callable[..., TrainConfig]:
    """The preset ``--recipe`` names, or the paper's for one it does not (checked in ``resolve``): the defaults the
    other flags are checked against either way."""
    return (RECIPES.get(recipe) if isinstance(recipe, str) else None) or paper


def resolve(recipe: str = "paper", **overrides) -> TrainConfig:
    """The config of a recipe with flags applied. A ValueError names every problem in one line: an unknown recipe
    (the flags are then checked against the paper's), unknown flags (with the closest valid one), bad values."""
    problems = []
    if not isinstance(recipe, str) or recipe not in RECIPES:
        problems.append(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        problems.append(unknown_flags_line(["--" + u for u in unknown], sorted(names)))
    known = {k: v for k, v in overrides.items() if k in names}
    for key in ("crop_scale", "betas"):  # fire's (1, 1) as floats; anything else is for __post_init__ to refuse
        if key in known and not pair_problems({key: known[key]}):
            known[key] = tuple(float(v) for v in known[key])
    try:
        config = preset(recipe)(**known)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))
    return config
