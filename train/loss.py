"""FitCLIP losses (paper Eq. 1-5): pure functions of tensors, no I/O, no collectives.

All embeddings arrive L2-normalised, shape ``(B, D)``; video row ``i`` and text row ``i`` are a pair. Gathering across
ranks happens before these functions are called (``train.distributed.gather_with_grad``), so ``B`` is the global batch.

Logits are always computed in (at least) float32, with autocast off: a bf16 result has an 8-bit significand, so
cosine similarities in [0.5, 1) are rounded to steps of 2**-8 ~= 4e-3; divided by a temperature as small as 0.015
that is a logit error of up to ~0.13, comparable to the gaps the softmax has to resolve, and a bf16 log-sum-exp would
lose more. Casting the embeddings first
keeps the loss (and its gradient, which flows back through the cast into the bf16 embeddings) as accurate as fp32.

Relation between the two distillation forms (exact, per direction, with P the teacher's and Q the student's softmax):
``KL(P || Q) = CE(P, Q) - H(P)``, so
``kl_distillation_loss = (distillation_loss - teacher_entropy) / sigma**2``,
where ``teacher_entropy`` is the sum over the two directions of the mean (over rows) of the teacher's row entropy.
The two forms therefore have the same gradient with respect to the student up to the factor ``1 / sigma**2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DISTILLATION",
    "contrastive_loss",
    "distillation_loss",
    "fitclip_loss",
    "kl_distillation_loss",
    "similarity_logits",
    "teacher_entropy",
]


def similarity_logits(video: Tensor, text: Tensor, sigma: float) -> Tensor:
    """Temperature-scaled cosine similarities ``(B, D), (B, D) -> (B, B)``; row = video, column = text.

    float32 for float32/bf16/fp16 inputs, float64 for float64 inputs, also inside an autocast region.
    """
    _check_pair(video, text)
    if sigma <= 0:
        raise ValueError(f"sigma (temperature) must be > 0, got {sigma}")
    dtype = torch.promote_types(video.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays fp64 (gradcheck)
    # Autocast would run the matmul in bf16 again whatever the input dtype, so it is switched off here.
    with torch.autocast(device_type=video.device.type, enabled=False):
        return video.to(dtype) @ text.to(dtype).T / sigma  # (B, B)


def contrastive_loss(video: Tensor, text: Tensor, sigma: float) -> Tensor:
    """Symmetric InfoNCE, Eq. 1 + Eq. 2: ``L_v2t + L_t2v``.

    ``L_v2t = mean_i -log softmax_j(s_ij / sigma)[j = i]`` over rows of ``s = video @ text.T``; ``L_t2v`` is the same
    over columns. Returns a float32 scalar (float64 for float64 inputs).
    """
    logits = similarity_logits(video, text, sigma)  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


def distillation_loss(video: Tensor, text: Tensor, teacher_video: Tensor, teacher_text: Tensor, sigma: float) -> Tensor:
    """Paper form of the distillation loss, Eq. 3 + Eq. 4 (recipe ``paper``).

    Per direction: ``mean_i -sum_j P_ij log Q_ij`` with ``P = softmax(teacher_sim / sigma)`` (soft targets, no gradient)
    and ``Q = softmax(student_sim / sigma)``, the softmax over rows (video -> text) and over columns (text -> video);
    the two directions are summed. Returns a float32 scalar (float64 for float64 inputs).
    """
    student = similarity_logits(video, text, sigma)  # (B, B)
    teacher = similarity_logits(teacher_video, teacher_text, sigma).detach()  # (B, B)
    # cross_entropy with probability targets is exactly mean_i -sum_j P_ij log_softmax(Q)_ij.
    v2t = F.cross_entropy(student, teacher.softmax(dim=1))
    t2v = F.cross_entropy(student.T, teacher.T.softmax(dim=1))
    return v2t + t2v


def kl_distillation_loss(
    video: Tensor, text: Tensor, teacher_video: Tensor, teacher_text: Tensor, sigma: float
) -> Tensor:
    """Authors' public-code form of the distillation loss (recipe ``reference``).

    Per direction: ``KL(P || Q)`` with ``reduction="batchmean"``, i.e.
    ``(1 / B) sum_i sum_j P_ij (log P_ij - log Q_ij)`` with P, Q the teacher and student softmaxes over rows
    (video -> text), then the same over columns (text -> video). The two directions are summed and the sum is
    multiplied by ``1 / sigma**2`` (the authors multiply by the squared logit scale, ``(1 / 0.015)**2 ~= 4444``).
    Equals ``(distillation_loss - teacher_entropy) / sigma**2`` exactly. Returns a float32 scalar (float64 for float64
    inputs), >= 0, and 0 when the student's similarities equal the teacher's.
    """
    student = similarity_logits(video, text, sigma)  # (B, B)
    teacher = similarity_logits(teacher_video, teacher_text, sigma).detach()  # (B, B)
    # log_target=True uses the teacher's log-probabilities directly: no log(0) when a teacher probability underflows.
    v2t = F.kl_div(student.log_softmax(dim=1), teacher.log_softmax(dim=1), reduction="batchmean", log_target=True)
    t2v = F.kl_div(student.T.log_softmax(dim=1), teacher.T.log_softmax(dim=1), reduction="batchmean", log_target=True)
    return (v2t + t2v) / sigma**2


def teacher_entropy(teacher_video: Tensor, teacher_text: Tensor, sigma: float) -> Tensor:
    """``H_v2t + H_t2v``: mean over rows of the entropy of the teacher's row softmax, plus the same over columns.

    The gap between the two distillation forms: ``distillation_loss - kl_distillation_loss * sigma**2``.
    """
    teacher = similarity_logits(teacher_video, teacher_text, sigma).detach()  # (B, B)

    def mean_row_entropy(logits: Tensor) -> Tensor:  # (B, B) -> ()
        log_p = logits.log_softmax(dim=1)
        return -(log_p.exp() * log_p).sum(dim=1).mean()

    return mean_row_entropy(teacher) + mean_row_entropy(teacher.T)


def fitclip_loss(contrastive: Tensor, distillation: Tensor, lam: float) -> Tensor:
    """Eq. 5: ``lam * distillation + (1 - lam) * contrastive``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam * distillation + (1.0 - lam) * contrastive


# Distillation form by config name: "ce" = paper (Eq. 3-4), "kl" = authors' public code.
DISTILLATION = {"ce": distillation_loss, "kl": kl_distillation_loss}


def _check_pair(video: Tensor, text: Tensor) -> None:
    if video.ndim != 2 or text.ndim != 2 or video.shape != text.shape:
        raise ValueError(
            f"expected video and text embeddings of the same shape (B, D), got {tuple(video.shape)} and "
            f"{tuple(text.shape)}"
        )
