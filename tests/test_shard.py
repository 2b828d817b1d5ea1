"""`python -m pipeline.shard` end to end: output format, bad input, resume, determinism, escaping."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import webdataset as wds
from conftest import REPO, expected_indices, run_cli, write_csv

from pipeline import synthetic
from pipeline.writer import iter_tar_samples


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def stats(out: Path, shard: int = 0) -> dict:
    return json.loads((out / f"{shard:06d}_stats.json").read_text())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A CSV with good videos and every kind of bad row, plus the expected reason per videoid."""
    root = tmp_path_factory.mktemp("mixed")
    vids = root / "v"
    vids.mkdir()
    for i in range(3):
        synthetic.write_index_clip(vids / f"good{i}.mp4", 60 + 20 * i)
    synthetic.write_index_clip(vids / "short.mp4", 3)
    synthetic.write_audio_only(vids / "audio.m4a")
    (vids / "empty.mp4").write_bytes(b"")
    (vids / "text.mp4").write_text("not a video at all\n" * 50)
    full = (vids / "good0.mp4").read_bytes()
    (vids / "cut.mp4").write_bytes(full[: len(full) // 2])
    rows = [
        ["g0", "first, with a comma", 0, "d", "PT00H00M02S", "v/good0.mp4"],
        ["g1", "ünïcödé 🎬 and a\nnewline", 0, "d", "PT00H00M03S", str(vids / "good1.mp4")],  # absolute path
        ["missing", "x", 0, "d", "PT1S", "v/nope.mp4"],
        ["empty", "x", 0, "d", "PT1S", "v/empty.mp4"],
        ["text", "x", 0, "d", "PT1S", "v/text.mp4"],
        ["cut", "x", 0, "d", "PT1S", "v/cut.mp4"],
        ["audio", "x", 0, "d", "PT1S", "v/audio.m4a"],
        ["short", "x", 0, "d", "PT1S", "v/short.mp4"],
        ["nocap", "", 0, "d", "PT1S", "v/good0.mp4"],
        ["g0", "duplicate id", 0, "d", "PT1S", "v/good2.mp4"],
        ["../escape", "crafted id", 0, "d", "PT1S", "v/good2.mp4"],
        ["/abs/id", "crafted id 2", 0, "d", "PT1S", "v/good2.mp4"],
    ]
    csv_path = write_csv(root / "webvid.csv", rows)
    with open(csv_path, "a", encoding="utf-8") as f:
        f.write("short,row\n")
    expected = {
        "missing": "missing_file",
        "empty": "empty_file",
        "text": "undecodable",
        "cut": "undecodable",
        "audio": "audio_only",
        "short": "too_few_frames",
        "nocap": "empty_caption",
        "g0": "duplicate_videoid",
        "": "malformed_row",
    }
    return csv_path, expected


def test_output_format_and_failure_reasons(mixed, tmp_path):
    csv_path, expected = mixed
    out = tmp_path / "out"
    before = set(tmp_path.parent.rglob("*"))
    proc = run_cli(
        "pipeline.shard",
        "--src",
        csv_path,
        "--out",
        out,
        "--workers",
        2,
        "--samples_per_shard",
        5,
        "--size",
        64,
        "--progress",
        "False",
    )
    assert "ok" in proc.stdout and "videos/s" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "000000.tar",
        "000000_stats.json",
        "000001.tar",
        "000001_stats.json",
        "000002.tar",
        "000002_stats.json",
        "shards.json",
    ]
    assert json.loads((out / "shards.json").read_text())["shards"] == 3
    # nothing written outside OUT, whatever the ids say
    assert {p for p in set(tmp_path.parent.rglob("*")) - before if out not in p.parents and p != out} == set()

    all_stats = [stats(out, i) for i in range(3)]
    assert [s["count"] for s in all_stats] == [5, 5, 3]
    failures = {f["videoid"]: f["reason"] for s in all_stats for f in s["failures"]}
    assert failures == expected
    for s in all_stats:
        assert s["ok"] + sum(s["failed"].values()) == s["count"]
        assert all(f["detail"] for f in s["failures"])

    samples = list(wds.WebDataset(str(out / "{000000..000002}.tar"), shardshuffle=False).decode("pil"))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == 4 and keys[:2] == ["g0", "g1"]
    assert all("." not in k and "/" not in k for k in keys)
    g0, g1 = samples[0], samples[1]
    assert g0["txt"] == "first, with a comma"
    assert g1["txt"] == "ünïcödé 🎬 and a\nnewline"
    assert [synthetic.read_frame_index(g0[f"{k}.jpg"]) for k in range(4)] == expected_indices(60, 25)
    assert [synthetic.read_frame_index(g1[f"{k}.jpg"]) for k in range(4)] == expected_indices(80, 25)
    assert g1["0.jpg"].size == (107, 64)
    meta = g1["json"]
    assert meta["videoid"] == "g1" and meta["source"] == str(csv_path.parent / "v" / "good1.mp4")
    assert meta["duration"] == pytest.approx(3.2)
    assert meta["timestamps"] == pytest.approx([0.4, 1.2, 2.0, 2.8])
    assert (meta["width"], meta["height"]) == (160, 96)
    # the caption bytes are exactly the CSV's
    _, members = next(iter_tar_samples(out / "000000.tar"))
    assert dict(members)["txt"] == b"first, with a comma"

    # tar metadata is fixed; the CLI `tar` reads the shard
    with tarfile.open(out / "000000.tar") as tar:
        infos = tar.getmembers()
    assert {(i.mtime, i.uid, i.gid, i.mode) for i in infos} == {(0, 0, 0, 0o644)}
    assert [i.name for i in infos[:6]] == ["g0.0.jpg", "g0.1.jpg", "g0.2.jpg", "g0.3.jpg", "g0.json", "g0.txt"]
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "tf", out / "000000.tar"], capture_output=True, text=True, check=True)
        assert listing.stdout.split() == [i.name for i in infos]


def test_video_root_layout(tmp_path):
    root = tmp_path / "mirror"
    synthetic.write_index_clip(root / "00001_00050" / "123.mp4", 40)
    synthetic.write_index_clip(root / "00051_00100" / "456.mp4", 40)
    csv_path = write_csv(
        tmp_path / "w.csv",
        [
            ["123", "a", 0, "00001_00050", "PT1S", "https://gone.invalid/1.mp4"],
            ["456", "b", 0, "00051_00100", "PT1S", ""],
            ["789", "c", 0, "00051_00100", "PT1S", ""],
        ],
    )
    out = tmp_path / "out"
    run_cli(
        "pipeline.shard", "--src", csv_path, "--out", out, "--video_root", root, "--workers", 1, "--progress", "False"
    )
    s = stats(out)
    assert (s["ok"], s["failed"]) == (2, {"missing_file": 1})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--src", "nope.csv"], "CSV not found"),
        (["--src", "{csv}", "--id_col", "vid"], "--id_col"),
        (["--src", "{csv}", "--workers", 0], "--workers"),
        (["--src", "{csv}", "--frames", -1], "--frames"),
        (["--src", "{csv}", "--distributor", "dask"], "--distributor"),
        (["--src", "{csv}", "--video_root", "/does/not/exist"], "--video_root"),
        (["--src", "{csv}", "--retry_failed", "yes"], "--retry_failed must be True or False"),
        (["--src", "{csv}", "--progress", "no"], "--progress must be True or False"),
        (["--src", "{noheader}"], "missing column"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, args, message):
    csv_path = write_csv(tmp_path / "w.csv", [["1", "a", 0, "d", "PT1S", "x.mp4"]])
    noheader = tmp_path / "n.csv"
    noheader.write_text("1,a,0,d,PT1S,x.mp4\n")
    out = tmp_path / "out"
    args = [str(a).format(csv=csv_path, noheader=noheader) for a in args]
    proc = run_cli("pipeline.shard", *args, "--out", out, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """12 good videos in a CSV, and a reference output made in one uninterrupted run."""
    root = tmp_path_factory.mktemp("many")
    rows = []
    for i in range(12):
        synthetic.write_index_clip(root / "v" / f"{i}.mp4", 30 + 5 * i)
        rows.append([str(i), f"caption {i}", 0, "d", "PT1S", f"v/{i}.mp4"])
    csv_path = write_csv(root / "webvid.csv", rows)
    ref = root / "ref"
    run_cli(
        "pipeline.shard",
        "--src",
        csv_path,
        "--out",
        ref,
        "--workers",
        1,
        "--samples_per_shard",
        3,
        "--size",
        64,
        "--progress",
        "False",
    )
    return csv_path, ref


def test_same_input_gives_byte_identical_tars(many, tmp_path):
    csv_path, ref = many
    out = tmp_path / "out"
    run_cli(
        "pipeline.shard",
        "--src",
        csv_path,
        "--out",
        out,
        "--workers",
        2,
        "--samples_per_shard",
        3,
        "--size",
        64,
        "--progress",
        "False",
    )
    assert tars(out) == tars(ref)
    assert len(tars(ref)) == 4


def test_rerun_keeps_complete_shards_and_redoes_broken_ones(many, tmp_path):
    csv_path, ref = many
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    (out / "000001_stats.json").unlink()  # as if killed between tar and stats
    (out / "000002.tar").write_bytes(b"half a tar")  # a half-written tar under its final name
    (out / "000002_stats.json").unlink()
    (out / ".000003.tar.tmp-deadbeef").write_bytes(b"leftover")  # temp file of a killed run
    untouched = {n: os.stat(out / n).st_mtime_ns for n in ("000000.tar", "000000_stats.json", "000003.tar")}
    time.sleep(0.01)
    proc = run_cli(
        "pipeline.shard",
        "--src",
        csv_path,
        "--out",
        out,
        "--workers",
        1,
        "--samples_per_shard",
        3,
        "--size",
        64,
        "--progress",
        "False",
    )
    assert "2 shard(s) written, 2 already complete" in proc.stdout
    assert {n: os.stat(out / n).st_mtime_ns for n in untouched} == untouched
    assert tars(out) == tars(ref)
    assert not list(out.glob(".*tmp*"))


def test_changed_settings_redo_the_shards(many, tmp_path):
    csv_path, ref = many
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    proc = run_cli(
        "pipeline.shard",
        "--src",
        csv_path,
        "--out",
        out,
        "--workers",
        1,
        "--samples_per_shard",
        3,
        "--size",
        32,
        "--progress",
        "False",
    )
    assert "4 shard(s) written, 0 already complete" in proc.stdout
    assert stats(out)["settings"]["size"] == 32


def test_shards_left_past_a_shorter_csvs_last_are_not_read(many, tmp_path, capsys):
    """A folder sharded again from a shorter CSV keeps the first run's shards past the new last one; neither the
    trainer nor pipeline.subset reads them as the new CSV's, and each says so."""
    from pipeline import subset
    from train import data

    csv_path, ref = many
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    assert json.loads((out / "shards.json").read_text()) == {
        "finished": True,
        "shards": 4,
        "src": str(csv_path.resolve()),
    }
    lines = csv_path.read_text(encoding="utf-8").splitlines(keepends=True)
    short = tmp_path / "short.csv"
    short.write_text("".join(lines[:6]), encoding="utf-8")  # the header and 5 rows: 2 shards of 3
    (tmp_path / "v").symlink_to(csv_path.parent / "v")  # the rows' videos, relative to the CSV
    args = ["--src", short, "--out", out, "--workers", 1, "--samples_per_shard", 3, "--size", 64]
    proc = run_cli("pipeline.shard", *args, "--progress", "False")
    assert "4 file(s) past the last shard" in proc.stderr and "shards.json" in proc.stderr, proc.stderr
    assert json.loads((out / "shards.json").read_text())["shards"] == 2
    assert len(tars(out)) == 4  # nothing deleted

    assert [Path(t).name for t in data.list_shards(out)] == ["000000.tar", "000001.tar"]
    assert data.sample_count(out) == 5
    (warning,) = data.shard_warnings(out)
    assert "2 shard(s) past the 2" in warning and "000002.tar" in warning
    assert data.shard_warnings(ref) == []
    assert subset.complete_shards(out) == [(0, 3), (1, 2)]
    assert "000002.tar" in capsys.readouterr().err

    (out / "shards.json").write_text("{not json")
    with pytest.raises(data.DataError, match="rerun the pipeline.shard command"):
        data.list_shards(out)
    with pytest.raises(subset.SubsetError, match="rerun the pipeline.shard command"):
        subset.complete_shards(out)


def test_a_folder_whose_sharding_has_not_finished_is_refused_and_one_that_lost_a_shard_is_named(many, tmp_path):
    """A pipeline.shard stopped before its end leaves shards of the new CSV beside an earlier CSV's, under one index;
    training and pipeline.subset refuse the folder until a rerun finishes it. A finished run whose shard could not be
    made (its worker crashed), or whose stats are damaged, is read without it, and the readers name it."""
    from pipeline import subset, writer
    from train import data

    csv_path, ref = many
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    writer.write_index(out, 4, csv_path, finished=False)  # as pipeline.shard leaves it when stopped
    for read, error in ((data.list_shards, data.DataError), (subset.complete_shards, subset.SubsetError)):
        with pytest.raises(error, match="has not finished") as e:
            read(out)
        assert f"python -m pipeline.shard --src {csv_path.resolve()} --out {out}" in str(e.value)
    writer.write_index(out, 4, csv_path, finished=True)
    (out / "000001_stats.json").unlink()  # never made
    (out / "000002_stats.json").write_text("{")  # damaged
    assert [Path(t).name for t in data.list_shards(out)] == ["000000.tar", "000003.tar"]
    (warning,) = data.shard_warnings(out)
    assert "2 shard(s) of" in warning and "000001.tar" in warning
    assert data.sample_count(out) == 6 and subset.complete_shards(out) == [(0, 3), (3, 3)]
    args = ["--src", csv_path, "--out", out, "--workers", 1, "--samples_per_shard", 3, "--size", 64]
    assert "2 shard(s) written, 2 already complete" in run_cli("pipeline.shard", *args, "--progress", "False").stdout
    assert data.shard_warnings(out) == [] and tars(out) == tars(ref)


def test_a_second_run_on_the_same_output_is_refused(many, tmp_path):
    csv_path, _ = many
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        proc = run_cli("pipeline.shard", "--src", csv_path, "--out", out, "--progress", "False", check=False)
    assert proc.returncode != 0 and "another pipeline.shard run" in proc.stderr


class _SlowFiles(http.server.SimpleHTTPRequestHandler):
    """Serves files from the server's folder, 0.15 s late each: a run slow enough to kill mid-way."""

    def do_GET(self):
        time.sleep(0.15)
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler: type[http.server.SimpleHTTPRequestHandler], folder: Path):
    """An HTTP server on 127.0.0.1 handing out ``folder``'s files through ``handler``, in a thread."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def slow_server(many):
    csv_path, _ = many
    with serving(_SlowFiles, csv_path.parent) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.slow
def test_resume_after_kill_9_gives_identical_output(many, slow_server, tmp_path):
    """SIGKILL the whole run mid-way, rerun the same command: the result equals an uninterrupted run."""
    csv_path, _ = many
    rows = [[str(i), f"caption {i}", 0, "d", "PT1S", f"{slow_server}/v/{i}.mp4"] for i in range(12)]
    url_csv = write_csv(tmp_path / "urls.csv", rows)
    common = [
        "--src",
        str(url_csv),
        "--workers",
        "1",
        "--samples_per_shard",
        "3",
        "--size",
        "64",
        "--progress",
        "False",
    ]
    ref = tmp_path / "ref"
    run_cli("pipeline.shard", *common, "--out", ref)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.shard", *common, "--out", str(out)],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (out / "000000_stats.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(0.2)  # into the second shard
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in out.glob("*_stats.json"))
    assert "000000_stats.json" in done_before and len(done_before) < 4, done_before
    index = json.loads((out / "shards.json").read_text())  # written first: a run cut short has it, unfinished
    assert (index["shards"], index["finished"]) == (4, False)
    kept = {n: os.stat(out / n.replace("_stats.json", ".tar")).st_mtime_ns for n in done_before}
    rerun = run_cli("pipeline.shard", *common, "--out", out)
    assert f"{4 - len(done_before)} shard(s) written, {len(done_before)} already complete" in rerun.stdout
    assert {n: os.stat(out / n.replace("_stats.json", ".tar")).st_mtime_ns for n in done_before} == kept
    assert tars(out) == tars(ref)
    assert not list(out.glob(".*tmp*"))


def test_a_full_disk_is_one_error_line_and_leaves_no_temporary(many, tmp_path):
    """A write that fails (here a file-size limit, as a full disk would) stops the run with one line that names
    the cause and the fix: it was a traceback, and the temporaries of the shards in flight stayed."""
    import resource

    csv_path, _ = many
    out = tmp_path / "out"
    args = ["--src", csv_path, "--out", out, "--workers", 2, "--samples_per_shard", 6, "--size", 64]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.shard", *map(str, args), "--progress", "False"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000)),
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert "File too large" in proc.stderr and "complete shards are kept" in proc.stderr
    assert not list(out.glob(".*tmp*"))


def test_a_rerun_marks_the_folder_unfinished_only_once_it_has_a_shard_to_make(many, tmp_path, monkeypatch):
    """The index said "unfinished" from a rerun's first act: over WebVid's 2,500 complete shards, the trainer and
    pipeline.subset refused the folder for the two minutes a rerun with nothing to do takes, and for good if it was
    killed then. It now says so only before the first shard the run makes or redoes."""
    from pipeline import shard

    csv_path, ref = many
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    written = []
    real = shard.write_index
    monkeypatch.setattr(
        shard, "write_index", lambda *a, finished: (written.append(finished), real(*a, finished=finished))
    )
    args = {"samples_per_shard": 3, "size": 64, "workers": 1, "progress": False}
    with pytest.raises(SystemExit) as e:
        shard.main(str(csv_path), str(out), **args)
    assert e.value.code == 0 and written == [True]  # nothing to make: never unfinished

    (out / "000002_stats.json").unlink()
    made = []
    real_runner = shard.RUNNERS["multiprocessing"]

    def runner(tasks, *rest):  # what the index says as each shard is handed to a worker
        def watched():
            for task in tasks:
                made.append((task.shard, json.loads((out / "shards.json").read_text())["finished"]))
                yield task

        return real_runner(watched(), *rest)

    monkeypatch.setitem(shard.RUNNERS, "multiprocessing", runner)
    written.clear()
    with pytest.raises(SystemExit) as e:
        shard.main(str(csv_path), str(out), **args)
    assert e.value.code == 0 and made == [(2, False)] and written == [False, True]
    assert json.loads((out / "shards.json").read_text())["finished"] is True and tars(out) == tars(ref)


def test_a_csv_that_cannot_be_read_mid_run_is_named_as_the_problem(many, tmp_path, monkeypatch):
    """An OSError reading the CSV after its checks (permissions changed, a network filesystem gone) is named as
    such, not as a failed write into OUT."""
    from pipeline import shard

    csv_path, _ = many

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shard, "count_rows", unreadable)
    with pytest.raises(SystemExit) as e:
        shard.main(str(csv_path), str(tmp_path / "out"), progress=False)
    assert str(e.value).startswith(f"error: reading {csv_path} failed: [Errno 13] Permission denied")


def test_spark_without_pyspark_is_refused_up_front(monkeypatch, tmp_path):
    import importlib.util

    from pipeline import shard

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyspark" else real(name, *a))
    with pytest.raises(shard.UsageError, match=r"pip install '/path/to/fitclip\[spark\]' \(this checkout\)"):
        shard.validate(tmp_path / "o", 1, 10, 4, 256, 90, None, "spark", 60, 2, 200)


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"workers": True}, "--workers must be a whole number of at least 1, got True"),
        ({"samples_per_shard": 1.5}, "--samples_per_shard must be a whole number of at least 1, got 1.5"),
        ({"size": "big"}, "--size must be a whole number of at least 0, got 'big'"),
        ({"retries": -1}, "--retries must be a whole number of at least 0, got -1"),
        ({"quality": True}, "--quality must be a whole number from 1 to 100, got True"),
        ({"out": "{file}"}, "--out {file} is a file; give a folder"),
        ({"timeout": True}, "--timeout must be a number greater than 0, got True"),
        ({"max_mb": 0}, "--max_mb must be a number greater than 0, got 0"),
    ],
)
def test_counts_are_checked_as_every_cli_checks_them(tmp_path, changed, message):
    """One wording for a count across the CLIs (pipeline.cli.count_problems); fire hands --x True over as a bool."""
    from pipeline import shard

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    good = {"out": tmp_path / "o", "workers": 1, "samples_per_shard": 10, "frames": 4, "size": 256, "quality": 90}
    good |= {"video_root": None, "distributor": "multiprocessing", "timeout": 60, "retries": 2, "max_mb": 200}
    shard.validate(**good)  # the unchanged arguments pass
    changed = {k: v.format(file=a_file) if isinstance(v, str) else v for k, v in changed.items()}
    with pytest.raises(shard.UsageError) as e:
        shard.validate(**(good | changed))
    assert str(e.value).startswith(message.format(file=a_file))


def test_the_fingerprint_covers_everything_a_sample_holds():
    """A changed CSV duration (or --duration_col) redoes the shard: every sample's json records it."""
    import dataclasses

    from pipeline.source import Row
    from pipeline.worker import SampleSettings, fingerprint

    row = Row(0, "7", key="7", caption="cap", location="v/7.mp4", csv_duration=17.0)
    base = fingerprint((row,), SampleSettings())
    for change in ({"csv_duration": 18.0}, {"caption": "other"}, {"location": "v/8.mp4"}):
        assert fingerprint((dataclasses.replace(row, **change),), SampleSettings()) != base, change
    assert fingerprint((row,), SampleSettings(size=224)) != base


class _FlakyFiles(http.server.SimpleHTTPRequestHandler):
    """Serves files from the server's folder, answering 503 for the paths in ``server.failing``; records every path
    asked for in ``server.asked``."""

    def do_GET(self):
        self.server.asked.append(self.path)
        if self.path in self.server.failing:
            self.send_error(503, "try later")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server(many):
    csv_path, _ = many
    with serving(_FlakyFiles, csv_path.parent) as server:
        server.failing, server.asked = set(), []
        yield server


def test_retry_failed_fetches_only_the_transient_failures_again_and_copies_the_rest(flaky_server, tmp_path):
    base = f"http://127.0.0.1:{flaky_server.server_address[1]}"
    rows = [[str(i), f"caption {i}", 0, "d", "PT1S", f"{base}/v/{i}.mp4"] for i in range(6)]
    rows.insert(2, ["gone", "a link that is dead for good", 0, "d", "PT1S", f"{base}/v/nope.mp4"])  # 404
    url_csv = write_csv(tmp_path / "urls.csv", rows)
    common = ["--src", url_csv, "--workers", 1, "--samples_per_shard", 4, "--size", 64, "--retries", 0]
    common += ["--progress", "False"]
    ref = tmp_path / "ref"
    run_cli("pipeline.shard", *common, "--out", ref)  # the server never failed: what the retry must end with
    out = tmp_path / "out"
    flaky_server.failing |= {"/v/1.mp4", "/v/5.mp4"}
    run_cli("pipeline.shard", *common, "--out", out)
    first = [stats(out, i) for i in range(2)]
    failures = {f["videoid"]: (f["reason"], f["transient"]) for s in first for f in s["failures"]}
    assert failures == {"1": ("http_error", True), "5": ("http_error", True), "gone": ("http_error", False)}

    flaky_server.failing.clear()
    flaky_server.asked.clear()
    rerun = run_cli("pipeline.shard", *common, "--out", out)  # without the flag: complete shards are kept
    assert "0 shard(s) written, 2 already complete" in rerun.stdout and flaky_server.asked == []

    retry = run_cli("pipeline.shard", *common, "--out", out, "--retry_failed", "True")
    assert sorted(flaky_server.asked) == ["/v/1.mp4", "/v/5.mp4"]  # neither the dead link nor the samples made
    assert "2 shard(s) written, 0 already complete" in retry.stdout
    assert "retried 2 video(s) that had failed transiently: 2 made it this time" in retry.stdout
    assert tars(out) == tars(ref)  # as if they had never failed: same samples, same order, same bytes
    again = [stats(out, i) for i in range(2)]
    assert [s["ok"] for s in again] == [s["ok"] for s in (stats(ref, 0), stats(ref, 1))] == [3, 3]
    assert [f["videoid"] for s in again for f in s["failures"]] == ["gone"]
    assert [s["retry"] for s in again] == [
        {"copied": 2, "retried": 1, "recovered": 1},
        {"copied": 2, "retried": 1, "recovered": 1},
    ]
    assert not list(out.glob(".*tmp*"))

    flaky_server.asked.clear()
    done = run_cli("pipeline.shard", *common, "--out", out, "--retry_failed", "True")  # nothing transient is left
    assert "0 shard(s) written, 2 already complete" in done.stdout and flaky_server.asked == []


def test_a_video_past_decode_timeout_fails_for_now_and_a_retry_with_more_time_makes_it(many, tmp_path):
    """No video can hold a worker for good: one whose decoding runs past --decode_timeout fails as decode_timeout,
    a failure that may pass, and --retry_failed with more time makes the same shards as a run that never failed."""
    csv_path, ref = many
    common = ["--src", csv_path, "--workers", 1, "--samples_per_shard", 3, "--size", 64, "--progress", "False"]
    out = tmp_path / "out"
    first = run_cli("pipeline.shard", *common, "--out", out, "--decode_timeout", 0.000001, check=False)
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr
    (failure, *_) = stats(out, 0)["failures"]
    assert failure["reason"] == "decode_timeout" and failure["transient"] is True
    assert "give --decode_timeout more seconds and rerun with --retry_failed" in failure["detail"]
    retry = run_cli("pipeline.shard", *common, "--out", out, "--retry_failed", "True")
    assert "retried 12 video(s) that had failed transiently: 12 made it this time" in retry.stdout
    assert tars(out) == tars(ref)


@pytest.mark.parametrize("value", ["-1", "1e10", "inf", "nan", "abc"])
def test_decode_timeout_must_be_a_number_from_0_to_a_day(many, tmp_path, value):
    """1e10 passed the check and then failed every row as unexpected_error (the timer's OverflowError)."""
    proc = run_cli("pipeline.shard", "--src", many[0], "--out", tmp_path / "o", "--decode_timeout", value, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        "--decode_timeout must be a number from 0 to 86400, got " in proc.stderr and "(0 for no limit)" in proc.stderr
    )
    assert not (tmp_path / "o").exists()


def test_a_retry_whose_shard_tar_is_gone_makes_the_whole_shard_again(many, tmp_path):
    """The stats say complete, but the tar was deleted: every row is made again rather than lost."""
    from pipeline.source import Row
    from pipeline.worker import SampleSettings, ShardSettings, ShardTask, fingerprint, process_shard

    csv_path, _ = many
    rows = tuple(
        Row(i, str(i), key=str(i), caption=f"c{i}", location=str(csv_path.parent / "v" / f"{i}.mp4")) for i in range(2)
    )
    settings = ShardSettings(str(tmp_path), SampleSettings(size=64))
    task = ShardTask(0, rows, fingerprint(rows, settings.sample))
    made = process_shard(task, settings)
    assert made["ok"] == 2
    reference = (tmp_path / "000000.tar").read_bytes()
    (tmp_path / "000000.tar").unlink()
    previous = {**made, "failures": [{"videoid": "9", "row": 9, "reason": "timeout", "detail": "", "transient": True}]}
    again = process_shard(ShardTask(0, rows, task.fingerprint, previous=previous), settings)
    assert again["ok"] == 2 and again["retry"] == {"copied": 0, "retried": 2, "recovered": 2}
    assert (tmp_path / "000000.tar").read_bytes() == reference


def test_a_run_in_which_no_video_made_a_sample_exits_1(tmp_path):
    """Under PyAV 19 every video failed (a TypeError, counted as unexpected_error) and pipeline.shard exited 0."""
    csv_path = write_csv(tmp_path / "w.csv", [[str(i), f"caption {i}", 0, "d", "PT1S", f"v/{i}.mp4"] for i in range(3)])
    proc = run_cli("pipeline.shard", "--src", csv_path, "--out", tmp_path / "out", "--progress", "False", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "3 videos: 0 ok, 3 failed" in proc.stdout
    assert (
        f"error: none of the 3 videos made a sample; see the reasons above and the failures in {tmp_path / 'out'}"
        in proc.stderr
    )


def test_a_video_path_whose_bytes_are_not_utf8_is_sharded_or_failed_as_any_other(tmp_path, videos):
    """A Latin-1 file name in the CSV (``caf\\xe9.mp4``) stopped the whole run with a UnicodeEncodeError traceback
    where its row's record was written (an existing file: the row failed as unexpected_error)."""
    os.makedirs(os.fsencode(tmp_path / "v"))
    os.link(videos["idx100"], os.fsencode(tmp_path / "v") + b"/caf\xe9.mp4")
    header = b"videoid,name,page_idx,page_dir,duration,contentUrl\n"
    (tmp_path / "w.csv").write_bytes(header + b"1,found,0,d,PT1S,v/caf\xe9.mp4\n2,missing,0,d,PT1S,v/gon\xe9.mp4\n")
    proc = run_cli("pipeline.shard", "--src", tmp_path / "w.csv", "--out", tmp_path / "o", "--progress", "False")
    assert "Traceback" not in proc.stderr and "1 ok, 1 failed" in proc.stdout, proc.stdout + proc.stderr
    stats = json.loads((tmp_path / "o" / "000000_stats.json").read_text(encoding="utf-8"))
    (failure,) = stats["failures"]
    assert failure["reason"] == "missing_file" and os.fsencode(failure["detail"]).count(b"gon\xe9.mp4") == 1


@pytest.mark.parametrize("limit", ["pixels", "bytes"])
def test_frames_the_shard_readers_would_refuse_fail_their_row(videos, monkeypatch, limit):
    """--size 0 keeps a video's own size: a 12K video's frames, or a JPEG over a member's most, were written, and the
    trainer and the evaluation then refused every one of them. The row fails as frame_too_large, saying what to
    give."""
    from pipeline import worker
    from pipeline.fetch import FetchConfig
    from pipeline.frames import FrameError
    from pipeline.source import Row

    monkeypatch.setattr(worker, "MAX_FRAME_PIXELS" if limit == "pixels" else "MAX_MEMBER_BYTES", 1000)
    row = Row(0, "v", key="v", caption="c", location=str(videos["idx100"]))
    with pytest.raises(FrameError) as e:
        worker.make_sample(row, worker.SampleSettings(frames=4, size=0), FetchConfig())
    assert e.value.reason == "frame_too_large"
    assert ("give --size" if limit == "pixels" else "give a lower --quality or --size") in str(e.value)
    monkeypatch.undo()
    assert len(worker.make_sample(row, worker.SampleSettings(frames=4, size=0), FetchConfig())) == 6


def test_an_out_that_cannot_be_made_is_said_without_promising_kept_shards(many, tmp_path):
    """The folder check passes /proc (root may write in it, as far as its mode says), and making a folder there fails:
    the line said "complete shards are kept, and rerunning the same command makes the rest" of a run that made none."""
    proc = run_cli("pipeline.shard", "--src", many[0], "--out", "/proc/fitclip-shards", check=False)
    assert proc.returncode == 1 and "error: " in proc.stderr and "/proc/fitclip-shards" in proc.stderr, proc.stderr
    assert "complete shards are kept" not in proc.stderr
