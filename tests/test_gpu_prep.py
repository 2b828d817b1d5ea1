"""benchmarks.gpu_prep: what a GPU run carries, made from a fresh checkout. Tests never download: the wheels' list
and pip's command are checked here, and the download was run by hand (benchmarks/README.md)."""

from __future__ import annotations

import tarfile
from importlib import metadata

import pytest
from conftest import REPO

from benchmarks import gpu_prep


def test_the_wheels_are_the_versions_installed_here_for_the_devices_python(tmp_path):
    requirements = gpu_prep.pinned()
    assert [r.split("==")[0] for r in requirements] == list(gpu_prep.GPU_LACKS)
    assert all(version == metadata.version(name) for name, version in (r.split("==") for r in requirements))
    cmd = gpu_prep.download_command(requirements, tmp_path / "w")
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("-d") + 1] == str(tmp_path / "w")
    assert cmd[-len(requirements) :] == requirements
    with pytest.raises(SystemExit, match="not_a_package not installed here"):
        gpu_prep.pinned(("fire", "not_a_package"))


def test_have_wheels_wants_each_package_at_its_version(tmp_path):
    requirements = ["open_clip_torch==3.3.0", "fire==0.7.1"]
    (tmp_path / "open_clip_torch-3.3.0-py3-none-any.whl").write_bytes(b"")
    assert not gpu_prep.have_wheels(tmp_path, requirements)
    (tmp_path / "fire-0.7.0-py3-none-any.whl").write_bytes(b"")  # another version
    assert not gpu_prep.have_wheels(tmp_path, requirements)
    (tmp_path / "fire-0.7.1-py3-none-any.whl").write_bytes(b"")
    assert gpu_prep.have_wheels(tmp_path, requirements)


def test_makes_the_bench_and_demo_shards_once_and_reuses_them(tmp_path, capsys):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gpu_step.sh").write_text("")  # what marks the repository root
    flags = dict(root=str(tmp_path), wheels=False, clips=2, videos=4, seconds=1.0, size=48, quick=True)
    gpu_prep.main(**flags)
    shards = sorted((tmp_path / "bench_shards").glob("*.tar"))
    assert len(shards) == 4 and not list(tmp_path.glob("*.partial"))
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert sum(n.endswith(".jpg") for n in names) == 4 and sum(n.endswith(".txt") for n in names) == 1
    for split in ("labeled", "train", "val"):  # what the GPU script's train part reads
        assert list((tmp_path / "demo_output" / "shards" / split).glob("*.tar")), split
    capsys.readouterr()
    gpu_prep.main(**flags)
    assert "bench shards: reusing" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, says",
    [
        ({"videos": 0}, "--videos must be a whole number of at least 1"),
        ({"seconds": "long"}, "--seconds must be a number greater than 0"),
        ({"wheels": "yes"}, "--wheels must be True or False"),
        ({"root": "/"}, "is not the repository root"),
    ],
)
def test_bad_flags_are_refused_before_any_work(tmp_path, flags, says):
    with pytest.raises(SystemExit, match=says):
        gpu_prep.main(**{"root": str(REPO), **flags})
    assert not (REPO / "bench_shards.partial").exists()
