"""What every benchmark parser returns: a list of items (video, optional time window, label or text)."""

from __future__ import annotations

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
