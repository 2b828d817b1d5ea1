"""What every benchmark parser returns: a list of items (video, optional time window, label or text)."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CLASSIFICATION = "classification"
RETRIEVAL = "retrieval"


class AnnotationsMissing(FileNotFoundError):
    """A benchmark's annotation file is absent: the dataset is reported as skipped, with this path."""

    def __init__(self, path: str | Path, hint: str = ""):
        super().__init__(f"annotation file not found: {path}" + (f" ({hint})" if hint else ""))
        self.path = str(path)


@dataclass(frozen=True)
class Item:
    """One evaluation sample."""

    id: str  # unique within the dataset; used as cache key and in the missing list
    video: str  # the video file's path (absolute, or relative to the cwd); may not exist (then counted missing)
    window: tuple[float, float] | None = None  # (start, end) seconds to sample inside (YouCook2 clips); None = whole
    label: int = -1  # class index (classification)
    text: str = ""  # the query text (retrieval)


@dataclass(frozen=True)
class EvalDataset:
    """A parsed benchmark."""

    name: str  # registry name, e.g. "ucf101"
    task: str  # CLASSIFICATION or RETRIEVAL
    items: list[Item]
    classes: list[str] = field(default_factory=list)  # class names in label order (classification)
    templates: tuple[str, ...] = ("{}",)  # prompt templates; each class's text embedding is their average
    sources: tuple[str, ...] = ()  # the annotation files read


def csv_rows(path: Path, needed: set[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of each row of a CSV file with a header, checked: the header names each column of
    ``needed`` and each row has a value in each (a short row had None there, which became a missing video's id
    or a traceback after every video was decoded); a ValueError naming the file and line otherwise."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not needed <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: expected columns {sorted(needed)}, got {reader.fieldnames}")
        for row in reader:
            if any(row.get(column) is None for column in needed):
                raise ValueError(f"{path}:{reader.line_num}: a row with fewer fields than the header: {row}"[:300])
            yield reader.line_num, row


@contextlib.contextmanager
def json_layout(path: Path):
    """Reading a parsed JSON file: a key, type or index it lacks is a ValueError naming the file (a traceback
    otherwise, e.g. a list where an object was expected, or an entry without its caption)."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: not the layout expected ({type(e).__name__}: {e})"[:300]) from None
