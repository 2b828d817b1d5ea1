"""Benchmark of zero-shot evaluation: frame-cache build, video and text encoding, and the cost of a model sweep.

    python -m benchmarks.eval_bench [--videos 48] [--seconds 10] [--workers 1,2] [--model tests/data/tiny-clip.json]
        [--batch_size 32] [--device auto] [--repeats 3] [--classes 101] [--sweep 11] [--threads 0]
        [--out benchmarks/output]

Runs on generated UCF101-like clips (320x240, 25 fps, ``--seconds`` long, H.264 in .mp4, made by
``pipeline.synthetic.write_webvid_like_clip`` with seeds 0..videos-1 and cached in ``--out/clips``), listed as an
``EvalDataset`` named ucf101 with the 101 UCF101 classes (the videos cycle through them). Measures, in one run:

1. *frame-cache build*: ``eval.frame_cache.build_cache`` (4 frames per video at the segment midpoints, 224-pixel
   short side, JPEG q95, tar shards) into a fresh cache folder, for each ``--workers`` value; videos/s and the
   speedup against the smallest worker count, end to end and after the first result (the arrival time of every
   decoded video is recorded, so the pool's start-up is separated from the decoding rate), and the CPU time of the
   main process and of the decoding workers. The start of ``build_cache``'s worker pool (forked where the platform
   can) is also timed alone, for each worker count.
2. *encoding from the cache*: ``eval.features.video_embeddings`` of every video with the ``--model`` (random
   weights), videos/s, with its parts timed on their own (tar read + JPEG decode, eval transform, the rest = model);
   and ``eval.features.class_embeddings`` of 101 classes x the 48 ``eval.prompts.UCF101_TEMPLATES`` (4848 prompts),
   texts/s, with the tokenizer timed on its own. bf16 autocast on CUDA, as ``eval.run`` does.
3. *a sweep of ``--sweep`` models* (11: alpha 0, 0.1, ..., 1), computed from the measured parts, not run: decode
   once + 11 x (video + text encoding) against 11 x (decode + video + text encoding) without the cache.

Every timed phase runs ``--repeats`` times (cache builds interleaved across worker counts); the fastest run is
reported, all are kept in the JSON. ``--threads 1`` pins torch to one thread: on a shared CPU, torch's default
threads stall on the small per-video tensor ops when another process holds a core. Prints a markdown table and
writes ``--out/eval_bench_<device>.json`` and ``.md`` (``<device>`` is ``cpu`` or the GPU's name).
"""

from __future__ import annotations

import datetime
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import open_clip
import torch

from benchmarks.args import clip_seconds_problems, count_list, count_list_problems
from benchmarks.harness import device_problems, model_problems, resolve_device
from benchmarks.shard_bench import BackgroundLoad, machine_info
from eval import frame_cache
from eval.datasets.base import CLASSIFICATION, EvalDataset, Item
from eval.features import class_embeddings, iter_frames, video_embeddings
from eval.frame_cache import CacheSettings, FrameCache, build_cache
from eval.prompts import UCF101_TEMPLATES, camel_case_to_words, class_prompts
from pipeline.cli import count_problems, fire_main, folder_problems, refuse
from pipeline.pool import run_isolated
from pipeline.synthetic import write_webvid_like_clip
from pipeline.writer import atomic_write_bytes, json_bytes
from train.data import EvalTransform
from train.model import create_clip, image_size, tokenizer_for
from train.profiling import sync

WIDTH, HEIGHT, FPS = 320, 240, 25  # UCF101's frame size and rate
BURST_S = 0.002  # results this close to the first one were decoded while the pool was starting
UCF101_TEST_VIDEOS = 3783  # split-1 test list, for the projection to the real dataset
UCF101_FOLDERS = (  # classInd.txt, in label order
    "ApplyEyeMakeup ApplyLipstick Archery BabyCrawling BalanceBeam BandMarching BaseballPitch Basketball "
    "BasketballDunk BenchPress Biking Billiards BlowDryHair BlowingCandles BodyWeightSquats Bowling "
    "BoxingPunchingBag BoxingSpeedBag BreastStroke BrushingTeeth CleanAndJerk CliffDiving CricketBowling "
    "CricketShot CuttingInKitchen Diving Drumming Fencing FieldHockeyPenalty FloorGymnastics FrisbeeCatch "
    "FrontCrawl GolfSwing Haircut Hammering HammerThrow HandstandPushups HandstandWalking HeadMassage HighJump "
    "HorseRace HorseRiding HulaHoop IceDancing JavelinThrow JugglingBalls JumpingJack JumpRope Kayaking Knitting "
    "LongJump Lunges MilitaryParade Mixing MoppingFloor Nunchucks ParallelBars PizzaTossing PlayingCello "
    "PlayingDaf PlayingDhol PlayingFlute PlayingGuitar PlayingPiano PlayingSitar PlayingTabla PlayingViolin "
    "PoleVault PommelHorse PullUps Punch PushUps Rafting RockClimbingIndoor RopeClimbing Rowing SalsaSpin "
    "ShavingBeard Shotput SkateBoarding Skiing Skijet SkyDiving SoccerJuggling SoccerPenalty StillRings "
    "SumoWrestling Surfing Swing TableTennisShot TaiChi TennisSwing ThrowDiscus TrampolineJumping Typing "
    "UnevenBars VolleyballSpiking WalkingWithDog WallPushups WritingOnBoard YoYo"
).split()
assert len(UCF101_FOLDERS) == 101


# ----------------------------------------------------------------------------------------------------------
# Clips and the dataset


def clip_path(folder: Path, seconds: float, seed: int) -> Path:
    return folder / f"ucf101_like_{seconds:g}s_{WIDTH}x{HEIGHT}_{FPS}fps_seed{seed:03d}.mp4"


def _write_clip(path: str, seconds: float, seed: int) -> str:
    """Write to a temporary name, then rename, so an interrupted run never leaves a half clip in the cache."""
    tmp = Path(path).with_suffix(".partial.mp4")
    write_webvid_like_clip(tmp, seconds=seconds, width=WIDTH, height=HEIGHT, fps=FPS, seed=seed)
    os.replace(tmp, path)
    return path


def ensure_clips(folder: Path, count: int, seconds: float) -> tuple[list[Path], float, int]:
    """The cached clips (generating the missing ones in parallel); (clips, seconds spent, number generated)."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = [clip_path(folder, seconds, seed) for seed in range(count)]
    missing = [(str(p), seconds, seed) for seed, p in enumerate(clips) if not p.is_file()]
    start = time.perf_counter()
    if missing:
        print(f"generating {len(missing)} clip(s) into {folder}/ (cached for later runs) ...", flush=True)
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for path in pool.map(_write_clip, *zip(*missing, strict=True)):
                print(f"  {Path(path).name}", flush=True)
    return clips, time.perf_counter() - start, len(missing)


def make_dataset(clips: list[Path]) -> EvalDataset:
    """A UCF101-like classification dataset: video i is in class i mod 101, with a UCF101-style item id."""
    items = []
    for i, clip in enumerate(clips):
        label = i % len(UCF101_FOLDERS)
        folder = UCF101_FOLDERS[label]
        item_id = f"{folder}/v_{folder}_g{8 + i // len(UCF101_FOLDERS):02d}_c01.avi"
        items.append(Item(id=item_id, video=str(clip.resolve()), label=label))
    return EvalDataset(
        name="ucf101",
        task=CLASSIFICATION,
        items=items,
        classes=[camel_case_to_words(f) for f in UCF101_FOLDERS],
        templates=UCF101_TEMPLATES,
        sources=("generated by benchmarks.eval_bench",),
    )


# ----------------------------------------------------------------------------------------------------------
# 1. Frame-cache build


def _has_module(name: str, _settings: object) -> tuple[int, bool]:
    """Run in a pool worker: (its pid, whether ``name`` is imported there)."""
    return os.getpid(), name in sys.modules


def pool_start(workers: int) -> dict:
    """Seconds for ``build_cache``'s worker pool (``run_isolated`` on ``frame_cache.worker_context()``) of
    ``workers`` processes to answer ``workers`` trivial tasks, and to end: the fixed cost a build pays besides the
    decoding."""
    answers: list[tuple[int, bool]] = []
    t0 = time.perf_counter()
    run_isolated(["torch"] * workers, None, workers, answers.append, _has_module, frame_cache.worker_context())
    return {
        "workers": workers,
        "seconds": time.perf_counter() - t0,
        "start_method": frame_cache.worker_context().get_start_method(),
        "processes_answering": len({pid for pid, _ in answers}),
        "torch_imported_in_workers": all(imported for _, imported in answers),
    }


def _children_cpu_s() -> float:
    """CPU seconds of this process's ended (and waited for) child processes, user + system."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cache_bytes(cache: FrameCache) -> int:
    return sum(p.stat().st_size for p in Path(cache.folder).glob("*.tar"))


class _ResultTimes:
    """Stands in for build_cache's tqdm progress bar: records when each decoded video reaches the writer (the bar's
    ``update``)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, *_args, **_kwargs) -> _ResultTimes:  # tqdm(total=..., desc=...): the bar
        return self

    def update(self, n: int = 1) -> None:
        self.times.extend([time.perf_counter()] * n)

    def close(self) -> None:
        pass


def steady_rate(times: list[float], burst_s: float = BURST_S) -> float | None:
    """Videos/s after the first result: the results that arrive with the first (queued while the pool started) are
    left out, and the rest are counted over the time from them to the last result."""
    if not times:
        return None
    k = sum(1 for t in times if t - times[0] <= burst_s)
    span = times[-1] - times[k - 1]
    return (len(times) - k) / span if len(times) > k and span > 0 else None


def build_timed(dataset: EvalDataset, root: Path, workers: int) -> tuple[FrameCache, dict]:
    """build_cache with the arrival time of every result recorded (eval.frame_cache's tqdm swapped for a recorder)."""
    recorder = _ResultTimes()
    original = frame_cache.tqdm
    frame_cache.tqdm = recorder
    try:
        t0, c0, w0 = time.perf_counter(), time.process_time(), _children_cpu_s()
        cache = build_cache(dataset, root, CacheSettings(), workers, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        workers_cpu = _children_cpu_s() - w0  # the pool's processes are joined when build_cache returns
    finally:
        frame_cache.tqdm = original
    n = len(recorder.times)
    rate = steady_rate(recorder.times)
    return cache, {
        "wall_s": wall,
        "main_cpu_s": cpu,
        "workers_cpu_s": workers_cpu,
        "cache_mb": cache_bytes(cache) / 1e6,
        "first_result_s": recorder.times[0] - t0 if n else None,
        "steady_videos_per_s": rate,
        "fixed_s": wall - n / rate if rate else None,  # pool start, first chunk latency, manifest, pool teardown
    }


def bench_cache(dataset: EvalDataset, scratch: Path, workers: list[int], repeats: int) -> tuple[dict, Path]:
    """build_cache into a fresh folder per run, worker counts interleaved; (results, the folder of the last cache)."""
    n = len(dataset.items)
    runs: dict[int, list[dict]] = {w: [] for w in workers}
    keep = None
    for r in range(repeats):
        for w in workers:
            root = Path(tempfile.mkdtemp(prefix=f"cache_w{w}_", dir=scratch))
            cache, run = build_timed(dataset, root, w)
            if cache.missing or len(cache.found) != n:
                raise RuntimeError(f"build_cache with {w} worker(s): {len(cache.found)} of {n} found, {cache.missing}")
            runs[w].append(run)
            if r == repeats - 1 and w == workers[-1]:
                keep = root
            else:
                shutil.rmtree(root, ignore_errors=True)
    best = {w: min(rs, key=lambda x: x["wall_s"]) for w, rs in runs.items()}
    base = min(workers)
    rows = []
    for w in workers:
        speedup = best[base]["wall_s"] / best[w]["wall_s"]
        rate, base_rate = best[w]["steady_videos_per_s"], best[base]["steady_videos_per_s"]
        speedup_steady = rate / base_rate if rate and base_rate else None
        rows.append(
            {
                "workers": w,
                **best[w],
                "videos_per_s": n / best[w]["wall_s"],
                "speedup": speedup,
                "efficiency": speedup / (w / base),
                "speedup_steady": speedup_steady,
                "efficiency_steady": speedup_steady / (w / base) if speedup_steady else None,
                "pool_start": pool_start(w),
                "all_runs": runs[w],
            }
        )
    return {"videos": n, "repeats": repeats, "settings": asdict(CacheSettings()), "rows": rows}, keep


# ----------------------------------------------------------------------------------------------------------
# 2. Encoding


def _timed(fn, dev: torch.device, repeats: int) -> tuple[float, list[float], object]:
    """(fastest seconds, all seconds, last result) of ``repeats`` calls of ``fn``."""
    times, result = [], None
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        result = fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return min(times), times, result


def bench_encode(
    dataset: EvalDataset, cache: FrameCache, model: str, batch_size: int, dev: torch.device, repeats: int, classes: int
) -> dict:
    """video_embeddings from the cache and class_embeddings of the UCF101 prompts, with their parts timed apart."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    clip = create_clip(model, "", dev).eval()
    tokenizer = tokenizer_for(model)
    build_s = time.perf_counter() - t0
    size, frames = image_size(clip), CacheSettings().frames
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    ids = [item.id for item in dataset.items]
    n = len(ids)

    def videos():
        return video_embeddings(clip, cache, ids, frames, size, batch_size, dev, True, autocast)

    def read_only():  # tar read + JPEG decode: what video_embeddings does before the transform
        return sum(len(images) for _, images in iter_frames(cache, ids, frames))

    transform = EvalTransform(size)

    def read_and_transform():
        return sum(transform(images).shape[0] for _, images in iter_frames(cache, ids, frames))

    prompts = class_prompts(dataset.classes[:classes], dataset.templates)
    flat = [p for per_class in prompts for p in per_class]

    def tokenize():
        return sum(tokenizer(flat[i : i + batch_size]).shape[0] for i in range(0, len(flat), batch_size))

    def texts():
        return class_embeddings(clip, tokenizer, prompts, batch_size, dev, autocast)

    # Warm-up: one batch of each (kernels, allocator, tokenizer caches).
    video_embeddings(clip, cache, ids[:batch_size], frames, size, batch_size, dev, True, autocast)
    class_embeddings(clip, tokenizer, prompts[:1], batch_size, dev, autocast)

    video_s, video_all, emb = _timed(videos, dev, repeats)
    emb2 = videos()  # determinism check: the same frames must give the same embeddings
    read_s, read_all, decoded = _timed(read_only, dev, repeats)
    read_tf_s, read_tf_all, _ = _timed(read_and_transform, dev, repeats)
    tok_s, tok_all, _ = _timed(tokenize, dev, repeats)
    text_s, text_all, class_emb = _timed(texts, dev, repeats)

    video = torch.stack([emb[i] for i in ids])
    video2 = torch.stack([emb2[i] for i in ids])
    norms = video.norm(dim=-1)
    checks = {
        "videos_embedded": len(emb),
        "frames_read": decoded,
        "embedding_dim": int(video.shape[1]),
        "video_finite": bool(torch.isfinite(video).all()),
        "video_norm_min_max": [float(norms.min()), float(norms.max())],
        "video_repeat_max_abs_diff": float((video - video2).abs().max()),
        "class_embeddings_shape": list(class_emb.shape),
        "class_finite": bool(torch.isfinite(class_emb).all()),
    }
    ok = (
        len(emb) == n
        and decoded == n * frames
        and checks["video_finite"]
        and checks["class_finite"]
        and abs(checks["video_norm_min_max"][0] - 1) < 1e-3
        and abs(checks["video_norm_min_max"][1] - 1) < 1e-3
        and list(class_emb.shape) == [len(prompts), video.shape[1]]
    )
    return {
        "model": model,
        "image_size": size,
        "frames": frames,
        "batch_size": batch_size,
        "autocast": "bf16" if dev.type == "cuda" else "none (fp32)",
        "parameters_m": sum(p.numel() for p in clip.parameters()) / 1e6,
        "model_build_s": build_s,
        "videos": n,
        "video_s": video_s,
        "videos_per_s": n / video_s,
        "read_s": read_s,
        "transform_s": max(0.0, read_tf_s - read_s),
        "model_s": max(0.0, video_s - read_tf_s),
        "classes": len(prompts),
        "templates": len(dataset.templates),
        "texts": len(flat),
        "text_s": text_s,
        "texts_per_s": len(flat) / text_s,
        "tokenize_s": tok_s,
        "text_model_s": max(0.0, text_s - tok_s),
        "all_s": {
            "video": video_all,
            "read": read_all,
            "read_transform": read_tf_all,
            "tokenize": tok_all,
            "text": text_all,
        },
        "checks": checks,
        "checks_ok": ok,
    }


# ----------------------------------------------------------------------------------------------------------
# 3. Sweep cost (computed)


def sweep_cost(decode_s: float, video_s: float, text_s: float, models: int) -> dict:
    """Decode once + M x encode, against M x (decode + encode): from measured parts, not a run."""
    cached = decode_s + models * (video_s + text_s)
    uncached = models * (decode_s + video_s + text_s)
    cached_v = decode_s + models * video_s
    uncached_v = models * (decode_s + video_s)
    return {
        "cached_s": cached,
        "uncached_s": uncached,
        "ratio": uncached / cached,
        "cached_video_only_s": cached_v,
        "uncached_video_only_s": uncached_v,
        "ratio_video_only": uncached_v / cached_v,
    }


def bench_sweep(cache: dict, enc: dict, models: int) -> list[dict]:
    """For each worker count: the sweep over the benchmark's videos, and projected to UCF101's 3783 test videos and
    101 classes (the text encoding scaled linearly from ``--classes``)."""
    n = cache["videos"]
    rows = []
    scale = UCF101_TEST_VIDEOS / n
    text_s = enc["text_s"] * len(UCF101_FOLDERS) / enc["classes"]
    for row in cache["rows"]:
        here = sweep_cost(row["wall_s"], enc["video_s"], enc["text_s"], models)
        rate, fixed = row["steady_videos_per_s"], max(0.0, row["fixed_s"] or 0.0)  # fixed: does not grow with n
        full = (
            sweep_cost(fixed + UCF101_TEST_VIDEOS / rate, enc["video_s"] * scale, text_s, models)
            if rate
            else None  # every result came in the first burst: no rate to project with (too few videos)
        )
        rows.append({"workers": row["workers"], "models": models, "videos": n, **here, "ucf101_projected": full})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Report


def device_slug(dev: torch.device) -> str:
    if dev.type != "cuda":
        return dev.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


def run_header(bench: str) -> dict:
    """When and how a benchmark's results were made: the first fields of its JSON."""
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", f"benchmarks.{bench}", *sys.argv[1:]]),
    }


def random_weights_run(bench: str, model: str, dev: torch.device) -> tuple[str, dict]:
    """A benchmark of ``model`` with random weights on ``dev``: the headline of its report (model, device, torch,
    threads) and the first fields of its JSON (``run_header``, then the device, the machine and the model)."""
    machine = machine_info()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({machine['cpu_count']} cores)"
    headline = f"`{model}`, random weights, on {name}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    return headline, {**run_header(bench), "device": name, "machine": machine, "model": str(model)}


def write_results(out_dir: Path, bench: str, dev: torch.device, results: dict, report: str) -> None:
    """``results`` as ``OUT/<bench>_<device>.json`` and the printed ``report`` as the ``.md`` beside it, each
    written whole or not at all."""
    stem = out_dir / f"{bench}_{device_slug(dev)}"
    atomic_write_bytes(stem.with_suffix(".json"), json_bytes(results))
    atomic_write_bytes(stem.with_suffix(".md"), (report + "\n").encode())
    print(f"results: {stem}.json")


def _min_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def tables(results: dict) -> str:
    m, s, c, e = results["machine"], results["settings"], results["cache"], results["encode"]
    lines = [
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, {m['mem_total_gib']} GiB; device {m['device_name']}; "
        f"{m['platform']}; torch {m['torch']} ({m['torch_threads']} threads), open_clip {m['open_clip']}, "
        f"PyAV {m['pyav_version']}",
        f"Load average at start {m['loadavg_start'][0]:.2f}, at end {results['loadavg_end'][0]:.2f}",
        "",
        f"{c['videos']} generated UCF101-like clips ({s['seconds']:g} s, {WIDTH}x{HEIGHT}, {FPS} fps, H.264 .mp4, "
        f"{s['mb_per_clip']:.2f} MB each); fastest of {s['repeats']} runs per phase.",
        "",
        "Frame-cache build (`build_cache`: 4 frames, 224 short side, JPEG q95, fresh folder each run):",
        "",
        "| workers | wall s | videos/s | speedup | efficiency | first result s | videos/s after the first result "
        "| speedup (after the first) | fixed s (wall - n / that rate) | main-process CPU s | workers' CPU s "
        "| cache MB | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in c["rows"]:
        lines.append(
            f"| {r['workers']} | {r['wall_s']:.2f} | {r['videos_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['efficiency']:.0%} | {_num(r['first_result_s'], 2)} | {_num(r['steady_videos_per_s'], 1)} | "
            f"{_num(r['speedup_steady'], 2, 'x')} | {_num(r['fixed_s'], 2)} | {r['main_cpu_s']:.2f} | "
            f"{r['workers_cpu_s']:.2f} | {r['cache_mb']:.1f} | {_load(c['background_cores'])} |"
        )
    lines += [
        "",
        f"Encoding from the cache: model `{e['model']}` (random weights, {e['parameters_m']:.1f} M parameters, "
        f"{e['image_size']}x{e['image_size']}, {e['frames']} frames), batch {e['batch_size']}, "
        f"autocast {e['autocast']}, device {results['device']}:",
        "",
        "| what | items | s | items/s | parts (s) | other load (cores) |",
        "|---|---|---|---|---|---|",
        f"| video_embeddings | {e['videos']} videos | {e['video_s']:.3f} | {e['videos_per_s']:.1f} videos/s | "
        f"read tar + JPEG decode {e['read_s']:.3f}, transform {e['transform_s']:.3f}, model {e['model_s']:.3f} | "
        f"{_load(e['background_cores'])} |",
        f"| class_embeddings | {e['classes']} classes x {e['templates']} templates = {e['texts']} texts | "
        f"{e['text_s']:.3f} | {e['texts_per_s']:.0f} texts/s | tokenize {e['tokenize_s']:.3f}, "
        f"model {e['text_model_s']:.3f} | {_load(e['background_cores'])} |",
        "",
        f"Sweep of {s['sweep']} models, computed from the measured parts (not run): cached = decode once + "
        f"{s['sweep']} x (video + text encoding); uncached = {s['sweep']} x (decode + video + text encoding):",
        "",
        "| decode workers | videos | cached | uncached | uncached/cached | video only: cached / uncached / ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["sweep"]:
        for label, x in ((str(r["videos"]), r), (f"{UCF101_TEST_VIDEOS} (projected)", r["ucf101_projected"])):
            if x is None:
                lines.append(f"| {r['workers']} | {label} | n/a | n/a | n/a | n/a |")
                continue
            lines.append(
                f"| {r['workers']} | {label} | {_min_s(x['cached_s'])} | {_min_s(x['uncached_s'])} | "
                f"{x['ratio']:.2f}x | {_min_s(x['cached_video_only_s'])} / {_min_s(x['uncached_video_only_s'])} / "
                f"{x['ratio_video_only']:.2f}x |"
            )
    notes = [
        "",
        f"Checks: {e['checks']}" + ("" if e["checks_ok"] else "  **FAILED**"),
        "first result = time until the first decoded video reaches build_cache's writing loop (the worker pool's "
        "start + one video); videos/s after the first result leaves out the results that arrived with the first. "
        "The pool measured on its own (start, as many trivial tasks as workers, end): "
        + ", ".join(
            f"{r['workers']} worker(s) {r['pool_start']['seconds']:.2f} s ({r['pool_start']['start_method']}, "
            f"torch imported in the workers: {r['pool_start']['torch_imported_in_workers']})"
            for r in c["rows"]
        )
        + ".",
        "model = video_embeddings - (read + transform) and text model = class_embeddings - tokenize, each part timed "
        "on its own; the uncached sweep also pays the cache's JPEG encode (in decode) and JPEG decode (in read).",
        f"projection to UCF101 split 1: decode = fixed s + {UCF101_TEST_VIDEOS} / (videos/s after the first result); "
        "video encoding scaled linearly; text encoding scaled linearly to 101 classes"
        + ("." if e["classes"] == len(UCF101_FOLDERS) else f" (measured on {e['classes']})."),
    ]
    return "\n".join(lines + notes)


def _num(value: float | None, digits: int, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _load(cores: float | None) -> str:
    return "n/a" if cores is None or cores != cores else f"{cores:.2f}"


def flag_problems(videos, seconds, workers, model, batch_size, device, repeats, classes, sweep, threads, out):
    """A line for each of ``main``'s flags that is out of range, checked before any clip is generated."""
    problems = count_problems({"videos": (videos, 1), "batch_size": (batch_size, 1), "repeats": (repeats, 1)})
    problems += count_problems({"sweep": (sweep, 1), "threads": (threads, 0)})
    if count_problems({"classes": (classes, 1)}) or classes > len(UCF101_FOLDERS):
        problems.append(f"--classes must be a whole number from 1 to {len(UCF101_FOLDERS)}, got {classes!r}")
    problems += clip_seconds_problems(seconds) + count_list_problems({"workers": (workers, 1)})
    return problems + model_problems(model) + device_problems(device) + folder_problems({"out": out})


def main(
    videos: int = 48,
    seconds: float = 10,
    workers="1,2",
    model: str = "tests/data/tiny-clip.json",
    batch_size: int = 32,
    device: str = "auto",
    repeats: int = 3,
    classes: int = 101,
    sweep: int = 11,
    threads: int = 0,
    out: str = "benchmarks/output",
) -> None:
    """Frame-cache build, encoding from the cache, and the cost of a model sweep with and without the cache.

    Args:
        videos: generated clips (distinct, cached in OUT/clips), the dataset's items.
        seconds: clip length.
        workers: worker counts for build_cache, comma separated.
        model: open_clip model name or model-config JSON (random weights); ViT-B-16-quickgelu on a GPU.
        batch_size: videos (and texts) per forward pass, as eval.run's --batch_size.
        device: auto, cuda or cpu.
        repeats: runs of every timed phase; the fastest is reported.
        classes: UCF101 classes for the text encoding (101; fewer only for a quick check of a big model on CPU).
        sweep: models in the sweep (11 = alpha 0, 0.1, ..., 1), whose cost is projected from the measured parts
            (decode, video and text encoding), not run.
        threads: torch CPU threads (torch.set_num_threads); 0 = torch's default. On a shared machine use 1.
        out: output folder (clips, scratch caches, results).
    """
    refuse(flag_problems(videos, seconds, workers, model, batch_size, device, repeats, classes, sweep, threads, out))
    worker_list = sorted(set(count_list(workers)))
    if threads > 0:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    out_dir = Path(str(out))
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = machine_info()
    machine.update(
        torch=torch.__version__,
        open_clip=open_clip.__version__,
        torch_threads=torch.get_num_threads(),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
    )
    print(
        f"{machine['cpu_model']}, {machine['cpu_count']} cores, {machine['mem_total_gib']} GiB; device {dev} "
        f"({machine['device_name']}); torch {machine['torch']}",
        flush=True,
    )
    clips, gen_s, made = ensure_clips(out_dir / "clips", int(videos), float(seconds))
    print(f"clips ready ({made} generated in {gen_s:.1f} s)", flush=True)
    dataset = make_dataset(clips)

    scratch = out_dir / "eval_bench_cache"
    scratch.mkdir(parents=True, exist_ok=True)
    kept = None
    try:
        print(f"frame cache: {len(clips)} videos, workers {worker_list} x{repeats} ...", flush=True)
        with BackgroundLoad() as load:
            cache_res, kept = bench_cache(dataset, scratch, worker_list, int(repeats))
        cache_res["background_cores"] = load.cores
        cache = build_cache(dataset, kept, CacheSettings(), 1, progress=False)  # complete already: just loads it
        print(f"encoding: {model} on {dev}, batch {batch_size} ...", flush=True)
        with BackgroundLoad() as load:
            enc = bench_encode(dataset, cache, str(model), int(batch_size), dev, int(repeats), int(classes))
        enc["background_cores"] = load.cores
    finally:
        if kept is not None:
            shutil.rmtree(kept, ignore_errors=True)
        try:
            scratch.rmdir()  # only if empty: caches of an interrupted run stay for a look
        except OSError:
            pass

    results = {
        **run_header("eval_bench"),
        "settings": {
            "videos": int(videos),
            "seconds": float(seconds),
            "size": f"{WIDTH}x{HEIGHT}",
            "fps": FPS,
            "mb_per_clip": statistics.fmean(p.stat().st_size for p in clips) / 1e6,
            "workers": worker_list,
            "model": str(model),
            "batch_size": int(batch_size),
            "repeats": int(repeats),
            "classes": int(classes),
            "sweep": int(sweep),
            "threads": torch.get_num_threads(),
        },
        "device": str(dev),
        "machine": machine,
        "clip_generation_s": gen_s,
        "clips_generated": made,
        "cache": cache_res,
        "encode": enc,
        "sweep": bench_sweep(cache_res, enc, int(sweep)),
        "loadavg_end": list(os.getloadavg()),
        "total_s": time.perf_counter() - started,
    }
    report = tables(results)
    print()
    print(report)
    print(f"\ntotal {results['total_s']:.1f} s (clip generation {gen_s:.1f} s)")
    write_results(out_dir, "eval_bench", dev, results, report)
    if not enc["checks_ok"]:
        sys.exit(1)


if __name__ == "__main__":
    fire_main(main)
