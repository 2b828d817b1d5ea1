"""The training crop on the device: RandomResizedCrop + flip of a whole batch as two batched matmuls.

The loader workers' ``TrainTransform`` crops and resizes every video on the CPU,
about a third of a worker's time (profiled; the JPEG decode is another third).
Here the workers only decode (or not even that) and draw the crop; the device
applies all crops of a batch at once.

A resize with antialiasing is separable and linear: out = Wy @ frame @ Wx^T,
with Wy (S, H) and Wx (S, W) the resampling weights of the rows and columns.
Cropping is folded into the weights (zero outside the crop) and so is the flip
(Wx's rows reversed), so videos of different crops and of different sizes
(zero-padded to the largest in the batch) go through one batched matmul. The
weights are PyTorch's antialiased bilinear / bicubic weights
(``_upsample_{bilinear,bicubic}2d_aa``, the PIL convention), so the result is
what ``torchvision.transforms.v2.functional.resized_crop(..., antialias=True)``
gives for the same crop, up to float rounding (tested).

A crop is 6 numbers: top, left, height, width (pixels), flip (0/1), bicubic (0/1).
"""

from __future__ import annotations

import torch


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp(min=0)


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic with a = -0.5, the antialiasing kernel of PyTorch and PIL (plain bicubic uses -0.75)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(
    start: torch.Tensor, length: torch.Tensor, bicubic: torch.Tensor, out: int, size: int
) -> torch.Tensor:
    """Antialiased resampling weights of one axis, per video.

    Args:
        start, length: (B,) the crop's first pixel and its extent along the axis.
        bicubic: (B,) bool, bicubic (else bilinear) filter.
        out: output pixels along the axis; size: input pixels along the axis (padded size).
    Returns:
        (B, out, size) float32: row o holds the weights of input pixels for output pixel o; zero outside the crop.
    """
    start, length = start.float()[:, None, None], length.float()[:, None, None]  # (B, 1, 1)
    bicubic = bicubic.bool()[:, None, None]
    scale = length / out  # input pixels per output pixel
    stretch = scale.clamp(min=1)  # downscaling widens the filter (antialiasing); upscaling does not
    support = torch.where(bicubic, 2.0, 1.0) * stretch
    center = scale * (torch.arange(out, device=start.device, dtype=torch.float32)[None, :, None] + 0.5)  # (1|B, out, 1)
    pixel = torch.arange(size, device=start.device, dtype=torch.float32)[None, None, :] - start  # (B, 1, size), in crop
    # PyTorch's window: [trunc(center - support + 0.5), trunc(center + support + 0.5)) clipped to the crop
    first = (center - support + 0.5).trunc().clamp(min=0)
    last = torch.minimum((center + support + 0.5).trunc(), length)
    x = (pixel - center + 0.5) / stretch
    weights = torch.where(bicubic, _cubic(x), _triangle(x))
    weights = weights * ((pixel >= first) & (pixel < last))
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)


def resized_crop(frames: torch.Tensor, crops: torch.Tensor, size: int) -> torch.Tensor:
    """Crop, resize (antialiased) and flip every video of a batch, all frames of a video alike.

    Args:
        frames: (B, T, 3, H, W) uint8 (any strides), videos zero-padded at the bottom/right to a common H, W.
        crops: (B, 6) per video top, left, height, width, flip, bicubic (see the module docstring).
        size: output side S.
    Returns:
        (B, T, 3, S, S) uint8, rounded and clamped like torchvision's uint8 resize.
    """
    b, t, c, h, w = frames.shape
    crops = crops.to(frames.device)
    # fp16 on GPU (tensor cores; integers up to 2048 are exact, so the error stays under a quarter of a level)
    dtype = torch.float16 if frames.device.type == "cuda" else torch.float32
    rows = resample_weights(crops[:, 0], crops[:, 2], crops[:, 5], size, h)  # (B, S, H)
    cols = resample_weights(crops[:, 1], crops[:, 3], crops[:, 5], size, w)  # (B, S, W)
    cols = torch.where(crops[:, 4].bool()[:, None, None], cols.flip(1), cols)  # a flip reverses the output columns
    pixels = frames.to(dtype, memory_format=torch.contiguous_format).view(b, t * c, h, w)  # one pass
    # einsum runs these as batched matmuls over B (a broadcast @ would materialise the weights T*3 times)
    narrow = torch.einsum("bchw,bsw->bchs", pixels, cols.to(dtype))  # (B, T*3, H, S): the wide axis first
    out = torch.einsum("bchs,brh->bcrs", narrow, rows.to(dtype))  # (B, T*3, S, S)
    return out.float().round_().clamp_(0, 255).to(torch.uint8).view(b, t, c, size, size)
