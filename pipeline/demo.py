"""`make demo`: the stages of FitCLIP that exist so far, on an embedded generated default.

Today that is the data pipeline: generate a small WebVid-style sample (videos +
CSV), shard it with ``pipeline.shard``, draw a labeled subset with
``pipeline.subset``, and show what was produced. Training, fusion and zero-shot
evaluation join the demo as they are built. Running it again reuses what is done.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import fire
from PIL import Image

from pipeline.synthetic import make_webvid_sample
from pipeline.writer import iter_tar_samples


def _run(args: list[str]) -> None:
    print("$ " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", *args], check=True)


def contact_sheet(tar: Path, out: Path, rows: int = 4) -> Path:
    """A PNG with the stored frames of the first ``rows`` samples of a shard, one video per row."""
    samples = []
    for _, members in iter_tar_samples(tar):
        frames = [Image.open(io.BytesIO(data)) for ext, data in members if ext.endswith(".jpg")]
        samples.append(frames)
        if len(samples) == rows:
            break
    w, h = samples[0][0].size
    sheet = Image.new("RGB", (w * len(samples[0]), h * len(samples)))
    for r, frames in enumerate(samples):
        for c, im in enumerate(frames):
            sheet.paste(im.resize((w, h)), (c * w, r * h))
    sheet.save(out)
    return out


def main(out: str = "demo_output", videos: int = 24, seconds: float = 6, labeled: int = 8, workers: int = 2) -> None:
    """Run the demo into OUT (default demo_output/).

    Args:
        out: folder for everything the demo makes.
        videos: number of generated WebVid-like clips.
        seconds: length of each clip.
        labeled: size of the labeled subset drawn with pipeline.subset.
        workers: worker processes for sharding.
    """
    root = Path(out)
    print(
        "FitCLIP demo. Built so far: the offline data pipeline (stage 1 of 5); the trainer, fusion and\n"
        "zero-shot evaluation join this demo when they land (issues 3-5).\n",
        flush=True,
    )
    csv_path = root / "webvid" / "webvid.csv"
    if csv_path.exists():
        print(f"[1/5] generated sample: reusing {csv_path}")
    else:
        print(
            f"[1/5] generating {videos} WebVid-like clips ({seconds:g} s, 320x180, H.264) -> {csv_path.parent}/",
            flush=True,
        )
        make_webvid_sample(root / "webvid", count=videos, seconds=seconds, seed=0)
    shards = root / "shards" / "webvid"
    print("[2/5] sharding (complete shards from an earlier run are kept)", flush=True)
    _run(
        [
            "pipeline.shard",
            "--src",
            str(csv_path),
            "--out",
            str(shards),
            "--samples_per_shard",
            "10",
            "--workers",
            str(workers),
            "--progress",
            "False",
        ]
    )
    labeled_dir = root / "shards" / "labeled"
    print(f"[3/5] drawing a labeled subset of {labeled} (the paper's 4.5K subset, in miniature)", flush=True)
    _run(
        [
            "pipeline.subset",
            "--src",
            str(shards),
            "--out",
            str(labeled_dir),
            "--n",
            str(labeled),
            "--seed",
            "0",
            "--samples_per_shard",
            "10",
        ]
    )
    first = shards / "000000.tar"
    key, members = next(iter_tar_samples(first))
    meta = json.loads(dict(members)["json"])
    sheet = contact_sheet(first, root / "frames.png")
    print("\nWhat was produced:")
    for path in sorted(shards.glob("*_stats.json")):
        stats = json.loads(path.read_text())
        print(f"  {shards}/{stats['shard']}.tar: {stats['ok']} samples, {stats['count'] - stats['ok']} failed")
    print(f"  {labeled_dir}/: {labeled} samples, keys in subset.json")
    print(f"  one sample, key {key}: members {[f'{key}.{ext}' for ext, _ in members]}")
    print(f"    caption: {dict(members)['txt'].decode()!r}")
    size = f"{meta['width']}x{meta['height']}"
    print(f"    duration {meta['duration']} s, frames at {meta['timestamps']} s, original {size}")
    print(f"  {sheet}: the stored frames of the first 4 videos (one row per video, time left to right)")


if __name__ == "__main__":
    fire.Fire(main)
