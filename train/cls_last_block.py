"""The ViT's last transformer block for the class token only (``--cls_last_block``).

A CLIP ViT pools its class token (open_clip's ``pool_type`` "tok"): of the last block's output only row 0 reaches
the embedding. That row needs the keys and values of every token, but the query, the attention's output
projection, ``ln_2`` and the MLP of row 0 alone. So the last block's other 196 rows (ViT-B/16 at 224 px) are
computed and thrown away: in ViT-B/16, 10 of the block's 12 ``width^2`` matrix products per token, about 6.9% of the
image tower's FLOPs, and their backward in the student. ``cls_last_block`` computes row 0 of the block's output
and nothing else: the same function, the same parameters (state dicts, fusion and resume do not change).

The FLOPs it skips are not work the model needs, so the benchmarks count a step with this lever at the FLOPs it
performs (``benchmarks.step_variants +cls``): its MFU is not raised by the work it leaves out, its videos/s is.
"""

from __future__ import annotations

import types

import torch
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.attention import packable, packed_attention


def cls_last_block(block: ResidualAttentionBlock, x: torch.Tensor, split: bool = False) -> torch.Tensor:
    """``block(x)[:, :1]`` for a batch-first self-attention ``block`` and ``x`` (B, N, E), without the other rows.

    The attention is ``packed_attention`` (``train.attention``) with one query: K and V from the packed input
    projection for all N rows (with ``split``, ``--split_qkv``: each from its own product), Q for row 0 only.
    """
    attn = block.attn
    params = (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias)
    out = packed_attention(block.ln_1(x), *params, attn.num_heads, queries=1, split=split)
    y = x[:, :1] + block.ls_1(out)
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def _servable(block: nn.Module) -> bool:
    """A plain open_clip self-attention block (not a subclass: its forward is replaced, not called) that
    ``packed_attention`` computes exactly."""
    return type(block) is ResidualAttentionBlock and packable(block)


def _unwrapped(block: nn.Module) -> nn.Module:
    """The block inside ``train.model.checkpoint_blocks``' wrapper (or the block)."""
    return getattr(block, "_checkpoint_wrapped_module", block)


def use_cls_last_block(model: nn.Module, split: bool = False) -> int:
    """Run the last block of every open_clip ``VisionTransformer`` in ``model`` that pools its class token with
    ``cls_last_block`` (``split``: its keys and values from two products); returns how many towers. The tower's
    transformer then returns (B, 1, E), the class token's row, which its ``ln_post`` and pooling take as before.
    Towers that use more than that row (tokens as output, attentional or average pooling) or whose last block is not
    a plain self-attention block are left as they are.

    The last block is then not activation-checkpointed, even where ``--grad_checkpointing`` wrapped it: on the class
    token's row it keeps about a quarter of a full block's activations (its input, ``ln_1``'s output, the keys and
    values), so checkpointing it would free little.
    """
    count = 0
    for tower in model.modules():
        stack = getattr(tower, "transformer", None)
        if (
            isinstance(tower, VisionTransformer)
            and tower.pool_type == "tok"
            and tower.attn_pool is None
            and not tower.output_tokens
            and type(stack) is Transformer
            and stack.batch_first
            and len(stack.resblocks) > 0
            and _servable(_unwrapped(stack.resblocks[-1]))
        ):
            stack.forward = types.MethodType(_split_transformer_forward if split else _transformer_forward, stack)
            count += 1
    return count


def _transformer_forward(
    self: Transformer, x: torch.Tensor, attn_mask: torch.Tensor | None = None, split: bool = False
) -> torch.Tensor:
    """``Transformer.forward`` (batch first) with the last block on the class token's row: (B, N, E) -> (B, 1, E)."""
    if attn_mask is not None:  # open_clip's image tower passes none; a mask would need its own row of the scores
        raise ValueError("cls_last_block serves an image tower's transformer, which takes no attention mask")
    for block in self.resblocks[:-1]:
        if self.grad_checkpointing and not torch.jit.is_scripting():  # open_clip's own checkpointing, as it does it
            x = checkpoint(block, x, None, None, None, use_reentrant=False)
        else:
            x = block(x)
    return cls_last_block(_unwrapped(self.resblocks[-1]), x, split)


def _split_transformer_forward(
    self: Transformer, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``_transformer_forward`` with the last block's keys and values from two products (``--split_qkv``)."""
    return _transformer_forward(self, x, attn_mask, split=True)
