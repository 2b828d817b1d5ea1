"""Self-attention speed levers for open_clip's transformer blocks.

``use_packed_attention`` (``--packed_qkv``): ``nn.MultiheadAttention`` splits its packed input projection into q, k
and v with a copy (``.contiguous()``), and copies the heads' output back into rows. Under ``torch.compile`` these
become Triton copy kernels: about 18 ms of the 355 ms of GPU time in a 128+128 ViT-B/16 step on an H200
(benchmarks/README.md). ``packed_attention`` computes the same function with the same parameters, handing SDPA
strided views instead (the last stride 1). ``benchmarks.step_variants +qkv`` measures it; on by default since an
H200 run (with ``--linear_patch_embed`` and ``--cls_last_block``, 1.30x the step). ``--split_qkv`` computes q, k and
v by three products instead of one, which spares the backward a copy of their gradients (``packed_attention``);
``+split`` measures it.

``attention_kernel`` (``--attention_kernel``): which of SDPA's kernels is tried first. Torch's own order is flash
attention first and cuDNN's last, except on H100/H200 (and B200) with a recent cuDNN, where torch puts cuDNN's
first (``check_prefer_cudnn_attention`` in its sdp_utils.cpp; the default step's profile on an H200 shows cuDNN's
kernels). So ``cudnn`` changes something only on other cards; on H100/H200 the kernel to try is ``flash``.
``benchmarks.kernel_bench`` times each kernel at the step's shapes, ``benchmarks.step_variants
+cudnn/+flash/+efficient/+math`` in the step. The choice is made when SDPA is called (under ``torch.compile``: when the
graph is traced), so the context has to be active around the forward, not only at start-up.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from train.config import ATTENTION_KERNELS

# the order of SDPA's kernels after the one named first (torch's default order; on H100/H200 torch's own choice puts
# cuDNN's first instead, see above)
TORCH_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION)
# each --attention_kernel name (train.config) and the kernel SDPA then tries first; "auto" leaves torch's order
KERNELS = dict(
    zip(
        ATTENTION_KERNELS,
        (None, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
        strict=True,
    )
)


def attention_kernel(name: str) -> contextlib.AbstractContextManager:
    """While active, SDPA tries kernel ``name`` (a key of ``KERNELS``) first, then the others in torch's order.

    All stay enabled, so a call the first cannot serve (flash with the text tower's float mask, cuDNN's on a card
    or build without it, any GPU kernel on the CPU) falls back instead of failing. "auto" changes nothing.
    """
    if name not in KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(KERNELS)}, got {name!r}")
    first = KERNELS[name]
    if first is None:
        return contextlib.nullcontext()
    return sdpa_kernel([first, *(k for k in TORCH_ORDER if k != first)], set_priority=True)


def packed_attention(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    heads: int,
    attn_mask: torch.Tensor | None = None,
    queries: int | None = None,
    split: bool = False,
) -> torch.Tensor:
    """Multi-head self-attention of ``x`` (B, N, E), batch first, as ``nn.MultiheadAttention`` computes it.

    ``attn_mask``: float, added to the scores: (N, N), or (B*heads, N, N) as ``nn.MultiheadAttention`` takes it.
    (A boolean mask means the opposite to ``nn.MultiheadAttention`` and to SDPA, so it is refused.)
    ``queries``: only the first this many rows attend (over all N), and only their rows are returned:
    (B, queries, E), the same values as the first rows of the whole output (``train.cls_last_block``).
    ``split`` (``--split_qkv``): q, k and v each from its own matrix product over its slice of the packed weight,
    rather than one product whose output they are views of. The same function; what changes is the backward:
    SDPA's kernels return the three gradients as three tensors, which the one product's backward first copies into
    the packed layout (a stack of 3 x rows x E: about 0.45 ms per block of the student's image tower at 128+128 on
    an H200, 4.9 ms a step); three products take each as it comes, and their input gradients are added (the bias's
    gradient reads the three as it read the copy).
    """
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        raise TypeError("packed_attention takes a float attn_mask (added to the scores), not a boolean one")
    b, n, e = x.shape
    d = e // heads
    weights = in_proj_weight.chunk(3)
    biases = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
    if split or queries is not None:
        rows = x if queries is None else x[:, :queries]  # only those rows' queries are needed
        q = F.linear(rows, weights[0], biases[0]).view(b, rows.shape[1], heads, d).transpose(1, 2)
    if split:
        k = F.linear(x, weights[1], biases[1]).view(b, n, heads, d).transpose(1, 2)
        v = F.linear(x, weights[2], biases[2]).view(b, n, heads, d).transpose(1, 2)
    elif queries is None:
        qkv = F.linear(x, in_proj_weight, in_proj_bias).view(b, n, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim): views, no copy
    else:  # the query projection of those rows alone (above), the key and value projections of every row
        bias = None if in_proj_bias is None else in_proj_bias[e:]
        kv = F.linear(x, in_proj_weight[e:], bias).view(b, n, 2, heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.view(b, heads, n, n)
    if attn_mask is not None and queries is not None:
        attn_mask = attn_mask[..., :queries, :]  # the scores of the rows that attend
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, rows, head_dim)
    return F.linear(out.transpose(1, 2).reshape(b, q.shape[2], e), out_proj_weight, out_proj_bias)


def packable(block: nn.Module) -> bool:
    """An open_clip self-attention block whose ``nn.MultiheadAttention`` ``packed_attention`` computes exactly:
    batch first, one packed input projection, no extra key/value biases or zero rows, no dropout, not cross-attention
    (``use_packed_attention``, ``train.cls_last_block``)."""
    attn = getattr(block, "attn", None)
    return (
        isinstance(block, ResidualAttentionBlock)
        and isinstance(attn, nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
        and attn.dropout == 0
        and not hasattr(block, "ln_1_kv")
    )


def use_packed_attention(model: nn.Module, split: bool = False) -> int:
    """Route the self-attention of every open_clip ``ResidualAttentionBlock`` in ``model`` through
    ``packed_attention`` (with ``split``: its q, k and v from three products); returns how many blocks. The
    parameters stay where they are, so state dicts and checkpoints do not change. Blocks it cannot serve
    (cross-attention, sequence-first, unequal q/k/v sizes, dropout; ``packable``) are left as they are."""
    count = 0
    for block in model.modules():
        if packable(block):
            block.attention = types.MethodType(_split_block_attention if split else _block_attention, block)
            count += 1
    return count


def _block_attention(
    self: ResidualAttentionBlock, q_x, k_x=None, v_x=None, attn_mask=None, split: bool = False
) -> torch.Tensor:
    """``ResidualAttentionBlock.attention`` for self-attention, through ``packed_attention``."""
    if k_x is not None or v_x is not None:  # not self-attention: open_clip's own
        return ResidualAttentionBlock.attention(self, q_x, k_x, v_x, attn_mask)
    attn = self.attn
    mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None  # as open_clip converts it
    params = (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias)
    return packed_attention(q_x, *params, attn.num_heads, mask, split=split)


def _split_block_attention(self: ResidualAttentionBlock, q_x, k_x=None, v_x=None, attn_mask=None) -> torch.Tensor:
    """``_block_attention`` with q, k and v from three products (``--split_qkv``)."""
    return _block_attention(self, q_x, k_x, v_x, attn_mask, split=True)
