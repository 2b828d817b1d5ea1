"""The optimised step computes what the plain fp32 step computes: same loss and gradients within bf16 tolerance."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_CLIP
from open_clip.transformer import ResidualAttentionBlock

from train import distributed, loop
from train.attention import KERNELS
from train.config import resolve
from train.data import Batch
from train.model import TrimmedTokenizer, normalize_frames, tokenizer_for


def batches(n: int = 6) -> tuple[Batch, Batch]:
    g = torch.Generator().manual_seed(0)
    tok = tokenizer_for(str(TINY_CLIP))
    out = []
    for offset in (0, n):
        texts = [f"a {c} shape number {offset + i}" for i, c in enumerate(["red", "blue", "green"] * (n // 3))]
        video = torch.randint(0, 256, (n, 4, 3, 32, 32), generator=g, dtype=torch.uint8)
        out.append(Batch(video, tok(texts), texts, [str(i) for i in range(n)], torch.arange(n), 0))
    return out[0], out[1]


def loss_and_grads(models, cfg, lab, unl) -> tuple[float, torch.Tensor]:
    models.student.zero_grad(set_to_none=True)
    loss, _ = loop.compute_loss(models, lab, unl, cfg, torch.device("cpu"))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in models.student.parameters() if p.grad is not None])
    return float(loss.detach()), grads


NO_LEVERS = dict(packed_qkv=False, linear_patch_embed=False, cls_last_block=False)  # open_clip's own layers


def tiny_fp32(out, **overrides):
    """A plain fp32 CPU config of the tiny model and its models (teacher and student from one random init)."""
    cfg = resolve(
        "paper",
        model=str(TINY_CLIP),
        teacher_weights="",
        out=str(out),
        precision="fp32",
        wandb="off",
        progress=False,
        device="cpu",
        **overrides,
    )
    return cfg, loop.build_models(cfg, distributed.init_distributed("cpu"))


def test_bf16_step_matches_fp32_step_within_bf16_tolerance(tmp_path):
    cfg, models = tiny_fp32(tmp_path, lam=0.5)
    lab, unl = batches()
    loss32, grad32 = loss_and_grads(models, cfg, lab, unl)
    loss16, grad16 = loss_and_grads(models, dataclasses.replace(cfg, precision="bf16"), lab, unl)
    assert abs(loss16 - loss32) / loss32 < 2e-2
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert cosine > 0.99, cosine
    assert abs(grad16.norm() / grad32.norm() - 1) < 5e-2


def test_uint8_frames_normalised_on_the_device_equal_host_normalised_floats(tmp_path):
    cfg, models = tiny_fp32(tmp_path)
    lab, unl = batches()
    loss_u8, grad_u8 = loss_and_grads(models, cfg, lab, unl)
    as_float = [dataclasses.replace(b, video=normalize_frames(b.video)) for b in (lab, unl)]
    loss_f, grad_f = loss_and_grads(models, cfg, *as_float)
    assert loss_u8 == loss_f
    assert torch.equal(grad_u8, grad_f)


@pytest.mark.parametrize("split", [False, True])
def test_the_speed_flags_compute_the_same_step(tmp_path, split):
    """--packed_qkv, --split_qkv, --attention_kernel, --linear_patch_embed and --cls_last_block change how the
    layers run, not what the step computes: the same loss and gradients as open_clip's own layers in fp32, and within
    bf16 tolerance under bf16."""
    cfg, plain = tiny_fp32(tmp_path / "plain", lam=0.5, **NO_LEVERS)
    levers = dict(packed_qkv=True, attention_kernel="math", linear_patch_embed=True, cls_last_block=True)
    levers["split_qkv"] = split
    fast_cfg, fast = tiny_fp32(tmp_path / "fast", lam=0.5, **levers)
    fast.student.load_state_dict(plain.student.state_dict())  # one init for both (each run drew its own)
    fast.teacher.load_state_dict(plain.teacher.state_dict())
    lab, unl = batches()
    loss32, grad32 = loss_and_grads(plain, cfg, lab, unl)
    loss, grad = loss_and_grads(fast, fast_cfg, lab, unl)
    assert loss == pytest.approx(loss32, rel=1e-5)
    torch.testing.assert_close(grad, grad32, rtol=1e-3, atol=1e-5)
    loss16, grad16 = loss_and_grads(fast, dataclasses.replace(fast_cfg, precision="bf16"), lab, unl)
    assert abs(loss16 - loss32) / loss32 < 2e-2
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99


@pytest.mark.parametrize("kernel", ["cudnn", "math"])
def test_student_and_teacher_run_under_the_chosen_attention_kernel_and_packed_qkv(tmp_path, kernel):
    cfg, models = tiny_fp32(tmp_path, packed_qkv=True, attention_kernel=kernel)
    seen = []
    for model in (models.student, models.teacher):
        blocks = [m for m in model.modules() if isinstance(m, ResidualAttentionBlock)]
        assert len(blocks) == 4 and all("attention" in vars(b) for b in blocks)  # use_packed_attention's method
        blocks[0].register_forward_pre_hook(lambda *_: seen.append(torch._C._get_sdp_priority_order()[0]))
    loss_and_grads(models, cfg, *batches())
    assert seen == [KERNELS[kernel].value] * 2  # the teacher's forward, then the student's


def test_linear_patch_embed_reaches_the_student_and_the_teacher(tmp_path):
    _, models = tiny_fp32(tmp_path, linear_patch_embed=True)
    assert all("forward" in vars(m.clip.visual.conv1) for m in (models.student, models.teacher))
    _, plain = tiny_fp32(tmp_path / "plain", linear_patch_embed=False)
    assert not any("forward" in vars(m.clip.visual.conv1) for m in (plain.student, plain.teacher))


def test_cls_last_block_reaches_the_student_and_the_teacher(tmp_path):
    _, models = tiny_fp32(tmp_path, cls_last_block=True)
    assert all("forward" in vars(m.clip.visual.transformer) for m in (models.student, models.teacher))
    assert not any("forward" in vars(m.clip.transformer) for m in (models.student, models.teacher))  # the text's
    _, plain = tiny_fp32(tmp_path / "plain", cls_last_block=False)
    assert not any("forward" in vars(m.clip.visual.transformer) for m in (plain.student, plain.teacher))


def test_the_layer_levers_are_on_by_default_and_each_can_be_turned_off(tmp_path):
    """--packed_qkv, --linear_patch_embed and --cls_last_block are the trainer's defaults (1.30x the step on an
    H200); each False leaves its layers as open_clip made them."""

    def levered(models) -> dict[str, bool]:
        clips = [m.clip for m in (models.student, models.teacher)]
        return {
            "packed_qkv": all(
                "attention" in vars(b) for c in clips for b in c.modules() if isinstance(b, ResidualAttentionBlock)
            ),
            "linear_patch_embed": all("forward" in vars(c.visual.conv1) for c in clips),
            "cls_last_block": all("forward" in vars(c.visual.transformer) for c in clips),
        }

    _, models = tiny_fp32(tmp_path / "default")
    assert levered(models) == dict.fromkeys(NO_LEVERS, True)
    for flag in NO_LEVERS:
        _, models = tiny_fp32(tmp_path / flag, **{flag: False})
        assert levered(models) == {name: name != flag for name in NO_LEVERS}


def test_split_qkv_reaches_the_packed_attention_of_the_student_and_the_teacher(tmp_path):
    from train.attention import _block_attention, _split_block_attention
    from train.cls_last_block import _split_transformer_forward, _transformer_forward

    for split, block_way, last_way in (
        (False, _block_attention, _transformer_forward),
        (True, _split_block_attention, _split_transformer_forward),
    ):
        _, models = tiny_fp32(tmp_path / str(split), split_qkv=split)
        for clip in (m.clip for m in (models.student, models.teacher)):
            blocks = [b for b in clip.modules() if isinstance(b, ResidualAttentionBlock)]
            assert blocks and all(vars(b)["attention"].__func__ is block_way for b in blocks)
            assert vars(clip.visual.transformer)["forward"].__func__ is last_way
    with pytest.raises(ValueError, match="--split_qkv True splits the projections of the packed attention"):
        resolve("paper", out=str(tmp_path), split_qkv=True, **NO_LEVERS)
    resolve("paper", out=str(tmp_path), split_qkv=True, **{**NO_LEVERS, "cls_last_block": True})  # its last block


def test_the_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(loop.torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    tiny_fp32(tmp_path, compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert modes == ["max-autotune-no-cudagraphs"] * 2  # the student and the teacher


def test_persistent_tma_matmul_adds_the_templates_to_max_autotune_in_this_compile_only(tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    compiled = []
    monkeypatch.setattr(loop.torch, "compile", lambda model, **kwargs: compiled.append(kwargs) or model)
    tiny_fp32(tmp_path, compile=True, compile_mode="max-autotune-no-cudagraphs", persistent_tma_matmul=True)
    options = {"max_autotune": True, "coordinate_descent_tuning": True, "triton.enable_persistent_tma_matmul": True}
    assert compiled == [{"options": options}] * 2  # the mode's own options and the templates: student and teacher
    monkeypatch.undo()
    assert not inductor.triton.enable_persistent_tma_matmul  # nothing process-wide
    torch.compile(torch.nn.Linear(2, 2), **loop.compile_options("max-autotune-no-cudagraphs", True))  # known keys
    # no mode is the default mode: list_mode_options(None) is the table of every mode, which torch.compile refuses
    assert loop.compile_options(None, True) == {"options": {"triton.enable_persistent_tma_matmul": True}}
    # coordinate-descent tuning alone, in the default mode (max-autotune's modes have it already)
    assert loop.compile_options(None, False, True) == {"options": {"coordinate_descent_tuning": True}}
    assert loop.compile_options("default", True, True) == {
        "options": {"triton.enable_persistent_tma_matmul": True, "coordinate_descent_tuning": True}
    }
    with pytest.raises(ValueError, match="--coordinate_descent_tuning True tunes the kernels torch.compile makes"):
        resolve("paper", out=str(tmp_path), compile=False, coordinate_descent_tuning=True)
    with pytest.raises(ValueError, match="--persistent_tma_matmul True adds kernels that only max-autotune tunes"):
        resolve("paper", out=str(tmp_path), compile_mode="default", persistent_tma_matmul=True)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("attention_kernel", "fast"),
        ("compile_mode", "reduce-overhead"),
        ("compile_mode", "max-autotune"),
        ("teacher_stream", True),  # a switch before it had three values
    ],
)
def test_unknown_attention_kernels_and_cuda_graph_compile_modes_are_refused(tmp_path, flag, value):
    with pytest.raises(ValueError, match=f"--{flag} must be one of"):
        resolve("paper", out=str(tmp_path), **{flag: value})


SWITCHES = ("packed_qkv", "split_qkv", "linear_patch_embed", "cls_last_block", "persistent_tma_matmul")
SWITCHES += ("coordinate_descent_tuning",)


@pytest.mark.parametrize("flag", [*SWITCHES, "compile", "fuse"])
def test_a_switch_given_anything_but_true_or_false_is_refused(tmp_path, flag):
    """fire hands "maybe" over as a string, which Python would take as True."""
    with pytest.raises(ValueError, match=f"--{flag} must be True or False, got 'maybe'"):
        resolve("paper", out=str(tmp_path), **{flag: "maybe"})


@pytest.mark.parametrize("mode", ["beside", "ahead"])
def test_the_teacher_on_its_own_stream_trains_as_the_teacher_in_its_step(tmp_path, mode):
    """--teacher_stream takes the same batches in the same order and trains to the same losses and weights as the
    plain step, with one teacher forward per step. ahead takes each unlabeled batch one step early (take_unlabeled)
    and queues its teacher during the step before (on the CPU: after the backward, on the one stream); the last step
    queues none."""
    g = torch.Generator().manual_seed(1)
    tok = TrimmedTokenizer(tokenizer_for(str(TINY_CLIP)))  # as the trainer's loader cuts captions (--trim_text)
    words = ("a red shape", "a blue shape turning slowly", "a green shape turning slowly in the middle of a field")
    steps = []
    for i in range(4):  # captions of other widths in each batch and step
        pair = []
        for b in range(2):
            texts = [f"{words[(i + b) % 3]} {k}" for k in range(3)]
            video = torch.randint(0, 256, (3, 4, 3, 32, 32), generator=g, dtype=torch.uint8)
            pair.append(Batch(video, tok(texts), texts, ["1", "2", "3"], torch.arange(3), 0))
        steps.append(pair)
    runs = {}
    for teacher_stream in ("off", mode):
        cfg, models = tiny_fp32(tmp_path / teacher_stream, lam=0.5, lr=1e-3, teacher_stream=teacher_stream)
        if runs:  # one init for both
            models.student.load_state_dict(runs["off"]["student"])
            models.teacher.load_state_dict(runs["off"]["teacher"])
        init = {k: v.clone() for k, v in models.student.state_dict().items()}
        calls = []
        models.teacher.register_forward_hook(
            lambda module, args, out, calls=calls: calls.append((args[1].shape[1], out))
        )
        optimizer, scheduler = loop.build_optimizer(models.student, cfg, torch.device("cpu"))
        ahead = loop.Ahead() if teacher_stream == "ahead" else None
        labeled, unlabeled = iter([p[0] for p in steps]), iter([p[1] for p in steps])
        seen, losses = [], []
        for i in range(len(steps)):  # as the trainer's loop takes its batches
            lab, unl = next(labeled), loop.take_unlabeled(unlabeled, ahead, last=i + 1 == len(steps))
            seen.append(unl)
            result = loop.train_step(
                models, optimizer, scheduler, lab, unl, cfg, torch.device("cpu"), loop.Progress(), ahead
            )
            losses.append(float(result["loss"]))
        runs[teacher_stream] = {"student": init, "teacher": models.teacher.state_dict(), "losses": losses}
        runs[teacher_stream] |= {"calls": calls, "seen": seen, "trained": models.student.state_dict()}
    plain, other = runs["off"], runs[mode]
    assert all(a is b for a, b in zip(other["seen"], [p[1] for p in steps], strict=True))  # the same order
    assert len(other["calls"]) == len(plain["calls"]) == len(steps)  # one teacher forward per step
    # the teacher sees each unlabeled batch's captions at their own width whichever way it runs (one compiled graph)
    widths = [[width for width, _ in run["calls"]] for run in (plain, other)]
    assert widths[0] == widths[1] == [p[1].tokens.shape[1] for p in steps]
    assert len(set(widths[0])) > 1 and widths[0] != [p[0].tokens.shape[1] for p in steps]  # not the labeled width
    for (_, mine), (_, theirs) in zip(other["calls"], plain["calls"], strict=True):  # each batch's, in order
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a, b)
    assert other["losses"] == plain["losses"]  # the same computation, in another order on the GPU
    moved = max(float((w - plain["student"][n]).abs().max()) for n, w in plain["trained"].items())
    assert moved > 1e-3  # the steps trained: the weights below compare something
    for name, weight in plain["trained"].items():
        assert torch.equal(other["trained"][name], weight), name


def test_the_step_loss_is_eq5_of_the_labeled_contrastive_and_the_unlabeled_distillation(tmp_path):
    """Against the losses computed directly from each model's embeddings of its own batch: the contrastive loss on
    the labeled rows only, the distillation on the unlabeled rows against the teacher's, weighted by lam = 0.2 (at
    the demo's 0.5, swapping the two terms changed nothing)."""
    from train.loss import DISTILLATION, contrastive_loss

    cfg, models = tiny_fp32(tmp_path, lam=0.2)
    with torch.no_grad():  # a student apart from its teacher, so that the distillation is not at its floor
        for p in models.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lab, unl = batches()
    loss, parts = loop.compute_loss(models, lab, unl, cfg, torch.device("cpu"))
    with torch.no_grad():
        lab_video, lab_text = models.student(lab.video, lab.tokens)
        unl_video, unl_text = models.student(unl.video, unl.tokens)
        teacher_video, teacher_text = models.teacher(unl.video, unl.tokens)
        contrastive = contrastive_loss(lab_video, lab_text, cfg.sigma)
        distill = DISTILLATION[cfg.distillation](unl_video, unl_text, teacher_video, teacher_text, cfg.sigma)
    assert abs(float(contrastive) - float(distill)) > 1e-3  # the terms differ: their weights are seen
    assert torch.allclose(parts["contrastive"], contrastive, rtol=1e-5)
    assert torch.allclose(parts["distillation"], distill, rtol=1e-5)
    assert torch.allclose(loss.detach(), 0.2 * distill + 0.8 * contrastive, rtol=1e-5)
