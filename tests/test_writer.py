"""Shard writing: keys, deterministic tars, atomic files."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pipeline.writer import (
    TarShardWriter,
    atomic_write_bytes,
    iter_tar_samples,
    remove_abandoned,
    remove_temporaries,
    sample_key,
    tar_path,
    temporary_name,
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
    # a folder's temporary inside it (pipeline.subset --out OUT/labeled, killed) is its own tool's to remove: it
    # crashed the next run here (IsADirectoryError)
    (tmp_path / ".labeled.tmp-0123456789ab").mkdir()
    assert [p.name for p in remove_temporaries(tmp_path)] == [".000001.tar.tmp-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".labeled.tmp-0123456789ab", "x.json"]


def test_a_shard_that_fails_to_write_leaves_no_temporary(tmp_path):
    """A full disk or a file-size limit: the error is raised, and the temporary goes (abort's close raised the
    error again while flushing, and the unlink after it never ran)."""
    script = (
        "import resource, sys\n"
        "from pipeline.writer import TarShardWriter\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
        "try:\n"
        f"    with TarShardWriter({str(tmp_path)!r}, 0) as writer:\n"
        "        for i in range(10):\n"
        "            writer.add_sample(f'k{i}', [('bin', bytes(3000))])\n"
        "        writer.commit()\n"
        "except OSError as e:\n"
        "    sys.exit(f'error {e.errno}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.stderr.strip() == "error 27" and list(tmp_path.iterdir()) == []


def _age(path, seconds=60.0):
    """Make ``path`` look ``seconds`` old, as a killed writer's temporary is by the rerun."""
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_only_a_killed_writers_temporaries_are_removed(tmp_path):
    """remove_abandoned needs no folder lock: each writer flocks its temporary, and the kernel lets go of a killed
    process's flock. A live writer's temporary, a young one, and other names stay."""
    target = tmp_path / "fitclip[1].pt"  # glob characters in the name: matched as text
    held = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time; from pipeline.writer import hold_temporary, temporary_name\n"
            f"tmp = temporary_name({str(target)!r}); f = open(tmp, 'wb'); hold_temporary(f.fileno())\n"
            "print(tmp, flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    live = Path(held.stdout.readline().strip())
    dead_folder = temporary_name(target)
    dead_folder.mkdir()
    (dead_folder / "000000.tar").write_bytes(b"half a subset")
    dead_file, young = temporary_name(target), temporary_name(target)
    dead_file.write_bytes(b"half a model")
    young.write_bytes(b"just opened")
    other = [tmp_path / ".other.pt.tmp-0123456789ab", tmp_path / "fitclip1.pt", tmp_path / ".fitclip[1].pt"]
    for path in other:
        path.write_bytes(b"not ours")
    for path in (live, dead_folder, dead_file, *other):
        _age(path)
    try:
        assert sorted(remove_abandoned(target)) == sorted([dead_folder, dead_file])
        assert live.exists() and young.exists() and all(path.exists() for path in other)
        held.kill()
        held.wait()
        deadline = time.monotonic() + 5  # the kernel lets go of a dead process's flock within milliseconds
        while not (removed := remove_abandoned(target)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert removed == [live]  # its lock went with the process
    finally:
        held.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, *(p.name for p in other)])


def test_a_writer_holds_its_temporary_until_the_rename(tmp_path, monkeypatch):
    """atomic_write_bytes locks its temporary: a run cleaning up beside it meanwhile leaves it."""
    import pipeline.writer as writer

    target = tmp_path / "tags.csv"
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        _age(src)
        seen.append(remove_abandoned(target))
        real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", replace)
    atomic_write_bytes(target, b"video,label\n")
    assert seen == [[]] and target.read_bytes() == b"video,label\n"


def test_a_held_folder_is_let_go_when_its_process_dies_though_a_forked_child_lives(tmp_path):
    """A decode or loader worker forked while a run holds its temporary folder must not keep holding it: the run
    killed, its orphaned worker still alive, the folder counts as abandoned."""
    target = tmp_path / "subset"
    script = (
        "import os, sys, time; from pipeline.writer import held_temporary_folder\n"
        f"with held_temporary_folder({str(target)!r}) as tmp:\n"
        "    os.utime(tmp, (0, 0))\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        time.sleep(120); os._exit(0)\n"
        "    print(tmp, child, flush=True); time.sleep(120)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    folder, child = run.stdout.readline().split()
    try:
        assert remove_abandoned(target) == []  # its run holds it
        run.kill()
        run.wait()
        deadline = time.monotonic() + 5
        while not (removed := remove_abandoned(target)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert removed == [Path(folder)]  # though the forked child lives on
        os.kill(int(child), 0)  # (it does)
    finally:
        run.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child), 9)


@pytest.mark.parametrize("kind", ["sparse", "too big", "no key", "in a folder", "twice"])
def test_a_member_pipeline_shard_never_writes_is_refused_before_its_data_is_read(tmp_path, monkeypatch, kind):
    """A sparse member's header declares a size that tarfile fills with zeros in memory: a 10 KB tar read as
    terabytes. An oversized one is read whole; one named ``.0.jpg`` has no sample key (pipeline.subset's writer
    raised a ValueError traceback on it). ``x/b.txt`` then ``y/b.0.jpg`` were one sample, by their file names (a
    caption paired with another folder's frames), and a second ``b.txt`` replaced the first."""
    from pipeline import writer

    monkeypatch.setattr(writer, "MAX_MEMBER_BYTES", 1000)
    path = tmp_path / "000000.tar"
    second = {"no key": ".0.jpg", "in a folder": "y/b.0.jpg", "twice": "b.txt"}.get(kind, "b.0.jpg")
    first = {"in a folder": "x/b.txt", "twice": "b.txt"}.get(kind, "b.txt")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("a.txt", b"good"), (first, b"b"), (second, b"x" * 10)]:
            info = tarfile.TarInfo(name)
            info.size = len(data) if kind != "too big" or name != second else 1001
            if kind == "sparse" and name == second:  # PAX 0.0 sparse headers: 10 bytes stored, 1 TB declared
                info.pax_headers = {
                    "GNU.sparse.size": str(1 << 40),
                    "GNU.sparse.numblocks": "1",
                    "GNU.sparse.offset": "0",
                    "GNU.sparse.numbytes": "10",
                }
            tar.addfile(info, io.BytesIO(data + b"x" * (info.size - len(data))))
    given = []
    with pytest.raises(writer.NotAShardError, match="not a tar pipeline.shard wrote") as e:
        for key, _ in iter_tar_samples(path):
            given.append(key)
    assert isinstance(e.value, tarfile.TarError)  # readers take it as a damaged tar
    assert given == (["a", "b"] if kind == "no key" else ["a"])  # the whole samples before it, not its own
    says = {
        "sparse": "is a sparse file",
        "too big": "is too big",
        "no key": "without a sample key",
        "in a folder": "'x/b.txt' is in a folder",
        "twice": "'b.txt' is a second .txt of its sample",
    }
    assert says[kind] in str(e.value)


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_a_2_kb_tar_whose_header_declares_a_terabyte_is_refused_by_every_reader(tmp_path, kind, caplog):
    """tarfile reads a long name's (GNU) or an extended header's (PAX) payload in one read of its declared size, before
    any member is seen: a MemoryError ended the trainer's stream (webdataset's reader had counted it and gone on),
    pipeline.subset and the eval frame cache."""
    from pipeline import writer
    from train import data

    header = tarfile.TarInfo._create_header(
        {
            "name": "././@LongLink",
            "mode": 0,
            "uid": 0,
            "gid": 0,
            "size": 1 << 40,
            "mtime": 0,
            "chksum": 0,
            "type": kind,
            "linkname": "",
            "uname": "",
            "gname": "",
            "devmajor": 0,
            "devminor": 0,
            "prefix": "",
        },
        tarfile.GNU_FORMAT,
        "utf-8",
        "surrogateescape",
    )
    path = tmp_path / "000000.tar"
    path.write_bytes(header + b"a.txt\0".ljust(512, b"\0") + bytes(1024))
    with pytest.raises(writer.NotAShardError, match="a header or member of 1,099,511,627,776 bytes"):
        list(iter_tar_samples(path))
    assert list(data._shard_samples(iter([{"url": str(path)}]))) == []  # counted as broken, the stream goes on
    assert list(data._tar_samples(str(path))) == []  # the labeled and validation index: a damaged tar, warned of
    assert "a header or member of 1,099,511,627,776 bytes" in caplog.text


def test_a_path_whose_bytes_are_not_utf8_is_written_as_json_that_reads_back_as_it(tmp_path):
    """``caf\\xe9.mp4`` (Latin-1 on disk) is ``caf\\udce9.mp4`` to Python: json_bytes failed on it with a
    UnicodeEncodeError that stopped pipeline.shard, eval.tag and train.main."""
    import json

    from pipeline.writer import json_bytes

    name = os.fsdecode(b"caf\xe9.mp4")
    data = json_bytes({"video": name})
    assert data.decode("utf-8") == '{\n "video": "caf\\udce9.mp4"\n}\n'  # valid UTF-8, the surrogate escaped
    assert os.fsencode(json.loads(data)["video"]) == b"caf\xe9.mp4"


def test_a_temporary_of_a_name_near_the_longest_a_name_may_be_fits_and_is_found_again(tmp_path):
    """``.NAME.tmp-<12 hex>`` of a 247-character name is 265 bytes, over NAME_MAX: train.fuse and eval.tag failed
    at their temporary after the work ("File name too long"). Its start and a hash of it stand in for the name."""
    final = tmp_path / ("é" * 120 + "x.pt")  # 245 bytes in UTF-8
    atomic_write_bytes(final, b"weights")
    assert final.read_bytes() == b"weights"
    tmp = temporary_name(final)
    assert len(os.fsencode(tmp.name)) <= 255 and tmp.parent == tmp_path
    tmp.write_bytes(b"left by a killed writer")
    os.utime(tmp, (time.time() - 60, time.time() - 60))
    assert remove_abandoned(final) == [tmp] and not tmp.exists()
    assert temporary_name(tmp_path / "short.pt").name.startswith(".short.pt.tmp-")  # short names as they were
