"""train.loss against brute-force references written with explicit loops over i, j."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.loss import (
    DISTILLATION,
    contrastive_loss,
    distillation_loss,
    fitclip_loss,
    kl_distillation_loss,
    teacher_entropy,
)

BATCHES = [1, 2, 5]
SIGMAS = [0.015, 0.05, 1.0]
DIM = 8


def unit(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Random L2-normalised rows, reproducible."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def four(batch: int, seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Student video, student text, teacher video, teacher text: (B, DIM) each."""
    return [unit(batch, DIM, seed=seed * 10 + k, dtype=dtype) for k in range(4)]


# ----- brute-force references: loops over i, j with per-element torch ops on 0-dim float64 tensors (autograd works)


def ref_sim(video, text, sigma):
    n = video.shape[0]
    return [[sum(video[i, k] * text[j, k] for k in range(video.shape[1])) / sigma for j in range(n)] for i in range(n)]


def ref_log_softmax(row):
    log_z = torch.log(sum(torch.exp(x) for x in row))
    return [x - log_z for x in row]


def transpose(m):
    return [list(col) for col in zip(*m, strict=True)]


def ref_contrastive(video, text, sigma):
    s = ref_sim(video, text, sigma)
    n = len(s)
    v2t = sum(-ref_log_softmax(s[i])[i] for i in range(n)) / n
    t2v = sum(-ref_log_softmax(transpose(s)[j])[j] for j in range(n)) / n
    return v2t + t2v


def ref_cross_entropy_rows(student, teacher):
    """mean_i -sum_j P_ij log Q_ij over rows."""
    n = len(student)
    total = 0.0
    for i in range(n):
        log_q = ref_log_softmax(student[i])
        log_p = ref_log_softmax([x.detach() for x in teacher[i]])
        total = total + sum(-torch.exp(log_p[j]) * log_q[j] for j in range(n))
    return total / n


def ref_kl_rows(student, teacher):
    """(1 / B) sum_i sum_j P_ij (log P_ij - log Q_ij): KL batchmean over rows."""
    n = len(student)
    total = 0.0
    for i in range(n):
        log_q = ref_log_softmax(student[i])
        log_p = ref_log_softmax([x.detach() for x in teacher[i]])
        total = total + sum(torch.exp(log_p[j]) * (log_p[j] - log_q[j]) for j in range(n))
    return total / n


def ref_distillation(video, text, t_video, t_text, sigma):
    s, t = ref_sim(video, text, sigma), ref_sim(t_video, t_text, sigma)
    return ref_cross_entropy_rows(s, t) + ref_cross_entropy_rows(transpose(s), transpose(t))


def ref_kl(video, text, t_video, t_text, sigma):
    s, t = ref_sim(video, text, sigma), ref_sim(t_video, t_text, sigma)
    return (ref_kl_rows(s, t) + ref_kl_rows(transpose(s), transpose(t))) / sigma**2


def ref_entropy(t_video, t_text, sigma):
    t = ref_sim(t_video, t_text, sigma)

    def rows(m):
        return sum(-sum(math.exp(lp) * lp for lp in (x.item() for x in ref_log_softmax(row))) for row in m) / len(m)

    return rows(t) + rows(transpose(t))


def float_contrastive(video, text, sigma):
    """Independent pure-Python check (math.exp / math.log on floats)."""
    v, t = video.tolist(), text.tolist()
    n = len(v)
    s = [[sum(a * b for a, b in zip(v[i], t[j], strict=True)) / sigma for j in range(n)] for i in range(n)]
    v2t = sum(-(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(n)))) for i in range(n)) / n
    t2v = sum(-(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(n)))) for j in range(n)) / n
    return v2t + t2v


# ----- values and gradients against the references


def grads_of(fn, *args):
    """(value, grad wrt video, grad wrt text); other args are passed through."""
    video, text = (a.detach().clone().requires_grad_(True) for a in args[:2])
    value = fn(video, text, *args[2:])
    value.backward()
    return value.detach(), video.grad, text.grad


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_contrastive_matches_loops(batch, sigma):
    video, text, _, _ = four(batch, seed=batch)
    value, gv, gt = grads_of(contrastive_loss, video, text, sigma)
    ref, rgv, rgt = grads_of(ref_contrastive, video, text, sigma)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-10)
    assert value.item() == pytest.approx(float_contrastive(video, text, sigma), rel=1e-9, abs=1e-10)
    torch.testing.assert_close(gv, rgv, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gt, rgt, rtol=1e-9, atol=1e-10)
    if batch == 1:
        assert value.item() == 0.0  # one candidate: the softmax is 1


@pytest.mark.parametrize("name, ref_fn", [("ce", ref_distillation), ("kl", ref_kl)])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_distillation_matches_loops(name, ref_fn, batch, sigma):
    fn = DISTILLATION[name]
    video, text, t_video, t_text = four(batch, seed=100 + batch)
    value, gv, gt = grads_of(fn, video, text, t_video, t_text, sigma)
    ref, rgv, rgt = grads_of(ref_fn, video, text, t_video, t_text, sigma)
    torch.testing.assert_close(value, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gv, rgv, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(gt, rgt, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("fn", [distillation_loss, kl_distillation_loss])
def test_teacher_gets_no_gradient(fn):
    video, text, t_video, t_text = (x.requires_grad_(True) for x in four(4, seed=7))
    fn(video, text, t_video, t_text, 0.05).backward()
    assert video.grad is not None and text.grad is not None
    assert t_video.grad is None and t_text.grad is None


@pytest.mark.parametrize("name", ["contrastive", "ce", "kl"])
def test_gradcheck_float64(name):
    video, text, t_video, t_text = four(3, seed=3)
    video.requires_grad_(True)
    text.requires_grad_(True)
    sigma = 0.3  # gradcheck's finite differences need moderate logits
    if name == "contrastive":
        assert torch.autograd.gradcheck(lambda v, t: contrastive_loss(v, t, sigma), (video, text))
    else:
        fn = DISTILLATION[name]
        assert torch.autograd.gradcheck(lambda v, t: fn(v, t, t_video, t_text, sigma), (video, text))


# ----- identities


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_distillation_of_teacher_itself_is_its_entropy(batch, sigma):
    video, text, _, _ = four(batch, seed=200 + batch)
    ce = distillation_loss(video, text, video, text, sigma)
    torch.testing.assert_close(ce, teacher_entropy(video, text, sigma), rtol=1e-10, atol=1e-10)
    assert ce.item() == pytest.approx(ref_entropy(video, text, sigma), rel=1e-9, abs=1e-10)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_kl_zero_for_teacher_itself_and_nonnegative(batch, sigma):
    video, text, t_video, t_text = four(batch, seed=300 + batch)
    assert abs(kl_distillation_loss(video, text, video, text, sigma).item()) < 1e-9
    assert kl_distillation_loss(video, text, t_video, t_text, sigma).item() >= -1e-12


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_kl_equals_ce_minus_teacher_entropy_over_sigma_squared(batch, sigma):
    """kl_distillation_loss = (distillation_loss - teacher_entropy) / sigma**2, and so are the student gradients."""
    video, text, t_video, t_text = four(batch, seed=400 + batch)
    kl, kl_gv, kl_gt = grads_of(kl_distillation_loss, video, text, t_video, t_text, sigma)
    ce, ce_gv, ce_gt = grads_of(distillation_loss, video, text, t_video, t_text, sigma)
    h = teacher_entropy(t_video, t_text, sigma)
    torch.testing.assert_close(kl, (ce - h) / sigma**2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(kl_gv, ce_gv / sigma**2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(kl_gt, ce_gt / sigma**2, rtol=1e-9, atol=1e-9)


def test_kl_at_reference_temperature_scales_by_4444():
    video, text, t_video, t_text = four(6, seed=5)
    sigma = 0.015
    kl = kl_distillation_loss(video, text, t_video, t_text, sigma)
    per_direction_sum = distillation_loss(video, text, t_video, t_text, sigma) - teacher_entropy(t_video, t_text, sigma)
    assert 1 / sigma**2 == pytest.approx(4444.44, rel=1e-5)
    assert kl.item() == pytest.approx(per_direction_sum.item() * 4444.444444444444, rel=1e-9)


def test_fitclip_loss_weights():
    contrastive, distill = torch.tensor(2.0), torch.tensor(10.0)
    assert fitclip_loss(contrastive, distill, lam=0.0).item() == 2.0
    assert fitclip_loss(contrastive, distill, lam=1.0).item() == 10.0
    assert fitclip_loss(contrastive, distill, lam=0.25).item() == pytest.approx(0.25 * 10 + 0.75 * 2)
    with pytest.raises(ValueError, match="lam"):
        fitclip_loss(contrastive, distill, lam=1.5)


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_aligned_embeddings_small_sigma_give_zero_contrastive(batch):
    emb = torch.eye(batch, 16, dtype=torch.float64)  # orthonormal rows: diagonal cos 1, the rest 0
    assert contrastive_loss(emb, emb, 0.01).item() < 1e-30  # 2 (B-1) e^-100 at most
    assert contrastive_loss(emb.float(), emb.float(), 0.01).item() < 1e-6


@pytest.mark.parametrize("name", ["contrastive", "ce", "kl"])
@pytest.mark.parametrize("sigma", [0.015, 0.05])
def test_bf16_inputs_give_float32_close_to_fp32(name, sigma):
    fp32 = four(8, seed=9, dtype=torch.float32)
    bf16 = [x.to(torch.bfloat16).requires_grad_(True) for x in fp32]
    rounded = [x.detach().float() for x in bf16]

    def loss(v, t, tv, tt):
        return contrastive_loss(v, t, sigma) if name == "contrastive" else DISTILLATION[name](v, t, tv, tt, sigma)

    out = loss(*bf16)
    assert out.dtype == torch.float32
    # Exactly the fp32 loss of the bf16-rounded embeddings: they are upcast before any arithmetic.
    torch.testing.assert_close(out.detach(), loss(*rounded), rtol=1e-6, atol=1e-6)
    # And close to the loss of the unrounded embeddings (only the inputs' bf16 rounding differs).
    assert out.item() == pytest.approx(loss(*fp32).item(), rel=0.02, abs=0.02)
    out.backward()
    assert bf16[0].grad is not None and bf16[0].grad.dtype == torch.bfloat16
    assert torch.isfinite(bf16[0].grad.float()).all()


def test_logits_stay_float32_under_autocast():
    video, text, t_video, t_text = four(8, seed=11, dtype=torch.float32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = contrastive_loss(video, text, 0.015)
        out_kl = kl_distillation_loss(video, text, t_video, t_text, 0.015)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, contrastive_loss(video, text, 0.015), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_kl, kl_distillation_loss(video, text, t_video, t_text, 0.015), rtol=1e-5, atol=1e-5)


def test_bad_inputs_fail_loudly():
    video, text, _, _ = four(4, seed=1)
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(video, text[:3], 0.05)
    with pytest.raises(ValueError, match="sigma"):
        contrastive_loss(video, text, 0.0)


def test_dispatch_table():
    assert DISTILLATION == {"ce": distillation_loss, "kl": kl_distillation_loss}
