"""Benchmark: videos and texts per forward pass, side by side, for ``eval.tag --batch_size 0``'s choice per device.

    python -m benchmarks.batch_bench [--model ViT-B-16-quickgelu] [--sizes 1,8,64] [--videos 32] [--texts 256]
        [--repeats 3] [--device auto] [--out benchmarks/output]

Embeds the same ``--videos`` generated clips (``eval_bench``'s UCF101-like clips, through the frame cache) with
``eval.features.video_embeddings``, and the first ``--texts`` UCF101 prompts with ``eval.features.text_embeddings``,
once per batch size, in rounds: each round runs every size once, so a slow moment of a shared machine hits one
round, not one size. Random weights; bf16 autocast on CUDA, as ``eval.tag`` and ``eval.run`` do. Prints a table (the
fastest round of each size, and every round) and writes ``--out/batch_bench_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.args import clip_seconds_problems
from benchmarks.eval_bench import _timed, ensure_clips, make_dataset, random_weights_run, write_results
from benchmarks.harness import device_problems, model_problems, resolve_device
from eval.features import eval_autocast, text_embeddings, video_embeddings
from eval.frame_cache import CacheSettings, build_cache
from eval.prompts import class_prompts
from pipeline.cli import comma_list, count_problems, fire_main, folder_problems, raised_problems, refuse
from train.model import create_clip, image_size, tokenizer_for


def sizes_arg(sizes) -> list[int]:
    """``--sizes`` as whole numbers of at least 1, in the order given; a ValueError names a bad one."""
    values = comma_list(sizes)
    if not values or not all(v.isdigit() and int(v) >= 1 for v in values):
        raise ValueError(f"--sizes must be a comma list of whole numbers of at least 1, got {sizes!r}")
    return [int(v) for v in values]


def sizes_problems(sizes) -> list[str]:
    """``sizes_arg``'s refusal as a line, if it refuses."""
    return raised_problems(sizes_arg, sizes)


def best_size(rounds: dict[int, list[float]]) -> int:
    """The size whose fastest round was the fastest (the smaller size on a tie)."""
    return min(rounds, key=lambda size: (min(rounds[size]), size))


def table(kind: str, count: int, rounds: dict[int, list[float]]) -> list[str]:
    fastest = min(min(s) for s in rounds.values())
    lines = [f"| {kind} per pass | s ({count} {kind}, fastest round) | {kind}/s | vs the fastest | every round (s) |"]
    lines.append("|---|---|---|---|---|")
    for size, seconds in rounds.items():
        best = min(seconds)
        shown = ", ".join(f"{s:.2f}" for s in seconds)
        label = size if size <= count else f"{size} (ran {count}: all there are)"  # the same pass as a size of count
        lines.append(f"| {label} | {best:.2f} | {count / best:.1f} | {best / fastest:.2f}x | {shown} |")
    return lines


def main(
    model: str = "ViT-B-16-quickgelu",
    sizes="1,8,64",
    videos: int = 32,
    texts: int = 256,
    repeats: int = 3,
    device: str = "auto",
    seconds: float = 10,
    out: str = "benchmarks/output",
) -> None:
    """Time video and text embedding at each batch size, in interleaved rounds.

    Args:
        model: open_clip model name or model-config JSON (random weights).
        sizes: batch sizes to compare, comma separated.
        videos: generated clips to embed (cached in OUT/clips).
        texts: UCF101 prompts to embed.
        repeats: rounds; each runs every size once.
        device: auto, cuda or cpu.
        seconds: length of the generated clips.
        out: output folder (the clips, the frame cache and the results).
    """
    problems = sizes_problems(sizes) + count_problems(
        {"videos": (videos, 1), "texts": (texts, 1), "repeats": (repeats, 1)}
    )
    problems += clip_seconds_problems(seconds) + model_problems(model) + device_problems(device)
    refuse(problems + folder_problems({"out": out}))
    size_list = sizes_arg(sizes)
    dev = resolve_device(device)
    clip = create_clip(str(model), "", dev).eval()
    out_dir = Path(str(out))
    clips, _, _ = ensure_clips(out_dir / "clips", int(videos), float(seconds))
    dataset = make_dataset(clips)
    settings = CacheSettings(size=max(224, image_size(clip)))
    cache = build_cache(dataset, out_dir / "batch_bench_cache", settings, workers=2, progress=False)
    ids = [item.id for item in dataset.items]
    flat = [p for per_class in class_prompts(dataset.classes, dataset.templates) for p in per_class]
    prompts = (flat * (int(texts) // len(flat) + 1))[: int(texts)]
    tokenizer, autocast = tokenizer_for(str(model)), eval_autocast(dev)
    video_rounds: dict[int, list[float]] = {s: [] for s in size_list}
    text_rounds: dict[int, list[float]] = {s: [] for s in size_list}
    video_embeddings(clip, cache, ids[:2], settings.frames, image_size(clip), 2, dev, True, autocast)  # warm-ups
    text_embeddings(clip, tokenizer, prompts[:2], 2, dev, autocast)
    for _ in range(int(repeats)):
        for s in size_list:
            seconds_v, _, embedded = _timed(
                lambda s=s: video_embeddings(
                    clip, cache, ids, settings.frames, image_size(clip), s, dev, True, autocast
                ),
                dev,
                1,
            )
            if len(embedded) != len(ids):
                sys.exit(f"error: {len(embedded)} of {len(ids)} videos embedded at batch size {s}")
            video_rounds[s].append(seconds_v)
            seconds_t, _, _ = _timed(lambda s=s: text_embeddings(clip, tokenizer, prompts, s, dev, autocast), dev, 1)
            text_rounds[s].append(seconds_t)
    best = {"videos": best_size(video_rounds), "texts": best_size(text_rounds)}
    headline, header = random_weights_run("batch_bench", str(model), dev)
    lines = [
        f"{headline}; {int(repeats)} interleaved rounds",
        "",
        *table("videos", len(ids), video_rounds),
        "",
        *table("texts", len(prompts), text_rounds),
        "",
        f"fastest: {best['videos']} videos and {best['texts']} texts per pass",
    ]
    report = "\n".join(lines)
    print(report)
    results = {
        **header,
        "video_rounds_s": video_rounds,
        "text_rounds_s": text_rounds,
        "best": best,
    }
    write_results(out_dir, "batch_bench", dev, results, report)


if __name__ == "__main__":
    fire_main(main)
