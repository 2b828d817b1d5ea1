"""Benchmark of the frame sampler and of the sharding pipeline on generated WebVid-like clips.

    python -m benchmarks.shard_bench [--clips 12] [--videos 24] [--seconds 18] [--gops default,50]
        [--workers 1,2] [--pipeline_videos 48] [--samples_per_shard 6] [--repeats 2] [--out benchmarks/output]

Measures, in one run and for each GOP setting (keyframe interval of the generated H.264 clips):

1. *ours, per core*: ``decode_frames(path, 4, 256)`` + JPEG encoding of the 4 frames, in this process,
   one video after another (one decoding thread, as in a pipeline worker);
2. *baseline, per core*: one ffmpeg CLI process per video that decodes the whole clip once and keeps the
   same 4 frames with the ``select`` filter, scales them to a 256-pixel short side and writes JPEGs to a
   pipe, with one thread for decoding, filtering and encoding;
3. the ratio ours / baseline (wall-clock rates, and CPU-time rates);
4. the whole pipeline, ``python -m pipeline.shard`` as a subprocess over a CSV of the clips, for each
   ``--workers`` value: videos/s, speedup and efficiency against the smallest worker count.

Videos of 1 and 2 are interleaved (ours, baseline, ours, ...) so that drift in machine load affects both
alike. The clips are cached in ``--out/clips`` and reused by later runs. Prints markdown tables and
writes ``--out/shard_bench_results.json``.
"""

from __future__ import annotations

import datetime
import io
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np
from PIL import Image

from benchmarks.args import clip_seconds_problems, count_list, count_list_problems
from pipeline import synthetic
from pipeline.cli import comma_list, count_problems, fire_main, folder_problems, refuse
from pipeline.frames import decode_frames, encode_jpeg
from pipeline.synthetic import ffmpeg_exe, iso_duration, write_webvid_like_clip
from pipeline.writer import atomic_write_bytes, json_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent
N_FRAMES = 4
SIZE = 256
QUALITY = 90  # pipeline default (SampleSettings.quality)
WIDTH, HEIGHT, FPS = 596, 336, 25
TARGET_RATIO = 2.0  # issue: at least 2x the one-pass baseline per core
X264_DEFAULT_KEYINT = 250
SUMMARY_RE = re.compile(r"done in ([\d.]+) s: .*?(\d+) videos: (\d+) ok, (\d+) failed; ([\d.]+) videos/s")


# ----------------------------------------------------------------------------------------------------------
# Machine and clips


def machine_info() -> dict:
    """Platform, CPU model, cores, memory, GPU presence, PyAV/FFmpeg versions, load average."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    try:
        ffmpeg_version = (
            subprocess.run([ffmpeg_exe(), "-hide_banner", "-version"], capture_output=True, text=True, timeout=60)
            .stdout.splitlines()[0]
            .split(" Copyright")[0]
        )
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        ffmpeg_version = f"unknown ({e})"
    libs = {name: ".".join(map(str, v)) for name, v in av.library_versions.items()}
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": mem_gib,
        "gpu": "nvidia device present" if Path("/dev/nvidia0").exists() else "none detected",
        "pyav_version": av.__version__,
        "pyav_ffmpeg_libraries": libs,
        "ffmpeg_cli": ffmpeg_exe(),
        "ffmpeg_cli_version": ffmpeg_version,
        "loadavg_start": list(os.getloadavg()),
    }


class BackgroundLoad:
    """CPU used by *other* processes while a phase runs, in cores (machine busy time less this process and its
    waited-for children, from /proc/stat and os.times). Other work on a shared machine skews wall-clock figures."""

    def __enter__(self) -> BackgroundLoad:
        self.start = (time.perf_counter(), _machine_busy_s(), _own_cpu_s())
        return self

    def __exit__(self, *exc) -> None:
        end = (time.perf_counter(), _machine_busy_s(), _own_cpu_s())
        wall, busy, own = (b - a for a, b in zip(self.start, end, strict=True))
        self.cores = max(0.0, (busy - own) / wall) if wall > 0 and busy >= 0 else None  # NaN busy: None


def _machine_busy_s() -> float:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def gop_label(gop: int | None) -> str:
    return "default" if gop is None else str(gop)


def clip_path(folder: Path, seconds: float, gop: int | None, seed: int) -> Path:
    return folder / f"webvid_like_{seconds:g}s_{WIDTH}x{HEIGHT}_{FPS}fps_gop{gop_label(gop)}_seed{seed:03d}.mp4"


def _write_clip(path: str, seconds: float, gop: int | None, seed: int) -> str:
    """Write to a temporary name, then rename, so an interrupted run never leaves a half clip in the cache."""
    tmp = Path(path).with_suffix(".partial.mp4")
    write_webvid_like_clip(tmp, seconds=seconds, width=WIDTH, height=HEIGHT, fps=FPS, seed=seed, gop=gop)
    os.replace(tmp, path)
    return path


def ensure_clips(folder: Path, count: int, seconds: float, gops: list[int | None]) -> tuple[dict, float, int]:
    """The cached clips per GOP setting (generating the missing ones in parallel); (clips, seconds spent, made)."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = {gop: [clip_path(folder, seconds, gop, seed) for seed in range(count)] for gop in gops}
    missing = [(str(p), gop, seed) for gop in gops for seed, p in enumerate(clips[gop]) if not p.is_file()]
    start = time.perf_counter()
    if missing:
        print(f"generating {len(missing)} clip(s) into {folder}/ (cached for later runs) ...", flush=True)
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for path in pool.map(_write_clip, *zip(*[(p, seconds, g, s) for p, g, s in missing], strict=True)):
                print(f"  {Path(path).name}", flush=True)
    return clips, time.perf_counter() - start, len(missing)


def probe(path: Path) -> dict:
    """Frame count, fps and keyframe count of the clip's video stream (demux only)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = keyframes = 0
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            frames += 1
            keyframes += bool(packet.is_keyframe)
    return {"frames": frames, "fps": fps, "keyframes": keyframes}


def target_indices(frames: int, n: int = N_FRAMES) -> list[int]:
    """Index of the frame shown at t_k = (k + 0.5) * D / n, D = frames / fps (constant frame rate, pts from 0)."""
    return [math.floor((k + 0.5) * frames / n) for k in range(n)]


# ----------------------------------------------------------------------------------------------------------
# The two per-core samplers


def ours(path: Path) -> tuple[list[bytes], list[float]]:
    """Our sampler: the 4 JPEGs and the frame times (what pipeline.worker.make_sample does, less the metadata)."""
    clip = decode_frames(str(path), N_FRAMES, SIZE)
    return [encode_jpeg(im, QUALITY) for im in clip.images], clip.frame_times


def baseline_cmd(path: Path, indices: list[int]) -> list[str]:
    """One-pass ffmpeg CLI: decode everything, keep ``indices``, scale, JPEG to a pipe; one thread everywhere."""
    select = "+".join(f"eq(n\\,{i})" for i in indices)
    return [
        ffmpeg_exe(),
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostdin",
        "-threads",
        "1",
        "-filter_threads",
        "1",
        "-i",
        str(path),
        "-vf",
        f"select='{select}',scale=-2:{SIZE}",
        "-fps_mode",
        "passthrough",
        "-threads",
        "1",
        "-f",
        "image2pipe",
        "-vcodec",
        "mjpeg",
        "-",
    ]


def baseline(path: Path, indices: list[int]) -> bytes:
    proc = subprocess.run(baseline_cmd(path, indices), capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed on {path}: {proc.stderr.decode(errors='replace')[-1000:]}")
    return proc.stdout


def split_jpegs(data: bytes) -> list[bytes]:
    """Split an MJPEG pipe into JPEGs (SOI markers; entropy-coded data never holds FF D8)."""
    starts = [m.start() for m in re.finditer(b"\xff\xd8\xff", data)]
    return [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)], strict=True)]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check_frames(path: Path, indices: list[int]) -> dict:
    """Do our frames match the baseline's (same index) and not its neighbours (index + 1)? Mean abs diff 0..255."""
    mine = [_rgb(j) for j in ours(path)[0]]
    same = [_rgb(j) for j in split_jpegs(baseline(path, indices))]
    after = [_rgb(j) for j in split_jpegs(baseline(path, [i + 1 for i in indices]))]
    if not (len(mine) == len(same) == len(after) == N_FRAMES) or mine[0].shape != same[0].shape:
        return {"ok": False, "detail": f"frame counts/sizes differ: {len(mine)}, {len(same)}, {len(after)}"}
    mad_same = [float(np.abs(a - b).mean()) for a, b in zip(mine, same, strict=True)]
    mad_next = [float(np.abs(a - b).mean()) for a, b in zip(mine, after, strict=True)]
    ok = all(s < n for s, n in zip(mad_same, mad_next, strict=True))
    return {"ok": ok, "mad_same_index": mad_same, "mad_next_index": mad_next, "size": list(mine[0].shape[1::-1])}


def _rgb(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32)


def bench_per_core(clips: list[Path], videos: int) -> dict:
    """Ours and the baseline, interleaved, over ``videos`` videos cycling through ``clips``."""
    infos = [probe(p) for p in clips]
    indices = [target_indices(info["frames"]) for info in infos]
    # Warm up both (imports, codec init, page cache of the clip and of the ffmpeg binary).
    ours(clips[0])
    baseline(clips[0], indices[0])
    check = check_frames(clips[0], indices[0])

    mismatches = []
    ours_wall, ours_cpu, base_wall, base_cpu = [], [], [], []
    for v in range(videos):
        c = v % len(clips)
        t0, c0 = time.perf_counter(), time.process_time()
        jpegs, frame_times = ours(clips[c])
        ours_wall.append(time.perf_counter() - t0)
        ours_cpu.append(time.process_time() - c0)
        got = [round(t * infos[c]["fps"]) for t in frame_times]
        if got != indices[c] or len(jpegs) != N_FRAMES:
            mismatches.append({"clip": clips[c].name, "ours": got, "expected": indices[c]})

        t0, c0 = time.perf_counter(), children_cpu()
        out = baseline(clips[c], indices[c])
        base_wall.append(time.perf_counter() - t0)
        base_cpu.append(children_cpu() - c0)
        if len(split_jpegs(out)) != N_FRAMES:
            raise RuntimeError(f"baseline gave {len(split_jpegs(out))} JPEGs for {clips[c]}, expected {N_FRAMES}")

    def summary(wall: list[float], cpu: list[float]) -> dict:
        return {
            "median_ms": 1000 * statistics.median(wall),
            "mean_ms": 1000 * statistics.fmean(wall),
            "min_ms": 1000 * min(wall),
            "max_ms": 1000 * max(wall),
            "videos_per_s": len(wall) / sum(wall),
            "cpu_median_ms": 1000 * statistics.median(cpu),
            "videos_per_cpu_s": len(cpu) / sum(cpu) if sum(cpu) > 0 else None,
            "per_video_ms": [round(1000 * t, 2) for t in wall],
            "per_video_cpu_ms": [round(1000 * t, 2) for t in cpu],
        }

    o, b = summary(ours_wall, ours_cpu), summary(base_wall, base_cpu)
    o_cpu, b_cpu = o["videos_per_cpu_s"], b["videos_per_cpu_s"]
    return {
        "videos": videos,
        "distinct_clips": len(clips),
        "frames_per_clip": statistics.median(i["frames"] for i in infos),
        "keyframes_per_clip": statistics.median(i["keyframes"] for i in infos),
        "mb_per_clip": statistics.fmean(p.stat().st_size for p in clips) / 1e6,
        "frame_indices_example": indices[0],
        "ours": o,
        "baseline": b,
        "baseline_cmd_example": baseline_cmd(clips[0], indices[0]),
        "ratio_wall": o["videos_per_s"] / b["videos_per_s"],
        "ratio_median": b["median_ms"] / o["median_ms"],
        "ratio_cpu": o["videos_per_cpu_s"] / b["videos_per_cpu_s"] if o_cpu and b_cpu else None,
        "frame_index_mismatches": mismatches,
        "frame_check": check,
    }


# ----------------------------------------------------------------------------------------------------------
# Whole pipeline


def write_csv(path: Path, clips: list[Path], count: int, seconds: float) -> Path:
    """A WebVid-style CSV of ``count`` rows cycling through ``clips`` (absolute paths), distinct videoids."""
    rows = []
    for i in range(count):
        page = f"{i // 100:03d}_{i // 100:03d}"
        caption = f"generated clip {i % len(clips)}, copy {i // len(clips)}, stock footage"
        location = str(clips[i % len(clips)].resolve())
        rows.append([str(2000000 + i), caption, i // 100, page, iso_duration(seconds), location])
    return synthetic.write_csv(path, rows)


def run_pipeline(csv_path: Path, workers: int, samples_per_shard: int, scratch: Path, expected: int) -> dict:
    """``python -m pipeline.shard`` into a fresh temporary folder; its summary line and the wall time."""
    out_dir = Path(tempfile.mkdtemp(prefix=f"shards_w{workers}_", dir=scratch))
    cmd = [
        sys.executable,
        "-m",
        "pipeline.shard",
        "--src",
        str(csv_path),
        "--out",
        str(out_dir),
        "--workers",
        str(workers),
        "--samples_per_shard",
        str(samples_per_shard),
        "--progress",
        "False",
    ]
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    match = SUMMARY_RE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"pipeline.shard failed ({proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    elapsed, total, ok, failed, rate = match.groups()
    if int(ok) != expected:
        raise RuntimeError(f"pipeline.shard made {ok} of {expected} samples ({failed} failed): {proc.stdout[-1500:]}")
    return {
        "workers": workers,
        "wall_s": wall,
        "pipeline_elapsed_s": float(elapsed),
        "pipeline_videos_per_s": float(rate),
        "wall_videos_per_s": expected / wall,
        "summary": match.group(0),
    }


def bench_pipeline(
    clips: list[Path],
    csv_path: Path,
    count: int,
    seconds: float,
    workers: list[int],
    samples_per_shard: int,
    repeats: int,
) -> dict:
    """Each worker count ``repeats`` times, interleaved; the fastest run of each is reported (all are kept)."""
    write_csv(csv_path, clips, count, seconds)
    runs: dict[int, list[dict]] = {w: [] for w in workers}
    for _ in range(repeats):
        for w in workers:
            runs[w].append(run_pipeline(csv_path, w, samples_per_shard, csv_path.parent, count))
    best = {w: min(rs, key=lambda r: r["wall_s"]) for w, rs in runs.items()}
    base_w = min(workers)
    rows = []
    for w in workers:
        speedup = best[base_w]["wall_s"] / best[w]["wall_s"]
        speedup_inner = best[w]["pipeline_videos_per_s"] / best[base_w]["pipeline_videos_per_s"]
        rows.append(
            {
                **best[w],
                "speedup_wall": speedup,
                "efficiency_wall": speedup / (w / base_w),
                "speedup_pipeline": speedup_inner,
                "efficiency_pipeline": speedup_inner / (w / base_w),
                "all_wall_s": [r["wall_s"] for r in runs[w]],
                "all_pipeline_videos_per_s": [r["pipeline_videos_per_s"] for r in runs[w]],
            }
        )
    shards = math.ceil(count / samples_per_shard)
    return {
        "videos": count,
        "distinct_clips": len(clips),
        "samples_per_shard": samples_per_shard,
        "shards": shards,
        "repeats": repeats,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------------
# Report


DEFAULT_GOPS = ("default", "none", "0")  # what --gops takes for x264's own keyframe interval


def _parse_gop(value) -> int | None:
    if value is None or str(value).lower() in DEFAULT_GOPS:
        return None
    return int(value)


def gop_problems(gops) -> list[str]:
    """A line if ``--gops`` is not a comma list of keyframe intervals (whole numbers of frames, at least 1) or
    "default"."""
    items = comma_list(gops)
    if items and all(g.lower() in DEFAULT_GOPS or (g.isdigit() and int(g) >= 1) for g in items):
        return []
    return [f"--gops must be a comma list of keyframe intervals in frames (at least 1) or default, got {gops!r}"]


def flag_problems(clips, videos, seconds, gops, workers, pipeline_videos, samples_per_shard, repeats, out) -> list[str]:
    """A line for each of ``main``'s flags that is out of range, checked before any clip is generated; the pipeline
    runs' flags too, which pipeline.shard would refuse only after the per-core part."""
    counts = {"clips": (clips, 1), "videos": (videos, 1), "pipeline_videos": (pipeline_videos, 1)}
    problems = count_problems({**counts, "samples_per_shard": (samples_per_shard, 1), "repeats": (repeats, 1)})
    problems += clip_seconds_problems(seconds) + gop_problems(gops) + count_list_problems({"workers": (workers, 1)})
    return problems + folder_problems({"out": out})


def _gop_name(gop: int | None) -> str:
    if gop is None:
        return f"x264 default (keyint {X264_DEFAULT_KEYINT})"
    return f"{gop} frames ({gop / FPS:g} s)"


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _load(cores: float | None) -> str:
    return "n/a" if cores is None or math.isnan(cores) else f"{cores:.2f}"


def tables(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, {m['mem_total_gib']} GiB, GPU: {m['gpu']}; "
        f"{m['platform']}; PyAV {m['pyav_version']} (libavcodec {m['pyav_ffmpeg_libraries'].get('libavcodec')}); "
        f"{m['ffmpeg_cli_version']}",
        f"Load average at start {m['loadavg_start'][0]:.2f}, at end {results['loadavg_end'][0]:.2f}",
        "",
        f"Per core: {N_FRAMES} frames at t_k=(k+0.5)*D/{N_FRAMES}, short side {SIZE}, JPEG; "
        "one process, one decoding thread; ms per video (median over videos), videos/s = videos / total time",
        "",
        "| GOP | keyframes/clip | videos (clips) | ours ms (median) | ours videos/s | ours CPU ms | "
        "baseline ms (median) | baseline videos/s | baseline CPU ms | ours/baseline (wall) | "
        "ours/baseline (CPU) | target >= 2x | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["per_core"]:
        o, b = r["ours"], r["baseline"]
        met = "met" if min(r["ratio_wall"], r["ratio_cpu"] or 0) >= TARGET_RATIO else "**not met**"
        lines.append(
            f"| {_gop_name(r['gop'])} | {r['keyframes_per_clip']:g} | {r['videos']} ({r['distinct_clips']}) | "
            f"{o['median_ms']:.1f} | {o['videos_per_s']:.2f} | {o['cpu_median_ms']:.1f} | "
            f"{b['median_ms']:.1f} | {b['videos_per_s']:.2f} | {b['cpu_median_ms']:.1f} | "
            f"{r['ratio_wall']:.2f}x | {_x(r['ratio_cpu'])} | {met} | {_load(r['background_cores'])} |"
        )
    lines += [
        "",
        "Whole pipeline (`python -m pipeline.shard`, local files, fastest of the repeats): "
        "videos/s from its summary line (excludes interpreter start-up) and from the subprocess wall time",
        "",
        "| GOP | videos (clips) | shards | workers | wall s | videos/s (summary) | videos/s (wall) | "
        "speedup (summary) | efficiency (summary) | speedup (wall) | efficiency (wall) | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["pipeline"]:
        for row in p["rows"]:
            lines.append(
                f"| {_gop_name(p['gop'])} | {p['videos']} ({p['distinct_clips']}) | {p['shards']} | {row['workers']} | "
                f"{row['wall_s']:.2f} | {row['pipeline_videos_per_s']:.1f} | {row['wall_videos_per_s']:.1f} | "
                f"{row['speedup_pipeline']:.2f}x | {row['efficiency_pipeline']:.0%} | "
                f"{row['speedup_wall']:.2f}x | {row['efficiency_wall']:.0%} | {_load(p['background_cores'])} |"
            )
    notes = []
    for r in results["per_core"]:
        c = r["frame_check"]
        if r["frame_index_mismatches"]:
            notes.append(
                f"WARNING GOP {gop_label(r['gop'])}: decode_frames took other frames than t_k: "
                f"{r['frame_index_mismatches'][:3]}"
            )
        if c.get("ok"):
            notes.append(
                f"GOP {gop_label(r['gop'])}: frames {r['frame_indices_example']} match the baseline's "
                f"(mean abs diff {max(c['mad_same_index']):.2f} max over frames vs "
                f"{min(c['mad_next_index']):.2f} min against the next frame)"
            )
        else:
            notes.append(f"WARNING GOP {gop_label(r['gop'])}: our frames do not match the baseline's: {c}")
    notes.append(
        "other load = CPU used by other processes on the machine during that phase (from /proc/stat), in cores; "
        "well above 0 means the wall-clock figures are contended (the CPU-time figures much less so)"
    )
    lines += ["", *notes]
    return "\n".join(lines)


def main(
    clips: int = 12,
    videos: int = 24,
    seconds: float = 18,
    gops="default,50",
    workers="1,2",
    pipeline_videos: int = 48,
    samples_per_shard: int = 6,
    repeats: int = 2,
    out: str = "benchmarks/output",
) -> None:
    """Per-core sampler vs one-pass ffmpeg baseline, and pipeline scaling with --workers.

    Args:
        clips: distinct clips generated per GOP setting (cached in OUT/clips).
        videos: videos timed per GOP setting for the per-core benchmarks (cycling through the clips).
        seconds: clip length.
        gops: keyframe intervals in frames, comma separated; "default" is x264's (keyint 250).
        workers: worker counts for the pipeline run, comma separated.
        pipeline_videos: CSV rows for the pipeline runs (clips repeated under distinct videoids).
        samples_per_shard: rows per shard in the pipeline runs (shards are the unit of parallelism).
        repeats: runs per worker count (interleaved); the fastest is reported.
        out: output folder (clips cache, CSVs, JSON results).
    """
    refuse(flag_problems(clips, videos, seconds, gops, workers, pipeline_videos, samples_per_shard, repeats, out))
    gop_list = [_parse_gop(g) for g in comma_list(gops)]
    worker_list = count_list(workers)
    out_dir = Path(str(out))
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = machine_info()
    print(
        f"{machine['cpu_model']}, {machine['cpu_count']} cores, {machine['mem_total_gib']} GiB; "
        f"PyAV {machine['pyav_version']}; {machine['ffmpeg_cli_version']}",
        flush=True,
    )

    clip_sets, gen_s, made = ensure_clips(out_dir / "clips", clips, seconds, gop_list)
    print(f"clips ready ({made} generated in {gen_s:.1f} s)", flush=True)

    per_core = []
    for gop in gop_list:
        print(f"per-core: GOP {gop_label(gop)}, {videos} videos ...", flush=True)
        with BackgroundLoad() as load:
            res = bench_per_core(clip_sets[gop], videos)
        per_core.append({"gop": gop, **res, "background_cores": load.cores})

    pipeline = []
    for gop in gop_list:
        print(
            f"pipeline: GOP {gop_label(gop)}, {pipeline_videos} videos, workers {worker_list} x{repeats} ...",
            flush=True,
        )
        csv_path = out_dir / "pipeline" / f"gop{gop_label(gop)}" / "webvid.csv"
        with BackgroundLoad() as load:
            res = bench_pipeline(
                clip_sets[gop], csv_path, pipeline_videos, seconds, worker_list, samples_per_shard, repeats
            )
        pipeline.append({"gop": gop, **res, "background_cores": load.cores})

    results = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.shard_bench", *sys.argv[1:]]),
        "settings": {
            "clips": clips,
            "videos": videos,
            "seconds": seconds,
            "size": f"{WIDTH}x{HEIGHT}",
            "fps": FPS,
            "gops": [gop_label(g) for g in gop_list],
            "workers": worker_list,
            "pipeline_videos": pipeline_videos,
            "samples_per_shard": samples_per_shard,
            "repeats": repeats,
            "frames": N_FRAMES,
            "frame_size": SIZE,
            "jpeg_quality_ours": QUALITY,
        },
        "machine": machine,
        "clip_generation_s": gen_s,
        "clips_generated": made,
        "per_core": per_core,
        "pipeline": pipeline,
        "loadavg_end": list(os.getloadavg()),
        "total_s": time.perf_counter() - started,
    }
    report = tables(results)
    print()
    print(report)
    print(f"\ntotal {results['total_s']:.1f} s (clip generation {gen_s:.1f} s)")
    json_path = out_dir / "shard_bench_results.json"
    atomic_write_bytes(json_path, json_bytes(results))
    atomic_write_bytes(out_dir / "shard_bench_results.md", (report + "\n").encode())
    print(f"results: {json_path}")


if __name__ == "__main__":
    fire_main(main)
