"""Zero-shot metrics: pure functions of score tensors.

Retrieval metrics are the ones training validates with (``train.metrics``), re-exported so the two can never drift.
Classification follows the same deterministic tie policy: a class whose score equals the true class's score ranks
ahead of it when its index is lower, so ties never count in the model's favour by accident of sort order.
"""

from __future__ import annotations

import torch

from train.metrics import ground_truth_ranks, retrieval_metrics

__all__ = ["classification_metrics", "class_ranks", "ground_truth_ranks", "retrieval_metrics"]


def class_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1-based rank of the true class of each sample. ``scores`` (N, C), ``labels`` (N,) int; returns (N,) int64.

    rank = 1 + #classes scoring higher + #classes scoring equal with a lower index.
    """
    if scores.ndim != 2 or labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(f"expected scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    n, c = scores.shape
    if n == 0 or c == 0:
        raise ValueError(f"need at least one sample and one class, got scores {tuple(scores.shape)}")
    labels = labels.to(device=scores.device, dtype=torch.long)
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"labels must lie in [0, {c}), got range [{int(labels.min())}, {int(labels.max())}]")
    if torch.isnan(scores).any():
        # NaN compares false with everything: a NaN true-class score would rank first
        raise ValueError("scores contain NaN; the model or features are broken")
    true_score = scores.gather(1, labels.unsqueeze(1))  # (N, 1)
    higher = (scores > true_score).sum(dim=1)  # (N,)
    lower_index = torch.arange(c, device=scores.device).unsqueeze(0) < labels.unsqueeze(1)  # (N, C)
    tied_before = ((scores == true_score) & lower_index).sum(dim=1)  # (N,)
    return (1 + higher + tied_before).cpu()


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int]:
    """``scores[i, c]``: similarity of sample i to class c; ``labels[i]``: the true class of sample i.

    Returns ``top1`` and ``top5`` (percent of samples whose true class ranks within k, k capped at C),
    ``mean_per_class`` (mean over the classes present in ``labels`` of their top-1 accuracy, percent) and ``num``.
    """
    ranks = class_ranks(scores, labels)  # (N,)
    c = scores.shape[1]
    labels = labels.cpu().long()
    metrics: dict[str, float | int] = {f"top{k}": float((ranks <= min(k, c)).double().mean() * 100) for k in (1, 5)}
    correct = (ranks == 1).double()  # (N,)
    counts = torch.bincount(labels, minlength=c).double()  # (C,)
    hits = torch.bincount(labels, weights=correct, minlength=c)  # (C,)
    present = counts > 0
    metrics["mean_per_class"] = float((hits[present] / counts[present]).mean() * 100)
    metrics["num"] = int(scores.shape[0])
    return metrics
