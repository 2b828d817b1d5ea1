"""A second CUDA stream for work that can run beside the step's own (``--teacher_stream``).

The teacher's forward does not depend on the student's. On its own stream its kernels may run while the student's
run on the step's stream: the same step's teacher beside the student's forward (``--teacher_stream beside``), or the
next step's teacher beside this step's backward (``ahead``). The GPU then overlaps what the two leave free (the
teacher's compute-bound matrix products beside the student's memory-bound LayerNorm and QuickGELU kernels). Whether
it gains is the GPU's to say: ``benchmarks.step_variants``' options ``+tstream`` and ``+tahead`` time it.

Two rules keep the streams apart safely (CUDA semantics in torch's docs):
- the second stream waits for what the step's stream queued before (the batch's copy, the join of the batches),
  or only for an event marked earlier (``--teacher_stream ahead``: the next batch, not the backward queued since);
  the step's stream waits for the second before it reads the outputs;
- a tensor made on one stream and read on the other is recorded on the reader (``Tensor.record_stream``), so that
  the caching allocator does not hand its memory out again while the other stream may still read it.
"""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The second stream of ``device``: made once, reused by every step (a new stream per step would leak the
    caching allocator's blocks cached for it)."""
    return torch.cuda.Stream(device)


def mark(side: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """An event on the current stream, now: for an ``on_side`` queued later that needs only what was queued by now
    (the next batch, not the backward queued since). ``side`` None: None."""
    if side is None:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(side.device))
    return event


@contextlib.contextmanager
def on_side(side: torch.cuda.Stream | None, *inputs: torch.Tensor, after: torch.cuda.Event | None = None):
    """Queue the block's kernels on ``side`` after everything the current stream has queued so far, or only after
    the event ``after`` (``mark``); ``inputs`` on the GPU, made on another stream, are kept from reuse until ``side``
    has read them. ``side`` None: the current stream, as without the block."""
    if side is None:
        yield
        return
    if after is None:
        side.wait_stream(torch.cuda.current_stream(side.device))
    else:
        side.wait_event(after)
    for tensor in inputs:
        if tensor.is_cuda:  # a host tensor is copied inside the block, on the side stream
            tensor.record_stream(side)
    with torch.cuda.stream(side):
        yield


def join(side: torch.cuda.Stream | None, *outputs: torch.Tensor) -> None:
    """Make the current stream wait for ``side`` before it reads ``outputs`` (made on ``side``), and keep their
    memory from reuse on ``side`` until the current stream is done with them. ``side`` None: nothing to do."""
    if side is None:
        return
    current = torch.cuda.current_stream(side.device)
    current.wait_stream(side)
    for tensor in outputs:
        if tensor.is_cuda:
            tensor.record_stream(current)
