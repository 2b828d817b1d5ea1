"""Decode each benchmark video once into a frame cache in the shard format, so many models reuse it.

Frames are sampled exactly as for training (``pipeline.frames``: the midpoints of
4 equal segments of the clip, or of the item's [start, end] window), resized to
the cache size and stored as JPEG in tar shards with a manifest. A sweep of 11
fused models decodes every video once. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from eval.datasets.base import EvalDataset, Item
from pipeline.frames import FrameError, decode_frames, encode_jpeg
from pipeline.writer import TarShardWriter, atomic_write_bytes, json_bytes, sample_key

CACHE_VERSION = 1
MISSING_FILE = "missing_file"


@dataclass(frozen=True)
class CacheSettings:
    frames: int = 4  # frames per video (segment midpoints)
    size: int = 224  # shorter side of the cached frames (the eval transform then center-crops)
    quality: int = 95  # JPEG quality of the cache
    per_shard: int = 500


@dataclass(frozen=True)
class FrameCache:
    """Where each item's frames are: ``found[item_id] = (tar path, key)``; ``missing[item_id] = reason``."""

    folder: Path
    found: dict[str, tuple[str, str]]
    missing: dict[str, str]


def cache_folder(root: Path, dataset: EvalDataset, settings: CacheSettings) -> Path:
    """A folder per dataset, item list and settings: a changed annotation file gets a new cache."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(settings)]).encode())
    for item in dataset.items:
        h.update(json.dumps([item.id, item.video, item.window]).encode())
    return Path(root) / f"{dataset.name}-{h.hexdigest()[:12]}"


def decode_item(item: Item, settings: CacheSettings) -> tuple[str, list[tuple[str, bytes]] | None, str]:
    """(item id, tar members or None, failure reason) for one item; never raises for a bad video."""
    if not Path(item.video).is_file():
        return item.id, None, MISSING_FILE
    try:
        clip = decode_frames(item.video, settings.frames, settings.size, window=item.window)
    except FrameError as e:
        return item.id, None, f"{e.reason}: {e.detail}"
    except Exception as e:  # a library surprise on one file must not stop the evaluation
        return item.id, None, f"unexpected_error: {type(e).__name__}: {e}"
    members = [(f"{k}.jpg", encode_jpeg(im, settings.quality)) for k, im in enumerate(clip.images)]
    meta = {"id": item.id, "video": item.video, "window": item.window, "timestamps": clip.timestamps}
    members.append(("json", json_bytes(meta)))
    return item.id, members, ""


def _decode_star(args):
    return decode_item(*args)


def build_cache(
    dataset: EvalDataset, root: Path, settings: CacheSettings = CacheSettings(), workers: int = 4, progress: bool = True
) -> FrameCache:
    """Decode the dataset's videos into ``root/<dataset>-<hash>/`` unless that cache is complete already."""
    folder = cache_folder(root, dataset, settings)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return _load(folder, json.loads(manifest.read_text()))
    folder.mkdir(parents=True, exist_ok=True)
    found: dict[str, tuple[str, str]] = {}
    missing: dict[str, str] = {}
    writer, shard = None, 0
    jobs = [(item, settings) for item in dataset.items]
    # fork where there is one: a spawned worker re-imports the __main__ module (eval.run: torch, open_clip, ~5 s
    # each); forking before any model or tensor work exists is safe, and the workers only use PyAV and PIL.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = context.Pool(workers) if workers > 1 else None
    results = pool.imap(_decode_star, jobs, chunksize=4) if pool else map(_decode_star, jobs)
    try:
        for item_id, members, reason in tqdm(
            results, total=len(jobs), desc=f"decoding {dataset.name}", unit="video", disable=not progress
        ):
            if members is None:
                missing[item_id] = reason
                continue
            if writer is None:
                writer = TarShardWriter(folder, shard)
            key = sample_key(item_id)
            writer.add_sample(key, members)
            found[item_id] = (str(writer.final), key)
            if writer.samples == settings.per_shard:
                writer.commit()
                writer, shard = None, shard + 1
        if writer is not None:
            writer.commit()
    finally:
        if pool:
            pool.terminate()
    record = {"dataset": dataset.name, "settings": asdict(settings), "found": found, "missing": missing}
    atomic_write_bytes(manifest, json_bytes(record))  # written last: marks the cache complete
    return FrameCache(folder, found, missing)


def _load(folder: Path, record: dict) -> FrameCache:
    found = {k: (str(folder / Path(v[0]).name), v[1]) for k, v in record["found"].items()}
    return FrameCache(folder, found, record["missing"])
