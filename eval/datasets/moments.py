"""Moments in Time (v1) validation set: 33,900 videos, 339 classes; the raw category string is the prompt.

Layout (official ``Moments_in_Time_Raw``)::

    ROOT/moments_categories.txt   "name,index" per line (index 0-based); one name per line is accepted too
    ROOT/validationSet.csv        no header: path,label,agree,disagree   e.g. "juggling/x.mp4,juggling,3,0"
    ROOT/validation/<path>
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from eval.datasets.base import CLASSIFICATION, AnnotationsMissing, EvalDataset, Item

NAME = "moments"
HINT = "Moments_in_Time_Raw from http://moments.csail.mit.edu (request access); it holds these files"
_INDEXED = re.compile(r"^(.*),\s*(\d+)$")


def load(
    root: str | Path,
    *,
    categories: str | Path | None = None,
    annotations: str | Path | None = None,
    videos: str | Path | None = None,
) -> EvalDataset:
    """Parse the validation set. ``categories``, ``annotations`` (validationSet.csv), ``videos`` override paths."""
    root = Path(root)
    categories = Path(categories) if categories else root / "moments_categories.txt"
    annotations = Path(annotations) if annotations else root / "validationSet.csv"
    videos = Path(videos) if videos else root / "validation"

    classes = read_categories(categories)
    label_of = {name: label for label, name in enumerate(classes)}
    if not annotations.is_file():
        raise AnnotationsMissing(annotations, HINT)
    items = []
    with open(annotations, newline="", encoding="utf-8-sig") as f:
        for number, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) < 2 or row[1] not in label_of:
                raise ValueError(f"{annotations}:{number}: expected 'path,category,...' with a known category: {row}")
            items.append(Item(id=row[0], video=str(videos / row[0]), label=label_of[row[1]]))
    return EvalDataset(
        name=NAME,
        task=CLASSIFICATION,
        items=items,
        classes=classes,
        templates=("{}",),
        sources=(str(categories), str(annotations)),
    )


def read_categories(path: Path) -> list[str]:
    """Class names in label order: from "name,index" lines, or, if the file has no indices, by line order."""
    if not path.is_file():
        raise AnnotationsMissing(path, HINT)
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    matches = [_INDEXED.match(line) for line in lines]
    if not all(matches):
        return lines
    by_index = {int(m.group(2)): m.group(1) for m in matches}
    if sorted(by_index) != list(range(len(lines))):
        raise ValueError(f"{path}: category indices must be 0..{len(lines) - 1} without gaps or repeats")
    return [by_index[i] for i in range(len(lines))]
