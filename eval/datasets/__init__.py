"""Benchmark parsers: ``DATASETS[name](root, **overrides) -> EvalDataset``, one module per benchmark.

``root`` is the benchmark's own folder (e.g. ``DATA_ROOT/ucf101``); keyword overrides give explicit paths
(annotation files, video folder) for layouts that differ. A missing annotation file raises
:class:`AnnotationsMissing`; a missing video is still an item (its path is where the file was expected).
"""

from __future__ import annotations

from collections.abc import Callable

from eval.datasets import didemo, moments, msrvtt, ucf101, youcook2
from eval.datasets.base import CLASSIFICATION, RETRIEVAL, AnnotationsMissing, EvalDataset, Item

DATASETS: dict[str, Callable[..., EvalDataset]] = {
    "ucf101": ucf101.load,
    "moments": moments.load,
    "msrvtt": msrvtt.load,
    "youcook2": youcook2.load,
    "didemo": didemo.load,
}

__all__ = ["CLASSIFICATION", "DATASETS", "RETRIEVAL", "AnnotationsMissing", "EvalDataset", "Item"]
