"""Throughput of the trainer's data loader (shards -> JPEG decode -> shared crop/flip -> batches), per worker.

    python -m benchmarks.loader_bench --shards DIR [--workers 1,2,4,6] [--batch 128] [--batches 20] [--size 224] \
        [--augment_on loader,device,device_jpeg] [--device auto] [--settle 1000]

Reads the unlabeled stream as ``train.main`` builds it (resampled shards read
with pipeline.writer's tar reader, shuffle buffer, ``train.data.decode_sample``, the trainer's tokenizer,
pinned memory on a GPU), and reports videos/s and JPEG decodes/s per worker for
each worker count and each place the crop can run (``--augment_on``: in the
workers, on the device after the workers decoded, or on the device including the
JPEG decode, where the workers decode none: their JPEG/s is n/a), plus the
single-core JPEG decode limit of the same frames measured in the same run. For the device modes it also
times the device's share, ``train.prefetch.to_device`` of one batch (copy,
decode, crop), synchronised, at the largest worker count: the median over the
first 10 of the ``--batches`` batches (all of them if fewer) with the first left
out, as it pays for the set-up (nvjpeg, kernels); with one batch, that one.

Timing starts after ``--settle`` videos per worker: until a worker's shuffle
buffer (1,000 samples) is full, webdataset reads two samples per sample it
hands out, which is start-up, not the steady state.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from benchmarks.args import choice_list_problems, count_list, count_list_problems
from benchmarks.harness import device_problems, model_problems, resolve_device
from pipeline.cli import comma_list, count_problems, fire_main, folder_problems, refuse
from pipeline.writer import atomic_write_bytes, iter_tar_samples, json_bytes
from train import data
from train.config import AUGMENT_ON
from train.model import meta_clip, text_tokenizer, tokenizer_for
from train.prefetch import to_device
from train.profiling import sync


def jpeg_limit(shards: list[str], seconds: float = 3.0) -> tuple[float, tuple[int, int]]:
    """JPEG decodes per second on one core (torchvision), over the frames of the first shard."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blobs = [d for _, members in iter_tar_samples(shards[0]) for ext, d in members if ext.endswith("jpg")][:400]
        shape = tuple(decode_jpeg(torch.frombuffer(bytearray(blobs[0]), dtype=torch.uint8)).shape[1:])
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for blob in blobs:
                decode_jpeg(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=ImageReadMode.RGB)
            count += len(blobs)
        return count / (time.perf_counter() - start), shape
    finally:
        torch.set_num_threads(threads)


def trainer_tokenizer(model: str):
    """The tokenizer ``train.main``'s streams use for ``model``: cutting each batch's padding where its text tower
    allows (``train.model.text_tokenizer``). The model is built on the meta device: no weights, no memory."""
    return text_tokenizer(meta_clip(model), tokenizer_for(model))


def shard_problems(shards, frames) -> list[str]:
    """A line if ``--shards`` is not a folder of complete shards, or ``--frames`` is not a count its samples hold
    (``train.data``'s messages, which say what to do); only the first sample's headers are read."""
    try:
        data.list_shards(str(shards))
    except data.DataError as e:
        return [f"--shards {str(shards)!r}: {e}"]
    bad = count_problems({"frames": (frames, 1)})
    if bad:
        return bad
    try:
        data.check_frames(str(shards), frames)
    except data.DataError as e:
        return [str(e)]
    return []


def device_cost(batches: list, device: torch.device, size: int) -> tuple[float, int | None]:
    """Median seconds of train.prefetch.to_device for one batch (copy, JPEG decode if left, crop), and, on a
    GPU, the largest pixel difference between its result and the same batch prepared on the CPU."""
    times = []
    for batch in batches:
        batch = batch.pin_memory() if device.type == "cuda" else batch
        sync(device)
        start = time.perf_counter()
        to_device(batch, device, size)
        sync(device)
        times.append(time.perf_counter() - start)
    diff = None
    if device.type == "cuda":  # fp16 matmuls and nvjpeg there, fp32 and libjpeg here
        here, there = to_device(batches[0], torch.device("cpu"), size), to_device(batches[0], device, size)
        diff = int((here.video.int() - there.video.cpu().int()).abs().max())
    return statistics.median(times[1:] or times), diff  # the first call pays for set-up (nvjpeg, kernels)


def main(
    shards: str,
    workers: str = "1,2,4,6",
    batch: int = 128,
    batches: int = 20,
    size: int = 224,
    frames: int = 4,
    model: str = "ViT-B-16-quickgelu",
    augment_on: str = "loader,device,device_jpeg",
    device: str = "auto",
    settle: int = 1000,
    out: str = "benchmarks/output",
) -> None:
    """Videos/s of the trainer's unlabeled stream for each worker count and each place the crop runs, against the
    single-core JPEG decode limit; writes OUT/loader_bench.json after each row.

    Args:
        shards: folder of shards made by pipeline.shard (the unlabeled stream reads them, resampled).
        workers: loader worker counts to time, comma separated.
        batch: videos per batch.
        batches: batches timed per row, after the settling ones; in the device modes, the device's share is the
            median over the first 10 of them (the first left out) at the largest worker count.
        size: the crop's side in pixels, as the trainer's --crop (224 for ViT-B/16).
        frames: frames per video (the shards must hold that many).
        model: open_clip model name or model-config JSON whose tokenizer the stream uses (built without weights).
        augment_on: places the crop runs, comma separated, of loader, device and device_jpeg (the trainer's
            --augment_on values).
        device: auto, cuda or cpu; where the device modes' share is timed.
        settle: videos per worker read before timing starts, until the shuffle buffers are full.
        out: folder of loader_bench.json.
    """
    places = tuple(m for m in AUGMENT_ON if m != "auto")
    problems = shard_problems(shards, frames) + count_list_problems({"workers": (workers, 1)})
    problems += count_problems({"batch": (batch, 1), "batches": (batches, 1), "size": (size, 1), "settle": (settle, 0)})
    problems += model_problems(model) + choice_list_problems("augment_on", augment_on, places)
    refuse(problems + device_problems(device) + folder_problems({"out": out}))
    shards = str(shards)  # fire hands a folder named 5 over as a number
    urls = data.list_shards(shards)
    worker_list = count_list(workers)
    modes = comma_list(augment_on)
    dev = resolve_device(device)
    limit, shape = jpeg_limit(urls)
    print(
        f"loader_bench: {len(urls)} shard(s), frames {shape[1]}x{shape[0]}, {os.cpu_count()} cores, device {dev}; "
        f"JPEG decode limit {limit:.0f}/s per core (torchvision)",
        flush=True,
    )
    tokenizer = trainer_tokenizer(model)
    transform = data.TrainTransform(size)
    rows = []
    record = {
        "cores": os.cpu_count(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "jpeg_limit_per_core": limit,
        "frame_shape": shape,
        "batch": batch,
        "batches": batches,
        "settle": settle,
        "size": size,
        "rows": rows,
        "complete": False,
    }
    Path(str(out)).mkdir(parents=True, exist_ok=True)
    path = Path(str(out)) / "loader_bench.json"
    for mode in modes:
        for w in worker_list:
            stream = data.unlabeled_stream(shards, frames, transform, tokenizer, batch, seed=0, augment_on=mode)
            loader = iter(data.loader(stream, w, dev.type == "cuda", 0))  # pinned on a GPU, as the trainer's
            # start-up excluded: until every worker's shuffle buffer is full, it reads two samples per sample out
            for _ in range(max(1, -(-settle * w // batch))):
                next(loader)
            start = time.perf_counter()
            kept = [next(loader) for _ in range(batches)]
            rate = batch * batches / (time.perf_counter() - start)
            decoded = mode != "device_jpeg"  # there the workers hand on the JPEG bytes: the device decodes them
            row = {
                "augment_on": mode,
                "workers": w,
                "videos_per_s": rate,
                "videos_per_s_per_worker": rate / w,
                "jpeg_per_s_per_worker": rate * frames / w if decoded else None,
            }
            del loader
            if mode != "loader" and w == worker_list[-1]:
                seconds, diff = device_cost(kept[: min(batches, 10)], dev, size)
                row["device_s_per_batch"] = seconds
                row["device_videos_per_s"] = batch / seconds
                row["max_pixel_diff_vs_cpu"] = diff
            rows.append(row)
            atomic_write_bytes(path, json_bytes(record))  # after every row: a run cut short keeps what it measured
            device_note = (
                f"; the device's share: {1e3 * row['device_s_per_batch']:.1f} ms per batch "
                f"({row['device_videos_per_s']:.0f} videos/s) on {dev}"
                + (f", max pixel difference to the CPU's crop {diff}" if diff is not None else "")
                if "device_s_per_batch" in row
                else ""
            )
            jpeg = (
                f"{rate * frames / w:.0f} JPEG/s per worker ({100 * rate * frames / w / limit:.0f}% of the limit)"
                if decoded
                else "JPEG/s per worker n/a (the device decodes)"
            )
            print(
                f"  augment_on {mode}, {w} worker(s): {rate:.0f} videos/s, {rate / w:.0f} per worker, {jpeg}"
                + device_note,
                flush=True,
            )
            del kept
    record["complete"] = True
    atomic_write_bytes(path, json_bytes(record))


if __name__ == "__main__":
    fire_main(main)
