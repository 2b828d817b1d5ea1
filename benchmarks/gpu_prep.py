"""Make what a GPU run of ``benchmarks/gpu_step.sh`` carries, from a fresh checkout, in one command (on the CPU):

    .venv/bin/python -m benchmarks.gpu_prep [--root .] [--wheels True] [--bench True] [--demo True]

- ``.whl/``: the pure-Python wheels the GPU machine's image lacks (``GPU_LACKS``), at the versions of this
  environment, downloaded from PyPI for the device's Python (3.12). The device has no network: ``gpu_step.sh``
  installs them from there.
- ``bench_shards/``: the loader part's shards, 48 WebVid-like videos (18 s, 596x336; 12 distinct clips of
  ``shard_bench``, cached in ``benchmarks/output/clips``) in 4 shards of 12, frames of 256 on the short side.
- ``demo_output/shards/{labeled,train,val}``: the demo's shards, which the train part trains on (the demo's own
  first and third stages; ``make demo`` makes the same).

Each is made only where it is missing, under a temporary name renamed when complete, so an interrupted run leaves
nothing half made. About 1.5 minutes on 2 cores, most of it generating the 12 clips. Then, through the device tool:
carry ``[".whl", "bench_shards", "demo_output/shards"]`` (22 MiB) and run ``OUT=$OUT bash benchmarks/gpu_step.sh``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from benchmarks import shard_bench
from pipeline.cli import fire_main

# What the GPU image lacks (it has torch, torchvision, timm, huggingface_hub, safetensors, regex, tqdm, pyyaml,
# numpy and pillow): the trainer's and the benchmarks' other imports, and theirs
GPU_LACKS = ("open_clip_torch", "ftfy", "wcwidth", "webdataset", "braceexpand", "fire", "termcolor")
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")


def pinned(names: tuple[str, ...] = GPU_LACKS) -> list[str]:
    """``name==version`` of each package as installed here, so the GPU runs the versions the tests ran."""
    missing = []
    result = []
    for name in names:
        try:
            result.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not installed here; run `make test` (or `make demo`) first")
    return result


def download_command(requirements: list[str], dest: Path, python: str = DEVICE_PYTHON) -> list[str]:
    """pip's download of exactly ``requirements`` (no dependencies: the list is complete) as wheels for ``python``."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [
        *(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"),
        *("--only-binary=:all:", "--python-version", python, "--implementation", "cp", *platforms),
        *("-d", str(dest), *requirements),
    ]


def have_wheels(folder: Path, requirements: list[str]) -> bool:
    """Whether ``folder`` holds a wheel of each ``name==version`` (wheel names use ``_`` for ``-``)."""
    names = {p.name.lower() for p in folder.glob("*.whl")}
    for requirement in requirements:
        name, version = requirement.split("==")
        prefix = f"{name.replace('-', '_').lower()}-{version}-"
        if not any(n.startswith(prefix) for n in names):
            return False
    return True


def make_wheels(dest: Path) -> None:
    requirements = pinned()
    if dest.is_dir() and have_wheels(dest, requirements):
        print(f"wheels: reusing {dest}/ ({', '.join(requirements)})", flush=True)
        return
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"wheels: downloading {', '.join(requirements)} into {dest}/", flush=True)
    proc = subprocess.run(download_command(requirements, partial), capture_output=True, text=True)
    if proc.returncode != 0 or not have_wheels(partial, requirements):
        raise SystemExit(f"error: pip could not download the wheels (is PyPI reachable?):\n{proc.stderr[-2000:]}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)


def make_bench_shards(dest: Path, clips_folder: Path, clips: int, videos: int, seconds: float, size: int) -> None:
    if dest.is_dir():  # renamed into place once complete
        print(f"bench shards: reusing {dest}/", flush=True)
        return
    found, spent, made = shard_bench.ensure_clips(clips_folder, clips, seconds, [None])
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    csv_path = shard_bench.write_csv(partial / "webvid.csv", found[None], videos, seconds)
    print(f"bench shards: {videos} videos ({clips} clips, {made} generated in {spent:.0f} s) into {dest}/", flush=True)
    per_shard = max(1, videos // 4)
    cmd = [sys.executable, "-m", "pipeline.shard", "--src", csv_path, "--out", partial / "shards"]
    cmd += ["--size", size, "--samples_per_shard", per_shard, "--progress", "False"]  # workers: usable_cpus
    subprocess.run([str(c) for c in cmd], check=True)
    shards = partial / "shards"
    (partial / "webvid.csv").unlink()
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(shards, dest)
    partial.rmdir()


def make_demo_shards(root: Path, quick: bool) -> None:
    import demo.__main__ as demo  # the demo's stages reuse what an earlier run finished

    sizes = demo.QUICK if quick else demo.Sizes()
    demo.make_world(root, sizes)
    demo.make_shards(root, sizes)


def main(
    root: str = ".",
    wheels: bool = True,
    bench: bool = True,
    demo: bool = True,
    clips: int = 12,
    videos: int = 48,
    seconds: float = 18.0,
    size: int = 256,
    quick: bool = False,
) -> None:
    """Make ROOT/.whl, ROOT/bench_shards and ROOT/demo_output/shards where missing.

    Args:
        root: the repository root (the device tool carries paths relative to it).
        wheels: make .whl/ (downloads from PyPI).
        bench: make bench_shards/.
        demo: make demo_output/shards/.
        clips: distinct generated clips in bench_shards.
        videos: videos in bench_shards (the clips repeated under other ids), videos // 4 (at least 1) to a shard,
            so 4 shards where it is a multiple of 4 (48 makes 4 of 12; 10 makes 5 of 2).
        seconds: length of each generated clip.
        size: the stored frames' short side in bench_shards.
        quick: the demo's reduced world (for tests; the GPU run's train part wants the full one).
    """
    from pipeline.cli import count_problems, positive_problems, refuse, switch_problems

    problems = count_problems({"clips": (clips, 1), "videos": (videos, 1), "size": (size, 1)})
    problems += positive_problems({"seconds": seconds})
    problems += switch_problems({"wheels": wheels, "bench": bench, "demo": demo, "quick": quick})
    refuse(problems)
    base = Path(str(root))
    if not (base / "benchmarks" / "gpu_step.sh").is_file():
        raise SystemExit(f"error: --root {root!r} is not the repository root (no benchmarks/gpu_step.sh there)")
    if wheels:
        make_wheels(base / ".whl")
    if bench:
        make_bench_shards(base / "bench_shards", base / "benchmarks" / "output" / "clips", clips, videos, seconds, size)
    if demo:
        make_demo_shards(base / "demo_output", quick)
    print('ready: carry [".whl", "bench_shards", "demo_output/shards"], run OUT=$OUT bash benchmarks/gpu_step.sh')


if __name__ == "__main__":
    fire_main(main)
