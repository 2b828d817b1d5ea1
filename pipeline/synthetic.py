"""Generated videos for the demo, the tests and the benchmarks (no downloads, no system ffmpeg).

Videos are rendered with numpy and encoded by the ffmpeg binary that the
``imageio-ffmpeg`` wheel ships, driven through ``ffmpeg-python``. Two kinds:

- *index clips*: each frame shows its own index as a row of black/white cells,
  so a test can read back exactly which frames the sampler took
  (:func:`read_frame_index`), even after JPEG and resizing;
- *WebVid-like clips*: a panning texture with moving shapes, H.264 at 25 fps,
  with a realistic bitrate and GOP structure (for benchmarks and the demo).
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import ffmpeg
import numpy as np

from pipeline.writer import TMP_MARK, atomic_write_bytes

INDEX_BITS = 12  # up to 4096 frames
_CELL_ROWS = 0.4  # share of the frame height used by the index cells


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: ``$FFMPEG_BINARY`` if set, else the one of the imageio-ffmpeg wheel."""
    exe = os.environ.get("FFMPEG_BINARY")
    if exe:
        return exe
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def index_frame(index: int, width: int, height: int) -> np.ndarray:
    """An RGB frame (H, W, 3) uint8 whose top band encodes ``index`` in binary, MSB first."""
    if not 0 <= index < 2**INDEX_BITS:
        raise ValueError(f"index {index} does not fit in {INDEX_BITS} bits")
    frame = np.full((height, width, 3), 128, np.uint8)
    band = int(height * _CELL_ROWS)
    edges = np.linspace(0, width, INDEX_BITS + 1).astype(int)
    for bit in range(INDEX_BITS):
        on = (index >> (INDEX_BITS - 1 - bit)) & 1
        frame[:band, edges[bit] : edges[bit + 1]] = 255 if on else 0
    # Lower part: a gradient that changes with the index, so frames are not identical below the band.
    ramp = (np.arange(width, dtype=np.int64) + 7 * index) % 256
    frame[band:, :, 1] = ramp.astype(np.uint8)[None, :]
    return frame


def read_frame_index(image) -> int:
    """Inverse of :func:`index_frame` for a decoded (possibly resized, JPEG-compressed) image."""
    arr = np.asarray(image.convert("L") if hasattr(image, "convert") else image, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    height, width = arr.shape
    band = int(height * _CELL_ROWS)
    edges = np.linspace(0, width, INDEX_BITS + 1).astype(int)
    value = 0
    for bit in range(INDEX_BITS):
        # Sample the middle of each cell, away from edges blurred by compression and scaling.
        lo, hi = edges[bit], edges[bit + 1]
        pad = max(1, (hi - lo) // 4)
        cell = arr[band // 4 : 3 * band // 4, lo + pad : hi - pad]
        value = (value << 1) | int(cell.mean() > 128)
    return value


def webvid_like_frame(index: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A frame of a panning texture with two moving shapes, like stock footage in motion and detail."""
    rng = np.random.default_rng(seed)
    base = _texture(rng, height + 64, width + 256)
    shift = (2 * index) % 256
    frame = base[32 : 32 + height, shift : shift + width].copy()
    t = index / 25.0
    colours = rng.integers(0, 256, size=(2, 3))
    for k, colour in enumerate(colours):
        cx = int((0.5 + 0.35 * np.sin(t * (0.7 + 0.4 * k) + k)) * width)
        cy = int((0.5 + 0.3 * np.cos(t * (0.5 + 0.3 * k) + 2 * k)) * height)
        r = max(4, min(width, height) // (5 + 2 * k))
        frame[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = colour
    return frame


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth random colour texture (low-frequency noise upsampled), uint8 (H, W, 3)."""
    coarse = rng.integers(0, 256, size=(height // 16 + 2, width // 16 + 2, 3)).astype(np.float32)
    fine = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:height, :width]
    grain = rng.normal(0, 12, size=(height, width, 1)).astype(np.float32)
    return np.clip(fine + grain, 0, 255).astype(np.uint8)


def write_video(
    path: str | Path,
    frames: Iterator[np.ndarray],
    width: int,
    height: int,
    fps: float = 25,
    codec: str = "libx264",
    gop: int | None = None,
    extra: dict | None = None,
) -> Path:
    """Encode RGB frames (H, W, 3) uint8 into ``path`` (container from the extension).

    ``gop`` sets the keyframe interval (ffmpeg's default for libx264 is 250 frames).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # encoded under a temporary name (its extension picks the container), renamed when complete: a stopped run
    # never leaves a cut-short video under the final name
    tmp = path.with_name(f".{path.stem}{TMP_MARK}{uuid.uuid4().hex[:12]}{path.suffix}")
    out_args = {"vcodec": codec, "pix_fmt": "yuv420p", "loglevel": "error"}
    if codec == "libx264":
        out_args.update(preset="veryfast", crf=23)
    if gop:
        out_args["g"] = gop
    out_args.update(extra or {})
    process = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", r=fps)
        .output(str(tmp), **out_args)
        .overwrite_output()
        .run_async(pipe_stdin=True, cmd=ffmpeg_exe(), quiet=True)
    )
    try:
        try:
            for frame in frames:
                process.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        finally:
            process.stdin.close()
            err = process.stderr.read()  # small: loglevel=error
            process.wait()
        if process.returncode != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}: {err.decode(errors='replace')[-2000:]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_index_clip(
    path: str | Path, num_frames: int, width: int = 160, height: int = 96, fps: float = 25, **kwargs
) -> Path:
    """A clip whose frame i shows the number i (see :func:`read_frame_index`)."""
    frames = (index_frame(i, width, height) for i in range(num_frames))
    return write_video(path, frames, width, height, fps, **kwargs)


def write_webvid_like_clip(
    path: str | Path, seconds: float = 18, width: int = 596, height: int = 336, fps: float = 25, seed: int = 0, **kwargs
) -> Path:
    """A WebVid-like clip: 596x336, 25 fps, H.264, about 18 s by default."""
    count = round(seconds * fps)
    frames = (webvid_like_frame(i, width, height, seed) for i in range(count))
    return write_video(path, frames, width, height, fps, **kwargs)


def write_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """A file with an audio stream and no video stream (a sine tone, AAC in MP4)."""
    path = Path(path)
    (
        ffmpeg.input(f"sine=frequency=440:duration={seconds}", format="lavfi")
        .output(str(path), acodec="aac", loglevel="error")
        .overwrite_output()
        .run(cmd=ffmpeg_exe(), quiet=True)
    )
    return path


WEBVID_COLUMNS = ["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"]

_NOUNS = ["a red square", "a blue circle", "two shapes", "a green block", "a yellow patch", "a dark tile"]
_VERBS = ["drifting left", "bouncing", "circling slowly", "sliding over texture", "moving fast", "wobbling"]


def write_csv(path: Path, rows: list[list], header: list[str] = WEBVID_COLUMNS) -> Path:
    """A CSV with a header row (WebVid's columns unless told), its folder made if missing; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode("utf-8"))
    return path


def iso_duration(seconds: float) -> str:
    """WebVid's ISO 8601 duration, rounded to whole seconds: 17.6 -> 'PT00H00M18S'."""
    s = round(seconds)
    return f"PT{s // 3600:02d}H{s % 3600 // 60:02d}M{s % 60:02d}S"


def make_webvid_sample(
    root: str | Path,
    count: int = 16,
    seconds: float = 4,
    width: int = 320,
    height: int = 180,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``count`` WebVid-like clips under ``root/videos/{page_dir}/`` and ``root/webvid.csv``.

    The CSV has WebVid's official columns; ``contentUrl`` holds paths relative to
    the CSV's folder (the pipeline resolves them so), and the files also sit in
    the ``--video_root`` layout ``videos/{page_dir}/{videoid}.mp4``.
    """
    root = Path(root)
    rows = []
    for i in range(count):
        videoid = str(1000000 + i)
        page_dir = f"{i // 8:03d}_{i // 8:03d}"
        rel = Path("videos") / page_dir / f"{videoid}.mp4"
        write_webvid_like_clip(root / rel, seconds=seconds, width=width, height=height, seed=seed + i)
        caption = f"{_NOUNS[(seed + i) % len(_NOUNS)]} {_VERBS[(seed + 3 * i) % len(_VERBS)]}, stock footage"
        rows.append([videoid, caption, i // 8, page_dir, iso_duration(seconds), rel.as_posix()])
        if progress:
            progress(i + 1)
    return write_csv(root / "webvid.csv", rows)
