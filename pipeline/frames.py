"""Sample N frames at the midpoints of N equal segments of a clip, resize, JPEG-encode.

This is the one frame sampler of the project: sharding uses it for WebVid and
evaluation uses it for raw benchmark videos, so train and test frames are made
the same way.

Decoding uses PyAV (the FFmpeg libraries in-process). Why not the ffmpeg CLI:
four ``-ss`` seeks cost ~120 ms per 18 s clip and a one-pass ``select`` filter
~160 ms, mostly process start-up and decoding frames nobody asked for. Here a
cheap demux pass indexes the packets (no decoding), which gives the stream's
real duration and its keyframes; then only the group(s) of pictures that hold
the wanted timestamps are decoded, each from its keyframe up to the last wanted
frame in it.
"""

from __future__ import annotations

import bisect
import errno
import io
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image

# Decoders that read ``skip_frame`` again for every packet, so unwanted non-reference frames can be skipped one
# by one. Others read it once when they open (libdav1d for AV1: skipping the first packet would hide every
# non-reference frame after it), so they decode everything.
SKIPS_PER_PACKET = frozenset({"h264", "hevc", "mpeg1video", "mpeg2video", "mpeg4"})
MAX_PIXEL_ASPECT = 4  # a stored pixel's width over height, or its inverse, beyond which it is taken as square
# A stream with this much less of it present than its container declares is cut short: more than a frame's
# rounding, and less than would take a real but shorter track for a cut one
CUT_SECONDS, CUT_SHARE = 0.5, 0.1
# PIL transposes that undo a display rotation, by the rotation's degrees counter-clockwise (PyAV's frame.rotation)
_UPRIGHT = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
# The demuxers a video may be opened with: video containers and raw video streams. FFmpeg otherwise probes the
# bytes for any of its ~400 formats, and some of them read other files or the network: a downloaded "video" that
# is an ffconcat list decodes the local files it names (relative to the working folder), an SDP text opens UDP
# sockets and waits for whatever streams to them, an HLS playlist fetches its segments. A name matches any of a
# demuxer's comma-separated names ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm").
VIDEO_DEMUXERS = (
    "mov,mp4,matroska,webm,avi,flv,asf,mpeg,mpegts,ogg,nut,mxf,dv,rm,wtv,m4v,h264,hevc,mpegvideo,ivf,obu,"
    "yuv4mpegpipe,mjpeg,gif"
)

__all__ = [
    "ClipFrames",
    "FrameError",
    "sample_timestamps",
    "select_frame_indices",
    "resized_size",
    "displayed_size",
    "decode_frames",
    "encode_jpeg",
]


class FrameError(Exception):
    """A video that cannot give N frames. ``reason`` is a short stable code for stats; ``transient``: a later try
    may succeed (``pipeline.shard --retry_failed``)."""

    def __init__(self, reason: str, detail: str, transient: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient


@dataclass(frozen=True)
class ClipFrames:
    """What :func:`decode_frames` returns."""

    images: list[Image.Image]  # N RGB images, time order, already resized
    timestamps: list[float]  # seconds from the start of the stream, the sampling instants t_k
    frame_times: list[float]  # seconds from the start, presentation time of each frame taken
    duration: float  # D, the stream's real duration in seconds (from packet timestamps)
    width: int  # original size as displayed (non-square pixels made square, a phone video's rotation applied)
    height: int


def sample_timestamps(duration: float | Fraction, n: int, start: float | Fraction = 0) -> list[float | Fraction]:
    """Midpoints of ``n`` equal segments of ``[start, start + duration)``: t_k = start + (k + 0.5) * D / n, exact
    for a :class:`~fractions.Fraction` ``duration`` and ``start``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    return [start + (2 * k + 1) * duration / (2 * n) for k in range(n)]


def select_frame_indices(frame_pts: list[float | Fraction], targets: list[float | Fraction]) -> list[int]:
    """For each target time, the index of the frame shown at that instant.

    ``frame_pts`` is sorted presentation times. The frame shown at time t is the
    last one with pts <= t (the first frame if t precedes every frame).
    """
    return [max(bisect.bisect_right(frame_pts, t) - 1, 0) for t in targets]


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side scaled to ``size``; never upscales; keeps aspect ratio."""
    short = min(width, height)
    if size <= 0 or short <= size:
        return width, height
    scale = size / short
    if width <= height:
        return size, max(1, round(height * scale))
    return max(1, round(width * scale)), size


def displayed_size(width: int, height: int, pixel_aspect: Fraction) -> tuple[int, int]:
    """(w, h) of a ``width`` x ``height`` frame of non-square pixels shown with square ones. One side is
    stretched, never shrunk (as mpv does), so no stored detail is lost before the resize."""
    if pixel_aspect > 1:
        return round(width * pixel_aspect), height
    if pixel_aspect < 1:
        return width, round(height / pixel_aspect)
    return width, height


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB image (deterministic for the same pixels and settings)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class _Packet:
    pts: int  # stream time base
    end: int  # pts + duration
    keyframe: bool
    discard: bool = False  # decoded as a reference but never shown: an MP4 edit list's pre-roll (a -c copy cut)


def open_options(av_version: str) -> dict[str, str]:
    """``av.open``'s options for PyAV ``av_version``. Before 19 a file's metadata that is not UTF-8 (a camera's
    title) raised UnicodeDecodeError unless ``metadata_errors="ignore"``; PyAV 19 (the only one on Python 3.12+)
    keeps such text itself and has no such argument: passing it failed every video with a TypeError."""
    major = int(av_version.split(".")[0])
    return {"metadata_errors": "ignore"} if major < 19 else {}


_OPEN_OPTIONS = open_options(av.__version__)


def _open(source: str | Path | bytes) -> av.container.InputContainer:
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    elif isinstance(source, Path):
        source = str(source)
    try:
        return av.open(source, mode="r", container_options={"format_whitelist": VIDEO_DEMUXERS}, **_OPEN_OPTIONS)
    except av.FFmpegError as e:  # not a media file, truncated header, unknown format, a format not in the list
        hint = " (not one of the video formats read here?)" if e.errno == errno.EINVAL else ""
        raise FrameError("undecodable", f"cannot open as video: {e}{hint}") from e


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        if "audio" in kinds:
            raise FrameError("audio_only", f"no video stream (streams: {', '.join(kinds)})")
        raise FrameError("undecodable", f"no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    # One decoding thread per worker: parallelism comes from worker processes.
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = 1
    return stream


def _index_packets(container: av.container.InputContainer, stream: av.VideoStream) -> list[_Packet]:
    """Demux (no decoding) the whole video stream: timestamps and keyframe flags, sorted by pts."""
    packets: list[_Packet] = []
    try:
        for packet in container.demux(stream):
            pts = _pts(packet)
            if pts is None or packet.size == 0:  # flush packet, or no timestamp at all
                continue
            packets.append(_Packet(pts, pts + (packet.duration or 0), packet.is_keyframe, packet.is_discard))
    except av.FFmpegError as e:
        raise FrameError("undecodable", f"demuxing failed after {len(packets)} packets: {e}") from e
    packets.sort(key=lambda p: p.pts)
    return packets


def _shown(packets: list[_Packet]) -> list[_Packet]:
    """The frames a player shows, by pts: not an edit list's pre-roll, and not before the first keyframe (a
    stream cut mid-GOP starts with frames that reference pictures it lacks, which decoders drop)."""
    shown = [p for p in packets if not p.discard]
    keyframes = [p.pts for p in packets if p.keyframe]
    if keyframes:  # some containers flag none (then every frame is taken as decodable)
        shown = [p for p in shown if p.pts >= keyframes[0]]
    return shown


def _stream_duration(packets: list[_Packet], stream: av.VideoStream) -> tuple[int, int]:
    """(first pts, end pts) in the stream time base. The end counts the last frame's duration."""
    first = packets[0].pts
    end = max(p.end for p in packets)
    if end <= packets[-1].pts:  # container gave no packet durations: assume the average spacing
        if len(packets) > 1:
            end = packets[-1].pts + round((packets[-1].pts - first) / (len(packets) - 1))
        elif stream.average_rate:
            end = packets[-1].pts + round(1 / (stream.average_rate * stream.time_base))
        else:
            end = packets[-1].pts + 1
    return first, end


def _decode_from(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    keyframe_pts: int | None,
    wanted: set[int],
    skip: bool = True,
) -> dict[int, av.VideoFrame]:
    """Decode forward (from the keyframe at ``keyframe_pts``, or from where the container is)
    until every pts in ``wanted`` has been seen.

    With ``skip``, only wanted frames and reference frames are decoded where the decoder allows it per packet
    (:data:`SKIPS_PER_PACKET`): a non-reference frame (H.264 ``nal_ref_idc == 0``, e.g. most B-frames) that is
    not wanted cannot affect any other frame, so the decoder is told to skip it. This is exact and saves about a
    third of the decoding on x264 output.
    """
    if keyframe_pts is not None:
        try:
            container.seek(keyframe_pts, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError:  # no keyframe there in the demuxer's index (an MP4 whose sync-sample table lacks
            return {}  # its first frame: EPERM): the caller decodes what is missing from the start instead
    codec = stream.codec_context
    skip = skip and codec.name in SKIPS_PER_PACKET
    found: dict[int, av.VideoFrame] = {}
    first_seen: int | None = None
    previous = None
    last = max(wanted)
    for packet in container.demux(stream):
        pts = _pts(packet)
        if skip:
            codec.skip_frame = "DEFAULT" if pts is None or pts in wanted else "NONREF"
        for frame in codec.decode(packet):
            pts = _pts(frame)
            if pts is None:
                continue
            if previous is not None and pts < previous:  # frames come out in display order: these are not pts
                codec.skip_frame = "DEFAULT"
                raise _NotPresentationTimes
            previous = pts
            if first_seen is None:
                first_seen = pts
                if keyframe_pts is not None and pts > min(wanted):  # the seek overshot (inexact in e.g. MPEG-TS)
                    return found
            if pts in wanted:
                found[pts] = frame
            if len(found) == len(wanted) or pts > last:
                codec.skip_frame = "DEFAULT"
                return found
    codec.skip_frame = "DEFAULT"
    return found


class _NotPresentationTimes(Exception):
    """Decoded frames' timestamps go backwards: the container's are decoding-order stamps (H.264 with B-frames
    in AVI, which has no presentation times), so frames must be matched by their output order."""


def _in_output_order(container, stream: av.VideoStream, order: list[int], wanted: set[int]) -> dict[int, av.VideoFrame]:
    """Decode from the start, every frame: the k-th frame out (display order) is the one at ``order[k]``."""
    found: dict[int, av.VideoFrame] = {}
    for k, frame in enumerate(container.decode(stream)):
        if k < len(order) and order[k] in wanted:
            found[order[k]] = frame
            if len(found) == len(wanted):
                break
    return found


def _pts(item: av.Packet | av.VideoFrame) -> int | None:
    """Presentation timestamp, or the decoding one where there is none (AVI often has dts only)."""
    return item.pts if item.pts is not None else item.dts


def decode_frames(
    source: str | Path | bytes,
    n: int = 4,
    size: int = 256,
    window: tuple[float, float] | None = None,
) -> ClipFrames:
    """Take ``n`` frames at the midpoints of ``n`` equal segments of the clip.

    Args:
        source: a path, or the file's bytes (e.g. a download).
        n: number of frames.
        size: shorter side of the output images (never upscaled); 0 keeps the size as displayed.
        window: optional (start, end) in seconds from the stream start: sample
            inside this interval instead of the whole clip (e.g. a YouCook2 segment).

    Raises:
        FrameError: with ``reason`` one of ``undecodable``, ``audio_only``,
            ``truncated``, ``too_few_frames``, ``decode_error``.
    """
    with _open(source) as container:
        stream = _video_stream(container)
        pixel_aspect = _pixel_aspect(stream)  # read while the container is open: the stream is freed with it
        packets = _index_packets(container, stream)
        declared = stream.frames or 0
        if declared and len(packets) < declared:
            raise FrameError("truncated", f"{len(packets)} of {declared} frames present")
        shown = _shown(packets)
        if len(shown) < n:
            raise FrameError("too_few_frames", f"{len(shown)} frames shown, need {n}")
        # in exact fractions of a second: whenever the frame count is a multiple of 2n, every t_k falls on a
        # frame's start, where floats can put it an ulp before (25 fps, 240 frames: 3.5999999999999996 < 3.6)
        tb = Fraction(stream.time_base)  # seconds per pts tick
        first, end = _stream_duration(shown, stream)
        span = (end - first) * tb
        duration = float(span)
        tagged = 0 if declared else _tagged_seconds(stream)
        reached = max(float(end * tb), duration)  # the tag is the track's end, counted from 0: a late start counts
        if tagged - reached > max(CUT_SECONDS, CUT_SHARE * tagged):
            raise FrameError(
                "truncated", f"the video ends at {reached:.2f} s of the {tagged:.2f} s its container declares"
            )
        if window is None:
            targets = sample_timestamps(span, n)
        else:
            start, stop = max(Fraction(0), _as_written(window[0])), min(span, _as_written(window[1]))
            if not stop > start:
                raise FrameError("too_few_frames", f"window {window} is outside the clip (0, {duration:.3f})")
            targets = sample_timestamps(stop - start, n, start=start)
        rel_times = [(p.pts - first) * tb for p in shown]
        chosen = select_frame_indices(rel_times, targets)
        if len(set(chosen)) < n:
            raise FrameError("too_few_frames", f"only {len(set(chosen))} distinct frames in the sampled span")
        wanted = {shown[i].pts for i in chosen}
        try:
            found = _decode_by_keyframe(container, stream, packets, wanted)
            if len(found) < len(wanted):  # inexact seeking (e.g. MPEG-TS): one pass from the start, skipping nothing
                rest = wanted - set(found)
                found.update(_from_start(source, lambda c, s: _decode_from(c, s, None, rest, skip=False)))
        except _NotPresentationTimes:  # match the frames by their output order instead (hidden frames give none)
            order = [p.pts for p in shown]
            found = _from_start(source, lambda c, s: _in_output_order(c, s, order, wanted))
    missing = [i for i in chosen if shown[i].pts not in found]
    if missing:
        raise FrameError("decode_error", f"could not decode the frame(s) at index {missing}")
    images, width, height = _upright_images([found[shown[i].pts] for i in chosen], size, pixel_aspect)
    return ClipFrames(
        images=images,
        timestamps=[float(t) for t in targets],
        frame_times=[float(rel_times[i]) for i in chosen],
        duration=duration,
        width=width,
        height=height,
    )


def _as_written(seconds: float) -> Fraction | float:
    """A window's bound as written: 1.2 is 6/5, not the binary float just below it. An infinite one (no bound) stays
    a float."""
    seconds = float(seconds)
    return Fraction(repr(seconds)) if math.isfinite(seconds) else seconds


def _tagged_seconds(stream: av.VideoStream) -> float:
    """The stream's duration in seconds from its DURATION tag (0 if it has none). Matroska and WebM declare no frame
    count to check a file against, but ffmpeg (and mkvmerge) write each track's duration there when they close the
    file, so a file cut short afterwards keeps it. Not the container's duration, which may be an audio track's, nor
    an MPEG-TS stream's, which is estimated from the bit rate."""
    match = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", (stream.metadata.get("DURATION") or "").strip())
    if not match:
        return 0
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _pixel_aspect(stream: av.VideoStream) -> Fraction:
    """The width of a stored pixel over its height, as FFmpeg's players take it: the container's value, else the
    bitstream's, else square. An anamorphic video (DV's 720x480 at 8:9 or 32:27, a 1440x1080 HDV frame at 4:3) is
    stored narrower or wider than it is shown."""
    for sar in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        # beyond MAX_PIXEL_ASPECT the value is broken metadata, not a pixel shape: a frame stretched 100x
        # would be a huge, useless JPEG
        if sar is not None and 1 / MAX_PIXEL_ASPECT <= sar <= MAX_PIXEL_ASPECT:
            return Fraction(sar)
    return Fraction(1)


def _upright_images(
    frames: list[av.VideoFrame], size: int, pixel_aspect: Fraction
) -> tuple[list[Image.Image], int, int]:
    """RGB images as a player shows them (non-square pixels made square, then a phone video's rotation applied),
    the shorter side at ``size``; and the displayed (width, height) before resizing."""
    turn = _UPRIGHT.get(round(frames[0].rotation) % 360)  # 0, or a non-right angle no player applies either
    sideways = turn in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)
    width, height = displayed_size(frames[0].width, frames[0].height, pixel_aspect)
    if sideways:
        width, height = height, width
    out_w, out_h = resized_size(width, height, size)
    if sideways:  # resize as stored, then turn
        out_w, out_h = out_h, out_w
    images = [f.to_image(width=out_w, height=out_h, interpolation="BICUBIC") for f in frames]
    if turn is not None:
        images = [im.transpose(turn) for im in images]
    return images, width, height


def _from_start(source: str | Path | bytes, step) -> dict[int, av.VideoFrame]:
    """``step(container, stream)`` on the file opened afresh, at its start."""
    with _open(source) as container:
        stream = _video_stream(container)
        return _decode(lambda: step(container, stream))


def _decode(step):
    try:
        return step()
    except av.FFmpegError as e:
        raise FrameError("decode_error", str(e)) from e


def _decode_by_keyframe(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    packets: list[_Packet],
    wanted: set[int],
) -> dict[int, av.VideoFrame]:
    """Decode the frames of the (pts-sorted) ``packets`` whose pts are ``wanted``: one seek per keyframe group."""
    keyframes = [i for i, p in enumerate(packets) if p.keyframe] or [0]
    index = {p.pts: i for i, p in enumerate(packets)}
    groups: dict[int, set[int]] = {}
    for pts in wanted:
        kf = keyframes[max(bisect.bisect_right(keyframes, index[pts]) - 1, 0)]
        groups.setdefault(kf, set()).add(pts)
    found: dict[int, av.VideoFrame] = {}
    for kf, wanted in groups.items():
        found.update(_decode(lambda: _decode_from(container, stream, packets[kf].pts, wanted)))  # noqa: B023
    return found
