"""train.passes: the labeled passes' order, checked by brute force over every window of the sequence."""

from __future__ import annotations

import random

import pytest

from train import passes


def _sequence(n: int, seed: int, count: int) -> list[int]:
    return [i for epoch in range(count) for i in passes.pass_order(n, seed, epoch)]


def _first_repeat_window(sequence: list[int]) -> int:
    """The length of the shortest run of the sequence, anywhere, that holds a sample twice (len + 1: none)."""
    last, shortest = {}, len(sequence) + 1
    for p, item in enumerate(sequence):
        if item in last:
            shortest = min(shortest, p - last[item] + 1)
        last[item] = p
    return shortest


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 10, 31, 100, 4500])
@pytest.mark.parametrize("seed", [0, 7])
def test_each_pass_is_a_permutation_and_no_run_of_guard_plus_one_holds_a_sample_twice(n, seed):
    count = 6 if n < 4500 else 3
    sequence = _sequence(n, seed, count)
    for epoch in range(count):
        assert sorted(sequence[epoch * n : (epoch + 1) * n]) == list(range(n))
    # every run of longest_clean_run(n) samples in a row, wherever it starts (a resumed run with another batch
    # starts its steps elsewhere), holds each sample once
    assert _first_repeat_window(sequence) > passes.longest_clean_run(n)


def test_plain_permutations_put_a_video_twice_in_steps_that_span_two_passes():
    """What the guard prevents, measured on the plain permutations: at 4,500 videos and 64 a step, a step that
    spans two passes holds a video twice about 0.2 times per boundary (the README and issue notes' figure)."""
    n, step, boundaries, clashes = 4500, 64, 400, 0
    for epoch in range(1, boundaries + 1):
        before, after = (passes._shuffled(n, 3, e)[0] for e in (epoch - 1, epoch))
        cut = random.Random(epoch).randrange(1, step)  # where the boundary falls inside the step
        clashes += len(set(before[n - cut :]) & set(after[: step - cut]))
        repaired = passes.pass_order(n, 3, epoch)
        assert not set(before[n - cut :]) & set(repaired[: step - cut])
    assert 0.1 < clashes / boundaries < 0.35


def test_the_first_pass_and_the_tails_are_the_plain_permutations():
    """Pass 0 is unchanged from before the guard (a run resumed inside it goes on as it began), and each pass's
    tail is its plain permutation's, which is what lets each pass be made from two shuffles."""
    n = 100
    assert passes.pass_order(n, 5, 0) == passes._shuffled(n, 5, 0)[0]
    g = passes.guard(n)
    for epoch in range(1, 5):
        assert passes.pass_order(n, 5, epoch)[n - g :] == passes._shuffled(n, 5, epoch)[0][n - g :]
    assert passes.pass_order(n, 5, 3) != passes.pass_order(n, 6, 3)  # seeded


def test_the_guard_is_a_third_of_the_set_at_most_max_guard():
    assert [passes.guard(n) for n in (0, 2, 3, 4500, 3 * passes.MAX_GUARD + 5)] == [0, 0, 1, 1500, passes.MAX_GUARD]
    assert passes.longest_clean_run(4500) == 1501
