"""The frame sampler: timestamps, frame choice (against a brute-force reference), decoding, failures."""

from __future__ import annotations

import random
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import expected_indices
from PIL import Image

from pipeline import synthetic
from pipeline.frames import (
    FrameError,
    decode_frames,
    displayed_size,
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


@pytest.mark.parametrize(
    "size_in, pixel_aspect, expected",
    [
        ((720, 480), Fraction(8, 9), (720, 540)),  # DV NTSC 4:3: the height stretched
        ((720, 480), Fraction(32, 27), (853, 480)),  # DV NTSC 16:9: the width stretched
        ((1440, 1080), Fraction(4, 3), (1920, 1080)),  # HDV
        ((596, 336), Fraction(1), (596, 336)),  # square pixels: unchanged
    ],
)
def test_displayed_size(size_in, pixel_aspect, expected):
    assert displayed_size(*size_in, pixel_aspect) == expected


def test_decode_takes_the_frames_at_segment_midpoints(videos):
    clip = decode_frames(videos["idx100"], n=4, size=64)
    taken = [synthetic.read_frame_index(im) for im in clip.images]
    assert taken == expected_indices(100, 25) == [12, 37, 62, 87]
    assert clip.duration == pytest.approx(4.0)
    assert clip.timestamps == pytest.approx([0.5, 1.5, 2.5, 3.5])
    assert clip.frame_times == pytest.approx([i / 25 for i in taken])
    assert (clip.width, clip.height) == (160, 96)
    assert all(im.size == (107, 64) for im in clip.images)


# 48 frames at 24 fps: floats happen to land right there
@pytest.mark.parametrize("frames, fps", [(240, 25), (240, Fraction(30000, 1001)), (48, 24)])
def test_a_sampling_instant_on_a_frames_start_takes_that_frame(tmp_path, frames, fps):
    """Whenever the frame count is a multiple of 2n, every t_k falls on a frame's start: 4 frames of a 25 fps clip
    of 240 frames are 30, 90, 150, 210. In floats, t_1 = 3.5999999999999996 s fell before frame 90's 3.6 s."""
    path = synthetic.write_index_clip(tmp_path / "clip.mp4", frames, fps=fps)
    clip = decode_frames(path, n=4, size=0)
    assert [synthetic.read_frame_index(im) for im in clip.images] == expected_indices(frames, fps)
    assert expected_indices(frames, fps) == [frames // 8 + frames // 4 * k for k in range(4)]


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
        ("mov", "libx264", 20),
        ("flv", "flv", 12),
        ("wmv", "wmv2", 12),  # ASF: DiDeMo's Flickr videos come in many containers
        ("ogv", "libvpx", 12),  # Ogg (VP8 rather than Theora, which this ffmpeg build may lack)
        ("nut", "mpeg4", 12),
        ("y4m", "rawvideo", 1),  # a raw YUV stream (yuv4mpegpipe)
        ("mjpeg", "mjpeg", 1),  # bare JPEG frames one after another
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


def test_a_window_too_short_for_distinct_frames_is_too_few_frames(videos):
    """4 instants in 50 ms of a 25 fps clip fall in 1 or 2 frames: a frame taken twice is refused, not stored."""
    with pytest.raises(FrameError) as e:
        decode_frames(videos["idx100"], n=4, size=0, window=(1.0, 1.05))
    assert e.value.reason == "too_few_frames" and "distinct frames in the sampled span" in str(e.value)


def test_a_windows_bounds_are_taken_as_written(videos):
    """(0.1, 0.3)'s midpoint is 0.2, where frame 5 starts (25 fps); in binary floats it is 0.19999..., in frame 4."""
    clip = decode_frames(videos["idx100"], n=1, size=0, window=(0.1, 0.3))
    assert [synthetic.read_frame_index(im) for im in clip.images] == [5]


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


@pytest.mark.parametrize("payload", ["ffconcat", "sdp"])
def test_a_download_that_names_other_files_or_sockets_is_refused(tmp_path, monkeypatch, videos, payload):
    """A "video" a server sends (bytes) is opened with video demuxers only. FFmpeg's probe took an ffconcat list
    and decoded the local files it names, relative to the working folder, into the shards; an SDP text made it
    listen on UDP for as long as something streamed to it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "private.mp4").write_bytes(videos["idx100"].read_bytes())
    data = {
        "ffconcat": b"ffconcat version 1.0\nfile private.mp4\n",
        "sdp": b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 45006 RTP/AVP 96\n"
        b"a=rtpmap:96 H264/90000\n",
    }[payload]
    with pytest.raises(FrameError) as e:
        decode_frames(data, 4, 64)
    assert e.value.reason == "undecodable" and "not one of the video formats" in str(e.value)
    assert len(decode_frames(tmp_path / "private.mp4", 4, 64).images) == 4  # a real file still decodes


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


def test_a_cut_matroska_file_is_truncated(tmp_path):
    """Matroska and WebM declare no frame count, so a cut file was sampled as if whole (the first 3.8 s of 8 s). ffmpeg
    writes each track's DURATION tag when it closes the file, and a cut file keeps it. A file cut with ffmpeg itself
    (-t 3 -c copy) declares its own duration, and is whole."""
    path = synthetic.write_index_clip(tmp_path / "clip.mkv", 200, gop=25)
    data = path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FrameError) as e:
        decode_frames(cut)
    assert e.value.reason == "truncated" and "of the 8.00 s its container declares" in e.value.detail
    assert decode_frames(path).duration == pytest.approx(8.0)
    shorter = tmp_path / "shorter.mkv"
    ffmpeg("-i", path, "-t", 3, "-c", "copy", shorter)
    assert decode_frames(shorter).duration == pytest.approx(3, abs=0.2)
    # a whole file whose video starts late (after its audio, or at a timestamp offset): the tag is the track's end,
    # counted from 0, not its length
    late = tmp_path / "late.mkv"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "anullsrc=d=10",
        "-itsoffset",
        2,
        "-i",
        path,
        "-map",
        0,
        "-map",
        1,
        "-c:v",
        "copy",
        "-shortest",
        late,
    )
    offset = tmp_path / "offset.mkv"
    ffmpeg("-i", path, "-c", "copy", "-copyts", "-output_ts_offset", 30, offset)
    for whole in (late, offset):
        assert decode_frames(whole).duration == pytest.approx(8.0, abs=0.1)


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


def player_frame(path, index: int, filters: str = "") -> np.ndarray:
    """Frame ``index`` of ``path`` as the ffmpeg CLI shows it (it rotates as players do), through ``filters``:
    RGB, (H, W, 3)."""
    png = Path(path).with_name(f"{Path(path).stem}_player_{index}.png")
    ffmpeg("-i", path, "-vf", rf"select=eq(n\,{index})" + (f",{filters}" if filters else ""), "-frames:v", 1, png)
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


def player_view(path, n: int) -> list[int]:
    """Brute force: decode every frame a player shows, in order, and take the one shown at each segment
    midpoint (the frame rate is constant here, so the last frame lasts as long as the others)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    times = [(f.pts - frames[0].pts) * f.time_base for f in frames]  # exact fractions, as the sampler computes
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
    # a window open at its end, or from before the start, is cut to the clip
    whole = [synthetic.read_frame_index(im) for im in decode_frames(cut, n=4, size=0).images]
    for bounds in ((0.0, float("inf")), (-1, 99)):
        assert [synthetic.read_frame_index(im) for im in decode_frames(cut, 4, 0, window=bounds).images] == whole


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
    source = synthetic.write_index_clip(tmp_path / "source.mp4", 50, width=160, height=96)
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-display_rotation", degrees, "-i", source, "-c", "copy", rotated)
    clip = decode_frames(rotated, n=4, size=0)
    player = player_frame(rotated, 6)  # frame 6: the first midpoint, 0.25 s
    assert np.array_equal(np.asarray(clip.images[0]), player)
    portrait = degrees % 180 == 90
    assert (clip.width, clip.height) == ((96, 160) if portrait else (160, 96))
    resized = decode_frames(rotated, n=4, size=64).images[0]
    assert resized.size == ((64, 107) if portrait else (107, 64))


@pytest.fixture(scope="module")
def anamorphic(tmp_path_factory) -> dict[str, object]:
    """160x96 clips whose pixels are not square: 2:1 in the bitstream and the container, or in the bitstream
    only; the container's 4:5 over the bitstream's 2:1 (players take the container's); a broken 160:1; and the
    2:1 one turned 90 degrees."""
    folder = tmp_path_factory.mktemp("anamorphic")
    source = synthetic.write_index_clip(folder / "source.mp4", 50, width=160, height=96)
    wide = folder / "wide.mp4"
    ffmpeg("-i", source, "-vf", "setsar=2", "-c:v", "libx264", "-pix_fmt", "yuv420p", wide)
    tall = folder / "tall.mp4"
    ffmpeg("-i", wide, "-c", "copy", "-aspect", "4:3", tall)  # the container's 4:5 makes 160x96 show as 4:3
    broken = folder / "broken.mp4"
    ffmpeg("-i", source, "-c", "copy", "-aspect", "160:1", broken)
    turned = folder / "turned.mp4"
    ffmpeg("-display_rotation", 90, "-i", wide, "-c", "copy", turned)
    stream = folder / "stream.ts"  # MPEG-TS has no field for it: only the bitstream's 2:1
    ffmpeg("-i", wide, "-c", "copy", stream)
    return {"wide": wide, "tall": tall, "broken": broken, "turned": turned, "stream": stream}


@pytest.mark.parametrize(
    "name, shown, player_scale",
    [
        ("wide", (320, 96), "scale=iw*sar:ih"),
        ("stream", (320, 96), "scale=iw*sar:ih"),
        ("tall", (160, 120), "scale=iw:ih/sar"),
        ("broken", (160, 96), "null"),  # a 25600x96 frame would be metadata noise, not a picture
    ],
)
def test_non_square_pixels_are_stored_as_a_player_shows_them(anamorphic, name, shown, player_scale):
    clip = decode_frames(anamorphic[name], n=4, size=0)
    assert (clip.width, clip.height) == shown
    assert clip.images[0].size == shown
    player = player_frame(anamorphic[name], 6, player_scale).astype(int)  # only swscale's rounding differs
    difference = np.abs(np.asarray(clip.images[0]).astype(int) - player)
    assert difference.max() <= 12 and difference.mean() < 1
    assert [synthetic.read_frame_index(im) for im in clip.images] == [6, 18, 31, 43]
    short = min(shown)
    resized = decode_frames(anamorphic[name], n=4, size=64).images[0]
    assert resized.size == (round(shown[0] * 64 / short), round(shown[1] * 64 / short))


def test_non_square_pixels_are_made_square_before_the_rotation(anamorphic):
    for size in (0, 64):
        upright = decode_frames(anamorphic["wide"], n=4, size=size)
        turned = decode_frames(anamorphic["turned"], n=4, size=size)
        assert (turned.width, turned.height) == (96, 320)
        for im, ref in zip(turned.images, upright.images, strict=True):
            assert np.array_equal(np.asarray(im), np.asarray(ref.transpose(Image.Transpose.ROTATE_90)))


def test_an_mp4_without_its_first_sync_sample_is_decoded_from_the_start(tmp_path):
    """A muxer that does not flag the first frame leaves the MP4's sync-sample table without it: seeking there
    fails (EPERM), which used to fail the whole video; a player shows every frame."""
    source = synthetic.write_index_clip(tmp_path / "source.mp4", 60, gop=12)
    unflagged = tmp_path / "unflagged.mp4"
    with av.open(str(source)) as inp, av.open(str(unflagged), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for k, packet in enumerate(p for p in inp.demux(video=0) if p.size):
            packet.is_keyframe = packet.is_keyframe and k > 0
            packet.stream = stream
            out.mux(packet)
    with av.open(str(unflagged)) as container, pytest.raises(av.FFmpegError):
        container.seek(0, stream=container.streams.video[0], backward=True, any_frame=False)
    for n in (4, 8):
        clip = decode_frames(unflagged, n=n, size=0)
        assert [synthetic.read_frame_index(im) for im in clip.images] == player_view(unflagged, n)
        assert clip.duration == pytest.approx(60 / 25)


def test_a_file_whose_metadata_is_not_utf8_decodes(tmp_path):
    """A camera's title that is not UTF-8: PyAV before 19 raised UnicodeDecodeError on it unless told to ignore it,
    and PyAV 19 (the only one on Python 3.12+) has no such option: passing it failed every video with a TypeError."""
    import subprocess

    from pipeline.frames import decode_frames, open_options

    clip = synthetic.write_index_clip(tmp_path / "clip.mp4", 30)
    tagged = tmp_path / "tagged.mkv"
    subprocess.run(
        [synthetic.ffmpeg_exe(), "-v", "error", "-i", str(clip), "-c", "copy"]
        + ["-metadata", b"title=bad\xff\xfetitle", str(tagged)],
        check=True,
    )
    assert synthetic.read_frame_index(decode_frames(tagged, 4, 64).images[0]) == 3
    assert open_options("18.1.0") == {"metadata_errors": "ignore"} and open_options("14.1.0") == open_options("18.1.0")
    assert open_options("19.0.2") == {} == open_options("20.0")
