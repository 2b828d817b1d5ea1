"""Trainer pieces: model loading, video embeddings, data streams, fusion CLI, retrieval metrics, W&B mode."""

from __future__ import annotations

import copy
import http.server
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_CLIP, run_cli, with_a_sparse_member

from train import data
from train.fuse import fuse_state_dicts
from train.metrics import retrieval_metrics
from train.model import (
    VideoTextModel,
    WeightsError,
    check_weights,
    checkpoint_blocks,
    create_clip,
    encode_video,
    register_model,
    tokenizer_for,
)
from train.monitor import datasheet_tflops, step_flops, wandb_mode
from train.prefetch import to_device

# ---------------------------------------------------------------------------------------------------------- model


def test_model_names_and_configs():
    import open_clip

    assert register_model(str(TINY_CLIP)) == "tiny-clip"
    assert register_model("ViT-B-16-quickgelu") == "ViT-B-16-quickgelu"
    with pytest.raises(ValueError, match="quickgelu"):
        register_model("ViT-B-16-typo")
    with pytest.raises(FileNotFoundError):
        register_model("missing.json")
    assert register_model("demo-clip") == "demo-clip"  # a config the package ships, by name, from any folder
    assert open_clip.get_model_config("demo-clip") == json.loads(
        (REPO / "train/model_configs/demo-clip.json").read_text()
    )
    with pytest.raises(ValueError, match="nor one of ours \\(demo-clip\\)"):
        register_model("demo-clip-typo")


def test_a_config_file_is_registered_again_only_when_it_changed(tmp_path, monkeypatch):
    """open_clip appends a config's path to its list and reads every listed file again on each registration: a
    process that loaded models many times (a sweep, a notebook) grew the list and the cost of each load."""
    import open_clip

    calls = []
    real = open_clip.add_model_config
    monkeypatch.setattr(open_clip, "add_model_config", lambda path: (calls.append(Path(path).parent), real(path)))
    config = json.loads(TINY_CLIP.read_text())
    one, two = tmp_path / "one" / "toy-clip.json", tmp_path / "two" / "toy-clip.json"
    for path, dim in ((one, 16), (two, 24)):
        path.parent.mkdir()
        path.write_text(json.dumps({**config, "embed_dim": dim}))
    for _ in range(5):
        assert register_model(str(one)) == "toy-clip"
    assert calls == [one.parent] and open_clip.get_model_config("toy-clip")["embed_dim"] == 16
    register_model(str(two))  # the same name from another file: that file's config now
    register_model(str(one))  # and back
    assert calls == [one.parent, two.parent, one.parent] and open_clip.get_model_config("toy-clip")["embed_dim"] == 16
    one.write_text(json.dumps({**config, "embed_dim": 32}))  # edited: read again
    os.utime(one, ns=(1, 1))
    register_model(str(one))
    assert len(calls) == 4 and open_clip.get_model_config("toy-clip")["embed_dim"] == 32


@pytest.mark.parametrize("form", ["pt", "safetensors", "checkpoint", "ddp"])
def test_weights_load_from_local_files(tmp_path, form):
    torch.manual_seed(0)
    source = create_clip(str(TINY_CLIP)).state_dict()
    path = tmp_path / f"w.{'safetensors' if form == 'safetensors' else 'pt'}"
    if form == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    elif form == "checkpoint":
        torch.save({"step": 3, "student": source, "config": {}}, path)
    elif form == "ddp":
        torch.save({f"module.{k}": v for k, v in source.items()}, path)
    else:
        torch.save(source, path)
    loaded = create_clip(str(TINY_CLIP), str(path)).state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source)


def test_mismatched_weights_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"visual.proj": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="does not fit"):
        create_clip(str(TINY_CLIP), str(path))
    wrong = create_clip(str(TINY_CLIP)).state_dict()
    wrong["visual.proj"], wrong["text_projection"] = torch.zeros(3, 3), torch.zeros(2, 2)  # another model's shapes
    torch.save(wrong, path)
    with pytest.raises(
        ValueError, match=r"does not fit tiny-clip \(size mismatch for .* and 1 more\): pass the --model"
    ):
        create_clip(str(TINY_CLIP), str(path))


def test_weights_are_checked_without_reading_or_fetching_them(tmp_path):
    check_weights("ViT-B-16-quickgelu", "OpenAI")  # open_clip's own tag normalisation (case, - for _)
    check_weights("ViT-B-16", "laion2b-s34b-b88k")
    check_weights(str(TINY_CLIP), "")  # random initialisation
    with pytest.raises(WeightsError, match="nor a pretrained tag of ViT-B-16-quickgelu .its tags: openai"):
        check_weights("ViT-B-16-quickgelu", "laion2b_s34b_b88k")  # a tag of plain ViT-B-16 only
    with pytest.raises(FileNotFoundError):
        check_weights(str(TINY_CLIP), "runs/x/best")  # a path, even without a suffix, is a file and not a tag
    path = tmp_path / "w.pt"
    torch.save({"student": create_clip(str(TINY_CLIP)).state_dict(), "step": 1}, path)
    check_weights(str(TINY_CLIP), str(path))
    demo = str(REPO / "train" / "model_configs" / "demo-clip.json")  # another architecture, checked on meta
    with pytest.raises(WeightsError, match=r"does not fit demo-clip \(.* and \d+ more\): pass the --model"):
        check_weights(demo, str(path))


def test_an_unreachable_hf_hub_fails_at_once_naming_the_cache(tmp_path, monkeypatch):
    """No answer from the Hub: huggingface_hub retried each of open_clip's two files 5 times (23 s of back-off each);
    now the Hub is asked once, and with nothing cached the error names the cache it looked in."""
    import huggingface_hub.utils._http as hf_http
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on: refused at once, as a machine without network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    backoff = []
    monkeypatch.setattr(hf_http.time, "sleep", backoff.append)  # its retries' waits, counted and not waited
    with pytest.raises(WeightsError, match=rf"HF Hub cannot be reached \(http://127.0.0.1:{port}: .*\)") as e:
        create_clip("ViT-B-16-quickgelu", "openai")
    assert str(tmp_path / "hub") in str(e.value) and "--teacher_weights, eval.run's and eval.tag's --weights" in str(
        e.value
    )
    assert backoff == [] and constants.HF_HUB_OFFLINE is False


def test_an_unreachable_hf_hub_loads_cached_weights_in_offline_mode(monkeypatch, capsys):
    import open_clip
    from huggingface_hub import constants

    from train import model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        model, "hub_unreachable", lambda: "https://huggingface.co: [Errno -2] Name or service not known"
    )
    build = open_clip.create_model
    offline = []

    def create_model(name, pretrained=None, **kwargs):
        offline.append(constants.HF_HUB_OFFLINE)  # huggingface_hub then takes files from its cache at once
        return build(name, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", create_model)
    create_clip(str(TINY_CLIP), "openai")
    assert offline == [True] and constants.HF_HUB_OFFLINE is False
    assert "cannot be reached (https://huggingface.co: [Errno -2]" in capsys.readouterr().out
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # set by the user: the Hub is not asked
    monkeypatch.setattr(model, "hub_unreachable", lambda: pytest.fail("asked the Hub in offline mode"))
    create_clip(str(TINY_CLIP), "openai")


def test_the_hub_probe_takes_any_http_answer_as_reachable(monkeypatch):
    from huggingface_hub import constants

    from train.model import hub_unreachable

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_unreachable() == ""
    finally:
        server.shutdown()
        server.server_close()
    assert hub_unreachable().startswith(f"http://127.0.0.1:{server.server_port}: ")  # closed now


def test_video_embedding_is_the_mean_of_normalised_frame_embeddings():
    torch.manual_seed(0)
    clip = create_clip(str(TINY_CLIP)).eval()
    frames = torch.randn(3, 4, 3, 32, 32)  # (B, T, 3, H, W)
    with torch.no_grad():
        per_frame = [F.normalize(clip.encode_image(frames[:, t]), dim=-1) for t in range(4)]
        mean = sum(per_frame) / 4
        assert torch.allclose(encode_video(clip, frames, renormalize=False), mean, atol=1e-6)
        assert torch.allclose(encode_video(clip, frames), F.normalize(mean, dim=-1), atol=1e-6)
        video, text = VideoTextModel(clip)(frames, tokenizer_for(str(TINY_CLIP))(["a", "b", "c"]))
    assert video.shape == text.shape == (3, 32)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)


def _saved_bytes_and_grads(clip, frames, tokens) -> tuple[int, list[torch.Tensor]]:
    """Bytes the autograd graph keeps for backward outside checkpointed blocks, and the gradients."""
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        video, text = VideoTextModel(clip)(frames, tokens)
    (video @ text.T).logsumexp(-1).sum().backward()
    return sum(kept.values()), [p.grad for p in clip.parameters() if p.grad is not None]


def test_checkpointing_the_first_blocks_frees_their_activations_and_keeps_gradients_and_names():
    torch.manual_seed(0)
    plain = create_clip(str(TINY_CLIP))  # 2 blocks in the image tower, 2 in the text tower
    frames, tokens = torch.randn(3, 4, 3, 32, 32), tokenizer_for(str(TINY_CLIP))(["a", "b c", "d e f"])
    kept, grads = {}, {}
    for name, blocks, wrapped in (("none", 0, 0), ("first", 1, 2), ("all", True, 4), ("more", 5, 4)):
        clip = copy.deepcopy(plain)
        order = [id(p) for p in clip.parameters()]
        assert checkpoint_blocks(clip, blocks) == wrapped
        assert [id(p) for p in clip.parameters()] == order  # so a resume may change N: optimizer state is by order
        assert list(clip.state_dict()) == list(plain.state_dict())  # checkpoints and fusion see the plain model
        clip.load_state_dict(plain.state_dict())
        kept[name], grads[name] = _saved_bytes_and_grads(clip, frames, tokens)
    assert kept["none"] > 1.3 * kept["first"] > 1.3 * 1.3 * kept["all"]  # checkpointed blocks' activations are freed
    assert kept["more"] == kept["all"]
    for name in ("first", "all"):
        assert len(grads["none"]) > 40
        for a, b in zip(grads["none"], grads[name], strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # recomputation gives the same gradients
    again = copy.deepcopy(plain)
    checkpoint_blocks(again, 1)
    assert checkpoint_blocks(again, 1) == 2  # idempotent: no block is wrapped twice


# ---------------------------------------------------------------------------------------------------------- data


def test_missing_or_empty_shard_folders_fail_clearly(tmp_path):
    with pytest.raises(data.DataError, match="does not exist.*pipeline.shard"):
        data.list_shards(tmp_path / "nope")
    (tmp_path / "000000.tar").write_bytes(b"")  # a shard given for its folder: it said "does not exist"
    with pytest.raises(data.DataError, match="is a file; give the folder that holds the shards"):
        data.list_shards(tmp_path / "000000.tar")
    (tmp_path / "000000.tar").unlink()
    with pytest.raises(data.DataError, match="no complete shard"):
        data.list_shards(tmp_path)
    (tmp_path / "000000.tar").write_bytes(b"")  # a tar without stats is not complete
    with pytest.raises(data.DataError, match="no complete shard"):
        data.list_shards(tmp_path)


def test_a_step_that_can_hold_a_labeled_video_twice_is_warned_of(train_shards, monkeypatch, caplog):
    """A step larger than the set holds videos twice every step; one longer than the runs that train.passes keeps
    clean (a third of the set, plus one) may where it spans two passes. The loss takes each copy for another video."""
    tok = tokenizer_for(str(TINY_CLIP))
    monkeypatch.setenv("WORLD_SIZE", "2")

    def warned(batch: int, start: int = 0) -> list[str]:
        caplog.clear()
        data.labeled_stream(train_shards["labeled"], 4, data.TrainTransform(32), tok, batch, 0, start=start)
        return [r.getMessage() for r in caplog.records if "come twice" in r.getMessage()]

    assert warned(4) == []  # 2 x 4 of 8: the steps split each pass
    assert warned(1) == []  # 2 x 1: within the guard of 8 // 3, + 1
    assert warned(5) == [
        "a step takes 10 labeled videos (2 ranks x --batch_labeled 5) from a set of 8: some come twice in every "
        "step, where the contrastive loss takes each copy for another video; lower --batch_labeled (a step of at "
        "most 3 never holds one twice)"
    ]
    assert "in the steps that span two passes over the set" in warned(4, start=2)[0]  # a resume off the passes
    assert "in the steps that span two passes" in warned(3)[0]  # 6 of 8


def test_a_tar_cut_anywhere_gives_only_its_whole_samples_and_one_warning(train_shards, tmp_path, caplog):
    """tarfile raises on a cut inside a member's data but ends in silence on a cut at or inside a header: such a tar
    lost its later samples with no warning, and its last sample given could lack members."""
    tar = data.list_shards(train_shards["val"])[0]
    whole = list(data._tar_samples(tar))
    with tarfile.open(tar) as t:
        infos = [i for i in t if i.isfile()]
    raw = Path(tar).read_bytes()
    third = [i for i in infos if i.name.startswith(whole[2][0] + ".")]  # the third sample's members
    cuts = (third[0].offset, third[0].offset + 100, third[0].offset_data + 10, third[1].offset, third[-1].offset)
    for n, cut in enumerate(cuts):  # at and inside its first header, in its first member's data, at later headers
        cut_tar = tmp_path / f"{n}.tar"
        cut_tar.write_bytes(raw[:cut])
        caplog.clear()
        assert list(data._tar_samples(str(cut_tar))) == whole[:2], cut
        warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
        assert len(warned) == 1 and "using its first 2 samples" in warned[0], (cut, warned)
        assert list(data._tar_samples(str(cut_tar))) == whole[:2]  # validation indexes it again: no second warning
        assert len([r for r in caplog.records if "is damaged" in r.getMessage()]) == 1
    assert len(whole) == len({m.name.split(".")[0] for m in infos}) and not [
        r for r in caplog.records if tar in r.getMessage()
    ]


def test_a_ctrl_c_during_a_checkpoint_save_takes_effect_once_the_file_is_in_place(tmp_path, monkeypatch):
    """A Ctrl-C inside torch.save made its zip writer raise "unexpected pos" in place of the KeyboardInterrupt: a
    traceback instead of train.main's one line, and the checkpoint lost."""
    import os
    import signal

    from train import checkpoint

    save = torch.save

    def interrupted(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # delivered now, in the middle of the save
        save(obj, f)

    monkeypatch.setattr(torch, "save", interrupted)
    # Python's handler, as an interactive run has it, even where pytest was started with SIGINT ignored (`pytest &`)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"step": 3, "w": torch.ones(4)}, tmp_path / "latest.pt")
    assert checkpoint.load(tmp_path / "latest.pt")["step"] == 3  # whole, under its name
    try:
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's handler is back
    finally:
        signal.signal(signal.SIGINT, previous)


def test_labeled_passes_cover_every_sample_once_across_readers(train_shards, monkeypatch):
    shards = data.IndexedShards(data.list_shards(train_shards["labeled"]), seed=3)
    assert len(shards) == 8
    per_pass = {}
    for rank in range(2):  # two ranks of one reader each
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_pass[rank] = [s["__index__"] for s in itertools.islice(shards(), 12)]  # 3 passes of 4 each
    for p in range(3):
        seen = per_pass[0][4 * p : 4 * p + 4] + per_pass[1][4 * p : 4 * p + 4]
        assert sorted(seen) == list(range(8))
    assert per_pass[0][:4] != per_pass[0][4:8]  # reshuffled each pass


def test_validation_stream_is_complete_and_ordered_by_index(train_shards):
    tok = tokenizer_for(str(TINY_CLIP))
    stream = data.validation_stream(train_shards["val"], 4, data.EvalTransform(32), tok, 3)
    batches = list(data.loader(stream, 2, False, 0))
    index = torch.cat([b.index for b in batches])
    assert sorted(index.tolist()) == list(range(8))
    assert all(b.video.shape[1:] == (4, 3, 32, 32) for b in batches)


def _damaged_copy(folder, tmp_path, damage) -> Path:
    """A copy of a shard folder whose every frame is rewritten by ``damage`` ((member name, payload) -> payload)."""
    out = tmp_path / "damaged"
    shutil.copytree(folder, out)
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(info, tar.extractfile(info).read()) for info in tar]
        with tarfile.open(shard, "w") as tar:
            for info, payload in members:
                if info.name.endswith(".jpg"):
                    payload = damage(info.name, payload)
                    info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return out


@pytest.mark.parametrize("augment_on", ["loader", "device", "device_jpeg"])
def test_broken_samples_are_skipped_and_counted(train_shards, tmp_path, augment_on):
    """Not a JPEG, a JPEG cut short, a truncated tar: the stream goes on and each batch says how many it dropped.

    With augment_on device_jpeg the workers do not decode; their header check must catch the same samples."""
    with tarfile.open(train_shards["unlabeled"] / "000000.tar") as tar:
        jpegs = [name for name in tar.getnames() if name.endswith(".1.jpg")]
    damage = {jpegs[0]: lambda payload: b"not a jpeg", jpegs[1]: lambda payload: payload[: len(payload) // 2]}
    broken = _damaged_copy(
        train_shards["unlabeled"], tmp_path, lambda name, payload: damage[name](payload) if name in damage else payload
    )
    cut = broken / "000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    tok = tokenizer_for(str(TINY_CLIP))
    stream = data.unlabeled_stream(broken, 4, data.TrainTransform(32), tok, 4, seed=0, augment_on=augment_on)
    batches = list(itertools.islice(iter(data.loader(stream, 0, False, 0)), 30))
    batches = [to_device(b, torch.device("cpu"), 32) for b in batches]  # every kept JPEG decodes
    assert all(b.video.shape == (4, 4, 3, 32, 32) for b in batches)
    damaged_keys = {name.split(".")[0] for name in damage}
    assert not damaged_keys & {k for b in batches for k in b.keys}
    assert sum(b.dropped for b in batches) > 0


def test_the_unlabeled_stream_skips_a_shard_with_a_sparse_member_without_reading_it(
    train_shards, tmp_path, caplog, monkeypatch
):
    """webdataset's tar reader read whatever size a member's header declared: a 10 KB sparse member became 300 MB
    of zeros in a loader worker (a terabyte, a MemoryError). The stream reads shards with pipeline.writer's reader,
    which refuses such a member; the samples before it are kept."""
    import tracemalloc

    monkeypatch.setattr(data, "_logged", 0)  # the first few are logged, per process

    tar = with_a_sparse_member(train_shards["unlabeled"], tmp_path / "sparse", declared=300 << 20)
    tok = tokenizer_for(str(TINY_CLIP))
    stream = data.unlabeled_stream(tmp_path / "sparse", 4, data.TrainTransform(32), tok, 4, seed=0)
    tracemalloc.start()
    try:
        batches = list(itertools.islice(iter(data.loader(stream, 0, False, 0)), 12))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"skipping the rest of {tar}: member " in caplog.text and "is a sparse file" in caplog.text
    assert peak < 100 << 20, f"{peak / 2**20:.0f} MiB"
    with tarfile.open(tar) as t:
        first = t.getnames()[0].split(".")[0]
    assert first in {k for b in batches for k in b.keys}  # the sample before it


def test_a_loader_worker_counts_only_its_own_skipped_samples(train_shards, monkeypatch):
    """A forked worker used to inherit the parent's count of samples not yet reported, and report them again."""
    monkeypatch.setattr(data, "_dropped", 5)  # e.g. left by an in-process stream before the loader started
    tok = tokenizer_for(str(TINY_CLIP))
    stream = data.unlabeled_stream(train_shards["unlabeled"], 4, data.TrainTransform(32), tok, 4, seed=0)
    batches = list(itertools.islice(iter(data.loader(stream, 1, False, 0)), 2))
    assert [b.dropped for b in batches] == [0, 0]


def test_each_loader_worker_shuffles_the_unlabeled_samples_its_own_way(train_shards, tmp_path):
    """The shuffle's random generator was made in the main process and copied into each forked worker: with a folder
    of one shard, both workers read it and gave the same batches, so each came twice in a row."""
    one = tmp_path / "one"
    one.mkdir()
    for name in ("000000.tar", "000000_stats.json"):
        shutil.copy(train_shards["unlabeled"] / name, one / name)
    tok = tokenizer_for(str(TINY_CLIP))
    stream = data.unlabeled_stream(one, 4, data.TrainTransform(32), tok, 2, seed=0)
    keys = [b.keys for b in itertools.islice(iter(data.loader(stream, 2, False, 0)), 6)]  # workers take turns
    assert keys[0::2] != keys[1::2], keys
    again = data.unlabeled_stream(one, 4, data.TrainTransform(32), tok, 2, seed=0)
    assert [b.keys for b in itertools.islice(iter(data.loader(again, 2, False, 0)), 6)] == keys  # still seeded


def test_the_unlabeled_shuffle_buffer_is_a_flag(train_shards, tmp_path):
    """Each unlabeled loader worker held 1,000 encoded samples (about 230 MB at the shards' default size), a fixed
    figure; --shuffle_buffer sets it (1: no shuffle at all, the shard's own order)."""
    from pipeline.writer import iter_tar_samples
    from train.config import resolve

    one = tmp_path / "one"
    one.mkdir()
    for name in ("000000.tar", "000000_stats.json"):
        shutil.copy(train_shards["unlabeled"] / name, one / name)
    in_file = [key for key, _ in iter_tar_samples(one / "000000.tar")]
    tok = tokenizer_for(str(TINY_CLIP))

    def keys(buffer: int) -> list[str]:
        stream = data.unlabeled_stream(one, 4, data.TrainTransform(32), tok, 2, seed=0, shuffle_buffer=buffer)
        return [k for b in itertools.islice(iter(data.loader(stream, 0, False, 0)), len(in_file) // 2) for k in b.keys]

    assert keys(1) == in_file[: len(in_file) // 2 * 2]
    assert keys(1000) != keys(1)
    with pytest.raises(ValueError, match="--shuffle_buffer must be a whole number of at least 1"):
        resolve("demo", labeled="l", unlabeled="u", out=str(tmp_path), shuffle_buffer=0)


def _labeled_keys(folder, monkeypatch, ranks: int, batch: int, workers: int, start: int, steps: int) -> list[str]:
    """The labeled samples ``steps`` steps of a run on ``ranks`` ranks take, rank after rank within a step."""
    tok = tokenizer_for(str(TINY_CLIP))
    per_rank = []
    for rank in range(ranks):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(ranks))
        stream = data.labeled_stream(folder, 4, data.TrainTransform(32), tok, batch, 7, "device_jpeg", start=start)
        per_rank.append([b.keys for b in itertools.islice(iter(data.loader(stream, workers, False, 0)), steps)])
    assert all(len(keys) == batch for batches in per_rank for keys in batches)
    return [k for step in range(steps) for rank in range(ranks) for k in per_rank[rank][step]]


def test_a_resumed_labeled_stream_goes_on_where_it_stopped_with_any_ranks_workers_or_batch(train_shards, monkeypatch):
    """The steps of a run (2 ranks, 2 workers each, batches of 3; 8 samples, so passes end inside batches) take
    the passes' samples in order, each pass every sample once in a new order. A run resumed after 3 steps (18
    samples) on 3 ranks without workers, batches of 2, or on 1 rank with 2 workers, batches of 5, takes the samples
    the first run would have taken next. It used to start a new pass with a new permutation, and then (skipping by
    batches) to go on exactly only with the same ranks and workers."""
    folder = train_shards["labeled"]
    straight = _labeled_keys(folder, monkeypatch, ranks=2, batch=3, workers=2, start=0, steps=6)
    passes = [straight[i : i + 8] for i in range(0, 32, 8)]
    assert all(sorted(p) == sorted(passes[0]) and len(set(p)) == 8 for p in passes)
    assert passes[0] != passes[1]  # reshuffled each pass
    assert _labeled_keys(folder, monkeypatch, ranks=3, batch=2, workers=0, start=18, steps=3) == straight[18:]
    assert _labeled_keys(folder, monkeypatch, ranks=1, batch=5, workers=2, start=18, steps=3) == straight[18:33]


def test_every_reader_yields_and_each_pass_covers_every_sample_once(train_shards, monkeypatch):
    """8 samples over 3 readers (not a divisor), and over 12 (more readers than samples: a reader with no share
    used to spin forever without a sample): the readers' first elements, taken in turn, are whole passes."""
    for readers in (3, 12):
        monkeypatch.setenv("WORLD_SIZE", str(readers))
        taken = []
        for reader in range(readers):
            monkeypatch.setenv("RANK", str(reader))
            source = data.IndexedShards(data.list_shards(train_shards["labeled"]), seed=3)
            taken.append([s["__index__"] for s in itertools.islice(source(), 8)])
        in_turn = [taken[r][j] for j in range(8) for r in range(readers)]  # the sequence the readers split
        passes = [in_turn[i : i + 8] for i in range(0, len(in_turn), 8)]
        assert all(sorted(p) == list(range(8)) for p in passes), readers
        assert passes[0] != passes[1]  # reshuffled each pass


def test_train_transform_shares_one_crop_and_flip_across_frames():
    frames = [torch.arange(3 * 40 * 60, dtype=torch.float32).view(3, 40, 60).to(torch.uint8)] * 4
    random.seed(0)
    video = data.TrainTransform(24)(frames)
    assert video.shape == (4, 3, 24, 24)
    assert all(torch.equal(video[0], video[t]) for t in range(4))


def test_crop_box_draws_torchvisions_random_resized_crop_from_its_own_generator():
    """train.data.crop_box is RandomResizedCrop.get_params with a generator of its own: the same boxes in law (the
    area share and aspect ratio), inside the image, and the same center crop when every try fails."""
    from torchvision.transforms import RandomResizedCrop

    rng, n = random.Random(0), 4000
    ours = [data.crop_box(40, 60, (0.5, 1.0), rng) for _ in range(n)]
    torch.manual_seed(0)
    theirs = [RandomResizedCrop.get_params(torch.empty(0, 40, 60), [0.5, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    assert all(0 <= i and 0 <= j and 0 < h and 0 < w and i + h <= 40 and j + w <= 60 for i, j, h, w in ours)
    for stat in (lambda b: b[2] * b[3] / 2400, lambda b: math.log(b[3] / b[2]), lambda b: b[0], lambda b: b[1]):
        mean = [sum(map(stat, boxes)) / n for boxes in (ours, theirs)]
        spread = (sum((stat(b) - mean[1]) ** 2 for b in theirs) / n) ** 0.5
        assert abs(mean[0] - mean[1]) < 4 * spread / n**0.5, mean  # within 4 standard errors
    for height, width in ((10, 1000), (1000, 10)):  # no try fits: the center crop, clamped to the ratios
        expected = RandomResizedCrop.get_params(torch.empty(0, height, width), [0.5, 1.0], [3 / 4, 4 / 3])
        assert data.crop_box(height, width, (0.5, 1.0), random.Random(0)) == expected


def test_a_transforms_crops_do_not_depend_on_other_random_draws():
    """Each stream's transform draws from a generator of its own: with --workers 0 on a GPU the two streams draw in
    two prefetch threads, and from the process's global generators the crops depended on the threads' timing."""
    alone = data.TrainTransform(24, seed="7")
    alone = torch.stack([alone.params(40, 60) for _ in range(20)])
    transform, other, disturbed = data.TrainTransform(24, seed="7"), data.TrainTransform(24, seed="8"), []
    for _ in range(20):
        random.random(), torch.rand(1), other.params(40, 60)  # global draws, and the other stream's
        disturbed.append(transform.params(40, 60))
    assert torch.equal(torch.stack(disturbed), alone)
    assert not torch.equal(torch.stack([other.params(40, 60) for _ in range(20)]), alone)  # seeds differ


# ---------------------------------------------------------------------------------------------------------- fusion


def test_fusion_is_exact_at_the_ends_and_linear_between():
    torch.manual_seed(0)
    teacher = {"w": torch.randn(5, 3), "b": torch.randn(3), "ids": torch.arange(4)}
    student = {"w": torch.randn(5, 3), "b": torch.randn(3), "ids": torch.arange(4) + 7}
    assert all(torch.equal(fuse_state_dicts(teacher, student, 0.0)[k], teacher[k]) for k in teacher)
    one = fuse_state_dicts(teacher, student, 1.0)
    assert torch.equal(one["w"], student["w"]) and torch.equal(one["ids"], teacher["ids"])
    mid = fuse_state_dicts(teacher, student, 0.4)
    assert torch.allclose(mid["w"], 0.6 * teacher["w"] + 0.4 * student["w"], atol=1e-7)
    with pytest.raises(ValueError, match="different parameters"):
        fuse_state_dicts(teacher, {"w": student["w"]}, 0.4)
    with pytest.raises(ValueError, match="alpha"):
        fuse_state_dicts(teacher, student, 1.5)


def test_fuse_cli_writes_an_open_clip_state_dict(tmp_path):
    import open_clip

    torch.manual_seed(1)
    teacher = create_clip(str(TINY_CLIP)).state_dict()
    torch.manual_seed(2)
    student = create_clip(str(TINY_CLIP)).state_dict()
    torch.save(teacher, tmp_path / "teacher.pt")
    torch.save({"step": 9, "student": student}, tmp_path / "best.pt")
    out = tmp_path / "fitclip.pt"
    run_cli(
        "train.fuse",
        "--model",
        TINY_CLIP,
        "--teacher",
        tmp_path / "teacher.pt",
        "--student",
        tmp_path / "best.pt",
        "--alpha",
        0.4,
        "--out",
        out,
    )
    open_clip.add_model_config(str(TINY_CLIP))
    model = open_clip.create_model("tiny-clip", pretrained=str(out))
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.6 * teacher[k] + 0.4 * student[k], atol=1e-6)
    proc = run_cli(
        "train.fuse",
        "--model",
        TINY_CLIP,
        "--teacher",
        tmp_path / "teacher.pt",
        "--student",
        tmp_path / "missing.pt",
        "--out",
        tmp_path / "x.pt",
        check=False,
    )
    assert proc.returncode != 0 and "not found" in proc.stderr and not (tmp_path / "x.pt").exists()
    # checked before any weights load: the flag named, nothing written
    from train import fuse

    for flags, says in (
        ({"alpha": "abc"}, "error: --alpha must be a number from 0 to 1, got 'abc'"),
        ({"alpha": 1.5}, "error: --alpha must be a number from 0 to 1, got 1.5"),
        ({"out": str(tmp_path)}, f"error: --out {tmp_path} is a folder; give the file to write"),
        # a random teacher, different on every run (a run trained with --teacher_weights "" saved teacher_init.pt)
        ({"teacher": ""}, "error: --teacher is empty; give an open_clip pretrained tag (openai) or a weights file"),
        ({"student": ""}, "error: --student is empty; give the student's weights file (the best.pt or latest.pt"),
    ):
        args = {"student": str(tmp_path / "best.pt"), "out": str(tmp_path / "y.pt"), "teacher": "nope", **flags}
        with pytest.raises(SystemExit) as e:
            fuse.main(model=str(TINY_CLIP), **args)
        assert str(e.value).startswith(says) and not (tmp_path / "y.pt").exists()


def test_fuse_takes_the_model_and_teacher_a_checkpoint_was_trained_with(tmp_path, capsys, monkeypatch):
    """The README's `train.fuse --student runs/x/best.pt --alpha 0.4 --out fitclip.pt` on a run of another model
    fetched ViT-B/16's openai weights (a minute of retries offline) before failing; and --out best.pt wrote over
    the training checkpoint."""
    from train import fuse

    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(1)
    teacher = create_clip(str(TINY_CLIP)).state_dict()
    torch.manual_seed(2)
    student = create_clip(str(TINY_CLIP)).state_dict()
    torch.save(teacher, run / "teacher_init.pt")  # a run with --teacher_weights "" saves its random teacher here
    config = {"model": str(TINY_CLIP), "teacher_weights": ""}
    torch.save({"step": 9, "student": student, "config": config}, run / "best.pt")
    fuse.main(student=str(run / "best.pt"), out=str(tmp_path / "fitclip.pt"), alpha=0.4)
    assert f"was trained with --model {TINY_CLIP} and teacher {run / 'teacher_init.pt'}" in capsys.readouterr().out
    fused = torch.load(tmp_path / "fitclip.pt", weights_only=True)
    assert all(
        torch.allclose(v, 0.6 * teacher[k] + 0.4 * student[k], atol=1e-6)
        for k, v in fused.items()
        if v.is_floating_point()
    )
    for flags, says in (
        ({"out": str(run / "best.pt")}, f"error: --out {run / 'best.pt'} is the --student's file"),
        ({"out": str(run / "teacher_init.pt")}, f"error: --out {run / 'teacher_init.pt'} is the --teacher's file"),
        # another --model given: the student's misfit is named before any teacher loads (openai is not fetched)
        ({"out": str(tmp_path / "z.pt"), "model": "ViT-B-16-quickgelu", "teacher": "openai"}, "error: "),
    ):
        with pytest.raises(SystemExit) as e:
            fuse.main(student=str(run / "best.pt"), **flags)
        assert str(e.value).startswith(says)
    assert "does not fit ViT-B-16-quickgelu" in str(e.value) and not (tmp_path / "z.pt").exists()
    assert torch.load(run / "best.pt", weights_only=True)["step"] == 9

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fuse, "fuse", interrupted)  # Ctrl-C: one line, not a traceback
    with pytest.raises(SystemExit) as e:
        fuse.main(student=str(run / "best.pt"), out=str(tmp_path / "fitclip.pt"))
    assert str(e.value).startswith(f"interrupted: {tmp_path / 'fitclip.pt'} is as it was before")


# ---------------------------------------------------------------------------------------------------------- metrics


def brute_force_rank(scores: torch.Tensor, i: int) -> int:
    """1 + candidates ranked ahead of the answer: higher score, or equal score and lower index."""
    s = scores[i].tolist()
    return 1 + sum(1 for j, x in enumerate(s) if x > s[i] or (x == s[i] and j < i))


@pytest.mark.parametrize("ties", [False, True])
def test_retrieval_metrics_match_brute_force(ties):
    torch.manual_seed(0)
    for n in (1, 3, 17, 40):
        scores = torch.randn(n, n)
        if ties:
            scores = (scores * 2).round() / 2  # many equal scores
        ranks = torch.tensor([brute_force_rank(scores, i) for i in range(n)], dtype=torch.float64)
        metrics = retrieval_metrics(scores)
        for k in (1, 5, 10):
            assert metrics[f"R@{k}"] == pytest.approx(float((ranks <= k).double().mean() * 100))
        assert metrics["MdR"] == float(ranks.median())
        assert metrics["MnR"] == pytest.approx(float(ranks.mean()))


def test_all_tied_scores_rank_by_index():
    metrics = retrieval_metrics(torch.zeros(4, 4))
    assert metrics["R@1"] == 25.0 and metrics["MnR"] == 2.5


# ---------------------------------------------------------------------------------------------------------- monitor


def test_wandb_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("off") == "off"


def test_wandb_plots_against_the_trainers_step_so_a_resumed_run_keeps_its_steps(monkeypatch, tmp_path):
    """A resumed run logs again the steps since its checkpoint. Logged as W&B's own step they were dropped (it
    must grow); as a metric that every other one is plotted against, they are kept."""
    import wandb

    from train.config import resolve
    from train.monitor import STEP_METRIC, Monitor

    class Run:  # records what the Monitor asks of W&B (the real calls run offline in test_train's torchrun test)
        def __init__(self):
            self.calls = []

        def define_metric(self, name, **options):
            self.calls.append(("define_metric", name, options))

        def log(self, data, **options):
            self.calls.append(("log", data, options))

    run = Run()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    cfg = resolve("demo", labeled="l", unlabeled="u", out=str(tmp_path), wandb="offline", progress=False)
    monitor = Monitor(cfg, True, 10, 0)
    for step in (4, 5, 4):  # a resume after step 5, from the checkpoint of step 4
        monitor.log({"train/loss": 1.0}, step=step)
    assert run.calls[:2] == [("define_metric", STEP_METRIC, {}), ("define_metric", "*", {"step_metric": STEP_METRIC})]
    assert run.calls[2:] == [("log", {"train/loss": 1.0, STEP_METRIC: s}, {}) for s in (4, 5, 4)]


def test_a_failing_wandb_call_is_a_warning_and_the_run_goes_on_without_it(monkeypatch, tmp_path, capsys):
    """W&B's service gone mid-run (killed, out of memory): run.log raised ConnectionResetError, which ended the
    training without its checkpoint, summary.json and fused model; and run.finish in the trainer's finally raised
    it again."""
    import wandb

    from train.config import resolve
    from train.monitor import Monitor

    class Run:
        def __init__(self):
            self.logged = 0

        def define_metric(self, name, **options):
            pass

        def log(self, data, **options):
            self.logged += 1
            if self.logged == 2:
                raise ConnectionResetError("Connection lost")

        def finish(self, **options):
            raise AssertionError("finish called on a failed run")

    run = Run()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    cfg = resolve("demo", labeled="l", unlabeled="u", out=str(tmp_path), wandb="offline", progress=False)
    monitor = Monitor(cfg, True, 10, 0)
    for step in (1, 2, 3):
        monitor.log({"train/loss": 1.0}, step=step)  # the console line goes on
    monitor.finish({"val/best_loss": 1.0}, exit_code=0)
    out = capsys.readouterr().out
    assert run.logged == 2 and "step 3: train loss 1" in out
    assert "warning: W&B failed (ConnectionResetError: Connection lost); the run goes on without it" in out


def test_the_progress_bar_shows_the_last_training_and_validation_figures_under_their_own_names(tmp_path):
    """A validation's figures replaced the bar's, its loss under the training loss's name ("loss=4.485")."""
    from train.config import resolve
    from train.monitor import Monitor

    cfg = resolve("demo", labeled="l", unlabeled="u", out=str(tmp_path), wandb="off", progress=True)
    monitor = Monitor(cfg, True, 10, 0)
    monitor.log({"train/loss": 1.5, "train/lr": 0.1}, step=1)
    monitor.log({"val/loss": 4.485, "val/R@1": 25.0}, step=2)
    assert monitor.bar.postfix == "loss=1.5, val_loss=4.485, val_R@1=25"
    monitor.log({"train/loss": 1.25}, step=3)
    assert monitor.bar.postfix == "loss=1.25, val_loss=4.485, val_R@1=25"
    monitor.finish()


def test_step_flops_counts_student_backward_and_teacher_forward():
    assert step_flops(10, 10, 2, 3) == 3 * 10 * 5 + 10 * 3


class _Hangs(torch.utils.data.IterableDataset):
    """A stream whose read never returns, as a shard on a stale network mount."""

    def __iter__(self):
        import time

        time.sleep(4)  # longer than the timeout below; not much, as the loader's shutdown waits for its worker
        yield None


def test_a_loader_whose_workers_hang_ends_the_run_instead_of_stalling_every_rank(monkeypatch):
    monkeypatch.setattr(data, "LOADER_TIMEOUT_S", 1)
    batches = iter(data.loader(_Hangs(), 1, False, 0))
    with pytest.raises(RuntimeError, match="DataLoader timed out after 1 seconds"):
        next(batches)
    assert data.loader(_Hangs(), 0, False, 0).timeout == 0  # no worker: nothing to time


@pytest.mark.parametrize("kind", ["labeled", "unlabeled", "tars"])
def test_a_stream_of_broken_samples_fails_instead_of_spinning(train_shards, tmp_path, monkeypatch, kind):
    """Every sample broken (or every tar): the endless streams used to spin forever. webdataset's map drops a
    stage's None results, so the count of broken samples in a row must be kept where they are found."""
    monkeypatch.setattr(data, "DRY_LIMIT", 50)
    monkeypatch.setattr(data, "_streak", 0)
    if kind == "tars":  # every shard cut short before its first member's end: tar errors, no sample at all
        folder = tmp_path / "cut"
        shutil.copytree(train_shards["unlabeled"], folder)
        for shard in folder.glob("*.tar"):
            shard.write_bytes(shard.read_bytes()[:700])
    else:
        folder = _damaged_copy(train_shards[kind], tmp_path, lambda name, payload: b"not a jpeg")
    make = data.labeled_stream if kind == "labeled" else data.unlabeled_stream
    stream = make(folder, 4, data.TrainTransform(32), tokenizer_for(str(TINY_CLIP)), 4, 0)
    with pytest.raises(data.DataError, match="50 samples or shard members in a row could not be read"):
        next(iter(data.loader(stream, 0, False, 0)))


@pytest.mark.parametrize("augment_on", ["loader", "device", "device_jpeg"])
def test_a_frame_whose_header_declares_more_pixels_than_a_frame_may_have_is_skipped_undecoded(
    monkeypatch, caplog, augment_on
):
    """A JPEG header can declare 65,500 x 65,500 in a few hundred bytes; libjpeg allocated it and filled it with
    gray (12,000 x 12,000: 7 s and 4.5 GB in a loader worker), and the sample was trained on."""
    from torchvision.io import encode_jpeg

    monkeypatch.setattr(data, "_logged", 0)  # the first few are logged, per process
    jpeg = encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8)).numpy().tobytes()
    sof = jpeg.index(b"\xff\xc0")  # baseline frame header: length (2), precision (1), height (2), width (2)
    bomb = jpeg[: sof + 5] + (8193).to_bytes(2, "big") * 2 + jpeg[sof + 9 :]
    samples = [
        {"__key__": key, "txt": b"a caption", **{f"{k}.jpg": frame if k == 2 else jpeg for k in range(4)}}
        for key, frame in (("good", jpeg), ("bomb", bomb))
    ]
    kept = list(data.decoded(iter(samples), 4, data.TrainTransform(8), augment_on))
    assert [s["key"] for s in kept] == ["good"]
    assert "skipping sample bomb: ValueError: a 8193x8193 frame, over the 67,108,864 pixels" in caplog.text


@pytest.mark.parametrize("augment_on", ["loader", "device_jpeg"])
def test_a_cameras_multi_picture_jpeg_is_a_frame(augment_on):
    """An MPO (a JPEG with more pictures after it, as cameras write) decodes as its first picture; the header check
    refused it as "not a JPEG but MPO"."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 16))])
    sample = {"__key__": "mpo", "txt": b"a caption", **{f"{k}.jpg": buffer.getvalue() for k in range(4)}}
    assert [s["key"] for s in data.decoded(iter([sample]), 4, data.TrainTransform(8), augment_on)] == ["mpo"]


def test_a_caption_longer_than_pipeline_shard_writes_is_skipped_not_tokenized(monkeypatch, caplog):
    """A shard from elsewhere can hold a 64 MB caption (a member's most): tokenized at every draw, 4 s per MB."""
    from torchvision.io import encode_jpeg

    from pipeline.source import MAX_CAPTION_CHARS

    monkeypatch.setattr(data, "_logged", 0)
    jpeg = encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8)).numpy().tobytes()
    samples = [
        {"__key__": key, "txt": ("a" * length).encode(), **{f"{k}.jpg": jpeg for k in range(4)}}
        for key, length in (("longest", MAX_CAPTION_CHARS), ("longer", MAX_CAPTION_CHARS + 1))
    ]
    kept = list(data.decoded(iter(samples), 4, data.TrainTransform(8)))
    assert [s["key"] for s in kept] == ["longest"]
    assert "skipping sample longer: ValueError: a caption of 10,001 characters, over the 10,000" in caplog.text


def test_the_count_of_broken_samples_in_a_row_restarts_at_a_good_one(monkeypatch):
    from torchvision.io import encode_jpeg

    monkeypatch.setattr(data, "DRY_LIMIT", 3)
    monkeypatch.setattr(data, "_streak", 0)
    jpeg = encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8)).numpy().tobytes()

    def samples(pattern: str) -> list[dict]:  # g: a good sample, b: one whose frames are not JPEGs
        frames = {"g": jpeg, "b": b"not a jpeg"}
        return [
            {"__key__": f"{i:03d}", "txt": b"a caption", **{f"{k}.jpg": frames[c] for k in range(4)}}
            for i, c in enumerate(pattern)
        ]

    kept = list(data.decoded(iter(samples("bgbbgbb")), 4, data.TrainTransform(8)))
    assert [s["key"] for s in kept] == ["001", "004"]
    with pytest.raises(data.DataError, match="3 samples or shard members in a row"):
        list(data.decoded(iter(samples("gbbbg")), 4, data.TrainTransform(8)))


def test_clip_normalisation_adds_no_tensor_inputs_to_a_compiled_graph():
    """Inside torch.compile CLIP's mean and std are constants of the graph: as tensors from the host they were extra
    graph inputs (on the CPU, whatever the device: CUDA graphs refuse those) copied in on every call."""
    import torch._dynamo

    from train.model import normalize_frames

    frames = torch.randint(0, 256, (2, 4, 3, 8, 8), dtype=torch.uint8)
    explained = torch._dynamo.explain(normalize_frames)(frames)
    (graph,) = explained.graphs
    assert [n.op for n in graph.graph.nodes].count("placeholder") == 1  # the frames alone
    assert torch.equal(torch.compile(normalize_frames, fullgraph=True)(frames), normalize_frames(frames))


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H200", 989),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L40", 181),  # was L4's 121: the names were matched as substrings
        ("NVIDIA L4", 121),
        ("NVIDIA A10", 125),
        ("NVIDIA GeForce RTX 4090", 0),
        ("NVIDIA RTX A1000", 0),  # not an A100, nor an A10
        ("NVIDIA A10G", 0),  # no datasheet figure: --peak_tflops gives it
    ],
)
def test_the_datasheet_peak_is_the_named_cards(name, tflops):
    assert datasheet_tflops(name) == tflops


def test_a_sample_without_a_member_is_skipped_with_the_member_named(caplog, monkeypatch):
    """A sample with no caption was logged as "skipping sample v0010: 'txt'"."""
    monkeypatch.setattr(data, "_logged", 0)  # the first few are logged: not after other tests' skipped samples
    monkeypatch.setattr(data, "_streak", 0)
    sample = {"__key__": "v0010", **{f"{k}.jpg": b"not a jpeg" for k in range(4)}}
    with caplog.at_level("WARNING"):
        assert data.decode_sample(sample, 4, data.TrainTransform(32)) is None
        assert data.decode_sample({**sample, "txt": b"a caption"}, 4, data.TrainTransform(32)) is None
    assert "skipping sample v0010: it has no 'txt' member" in caplog.text
    assert re.search(r"skipping sample v0010: \w+Error: ", caplog.text)  # a bad JPEG: what failed, and how


def test_a_broken_sample_is_logged_the_first_few_times_in_a_worker_not_on_every_pass(caplog, monkeypatch):
    """collate resets the count of skipped samples at each batch; the log's limit counted from there, so a broken
    sample was logged again on every pass over the labeled set (40 times in 1,000 steps)."""
    for counter in ("_logged", "_streak", "_dropped"):
        monkeypatch.setattr(data, counter, 0)
    collate = data.make_collate(lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))
    good = {"video": torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "text": "a caption", "key": "g", "index": 0}
    broken = {"__key__": "v0010", **{f"{k}.jpg": b"not a jpeg" for k in range(4)}, "txt": b"a caption"}
    with caplog.at_level("WARNING"):
        for _ in range(10):  # ten passes, a batch each
            assert data.decode_sample(broken, 4, data.TrainTransform(32)) is None
            assert collate([good]).dropped == 1
    assert caplog.text.count("skipping sample v0010") == data.LOG_LIMIT == 3
    assert "further ones are counted, not logged" in caplog.text


def test_val_max_indexes_only_the_shards_that_hold_the_videos_it_keeps(train_shards, monkeypatch):
    """--val_max cut the index of every shard of --val: 2,500 shards took 341 s and 4.3 GB on every rank."""
    read = []
    real = data._tar_samples
    monkeypatch.setattr(data, "_tar_samples", lambda url: (read.append(Path(url).name), real(url))[1])
    shards = data.list_shards(train_shards["unlabeled"])
    first = sum(1 for _ in real(shards[0]))
    assert len(shards) >= 2 and first >= 2
    tok = tokenizer_for(str(TINY_CLIP))
    stream = data.validation_stream(train_shards["unlabeled"], 4, data.TrainTransform(32), tok, 2, limit=first - 1)
    assert read == [Path(shards[0]).name]
    keys = [k for b in data.loader(stream, 0, False, 0) for k in b.keys]
    assert len(keys) == first - 1
    read.clear()
    assert len(data.IndexedShards(shards, limit=first + 1)) == first + 1 and read == [Path(s).name for s in shards[:2]]
    assert len(data.IndexedShards(shards)) == sum(1 for s in shards for _ in real(s))  # 0: all
