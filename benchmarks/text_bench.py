"""Benchmark: text embeddings with the captions cut after the longest of their batch, against CLIP's full 77 tokens.

    python -m benchmarks.text_bench [--model ViT-B-16-quickgelu] [--captions CSV] [--batch_size 64]
        [--train_batch 128] [--repeats 3] [--device auto] [--out benchmarks/output]

Two uses, each timed both ways in interleaved rounds (each round runs both ways once, so a slow moment of a shared
machine hits one round, not one way), with random weights and bf16 autocast on CUDA:

1. *evaluation*: ``eval.features.text_embeddings`` of the UCF101 prompts (101 classes x 48 templates) and of the
   captions, with ``trim=True`` (the default: shortest first, each batch cut after its longest) against ``trim=False``
   (every text at the full context length, in the given order); the largest difference between the two embeddings
   is reported too.
2. *training*: the student's text tower forward and backward over one batch of ``--train_batch`` captions, at the
   full context length against the width ``train.model.trim_padding`` cuts the batch to (``--trim_text``), eager.

The captions: the ``name`` column of a WebVid CSV (``--captions``; e.g. the 20 real WebVid captions of
``../shared/annotations/webvid/test_webvid.csv``), repeated to fill a training batch; without it, random 4-40 word
captions as the step benchmarks use. A batch is cut to its longest caption, so the gain depends on the longest
caption of each batch, not on the mean. Prints a table and writes ``--out/text_bench_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from benchmarks.eval_bench import UCF101_FOLDERS, _timed, random_weights_run, write_results
from benchmarks.harness import device_problems, model_problems, resolve_device, synthetic_batch
from eval.features import eval_autocast, text_embeddings
from eval.prompts import UCF101_TEMPLATES, camel_case_to_words, class_prompts
from pipeline.cli import count_problems, fire_main, folder_problems, raised_problems, refuse
from train.model import create_clip, encode_text, text_tokenizer, tokenizer_for


def read_captions(path: str) -> list[str]:
    """The ``name`` column of a WebVid CSV; a ValueError says what is wrong with the file."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ValueError(f"--captions {path}: {e.strerror}") from None
    if not rows or "name" not in rows[0]:
        raise ValueError(f"--captions {path}: no rows with a 'name' column (a WebVid CSV: videoid,name,...)")
    return [r["name"] for r in rows]


def captions_problems(captions) -> list[str]:
    """``read_captions``' refusal of ``--captions`` as a line, if it refuses ("" = random captions: none)."""
    return raised_problems(read_captions, str(captions)) if captions else []


def train_width(clip: torch.nn.Module, tokenizer, captions: list[str]) -> int:
    """The width in tokens the trainer runs ``captions`` at as one batch: cut after the longest by its loader's
    ``train.model.text_tokenizer`` where the model allows it (``trims_text``), else the context length."""
    return text_tokenizer(clip, tokenizer)(captions).shape[1]


def rounds_line(name: str, count: int, rounds: dict[str, list[float]], extra: str = "") -> str:
    full, cut = min(rounds["full"]), min(rounds["cut"])
    every = "; ".join(f"{way} " + ", ".join(f"{s:.3f}" for s in seconds) for way, seconds in rounds.items())
    return f"| {name} | {count} | {full:.3f} | {cut:.3f} | {full / cut:.2f}x | {extra} | {every} |"


def main(
    model: str = "ViT-B-16-quickgelu",
    captions: str = "",
    batch_size: int = 64,
    train_batch: int = 128,
    repeats: int = 3,
    device: str = "auto",
    out: str = "benchmarks/output",
) -> None:
    """Time text embedding for evaluation and the text tower's training pass, full width against cut.

    Args:
        model: open_clip model name or model-config JSON (random weights).
        captions: a WebVid CSV whose ``name`` column gives the captions; "" = random 4-40 word captions.
        batch_size: texts per pass in evaluation (``eval.run``'s default is 64).
        train_batch: captions in the training pass (the step's labeled + unlabeled).
        repeats: rounds; each times both ways once.
        device: auto, cuda or cpu.
        out: output folder.
    """
    problems = count_problems({"batch_size": (batch_size, 1), "train_batch": (train_batch, 1), "repeats": (repeats, 1)})
    problems += captions_problems(captions) + model_problems(model) + device_problems(device)
    refuse(problems + folder_problems({"out": out}))
    texts = read_captions(str(captions)) if captions else []
    dev = resolve_device(device)
    clip = create_clip(str(model), "", dev)
    out_dir = Path(str(out))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, autocast = tokenizer_for(str(model)), eval_autocast(dev)
    if not texts:
        texts = synthetic_batch(int(train_batch), 1, 1, tokenizer, 1, False).texts
    source = f"{len(set(texts))} captions of {captions}" if captions else "random 4-40 word captions"
    classes = [camel_case_to_words(f) for f in UCF101_FOLDERS]
    prompts = [p for per_class in class_prompts(classes, UCF101_TEMPLATES) for p in per_class]
    sets = {"UCF101 prompts": prompts, "captions": texts}
    eval_rounds = {name: {"full": [], "cut": []} for name in sets}
    differences = {}
    clip.eval()
    text_embeddings(clip, tokenizer, texts[:2], 2, dev, autocast)  # warm-up
    for _ in range(int(repeats)):
        for name, items in sets.items():
            embedded = {}
            for way, trim in (("full", False), ("cut", True)):
                seconds, _, embedded[way] = _timed(
                    lambda items=items, trim=trim: text_embeddings(
                        clip, tokenizer, items, int(batch_size), dev, autocast, trim=trim
                    ),
                    dev,
                    1,
                )
                eval_rounds[name][way].append(seconds)
            differences[name] = float((embedded["full"] - embedded["cut"]).abs().max())
    # training: one batch of captions, forward and backward, as the step's text tower runs it
    batch = (texts * (int(train_batch) // len(texts) + 1))[: int(train_batch)]
    full = tokenizer(batch).to(dev)
    width = train_width(clip, tokenizer, batch)
    clip.train()
    train_rounds = {"full": [], "cut": []}

    def train_pass(tokens: torch.Tensor) -> None:
        with autocast:
            out = encode_text(clip, tokens)
        out.float().pow(2).sum().backward()
        clip.zero_grad(set_to_none=True)

    train_pass(full[:2, :width])  # warm-up
    for _ in range(int(repeats)):
        for way, cols in (("full", full.shape[1]), ("cut", width)):
            seconds, _, _ = _timed(lambda cols=cols: train_pass(full[:, :cols]), dev, 1)
            train_rounds[way].append(seconds)
    headline, header = random_weights_run("text_bench", str(model), dev)
    trained = f"train: text tower, forward + backward, {full.shape[1]} -> {width} tokens"
    lines = [
        f"{headline}; {source}; {int(repeats)} interleaved rounds (fastest shown)",
        "",
        "| what | texts | full width, s | cut, s | speed-up | largest difference | every round (s) |",
        "|---|---|---|---|---|---|---|",
        *(
            rounds_line(f"eval: {n}, {int(batch_size)} per pass", len(sets[n]), r, f"{differences[n]:.1e}")
            for n, r in eval_rounds.items()
        ),
        rounds_line(trained, len(batch), train_rounds),
    ]
    report = "\n".join(lines)
    print(report)
    results = {
        **header,
        "captions": source,
        "eval_rounds_s": eval_rounds,
        "eval_max_difference": differences,
        "train_width": {"full": full.shape[1], "cut": width},
        "train_rounds_s": train_rounds,
    }
    write_results(out_dir, "text_bench", dev, results, report)


if __name__ == "__main__":
    fire_main(main)
