"""Retrieval metrics (pure functions of a score matrix); evaluation reuses them.

Ties are broken deterministically: a candidate whose score equals the ground
truth's ranks ahead of it when its index is lower (never in the model's favour
by accident of sort order).
"""

from __future__ import annotations

import torch


def ground_truth_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of candidate i for query i. ``scores`` (Q, C) with Q <= C; returns (Q,) int64."""
    q = scores.shape[0]
    gt = scores[torch.arange(q), torch.arange(q)].unsqueeze(1)  # (Q, 1)
    higher = (scores > gt).sum(dim=1)
    lower_index = torch.arange(scores.shape[1]).unsqueeze(0) < torch.arange(q).unsqueeze(1)  # (Q, C)
    tied_before = ((scores == gt) & lower_index).sum(dim=1)
    return 1 + higher + tied_before


def retrieval_metrics(scores: torch.Tensor) -> dict[str, float]:
    """``scores[i, j]``: similarity of query i to candidate j; the answer to query i is candidate i.

    Returns R@1, R@5, R@10 (percent of queries whose answer is in the top k), MdR and MnR (1-based ranks).
    """
    if torch.isnan(scores).any():
        raise ValueError("retrieval scores contain NaN: check the embeddings (a NaN would rank first)")
    ranks = ground_truth_ranks(scores.float().cpu()).double()
    metrics = {f"R@{k}": float((ranks <= k).double().mean() * 100) for k in (1, 5, 10)}
    metrics["MdR"] = float(ranks.median())  # torch's median: the lower middle value for an even count
    metrics["MnR"] = float(ranks.mean())
    return metrics
