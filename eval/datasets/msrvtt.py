"""MSR-VTT 1k-A test set (JSFusion split): 1,000 videos, one query sentence each, text-to-video retrieval.

Two accepted annotation forms, the first found wins:

1. ``ROOT/MSRVTT_JSFUSION_test.csv`` with header ``key,vid_key,video_id,sentence`` (one sentence per video);
2. a JSFusion list of video ids, one per line (``test_list=``; by default ``val_list_jsfusion.txt`` in ROOT or
   ``ROOT/structured-symlinks/``) plus ``MSR_VTT.json`` (``annotations=``; in ROOT or ``ROOT/annotation/``),
   whose ``annotations`` (or ``sentences``) entries carry ``image_id`` (or ``video_id``) and ``caption``; the
   first caption of each video in file order is its query.

Videos: ``ROOT/videos/<video_id>.<ext>`` (``ROOT/videos/all/`` if that folder exists), matched by file stem.
"""

from __future__ import annotations

import json
from pathlib import Path

from eval.datasets.base import RETRIEVAL, AnnotationsMissing, EvalDataset, Item, csv_rows, json_layout

NAME = "msrvtt"
CSV_NAME = "MSRVTT_JSFUSION_test.csv"
HINT = (
    "MSRVTT_JSFUSION_test.csv is in the CLIP4Clip / Frozen-in-Time MSR-VTT data "
    "(https://www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip); "
    "or put the JSFusion id list val_list_jsfusion.txt in ROOT (or ROOT/structured-symlinks/) and MSR_VTT.json "
    "in ROOT (or ROOT/annotation/)"
)
_LIST_CANDIDATES = ("val_list_jsfusion.txt", "structured-symlinks/val_list_jsfusion.txt")
_JSON_CANDIDATES = ("MSR_VTT.json", "annotation/MSR_VTT.json")


def load(
    root: str | Path,
    *,
    csv_path: str | Path | None = None,
    test_list: str | Path | None = None,
    annotations: str | Path | None = None,
    videos: str | Path | None = None,
) -> EvalDataset:
    """Parse the 1k-A test set. Giving ``test_list`` or ``annotations`` selects form 2 even if the csv exists."""
    root = Path(root)
    if csv_path is None and test_list is None and annotations is None and (root / CSV_NAME).is_file():
        csv_path = root / CSV_NAME
    if csv_path is not None:
        csv_path = Path(csv_path)
        pairs, sources = read_csv(csv_path), (str(csv_path),)
    else:
        test_list = Path(test_list) if test_list else _first_existing(root, _LIST_CANDIDATES)
        annotations = Path(annotations) if annotations else _first_existing(root, _JSON_CANDIDATES)
        if test_list is None or annotations is None:  # nothing of form 2 either: name the preferred file
            raise AnnotationsMissing(root / CSV_NAME, HINT)
        pairs, sources = read_list_and_json(test_list, annotations), (str(test_list), str(annotations))

    if videos is None:
        videos = root / "videos" / "all" if (root / "videos" / "all").is_dir() else root / "videos"
    found = _index_by_stem(Path(videos))
    items = [
        Item(id=video_id, video=str(found.get(video_id, Path(videos) / f"{video_id}.mp4")), text=text)
        for video_id, text in pairs
    ]
    return EvalDataset(name=NAME, task=RETRIEVAL, items=items, sources=sources)


def read_csv(path: Path) -> list[tuple[str, str]]:
    """(video_id, sentence) pairs in file order from ``MSRVTT_JSFUSION_test.csv``."""
    if not path.is_file():
        raise AnnotationsMissing(path, HINT)
    pairs = [(row["video_id"], row["sentence"]) for _, row in csv_rows(path, {"video_id", "sentence"})]
    _check_unique(path, [video_id for video_id, _ in pairs])
    return pairs


def read_list_and_json(test_list: Path, annotations: Path) -> list[tuple[str, str]]:
    """(video_id, first caption) for each id of the JSFusion list, in list order."""
    for path in (test_list, annotations):
        if not path.is_file():
            raise AnnotationsMissing(path, HINT)
    ids = [line.strip() for line in test_list.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    _check_unique(test_list, ids)
    first: dict[str, str] = {}
    with json_layout(annotations):
        data = json.loads(annotations.read_text(encoding="utf-8-sig"))
        for entry in data.get("annotations") or data.get("sentences") or []:
            video_id, caption = str(entry.get("image_id", entry.get("video_id"))), entry["caption"]
            if not isinstance(caption, str):
                raise TypeError(f"the caption of {video_id} is not a text: {caption!r}")
            first.setdefault(video_id, caption)
    lacking = [video_id for video_id in ids if video_id not in first]
    if lacking:
        raise ValueError(f"{annotations}: no caption for {len(lacking)} ids of {test_list}, e.g. {lacking[:3]}")
    return [(video_id, first[video_id]) for video_id in ids]


def _first_existing(root: Path, candidates: tuple[str, ...]) -> Path | None:
    return next((root / rel for rel in candidates if (root / rel).is_file()), None)


def _check_unique(path: Path, ids: list[str]) -> None:
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: video ids repeat; 1k-A has one query per video")


def _index_by_stem(folder: Path) -> dict[str, Path]:
    """File stem -> path for the files directly in ``folder`` (one listing); sorted, so the first name wins."""
    if not folder.is_dir():
        return {}
    index: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            index.setdefault(path.stem, path)
    return index
