"""Shard writing: keys, deterministic tars, atomic files."""

from __future__ import annotations

import tarfile

import pytest

from pipeline.writer import (
    TarShardWriter,
    atomic_write_bytes,
    iter_tar_samples,
    remove_temporaries,
    sample_key,
    tar_path,
)


@pytest.mark.parametrize("videoid", ["1066674283", "abc_DEF-9"])
def test_safe_ids_are_their_own_key(videoid):
    assert sample_key(videoid) == videoid


@pytest.mark.parametrize("videoid", ["a.b", "../../etc/passwd", "/abs", "a b", "x" * 300, "ü", "a\\b", ".hidden"])
def test_unsafe_ids_become_safe_distinct_keys(videoid):
    key = sample_key(videoid)
    assert key and "." not in key and "/" not in key and "\\" not in key and len(key) <= 100
    assert key == sample_key(videoid)  # deterministic
    assert key != sample_key(videoid + "x")


def test_keys_collide_not_after_sanitising():
    ids = ["a.b", "a/b", "a b", "a_b", "a?b"]
    assert len({sample_key(i) for i in ids}) == len(ids)


def write(out, samples, shard=0):
    writer = TarShardWriter(out, shard)
    for key, members in samples:
        writer.add_sample(key, members)
    return writer.commit()


def test_tars_are_deterministic_and_round_trip(tmp_path):
    samples = [("k1", [("0.jpg", b"\xff\xd8a"), ("txt", "ü".encode())]), ("k2", [("0.jpg", b"b"), ("txt", b"c")])]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = write(tmp_path / "a", samples), write(tmp_path / "b", samples)
    assert a.read_bytes() == b.read_bytes()
    assert list(iter_tar_samples(a)) == samples
    with tarfile.open(a) as tar:
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())


def test_keys_with_dots_are_rejected(tmp_path):
    writer = TarShardWriter(tmp_path, 0)
    with pytest.raises(ValueError, match="no dots"):
        writer.add_sample("a.b", [("txt", b"x")])
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_aborted_shard_leaves_nothing_under_the_final_name(tmp_path):
    with pytest.raises(RuntimeError):
        with TarShardWriter(tmp_path, 5) as writer:
            writer.add_sample("k", [("txt", b"x")])
            raise RuntimeError("worker interrupted")
    assert not tar_path(tmp_path, 5).exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_and_cleanup(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    (tmp_path / ".000001.tar.tmp-abc").write_bytes(b"junk")
    assert [p.name for p in remove_temporaries(tmp_path)] == [".000001.tar.tmp-abc"]
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
