"""train.streams: the order of waits and records that keeps the teacher's stream safe (the GPU's numerics part runs
it for real; this VM has no CUDA, so a recording stand-in for torch.cuda takes its place)."""

from __future__ import annotations

import contextlib

import torch

from train import streams


class Recorder:
    """Streams and tensors that write what is done with them into one list."""

    def __init__(self):
        self.events: list[tuple] = []

    def stream(self, name: str):
        recorder = self

        class Stream:
            device = torch.device("cuda", 0)

            def wait_stream(self, other):
                recorder.events.append(("wait", name, other.name))

            def wait_event(self, event):
                recorder.events.append(("wait", name, event.name))

        stream = Stream()
        stream.name = name
        return stream

    def tensor(self, name: str, is_cuda: bool = True):
        recorder = self

        class Tensor:
            def record_stream(self, stream):
                recorder.events.append(("record", name, stream.name))

        tensor = Tensor()
        tensor.is_cuda = is_cuda
        return tensor


def stand_in(monkeypatch) -> tuple[Recorder, object, object]:
    recorder = Recorder()
    current, side = recorder.stream("current"), recorder.stream("side")

    @contextlib.contextmanager
    def use(stream):
        recorder.events.append(("enter", stream.name))
        yield
        recorder.events.append(("leave", stream.name))

    class Event:
        name = "event"

        def record(self, stream):
            recorder.events.append(("mark", stream.name))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    return recorder, current, side


def test_the_side_stream_waits_for_the_inputs_and_the_current_stream_for_the_outputs(monkeypatch):
    recorder, _, side = stand_in(monkeypatch)
    frames, tokens, video, text = (recorder.tensor(n) for n in ("frames", "tokens", "video", "text"))
    with streams.on_side(side, frames, tokens):
        recorder.events.append(("teacher",))
    recorder.events.append(("student",))  # queued on the current stream while the teacher's kernels run
    streams.join(side, video, text)
    assert recorder.events == [
        ("wait", "side", "current"),  # after the batch's copy and join, queued before on the current stream
        ("record", "frames", "side"),  # not handed out again while the side stream may read them
        ("record", "tokens", "side"),
        ("enter", "side"),
        ("teacher",),
        ("leave", "side"),
        ("student",),
        ("wait", "current", "side"),  # before the loss reads the teacher's outputs
        ("record", "video", "current"),
        ("record", "text", "current"),
    ]


def test_without_a_side_stream_nothing_changes_streams(monkeypatch):
    recorder, _, _ = stand_in(monkeypatch)
    frames = recorder.tensor("frames")
    with streams.on_side(None, frames):
        recorder.events.append(("teacher",))
    streams.join(None, frames)
    assert recorder.events == [("teacher",)]


def test_ahead_the_side_stream_waits_only_for_what_was_queued_before_the_mark(monkeypatch):
    """--teacher_stream ahead: the next step's teacher is queued after this step's backward, but waits only for the
    event marked before the step (its batch ready), not for the backward; a batch still on the host is copied on the
    side stream itself, so it is not recorded."""
    recorder, _, side = stand_in(monkeypatch)
    batch_ready = streams.mark(side)
    recorder.events.append(("backward",))  # queued on the current stream after the mark
    frames, tokens = recorder.tensor("frames"), recorder.tensor("tokens", is_cuda=False)
    with streams.on_side(side, frames, tokens, after=batch_ready):
        recorder.events.append(("teacher",))
    assert recorder.events == [
        ("mark", "current"),
        ("backward",),
        ("wait", "side", "event"),  # not ("wait", "side", "current"): that would wait for the backward
        ("record", "frames", "side"),
        ("enter", "side"),
        ("teacher",),
        ("leave", "side"),
    ]
    assert streams.mark(None) is None


def test_the_trainers_step_waits_where_each_mode_must(monkeypatch, tmp_path):
    """train_step's waits with a stand-in side stream (the CPU has none): beside, the teacher waits for the batch
    queued before it and the loss for the teacher; ahead, the next step's teacher, queued after the backward, waits
    only for the event marked before the step."""
    from test_step_numerics import batches, tiny_fp32

    from train import loop

    recorder, _, side = stand_in(monkeypatch)
    monkeypatch.setattr(loop, "_side", lambda cfg, device: side if cfg.teacher_stream != "off" else None)
    lab, unl = batches(3)
    expected = {
        "beside": [
            *[("wait", "side", "current"), ("enter", "side"), ("leave", "side"), ("wait", "current", "side")],
            ("backward",),
        ],
        "ahead": [
            ("mark", "current"),  # before the step: the next batch's wait is queued, the step's kernels are not
            *[("wait", "side", "current"), ("enter", "side"), ("leave", "side"), ("wait", "current", "side")],
            ("backward",),
            ("wait", "side", "event"),  # the next step's teacher: not after the backward
            ("enter", "side"),
            ("leave", "side"),
        ],
    }
    for mode, events in expected.items():
        cfg, models = tiny_fp32(tmp_path / mode, teacher_stream=mode)
        weight = next(p for p in models.student.parameters() if p.requires_grad)
        weight.register_hook(lambda grad: recorder.events.append(("backward",)))  # fires once, in the backward
        optimizer, scheduler = loop.build_optimizer(models.student, cfg, torch.device("cpu"))
        ahead = loop.Ahead(batch=unl) if mode == "ahead" else None
        recorder.events.clear()
        loop.train_step(models, optimizer, scheduler, lab, unl, cfg, torch.device("cpu"), loop.Progress(), ahead)
        assert [e for e in recorder.events if e[0] != "record"] == events, mode
