"""UCF101, split-1 test list: 3,783 videos, 101 classes, classified with CLIP's 48 UCF101 templates.

Layout (official ``UCF101TrainTestSplits-RecognitionTask.zip`` and ``UCF101.rar``)::

    ROOT/ucfTrainTestlist/classInd.txt      "1 ApplyEyeMakeup" ... "101 YoYo" (CRLF)
    ROOT/ucfTrainTestlist/testlist01.txt    "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi" (CRLF)
    ROOT/UCF-101/<Class>/<file>.avi

The label comes from the folder part of each test-list line: the folder ``HandstandPushups`` holds files
named ``v_HandStandPushups_*``, and the folder is what ``classInd.txt`` lists.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from eval.datasets.base import CLASSIFICATION, AnnotationsMissing, EvalDataset, Item
from eval.prompts import UCF101_TEMPLATES, camel_case_to_words

NAME = "ucf101"
HINT = "the ucfTrainTestlist folder of https://www.crcv.ucf.edu/data/UCF101/UCF101TrainTestSplits-RecognitionTask.zip"


def load(
    root: str | Path,
    *,
    class_index: str | Path | None = None,
    test_list: str | Path | None = None,
    videos: str | Path | None = None,
    split: int = 1,
) -> EvalDataset:
    """Parse UCF101's test list ``split`` (1, 2 or 3; the paper uses 1). Paths override the default layout."""
    root = Path(root)
    class_index = Path(class_index) if class_index else root / "ucfTrainTestlist" / "classInd.txt"
    test_list = Path(test_list) if test_list else root / "ucfTrainTestlist" / f"testlist{split:02d}.txt"
    videos = Path(videos) if videos else root / "UCF-101"

    folders = read_class_index(class_index)
    label_of = {folder: label for label, folder in enumerate(folders)}
    items = []
    for number, rel in enumerate(read_test_list(test_list), 1):
        folder = PurePosixPath(rel).parts[0]
        if folder not in label_of:
            raise ValueError(f"{test_list}:{number}: folder {folder!r} is not a class of {class_index}")
        items.append(Item(id=rel, video=str(videos / rel), label=label_of[folder]))
    return EvalDataset(
        name=NAME,
        task=CLASSIFICATION,
        items=items,
        classes=[camel_case_to_words(folder) for folder in folders],
        templates=UCF101_TEMPLATES,
        sources=(str(class_index), str(test_list)),
    )


def read_class_index(path: Path) -> list[str]:
    """Class folder names in label order from ``classInd.txt`` (1-based ids, any line endings)."""
    if not path.is_file():
        raise AnnotationsMissing(path, HINT)
    by_id = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise ValueError(f"{path}:{number}: expected 'ID ClassName', got {line!r}")
        by_id[int(fields[0])] = fields[1]
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        raise ValueError(f"{path}: class ids must be 1..{len(by_id)} without gaps or repeats")
    return [by_id[i] for i in range(1, len(by_id) + 1)]


def read_test_list(path: Path) -> list[str]:
    """``Class/file.avi`` entries in file order; a trailing label column (train lists) is ignored."""
    if not path.is_file():
        raise AnnotationsMissing(path, HINT)
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        rel = line.split()[0]
        if len(PurePosixPath(rel).parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'Class/file.avi', got {line!r}")
        entries.append(rel)
    return entries
