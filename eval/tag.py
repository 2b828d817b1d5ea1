"""CLI: tag your own videos with labels no model was trained on, or search them with a text.

    python -m eval.tag --videos DIR --labels "sledding,skiing,building a snowman" [--top 3] \\
        [--weights runs/x/fitclip.pt] [--out tags.csv]
    python -m eval.tag --videos DIR --query "a dog catching a frisbee" [--top 10]

Frames are sampled as everywhere else (4 segment midpoints). Unreadable files
are reported and skipped; only a folder where none is readable is an error.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import fire
import torch

from pipeline.cli import comma_list
from pipeline.frames import FrameError, decode_frames
from pipeline.writer import atomic_write_bytes
from train.data import EvalTransform
from train.distributed import init_distributed
from train.model import create_clip, encode_text, encode_video, image_size, tokenizer_for

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".3gp", ".ts", ".mts"}
LABEL_TEMPLATES = ("a video of {}.", "a photo of {}.", "{}")
CLIP_LOGIT_SCALE = 100.0  # CLIP's learned temperature: turns cosine similarities into label probabilities


def as_text(value) -> str:
    """fire turns ``--query 1,2`` into the tuple (1, 2) and ``--query 5`` into 5: give the text back."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def find_videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


@torch.no_grad()
def embed_videos(clip, paths: list[Path], frames: int, device: torch.device) -> tuple[list[Path], torch.Tensor, dict]:
    """(readable paths, (N, D) embeddings, {unreadable path: reason})."""
    transform = EvalTransform(image_size(clip))
    ok, embeddings, failed = [], [], {}
    for path in paths:
        try:
            clip_frames = decode_frames(path, frames, size=0)
        except FrameError as e:
            failed[str(path)] = f"{e.reason}: {e.detail}"
            continue
        video = transform([torch.from_numpy(_rgb(im)).permute(2, 0, 1) for im in clip_frames.images])
        embeddings.append(encode_video(clip, video.unsqueeze(0).to(device)).float().cpu()[0])
        ok.append(path)
    return ok, (torch.stack(embeddings) if embeddings else torch.zeros(0, 1)), failed


def _rgb(image):
    import numpy as np

    return np.asarray(image.convert("RGB")).copy()


@torch.no_grad()
def label_embeddings(clip, tokenizer, labels: list[str], device: torch.device) -> torch.Tensor:
    """(L, D): per label, the normalised mean of its prompts' embeddings."""
    rows = []
    for label in labels:
        tokens = tokenizer([t.format(label) for t in LABEL_TEMPLATES]).to(device)
        rows.append(torch.nn.functional.normalize(encode_text(clip, tokens).mean(0), dim=-1).float().cpu())
    return torch.stack(rows)


def main(
    videos: str,
    labels: str = "",
    query: str = "",
    top: int = 3,
    model: str = "ViT-B-16-quickgelu",
    weights: str = "openai",
    out: str = "",
    frames: int = 4,
    device: str = "auto",
) -> None:
    """Tag the videos of a folder with free-text labels, or rank them by a text query.

    Args:
        videos: folder of videos (searched recursively).
        labels: comma-separated labels to choose from (tagging mode).
        query: a text to rank the videos by (search mode); give --labels or --query.
        top: labels per video (tagging) or videos shown (search).
        model: open_clip model name or config JSON.
        weights: open_clip tag (openai) or a weights file (e.g. a fused fitclip.pt).
        out: write the results as CSV here.
        frames: frames per video.
        device: auto, cuda or cpu.
    """
    folder = Path(str(videos))
    label_list = comma_list(labels)
    query = as_text(query)
    if not folder.is_dir():
        sys.exit(f"error: --videos {folder} is not a folder")
    if bool(label_list) == bool(query):
        sys.exit('error: give either --labels "a,b,c" (tagging) or --query "some text" (search)')
    paths = find_videos(folder)
    if not paths:
        sys.exit(f"error: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) under {folder}")
    try:
        dev = init_distributed(str(device)).device  # the trainer's device choice, with its clear CUDA errors
        clip = create_clip(str(model), str(weights), dev).eval()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    tokenizer = tokenizer_for(str(model))
    ok, video, failed = embed_videos(clip, paths, int(frames), dev)
    for path, reason in failed.items():
        print(f"warning: skipped unreadable {path}: {reason}", file=sys.stderr)
    if not ok:  # nothing to rank or tag: say so instead of a shape error
        sys.exit(f"error: none of the {len(paths)} video file(s) under {folder} could be read (reasons above)")
    rows = (
        _tag(clip, tokenizer, ok, video, label_list, top, dev)
        if label_list
        else _search(clip, tokenizer, ok, video, query, top, dev)
    )
    if out:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["video"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(out, buffer.getvalue().encode("utf-8"))  # a crash never leaves half a CSV
        print(f"wrote {len(rows)} rows to {out}")


def _tag(clip, tokenizer, paths, video, labels, top, device) -> list[dict]:
    scores = video @ label_embeddings(clip, tokenizer, labels, device).T  # (N, L) cosine similarities
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
    with torch.no_grad():
        text = encode_text(clip, tokenizer([query]).to(device)).float().cpu()[0]
    scores = video @ text  # (N,)
    order = scores.argsort(descending=True, stable=True).tolist()
    rows = [
        {"video": str(paths[j]), "rank": r, "similarity": round(float(scores[j]), 4)} for r, j in enumerate(order, 1)
    ]
    for row in rows[: max(1, int(top))]:
        print(f"{row['rank']:>3}. {row['video']}  ({row['similarity']:.3f})")
    return rows


if __name__ == "__main__":
    fire.Fire(main)
