"""A stored frame's JPEG header, read before the frame is decoded.

Its own module, without PyAV: the trainer's loader imports it, and so do the GPU runs, whose machine has no PyAV.
"""

from __future__ import annotations

import io

from PIL import Image

# The most pixels a stored frame may have: an 8K frame (pipeline.shard --size 0 keeps a video's own) has 33 M. A
# JPEG's header can declare 65,500 x 65,500 in a few hundred bytes, which libjpeg then fills with gray: 12,000 x
# 12,000 took a loader worker 7 s and 4.5 GB.
MAX_FRAME_PIXELS = 8192 * 8192


def jpeg_size(data: bytes, whole: bool = True) -> tuple[int, int]:
    """(height, width) of a stored frame from its JPEG header, without decoding it (Pillow reads the header only).
    Refused (ValueError): not a JPEG, over ``MAX_FRAME_PIXELS``, and with ``whole`` a file cut short (no end
    marker), the usual damage, which the caller cannot otherwise see before it decodes."""
    if whole and not (data.startswith(b"\xff\xd8") and data.rstrip(b"\x00").endswith(b"\xff\xd9")):
        raise ValueError("not a complete JPEG file (start or end marker missing)")
    too_many = f"over the {MAX_FRAME_PIXELS:,} pixels a stored frame may have"
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's own limit, far above ours: the size is in its message
        raise ValueError(f"a frame {too_many} ({e})") from None
    with image:
        if image.format not in ("JPEG", "MPO"):  # MPO: a camera's JPEG with more pictures after it, as libjpeg reads
            raise ValueError(f"not a JPEG but {image.format}")
        if image.width * image.height > MAX_FRAME_PIXELS:
            raise ValueError(f"a {image.width}x{image.height} frame, {too_many}")
        return image.height, image.width
