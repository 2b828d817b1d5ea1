"""DiDeMo paragraph retrieval: each video's descriptions joined into one query (text-to-video).

Layout (LocalizingMoments ``data/``)::

    ROOT/test_data.json   (or val_data.json)  [{annotation_id, description, dl_link, num_segments, times, video}]
    ROOT/videos/<video>   any extension: the ``video`` field's extension is often not the file's
                          (Flickr originals .mov/.avi/... are usually stored as .mp4; 31 test names end in a bare
                          '.'), so files are matched by name first, then by the name without its extension.

The paragraph is all descriptions of a video joined with single spaces, in file order (CLIP's 77-token
truncation is the text encoder's business). ``test_data.json`` has 4,021 descriptions of 1,037 ``video`` names.

One candidate per video file: 33 Flickr videos appear in ``test_data.json`` under two ``video`` names differing
only in extension (e.g. ``X.mov`` and ``X.mp4``), each name with its own descriptions, both resolving to the same
file. By default items are keyed by file stem, i.e. by the Flickr video, as the authors' code keys them by file
path: 1,004 test videos, the collaborative-experts ``test_list.txt`` count. A merged item's paragraph is the
descriptions of both names in file order (the authors' code keeps only the last name's). Keeping them apart
(``merge_same_video=False``, 1,037 items) decodes such a file twice and makes it two retrieval candidates, which
caps R@1 of even a perfect model at 96.8%.
"""

from __future__ import annotations

import json
from pathlib import Path

from eval.datasets.base import RETRIEVAL, AnnotationsMissing, EvalDataset, Item

NAME = "didemo"
SPLITS = ("train", "val", "test")
HINT = "{split}_data.json from https://github.com/LisaAnne/LocalizingMoments (data/)"


def load(
    root: str | Path,
    *,
    split: str = "test",
    annotations: str | Path | None = None,
    videos: str | Path | None = None,
    merge_same_video: bool = True,
) -> EvalDataset:
    """Parse ``{split}_data.json`` into one item per video file stem (or per ``video`` name if not merging)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    annotations = Path(annotations) if annotations else root / f"{split}_data.json"
    videos = Path(videos) if videos else root / "videos"

    key = video_stem if merge_same_video else str
    paragraphs: dict[str, list[str]] = {}
    names: dict[str, str] = {}  # item id -> the first `video` name seen for it
    for entry in read_annotations(annotations, split):
        item_id = key(entry["video"])
        paragraphs.setdefault(item_id, []).append(entry["description"])
        names.setdefault(item_id, entry["video"])

    by_name, by_stem = _index_videos(videos)
    items = []
    for item_id, descriptions in paragraphs.items():
        name = names[item_id]
        path = by_name.get(name) or by_stem.get(video_stem(name)) or videos / name
        items.append(Item(id=item_id, video=str(path), text=" ".join(descriptions)))
    return EvalDataset(name=NAME, task=RETRIEVAL, items=items, sources=(str(annotations),))


def read_annotations(path: Path, split: str = "test") -> list[dict]:
    """The annotation list, checked for the two fields used (``video``, ``description``)."""
    if not path.is_file():
        raise AnnotationsMissing(path, HINT.format(split=split))
    entries = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of annotations, got {type(entries).__name__}")
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("video", "description")):
            raise ValueError(f"{path}: annotation {number} lacks a 'video' or 'description' text: {entry!r}"[:300])
    return entries


def video_stem(name: str) -> str:
    """The name without its final extension: 'X.mov' -> 'X', 'X.' -> 'X', 'X' -> 'X'."""
    return name.rsplit(".", 1)[0] if "." in name else name


def _index_videos(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """One listing of ``folder``: file name -> path, and stem -> path (first in sorted order wins).

    A stored name with two extensions (``X.mov.mp4``) is indexed under both ``X.mov`` and ``X``.
    """
    by_name: dict[str, Path] = {}
    by_stem: dict[str, Path] = {}
    if not folder.is_dir():
        return by_name, by_stem
    files = sorted(path for path in folder.iterdir() if path.is_file())
    for path in files:
        by_name[path.name] = path
        by_stem.setdefault(video_stem(path.name), path)
    for path in files:  # second pass, so a double extension never shadows an exact stem
        if path.name.count(".") > 1:
            by_stem.setdefault(path.name.split(".", 1)[0], path)
    return by_name, by_stem
