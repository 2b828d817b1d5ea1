"""train.attention: self-attention on views of the packed QKV projection, against nn.MultiheadAttention."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_CLIP, assert_close_at_scale
from open_clip.transformer import ResidualAttentionBlock

from train.attention import KERNELS, TORCH_ORDER, attention_kernel, packed_attention, use_packed_attention
from train.model import create_clip


def causal_mask(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)  # as open_clip's text tower builds it


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_packed_attention_is_multihead_attention_with_its_gradients(mask, split):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(48, 4, batch_first=True)
    with torch.no_grad():  # torch starts the projection biases at 0, which would hide them
        mha.in_proj_bias.normal_()
    x = torch.randn(3, 7, 48, requires_grad=True)
    attn_mask = causal_mask(7) if mask else None
    expected = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
    params = [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias]
    got = packed_attention(x, *params, heads=4, attn_mask=attn_mask, split=split)
    assert_close_at_scale(got, expected, rel=1e-6)
    weights = torch.randn_like(expected)
    grads_expected = torch.autograd.grad((expected * weights).sum(), [x, *params])
    grads_got = torch.autograd.grad((got * weights).sum(), [x, *params])
    for g, e in zip(grads_got, grads_expected, strict=True):
        assert_close_at_scale(g, e)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_packed_attention_for_the_first_rows_is_those_rows_of_the_whole(mask, split):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(48, 4, batch_first=True)
    with torch.no_grad():  # open_clip and torch start the projection biases at 0, which would hide them
        mha.in_proj_bias.normal_()
    x = torch.randn(3, 7, 48, requires_grad=True)
    params = [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias]
    attn_mask = causal_mask(7) if mask else None
    whole = packed_attention(x, *params, heads=4, attn_mask=attn_mask)[:, :2]
    first = packed_attention(x, *params, heads=4, attn_mask=attn_mask, queries=2, split=split)
    assert first.shape == (3, 2, 48)
    torch.testing.assert_close(first, whole)
    weights = torch.randn_like(whole)
    grads_whole = torch.autograd.grad((whole * weights).sum(), [x, *params])
    grads_first = torch.autograd.grad((first * weights).sum(), [x, *params])
    for g, e in zip(grads_first, grads_whole, strict=True):
        torch.testing.assert_close(g, e)


def backward_ops(out: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``out``."""
    names, seen, todo = set(), set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo += [next_node for next_node, _ in node.next_functions]
    return names


@pytest.mark.parametrize("queries", [None, 1])
def test_split_projections_hand_the_attentions_gradients_to_their_products_as_they_come(queries):
    """--split_qkv: no gradient of q, k or v is gathered into the packed projection's layout (the unbind's backward
    stacks them into one tensor, a copy of 3 x rows x E on the GPU); the three products take them one by one."""
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    params = [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias]
    x = torch.randn(2, 5, 16, requires_grad=True)
    packed = backward_ops(packed_attention(x, *params, heads=2, queries=queries))
    split = backward_ops(packed_attention(x, *params, heads=2, queries=queries, split=True))
    assert "UnbindBackward0" in packed and "UnbindBackward0" not in split, (packed, split)
    assert "AddmmBackward0" in split or "LinearBackward0" in split


def test_a_boolean_mask_is_refused():
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    params = [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias]
    with pytest.raises(TypeError, match="float attn_mask"):
        packed_attention(torch.randn(1, 3, 8), *params, heads=2, attn_mask=torch.ones(3, 3, dtype=torch.bool))


def test_a_patched_clip_embeds_as_before_with_the_same_parameters():
    torch.manual_seed(0)
    clip = create_clip(str(TINY_CLIP))
    patched = copy.deepcopy(clip)
    blocks = sum(isinstance(m, ResidualAttentionBlock) for m in clip.modules())
    assert use_packed_attention(patched) == blocks == 4  # 2 image and 2 text blocks (the text ones masked)
    assert list(patched.state_dict()) == list(clip.state_dict())
    images, tokens = torch.rand(2, 3, 32, 32), torch.randint(1, 400, (2, 32))
    for model in (clip, patched):
        model.zero_grad()
        loss = model.encode_image(images).square().sum() + model.encode_text(tokens).square().sum()
        loss.backward()
    assert_close_at_scale(patched.encode_image(images), clip.encode_image(images), rel=1e-6)
    assert_close_at_scale(patched.encode_text(tokens), clip.encode_text(tokens), rel=1e-6)
    for (name, p), q in zip(patched.named_parameters(), clip.parameters(), strict=True):
        if p.grad is not None or q.grad is not None:
            assert_close_at_scale(p.grad, q.grad, msg=name)


def test_a_patched_image_tower_compiles_in_one_graph():
    clip = create_clip(str(TINY_CLIP))
    use_packed_attention(clip)
    explained = torch._dynamo.explain(clip.encode_image)(torch.rand(2, 3, 32, 32))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def sdpa_order() -> list[int]:
    """The order SDPA tries its kernels in now (SDPBackend values; torch keeps no public getter)."""
    return list(torch._C._get_sdp_priority_order())


@pytest.mark.parametrize("name", [n for n in KERNELS if n != "auto"])
def test_attention_kernel_puts_its_kernel_first_keeps_the_rest_and_restores(name):
    before = sdpa_order()
    with attention_kernel(name):
        order = sdpa_order()
        enabled = [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()]
        enabled += [torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()]
    assert order[0] == KERNELS[name].value
    assert [k for k in order[1:] if k in {b.value for b in TORCH_ORDER}] == [
        b.value for b in TORCH_ORDER if b != KERNELS[name]
    ]  # the others in torch's order: a kernel that cannot serve a call falls back rather than fails
    assert all(enabled)
    assert sdpa_order() == before


def test_attention_kernel_auto_changes_nothing_and_unknown_names_are_refused():
    before = sdpa_order()
    with attention_kernel("auto"):
        assert sdpa_order() == before
    assert [b.value for b in TORCH_ORDER] == [k for k in before if k in {b.value for b in TORCH_ORDER}]
    with pytest.raises(ValueError, match="must be one of auto, cudnn"):
        attention_kernel("fast")
