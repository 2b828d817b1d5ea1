"""train.cls_last_block: the ViT's last block for the class token only, against the full block it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_CLIP, assert_close_at_scale
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from train.attention import use_packed_attention
from train.cls_last_block import cls_last_block, use_cls_last_block
from train.model import checkpoint_blocks, create_clip
from train.monitor import forward_flops
from train.patch_embed import use_linear_patch_embed


@pytest.mark.parametrize("layer_scale", [None, 0.5])
def test_cls_last_block_is_row_0_of_the_full_block_with_its_gradients(layer_scale):
    torch.manual_seed(0)
    block = ResidualAttentionBlock(48, 4, ls_init_value=layer_scale)
    with torch.no_grad():  # every parameter random: open_clip starts the projection biases at 0, which hides them
        for param in block.parameters():
            param.normal_(0, 0.3)
    x = torch.randn(3, 10, 48, requires_grad=True)
    grad = torch.randn(3, 1, 48)
    outs = []
    for fn in (lambda: block(x)[:, :1], lambda: cls_last_block(block, x)):
        block.zero_grad()
        x.grad = None
        out = fn()
        out.backward(grad)
        outs.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in block.named_parameters()}))
    (full, full_x, full_p), (cls, cls_x, cls_p) = outs
    assert cls.shape == (3, 1, 48)
    torch.testing.assert_close(cls, full)
    torch.testing.assert_close(cls_x, full_x)  # every row's keys and values still reach the class token
    assert full_p.keys() == cls_p.keys()
    for name in full_p:
        torch.testing.assert_close(cls_p[name], full_p[name], msg=name)


def test_a_patched_clip_embeds_images_as_before_with_fewer_flops():
    torch.manual_seed(0)
    clip = create_clip(str(TINY_CLIP)).train()
    patched = copy.deepcopy(clip)
    assert use_cls_last_block(patched) == 1  # the image tower; the text tower pools another row
    assert list(patched.state_dict()) == list(clip.state_dict())
    images = torch.rand(3, 3, 32, 32)
    for model in (clip, patched):
        model.zero_grad()
        model.encode_image(images).square().sum().backward()
    torch.testing.assert_close(patched.encode_image(images), clip.encode_image(images))
    for (name, p), q in zip(clip.visual.named_parameters(), patched.visual.parameters(), strict=True):
        assert_close_at_scale(q.grad, p.grad, msg=name)
    # the rows left out: the query, output projection and MLP products of 16 of the 17 rows (width 64, 32 px in
    # patches of 8), 10 of the block's 12 width x width products; the CPU's SDPA may count its attention too
    b, rows, width = 3, 16, 64
    skipped = 2 * b * rows * 10 * width**2
    attention = 2 * 2 * b * rows * 17 * width  # scores and weighted values of those rows
    saved = forward_flops(clip.visual, images) - forward_flops(patched.visual, images)
    assert skipped <= saved <= skipped + attention


OTHER_LEVERS = {
    "every block checkpointed": lambda m: checkpoint_blocks(m, True),
    "packed attention and linear patches": lambda m: (use_packed_attention(m), use_linear_patch_embed(m)),
}


@pytest.mark.parametrize(
    "other, first",  # first: the other lever before this one
    [
        ("every block checkpointed", False),
        ("every block checkpointed", True),
        ("packed attention and linear patches", False),
    ],
)
def test_with_the_other_levers_the_embedding_and_the_gradients_are_the_same(other, first):
    torch.manual_seed(0)
    clip = create_clip(str(TINY_CLIP)).train()
    images = torch.rand(2, 3, 32, 32)
    want = clip.encode_image(images)
    want.sum().backward()
    model = copy.deepcopy(clip)
    if first:  # checkpoint_blocks wraps the last block first: it is unwrapped, not refused
        OTHER_LEVERS[other](model)
        assert use_cls_last_block(model) == 1
    else:  # the order of train.loop.build_models
        assert use_cls_last_block(model) == 1
        OTHER_LEVERS[other](model)
    model.zero_grad()
    got = model.encode_image(images)
    got.sum().backward()
    torch.testing.assert_close(got, want)
    grads = [(p.grad, q.grad) for p, q in zip(clip.visual.parameters(), model.visual.parameters(), strict=True)]
    assert all(q is not None for _, q in grads)
    for p, q in grads:
        assert_close_at_scale(q, p)


def test_towers_that_use_more_than_the_class_token_are_left_alone():
    for kwargs in (dict(pool_type="avg"), dict(output_tokens=True)):
        tower = VisionTransformer(32, 8, width=32, layers=2, heads=2, mlp_ratio=4.0, output_dim=16, **kwargs)
        assert use_cls_last_block(tower) == 0
        assert "forward" not in vars(tower.transformer)


def test_an_image_tower_with_every_layout_lever_compiles_in_one_graph():
    clip = create_clip(str(TINY_CLIP))
    for lever in (use_packed_attention, use_linear_patch_embed, use_cls_last_block):
        lever(clip)
    explained = torch._dynamo.explain(clip.encode_image)(torch.rand(2, 3, 32, 32))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
