"""Throughput of the trainer's data loader (shards -> JPEG decode -> shared crop/flip -> batches), per worker.

    python -m benchmarks.loader_bench --shards DIR [--workers 1,2,4,6] [--batch 128] [--batches 20] [--size 224]

Reads the unlabeled stream exactly as ``train.main`` builds it (webdataset,
resampled shards, shuffle buffer, ``train.data.decode_sample``), and reports
videos/s and JPEG decodes/s for each worker count, plus the single-core JPEG
decode limit of the same frames measured in the same run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import fire
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.writer import iter_tar_samples
from train import data
from train.model import tokenizer_for


def jpeg_limit(shards: list[str], seconds: float = 3.0) -> tuple[float, tuple[int, int]]:
    """JPEG decodes per second on one core (torchvision), over the frames of the first shard."""
    torch.set_num_threads(1)
    blobs = [d for _, members in iter_tar_samples(shards[0]) for ext, d in members if ext.endswith("jpg")][:400]
    shape = tuple(decode_jpeg(torch.frombuffer(bytearray(blobs[0]), dtype=torch.uint8)).shape[1:])
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for blob in blobs:
            decode_jpeg(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=ImageReadMode.RGB)
        count += len(blobs)
    return count / (time.perf_counter() - start), shape


def main(
    shards: str,
    workers: str = "1,2,4,6",
    batch: int = 128,
    batches: int = 20,
    size: int = 224,
    frames: int = 4,
    model: str = "ViT-B-16-quickgelu",
    out: str = "benchmarks/output",
) -> None:
    urls = data.list_shards(shards)
    worker_list = [int(w) for w in (workers.split(",") if isinstance(workers, str) else workers)]
    limit, shape = jpeg_limit(urls)
    print(
        f"loader_bench: {len(urls)} shard(s), frames {shape[1]}x{shape[0]}, {os.cpu_count()} cores; "
        f"JPEG decode limit {limit:.0f}/s per core (torchvision)",
        flush=True,
    )
    tokenizer = tokenizer_for(model)
    rows = []
    for w in worker_list:
        stream = data.unlabeled_stream(shards, frames, data.TrainTransform(size), tokenizer, batch, seed=0)
        loader = iter(data.loader(stream, w, False, 0))
        next(loader)  # start-up excluded
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        rate = batch * batches / (time.perf_counter() - start)
        rows.append(
            {
                "workers": w,
                "videos_per_s": rate,
                "videos_per_s_per_worker": rate / w,
                "jpeg_per_s_per_worker": rate * frames / w,
            }
        )
        print(
            f"  {w} worker(s): {rate:.0f} videos/s, {rate / w:.0f} per worker, "
            f"{rate * frames / w:.0f} JPEG/s per worker ({100 * rate * frames / w / limit:.0f}% of the limit)",
            flush=True,
        )
        del loader
    Path(out).mkdir(parents=True, exist_ok=True)
    record = {
        "cores": os.cpu_count(),
        "jpeg_limit_per_core": limit,
        "frame_shape": shape,
        "batch": batch,
        "size": size,
        "rows": rows,
    }
    (Path(out) / "loader_bench.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
