"""The frame cache: decoded once, reused, and decoded again only where a video changed on disk or failed oddly."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from crash_jobs import stuck_in_one_call
from PIL import Image

from eval import frame_cache
from eval.datasets.base import RETRIEVAL, EvalDataset, Item
from eval.frame_cache import CacheSettings, build_cache
from pipeline import board, synthetic
from pipeline.time_limit import limit_of, took_too_long
from pipeline.writer import TarShardWriter, iter_tar_samples


def dataset(folder: Path) -> EvalDataset:
    items = [Item(id=name, video=str(folder / f"{name}.mp4"), text=name) for name in ("kept", "late", "fixed")]
    return EvalDataset("toy", RETRIEVAL, items)


def written_dataset(folder: Path) -> EvalDataset:
    """``dataset(folder)``, each of its three videos written there (30 frames)."""
    for name in ("kept", "late", "fixed"):
        synthetic.write_index_clip(folder / f"{name}.mp4", 30)
    return dataset(folder)


def first_frame_index(cache: frame_cache.FrameCache, item_id: str) -> int:
    tar, key = cache.found[item_id]
    with tarfile.open(tar) as t:
        return synthetic.read_frame_index(Image.open(io.BytesIO(t.extractfile(f"{key}.0.jpg").read())))


def frames_of(cache: frame_cache.FrameCache, item_id: str) -> list[bytes]:
    """The bytes of an item's files in the cache (its JPEGs and its json), in file order."""
    tar, key = cache.found[item_id]
    return [data for _, data in dict(iter_tar_samples(tar))[key]]


class Calls:
    """The ids that decode_item was called for, in call order, in whichever process (a line each in a file)."""

    def __init__(self, path: Path):
        self.path = path

    def add(self, item_id: str) -> None:
        with open(self.path, "a") as f:  # one short append per call: whole lines, from every worker process
            f.write(item_id + "\n")

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def __iter__(self):
        return iter(self.path.read_text().splitlines() if self.path.exists() else [])

    def __eq__(self, other) -> bool:
        return list(self) == other


_calls: Calls | None = None  # the running test's, inherited by the build's forked workers
_real_decode_item = frame_cache.decode_item


def _spy(item, settings, decode_timeout=0):  # at module level: the worker pool pickles the function it runs by its name
    _calls.add(item.id)
    return _real_decode_item(item, settings, decode_timeout)


@pytest.fixture
def decoded(monkeypatch, tmp_path) -> Calls:
    """The ids decode_item is called for, in the build's worker processes."""
    monkeypatch.setattr(sys.modules[__name__], "_calls", Calls(tmp_path / "decode_calls.txt"))
    monkeypatch.setattr(frame_cache, "decode_item", _spy)
    return _calls


def build(ds: EvalDataset, root: Path) -> frame_cache.FrameCache:
    return build_cache(ds, root, CacheSettings(), workers=1, progress=False)


def test_only_changed_videos_are_decoded_again(tmp_path, decoded, capsys):
    videos, root = tmp_path / "videos", tmp_path / "cache"
    synthetic.write_index_clip(videos / "kept.mp4", 30)
    synthetic.write_index_clip(videos / "fixed.mp4", 30)
    ds = dataset(videos)
    first = build(ds, root)
    assert first.missing == {"late": frame_cache.MISSING_FILE} and first_frame_index(first, "fixed") == 3
    old_shard = Path(first.found["kept"][0]).read_bytes()

    synthetic.write_index_clip(videos / "late.mp4", 30)  # the user downloads the missing video
    synthetic.write_index_clip(videos / "fixed.mp4", 60)  # and replaces a bad one
    os.utime(videos / "fixed.mp4", ns=(1, 1))  # a new stamp even on a file system with coarse mtimes
    decoded.clear()
    second = build(ds, root)
    assert second.folder == first.folder  # same settings and item list: same folder
    assert sorted(decoded) == ["fixed", "late"]  # "kept" is reused without decoding
    assert second.missing == {} and set(second.found) == {"kept", "late", "fixed"}
    assert first_frame_index(second, "fixed") == 7  # the new file's frames (60 frames: midpoint 7), not the old
    assert frames_of(second, "kept") == frames_of(first, "kept")  # copied, not decoded: the same bytes
    assert Path(first.found["kept"][0]).read_bytes() == old_shard  # a reader of the old manifest still finds it
    # the two shards, each less than half full, are copied into one after the decoded one
    assert {Path(tar).name for tar, _ in second.found.values()} == {"000002.tar"}
    err = capsys.readouterr().err
    assert "re-decoding 2 of 3 videos" in err and "1 file appeared" in err and "1 file changed" in err
    assert "copying the 3 videos of 2 shards less than half full" in err

    decoded.clear()
    third = build(ds, root)
    assert decoded == [] and third.found == second.found
    assert "re-decoding" not in capsys.readouterr().err
    manifest = json.loads((third.folder / "manifest.json").read_text())
    assert manifest["version"] == frame_cache.CACHE_VERSION == 4
    assert manifest["stamps"]["fixed"] == [os.stat(videos / "fixed.mp4").st_size, 1]

    (videos / "kept.mp4").unlink()  # a video removed since: missing now, not served from stale frames
    assert build(ds, root).missing == {"kept": frame_cache.MISSING_FILE}


def test_a_folder_cache_decodes_added_videos_and_drops_removed_ones(tmp_path, decoded, capsys):
    """eval.tag's cache follows a folder of videos, not an item list: adding a video decodes that one only, and a
    removed video leaves the manifest instead of staying in it forever."""
    videos, root, settings = tmp_path / "videos", tmp_path / "cache", CacheSettings()

    def folder_build() -> frame_cache.FrameCache:
        items = [Item(id=p.name, video=str(p)) for p in sorted(videos.glob("*.mp4"))]
        folder = frame_cache.video_folder_cache(root, videos, settings)
        return build_cache(EvalDataset("tag", RETRIEVAL, items), root, settings, 1, False, folder=folder)

    for name, frames in (("a", 30), ("b", 60)):
        synthetic.write_index_clip(videos / f"{name}.mp4", frames)
    first = folder_build()
    assert sorted(decoded) == ["a.mp4", "b.mp4"] and first.folder.parent == root
    synthetic.write_index_clip(videos / "c.mp4", 90)
    decoded.clear()
    second = folder_build()
    assert decoded == ["c.mp4"] and second.folder == first.folder  # a grown folder keeps its cache
    assert "re-decoding 1 of 3 videos (1 new)" in capsys.readouterr().err
    assert first_frame_index(second, "c.mp4") == 11 and frames_of(second, "a.mp4") == frames_of(first, "a.mp4")

    (videos / "a.mp4").unlink()
    synthetic.write_index_clip(videos / "d.mp4", 30)
    decoded.clear()
    third = folder_build()
    assert decoded == ["d.mp4"] and set(third.found) == {"b.mp4", "c.mp4", "d.mp4"} and third.missing == {}
    manifest = json.loads((third.folder / "manifest.json").read_text())
    assert set(manifest["stamps"]) == set(manifest["found"]) == {"b.mp4", "c.mp4", "d.mp4"}
    assert frame_cache.video_folder_cache(root, videos / ".." / "videos", settings) == third.folder  # same folder
    assert frame_cache.video_folder_cache(root, videos, CacheSettings(size=256)) != third.folder

    (videos / "b.mp4").unlink()  # a removal alone, nothing to decode: it used to leave the manifest as it was
    decoded.clear()
    fourth = folder_build()
    assert decoded == [] and set(fourth.found) == {"c.mp4", "d.mp4"}
    assert set(json.loads((fourth.folder / "manifest.json").read_text())["found"]) == {"c.mp4", "d.mp4"}


def test_unexpected_errors_are_retried(tmp_path, decoded, monkeypatch, capsys):
    videos = tmp_path / "videos"
    ds = written_dataset(videos)
    real = frame_cache.decode_frames

    def flaky(path, *args, **kwargs):
        if Path(path).stem == "late":
            raise MemoryError("transient")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(frame_cache, "decode_frames", flaky)
    first = build(ds, tmp_path / "cache")
    assert first.missing["late"].startswith("unexpected_error: MemoryError")
    monkeypatch.setattr(frame_cache, "decode_frames", real)
    decoded.clear()
    second = build(ds, tmp_path / "cache")
    assert decoded == ["late"] and second.missing == {} and "late" in second.found
    assert "1 unexpected error before" in capsys.readouterr().err


def test_a_video_past_decode_timeout_is_stopped_and_decoded_again_only_with_more_time(
    tmp_path, decoded, monkeypatch, capsys
):
    """No benchmark video can hold a decoding worker for good: one past --decode_timeout is stopped in its worker (the
    real SIGALRM timer) and counted missing, with how to get it. A later build tries it again only under a longer
    limit (or none): under the same one it would spend that long again for nothing."""
    videos = tmp_path / "videos"
    ds = written_dataset(videos)
    real = frame_cache.decode_frames

    def stuck(path, *args, **kwargs):
        give_up = time.monotonic() + 20  # a demuxer going round in circles; for 20 s, so a broken limit fails
        while Path(path).stem == "late" and time.monotonic() < give_up:
            pass
        return real(path, *args, **kwargs)

    def build_within(seconds: float) -> frame_cache.FrameCache:
        decoded.clear()
        return build_cache(ds, tmp_path / "cache", CacheSettings(), 2, False, decode_timeout=seconds)

    monkeypatch.setattr(frame_cache, "decode_frames", stuck)
    first = build_within(2)
    assert set(first.found) == {"kept", "fixed"} and list(first.missing) == ["late"]
    assert first.missing["late"].startswith("decode_timeout: decoding its 4 frames took more than 2 s")
    assert frame_cache.MORE_TIME in first.missing["late"]
    said = "frame cache toy: 1 video(s) ran past their decode time limit and are left out as missing (e.g. late: "
    assert f"{said}more than 2 s); {frame_cache.MORE_TIME}" in capsys.readouterr().err
    for same_or_less in (2, 0.25):
        assert build_within(same_or_less).missing == first.missing and decoded == []
        assert said in capsys.readouterr().err  # a rerun that keeps it out says so again
    monkeypatch.setattr(frame_cache, "decode_frames", real)
    assert build_within(60).missing == {} and decoded == ["late"]
    assert "1 more time to decode" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_video_stuck_in_one_call_is_ended_and_decoded_again_only_with_more_time(
    tmp_path, decoded, monkeypatch, capsys
):
    """A call into FFmpeg that never returns to Python (so the limit's timer cannot stop it) held the build, and the
    cache's lock, for ever. Its worker is ended a grace after the limit; the video is a timeout like any other."""
    videos = tmp_path / "videos"
    ds = written_dataset(videos)
    real = frame_cache.decode_frames

    def stuck(path, *args, **kwargs):
        if Path(path).stem == "late":
            stuck_in_one_call()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(board, "GRACE_S", 0.5)  # the forked workers take it
    monkeypatch.setattr(frame_cache, "decode_frames", stuck)
    built = build_cache(ds, tmp_path / "cache", CacheSettings(), 2, False, decode_timeout=1)
    assert set(built.found) == {"kept", "fixed"} and list(built.missing) == ["late"]
    assert built.missing["late"] == frame_cache.stuck(4, 1) and limit_of(built.missing["late"]) == 1
    assert "stuck inside one call into FFmpeg 0.5 s later" in built.missing["late"]
    assert "1 video(s) ran past their decode time limit" in capsys.readouterr().err
    monkeypatch.setattr(frame_cache, "decode_frames", real)
    decoded.clear()
    assert build_cache(ds, tmp_path / "cache", CacheSettings(), 2, False, decode_timeout=1).missing == built.missing
    assert decoded == []
    assert build_cache(ds, tmp_path / "cache", CacheSettings(), 2, False, decode_timeout=5).missing == {}
    assert decoded == ["late"]


def test_a_decode_timeout_is_planned_again_under_a_longer_limit_or_none():
    timed_out = f"decode_timeout: {took_too_long(4, 1e-06)}; {frame_cache.MORE_TIME}"
    other = "undecodable: the demuxer took more than 5 s"  # the words, but not a decode_timeout
    assert limit_of(timed_out) == 1e-06 and limit_of(other) is None
    items = [Item(id=i, video=f"{i}.mp4") for i in "ab"]
    record = {"found": {}, "missing": {"a": timed_out, "b": other}, "stamps": {"a": [1, 1], "b": [1, 1]}}
    now = {"a": [1, 1], "b": [1, 1]}
    for limit, planned in ((1e-06, False), (1e-07, False), (2e-06, True), (0, True)):
        plan = frame_cache.plan_decode(items, record, now, set(), limit)
        assert plan == ({"a": "more time to decode"} if planned else {}), limit
    # the limit is written to 6 digits: the same limit, read back shorter, is not "longer now"
    record["missing"]["a"] = f"decode_timeout: {took_too_long(4, 12345.64)}"
    assert limit_of(record["missing"]["a"]) == 12345.6
    assert frame_cache.plan_decode(items, record, now, set(), 12345.64) == {}
    assert frame_cache.plan_decode(items, record, now, set(), 12345.66) == {"a": "more time to decode"}


def test_manifest_without_stamps_is_not_trusted(tmp_path, decoded, capsys):
    videos = tmp_path / "videos"
    synthetic.write_index_clip(videos / "kept.mp4", 30)
    ds = dataset(videos)
    first = build(ds, tmp_path / "cache")
    manifest = first.folder / "manifest.json"
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: old[k] for k in ("dataset", "settings", "found", "missing")}))  # version 1
    decoded.clear()
    build(ds, tmp_path / "cache")
    assert sorted(decoded) == ["fixed", "kept", "late"]
    assert "older cache version" in capsys.readouterr().err
    assert "stamps" in json.loads(manifest.read_text())


def test_a_cache_of_an_older_version_is_named_where_the_new_one_is_built(tmp_path, decoded, capsys):
    """A new cache version names a new folder: the old cache was decoded again without a word, and stayed on disk
    (for Moments in Time, gigabytes), where it is now named, with how to free its space."""
    videos = tmp_path / "videos"
    synthetic.write_index_clip(videos / "kept.mp4", 30)
    ds = dataset(videos)
    first = build(ds, tmp_path / "cache")
    old = first.folder.with_name(f"{ds.name}-0123456789ab")  # as an older version named it
    first.folder.rename(old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "version": frame_cache.CACHE_VERSION - 1}))
    capsys.readouterr()
    decoded.clear()
    build(ds, tmp_path / "cache")
    assert sorted(decoded) == ["fixed", "kept", "late"]
    err = capsys.readouterr().err
    version = frame_cache.CACHE_VERSION
    assert f"frame cache {ds.name}: {old} is a cache made by an older version (cache version {version - 1}, now " in err
    assert f"remove {old} to free its space" in err
    build(ds, tmp_path / "cache")  # once: the new cache serves it
    assert "older version" not in capsys.readouterr().err


def test_plan_decode_reasons():
    items = [Item(id=i, video=f"{i}.mp4") for i in "abcdef"]
    record = {
        "found": {"a": ["000000.tar", "a"], "b": ["000000.tar", "b"], "e": ["000001.tar", "e"]},
        "missing": {"c": "missing_file", "d": "unexpected_error: OSError: busy", "f": "undecodable: bad"},
        "stamps": {"a": [1, 1], "b": [1, 1], "c": None, "d": [1, 1], "e": [1, 1], "f": [1, 1]},
    }
    now = {"a": [1, 1], "b": [2, 1], "c": [1, 2], "d": [1, 1], "e": [1, 1], "f": [1, 1]}
    plan = frame_cache.plan_decode(items, record, now, {"000000.tar"})
    assert plan == {"b": "file changed", "c": "file appeared", "d": "unexpected error before", "e": "cache shard gone"}
    assert frame_cache.plan_decode(items, None, now, set()) == {i: "new" for i in "abcdef"}
    assert frame_cache.next_shard(record) == 2 and frame_cache.next_shard(None) == 0


def test_shards_no_manifest_of_the_last_two_builds_references_are_deleted(tmp_path, decoded):
    """A reader holding the manifest a build replaces still finds its shards; older ones, and a killed build's
    leftovers, go."""
    videos, root = tmp_path / "videos", tmp_path / "cache"
    ds = written_dataset(videos)
    one = CacheSettings(per_shard=1)  # a shard per video: re-decoding one leaves its old shard unreferenced
    first = build_cache(ds, root, one, workers=1, progress=False)
    shards = {item: Path(tar).name for item, (tar, _) in first.found.items()}
    assert shards == {"kept": "000000.tar", "late": "000001.tar", "fixed": "000002.tar"}
    (first.folder / "000009.tar").write_bytes(b"a killed build's shard")
    (first.folder / ".000010.tar.tmp-deadbeef").write_bytes(b"and its temporary file")
    untouched = os.stat(first.folder / shards["kept"]).st_mtime_ns

    assert build_cache(ds, root, one, workers=1, progress=False).found == first.found  # nothing stale: no clean-up
    assert (first.folder / "000009.tar").exists()

    for generation, frames in enumerate((60, 90), start=1):  # "fixed" replaced twice
        synthetic.write_index_clip(videos / "fixed.mp4", frames)
        os.utime(videos / "fixed.mp4", ns=(generation, generation))
        cache = build_cache(ds, root, one, workers=1, progress=False)
        present = sorted(p.name for p in cache.folder.iterdir() if p.name != ".lock")
        if generation == 1:  # the shard the replaced manifest references stays; the killed build's go
            assert present == ["000000.tar", "000001.tar", "000002.tar", "000003.tar", "manifest.json"]
        else:  # "fixed"'s first shard is two manifests old now
            assert present == ["000000.tar", "000001.tar", "000003.tar", "000004.tar", "manifest.json"]
        assert first_frame_index(cache, "fixed") == frames // 8
    assert os.stat(first.folder / shards["kept"]).st_mtime_ns == untouched


def test_a_cache_whose_videos_change_a_few_at_a_time_stays_compact(tmp_path, decoded, capsys):
    """Each build that re-decodes a video writes a shard; the old copy stayed in its shard until no video there was
    referenced: 40 builds of a 40-video set made the cache 2.3x its size, in 41 shards. Shards less than half full
    are now copied together: at most one is left after a build, and the frames are the same bytes."""
    videos, root, settings = tmp_path / "videos", tmp_path / "cache", CacheSettings(per_shard=4)
    names = [f"v{i}" for i in range(6)]
    for name in names:
        synthetic.write_index_clip(videos / f"{name}.mp4", 30)
    ds = EvalDataset("toy", RETRIEVAL, [Item(id=n, video=str(videos / f"{n}.mp4"), text=n) for n in names])
    first = build_cache(ds, root, settings, workers=1, progress=False)
    reference = {name: frames_of(first, name) for name in names}
    for generation in range(1, 13):  # one video changes before each build, round the set twice
        changed = names[generation % len(names)]
        os.utime(videos / f"{changed}.mp4", ns=(generation, generation))
        decoded.clear()
        cache = build_cache(ds, root, settings, workers=1, progress=False)
        assert decoded == [changed]
        live: dict[str, int] = {}
        for tar, _ in cache.found.values():
            live[tar] = live.get(tar, 0) + 1
        assert sum(2 * n < settings.per_shard for n in live.values()) <= 1, live  # at most one shard less than half
        assert {name: frames_of(cache, name) for name in names} == reference  # same clip, same frames
        # the shards of this manifest and of the one it replaced: a bounded number, not one more per build
        assert len(frame_cache.existing_shards(cache.folder)) <= 2 * len(live), generation
    assert "copying the" in capsys.readouterr().err


def test_compaction_leaves_an_unreadable_shard_and_a_failed_write_as_they_are(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "cache"
    folder.mkdir()
    for shard, keys in ((0, ["a"]), (1, ["b"]), (2, ["c"])):
        with TarShardWriter(folder, shard) as writer:
            for key in keys:
                writer.add_sample(key, [("0.jpg", key.encode() * 3), ("json", b"{}")])
            writer.commit()
    (folder / "000001.tar").write_bytes(b"not a tar" * 200)  # damaged since
    (folder / "000003.tar").mkdir()  # a read that fails with an OSError (it stopped every copy)
    found = {"a": ["000000.tar", "a"], "b": ["000001.tar", "b"], "c": ["000002.tar", "c"], "d": ["000009.tar", "d"]}
    found["e"] = ["000003.tar", "e"]
    moved = frame_cache.compact(folder, found, 4, 10, "toy")
    assert moved == {"a": ["000010.tar", "a"], "c": ["000010.tar", "c"]}  # b (damaged), e and d (gone) stay
    said = capsys.readouterr().err
    assert "left 000001.tar as it is (ReadError" in said and "left 000003.tar as it is (IsADirectoryError" in said
    assert "left 000009.tar as it is (FileNotFoundError" in said
    assert dict(iter_tar_samples(folder / "000010.tar")) == {
        "a": [("0.jpg", b"aaa"), ("json", b"{}")],
        "c": [("0.jpg", b"ccc"), ("json", b"{}")],
    }
    assert frame_cache.compact(folder, {"a": ["000000.tar", "a"]}, 4, 11, "toy") == {}  # one sparse shard: as is

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TarShardWriter, "add_sample", full)
    assert frame_cache.compact(folder, found, 4, 11, "toy") == {}
    assert "could not copy into a new shard" in capsys.readouterr().err
    assert not list(folder.glob(".*tmp*")) and not (folder / "000011.tar").exists()


def test_a_second_build_of_the_same_cache_waits_and_decodes_nothing_twice(tmp_path, decoded, capsys):
    import fcntl
    import threading

    videos = tmp_path / "videos"
    ds = written_dataset(videos)
    folder = frame_cache.cache_folder(tmp_path / "cache", ds, CacheSettings())
    folder.mkdir(parents=True)
    results = []
    with open(folder / ".lock", "w") as other_build:
        fcntl.flock(other_build, fcntl.LOCK_EX)
        waiting = threading.Thread(target=lambda: results.append(build(ds, tmp_path / "cache")))
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and decoded == []  # it waits for the lock before deciding what to decode
        stamps = {item.id: frame_cache.file_stamp(item.video) for item in ds.items}
        record = frame_cache._rebuild(ds, folder, CacheSettings(), stamps, 1, False, 0)  # "the other build" finishes
    waiting.join(timeout=60)
    assert not waiting.is_alive() and results[0].found == record.found
    assert sorted(decoded) == ["fixed", "kept", "late"]  # each once: the waiting build found them made
    assert "another run is building" in capsys.readouterr().err


@pytest.mark.timeout(120, method="thread")  # a hang ends the run (a SIGALRM does not reach a Pool wait)
def test_a_worker_that_dies_costs_its_video_only(tmp_path, monkeypatch):
    """A decoder that kills its process (a segfault, the OOM killer): multiprocessing.Pool never answered for the
    videos that worker held, and the build waited for ever, holding the cache's lock. Now that video is missing
    (retried by the next build) and every other is decoded."""
    videos = tmp_path / "videos"
    names = ("a", "b", "crash", "d", "e")
    for name in names:
        synthetic.write_index_clip(videos / f"{name}.mp4", 30)
    ds = EvalDataset("toy", RETRIEVAL, [Item(id=n, video=str(videos / f"{n}.mp4"), text=n) for n in names])
    real = frame_cache.decode_frames

    def crashing(path, *args, **kwargs):  # inherited by the forked workers
        if Path(path).stem == "crash":
            os._exit(9)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(frame_cache, "decode_frames", crashing)
    cache = build_cache(ds, tmp_path / "cache", CacheSettings(), workers=2, progress=False)
    assert set(cache.found) == {"a", "b", "d", "e"} and cache.missing == {
        "crash": f"{frame_cache.CRASHED}; it exited with code 9"
    }
    monkeypatch.setattr(frame_cache, "decode_frames", real)  # (the in-process build below would call it too)
    assert first_frame_index(cache, "e") == first_frame_index(build(ds, tmp_path / "again"), "e")
    assert set(build_cache(ds, tmp_path / "cache", CacheSettings(), workers=2, progress=False).found) == set(names)


CRASH_TWICE = """
import os, sys
from pathlib import Path
from eval import frame_cache
from eval.datasets.base import RETRIEVAL, EvalDataset, Item
videos, root, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
real = frame_cache.decode_frames
def crashing(path, *args, **kwargs):
    if Path(path).stem == "crash":
        os._exit(9)  # a decoder's segfault
    return real(path, *args, **kwargs)
frame_cache.decode_frames = crashing
items = [Item(id=p.stem, video=str(p), text=p.stem) for p in sorted(videos.glob("*.mp4"))]
for build in range(2):  # the second retries the one video that crashed, alone
    cache = frame_cache.build_cache(EvalDataset("toy", RETRIEVAL, items), root, workers=workers, progress=False)
    print(build, sorted(cache.found), cache.missing, flush=True)
"""


@pytest.mark.parametrize("workers", [1, 4])
def test_a_video_that_crashed_its_worker_is_retried_in_a_worker_again(tmp_path, workers):
    """The build after a crash decodes only that video; it decoded a lone video in its own process, so the crash
    killed that build, and every later one (the video was never recorded), with --workers 1 from the start."""
    videos = tmp_path / "videos"
    for name in ("a", "crash"):
        synthetic.write_index_clip(videos / f"{name}.mp4", 30)
    script = tmp_path / "crash_twice.py"
    script.write_text(CRASH_TWICE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(script), str(videos), str(tmp_path / "cache"), str(workers)]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    missing = {"crash": f"{frame_cache.CRASHED}; it exited with code 9"}
    assert proc.stdout.splitlines() == [f"{n} ['a'] {missing}" for n in range(2)], proc.stdout


def test_a_missing_video_added_as_another_file_type_decodes_only_it(tmp_path, decoded, capsys):
    """A missing video's path is its loader's guess (YouCook2: videos/<task>/<id>.mp4). The cache folder was named
    from the videos' paths, so adding the video as .mkv started a new cache, decoding every video again, and left
    the old one behind. A cache named the old way is adopted, not decoded again."""
    from eval.datasets import DATASETS
    from eval.datasets.fixtures import MISSING, write_clip, write_youcook2

    root, cache = tmp_path / "youcook2", tmp_path / "cache"
    write_youcook2(root)
    first = build(DATASETS["youcook2"](root), cache)
    gone = MISSING["youcook2"]
    assert first.missing == {gone: frame_cache.MISSING_FILE}
    write_clip(root / "videos" / "113" / f"{gone.rsplit('_', 1)[0]}.mkv", ["cyan"] * 2)
    decoded.clear()
    ds = DATASETS["youcook2"](root)
    second = build(ds, cache)
    assert second.folder == first.folder and decoded == [gone] and second.missing == {}
    assert "re-decoding 1 of 5 videos (1 file appeared)" in capsys.readouterr().err
    assert [p.name for p in cache.iterdir()] == [first.folder.name]

    old = frame_cache._by_video_paths(cache, ds, CacheSettings())  # as a build before the change named it
    second.folder.rename(old)
    decoded.clear()
    adopted = build(ds, cache)
    assert adopted.folder == first.folder and decoded == [] and adopted.found.keys() == second.found.keys()
    assert [p.name for p in cache.iterdir()] == [first.folder.name]


def test_a_windowed_item_caches_the_frames_of_its_window(videos, tmp_path):
    """YouCook2's clips are windows of their videos: an item's window must reach the decoder (frames 37 and 62 of
    the 1-3 s window of a 25 fps clip, not the whole clip's 25 and 75)."""
    items = [
        Item(id="clip", video=str(videos["idx100"]), text="a clip", window=(1.0, 3.0)),
        Item(id="whole", video=str(videos["idx100"]), text="the video"),
    ]
    cache = build_cache(EvalDataset("toy", RETRIEVAL, items), tmp_path, CacheSettings(frames=2), 1, progress=False)
    indices = {}
    for item_id in ("clip", "whole"):
        tar, key = cache.found[item_id]
        with tarfile.open(tar) as t:
            indices[item_id] = [
                synthetic.read_frame_index(Image.open(io.BytesIO(t.extractfile(f"{key}.{k}.jpg").read())))
                for k in range(2)
            ]
    assert indices == {"clip": [37, 62], "whole": [25, 75]}


def test_the_frames_read_back_refuse_a_header_that_declares_a_gigapixel(tmp_path):
    """Frames of a cache someone shared: each JPEG header is read before libjpeg allocates what it declares."""
    from torchvision.io import encode_jpeg

    from eval.features import iter_frames
    from eval.frame_cache import FrameCache

    jpeg = encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8)).numpy().tobytes()
    sof = jpeg.index(b"\xff\xc0")
    bomb = jpeg[: sof + 5] + (30000).to_bytes(2, "big") * 2 + jpeg[sof + 9 :]
    writer = TarShardWriter(tmp_path, 0)
    writer.add_sample("good", [(f"{k}.jpg", jpeg) for k in range(4)])
    writer.add_sample("bomb", [(f"{k}.jpg", bomb if k == 3 else jpeg) for k in range(4)])
    tar = str(writer.commit())
    cache = FrameCache(tmp_path, {"a": (tar, "good"), "b": (tar, "bomb")}, {})
    assert [item for item, _ in itertools.islice(iter_frames(cache, ["a", "b"], 4), 1)] == ["a"]
    with pytest.raises(ValueError, match="a frame over the 67,108,864 pixels .*900000000 pixels"):
        list(iter_frames(cache, ["a", "b"], 4))
