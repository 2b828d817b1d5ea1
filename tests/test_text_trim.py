"""Captions cut after the longest one of their batch (--trim_text): the same embeddings, gradients and losses as at
CLIP's full context length, for the models that allow it, and counted FLOPs that follow the width."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, assert_close_at_scale, tiny_variant

from eval.features import text_embeddings
from train import distributed, loop
from train.attention import use_packed_attention
from train.config import resolve
from train.model import (
    TrimmedTokenizer,
    create_clip,
    encode_text,
    fit_width,
    text_tokenizer,
    tokenizer_for,
    trim_padding,
    trims_text,
)

WORDS = "a red square turning slowly in the middle of blue field man rides bicycle down hill at night".split()


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(0, 12))) for _ in range(n)]


def test_trim_padding_keeps_every_used_column_rounded_up_to_eight():
    tokens = torch.zeros(3, 77, dtype=torch.long)
    tokens[0, :5] = torch.tensor([49406, 7, 8, 9, 49407])
    tokens[1, :11] = 5
    for multiple, width in ((8, 16), (1, 11), (4, 12), (64, 64), (128, 77)):
        cut = trim_padding(tokens, multiple)
        assert cut.shape == (3, width) and cut.is_contiguous()
        assert torch.equal(cut, tokens[:, :width])
    assert trim_padding(torch.zeros(2, 77, dtype=torch.long)).shape == (2, 8)
    full = torch.ones(2, 77, dtype=torch.long)
    assert trim_padding(full).shape == (2, 77)  # a caption at the full context length keeps every column


def test_fit_width_cuts_or_pads_with_zeros():
    tokens = torch.arange(1, 9).view(2, 4)
    assert torch.equal(fit_width(tokens, 6), torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 0, 0]]))
    assert torch.equal(fit_width(tokens, 2), tokens[:, :2])
    assert torch.equal(fit_width(tokens, 4), tokens)


def test_cut_captions_embed_as_at_full_length():
    """The tiny model, plain and with packed attention (the trainer's lever): open_clip's own encode_text at the
    full context length against ours on captions cut to their batch's width; empty captions and one cut by the
    tokenizer at the context length included."""
    torch.manual_seed(0)
    clip = create_clip(str(TINY_CLIP)).eval()
    tokenizer = tokenizer_for(str(TINY_CLIP))
    texts = [*captions(12), "", " ".join(["field"] * 40)]
    full = tokenizer(texts)
    for packed in (False, True):
        if packed:
            assert use_packed_attention(clip) > 0
        with torch.no_grad():
            expected = F.normalize(clip.encode_text(full), dim=-1)
            for batch in (slice(0, 4), slice(4, 12), slice(12, 13), slice(0, 14)):
                cut = trim_padding(full[batch])
                assert cut.shape[1] < full.shape[1] or batch == slice(0, 14)
                assert_close_at_scale(encode_text(clip, cut), expected[batch], rel=1e-6)


def test_cut_captions_give_the_same_gradients():
    torch.manual_seed(0)
    clip = create_clip(str(TINY_CLIP)).train()
    full = tokenizer_for(str(TINY_CLIP))(captions(6, seed=1))
    cut = trim_padding(full)
    assert cut.shape[1] < full.shape[1]
    grads = []
    for tokens in (full, cut):
        clip.zero_grad()
        target = torch.linspace(-1, 1, 32)
        (encode_text(clip, tokens) * target).sum().backward()
        grads.append({n: p.grad.clone() for n, p in clip.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "positional_embedding" in grads[0]
    for name in grads[0]:
        assert_close_at_scale(grads[1][name], grads[0][name], msg=name)


def test_only_causal_towers_read_at_the_end_of_text_are_cut(tmp_path):
    tokenizer = tokenizer_for(str(TINY_CLIP))
    assert trims_text(create_clip(str(TINY_CLIP)))
    assert isinstance(text_tokenizer(create_clip(str(TINY_CLIP)), tokenizer), TrimmedTokenizer)
    assert text_tokenizer(create_clip(str(TINY_CLIP)), tokenizer, trim=False) is tokenizer
    for name, change in (("bidirectional", {"no_causal_mask": True}), ("last", {"pool_type": "last"})):
        clip = create_clip(tiny_variant(tmp_path, name, **change)).eval()
        assert not trims_text(clip)
        assert text_tokenizer(clip, tokenizer) is tokenizer
        # why: the padding changes these models' embeddings, so cutting it would change them
        full = tokenizer(["a red square", "a man rides a bicycle down a hill at night"])
        with torch.no_grad():
            ours, cut = encode_text(clip, full), F.normalize(clip.encode_text(full), dim=-1)
        torch.testing.assert_close(ours, cut)  # open_clip's own path at the full width


def test_the_trimmed_tokenizer_pickles_for_loader_workers():
    tokenizer = TrimmedTokenizer(tokenizer_for(str(TINY_CLIP)))
    again = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(again(["a red square"]), tokenizer(["a red square"]))
    assert tokenizer(["a red square"]).shape == (1, 8)


def test_eval_text_embeddings_sort_cut_and_restore_the_order():
    torch.manual_seed(0)
    clip = create_clip(str(TINY_CLIP)).eval()
    tokenizer = tokenizer_for(str(TINY_CLIP))
    texts = captions(23, seed=2)
    with torch.no_grad():
        expected = F.normalize(clip.encode_text(tokenizer(texts)), dim=-1)
    calls = []

    def counting(batch):
        calls.append(batch)
        return tokenizer(batch)

    got = text_embeddings(clip, counting, texts, 5, torch.device("cpu"))
    assert_close_at_scale(got, expected, rel=1e-6)
    assert calls == [texts]  # tokenized once; the batches are cut from it
    assert text_embeddings(clip, tokenizer, [], 5, torch.device("cpu")).shape == (0, 0)


def test_a_step_of_batches_cut_to_two_widths_has_the_full_width_loss(train_shards, tmp_path):
    """The labeled and the unlabeled batch cut to different widths are joined at the wider one: the loss of a
    step is the full-width step's."""
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    full = tokenizer_for(str(TINY_CLIP))
    texts = (["a red square", "a blue circle"], ["a man rides a bicycle down a hill at night in the middle"] * 2)
    losses = []
    for tokenizer in (full, TrimmedTokenizer(full)):
        batches = [loop.data.Batch(frames, tokenizer(t), t, ["a", "b"], torch.tensor([0, 1]), 0) for t in texts]
        cfg = resolve(
            "demo", model=str(TINY_CLIP), teacher_weights="", labeled=str(train_shards["labeled"]), out=str(tmp_path)
        )
        torch.manual_seed(0)
        models = loop.build_models(cfg, distributed.init_distributed("cpu"))
        loss, parts = loop.compute_loss(models, *batches, cfg, torch.device("cpu"))
        losses.append([float(loss.detach()), float(parts["contrastive"]), float(parts["distillation"])])
    assert [b.shape[1] for b in (TrimmedTokenizer(full)(t) for t in texts)] == [8, 16]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_counted_flops_follow_the_captions_width(train_shards, tmp_path):
    from train.monitor import forward_flops, step_flops

    cfg = resolve("demo", model=str(TINY_CLIP), teacher_weights="", out=str(tmp_path), batch_labeled=3)
    models = loop.build_models(cfg, distributed.init_distributed("cpu"))
    tokenizer = tokenizer_for(str(TINY_CLIP))
    flops = loop._flops_per_step(models, cfg, 32, tokenizer, torch.device("cpu"))
    frames = torch.zeros(1, cfg.frames, 3, 32, 32)
    for width in (8, 16, 32):
        per_video = forward_flops(models.student, frames, tokenizer(["a video"])[:, :width])
        assert flops(width) == step_flops(per_video, per_video, 3, cfg.batch_unlabeled)
    assert flops(8) < flops(16) < flops(32)
    # the trainer passes its loader's tokenizer, which cuts "a video" to 8 columns: padded back to each width
    cut = loop._flops_per_step(models, cfg, 32, TrimmedTokenizer(tokenizer), torch.device("cpu"))
    assert [cut(w) for w in (8, 16, 32)] == [flops(w) for w in (8, 16, 32)]


@pytest.mark.parametrize("value", ["yes", 1.5])
def test_trim_text_is_a_switch(value):
    with pytest.raises(ValueError, match="--trim_text"):
        resolve("demo", trim_text=value)


@pytest.mark.parametrize("trim", [True, False])
def test_a_run_cuts_its_captions_and_counts_the_flops_of_each_steps_width(train_shards, tmp_path, monkeypatch, trim):
    """The trainer's batches come cut (--trim_text, the default) and its MFU adds up each step's FLOPs at that
    step's width (here a made-up count of 1000 FLOPs per column, a 1 s window and a 1000 FLOP/s peak: the MFU is
    the sum of the widths)."""
    widths, logged = [], []
    monkeypatch.setattr(loop, "_flops_per_step", lambda *a: lambda width: widths.append(width) or 1000 * width)
    monkeypatch.setattr(loop.Timer, "elapsed", lambda self: 1.0)
    monkeypatch.setattr(loop.Monitor, "log", lambda self, metrics, step: logged.append(metrics))
    run = dict(model=str(TINY_CLIP), teacher_weights="", labeled=str(train_shards["labeled"]), val="")
    run.update(unlabeled=str(train_shards["unlabeled"]), out=str(tmp_path / "run"), steps=4, log_every=2)
    run.update(batch_labeled=4, batch_unlabeled=4, wandb="off", progress=False, workers=0, peak_tflops=1e-9)
    loop.run(resolve("demo", trim_text=trim, **run))
    assert len(widths) == 4 and all(w % 8 == 0 for w in widths)
    assert all(w < 32 for w in widths) if trim else widths == [32] * 4  # the tiny model's context: 32 tokens
    mfu = [m["train/mfu"] for m in logged if "train/mfu" in m]
    assert mfu == [pytest.approx(widths[0] + widths[1]), pytest.approx(widths[2] + widths[3])]
