"""CLIP models via open_clip: creation, weights from a tag or a local file, video and text embeddings.

Shared by training and evaluation. OpenAI's ViT-B/16 must be built as
``ViT-B-16-quickgelu``: the plain ``ViT-B-16`` config silently uses GELU, a
different activation than the one the weights were trained with.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import get_session as hf_session
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

from train.config import DEVICES

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
MODEL_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip.add_model_config requires


class WeightsError(ValueError):
    """Weights that cannot be loaded; the message says what to do."""


# what to do about weights neither in the HF cache nor reachable (said by create_clip and tag_unavailable)
OFFLINE_FIX = (
    "pass a local weights file (train.main's --teacher_weights, eval.run's and eval.tag's --weights), or fill the HF "
    "cache"
)
BUNDLED_CONFIGS = Path(__file__).parent / "model_configs"  # installed with the package (setup.cfg's package_data)
_REGISTERED: dict[str, tuple[str, int, int]] = {}  # config name -> (its file, mtime_ns, size) as last registered


def register_model(model: str) -> str:
    """The open_clip model name for ``model``: a name, or a model-config JSON file (registered under its stem)."""
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"--model {model}: no such model-config JSON")
        try:
            config = json.loads(path.read_text())  # a clear error for a broken file, before open_clip's
        except ValueError as e:
            raise ValueError(f"--model {model}: not a valid model-config JSON ({e})") from None
        # open_clip registers a JSON only with these keys, and skips any other in silence: the run then failed
        # after its start, saying "Model config ... not found" of its weights
        lacking = [k for k in MODEL_CONFIG_KEYS if not isinstance(config, dict) or k not in config]
        if lacking:
            raise ValueError(
                f"--model {model}: not an open_clip model config: it lacks {', '.join(lacking)} (see "
                "train/model_configs/demo-clip.json)"
            )
        # open_clip appends the path to its list and reads every listed config again, on each call: skipped when
        # this file, as it is, is already what the name stands for (a process loading models many times, e.g. a
        # sweep or a notebook, grew the list and the time of each load)
        stat = path.stat()
        registered = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if _REGISTERED.get(path.stem) != registered:
            open_clip.add_model_config(str(path))
            _REGISTERED[path.stem] = registered
        return path.stem
    if model not in open_clip.list_models():
        bundled = BUNDLED_CONFIGS / f"{model}.json"
        if path.name == model and bundled.is_file():  # a config this package ships, by name, from any folder
            return register_model(str(bundled))
        raise ValueError(
            f"--model {model!r} is neither an open_clip model name, a .json config nor one of ours "
            f"({', '.join(sorted(p.stem for p in BUNDLED_CONFIGS.glob('*.json')))}); see open_clip.list_models() "
            "(OpenAI ViT-B/16 is 'ViT-B-16-quickgelu')"
        )
    return model


def load_state_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A CLIP state dict from a file: a plain state dict (.pt/.bin/.safetensors), or one of our checkpoints.

    Checkpoints written by ``train.main`` hold the student under ``"student"``;
    ``{"state_dict": ...}`` files and DDP's ``module.`` prefixes are handled too.
    Loaded with ``weights_only=True``: no code is executed. ``mmap``: map the file's
    tensors instead of reading them (a cheap check of a file, see :func:`check_weights`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise WeightsError(f"{path} is not a safetensors file ({type(e).__name__}: {e})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # e.g. OpenAI's TorchScript archive, or not a torch file at all
            raise WeightsError(
                f"{path} is not a state dict torch can load with weights_only=True ({type(e).__name__}); pass a "
                ".pt/.safetensors state dict or a train.main checkpoint. For OpenAI weights offline, pass "
                "open_clip's safetensors file or use the 'openai' tag with a filled HF cache (HF_HUB_OFFLINE=1)"
            ) from None
    for key in ("student", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def meta_clip(model: str) -> torch.nn.Module:
    """``model`` (name or config JSON) built on the meta device: its structure without weights or memory (~50 ms for
    ViT-B/16), and without open_clip's warning that no pretrained weights were loaded."""
    with torch.device("meta"), _quiet_open_clip():
        return open_clip.create_model(register_model(model), device="meta")


def expected_shapes(name: str) -> dict[str, tuple[int, ...]] | None:
    """The shapes of a registered model's state dict, from a build on the meta device; None if this model cannot be
    built there (the check is then left to loading)."""
    try:
        clip = meta_clip(name)
    except Exception:
        return None
    return state_shapes(clip)


def state_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in ``module``'s state dict, by name (what :func:`fit_problem` compares)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def fit_problem(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]] | None) -> str:
    """ "" if ``state`` fits a model of these shapes (as strict loading needs), else the first misfit and a count."""
    if shapes is None:
        return ""
    problems = [f"{k} missing" for k in shapes if k not in state]
    problems += [f"{k} unexpected" for k in state if k not in shapes]
    problems += [
        f"size mismatch for {k}: {tuple(state[k].shape)} in the weights, {shapes[k]} in the model"
        for k in shapes
        if k in state and tuple(state[k].shape) != shapes[k]
    ]
    if not problems:
        return ""
    return problems[0] + (f" and {len(problems) - 1} more" if len(problems) > 1 else "")


def is_weights_file(weights: str) -> bool:
    """Whether a weights entry names a file (else it is an open_clip pretrained tag)."""
    path = Path(weights)
    return path.suffix in WEIGHT_SUFFIXES or path.exists() or "/" in weights


# what to give where an empty weights entry would build a model of random weights
EMPTY_WEIGHTS = (
    'give an open_clip pretrained tag (openai) or a weights file (a run trained with --teacher_weights "" saved '
    "its teacher as OUT/teacher_init.pt)"
)
EMPTY_STUDENT = "give the student's weights file (the best.pt or latest.pt of a train.main run)"


def check_weights(model: str, weights: str) -> None:
    """Fail fast, before any long work, on weights that cannot load.

    A file must exist and hold a state dict (mapped, not read) whose names and shapes fit ``model``
    (built on the meta device); a tag must be one open_clip knows for ``model`` (not fetched).
    "" (random initialisation) always passes.
    """
    if not weights:
        return
    name = register_model(model)
    if is_weights_file(weights):
        problem = fit_problem(load_state_dict(weights, mmap=True), expected_shapes(name))
        if problem:
            raise WeightsError(f"{weights} does not fit {name} ({problem}): pass the --model they were trained with")
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if weights.lower().replace("-", "_") not in tags:  # open_clip's own normalisation: OpenAI, laion2b-s34b-b88k
        known = ", ".join(tags) if tags else "none"
        raise WeightsError(
            f"{weights!r} is neither a weights file nor a pretrained tag of {name} (its tags: {known}); "
            "pass a .pt/.safetensors file or one of the tags"
        )


def create_clip(model: str, weights: str = "", device: str | torch.device = "cpu") -> torch.nn.Module:
    """An open_clip CLIP model in fp32 on ``device``.

    Args:
        model: open_clip model name or model-config JSON path.
        weights: "" for random initialisation; an open_clip pretrained tag (e.g. ``openai``,
            fetched from the HF Hub or its cache); or a path to a state dict / checkpoint file.
    """
    name = register_model(model)
    is_file = bool(weights) and is_weights_file(weights)
    tag = None if is_file or not weights else weights
    unreachable = tag is not None and not hf_constants.HF_HUB_OFFLINE and hub_unreachable()
    try:
        # _quiet_open_clip: it warns "no pretrained weights loaded" when we load them ourselves
        with _quiet_open_clip(), _hub_offline(bool(unreachable)):
            clip = open_clip.create_model(name, pretrained=tag, device="cpu")
    except (RuntimeError, OSError) as e:  # open_clip's for unknown tags; huggingface_hub's for no connection
        cache = hf_constants.HF_HUB_CACHE
        raise WeightsError(
            f"cannot load weights {weights!r} for {name}: the HF Hub cannot be reached ({unreachable}) and the HF "
            f"cache ({cache}) does not hold them ({type(e).__name__}: {e}). Either {OFFLINE_FIX} on a connected "
            "machine"
            if unreachable
            else f"cannot load weights {weights!r} for {name} ({type(e).__name__}: {e}). Offline? Either {OFFLINE_FIX} "
            f"({cache}) on a connected machine"
        ) from e
    if unreachable:
        print(f"note: the HF Hub cannot be reached ({unreachable}): {weights!r} was loaded from the HF cache")
    if is_file:
        state = load_state_dict(weights)
        problem = fit_problem(state, state_shapes(clip))
        if problem:
            raise WeightsError(f"{weights} does not fit {name} ({problem}): pass the --model they were trained with")
        clip.load_state_dict(state)
    return clip.to(device)


@functools.lru_cache(maxsize=16)
def tag_unavailable(model: str, tag: str) -> str:
    """Why a pretrained tag's weights cannot be had now; "" if they can (in the HF cache, or the Hub answers), or if
    open_clip fetches them from a URL into a cache of its own (not checked). For a check before hours of work that
    ends by loading them (eval's decoding): offline, that work ran first and then failed. Asked once per process."""
    name = register_model(model)
    hub = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "")
    if not hub:
        return ""
    repo, filename = os.path.split(hub)  # open_clip's own reading: "org/model/" is the repository's default file
    filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
    safe = getattr(open_clip.pretrained, "_get_safe_alternatives", lambda f: [])(filename)  # preferred, if there
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in (*safe, filename)):
        return ""
    why = "HF_HUB_OFFLINE is set" if hf_constants.HF_HUB_OFFLINE else hub_unreachable()
    if not why:
        return ""
    return (
        f"cannot load weights {tag!r} for {name}: the HF cache ({hf_constants.HF_HUB_CACHE}) does not hold them "
        f"and the Hub cannot be asked ({why}). Either {OFFLINE_FIX} on a connected machine"
    )


def hub_unreachable(timeout_s: float = 5.0) -> str:
    """Why the HF Hub (``HF_ENDPOINT``) cannot be reached, asked once; "" if it answers (any HTTP status). Asked
    before open_clip fetches a tag's weights: huggingface_hub retries a request that gets no answer 5 times, 23 s
    of back-off, and open_clip asks for two files in turn, so an offline machine waited about a minute for an
    error (or for the cached file). Asked through huggingface_hub's own HTTP session, so with the proxies and
    certificates its download would use."""
    try:
        hf_session().head(hf_constants.ENDPOINT, timeout=timeout_s)
    except Exception as e:  # httpx's or requests' errors (by huggingface_hub's version): no answer at all
        return f"{hf_constants.ENDPOINT}: {e}"
    return ""


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """huggingface_hub in offline mode (``HF_HUB_OFFLINE=1``, which it reads once, at import) while ``offline``:
    files come from its cache, at once."""
    before = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip's log lines (on the root logger) held back: its warning that no pretrained weights were loaded (we
    load them ourselves), and its error for a failed download, which it also raises, and which we say in our own
    words (create_clip)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def tokenizer_for(model: str):
    """open_clip's tokenizer for ``model`` (name or config JSON): captions -> (B, context_length) int64."""
    return open_clip.get_tokenizer(register_model(model))


def image_size(clip: torch.nn.Module) -> int:
    return _side(clip.visual.image_size)


def config_image_size(model: str) -> int | None:
    """``model``'s input size from its open_clip config, before any model is built; None if it states none."""
    size = ((open_clip.get_model_config(register_model(model)) or {}).get("vision_cfg") or {}).get("image_size")
    return None if size is None else _side(size)


def _side(size: int | tuple[int, int] | list[int]) -> int:
    """open_clip states an image size as one side or as (height, width): the side of our square frames."""
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def device_problems(device) -> list[str]:
    """A line if ``--device`` is not auto, cuda or cpu, or is cuda where torch sees no GPU: torch's own message for
    either names no flag, and comes after the work before it."""
    if not isinstance(device, str) or device not in DEVICES:
        return [f"--device must be auto, cuda or cpu, got {device!r}"]
    if device == "cuda" and not torch.cuda.is_available():
        return ["--device cuda, but no CUDA GPU is visible to torch; pass --device cpu or auto"]
    return []


def check_crop(model: str, crop: int) -> None:
    """--crop must be the model's input size (or 0 for it): a ViT's position embeddings fix its input size, so
    any other crop fails at the first forward."""
    size = config_image_size(model)
    if crop and size and crop != size:
        raise ValueError(f"--crop {crop}: {model} takes {size}x{size} frames; pass --crop 0 (its input size)")


MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> CLIP-normalised float32, on the frames' device; floats pass through.

    Loaders hand over uint8 so that a quarter of the bytes cross the PCIe bus and no CPU time goes to it.
    """
    if frames.dtype != torch.uint8:
        return frames
    mean, std = _mean_std(frames.device)
    return (frames.float() / 255.0 - mean) / std


_ON_DEVICE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std on ``device``. A copy per call from pageable host memory would wait for the GPU's queue
    to drain, and inside torch.compile would make CPU inputs of the graph (which CUDA graphs refuse). So: constants
    made inside a compiled graph, and a copy made once per device in eager mode."""
    if torch.compiler.is_compiling():
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device).view(3, 1, 1)
        return mean, torch.tensor(open_clip.OPENAI_DATASET_STD, device=device).view(3, 1, 1)
    if device not in _ON_DEVICE:
        _ON_DEVICE[device] = (MEAN.to(device), STD.to(device))
    return _ON_DEVICE[device]


def encode_video(clip: torch.nn.Module, frames: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    """Video embeddings: the mean of the L2-normalised embeddings of the frames.

    Args:
        frames: (B, T, 3, H, W) uint8 pixels (normalised here with CLIP's mean/std) or normalised floats.
        renormalize: L2-normalise the mean (cosine similarities downstream); the
            authors' code leaves it unnormalised.
    Returns:
        (B, D)
    """
    b, t = frames.shape[:2]
    frames = normalize_frames(frames)
    per_frame = F.normalize(clip.encode_image(frames.flatten(0, 1)), dim=-1)  # (B*T, D)
    video = per_frame.view(b, t, -1).mean(dim=1)  # (B, D)
    return F.normalize(video, dim=-1) if renormalize else video


def encode_text(clip: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised text embeddings (B, D) of token ids (B, L).

    For a text tower ``trims_text`` accepts, L may be less than its context length (captions cut by ``trim_padding``):
    the positional embedding and the causal mask are cut to L. Otherwise open_clip's own ``encode_text``.
    """
    if not trims_text(clip):
        return F.normalize(clip.encode_text(tokens), dim=-1)
    length = tokens.shape[1]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:length].to(cast)  # (B, L, C)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
    if getattr(clip, "text_pool_type", "argmax") == "argmax":  # the end-of-text token has the largest id
        last = tokens.argmax(dim=-1)
    else:  # "eos": the first end-of-text token
        last = (tokens == clip.text_eos_id).int().argmax(dim=-1)
    x = x[torch.arange(x.shape[0], device=x.device), last]  # (B, C)
    projection = clip.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return F.normalize(x, dim=-1)


# captions are cut to a multiple of this many tokens: row counts the matrix kernels tile well, and few distinct widths
TEXT_WIDTH_MULTIPLE = 8


def trims_text(clip: torch.nn.Module) -> bool:
    """Whether ``clip``'s text embeddings stay the same when the padding after every caption is cut off.

    True for open_clip's ``CLIP`` text tower (OpenAI's and most others): its attention is causal, so no token sees
    the ones after it, and the embedding is read at the end-of-text token ("argmax" or "eos" pooling), which comes
    before the padding. Not for a tower without the causal mask, or one that reads the last or every position: there
    the padding changes the result. Padding is 0 in open_clip's own tokenizer; a tokenizer that pads with another id
    leaves nothing to cut (``trim_padding``), so the check is on the model only.
    """
    return (
        isinstance(clip, open_clip.CLIP)
        and getattr(clip, "attn_mask", None) is not None
        and getattr(clip, "text_pool_type", "argmax") in ("argmax", "eos")
        and getattr(clip.transformer, "batch_first", False)
    )


def trim_padding(tokens: torch.Tensor, multiple: int = TEXT_WIDTH_MULTIPLE) -> torch.Tensor:
    """``tokens`` (B, L) without the columns of padding (0) after the longest caption, the width rounded up to
    ``multiple`` (at most L): (B, L') with L' <= L. Contiguous, so a loader worker sends only those columns.

    The text tower's work then follows the batch's longest caption: the 20 WebVid captions of the shared test CSV
    (21 tokens on average, 42 at most) need 48 of CLIP's 77 columns (benchmarks/README.md). Only for a model
    ``trims_text`` accepts.
    """
    used = (tokens != 0).any(dim=0).nonzero()  # the columns some caption uses
    width = int(used[-1]) + 1 if len(used) else 1
    width = min(tokens.shape[1], -(-width // multiple) * multiple)
    return tokens[:, :width].contiguous()


def fit_width(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """``tokens`` (B, L) cut or zero-padded to ``width`` columns (padding is 0): batches cut to different widths
    joined without reading the device (the widths are shapes, known on the host)."""
    if tokens.shape[1] >= width:
        return tokens[:, :width]
    return F.pad(tokens, (0, width - tokens.shape[1]))


class TrimmedTokenizer:
    """``tokenizer`` with ``trim_padding`` applied to each batch it makes (``text_tokenizer``); picklable, for
    loader workers."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return trim_padding(self.tokenizer(texts))


def text_tokenizer(clip: torch.nn.Module, tokenizer, trim: bool = True):
    """``tokenizer`` cutting each batch's padding (``TrimmedTokenizer``) where ``clip`` allows it and ``trim`` asks
    for it; else ``tokenizer`` itself."""
    return TrimmedTokenizer(tokenizer) if trim and trims_text(clip) else tokenizer


def checkpoint_blocks(clip: torch.nn.Module, blocks: bool | int) -> int:
    """Activation checkpointing of the first ``blocks`` transformer blocks of each tower; returns how many in all.

    True checkpoints every block, False or 0 none. A checkpointed block keeps only its input
    for the backward pass and runs its forward again there: it costs about a third more
    compute and frees its activations, which are the same in every block of a tower, so the
    memory freed grows linearly with N. Checkpoint just enough blocks to fit the batch
    (Megatron-LM's "block" recomputation); where nothing needs to be freed, it only slows the step.
    Blocks are wrapped with PyTorch's ``checkpoint_wrapper`` (non-reentrant, works under
    torch.compile and DDP), whose state-dict hooks keep parameter names unchanged, so
    checkpoints and fusion see the plain model.
    """
    towers = [m for m in clip.modules() if isinstance(getattr(m, "resblocks", None), torch.nn.ModuleList)]
    wrapped = 0
    for tower in towers:
        count = len(tower.resblocks) if blocks is True else int(blocks)
        for i in range(min(count, len(tower.resblocks))):
            if not isinstance(tower.resblocks[i], CheckpointWrapper):
                tower.resblocks[i] = checkpoint_wrapper(tower.resblocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            wrapped += 1
    return wrapped


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients (the teacher)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class VideoTextModel(torch.nn.Module):
    """A CLIP model as one module: forward(frames, tokens) -> (video, text) embeddings.

    Wrapping both encoders in one ``forward`` lets DDP, autocast and torch.compile
    see the whole computation of a step.
    """

    def __init__(self, clip: torch.nn.Module, renormalize_video: bool = True):
        super().__init__()
        self.clip = clip
        self.renormalize_video = renormalize_video

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # frames (B, T, 3, H, W), tokens (B, L) -> (B, D), (B, D)
        return encode_video(self.clip, frames, self.renormalize_video), encode_text(self.clip, tokens)
