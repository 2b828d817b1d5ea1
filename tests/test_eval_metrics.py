"""eval.metrics against brute-force references written with Python loops, with and without ties."""

from __future__ import annotations

import math

import pytest
import torch

import train.metrics
from eval.metrics import class_ranks, classification_metrics, ground_truth_ranks, retrieval_metrics

# ----- brute-force references: plain Python loops over lists of floats


def ref_rank(row: list[float], label: int) -> int:
    """1 + #classes scoring higher + #classes scoring equal with a lower index."""
    truth = row[label]
    rank = 1
    for c, s in enumerate(row):
        if s > truth or (s == truth and c < label):
            rank += 1
    return rank


def ref_classification(scores: list[list[float]], labels: list[int]) -> dict:
    n, num_classes = len(scores), len(scores[0])
    ranks = [ref_rank(scores[i], labels[i]) for i in range(n)]
    out = {}
    for k in (1, 5):
        out[f"top{k}"] = 100.0 * sum(1 for r in ranks if r <= min(k, num_classes)) / n
    per_class = []
    for c in sorted(set(labels)):
        members = [i for i in range(n) if labels[i] == c]
        per_class.append(sum(1 for i in members if ranks[i] == 1) / len(members))
    out["mean_per_class"] = 100.0 * sum(per_class) / len(per_class)
    out["num"] = n
    return out


def random_case(n: int, c: int, seed: int, decimals: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, c, generator=g, dtype=torch.float64)
    if decimals is not None:  # coarse rounding makes many ties
        scores = torch.round(scores, decimals=decimals)
    labels = torch.randint(0, c, (n,), generator=g)
    return scores, labels


def assert_matches(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    got = classification_metrics(scores, labels)
    want = ref_classification(scores.tolist(), labels.tolist())
    assert set(got) == {"top1", "top5", "mean_per_class", "num"}
    assert got["num"] == want["num"]
    assert isinstance(got["num"], int)
    for key in ("top1", "top5", "mean_per_class"):
        assert isinstance(got[key], float)
        assert math.isclose(got[key], want[key], rel_tol=1e-12, abs_tol=1e-9), (key, got[key], want[key])
    return got


# ----- classification


@pytest.mark.parametrize(
    ("n", "c", "decimals"),
    [(1, 1, None), (1, 3, None), (7, 2, None), (9, 4, None), (20, 5, None), (50, 13, None), (64, 101, None)]
    + [(30, 4, 0), (40, 7, 0), (64, 12, 1), (25, 3, 0)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_reference(n, c, decimals, seed):
    scores, labels = random_case(n, c, seed, decimals)
    ranks = class_ranks(scores, labels)
    assert ranks.tolist() == [ref_rank(scores[i].tolist(), int(labels[i])) for i in range(n)]
    assert ranks.dtype == torch.int64
    assert_matches(scores, labels)


def test_all_equal_scores_rank_by_index():
    """Every class ties: the true class's rank is its index + 1, so only class 0 is ever top-1."""
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    scores = torch.zeros(8, 7)
    assert class_ranks(scores, labels).tolist() == [1, 2, 3, 4, 5, 6, 7, 1]
    got = assert_matches(scores, labels)
    assert got["top1"] == pytest.approx(100 * 2 / 8)
    assert got["top5"] == pytest.approx(100 * 6 / 8)
    assert got["mean_per_class"] == pytest.approx(100 / 7)  # class 0 right, the other six wrong


def test_tie_with_higher_index_does_not_hurt():
    scores = torch.tensor([[0.5, 0.9, 0.9], [0.5, 0.9, 0.9]])
    assert class_ranks(scores, torch.tensor([1, 2])).tolist() == [1, 2]


def test_fewer_than_five_classes_caps_top5():
    scores, labels = random_case(11, 3, seed=5)
    got = assert_matches(scores, labels)
    assert got["top5"] == 100.0


def test_single_sample():
    assert classification_metrics(torch.tensor([[0.1, 0.7, 0.2]]), torch.tensor([1])) == {
        "top1": 100.0,
        "top5": 100.0,
        "mean_per_class": 100.0,
        "num": 1,
    }
    got = classification_metrics(torch.tensor([[0.1, 0.7, 0.2]]), torch.tensor([2]))
    assert (got["top1"], got["top5"], got["mean_per_class"]) == (0.0, 100.0, 0.0)


def test_mean_per_class_differs_from_micro_on_imbalance():
    # class 0: 3 samples all right; class 1: 1 sample wrong -> micro 75, per-class mean 50
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    got = assert_matches(scores, labels)
    assert got["top1"] == pytest.approx(75.0)
    assert got["mean_per_class"] == pytest.approx(50.0)


def test_absent_classes_do_not_count_in_mean_per_class():
    scores, _ = random_case(12, 10, seed=3)
    labels = torch.tensor([2, 2, 5, 5, 5, 9, 9, 2, 5, 9, 2, 2])  # 3 of 10 classes present
    assert_matches(scores, labels)


def test_low_precision_and_label_dtypes():
    scores, labels = random_case(16, 6, seed=7, decimals=1)
    assert_matches(scores.to(torch.bfloat16), labels.to(torch.int32))


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.long), "expected scores"),
        (torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), "expected scores"),
        (torch.zeros(3, 2), torch.zeros(3), "integer"),
        (torch.zeros(2, 2), torch.tensor([0, 2]), r"\[0, 2\)"),
        (torch.zeros(2, 2), torch.tensor([0, -1]), r"\[0, 2\)"),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "at least one"),
        (torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), "NaN"),
    ],
)
def test_bad_input_fails_loudly(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(scores, labels)


# ----- retrieval (re-exported from train.metrics)


def ref_retrieval(scores: list[list[float]]) -> dict:
    ranks = sorted(ref_rank(scores[i], i) for i in range(len(scores)))
    n = len(ranks)
    out = {f"R@{k}": 100.0 * sum(1 for r in ranks if r <= k) / n for k in (1, 5, 10)}
    out["MdR"] = float(ranks[(n - 1) // 2])  # lower middle for an even count, as documented
    out["MnR"] = sum(ranks) / n
    return out


def test_retrieval_is_the_training_implementation():
    assert retrieval_metrics is train.metrics.retrieval_metrics
    assert ground_truth_ranks is train.metrics.ground_truth_ranks


@pytest.mark.parametrize(("n", "decimals"), [(1, None), (2, None), (12, None), (33, None), (20, 0), (40, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_matches_reference(n, decimals, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, n, generator=g)
    if decimals is not None:
        scores = torch.round(scores, decimals=decimals)
    got = retrieval_metrics(scores)
    want = ref_retrieval(scores.tolist())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


def test_retrieval_all_equal_scores():
    got = retrieval_metrics(torch.ones(10, 10))
    assert got == pytest.approx({"R@1": 10.0, "R@5": 50.0, "R@10": 100.0, "MdR": 5.0, "MnR": 5.5})
