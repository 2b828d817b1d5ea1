"""The frame sampler: timestamps, frame choice (against a brute-force reference), decoding, failures."""

from __future__ import annotations

import random
import shutil

import av
import pytest
from conftest import expected_indices

from pipeline import synthetic
from pipeline.frames import (
    FrameError,
    decode_frames,
    encode_jpeg,
    resized_size,
    sample_timestamps,
    select_frame_indices,
)


def test_sample_timestamps_are_segment_midpoints():
    assert sample_timestamps(18.0, 4) == [2.25, 6.75, 11.25, 15.75]
    assert sample_timestamps(2.0, 1) == [1.0]
    assert sample_timestamps(4.0, 2, start=10.0) == [11.0, 13.0]
    with pytest.raises(ValueError):
        sample_timestamps(0.0, 4)
    with pytest.raises(ValueError):
        sample_timestamps(1.0, 0)


def test_select_frame_indices_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        pts = sorted(rng.sample(range(1000), rng.randint(1, 50)))
        times = [p / 100 for p in pts]
        targets = [rng.uniform(-1, 11) for _ in range(5)]
        brute = []
        for t in targets:
            shown = [i for i, x in enumerate(times) if x <= t]
            brute.append(shown[-1] if shown else 0)
        assert select_frame_indices(times, targets) == brute


@pytest.mark.parametrize(
    ("size_in", "size", "expected"),
    [
        ((596, 336), 256, (454, 256)),  # landscape: the shorter side (height) becomes 256
        ((336, 596), 256, (256, 454)),  # portrait
        ((200, 100), 256, (200, 100)),  # never upscaled
        ((256, 300), 256, (256, 300)),  # already the size
        ((640, 480), 0, (640, 480)),  # 0 keeps the size
    ],
)
def test_resized_size(size_in, size, expected):
    assert resized_size(*size_in, size) == expected


def test_decode_takes_the_frames_at_segment_midpoints(videos):
    clip = decode_frames(videos["idx100"], n=4, size=64)
    taken = [synthetic.read_frame_index(im) for im in clip.images]
    assert taken == expected_indices(100, 25) == [12, 37, 62, 87]
    assert clip.duration == pytest.approx(4.0)
    assert clip.timestamps == pytest.approx([0.5, 1.5, 2.5, 3.5])
    assert clip.frame_times == pytest.approx([i / 25 for i in taken])
    assert (clip.width, clip.height) == (160, 96)
    assert all(im.size == (107, 64) for im in clip.images)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
def test_decode_any_number_of_frames(videos, n):
    clip = decode_frames(videos["idx100"], n=n, size=0)
    assert [synthetic.read_frame_index(im) for im in clip.images] == expected_indices(100, 25, n)


@pytest.mark.parametrize(
    ("ext", "codec", "gop"),
    [
        ("mp4", "libx264", 1),  # every frame a keyframe
        ("mp4", "libx264", None),  # x264 default: one keyframe at the start for a short clip
        ("avi", "mpeg4", 12),  # UCF101's container
        ("avi", "libx264", 12),  # AVI has no presentation times: H.264's B-frames are matched by output order
        ("webm", "libvpx-vp9", 10),
        ("mkv", "libx264", 20),
        ("ts", "libx264", 20),  # MPEG-TS: inexact seeking, exercised fallback
        ("mpg", "mpeg2video", 15),
    ],
)
def test_decode_exact_frames_across_containers(tmp_path, ext, codec, gop):
    path = synthetic.write_index_clip(tmp_path / f"clip.{ext}", 90, width=176, height=144, codec=codec, gop=gop)
    clip = decode_frames(path, n=4, size=0)
    assert [synthetic.read_frame_index(im) for im in clip.images] == expected_indices(90, 25)


def test_decode_from_bytes_equals_decode_from_path(videos):
    from_path = decode_frames(videos["idx100"], 4, 64)
    from_bytes = decode_frames(videos["idx100"].read_bytes(), 4, 64)
    assert [encode_jpeg(im) for im in from_path.images] == [encode_jpeg(im) for im in from_bytes.images]


def test_decode_matches_a_full_sequential_decode(videos):
    """The seek-and-skip decoder gives the same pixels as decoding every frame in order."""
    with av.open(str(videos["idx100"])) as container:
        reference = [f.to_image() for f in container.decode(video=0)]
    clip = decode_frames(videos["idx100"], 4, size=0)
    for image, index in zip(clip.images, expected_indices(100, 25), strict=True):
        assert image.tobytes() == reference[index].tobytes()


def test_decode_window(videos):
    clip = decode_frames(videos["idx100"], n=2, size=0, window=(1.0, 3.0))
    assert clip.timestamps == pytest.approx([1.5, 2.5])
    assert [synthetic.read_frame_index(im) for im in clip.images] == [37, 62]


def test_too_few_frames(videos):
    with pytest.raises(FrameError) as e:
        decode_frames(videos["idx3"], n=4)
    assert e.value.reason == "too_few_frames"
    assert len(decode_frames(videos["idx3"], n=3).images) == 3


def test_audio_only(videos):
    with pytest.raises(FrameError) as e:
        decode_frames(videos["audio"])
    assert e.value.reason == "audio_only"


@pytest.mark.parametrize("content", [b"", b"hello, this is not a video\n" * 10, bytes(range(256)) * 40])
def test_not_a_video(tmp_path, content):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(FrameError) as e:
        decode_frames(path)
    assert e.value.reason == "undecodable"


def test_truncated_file_without_index(tmp_path, videos):
    """ffmpeg's mp4 puts the index (moov) at the end: a cut file has none and cannot be opened."""
    data = videos["idx100"].read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FrameError) as e:
        decode_frames(path)
    assert e.value.reason == "undecodable"


def test_truncated_file_with_index_first(tmp_path):
    """With the index first (faststart, as web videos are), a cut file is detected as truncated."""
    path = synthetic.write_index_clip(tmp_path / "fast.mp4", 100, extra={"movflags": "+faststart"})
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FrameError) as e:
        decode_frames(cut)
    assert e.value.reason == "truncated"
    assert len(decode_frames(path).images) == 4  # the whole file is fine


def test_jpeg_is_deterministic(videos):
    a = [encode_jpeg(im, 90) for im in decode_frames(videos["idx100"]).images]
    b = [
        encode_jpeg(im, 90)
        for im in decode_frames(shutil.copy(videos["idx100"], videos["idx100"].with_name("c.mp4"))).images
    ]
    assert a == b
    assert all(x[:2] == b"\xff\xd8" for x in a)


def ffmpeg(*args) -> None:
    import subprocess

    subprocess.run([synthetic.ffmpeg_exe(), "-y", "-loglevel", "error", *map(str, args)], check=True)


def player_view(path, n: int) -> list[int]:
    """Brute force: decode every frame a player shows, in order, and take the one shown at each segment
    midpoint (the frame rate is constant here, so the last frame lasts as long as the others)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    times = [float((f.pts - frames[0].pts) * f.time_base) for f in frames]  # exact, as the sampler computes
    duration = times[-1] + (times[-1] - times[0]) / (len(times) - 1)
    chosen = select_frame_indices(times, sample_timestamps(duration, n))
    return [synthetic.read_frame_index(frames[i].to_image()) for i in chosen]


@pytest.mark.parametrize("n", [4, 5, 8])
def test_av1_takes_the_frames_a_player_shows(tmp_path, n):
    """libdav1d reads skip_frame once, when it opens: skipping an unwanted first frame used to hide every
    non-reference frame after it (decode_error)."""
    path = synthetic.write_index_clip(tmp_path / "av1.mp4", 90, codec="libsvtav1", gop=16)
    clip = decode_frames(path, n=n, size=0)
    assert [synthetic.read_frame_index(im) for im in clip.images] == player_view(path, n)


@pytest.mark.parametrize("n", [4, 8])
def test_an_edit_list_cut_samples_only_what_a_player_shows(tmp_path, n):
    """`ffmpeg -ss 1.3 -c copy` keeps the GOP before the cut as pre-roll packets flagged discard: decoded for
    reference, never shown. They used to count in the duration and be chosen (decode_error)."""
    source = synthetic.write_index_clip(tmp_path / "source.mp4", 100, gop=12)
    cut = tmp_path / "cut.mp4"
    ffmpeg("-ss", 1.3, "-i", source, "-c", "copy", cut)
    clip = decode_frames(cut, n=n, size=0)
    assert [synthetic.read_frame_index(im) for im in clip.images] == player_view(cut, n)
    assert clip.duration == pytest.approx(67 / 25)  # the 67 frames from 1.32 s on
    window = decode_frames(cut, n=4, size=0, window=(0.0, 0.5))
    assert [synthetic.read_frame_index(im) for im in window.images] == [33 + i for i in (1, 4, 7, 10)]


def test_a_stream_cut_mid_gop_samples_from_its_first_keyframe(tmp_path):
    """An MPEG-TS missing its head starts with frames whose references are gone; they used to count and fail
    the whole video."""
    source = synthetic.write_index_clip(tmp_path / "source.mp4", 100, gop=12)
    whole = tmp_path / "whole.ts"
    ffmpeg("-i", source, "-c", "copy", whole)
    tail = tmp_path / "tail.ts"
    tail.write_bytes(whole.read_bytes()[188 * 60 :])  # whole TS packets, cut inside the first GOP
    clip = decode_frames(tail, n=4, size=0)
    assert [synthetic.read_frame_index(im) for im in clip.images] == player_view(tail, 4)


@pytest.mark.parametrize("degrees", [90, 180, -90])
def test_a_rotated_phone_video_is_stored_as_a_player_shows_it(tmp_path, degrees):
    import io

    import numpy as np
    from PIL import Image

    source = synthetic.write_index_clip(tmp_path / "source.mp4", 50, width=160, height=96)
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-display_rotation", degrees, "-i", source, "-c", "copy", rotated)
    clip = decode_frames(rotated, n=4, size=0)
    png = tmp_path / "player.png"  # the ffmpeg CLI rotates as players do
    ffmpeg("-i", rotated, "-vf", r"select=eq(n\,6)", "-frames:v", 1, png)  # frame 6: the first midpoint, 0.25 s
    player = np.asarray(Image.open(io.BytesIO(png.read_bytes())).convert("RGB"))
    assert np.array_equal(np.asarray(clip.images[0]), player)
    portrait = degrees % 180 == 90
    assert (clip.width, clip.height) == ((96, 160) if portrait else (160, 96))
    resized = decode_frames(rotated, n=4, size=64).images[0]
    assert resized.size == ((64, 107) if portrait else (107, 64))
