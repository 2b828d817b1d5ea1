"""Decode each benchmark video once into a frame cache in the shard format, so many models reuse it.

Frames are sampled exactly as for training (``pipeline.frames``: the midpoints of
4 equal segments of the clip, or of the item's [start, end] window), resized to
the cache size and stored as JPEG in tar shards with a manifest. A sweep of 11
fused models decodes every video once. No torch here.

The manifest records each item's file stamp (size, mtime) as it was when the item
was decoded. A later build re-decodes only the items whose file changed, appeared
or disappeared since, those that failed with an unexpected error (often
transient), and those stopped by a shorter decode time limit than its own (or
any, when it has none), and appends them as new shards: written shards are never
modified, so a reader holding the old manifest still finds what it references. A build deletes
the shards that neither the manifest it replaces nor its own references: left by
a build that was killed, or unreferenced since the build before. Builds of one
cache folder take turns (a lock file): the second waits, then decodes only what
the first left to do. Shards left less than half full of referenced videos are
copied together into new shards (``compact``), so such a cache stays at most about
twice its videos' frames.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import stat
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from eval.datasets.base import EvalDataset, Item
from pipeline.cli import error_line
from pipeline.folder_lock import lock_folder
from pipeline.frames import FrameError, decode_frames, encode_jpeg
from pipeline.pool import Death, how_it_ended, run_isolated
from pipeline.time_limit import decode_limit, limit_of, stuck_failure
from pipeline.writer import (
    SHARD_TAR,
    TarShardWriter,
    atomic_write_bytes,
    iter_tar_samples,
    json_bytes,
    remove_temporaries,
    sample_key,
)

# 2: per-item file stamps in the manifest; and pipeline.frames samples differently since (rotated videos, MP4 edit
# lists, AV1), so version-1 caches hold frames the trainer would no longer produce and must be rebuilt.
# 3: non-square pixels made square (pipeline.frames.displayed_size), so older caches hold such videos squeezed;
# and an MP4 that cannot seek to its first frame decodes instead of failing.
# 4: a sampling instant on a frame's start takes that frame (pipeline.frames computes in exact fractions); a
# Matroska or WebM file cut short fails as truncated.
CACHE_VERSION = 4
MISSING_FILE = "missing_file"
UNEXPECTED = "unexpected_error"
# retried by the next build, as every unexpected error is: an out-of-memory kill may not happen again
CRASHED = f"{UNEXPECTED}: the process decoding it died (a crash in the decoder, or killed for memory)"
# how a video past --decode_timeout is decoded after all (plan_decode tries it again under a longer limit only)
MORE_TIME = "give --decode_timeout more seconds (0: no limit), and the next run decodes it again"
TIMEOUT_HINT = f"; {MORE_TIME}"  # what a decode_timeout failure's detail ends with


def crashed(death: Death) -> str:
    """The failure reason of a video whose decoding process died on it twice, with how the second one ended."""
    return f"{CRASHED}; {how_it_ended(death.code)}"


def stuck(frames: int, decode_timeout: float) -> str:
    """The failure reason of a video whose decoding was stuck inside one call into FFmpeg past ``decode_timeout``,
    and its worker process ended: a timeout, tried again under a longer limit only."""
    failure = stuck_failure(frames, decode_timeout, TIMEOUT_HINT)
    return f"{failure.reason}: {failure.detail}"


Stamp = list[int] | None  # [size, mtime_ns] of an item's video file; None when there is no file


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
    """A folder per annotation file, item list and settings: a changed annotation file gets a new cache. The
    videos' paths are not part of it: a missing video's path is its loader's guess (``videos/<task>/<id>.mp4``), so
    adding the video as .mkv, or in another folder, started a new cache and decoded every video again. The
    manifest's file stamps, per item, find what changed on disk."""
    sources = [str(Path(source).resolve()) for source in dataset.sources]
    h = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(settings), sources]).encode())
    for item in dataset.items:
        h.update(json.dumps([item.id, item.window]).encode())
    return Path(root) / f"{dataset.name}-{h.hexdigest()[:12]}"


def _by_video_paths(root: Path, dataset: EvalDataset, settings: CacheSettings) -> Path:
    """The folder that ``cache_folder`` named before 2026-11-27, from the videos' paths; a build adopts it."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(settings)]).encode())
    for item in dataset.items:
        h.update(json.dumps([item.id, item.video, item.window]).encode())
    return Path(root) / f"{dataset.name}-{h.hexdigest()[:12]}"


def _adopt(folder: Path, root: Path, dataset: EvalDataset, settings: CacheSettings) -> None:
    """If ``folder`` is not there yet, rename the cache made under its old name (``_by_video_paths``) to it, so
    that a cache built before the naming changed is used, not decoded again."""
    if folder.exists():  # the common case: no second hash of every item
        return
    old = _by_video_paths(root, dataset, settings)
    if old != folder and (old / "manifest.json").is_file():
        with contextlib.suppress(OSError):  # another run adopted it first: folder is there now
            old.rename(folder)


def _older_versions(folder: Path) -> list[tuple[Path, object]]:
    """The caches beside ``folder`` of its kind (``ucf101-*``, eval.tag's ``folder-*``) made by an older cache
    version, with their version: a new version names a new folder (``cache_folder`` hashes it), so the old one is
    neither read nor removed."""
    older = []
    for manifest in sorted(folder.parent.glob(f"{folder.name.rsplit('-', 1)[0]}-*/manifest.json")):
        try:
            version = json.loads(manifest.read_text()).get("version", 1)  # version 1 wrote none
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(version, int) and version < CACHE_VERSION:
            older.append((manifest.parent, version))
    return older


def video_folder_cache(root: Path, videos: Path, settings: CacheSettings) -> Path:
    """A cache folder per folder of videos (``eval.tag``) and settings, not per item list: when videos are added,
    changed or removed, a build decodes only those, instead of starting a new cache for the new list."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(settings), str(Path(videos).resolve())]).encode())
    return Path(root) / f"folder-{h.hexdigest()[:12]}"


def file_stamp(path: str | Path) -> Stamp:
    """[size, mtime_ns] of a file, or None if there is none: what tells a later build that the file changed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


def decode_item(
    item: Item, settings: CacheSettings, decode_timeout: float = 0
) -> tuple[str, list[tuple[str, bytes]] | None, str]:
    """(item id, tar members or None, failure reason) for one item; never raises for a bad video. Decoding that
    runs past ``decode_timeout`` seconds (0: no limit) stops there, and the item fails as ``DECODE_TIMEOUT``."""
    if not Path(item.video).is_file():
        return item.id, None, MISSING_FILE
    try:
        with decode_limit(decode_timeout, settings.frames, TIMEOUT_HINT):
            clip = decode_frames(item.video, settings.frames, settings.size, window=item.window)
    except FrameError as e:  # a decode_timeout among them
        return item.id, None, f"{e.reason}: {e.detail}"
    except Exception as e:  # a library surprise on one file must not stop the evaluation
        return item.id, None, f"{UNEXPECTED}: {type(e).__name__}: {e}"
    members = [(f"{k}.jpg", encode_jpeg(im, settings.quality)) for k, im in enumerate(clip.images)]
    meta = {"id": item.id, "video": item.video, "window": item.window, "timestamps": clip.timestamps}
    members.append(("json", json_bytes(meta)))
    return item.id, members, ""


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a complete cache of this version, or None (absent, unreadable, or older: then rebuild)."""
    try:
        record = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = ("found", "missing", "stamps")
    if not isinstance(record, dict) or record.get("version") != CACHE_VERSION or not all(k in record for k in keys):
        return None  # e.g. a version-1 manifest: no stamps, so nothing says its entries are still current
    return record


def plan_decode(
    items: list[Item],
    record: dict | None,
    stamps: dict[str, Stamp],
    shards_present: set[str],
    decode_timeout: float = 0,
) -> dict[str, str]:
    """{item id: why it must be decoded} for the items the manifest ``record`` cannot serve as they are now.

    ``stamps`` are the items' file stamps now; ``shards_present`` the tar names in the cache folder. An item whose
    decoding ran past its limit before is decoded again when this build's ``decode_timeout`` is longer (or 0, no
    limit): under the same limit it would only spend that long again.
    """
    if record is None:
        return {item.id: "new" for item in items}
    plan = {}
    for item in items:
        found, reason = record["found"].get(item.id), record["missing"].get(item.id)
        if item.id not in record["stamps"] or (found is None and reason is None):
            plan[item.id] = "new"
        elif record["stamps"][item.id] != stamps[item.id]:
            before, now = record["stamps"][item.id], stamps[item.id]
            plan[item.id] = "file appeared" if before is None else "file gone" if now is None else "file changed"
        elif reason is not None and reason.startswith(UNEXPECTED):
            plan[item.id] = "unexpected error before"
        elif reason is not None and _more_time(limit_of(reason), decode_timeout):
            plan[item.id] = "more time to decode"
        elif found is not None and Path(found[0]).name not in shards_present:
            plan[item.id] = "cache shard gone"
    return plan


def _more_time(limit_before: float | None, limit_now: float) -> bool:
    """Whether an item that ran past ``limit_before`` seconds (None: it did not) gets longer now. ``limit_before``
    was read back from its reason, where it is written to 6 digits: so is ``limit_now`` here, or the same limit
    (12345.64, read back as 12345.6) would count as longer on every build."""
    return limit_before is not None and (not limit_now or float(f"{limit_now:g}") > limit_before)


def describe_plan(name: str, plan: dict[str, str], total: int) -> str:
    """One line for the user: how many items are decoded again, and why."""
    counts: dict[str, int] = {}
    for why in plan.values():
        counts[why] = counts.get(why, 0) + 1
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"frame cache {name}: re-decoding {len(plan)} of {total} videos ({why}); the others are reused"


def existing_shards(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.tar") if SHARD_TAR.match(p.name)} if folder.is_dir() else set()


def next_shard(record: dict | None) -> int:
    """The first shard number after every shard the manifest references (unreferenced leftovers may be reused)."""
    numbers = [int(SHARD_TAR.match(tar).group(1)) for tar, _ in (record or {}).get("found", {}).values()]
    return max(numbers, default=-1) + 1


def build_cache(
    dataset: EvalDataset,
    root: Path,
    settings: CacheSettings = CacheSettings(),
    workers: int = 4,
    progress: bool = True,
    folder: Path | None = None,
    decode_timeout: float = 0,
) -> FrameCache:
    """Decode the dataset's videos into ``root/<dataset>-<hash>/`` (or ``folder``, e.g. a ``video_folder_cache``);
    of an existing cache, only what is stale. Items no longer in the dataset leave the manifest on the next build.
    A video whose decoding runs past ``decode_timeout`` seconds (0: no limit) is stopped there, so that it holds its
    worker no longer, and counted missing; a later build with a longer limit decodes it again."""
    if folder is None:
        folder = cache_folder(root, dataset, settings)
        _adopt(folder, root, dataset, settings)
    folder = Path(folder)
    record = read_manifest(folder)
    stamps = {item.id: file_stamp(item.video) for item in dataset.items}  # taken before decoding: never too new
    plan = plan_decode(dataset.items, record, stamps, existing_shards(folder), decode_timeout)
    if _serves(dataset.items, record, plan):
        cache = _load(folder, record)  # up to date: no lock, no write (the cache may be on a read-only mount)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        with _build_lock(folder, dataset.name):
            cache = _rebuild(dataset, folder, settings, stamps, workers, progress, decode_timeout)
    _say_timed_out(dataset.name, cache.missing)
    return cache


def _say_timed_out(name: str, missing: dict[str, str]) -> None:
    """One line on the videos left out because their decoding ran past its limit, by this build or an earlier one
    (which a rerun under the same limit keeps): a limit is wall time, so a busy machine can cause it."""
    timed_out = {item_id: seconds for item_id, reason in missing.items() if (seconds := limit_of(reason)) is not None}
    if timed_out:
        item_id, seconds = next(iter(timed_out.items()))
        print(
            f"frame cache {name}: {len(timed_out)} video(s) ran past their decode time limit and are left out as "
            f"missing (e.g. {item_id}: more than {seconds:g} s); {MORE_TIME}",
            file=sys.stderr,
        )


@contextlib.contextmanager
def _build_lock(folder: Path, name: str):
    """Hold ``folder/.lock``: one build of a cache folder at a time (another run's build is waited for)."""
    waiting = f"frame cache {name}: another run is building {folder}; waiting for it"
    with lock_folder(folder, on_wait=lambda: print(waiting, file=sys.stderr), grace=0):  # it waits anyway: say so
        yield


def _rebuild(
    dataset: EvalDataset,
    folder: Path,
    settings: CacheSettings,
    stamps: dict[str, Stamp],
    workers: int,
    progress: bool,
    decode_timeout: float,
) -> FrameCache:
    """The locked part of ``build_cache``: decode what the manifest (read again: a build we waited for may have
    made it) cannot serve, write the new manifest, delete what no manifest of the last two references."""
    record = read_manifest(folder)
    if record is None and (folder / "manifest.json").exists():
        print(
            f"frame cache {dataset.name}: {folder / 'manifest.json'} is unreadable or from an older cache version "
            f"(no file stamps): decoding all {len(dataset.items)} videos again",
            file=sys.stderr,
        )
    elif record is None:
        for old, version in _older_versions(folder):
            print(
                f"frame cache {dataset.name}: {old} is a cache made by an older version (cache version {version}, "
                f"now {CACHE_VERSION}), whose frames are not read: decoding all {len(dataset.items)} videos again "
                f"into {folder}; remove {old} to free its space",
                file=sys.stderr,
            )
    plan = plan_decode(dataset.items, record, stamps, existing_shards(folder), decode_timeout)
    if _serves(dataset.items, record, plan):
        return _load(folder, record)
    if record is not None and plan:
        print(describe_plan(dataset.name, plan, len(dataset.items)), file=sys.stderr)
    remove_temporaries(folder)  # of a build that was killed (no other build runs: the lock)
    todo = [item for item in dataset.items if item.id in plan]
    found, missing = decode_into_shards(
        todo, folder, next_shard(record), settings, workers, progress, dataset.name, decode_timeout
    )
    kept = {item.id for item in dataset.items} - set(plan)  # a video removed from eval.tag's folder is dropped
    old_found = {k: v for k, v in (record or {}).get("found", {}).items() if k in kept}
    old_missing = {k: v for k, v in (record or {}).get("missing", {}).items() if k in kept}
    found = {**old_found, **found}
    # after what was just decoded, and after every shard the replaced manifest references (its readers keep them)
    first = max(next_shard(record), next_shard({"found": found}))
    found.update(compact(folder, found, settings.per_shard, first, dataset.name))
    new = {
        "version": CACHE_VERSION,
        "dataset": dataset.name,
        "settings": asdict(settings),
        "found": found,
        "missing": {**old_missing, **missing},
        "stamps": stamps,
    }
    atomic_write_bytes(folder / "manifest.json", json_bytes(new))  # written last: marks the cache complete
    referenced = {Path(tar).name for r in (record or {}, new) for tar, _ in r.get("found", {}).values()}
    for name in existing_shards(folder) - referenced:
        (folder / name).unlink(missing_ok=True)
    return _load(folder, new)


def sparse_shards(found: dict[str, list[str]], per_shard: int) -> dict[str, set[str]]:
    """{tar name: the keys in it that ``found`` references} of the shards less than half full of referenced videos."""
    live: dict[str, set[str]] = {}
    for tar, key in found.values():
        live.setdefault(tar, set()).add(key)
    return {tar: keys for tar, keys in live.items() if 2 * len(keys) < per_shard}


def compact(folder: Path, found: dict[str, list[str]], per_shard: int, first_shard: int, name: str) -> dict:
    """Copy the videos of the cache's shards that are less than half full of referenced videos into new shards
    ``first_shard``, ...: ``{item id: [tar name, key]}`` of those moved. Shards are never modified, so each build
    that re-decodes some videos adds a shard, and the old copies stay in theirs until no video there is referenced:
    a cache whose videos changed a few at a time grew without bound (to 2.3x its size, in 41 small shards, after
    40 builds of a 40-video set). After this, at most one shard is less than half full: the cache holds at most
    about twice its videos' frames. Copied, not decoded: the frames are the same bytes. A shard that cannot be
    read is left as it is, and a write that fails keeps only the shards already written."""
    sparse = sparse_shards(found, per_shard)
    if len(sparse) < 2:
        return {}
    item_of = {(tar, key): item_id for item_id, (tar, key) in found.items()}
    print(
        f"frame cache {name}: copying the {sum(map(len, sparse.values()))} videos of {len(sparse)} shards less than "
        "half full into new shards",
        file=sys.stderr,
    )
    moved: dict[str, list[str]] = {}
    pending: dict[str, list[str]] = {}
    writer, shard = None, first_shard
    try:
        for tar, keys in sorted(sparse.items()):
            for key, members in _readable_samples(folder / tar, keys, name):
                if writer is None:
                    writer = TarShardWriter(folder, shard)
                writer.add_sample(key, members)
                pending[item_of[(tar, key)]] = [writer.final.name, key]
                if writer.samples == per_shard:
                    writer.commit()
                    moved.update(pending)
                    writer, shard, pending = None, shard + 1, {}
        if writer is not None:
            writer.commit()
            moved.update(pending)
            writer = None
    except OSError as e:  # e.g. a full disk: the cache stays as it was decoded, a little larger
        print(f"frame cache {name}: could not copy into a new shard ({e}); left as it is", file=sys.stderr)
    finally:
        if writer is not None:
            writer.abort()
    return moved


def _readable_samples(path: Path, keys: set[str], name: str) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """``iter_tar_samples(path, keys)``, ending at a read error (a damaged or vanished shard) with a line that says
    so: what was copied of it stands, the rest stays where it is. Errors of the caller's writes are its own."""
    try:
        yield from iter_tar_samples(path, keys)
    except (tarfile.TarError, OSError) as e:
        print(f"frame cache {name}: left {path.name} as it is ({error_line(e)})", file=sys.stderr)


def decode_into_shards(
    items: list[Item],
    folder: Path,
    first_shard: int,
    settings: CacheSettings,
    workers: int,
    progress: bool,
    name: str,
    decode_timeout: float = 0,
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Decode ``items`` into new shards ``first_shard``, ... of ``folder``: ({id: [tar name, key]}, {id: reason});
    each video's decoding stops at ``decode_timeout`` seconds (0: no limit)."""
    found: dict[str, list[str]] = {}
    missing: dict[str, str] = {}
    writer, shard = None, first_shard
    bar = tqdm(total=len(items), desc=f"decoding {name}", unit="video", disable=not progress)

    def keep(result: tuple[str, list[tuple[str, bytes]] | None, str]) -> None:
        nonlocal writer, shard
        item_id, members, reason = result
        bar.update(1)
        if members is None:
            missing[item_id] = reason
            return
        if writer is None:
            writer = TarShardWriter(folder, shard)
        key = sample_key(item_id)
        writer.add_sample(key, members)
        found[item_id] = [writer.final.name, key]
        if writer.samples == settings.per_shard:
            writer.commit()
            writer, shard = None, shard + 1

    try:
        if items:
            # Always in worker processes, even for one video or --workers 1: a worker that dies on a video (a
            # decoder's segfault, the OOM killer) costs that video only (run_isolated). Decoded in this process, a
            # video that crashed its worker once was retried here by the next build, which it then killed, and
            # every build after it. With multiprocessing.Pool the build waited for a dead worker for ever, holding
            # the cache's lock.
            job = functools.partial(decode_item, decode_timeout=decode_timeout)  # looked up now: tests swap it
            for death in run_isolated(items, settings, min(workers, len(items)), keep, job, worker_context()):
                keep((death.task.id, None, stuck(settings.frames, decode_timeout) if death.stuck else crashed(death)))
        if writer is not None:
            writer.commit()
            writer = None
    finally:
        bar.close()
        if writer is not None:  # interrupted: no half-written tar is left behind
            writer.abort()
    return found, missing


def worker_context():
    """The multiprocessing context of ``build_cache``'s decoding workers: fork where there is one. A spawned worker
    re-imports the ``__main__`` module (eval.run: torch, open_clip, ~5 s each); forking before any model or tensor
    work exists is safe, and the workers only use PyAV and PIL."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _serves(items: list[Item], record: dict | None, plan: dict[str, str]) -> bool:
    """Whether the manifest ``record`` serves ``items`` as it is: there is one, nothing to decode (``plan``), and no
    item it lists is gone."""
    return record is not None and not plan and not _gone(items, record)


def _gone(items: list[Item], record: dict) -> bool:
    """Whether the manifest lists an item no longer among ``items`` (a video removed from eval.tag's folder): then
    it is written again without it, even with nothing to decode, and its frames are let go."""
    return bool((set(record["found"]) | set(record["missing"])) - {item.id for item in items})


def _load(folder: Path, record: dict) -> FrameCache:
    found = {k: (str(folder / Path(v[0]).name), v[1]) for k, v in record["found"].items()}
    return FrameCache(folder, found, dict(record["missing"]))
