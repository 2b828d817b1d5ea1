"""train.patch_embed: the ViT's patch embedding as one matrix product, against the convolution it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, assert_close_at_scale

from train.attention import use_packed_attention
from train.model import create_clip
from train.patch_embed import linear_patch_embed, use_linear_patch_embed


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("height, width", [(32, 32), (35, 41)])  # the convolution drops the rows and columns left
def test_linear_patch_embed_is_the_strided_convolution_with_its_gradients(bias, height, width):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, height, width, generator=g)
    w = torch.randn(16, 3, 8, 8, generator=g, requires_grad=True)
    b = torch.randn(16, generator=g, requires_grad=True) if bias else None
    grad = torch.randn(3, 16, height // 8, width // 8, generator=g)
    outs = []
    for fn in (lambda: F.conv2d(x, w, b, stride=8), lambda: linear_patch_embed(x, w, b)):
        out = fn()
        out.backward(grad)
        outs.append((out.detach(), w.grad, None if b is None else b.grad))
        w.grad = None
        if b is not None:
            b.grad = None
    (conv, conv_w, conv_b), (linear, linear_w, linear_b) = outs
    assert linear.shape == conv.shape == (3, 16, height // 8, width // 8)
    torch.testing.assert_close(linear, conv, rtol=1e-5, atol=1e-4)  # sums of 192 products of N(0, 1)
    torch.testing.assert_close(linear_w, conv_w, rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(linear_b, conv_b)


def test_rectangular_kernels_are_refused():
    with pytest.raises(ValueError, match="square patches"):
        linear_patch_embed(torch.randn(1, 3, 16, 16), torch.randn(4, 3, 8, 4))


def test_a_patched_clip_embeds_images_as_before_with_the_same_parameters():
    torch.manual_seed(0)
    clip = create_clip(str(TINY_CLIP))
    patched = copy.deepcopy(clip)
    assert use_linear_patch_embed(patched) == 1  # the image tower's one patch convolution
    assert list(patched.state_dict()) == list(clip.state_dict())
    assert "forward" in vars(patched.visual.conv1) and "forward" not in vars(clip.visual.conv1)
    images = torch.rand(2, 3, 32, 32)
    for model in (clip, patched):
        model.zero_grad()
        model.encode_image(images).square().sum().backward()
    assert_close_at_scale(patched.encode_image(images), clip.encode_image(images), rel=1e-6)
    assert_close_at_scale(patched.visual.conv1.weight.grad, clip.visual.conv1.weight.grad)
    # a copy of a patched model runs the copy's own weight, not the original's
    again = copy.deepcopy(patched)
    with torch.no_grad():
        again.visual.conv1.weight.zero_()
    assert not torch.equal(again.encode_image(images), patched.encode_image(images))


def test_a_convolution_that_is_not_a_patch_embedding_is_left_alone():
    clip = create_clip(str(TINY_CLIP))
    clip.visual.conv1 = torch.nn.Conv2d(3, 64, kernel_size=8, stride=4, bias=False)  # overlapping windows
    assert use_linear_patch_embed(clip) == 0
    assert "forward" not in vars(clip.visual.conv1)


def test_an_image_tower_with_both_layout_levers_compiles_in_one_graph():
    clip = create_clip(str(TINY_CLIP))
    use_packed_attention(clip)
    use_linear_patch_embed(clip)
    explained = torch._dynamo.explain(clip.encode_image)(torch.rand(2, 3, 32, 32))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
