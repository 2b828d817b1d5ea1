"""`python -m pipeline.subset`: a seeded subset copied byte for byte from complete shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_cli, with_a_sparse_member, write_csv

from pipeline import synthetic
from pipeline.subset import choose
from pipeline.writer import iter_tar_samples


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """20 videos sharded 6 per shard (4 shards, the last one short); one row fails."""
    root = tmp_path_factory.mktemp("subset")
    clip = synthetic.write_index_clip(root / "v" / "c.mp4", 30)
    rows = [[str(i), f"caption {i}", 0, "d", "PT1S", "v/c.mp4"] for i in range(20)]
    rows[7][5] = "v/missing.mp4"
    csv_path = write_csv(root / "webvid.csv", rows)
    out = root / "shards"
    run_cli(
        "pipeline.shard",
        "--src",
        csv_path,
        "--out",
        out,
        "--workers",
        1,
        "--samples_per_shard",
        6,
        "--size",
        32,
        "--progress",
        "False",
    )
    assert clip.exists()
    return out


def samples(folder):
    return [(key, members) for tar in sorted(folder.glob("*.tar")) for key, members in iter_tar_samples(tar)]


def test_choose_is_seeded_uniform_without_replacement():
    assert choose(100, 10, 0) == choose(100, 10, 0)
    assert choose(100, 10, 0) != choose(100, 10, 1)
    picked = choose(19, 19, 3)
    assert picked == list(range(19))


def test_same_seed_same_subset_and_bytes(source, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        run_cli("pipeline.subset", "--src", source, "--out", out, "--n", 7, "--seed", seed, "--samples_per_shard", 3)
    assert sorted(p.name for p in a.glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    assert {p.name: p.read_bytes() for p in a.glob("*.tar")} == {p.name: p.read_bytes() for p in b.glob("*.tar")}
    keys_a = [k for k, _ in samples(a)]
    assert keys_a != [k for k, _ in samples(c)]
    assert len(set(keys_a)) == 7 and "7" not in keys_a  # the failed video was never a sample
    manifest = json.loads((a / "subset.json").read_text())
    assert manifest["keys"] == keys_a and manifest["source_samples"] == 19
    # samples are byte-identical to the source's
    original = dict(samples(source))
    for key, members in samples(a):
        assert members == original[key]
    # the subset is a valid shard folder: stats mark every shard complete
    counts = [json.loads((a / f"{i:06d}_stats.json").read_text())["ok"] for i in range(3)]
    assert counts == [3, 3, 1]


def test_rerun_is_a_no_op_and_other_outputs_are_refused(source, tmp_path):
    out = tmp_path / "s"
    run_cli("pipeline.subset", "--src", source, "--out", out, "--n", 5)
    before = (out / "000000.tar").stat().st_mtime_ns
    proc = run_cli("pipeline.subset", "--src", source, "--out", out, "--n", 5)
    assert "nothing to do" in proc.stdout
    assert (out / "000000.tar").stat().st_mtime_ns == before
    proc = run_cli("pipeline.subset", "--src", source, "--out", out, "--n", 6, check=False)
    assert proc.returncode != 0 and "not empty" in proc.stderr
    from pipeline import subset

    (tmp_path / "a_file").write_text("notes")
    with pytest.raises(SystemExit) as e:
        subset.main(str(source), str(tmp_path / "a_file"), n=5)
    assert str(e.value) == f"error: --out {tmp_path / 'a_file'} is a file; give a new folder for the subset's shards"
    for damaged in ('{"src": ', "[1, 2]"):  # a damaged or foreign subset.json: refused as any non-empty --out
        (out / "subset.json").write_text(damaged)
        with pytest.raises(SystemExit, match="exists and is not empty; remove it or choose another folder"):
            subset.main(str(source), str(out), n=5)


def test_a_rerun_finds_its_subset_however_the_source_is_spelled_and_keeps_it_from_a_grown_source(
    source, tmp_path, monkeypatch, capsys
):
    from pipeline import subset

    src = tmp_path / "src"
    shutil.copytree(source, src)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s"
    subset.main("src", str(out), n=5)  # relative
    manifest = json.loads((out / "subset.json").read_text())
    assert manifest["src"] == str(src.resolve())
    before = (out / "000000.tar").stat().st_mtime_ns
    killed = tmp_path / ".s.tmp-0123456789ab"  # the temporary folder of a rerun that was killed part-way
    shutil.copytree(out, killed)
    os.utime(killed, (0, 0))  # long abandoned: its writer is gone and it is old
    for spelled in (str(src), f"{tmp_path}/./src/", "src"):
        subset.main(spelled, str(out), n=5)  # nothing to do: no error, nothing rewritten
    assert (out / "000000.tar").stat().st_mtime_ns == before and not killed.exists()
    index = json.loads((src / "shards.json").read_text())
    (src / "shards.json").write_text(json.dumps({**index, "finished": False}))  # pipeline.shard at work on it again
    subset.main(str(src), str(out), n=5)  # a launch script's rerun: kept, with a warning, no error
    assert "kept as it is; its source cannot be read now: the pipeline.shard run making" in capsys.readouterr().err
    (src / "shards.json").write_text(json.dumps(index))
    manifest["src"] = "src"  # a record from before records were absolute: taken from this working directory
    (out / "subset.json").write_text(json.dumps(manifest))
    subset.main(str(src), str(out), n=5)
    # the source gained a shard: the same arguments now draw another subset; the one there is kept, and named
    shutil.copy(src / "000000.tar", src / "000009.tar")
    shutil.copy(src / "000000_stats.json", src / "000009_stats.json")
    index = json.loads((src / "shards.json").read_text())
    (src / "shards.json").write_text(json.dumps({**index, "shards": 10}))  # as pipeline.shard of a longer CSV
    subset.main(str(src), str(out), n=5)
    assert (
        f"warning: {out} holds the subset of 5 drawn (seed 0) when {src} held 19 samples in 4 complete shard(s); it "
        "now holds 25 in 5, and would give another draw. The subset is kept as it is; remove --out to draw again"
    ) in capsys.readouterr().err
    assert (out / "000000.tar").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"n": True}, "error: --n must be a whole number of at least 1, got True"),
        (
            {"n": 0, "samples_per_shard": "many"},
            "error: --n must be a whole number of at least 1, got 0; "
            "--samples_per_shard must be a whole number of at least 1, got 'many'",
        ),
        ({"n": 5, "seed": True}, "error: --seed must be a whole number of at least 0, got True"),
    ],
)
def test_counts_are_refused_before_any_work(tmp_path, args, message):
    from pipeline import subset

    with pytest.raises(SystemExit) as e:
        subset.main(str(tmp_path / "no_source"), str(tmp_path / "s"), **args)
    assert str(e.value) == message
    assert not (tmp_path / "s").exists()


def test_a_killed_runs_temporary_folder_goes_on_the_next_run(source, tmp_path):
    """The subset is written into a hidden folder beside OUT and renamed: one left by a killed run (aged, unlocked)
    is removed when the subset is made again; nothing else beside OUT is touched."""
    import os
    import time

    from pipeline.writer import temporary_name

    out = tmp_path / "s"
    left = temporary_name(out)
    left.mkdir()
    (left / "000000.tar").write_bytes(b"half a shard")
    old = time.time() - 60
    os.utime(left, (old, old))
    (tmp_path / "notes").write_text("mine")
    run_cli("pipeline.subset", "--src", source, "--out", out, "--n", 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "s"]


def test_too_few_samples_fails_clearly(source, tmp_path):
    proc = run_cli("pipeline.subset", "--src", source, "--out", tmp_path / "s", "--n", 20, check=False)
    assert proc.returncode != 0
    assert "holds 19 samples" in proc.stderr and "cannot draw 20" in proc.stderr
    assert not (tmp_path / "s").exists()
    assert not list(tmp_path.glob(".*"))
    proc = run_cli("pipeline.subset", "--src", tmp_path / "none", "--out", tmp_path / "s", "--n", 2, check=False)
    assert proc.returncode != 0 and "not a directory" in proc.stderr


def test_only_complete_shards_are_used(source, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(source, partial)
    (partial / "000001_stats.json").unlink()  # shard 1 is not complete
    run_cli("pipeline.subset", "--src", partial, "--out", tmp_path / "s", "--n", 13)
    keys = {k for k, _ in samples(tmp_path / "s")}
    incomplete = {k for k, _ in iter_tar_samples(partial / "000001.tar")}
    assert len(keys) == 13 and not keys & incomplete


def test_a_damaged_source_shard_is_named_in_one_line(source, tmp_path):
    """A tar cut short (its _stats.json still there) gave tarfile's traceback."""
    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    tar = damaged / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:30000])
    proc = run_cli("pipeline.subset", "--src", damaged, "--out", tmp_path / "s", "--n", 19, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {tar} is damaged (") and "re-shard it" in proc.stderr
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".*"))


def test_a_sparse_member_in_a_source_shard_is_refused_in_one_line_without_reading_it(source, tmp_path):
    """A 10 KB member that declares a terabyte: subset read it into memory (a MemoryError traceback; at a few GB,
    a tar that size written to --out)."""
    tar = with_a_sparse_member(source, tmp_path / "sparse", declared=1 << 40)
    proc = run_cli("pipeline.subset", "--src", tmp_path / "sparse", "--out", tmp_path / "s", "--n", 19, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {tar} is damaged (member ") and "is a sparse file" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_only_the_chosen_samples_are_read_and_each_shard_up_to_its_last_chosen_one(source, tmp_path, monkeypatch):
    """Each shard holding a chosen sample was read to its end, every member's bytes: 4,500 samples drawn from 2,500
    shards read 83% of the folder. Now the others' data is skipped, and so is the rest of a shard after its last
    chosen sample: a shard damaged past it is not read there."""
    import tarfile

    from pipeline import subset

    per_sample, keys = len(samples(source)[0][1]), [k for k, _ in samples(source)]
    reads = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda tar, info: (reads.append(info.name), real(tar, info))[1])
    chosen = subset.choose(19, 4, 0)
    manifest = subset.make_subset(source, tmp_path / "s", 4, 0, 1000)
    assert len(reads) == 4 * per_sample and {name.split(".")[0] for name in reads} == set(manifest["keys"])

    # a shard cut short past its last chosen sample still gives that sample
    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    first = [n for n in chosen if n < 6]  # shard 0 holds samples 0-5
    assert first and max(first) < 5, chosen
    tar = damaged / "000000.tar"
    with tarfile.open(tar) as t:
        end = [m.offset_data + m.size for m in t.getmembers() if m.name.split(".")[0] == keys[max(first)]][-1]
    tar.write_bytes(tar.read_bytes()[: end + 1024])
    assert subset.make_subset(damaged, tmp_path / "s2", 4, 0, 1000)["keys"] == manifest["keys"]


def test_a_shard_with_fewer_samples_than_its_stats_say_is_refused(source, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(source, short)
    stats = short / "000001_stats.json"
    stats.write_text(json.dumps({**json.loads(stats.read_text()), "ok": 9}))  # the tar holds 5 (a video failed)
    proc = run_cli("pipeline.subset", "--src", short, "--out", tmp_path / "s", "--n", 22, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{short / '000001.tar'} has 5 samples but its stats say 9" in proc.stderr


def test_an_out_that_holds_the_current_folder_or_a_name_too_long_is_refused_in_one_line(source, tmp_path, monkeypatch):
    """``--out .`` in an empty folder ended in ValueError: PosixPath('.') has an empty name (the subset is built
    beside --out, then renamed to it); a 256-byte name in OSError: File name too long."""
    here = tmp_path / "here"
    here.mkdir()
    for out, says in (
        (".", "--out . holds the folder this command runs in"),
        ("x" * 256, "is 256 bytes, over the 255"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.subset", "--src", str(source), "--out", out, "--n", "2"],
            capture_output=True,
            text=True,
            cwd=here,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and says in proc.stderr, proc.stderr
        assert list(here.iterdir()) == []
