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

        stream = Stream()
        stream.name = name
        return stream

    def tensor(self, name: str):
        recorder = self

        class Tensor:
            def record_stream(self, stream):
                recorder.events.append(("record", name, stream.name))

        return Tensor()


def stand_in(monkeypatch) -> tuple[Recorder, object, object]:
    recorder = Recorder()
    current, side = recorder.stream("current"), recorder.stream("side")

    @contextlib.contextmanager
    def use(stream):
        recorder.events.append(("enter", stream.name))
        yield
        recorder.events.append(("leave", stream.name))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", use)
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
