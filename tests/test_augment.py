"""The device-side training crop (train.augment), the loader modes that defer it, and the prefetcher."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import TINY_CLIP
from torchvision.transforms import InterpolationMode

from train import augment, data
from train.config import resolve
from train.model import tokenizer_for
from train.prefetch import Prefetcher, to_device


def reference_crop(video: torch.Tensor, crop: list[int], size: int, dtype=torch.float32) -> torch.Tensor:
    """torchvision's RandomResizedCrop output for one video and crop (float input: no intermediate rounding)."""
    i, j, h, w, flip, bicubic = crop
    mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
    out = TF.resized_crop(video.to(dtype), i, j, h, w, [size, size], interpolation=mode, antialias=True)
    out = out.flip(-1) if flip else out
    return out.round().clamp(0, 255) if dtype.is_floating_point else out


CROPS = [  # top, left, height, width, flip, bicubic: up- and downscaling, both filters, flips, crops at the edges
    [3, 5, 20, 30, 0, 0],
    [0, 0, 40, 60, 1, 0],
    [2, 7, 37, 50, 0, 1],
    [0, 0, 40, 60, 0, 0],
    [5, 3, 30, 41, 1, 1],
    [10, 20, 30, 40, 1, 0],
    [0, 59, 40, 1, 0, 1],
    [39, 0, 1, 60, 1, 1],
]


@pytest.mark.parametrize("size", [20, 32, 64])
def test_batched_crop_matches_torchvision_per_video(size):
    torch.manual_seed(0)
    # smooth content and noise: antialiasing matters on noise, overshoot (bicubic) on edges
    smooth = torch.nn.functional.interpolate(torch.rand(len(CROPS), 4 * 3, 5, 7) * 255, size=(40, 60), mode="bicubic")
    noise = torch.randint(0, 256, (len(CROPS), 4 * 3, 40, 60)).float()
    for pixels in (smooth, noise):
        video = pixels.clamp(0, 255).round().to(torch.uint8).view(len(CROPS), 4, 3, 40, 60)
        out = augment.resized_crop(video, torch.tensor(CROPS, dtype=torch.float32), size)
        assert out.shape == (len(CROPS), 4, 3, size, size) and out.dtype == torch.uint8
        for v, crop in enumerate(CROPS):
            ref = reference_crop(video[v], crop, size)
            diff = (out[v].float() - ref).abs()
            assert diff.max() <= 1, (crop, diff.max())  # a .5 on either side of rounding
            assert diff.mean() < 0.02, (crop, diff.mean())
            if not crop[5]:  # torchvision's own uint8 bilinear path agrees to one level as well
                assert (out[v].int() - reference_crop(video[v], crop, size, torch.uint8).int()).abs().max() <= 1


def test_padding_to_the_batch_size_does_not_change_a_video():
    torch.manual_seed(1)
    small = torch.randint(0, 256, (4, 3, 30, 44), dtype=torch.uint8)
    large = torch.randint(0, 256, (4, 3, 48, 64), dtype=torch.uint8)
    padded = data.stack_videos([small, large])
    assert padded.shape == (2, 4, 3, 48, 64)
    assert torch.equal(padded[0, ..., :30, :44], small) and padded[0, ..., 30:, :].eq(0).all()
    crops = torch.tensor([[2, 3, 25, 40, 1, 1], [0, 0, 48, 64, 0, 0]], dtype=torch.float32)
    together = augment.resized_crop(padded, crops, 24)
    alone = augment.resized_crop(small[None], crops[:1], 24)
    assert torch.equal(together[0], alone[0])


def test_resample_weights_rows_are_normalised_and_stay_inside_the_crop():
    start, length = torch.tensor([3.0, 0.0]), torch.tensor([20.0, 50.0])
    for bicubic in (torch.tensor([0, 0]), torch.tensor([1, 1])):
        weights = augment.resample_weights(start, length, bicubic, 16, 50)  # (2, 16, 50)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 16))
        assert weights[0, :, :3].eq(0).all() and weights[0, :, 23:].eq(0).all()


def test_loader_draws_the_same_crop_whether_it_applies_it_or_not():
    frames = [torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8) for _ in range(4)]
    here = data.TrainTransform(24, seed="5")(frames)
    crop = data.TrainTransform(24, seed="5").params(40, 60)  # its own generator, seeded alike
    there = augment.resized_crop(torch.stack(frames)[None], crop[None], 24)[0]
    tolerance = 1 if not crop[5] else 12  # torchvision's uint8 bicubic rounds and clamps between its two passes
    assert (here.int() - there.int()).abs().max() <= tolerance


def _batches(shards: str, augment_on: str, count: int = 3) -> list[data.Batch]:
    tok = tokenizer_for(str(TINY_CLIP))
    stream = data.unlabeled_stream(shards, 4, data.TrainTransform(32), tok, 4, seed=0, augment_on=augment_on)
    return list(itertools.islice(iter(data.loader(stream, 0, False, 0)), count))


def test_device_modes_give_the_loaders_batches(train_shards):
    shards = str(train_shards["unlabeled"])
    loader = _batches(shards, "loader")
    device = _batches(shards, "device")
    jpeg = _batches(shards, "device_jpeg")
    assert device[0].video.shape[-2:] != (32, 32) and device[0].crops.shape == (4, 6)  # frames left uncropped
    assert jpeg[0].video.numel() == 0 and jpeg[0].jpeg_sizes.shape == (4, 4)
    assert jpeg[0].jpegs.numel() == jpeg[0].jpeg_sizes.sum() and jpeg[0].jpegs[:2].tolist() == [0xFF, 0xD8]
    for a, b, c in zip(loader, device, jpeg, strict=True):
        assert a.keys == b.keys == c.keys and torch.equal(b.crops, c.crops)
        bicubic = b.crops[:, 5].bool().tolist()
        b, c = to_device(b, torch.device("cpu"), 32), to_device(c, torch.device("cpu"), 32)
        assert b.video.shape == a.video.shape == (4, 4, 3, 32, 32) and b.crops is None and c.jpegs is None
        assert torch.equal(b.video, c.video)  # the same libjpeg decode, here or there
        for v in range(4):  # torchvision's uint8 bicubic rounds and clamps between its two passes
            diff = (a.video[v].int() - b.video[v].int()).abs()
            assert diff.max() <= (12 if bicubic[v] else 1) and diff.float().mean() < 0.5
        assert torch.equal(a.tokens, b.tokens)


def test_prefetcher_hands_out_every_batch_once_in_order(train_shards):
    batches = _batches(str(train_shards["unlabeled"]), "device", count=3)
    out = list(Prefetcher(iter(batches), torch.device("cpu"), 32))
    assert [b.keys for b in out] == [b.keys for b in batches]
    assert all(b.video.shape == (4, 4, 3, 32, 32) for b in out)


@pytest.mark.parametrize("background", [False, True])
def test_prefetcher_prepares_the_next_batch_in_its_thread_only(train_shards, background):
    batches = _batches(str(train_shards["unlabeled"]), "device", count=3)
    taken = [threading.Event() for _ in batches]

    def source():
        for event, batch in zip(taken, batches, strict=True):
            event.set()
            yield batch

    prefetcher = Prefetcher(source(), torch.device("cpu"), 32, background=background)
    first = next(prefetcher)
    # while the caller's step runs, the thread takes batch 2 from the loader; without one, nothing happens until asked
    assert taken[1].wait(timeout=10 if background else 0.2) is background
    prefetcher.settle()  # before validation forks: the thread is done with batch 2
    assert not background or prefetcher.ahead.done()
    assert [b.keys for b in [first, *prefetcher]] == [b.keys for b in batches]
    assert prefetcher.pool is None  # the end of the source stopped the thread


def test_prefetcher_raises_a_preparation_error_at_the_batch_it_spoils_and_close_stops_its_thread(train_shards):
    good = _batches(str(train_shards["unlabeled"]), "device", count=1)[0]

    threads = []

    def source():
        yield good
        threads.append(threading.current_thread())
        raise OSError("shard 3 is unreadable")

    prefetcher = Prefetcher(source(), torch.device("cpu"), 32, background=True)
    assert next(prefetcher).keys == good.keys  # the next batch failing in the thread does not spoil this one
    with pytest.raises(OSError, match="shard 3 is unreadable"):
        next(prefetcher)
    (thread,) = threads
    assert thread is not threading.current_thread() and thread.is_alive()
    prefetcher.close()
    thread.join(timeout=10)
    assert not thread.is_alive() and prefetcher.pool is None


def test_augment_on_auto_decodes_on_a_gpu_and_crops_in_the_workers_on_a_cpu():
    from train.loop import augment_on

    assert augment_on(resolve("demo"), torch.device("cuda", 0)) == "device_jpeg"
    assert augment_on(resolve("demo"), torch.device("cpu")) == "loader"
    assert augment_on(resolve("demo", augment_on="device"), torch.device("cuda", 0)) == "device"


def test_augment_on_is_checked():
    with pytest.raises(ValueError, match="--augment_on must be one of"):
        resolve("demo", augment_on="gpu")


def test_device_decode_falls_back_file_by_file_and_replaces_a_damaged_video(train_shards, monkeypatch, caplog):
    from train import prefetch

    batch = _batches(str(train_shards["unlabeled"]), "device_jpeg", count=1)[0]
    expected = to_device(batch, torch.device("cpu"), 32).video
    real = prefetch.decode_jpeg

    def batched_fails(data, **kwargs):  # e.g. nvjpeg refusing one file of the batch
        if isinstance(data, list):
            raise RuntimeError("batched decode failed")
        return real(data, **kwargs)

    monkeypatch.setattr(prefetch, "decode_jpeg", batched_fails)
    assert torch.equal(to_device(batch, torch.device("cpu"), 32).video, expected)

    # damage inside the compressed data of video 2's frame 1: markers intact, so the workers' check passes it
    sizes = batch.jpeg_sizes.flatten().tolist()
    start = sum(sizes[: 2 * 4 + 1])
    jpegs = batch.jpegs.clone()
    jpegs[start + sizes[9] // 3 : start + sizes[9] // 2] ^= 0x55
    damaged = type(batch)(**{**batch.__dict__, "jpegs": jpegs})
    # it ended the run (the README says broken samples are skipped): it is replaced by the batch's first video, with
    # its caption and crop, and counted, as the loader workers count what they skip; the batch keeps its size, as
    # the contrastive loss's gather across ranks needs
    got = to_device(damaged, torch.device("cpu"), 32)
    assert got.video.shape == expected.shape and got.dropped == batch.dropped + 1
    assert torch.equal(got.video[2], expected[0]) and torch.equal(got.video[[0, 1, 3]], expected[[0, 1, 3]])
    assert torch.equal(got.tokens[2], batch.tokens[0]) and got.texts[2] == batch.texts[0]
    assert got.keys == [batch.keys[0], batch.keys[1], batch.keys[0], *batch.keys[3:]]
    assert f"video '{batch.keys[2]}': frame 1 is a damaged JPEG" in caplog.text
    every = type(batch)(**{**batch.__dict__, "jpegs": torch.zeros_like(batch.jpegs)})
    with pytest.raises(RuntimeError, match=r"every video of a batch has a damaged JPEG.*--augment_on device"):
        to_device(every, torch.device("cpu"), 32)


def test_the_gpu_decode_waits_for_the_side_streams_earlier_work(train_shards, monkeypatch):
    """nvjpeg writes its outputs from a stream of its own that waits for nothing of ours (torchvision's
    decode_jpegs_cuda), into memory the caching allocator hands out on the prefetcher's stream: maybe the previous
    batch's, freed while kernels that read it were still queued there. So the decode waits for that stream first.
    Without a GPU here, the order of the calls is what can be checked."""
    from train import prefetch

    batch = _batches(str(train_shards["unlabeled"]), "device_jpeg", count=1)[0]
    calls, real = [], prefetch.decode_jpeg

    class Stream:
        def synchronize(self):
            calls.append("synchronize")

    def decode(data, mode, device):
        calls.append(f"decode on {device}")
        return [real(d, mode=mode) for d in data]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(prefetch, "decode_jpeg", decode)
    prefetch._decode(batch, torch.device("cuda", 0))
    assert calls == ["synchronize", "decode on cuda:0"]
    calls.clear()
    prefetch._decode(batch, torch.device("cpu"))
    assert calls == ["decode on cpu"]


@pytest.mark.parametrize("augment_on", ["loader", "device", "device_jpeg"])
def test_a_video_whose_frames_differ_in_size_is_skipped(augment_on):
    from torchvision.io import encode_jpeg

    small, large = (
        encode_jpeg(torch.zeros(3, h, w, dtype=torch.uint8)).numpy().tobytes() for h, w in ((20, 30), (24, 30))
    )
    sample = {"__key__": "k", "txt": b"a caption", "0.jpg": small, "1.jpg": large}
    data._dropped = 0
    assert data.decode_sample(sample, 2, data.TrainTransform(16), augment_on) is None
    assert data._dropped == 1
    sample["1.jpg"] = small
    assert data.decode_sample(sample, 2, data.TrainTransform(16), augment_on) is not None


def test_a_starved_gpu_gets_advice_once_a_cpu_run_none():
    from train import loop

    cfg = resolve("paper", workers=3, augment_on="device")
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    hint = loop.starvation_hint(0.35, cfg, gpu)
    assert "35%" in hint and "--workers (now 3 per stream)" in hint and "--augment_on device_jpeg" in hint
    assert "device_jpeg" not in loop.starvation_hint(0.35, resolve("paper"), gpu)  # auto: the GPU decodes already
    assert loop.starvation_hint(0.1, cfg, gpu) is None and loop.starvation_hint(0.9, cfg, cpu) is None
