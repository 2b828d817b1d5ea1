"""Tiny versions of the five benchmark layouts, in the official formats, with generated videos.

For tests and the demo: ``make_layouts(root)`` writes ``root/{ucf101,moments,msrvtt,youcook2,didemo}`` in the
layouts the parsers expect by default, in a few seconds. Every frame carries its index in the top band
(:func:`pipeline.synthetic.read_frame_index` reads it back) and a solid colour below it; the colour is the
class's (classification) or the one the caption names (retrieval), so a model can learn something from them.
Each dataset lists one video that is deliberately not written (see :data:`MISSING`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from eval.datasets.didemo import video_stem
from pipeline import synthetic

WIDTH, HEIGHT, FPS, FRAMES = 64, 48, 25, 30  # 1.2 s clips

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 40),
    "magenta": (200, 40, 200),
    "cyan": (40, 200, 210),
}

# (folder, class name inside the file names, colour): as in UCF101, the folder is what decides the label
UCF101_CLASSES = (
    ("ApplyEyeMakeup", "ApplyEyeMakeup", "red"),
    ("HandstandPushups", "HandStandPushups", "green"),
    ("YoYo", "YoYo", "blue"),
)
MOMENTS_CLASSES = (("clapping", "yellow"), ("praying", "magenta"), ("adult+female+singing", "cyan"))
MSRVTT_VIDEOS = (("video9000", "red"), ("video9001", "green"), ("video9002", "blue"), ("video9003", "yellow"))
# (video_id, task, extension, colours of the two 1 s halves = the two clips)
YOUCOOK2_VIDEOS = (("xHr8X2Wpmno", "226", ".mp4", ("red", "green")), ("BlUe5kcWpQ0", "101", ".mkv", ("blue", "yellow")))
# (the json's `video` name, the file actually stored or None, colour)
DIDEMO_VIDEOS = (
    ("10000001@N00_1000000001_aaaaaaaaaa.mp4", "10000001@N00_1000000001_aaaaaaaaaa.mp4", "red"),
    ("10000002@N00_1000000002_bbbbbbbbbb.mov", "10000002@N00_1000000002_bbbbbbbbbb.mp4", "green"),  # other extension
    ("10000003@N00_1000000003_cccccccccc.", "10000003@N00_1000000003_cccccccccc.mp4", "blue"),  # bare '.'
    ("10000004@N00_1000000004_dddddddddd.avi", "10000004@N00_1000000004_dddddddddd.avi", "yellow"),
    # the green video's second name (as 33 of test_data.json's): one file, so one item by default
    ("10000002@N00_1000000002_bbbbbbbbbb.mp4", "10000002@N00_1000000002_bbbbbbbbbb.mp4", "green"),
    ("10000005@N00_1000000005_eeeeeeeeee.m4v", None, "magenta"),  # missing
)

# Item id, per dataset, of the one item whose video is deliberately absent (UCF101 depends on videos_per_class).
MISSING = {
    "moments": "praying/missing_praying.mp4",
    "msrvtt": "video9004",
    "youcook2": "gone0000000_4",
    "didemo": video_stem(DIDEMO_VIDEOS[-1][0]),  # items are keyed by file stem (eval.datasets.didemo)
}


def ucf101_missing_id(videos_per_class: int = 2) -> str:
    return f"YoYo/v_YoYo_g{videos_per_class + 1:02d}_c01.avi"


def make_layouts(root: str | Path, videos_per_class: int = 2) -> dict[str, Path]:
    """Write all five tiny layouts under ``root``; returns {dataset name: its folder}."""
    root = Path(root)
    writers = {
        "ucf101": lambda d: write_ucf101(d, videos_per_class),
        "moments": lambda d: write_moments(d, videos_per_class),
        "msrvtt": write_msrvtt,
        "youcook2": write_youcook2,
        "didemo": write_didemo,
    }
    layouts = {}
    for name, write in writers.items():
        layouts[name] = root / name
        write(layouts[name])
    return layouts


def coloured_frames(colours: Sequence[str], num_frames: int = FRAMES, shade: int = 0) -> Iterator[np.ndarray]:
    """Frames (H, W, 3) uint8: index band on top, below it the colours in equal consecutive runs."""
    for i in range(num_frames):
        frame = synthetic.index_frame(i, WIDTH, HEIGHT)
        rgb = np.array(COLOURS[colours[i * len(colours) // num_frames]], np.int16) + shade
        frame[HEIGHT // 2 :] = np.clip(rgb, 0, 255).astype(np.uint8)
        yield frame


def write_clip(path: Path, colours: Sequence[str], num_frames: int = FRAMES, shade: int = 0) -> Path:
    """Encode a coloured clip; .avi as MPEG-4 Part 2 (like UCF101's xvid), everything else H.264."""
    codec = "mpeg4" if path.suffix == ".avi" else "libx264"
    return synthetic.write_video(path, coloured_frames(colours, num_frames, shade), WIDTH, HEIGHT, FPS, codec=codec)


def write_ucf101(root: Path, videos_per_class: int = 2) -> None:
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    index = [f"{i} {folder}" for i, (folder, _, _) in enumerate(UCF101_CLASSES, 1)]
    entries = []
    for folder, file_name, colour in UCF101_CLASSES:
        for g in range(1, videos_per_class + 1):
            rel = f"{folder}/v_{file_name}_g{g:02d}_c01.avi"
            write_clip(root / "UCF-101" / rel, [colour], shade=8 * g)
            entries.append(rel)
    entries.append(ucf101_missing_id(videos_per_class))
    _write_lines(lists / "classInd.txt", index, "\r\n")  # the official files have CRLF endings
    _write_lines(lists / "testlist01.txt", entries, "\r\n")


def write_moments(root: Path, videos_per_class: int = 2) -> None:
    rows = []
    for name, colour in MOMENTS_CLASSES:
        for k in range(videos_per_class):
            rel = f"{name}/clip_{name.replace('+', '_')}_{k}.mp4"
            write_clip(root / "validation" / rel, [colour], shade=8 * k)
            rows.append([rel, name, 3, 0])
    rows.append([MISSING["moments"], "praying", 2, 1])
    _write_lines(root / "moments_categories.txt", [f"{name},{i}" for i, (name, _) in enumerate(MOMENTS_CLASSES)])
    _write_csv(root / "validationSet.csv", rows)


def write_msrvtt(root: Path) -> None:
    videos = [*MSRVTT_VIDEOS, (MISSING["msrvtt"], "cyan")]
    for video_id, colour in MSRVTT_VIDEOS:
        write_clip(root / "videos" / f"{video_id}.mp4", [colour])
    header = ["key", "vid_key", "video_id", "sentence"]
    rows = [[f"ret{i}", f"msr{v[5:]}", v, f"a video of a {c} screen"] for i, (v, c) in enumerate(videos)]
    _write_csv(root / "MSRVTT_JSFUSION_test.csv", rows, header)
    # The JSFusion list + MSR_VTT.json form too (Frozen-in-Time layout); the first caption matches the csv's.
    _write_lines(root / "structured-symlinks" / "val_list_jsfusion.txt", [v for v, _ in videos])
    captions = [{"image_id": v, "caption": f"a video of a {c} screen", "id": 2 * i} for i, (v, c) in enumerate(videos)]
    captions += [{"image_id": v, "caption": f"{c} fills the frame", "id": 2 * i + 1} for i, (v, c) in enumerate(videos)]
    captions.sort(key=lambda a: (a["image_id"], a["id"]))
    (root / "annotation").mkdir(parents=True, exist_ok=True)
    (root / "annotation" / "MSR_VTT.json").write_text(json.dumps({"annotations": captions}), encoding="utf-8")


def write_youcook2(root: Path) -> None:
    rows, database = [], {}
    for video_id, task, ext, colours in YOUCOOK2_VIDEOS:
        write_clip(root / "videos" / task / f"{video_id}{ext}", colours, num_frames=2 * FPS)  # 2 s
        segments = []
        for k, colour in enumerate(colours):
            rows.append([k + 1, k, task, f"the screen turns {colour}", video_id])
            segments.append({"segment": [k, k + 1], "id": k, "sentence": f"the screen turns {colour}"})
        database[video_id] = {"subset": "validation", "recipe_type": task, "annotations": segments}
    gone = MISSING["youcook2"].rsplit("_", 1)[0]
    rows.append([3, 1, "113", "the screen turns cyan", gone])
    database[gone] = {
        "subset": "validation",
        "recipe_type": "113",
        "annotations": [{"segment": [1, 3], "id": 0, "sentence": "the screen turns cyan"}],
    }
    database["trainOnly001"] = {
        "subset": "training",
        "recipe_type": "101",
        "annotations": [{"segment": [0, 1], "id": 0, "sentence": "not part of validation"}],
    }
    _write_csv(root / "validation_youcook.csv", rows, ["end", "start", "task", "text", "video_id"])
    (root / "youcookii_annotations_trainval.json").write_text(json.dumps({"database": database}), encoding="utf-8")


def write_didemo(root: Path) -> None:
    for _, stored, colour in DIDEMO_VIDEOS:
        if stored and not (root / "videos" / stored).is_file():
            write_clip(root / "videos" / stored, [colour])
    annotations = []
    for round_ in ("appears", "stays on screen"):  # interleaved, so "file order" is not "grouped order"
        for name, _, colour in DIDEMO_VIDEOS:
            annotations.append(
                {
                    "annotation_id": len(annotations) + 1,
                    "description": f"a {colour} screen {round_}.",
                    "dl_link": f"https://www.flickr.com/video_download.gne?id={name.split('_')[1]}",
                    "num_segments": 6,
                    "times": [[0, 0], [0, 1], [0, 0], [1, 1]],
                    "video": name,
                }
            )
    (root / "test_data.json").write_text(json.dumps(annotations), encoding="utf-8")
    val = [a for a in annotations if a["video"] in {DIDEMO_VIDEOS[0][0], DIDEMO_VIDEOS[1][0]}]
    (root / "val_data.json").write_text(json.dumps(val), encoding="utf-8")


def _write_lines(path: Path, lines: Sequence[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("".join(line + newline for line in lines))


def _write_csv(path: Path, rows: Sequence[Sequence], header: Sequence[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
