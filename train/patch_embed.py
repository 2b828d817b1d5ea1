"""The ViT's patch embedding as one matrix product instead of a convolution (``--linear_patch_embed``).

open_clip embeds the patches with ``nn.Conv2d(3, width, kernel_size=p, stride=p)``: kernel and stride equal, so each
output pixel sees one patch and no two patches overlap. That is a matrix product of the (B * patches, 3 * p * p)
patch rows with the (width, 3 * p * p) kernel. cuDNN does not treat it as one: in the profile of the trainer's
compiled 128+128 ViT-B/16 step on an H200 its forward was ``precomputed_convolve_sgemm``, 13.6 ms for the student's
and the teacher's call (about 35 TFLOP/s, where the step's matrix products ran at about 650; benchmarks/README.md).
``linear_patch_embed`` computes the same function with ``F.linear`` on the same weight, so the patch rows go to
cuBLAS like every other projection of the step, and its weight gradient too. ``benchmarks.kernel_bench`` times the
two ways side by side; ``benchmarks.step_variants +patch`` times the step.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn


def linear_patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=p)`` for a (E, C, p, p) ``weight``: (B, C, H, W) -> (B, E, H // p, W // p).

    As the convolution, it drops the last H % p rows and W % p columns. The result is a permuted view of a
    (B, H // p, W // p, E) tensor, the layout the transformer wants next.
    """
    e, c, p, q = weight.shape
    if p != q:
        raise ValueError(f"linear_patch_embed needs square patches, got a {p}x{q} kernel")
    b, _, h, w = x.shape
    gh, gw = h // p, w // p
    x = x[:, :, : gh * p, : gw * p]
    rows = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * p * p)
    out = F.linear(rows, weight.reshape(e, c * p * p), bias)  # the row order (c, y, x) is the kernel's own
    return out.view(b, gh, gw, e).permute(0, 3, 1, 2)


def use_linear_patch_embed(model: nn.Module) -> int:
    """Embed the patches of every open_clip ``VisionTransformer`` in ``model`` with ``linear_patch_embed``; returns
    how many. The convolution module and its weight stay where they are, so state dicts and checkpoints do not
    change. A patch convolution that is not one (padding, dilation, groups, stride unlike the kernel) is left as
    it is."""
    count = 0
    for tower in model.modules():
        conv = getattr(tower, "conv1", None)
        if (
            isinstance(tower, VisionTransformer)
            and isinstance(conv, nn.Conv2d)
            and conv.kernel_size[0] == conv.kernel_size[1]
            and conv.stride == conv.kernel_size
            and conv.padding == (0, 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
        ):
            conv.forward = types.MethodType(_conv_forward, conv)
            count += 1
    return count


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``nn.Conv2d.forward`` of a patch convolution, through ``linear_patch_embed``."""
    return linear_patch_embed(x, self.weight, self.bias)
