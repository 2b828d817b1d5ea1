"""Command-line arguments the benchmark scripts share (plain Python: the torch-free scripts import it too)."""

from __future__ import annotations

import re

from pipeline.cli import comma_list, number_problems

# The shortest generated clip the clip benchmarks take, 10 frames at their 25 fps: enough for the 4 frames they sample,
# each with the frame after it, which shard_bench's frame check compares against (8 frames or fewer lack some)
MIN_CLIP_S = 0.4


def parse_batches(text) -> list[tuple[int, int]]:
    """ "8x8,32x32" -> [(8, 8), (32, 32)] (labeled x unlabeled)."""
    if isinstance(text, int):  # fire reads "0x4" (and "4") as a number before this sees it
        raise ValueError(f"--batches takes a comma list of LxU with L, U >= 1 (e.g. 8x8,32x32), got the number {text}")
    parts = [str(t) for t in text] if isinstance(text, (tuple, list)) else str(text).split(",")  # "8x8," is refused
    configs = []
    for part in parts:
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", part)
        if not match or min(int(match[1]), int(match[2])) < 1:
            raise ValueError(f"--batches takes a comma list of LxU with L, U >= 1 (e.g. 8x8,32x32), got {part!r}")
        configs.append((int(match[1]), int(match[2])))
    return configs


CKPT = re.compile(r"ckpt(\d*)")  # +ckpt (every block) or +ckptN (the first N blocks of each tower)


def checkpointed_blocks(options: set[str]) -> bool | int:
    """The --grad_checkpointing a step variant's options ask for: ckpt = every block (True), ckptN = N, neither =
    False."""
    counts = [int(m[1]) if m[1] else True for m in map(CKPT.fullmatch, options) if m]
    return counts[0] if counts else False


def count_list(value) -> list[int]:
    """A comma list of whole numbers as fire hands it over (``1,2`` a tuple, ``4`` an int), checked by
    ``count_list_problems`` first."""
    return [int(item) for item in comma_list(value)]


def count_list_problems(lists: dict[str, tuple[object, int]]) -> list[str]:
    """A line for each flag (name without dashes -> (value, least)) that must be a comma list of whole numbers of at
    least ``least`` and is not: empty, a word, a fraction (fire hands ``--x 1.5`` over as a float) or too small."""
    return [
        f"--{name} must be a comma list of whole numbers of at least {least} (e.g. 1,2), got {value!r}"
        for name, (value, least) in lists.items()
        if not comma_list(value) or not all(item.isdigit() and int(item) >= least for item in comma_list(value))
    ]


def choice_list_problems(name: str, value, choices: tuple[str, ...]) -> list[str]:
    """A line if flag ``name`` is not a comma list of some of ``choices``."""
    items = comma_list(value)
    if items and set(items) <= set(choices):
        return []
    return [f"--{name} must be a comma list of {', '.join(choices)}, got {value!r}"]


def clip_seconds_problems(seconds) -> list[str]:
    """A line if ``--seconds``, the length of the generated clips, is not a number of at least ``MIN_CLIP_S``."""
    return number_problems({"seconds": (seconds, MIN_CLIP_S, None)})
