"""Benchmark: the unlabeled stream's tar reader (``train.data._shard_samples``, pipeline.writer's reader, which
refuses sparse and oversized members) against webdataset's ``tarfile_to_samples``, which it replaced.

    python -m benchmarks.tar_read_bench [--samples 1000] [--repeats 3]

Writes ``--samples`` samples shaped like the shards' (4 members of 30 KB, a caption, a json) into 4 tars in a
temporary folder, then reads all of them with each reader, in interleaved rounds (a slow moment of a shared machine
hits one round, not one reader), from the page cache: the reader's own cost, no JPEG decoding. Prints samples/s per
reader and round, and the median ratio.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import webdataset as wds

from pipeline.cli import count_problems, fire_main, refuse
from pipeline.writer import TarShardWriter
from train import data

SHARDS = 4


def write_shards(folder: str, samples: int) -> list[dict]:
    """``samples`` samples of 4 random 30 KB "frames", a caption and a json, over ``SHARDS`` tars."""
    per = -(-samples // SHARDS)
    for shard in range(SHARDS):
        writer = TarShardWriter(folder, shard)
        for i in range(min(per, samples - shard * per)):
            frames = [(f"{k}.jpg", os.urandom(30_000)) for k in range(4)]
            writer.add_sample(f"{shard}_{i:06d}", [*frames, ("txt", b"a caption " * 5), ("json", b"{}")])
        writer.commit()
    return [{"url": os.path.join(folder, f"{shard:06d}.tar")} for shard in range(SHARDS)]


def main(samples: int = 1000, repeats: int = 3) -> None:
    """Time both readers over the same tars.

    Args:
        samples: samples written and read per round.
        repeats: rounds; each reads every sample with each reader once.
    """
    refuse(count_problems({"samples": (samples, SHARDS), "repeats": (repeats, 1)}))
    readers = {
        "ours (train.data._shard_samples)": lambda urls: data._shard_samples(iter(urls)),
        "webdataset tarfile_to_samples": lambda urls: wds.tarfile_to_samples()(iter(urls)),
    }
    rates: dict[str, list[float]] = {name: [] for name in readers}
    with tempfile.TemporaryDirectory() as folder:
        urls = write_shards(folder, samples)
        for read in readers.values():  # warm-up: the page cache, imports
            sum(1 for _ in read(urls))
        for _ in range(repeats):
            for name, read in readers.items():
                start = time.perf_counter()
                count = sum(1 for _ in read(urls))
                rates[name].append(count / (time.perf_counter() - start))
                assert count == samples, (name, count)
    print("| reader | samples/s per round | median |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {', '.join(f'{v:,.0f}' for v in values)} | {statistics.median(values):,.0f} |")
    ours, theirs = (statistics.median(v) for v in rates.values())
    print(f"ours / webdataset: {ours / theirs:.2f}x")


if __name__ == "__main__":
    fire_main(main)
