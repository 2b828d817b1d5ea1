"""Output folders this user may not write (a shared cluster folder, a read-only mount) are refused before any work,
in one line; pipeline.subset builds beside the folder a symlinked --out names, and refuses a mount point.

The tests run as root here, whom permissions do not stop: a folder is made unwritable by making ``os.access`` say
so (``locked``); one test also uses real permissions where the suite does not run as root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import TINY_CLIP

from pipeline import cli


@pytest.fixture
def locked(monkeypatch):
    """``locked(folder)``: os.access says this process may not write in ``folder``."""
    denied: set[str] = set()
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.abspath(path) in denied:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return lambda folder: denied.add(os.path.abspath(folder))


def test_folder_problems_names_a_folder_that_cannot_be_written_or_made(locked, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    locked(shared)
    assert cli.folder_problems({"out": shared}) == [
        f"--out {shared}: no permission to write there; give a folder you can write"
    ]
    assert cli.folder_problems({"out": shared / "a" / "b"}) == [
        f"--out {shared / 'a' / 'b'} (it would be made in {shared}): no permission to write there; give a folder you "
        "can write"
    ]
    assert cli.folder_problems({"cache": shared}, writable=False) == []  # read, not written: asked for as such
    assert cli.folder_problems({"out": tmp_path / "new"}) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any folder")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o555)
    assert "no permission to write there" in cli.folder_problems({"out": shared / "run"})[0]


def test_train_main_refuses_an_out_it_may_not_write(locked, train_shards, tmp_path):
    """It failed with a PermissionError traceback at out.mkdir, on every rank."""
    from test_train import tiny_run

    from train.main import main

    locked(tmp_path)
    with pytest.raises(SystemExit) as e:
        main("demo", **tiny_run(train_shards, tmp_path / "run"))
    assert f"--out {tmp_path / 'run'} (it would be made in {tmp_path}): no permission to write there" in str(
        e.value.code
    )
    assert not (tmp_path / "run").exists()


def test_pipeline_shard_and_eval_run_refuse_an_out_they_may_not_write(locked, tmp_path):
    from eval import run
    from pipeline import shard

    locked(tmp_path)
    csv = tmp_path / "w.csv"
    csv.write_text("videoid,name,contentUrl\n1,a,x.mp4\n")
    with pytest.raises(SystemExit) as e:
        shard.main(str(csv), str(tmp_path / "shards"), progress=False)
    assert "no permission to write there" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        run.main(model=str(TINY_CLIP), weights="", data_root=str(tmp_path), out=str(tmp_path / "results"))
    assert f"--out {tmp_path / 'results'} (it would be made in {tmp_path}): no permission" in str(e.value.code)


def test_eval_tag_refuses_an_out_in_a_folder_it_may_not_write(locked, tmp_path):
    """The CSV is written after every video is decoded and embedded: it failed then, with a traceback."""
    from eval import tag

    (tmp_path / "videos").mkdir()
    locked(tmp_path)
    with pytest.raises(SystemExit) as e:
        tag.main(str(tmp_path / "videos"), labels="a,b", model=str(TINY_CLIP), weights="", out=str(tmp_path / "t.csv"))
    assert f"--out {tmp_path / 't.csv'}: no permission to write in {tmp_path}" in str(e.value.code)


def test_train_fuse_refuses_an_out_in_a_folder_it_may_not_write(locked, tmp_path):
    """Its temporary beside --out failed with a PermissionError traceback, after loading both models."""
    from train import fuse

    locked(tmp_path)
    with pytest.raises(SystemExit) as e:
        fuse.main(student=str(tmp_path / "best.pt"), out=str(tmp_path / "sub" / "fitclip.pt"))
    assert str(e.value.code).startswith(
        f"error: --out {tmp_path / 'sub' / 'fitclip.pt'}: no permission to write in {tmp_path}; give a file"
    )


def test_pipeline_subset_builds_beside_a_symlinked_out_and_refuses_a_mount_point(
    locked, train_shards, tmp_path, monkeypatch
):
    """A symlink to an empty folder failed with NotADirectoryError after the whole copy, which it had made in the
    link's folder (a small home quota, say); an empty mount point (a container's volume) with EBUSY; a parent this
    user may not write with a PermissionError traceback."""
    from pipeline import subset

    src = str(train_shards["unlabeled"])
    big = tmp_path / "big" / "labeled"
    big.mkdir(parents=True)
    link = tmp_path / "home" / "labeled"
    link.parent.mkdir()
    link.symlink_to(big)
    subset.main(src, str(link), n=5, samples_per_shard=2)
    assert link.is_symlink() and link.resolve() == big
    assert sorted(p.name for p in big.iterdir())[-1] == "subset.json" and len(list(big.glob("*.tar"))) == 3
    assert sorted(p.name for p in link.parent.iterdir()) == ["labeled"]  # nothing made beside the link
    subset.main(src, str(link), n=5, samples_per_shard=2)  # a rerun finds it through the link: nothing to do

    volume = tmp_path / "volume"
    volume.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == volume)
    with pytest.raises(SystemExit) as e:
        subset.main(src, str(volume), n=5)
    assert f"--out {volume} is a mount point" in str(e.value.code) and f"e.g. {volume / 'labeled'}" in str(e.value.code)

    locked(tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    with pytest.raises(SystemExit) as e:
        subset.main(src, str(tmp_path / "ro" / "labeled"), n=5)
    assert f"the subset is made in {tmp_path / 'ro'} first" in str(e.value.code)
    assert not (tmp_path / "ro" / "labeled").exists()


def test_a_bind_mount_is_a_mount_point(tmp_path):
    """os.path.ismount compares devices, and misses a folder bind-mounted from the same filesystem (a container's
    volume): the subset was copied whole before its rename failed with EBUSY."""
    from pipeline.subset import is_mount_point

    volume = tmp_path / "my vol"
    volume.mkdir()
    mountinfo = tmp_path / "mountinfo"
    escaped = str(volume).replace(" ", "\\040")
    mountinfo.write_text(
        "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
        f"97 22 259:2 /data/labeled {escaped} rw,relatime shared:1 - ext4 /dev/root rw\n"
    )
    assert is_mount_point(volume, mountinfo)
    assert not is_mount_point(tmp_path, mountinfo) and not is_mount_point(volume, tmp_path / "none")


def test_pipeline_subset_says_a_failed_write_beside_out_in_one_line(train_shards, tmp_path, monkeypatch):
    """A full disk, or a folder that takes no new folder (/proc), where the subset is made: a traceback before."""
    import errno

    from pipeline import subset

    out = tmp_path / "labeled"
    made = tmp_path / ".labeled.tmp-0123456789ab"

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(made))

    monkeypatch.setattr(subset, "make_subset", full)
    with pytest.raises(SystemExit) as e:
        subset.main(str(train_shards["unlabeled"]), str(out), n=5)
    assert str(e.value.code).startswith(f"error: writing {made} failed: [Errno 28] No space left on device")

    def unreadable(*args):  # reading the source is not this line's to say
        raise PermissionError(errno.EACCES, "Permission denied", str(train_shards["unlabeled"] / "000000.tar"))

    monkeypatch.setattr(subset, "make_subset", unreadable)
    with pytest.raises(PermissionError):
        subset.main(str(train_shards["unlabeled"]), str(out), n=5)


def test_an_output_name_too_long_or_a_file_named_like_a_folder_is_refused_before_the_work(tmp_path):
    """A name over 255 bytes failed where it was made, after the work ("File name too long"); ``train.fuse --out
    newdir/`` and ``eval.tag --out results/`` wrote a file named ``newdir`` and ``results``."""
    long = str(tmp_path / ("é" * 128 + "x"))  # 257 bytes
    assert cli.folder_problems({"out": long}) == [
        f"--out: the name {'é' * 40}... is 257 bytes, over the 255 a name may have"
    ]
    assert cli.file_problems({"out": long + ".pt"})[0].startswith("--out: the name ")
    assert cli.file_problems({"out": f"{tmp_path}/newdir/"}) == [
        f"--out {tmp_path}/newdir/ ends in /: give a file's name, not a folder's"
    ]
    assert cli.file_problems({"out": f"{tmp_path}/newdir/f.pt"}) == cli.folder_problems({"out": tmp_path}) == []
