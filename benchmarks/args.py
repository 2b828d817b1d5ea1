"""Command-line arguments the benchmark scripts share (plain Python: the torch-free scripts import it too)."""

from __future__ import annotations

import re


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
