"""CLI: tag your own videos with labels no model was trained on, or search them with a text.

    python -m eval.tag --videos DIR --labels "sledding,skiing,building a snowman" [--top 3] \\
        [--weights runs/x/fitclip.pt] [--out tags.csv]
    python -m eval.tag --videos DIR --labels_file kinetics400.txt --cache ~/.cache/fitclip-tag
    python -m eval.tag --videos DIR --query "a dog catching a frisbee" [--top 10]

Frames are sampled as everywhere else (4 segment midpoints) and decoded by
``--workers`` processes into a frame cache (``eval.frame_cache``), then embedded
``--batch_size`` videos at a time, as ``eval.run`` does. The cache is temporary
unless ``--cache DIR`` keeps it: a later search of the same folder then decodes
only the videos added or changed since. Unreadable files are reported and
skipped; only a folder where none is readable is an error.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from eval.datasets.base import RETRIEVAL, EvalDataset, Item
from eval.features import class_embeddings, eval_autocast, text_embeddings, video_embeddings
from eval.frame_cache import CacheSettings, build_cache, video_folder_cache
from eval.run import cache_settings, load_model, weights_problems
from pipeline.cli import (
    DISK_ERRNOS,
    comma_list,
    count_problems,
    file_problems,
    fire_main,
    refuse,
    switch_problems,
    write_failed,
)
from pipeline.time_limit import decode_timeout_problems
from pipeline.writer import atomic_write_bytes, held_temporary_folder, remove_abandoned
from train.distributed import init_distributed
from train.model import device_problems, image_size, tokenizer_for

VIDEO_SUFFIXES = {  # containers PyAV (FFmpeg) reads; other files of the folder are counted and named, not read
    *(".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".asf", ".flv", ".f4v"),
    *(".3gp", ".3g2", ".ts", ".mts", ".m2ts", ".ogv", ".vob"),
}
LABEL_TEMPLATES = ("a video of {}.", "a photo of {}.", "{}")
CLIP_LOGIT_SCALE = 100.0  # CLIP's learned temperature: turns cosine similarities into label probabilities


def as_text(value) -> str:
    """fire turns ``--query 1,2`` into the tuple (1, 2) and ``--query 5`` into 5: give the text back."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def read_labels(labels, labels_file: str) -> list[str]:
    """The labels to choose from: ``--labels`` (a comma list) or ``--labels_file`` (one per line, so a label may
    hold a comma; blank lines are skipped). A ValueError says what to fix."""
    inline = comma_list(labels)
    if inline and labels_file:
        raise ValueError("give --labels or --labels_file, not both")
    if not labels_file:
        return inline
    path = Path(str(labels_file))
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--labels_file {path}: cannot read it as UTF-8 text ({e})") from e
    found = [line.strip() for line in lines if line.strip()]
    if not found:
        raise ValueError(f"--labels_file {path} holds no labels: write one label per line")
    return found


def number_labels(labels) -> list[str]:
    """The ``--labels`` items that fire read as decimal numbers: ``1.10`` arrives as 1.1, so the text the user typed
    is lost (integers and words keep theirs)."""
    items = labels if isinstance(labels, (list, tuple)) else [labels]
    return [str(v) for v in items if isinstance(v, float)]


def find_videos(folder: Path) -> tuple[list[Path], Counter]:
    """The video files under ``folder`` (by extension, in path order), and how many other files there are by
    extension (hidden files, such as another run's temporaries, are neither). Links to folders are followed, each
    folder walked once (a link back up ends there): ``Path.rglob`` left a linked folder's videos out, unsaid."""
    videos, others, walked = [], Counter(), set()
    for root, folders, files in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in walked:
            folders.clear()
            continue
        walked.add(os.path.realpath(root))
        for name in files:
            path = Path(root) / name
            if name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() in VIDEO_SUFFIXES:
                videos.append(path)
            else:
                others[path.suffix.lower() or "no extension"] += 1
    return sorted(videos), others


def unique_labels(labels: list[str]) -> tuple[list[str], list[str]]:
    """``labels`` with each kept once, in order, and the ones given more than once: a label twice split its
    probability between its copies."""
    return list(dict.fromkeys(labels)), sorted(label for label, n in Counter(labels).items() if n > 1)


TEMPORARY_CACHE = "fitclip-tag-cache"  # without --cache: .fitclip-tag-cache.tmp-<hex> in the system's temp folder


@contextlib.contextmanager
def cache_root(cache: Path | None) -> Iterator[Path]:
    """``--cache`` as given, or a temporary folder removed afterwards. The decoded frames of a large folder are
    gigabytes: a run killed before it could remove them (SIGKILL, the OOM killer) leaves them, so each run first
    removes the ones whose run is gone (their lock let go, ``pipeline.writer.remove_abandoned``)."""
    if cache is not None:
        yield cache
        return
    target = Path(tempfile.gettempdir()) / TEMPORARY_CACHE
    remove_abandoned(target)
    with held_temporary_folder(target) as tmp:
        try:
            with contextlib.suppress(OSError):  # a filesystem that keeps no modes: as it is
                tmp.chmod(0o700)  # the frames of this user's videos, in a folder every user of the machine may list
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def label_embeddings(clip, tokenizer, labels: list[str], batch_size: int, device: torch.device) -> torch.Tensor:
    """(L, D): per label, the normalised mean of its prompts' embeddings."""
    prompts = [[t.format(label) for t in LABEL_TEMPLATES] for label in labels]
    means = class_embeddings(clip, tokenizer, prompts, batch_size, device, eval_autocast(device))
    return torch.nn.functional.normalize(means, dim=-1)


# (videos, texts) per forward on a CPU: the fastest measured (benchmarks.batch_bench). Texts were fastest 8 at a time
# at CLIP's 77 tokens; cut to their batch's longest (eval.features.text_embeddings), 64 at a time
CPU_BATCHES = (1, 64)
GPU_BATCH = 64


def batch_sizes(batch_size: int, device: torch.device) -> tuple[int, int]:
    """(videos, texts) per forward pass: ``--batch_size`` for both, or for 0 the measured best for the device. On a
    CPU, small batches were faster (a batch's activations stay in the cache); on a GPU, large ones."""
    if batch_size:
        return batch_size, batch_size
    return CPU_BATCHES if device.type == "cpu" else (GPU_BATCH, GPU_BATCH)


def embed_folder(
    folder: Path,
    paths: list[Path],
    model: str,
    weights: str,
    settings: CacheSettings,
    root: Path,
    workers: int,
    device: torch.device,
    videos_per_pass: int,
    decode_timeout: float = 0,
    progress: bool = True,
) -> tuple[torch.nn.Module, list[Path], torch.Tensor]:
    """(model, the readable paths, their (N, D) embeddings): decoded into the cache under ``root`` (only what it
    lacks), then embedded. Unreadable files are reported; a folder of none readable ends the run with an error."""
    ids = {str(p.relative_to(folder)): p for p in paths}
    dataset = EvalDataset("tag", RETRIEVAL, [Item(id=i, video=str(p)) for i, p in ids.items()])
    cache = video_folder_cache(root, folder, settings)
    frames = build_cache(dataset, root, settings, workers, progress, folder=cache, decode_timeout=decode_timeout)
    for item_id in ids:
        if item_id in frames.missing:
            print(f"warning: skipped unreadable {ids[item_id]}: {frames.missing[item_id]}", file=sys.stderr)
    ok = [i for i in ids if i in frames.found]
    if not ok:  # nothing to rank or tag: say so instead of a shape error
        sys.exit(f"error: none of the {len(paths)} video file(s) under {folder} could be read (reasons above)")
    try:
        clip = load_model(model, weights, device)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    size, autocast = image_size(clip), eval_autocast(device)
    embedded = video_embeddings(clip, frames, ok, settings.frames, size, videos_per_pass, device, autocast=autocast)
    return clip, [ids[i] for i in ok], torch.stack([embedded[i] for i in ok])


def main(
    videos: str,
    labels: str = "",
    labels_file: str = "",
    query: str = "",
    top: int = 3,
    model: str = "ViT-B-16-quickgelu",
    weights: str = "openai",
    out: str = "",
    frames: int = 4,
    device: str = "auto",
    workers: int = 4,
    batch_size: int = 0,
    cache: str = "",
    decode_timeout: float = 120.0,
    progress: bool = True,
) -> None:
    """Tag the videos of a folder with free-text labels, or rank them by a text query.

    Args:
        videos: folder of videos (searched recursively).
        labels: comma-separated labels to choose from (tagging mode).
        labels_file: a text file with one label per line, instead of --labels (for long lists, labels with commas,
            or labels like 1.10 that fire would read as numbers).
        query: a text to rank the videos by (search mode); give --labels, --labels_file or --query.
        top: labels per video (tagging) or videos shown (search).
        model: open_clip model name or config JSON.
        weights: open_clip tag (openai), a weights file (e.g. a fused fitclip.pt), or fuse:TEACHER:STUDENT:ALPHA.
        out: write the results as CSV here; tagging writes each video's --top labels, search every video ranked
            (the console shows the first --top).
        frames: frames per video.
        device: auto, cuda or cpu.
        workers: processes decoding videos.
        batch_size: videos (or texts) per forward pass; 0 picks for the device (64 on a GPU; on a CPU 1 video and
            64 texts, faster there).
        cache: keep the decoded frames in this folder, so a later run on the same folder decodes only new or
            changed videos; by default a temporary folder, removed at the end.
        decode_timeout: seconds one video's decoding may take (0 for no limit, else at most a day); past it the
            video is skipped as unreadable, and with a kept --cache also by later runs under a limit no longer.
        progress: a progress bar while videos are decoded.
    """
    # every problem in one line, as the other CLIs give them: the flags', then the model config's and the weights'
    raw_query = query
    folder, query, problems = Path(str(videos)), as_text(query), []
    try:
        label_list = read_labels(labels, labels_file)
    except ValueError as e:
        label_list, problems = None, [str(e)]
    if not folder.is_dir():
        problems.append(f"--videos {folder} is not a folder")
    if label_list is not None and bool(label_list) == bool(query):
        problems.append('give either --labels "a,b,c" or --labels_file FILE (tagging) or --query "some text" (search)')
    problems += count_problems(
        {"top": (top, 1), "workers": (workers, 1), "batch_size": (batch_size, 0), "frames": (frames, 1)}
    )
    if out and Path(str(out)).is_dir():  # the wording of train.fuse's --out
        problems.append(f"--out {out} is a folder; give the CSV file to write (e.g. {Path(str(out)) / 'tags.csv'})")
    elif out and not Path(str(out)).parent.is_dir():
        problems.append(f"--out {out}: give a file name in an existing folder (the CSV is written at the end)")
    elif out:
        problems += file_problems({"out": out})
    problems += decode_timeout_problems(decode_timeout) + switch_problems({"progress": progress})
    problems += device_problems(device)
    problems += weights_problems(str(model), [str(weights)])
    refuse(problems)
    for flag, given, fix in (
        ("labels", labels, "quote each label (--labels '\"1.10\"') or use --labels_file"),
        ("query", raw_query, "quote it (--query '\"1.10\"')"),
    ):
        numbers = number_labels(given)
        if numbers:
            print(
                f"warning: --{flag} {', '.join(numbers)} reached us as number(s), so the text may not be what you "
                f"typed (1.10 arrives as 1.1); to keep it exactly, {fix}",
                file=sys.stderr,
            )
    if label_list:
        label_list, twice = unique_labels(label_list)
        if twice:
            print(f"warning: label(s) {', '.join(twice)} given more than once: each is kept once", file=sys.stderr)
    paths, others = find_videos(folder)
    if others:
        print(
            f"note: left out {sum(others.values())} file(s) under {folder} that are not videos by their extension "
            f"({', '.join(f'{ext} {n}' for ext, n in sorted(others.items()))}); videos end in "
            f"{', '.join(sorted(VIDEO_SUFFIXES))}",
            file=sys.stderr,
        )
    if not paths:
        sys.exit(f"error: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) under {folder}")
    try:  # everything else that can fail fast does, before any video is decoded
        settings = cache_settings(str(model), frames)
        dev = init_distributed(str(device)).device  # the trainer's device choice, with its clear CUDA errors
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    cache_dir = Path(str(cache)).expanduser() if cache else None  # --cache=~/x reaches us with its ~
    try:
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --cache {cache_dir}: cannot make that folder ({e.strerror}); give a folder you can write to")
    videos_per_pass, texts_per_pass = batch_sizes(batch_size, dev)
    try:
        with cache_root(cache_dir) as root:
            clip, shown, video = embed_folder(
                folder,
                paths,
                str(model),
                str(weights),
                settings,
                root,
                workers,
                dev,
                videos_per_pass,
                decode_timeout,
                bool(progress),
            )
    except OSError as e:  # a full disk or quota where the frames go (the temporary cache: often a small /tmp)
        if e.errno not in DISK_ERRNOS:
            raise
        frames = cache_dir if cache_dir is not None else Path(tempfile.gettempdir())
        if e.filename and not Path(e.filename).absolute().is_relative_to(frames.absolute()):
            sys.exit(f"error: {write_failed(e, e.filename)}")  # elsewhere: the weights' download into the HF cache
        if cache_dir is not None:
            sys.exit(f"error: {write_failed(e, cache_dir)}, or pass --cache a folder on a disk with room")
        where = f"the temporary frame cache in {frames}"
        sys.exit(f"error: {write_failed(e, where)}, or set TMPDIR to (or pass --cache) a folder on a disk with room")
    tokenizer = tokenizer_for(str(model))
    rows = (
        _tag(clip, tokenizer, shown, video, label_list, top, texts_per_pass, dev)
        if label_list
        else _search(clip, tokenizer, shown, video, query, top, dev)
    )
    if out:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["video"])
        writer.writeheader()
        writer.writerows(rows)
        remove_abandoned(out)  # a killed run's temporary
        # a crash never leaves half a CSV; a file name that is not UTF-8 as in json_bytes
        atomic_write_bytes(out, buffer.getvalue().encode("utf-8", "backslashreplace"))
        print(f"wrote {len(rows)} rows to {out}")


def _tag(clip, tokenizer, paths, video, labels, top, batch_size, device) -> list[dict]:
    scores = video @ label_embeddings(clip, tokenizer, labels, batch_size, device).T  # (N, L) cosine similarities
    probs = (CLIP_LOGIT_SCALE * scores).softmax(dim=1)
    rows = []
    for i, path in enumerate(paths):
        order = probs[i].argsort(descending=True, stable=True)[: max(1, int(top))]
        shown = ", ".join(f"{labels[j]} {probs[i, j]:.2f}" for j in order.tolist())
        print(f"{path}: {shown}")
        for rank, j in enumerate(order.tolist(), 1):
            rows.append(
                {
                    "video": str(path),
                    "rank": rank,
                    "label": labels[j],
                    "probability": round(float(probs[i, j]), 4),
                    "similarity": round(float(scores[i, j]), 4),
                }
            )
    return rows


def _search(clip, tokenizer, paths, video, query, top, device) -> list[dict]:
    text = text_embeddings(clip, tokenizer, [query], 1, device, eval_autocast(device))[0]
    scores = video @ text  # (N,)
    order = scores.argsort(descending=True, stable=True).tolist()
    rows = [
        {"video": str(paths[j]), "rank": r, "similarity": round(float(scores[j]), 4)} for r, j in enumerate(order, 1)
    ]
    for row in rows[: max(1, int(top))]:
        print(f"{row['rank']:>3}. {row['video']}  ({row['similarity']:.3f})")
    return rows


def cli() -> None:
    """The installed command (setup.cfg's console_scripts)."""
    fire_main(main, texts=True, lists=("labels", "query"))  # read with as_text, numbers warned of


if __name__ == "__main__":
    cli()
