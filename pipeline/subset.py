"""CLI: copy a seeded random subset of N samples from existing shards into new shards.

    python -m pipeline.subset --src shards/webvid --out shards/webvid-labeled --n 4500 --seed 0

The paper's labeled set is 4.5K random WebVid-2.5M videos; since WebVid URLs
die, it must be drawn from what was actually sharded. No video is decoded: the
samples' files are copied byte for byte. The same source, N and seed give the
same subset and byte-identical shards. ``OUT/subset.json`` records the keys.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tarfile
from pathlib import Path

from pipeline import writer
from pipeline.cli import count_problems, fire_main, long_name_problems, may_write, nearest_existing, write_failed
from pipeline.writer import (
    TarShardWriter,
    atomic_write_bytes,
    held_temporary_folder,
    json_bytes,
    open_tar,
    remove_abandoned,
    shard_name,
    stats_path,
    tar_groups,
)


class SubsetError(ValueError):
    """The subset cannot be made; the message says why and what to do."""


def complete_shards(src: Path) -> list[tuple[int, int]]:
    """``(shard, ok)`` for every complete shard of ``src`` that its index lists, in shard order; refused if the
    pipeline.shard making it has not finished (a draw from part of it would be kept once it has)."""
    if not src.is_dir():
        raise SubsetError(f"--src {src} is not a directory of shards (make one with python -m pipeline.shard)")
    try:
        listing = writer.list_folder(src)
    except ValueError as e:  # a damaged shards.json, or a pipeline.shard that has not finished
        raise SubsetError(str(e)) from None
    for line in listing.warnings():
        print(line, file=sys.stderr)
    return list(listing.ok.items())


def choose(total: int, n: int, seed: int) -> list[int]:
    """Sorted global sample indices of a seeded uniform draw of ``n`` out of ``total`` without replacement."""
    return sorted(random.Random(seed).sample(range(total), n))


def make_subset(src: Path, out: Path, n: int, seed: int, samples_per_shard: int) -> dict:
    """Write the subset into ``out`` (atomically, as a whole folder). Returns the manifest."""
    shards = complete_shards(src)
    total = sum(ok for _, ok in shards)
    if total < n:
        raise SubsetError(
            f"{src} holds {total} samples in {len(shards)} complete shard(s); cannot draw {n}. "
            "Shard more videos or lower --n."
        )
    chosen = choose(total, n, seed)
    params = {
        "src": str(src.resolve()),  # absolute: a rerun finds it the same however --src is spelled (see main)
        "n": n,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "source_shards": len(shards),
        "source_samples": total,
    }
    remove_abandoned(out)  # the temporary folder of a run that was killed
    with held_temporary_folder(out) as tmp:
        try:
            keys = _copy(src, tmp, shards, chosen, samples_per_shard)
            manifest = {**params, "keys": keys}
            atomic_write_bytes(tmp / "subset.json", json_bytes(manifest))
            if out.exists():  # an empty folder (checked by the caller)
                out.rmdir()
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest


def _copy(src: Path, dst: Path, shards: list[tuple[int, int]], chosen: list[int], per_shard: int) -> list[str]:
    keys: list[str] = []
    wanted = iter(chosen)
    target = next(wanted, None)
    offset = 0  # global index of the first sample of the current source shard
    writer: TarShardWriter | None = None
    for shard, ok in shards:
        if target is None:
            break
        if target >= offset + ok:
            offset += ok
            continue
        seen = 0
        path = src / f"{shard_name(shard)}.tar"
        try:
            # Headers only, up to the shard's last chosen sample: the data of the others is skipped (seeked past),
            # not read. Each chosen shard was read to its end, every member's bytes: 4,500 samples drawn from
            # 2,500 shards read 83% of the folder (6.5 minutes of CPU on 16 MB shards).
            with open_tar(path) as tar:
                for position, (key, members) in enumerate(tar_groups(tar)):
                    seen += 1
                    if offset + position != target:
                        continue
                    if writer is None:
                        writer = TarShardWriter(dst, len(keys) // per_shard)
                    writer.add_sample(key, [(ext, tar.extractfile(info).read()) for ext, info in members])
                    keys.append(key)
                    if writer.samples == per_shard:
                        _finish(writer, dst, len(keys) // per_shard - 1)
                        writer = None
                    target = next(wanted, None)
                    if target is None or target >= offset + ok:  # the next chosen sample is in a later shard
                        break
        except (tarfile.TarError, EOFError) as e:  # a tar cut short: one line that names it, not a traceback
            raise SubsetError(
                f"{path} is damaged ({e}); re-shard it (delete its _stats.json and rerun pipeline.shard)"
            ) from None
        if target is not None and target < offset + ok:  # the tar ended before a sample its stats count
            raise SubsetError(
                f"{path} has {seen} samples but its stats say {ok}; "
                "re-shard it (delete its _stats.json and rerun pipeline.shard)"
            )
        offset += ok
    if writer is not None:
        _finish(writer, dst, len(keys) // per_shard)
    return keys


def _finish(writer: TarShardWriter, dst: Path, shard: int) -> None:
    writer.commit()
    stats = {"shard": shard_name(shard), "count": writer.samples, "ok": writer.samples, "failed": {}, "failures": []}
    atomic_write_bytes(stats_path(dst, shard), json_bytes(stats))


def main(src: str, out: str, n: int = 4500, seed: int = 0, samples_per_shard: int = 1000) -> None:
    """Copy a seeded random subset of N samples of the shards in SRC into new shards in OUT.

    Args:
        src: folder of shards made by pipeline.shard (only complete shards are used).
        out: new folder for the subset's shards (must not exist, or be empty; one that already holds this same
            subset is left as it is).
        n: number of samples to draw.
        seed: random seed; the same seed gives the same subset.
        samples_per_shard: samples per output shard.
    """
    src_path, out_path = Path(str(src)), Path(str(out))
    try:
        bad = count_problems({"n": (n, 1), "samples_per_shard": (samples_per_shard, 1), "seed": (seed, 0)})
        bad += long_name_problems("out", out)
        if bad:
            raise SubsetError("; ".join(bad))
        if out_path.exists() and not out_path.is_dir():
            raise SubsetError(f"--out {out_path} is a file; give a new folder for the subset's shards")
        if out_path.exists() and any(out_path.iterdir()):
            if _holds_subset(out_path, src_path, n, seed, samples_per_shard):
                remove_abandoned(out_path)  # a killed rerun's temporary folder (a copy of the subset: large)
                print(f"pipeline.subset: {out_path} already holds this subset ({n}, seed {seed}); nothing to do")
                return
            raise SubsetError(f"--out {out_path} exists and is not empty; remove it or choose another folder")
        # built in a temporary folder beside --out, then renamed to it: beside the folder a symlink names (a rename
        # replaces no link to a folder); and never onto a mount point (an empty volume), which cannot be replaced
        target = out_path.resolve() if out_path.is_symlink() else out_path
        if Path.cwd().is_relative_to(target.resolve()):  # --out ., .., or a folder above this one
            raise SubsetError(
                f"--out {out_path} holds the folder this command runs in, which the subset cannot replace (it is made "
                f"beside --out, then renamed to it); give a new folder, e.g. {out_path / 'labeled'}"
            )
        if is_mount_point(target):
            raise SubsetError(
                f"--out {out_path} is a mount point, which the subset cannot replace (it is made beside --out, then "
                f"renamed to it); give a new folder inside it, e.g. {out_path / 'labeled'}"
            )
        beside = nearest_existing(target.absolute().parent)
        if not may_write(beside):
            raise SubsetError(
                f"--out {out_path}: the subset is made in {beside} first, then renamed to --out, and this user "
                f"may not write in {beside}; give an --out in a folder you can write"
            )
        try:
            manifest = make_subset(src_path, target, n, seed, samples_per_shard)
        except OSError as e:  # writing beside --out (a full disk, a filesystem that takes no folder): said in a line
            written = Path(str(e.filename or "")).absolute()
            if not e.filename or not written.is_relative_to(target.absolute().parent):
                raise
            sys.exit(f"error: {write_failed(e, written)}")
    except SubsetError as e:
        sys.exit(f"error: {e}")
    shards = (n + samples_per_shard - 1) // samples_per_shard
    print(
        f"pipeline.subset: {n} of {manifest['source_samples']} samples (seed {seed}) -> {out_path}/"
        f"{{{shard_name(0)}..{shard_name(shards - 1)}}}.tar; keys in {out_path}/subset.json"
    )


def is_mount_point(path: Path, mountinfo: str | Path = "/proc/self/mountinfo") -> bool:
    """Whether ``path`` is a mount point: ``os.path.ismount``, which compares devices and so misses a bind mount of
    a folder of the same filesystem (a container's volume), or a mount point that ``mountinfo`` lists (Linux)."""
    if os.path.ismount(path):
        return True
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:  # not Linux
        return False
    # the 5th field, its spaces, tabs, newlines and backslashes written as octal escapes (\040)
    points = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in lines if line.strip()}
    return str(path.resolve()) in points


def _holds_subset(out: Path, src: Path, n: int, seed: int, samples_per_shard: int) -> bool:
    """Whether ``out`` holds the subset these arguments would draw (its subset.json says so): the same N, seed and
    shard size, from the same folder (compared resolved: a relative and an absolute --src are the same folder;
    a record of a relative --src, from before records were absolute, is taken from this working directory). If that
    folder no longer holds the complete shards and samples it held then, the subset is kept, with a warning: the
    folder now gives another draw."""
    done = _read_json(out / "subset.json")
    if not isinstance(done, dict) or not isinstance(done.get("src"), str):
        return False
    if (done.get("n"), done.get("seed"), done.get("samples_per_shard")) != (n, seed, samples_per_shard):
        return False
    if Path(done["src"]).resolve() != src.resolve():
        return False
    try:
        shards = complete_shards(src)
    except SubsetError as e:  # being sharded again (--retry_failed): kept, as a grown source keeps it below
        print(f"warning: {out} holds this subset, kept as it is; its source cannot be read now: {e}", file=sys.stderr)
        return True
    now = (len(shards), sum(ok for _, ok in shards))
    then = (done.get("source_shards"), done.get("source_samples"))
    if now != then:  # kept: the labeled set a run trains on should not change under it (a script reruns this)
        print(
            f"warning: {out} holds the subset of {n} drawn (seed {seed}) when {src} held {then[1]} samples in "
            f"{then[0]} complete shard(s); it now holds {now[1]} in {now[0]}, and would give another draw. The "
            "subset is kept as it is; remove --out to draw again from all of them",
            file=sys.stderr,
        )
    return True


def _read_json(path: Path):
    """The JSON in ``path``, or None if there is none or it cannot be read (a damaged file is no subset's)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cli() -> None:
    """The installed command (setup.cfg's console_scripts)."""
    fire_main(main, texts=True)


if __name__ == "__main__":
    cli()
