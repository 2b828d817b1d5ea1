"""A small synthetic video world with learnable structure, for ``make demo``.

Scenes are a coloured shape moving over a textured background. Captions name
the colour, the shape, the motion and the background. Three views of the world:

- *stills* (single frames, "a photo of ..." captions): what the tiny teacher is
  pre-trained on, so it has never seen a video;
- *WebVid-like clips* ("a red circle moving left over a striped background"):
  the training set, as a CSV in WebVid's format;
- *benchmarks* in the official UCF101 and MSR-VTT layouts, with new videos, class
  names in UCF101's CamelCase form and captions in a phrasing never used in
  training ("footage of a circle in red, heading left"): zero-shot evaluation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.synthetic import iso_duration, write_csv, write_video
from pipeline.writer import atomic_write_bytes

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS = ("plain", "striped", "dotted", "checkered")
SIZE = 96  # pixels, square frames
FPS = 10
SECONDS = 2.0


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    motion: str
    background: str
    seed: int

    def webvid_caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.motion} over a {self.background} background"

    def still_caption(self) -> str:
        return f"a photo of a {self.colour} {self.shape} on a {self.background} background"

    def benchmark_caption(self) -> str:  # a phrasing never seen in training
        return f"footage of a {self.shape} in {self.colour}, heading {self.motion}"


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        rng.choice(list(COLOURS)),
        rng.choice(SHAPES),
        rng.choice(list(MOTIONS)),
        rng.choice(BACKGROUNDS),
        rng.randrange(2**31),
    )


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    base = rng.integers(60, 110)
    frame = np.full((SIZE, SIZE, 3), base, np.uint8)
    light = np.uint8(min(255, base + 70))
    period = int(rng.integers(8, 14))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if kind == "striped":
        frame[(xx // (period // 2)) % 2 == 0] = light
    elif kind == "dotted":
        frame[((xx % period) - period // 2) ** 2 + ((yy % period) - period // 2) ** 2 < 5] = light
    elif kind == "checkered":
        frame[((xx // period) + (yy // period)) % 2 == 0] = light
    return frame


def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    return ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r))  # cross


def render(scene: Scene, t: float) -> np.ndarray:
    """The frame (SIZE, SIZE, 3) uint8 of ``scene`` at relative time ``t`` in [0, 1]."""
    rng = np.random.default_rng(scene.seed)
    frame = _background(scene.background, rng)
    r = float(rng.uniform(13, 20))
    start = rng.uniform(0.3, 0.7, size=2) * SIZE
    dx, dy = MOTIONS[scene.motion]
    travel = SIZE * 0.45
    cx = start[0] + dx * travel * (t - 0.5)
    cy = start[1] + dy * travel * (t - 0.5)
    jitter = rng.integers(-25, 25, size=3)
    colour = np.clip(np.array(COLOURS[scene.colour]) + jitter, 0, 255).astype(np.uint8)
    frame[_shape_mask(scene.shape, cx, cy, r)] = colour
    return frame


def write_clip(path: Path, scene: Scene) -> Path:
    count = int(SECONDS * FPS)
    frames = (render(scene, i / (count - 1)) for i in range(count))
    return write_video(path, frames, SIZE, SIZE, FPS, gop=FPS)


def stills(count: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """``count`` (image, caption) pairs of single frames, at random instants of random scenes."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        scene = random_scene(rng)
        out.append((render(scene, rng.random()), scene.still_caption()))
    return out


def write_webvid(root: Path, count: int, seed: int) -> Path:
    """WebVid-style CSV + clips under ``root`` (official columns; contentUrl relative to the CSV)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        scene = random_scene(rng)
        rel = Path("videos") / f"{i // 100:03d}" / f"{seed}{i:06d}.mp4"
        write_clip(root / rel, scene)
        rows.append(
            [
                f"{seed}{i:06d}",
                scene.webvid_caption(),
                i // 100,
                f"{i // 100:03d}",
                iso_duration(SECONDS),
                rel.as_posix(),
            ]
        )
    return write_csv(root / "webvid.csv", rows)


UCF_CLASSES = [
    ("red", "circle"),
    ("blue", "square"),
    ("green", "triangle"),
    ("yellow", "cross"),
    ("purple", "circle"),
    ("orange", "square"),
    ("red", "triangle"),
    ("blue", "cross"),
]


def ucf_class_name(colour: str, shape: str) -> str:
    return f"{colour.capitalize()}{shape.capitalize()}"  # UCF101's CamelCase style: "RedCircle"


def write_ucf101(root: Path, per_class: int, seed: int) -> Path:
    """A UCF101-layout benchmark: ucfTrainTestlist/{classInd,testlist01}.txt (CRLF) and UCF-101/<Class>/*.avi."""
    rng = random.Random(seed)
    names = [ucf_class_name(c, s) for c, s in UCF_CLASSES]
    lines = []
    for (colour, shape), name in zip(UCF_CLASSES, names, strict=True):
        for g in range(per_class):
            scene = Scene(colour, shape, rng.choice(list(MOTIONS)), rng.choice(BACKGROUNDS), rng.randrange(2**31))
            rel = f"{name}/v_{name}_g{g + 1:02d}_c01.avi"
            count = int(SECONDS * FPS)
            frames = (render(scene, i / (count - 1)) for i in range(count))
            write_video(root / "UCF-101" / rel, frames, SIZE, SIZE, FPS, codec="mpeg4", gop=FPS)
            lines.append(rel)
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(lists / "classInd.txt", "".join(f"{i + 1} {n}\r\n" for i, n in enumerate(names)).encode())
    atomic_write_bytes(lists / "testlist01.txt", "".join(f"{rel}\r\n" for rel in lines).encode())
    return root


def write_msrvtt(root: Path, count: int, seed: int) -> Path:
    """An MSR-VTT-layout benchmark: MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence) and videos/*.mp4."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        scene = random_scene(rng)
        video_id = f"video{9000 + i}"
        write_clip(root / "videos" / f"{video_id}.mp4", scene)
        rows.append([f"ret{i}", f"msr{9000 + i}", video_id, scene.benchmark_caption()])
    write_csv(root / "MSRVTT_JSFUSION_test.csv", rows, ["key", "vid_key", "video_id", "sentence"])
    return root
