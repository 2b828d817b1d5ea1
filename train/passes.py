"""The order of the labeled passes: a new permutation of the set each pass, laid end to end.

A step takes the next ``S`` samples of that sequence (ranks x --batch_labeled), so a step can span the end of one
pass and the start of the next. With two independent permutations such a step can hold a video twice, and the
contrastive loss takes the copy for another video (a false negative): at the paper's 4,500 videos and 64 a step,
about 0.2 pairs at each pass boundary. So each pass's head keeps clear of the last pass's tail: none of the
``guard(n)`` videos a pass ends with is among the ``guard(n)`` the next one starts with, and any ``guard(n) + 1``
samples in a row hold no video twice.

The sequence is a pure function of (seed, set size): it does not depend on the step size, so a resumed run goes on
through the same passes with any number of ranks, loader workers or batch (``train.data.IndexedShards``).
"""

from __future__ import annotations

import random

# The guard is a third of the set (what the repair below needs: a head, a tail and a middle to swap from) at most
# this many samples: a step of up to 16,385 videos (64 GPUs x 256) in a row, on a set of 49,152 videos or more.
MAX_GUARD = 16_384


def guard(n: int) -> int:
    """How many samples at each end of a pass are kept apart from the other pass's end (see the module)."""
    return min(n // 3, MAX_GUARD)


def longest_clean_run(n: int) -> int:
    """How many samples in a row of the sequence, wherever they start, never hold a sample twice."""
    return guard(n) + 1


def _shuffled(n: int, seed: int, epoch: int) -> tuple[list[int], random.Random]:
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    return order, rng


def pass_order(n: int, seed: int, epoch: int, guarded: bool = True) -> list[int]:
    """Pass ``epoch``'s order of the samples ``0..n-1``: a random permutation (seeded by seed and epoch) whose first
    ``guard(n)`` places hold none of the previous pass's last ``guard(n)`` samples (``guarded`` False: the plain
    permutation, as runs saved before the guard took them).

    Each such sample in the head is swapped with one, drawn at random, from the middle places (neither head nor
    tail) that holds none of them either. The tail is never touched, so the previous pass's tail is that of its
    plain permutation: each pass costs two shuffles, not a replay of every pass before it. (So a pass is uniform
    but for the constraint, and for one thing: the last pass's tail samples end in this pass's tail as often as in
    a plain shuffle, where a permutation uniform under the constraint would put them there more often.)"""
    order, rng = _shuffled(n, seed, epoch)
    g = guard(n)
    if epoch == 0 or g == 0 or not guarded:
        return order
    before = set(_shuffled(n, seed, epoch - 1)[0][n - g :])
    clashes = [i for i in range(g) if order[i] in before]
    # n - 2g middle places, at most g - len(clashes) of them holding a tail sample: n >= 3g leaves enough
    free = [j for j in range(g, n - g) if order[j] not in before]
    for i, j in zip(clashes, rng.sample(free, len(clashes)), strict=True):
        order[i], order[j] = order[j], order[i]
    return order
