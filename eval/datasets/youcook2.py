"""YouCook2 validation clips (MIL-NCE protocol): 3,350 clips from 436 videos, text-to-clip retrieval.

Two accepted annotation forms:

1. ``ROOT/validation_youcook.csv`` (MIL-NCE), header ``end,start,task,text,video_id`` (end comes first);
2. if that csv is absent (or ``annotations=`` is given): the official ``youcookii_annotations_trainval.json``,
   ``{"database": {video_id: {"subset", "recipe_type", "annotations": [{"segment": [s, e], "sentence"}]}}}``,
   of which the ``validation`` subset is used.

Videos: ``ROOT/videos/<task>/<video_id>.<any extension>`` (the folder is listed once); a video found at
``ROOT/videos/<video_id>.*`` or under another task folder is used too. Each clip is the window [start, end] s.
"""

from __future__ import annotations

import json
from pathlib import Path

from eval.datasets.base import RETRIEVAL, AnnotationsMissing, EvalDataset, Item, csv_rows, json_layout

NAME = "youcook2"
CSV_NAME = "validation_youcook.csv"
JSON_NAME = "youcookii_annotations_trainval.json"
HINT = (
    "validation_youcook.csv from https://github.com/antoine77340/MIL-NCE_HowTo100M (csv/), or "
    "youcookii_annotations_trainval.json from http://youcook2.eecs.umich.edu"
)

Clip = tuple[str, str, float, float, str]  # (video_id, task, start, end, text)


def load(
    root: str | Path,
    *,
    csv_path: str | Path | None = None,
    annotations: str | Path | None = None,
    videos: str | Path | None = None,
) -> EvalDataset:
    """Parse the validation clips; ``csv_path`` / ``annotations`` (official json) / ``videos`` override paths."""
    root = Path(root)
    if csv_path is None and annotations is None:
        if (root / CSV_NAME).is_file() or not (root / JSON_NAME).is_file():
            csv_path = root / CSV_NAME  # also when neither exists: the csv is the file to ask for
        else:
            annotations = root / JSON_NAME
    if csv_path is not None:
        source = Path(csv_path)
        clips = read_csv(source)
    else:
        source = Path(annotations)
        clips = read_json(source)

    videos = Path(videos) if videos else root / "videos"
    by_task, by_stem = _index_videos(videos)
    items = []
    for row, (video_id, task, start, end, text) in enumerate(clips):
        path = by_task.get((task, video_id)) or by_stem.get(video_id) or videos / task / f"{video_id}.mp4"
        items.append(Item(id=f"{video_id}_{row}", video=str(path), window=(start, end), text=text))
    return EvalDataset(name=NAME, task=RETRIEVAL, items=items, sources=(str(source),))


def read_csv(path: Path) -> list[Clip]:
    """Clips in file order from MIL-NCE's ``validation_youcook.csv``."""
    if not path.is_file():
        raise AnnotationsMissing(path, HINT)
    needed = {"end", "start", "task", "text", "video_id"}
    return [
        _clip(path, n, r["video_id"], r["task"], r["start"], r["end"], r["text"]) for n, r in csv_rows(path, needed)
    ]


def read_json(path: Path) -> list[Clip]:
    """Clips of the ``validation`` subset of the official json, videos and segments in file order."""
    if not path.is_file():
        raise AnnotationsMissing(path, HINT)
    clips = []
    with json_layout(path):
        database = json.loads(path.read_text(encoding="utf-8-sig"))["database"]
        for video_id, video in database.items():
            if video.get("subset") != "validation":
                continue
            for segment in video["annotations"]:
                if not isinstance(segment["segment"], list) or len(segment["segment"]) != 2:
                    raise TypeError(f"segment {segment.get('id', '?')} of {video_id} is not [start, end]")
                start, end = segment["segment"]
                where = f"{video_id} segment {segment.get('id', '?')}"
                text = segment["sentence"]
                clips.append(_clip(path, where, video_id, str(video["recipe_type"]), start, end, text))
    return clips


def _clip(path: Path, where: int | str, video_id: str, task: str, start, end, text: str) -> Clip:
    if not isinstance(text, str):
        raise ValueError(f"{path}: {where}: the sentence is not a text: {text!r}")
    try:
        start, end = float(start), float(end)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {where}: start and end must be numbers of seconds, got {start!r}, {end!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"{path}: {where}: clip window must satisfy 0 <= start < end, got [{start}, {end}]")
    return video_id, task, start, end, text


def _index_videos(folder: Path) -> tuple[dict[tuple[str, str], Path], dict[str, Path]]:
    """One listing of ``folder`` and its task sub-folders: (task, stem) -> path and stem -> path (first wins)."""
    by_task: dict[tuple[str, str], Path] = {}
    by_stem: dict[str, Path] = {}
    if not folder.is_dir():
        return by_task, by_stem
    for entry in sorted(folder.iterdir()):
        files = sorted(p for p in entry.iterdir() if p.is_file()) if entry.is_dir() else [entry]
        for path in files:
            if entry.is_dir():
                by_task.setdefault((entry.name, path.stem), path)
            by_stem.setdefault(path.stem, path)
    return by_task, by_stem
