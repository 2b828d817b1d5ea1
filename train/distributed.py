"""torch.distributed helpers for the trainer: process-group setup, gathering embeddings, small collectives.

Every function also works in a single process without a process group (``python -m train.main``, tests): the
collectives then become identities or no-ops, so callers never branch on "am I distributed".

Gradient contract of :func:`gather_with_grad` (the part that is easy to get wrong). Every rank gathers the global
batch and computes the same global loss ``L`` on it. The backward of the gather hands rank ``r`` the SUM over ranks of
the gradient with respect to its own slice, i.e. ``world_size * dL/dx_r`` (every rank holds an identical copy of
``dL/dx_r``). DistributedDataParallel then AVERAGES parameter gradients over ranks, which divides by ``world_size``
again: ``(1/W) sum_r W dL/dx_r dx_r/dtheta = dL/dtheta``, exactly the single-process gradient of the global loss.
``tests/test_distributed.py`` checks this equality numerically; a gather whose backward averaged (or kept only the
local copy) would silently shrink the learning rate by ``1/world_size``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from train.config import DEVICES

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup",
    "device_choice",
    "gather_no_grad",
    "gather_with_grad",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main",
    "launch_note",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int  # global rank, 0 .. world_size - 1
    world_size: int  # number of processes in the job (1 without torchrun)
    local_rank: int  # rank on this machine; picks the CUDA device
    device: torch.device  # the device this process computes on


def device_choice(device: str) -> str:
    """What ``--device`` picks: ``"auto"`` is CUDA when torch sees a GPU, else the CPU; the others as they are."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment, pick the device, and start the process group when there is more than one rank.

    ``device``: ``"auto"`` (CUDA when available, else CPU), ``"cuda"`` or ``"cpu"``. Backend: NCCL on CUDA, gloo on
    CPU. Without torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) this is a single process and no process group is
    created. Call :func:`cleanup` at the end.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")

    device = device_choice(device)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device 'cuda' was requested but CUDA is not available (torch.cuda.is_available() is False; "
                f"torch {torch.__version__}, built for CUDA {torch.version.cuda}). Use --device cpu or --device auto, "
                "or install a CUDA build of torch on a machine with a GPU."
            )
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "start at most that many processes per node (torchrun --nproc-per-node)."
            )
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")

    if world_size > 1 and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set; start multi-process runs with torchrun."
            )
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


# Launchers that start every process of a job themselves, and the variable that gives the job's size. Started by one
# of them without torchrun, a process sees no RANK or WORLD_SIZE and trains alone, on the whole data: meant, for a
# sweep (srun -n 4 ... --out runs/$SLURM_PROCID), and a mistake where they were meant as one run, which the lock of
# their shared --out then refused for all but one, in words that named neither the launcher nor the fix
LAUNCHERS = {
    "SLURM_STEP_NUM_TASKS": "srun",  # set by srun for its step only: not the batch script's SLURM_NTASKS
    "OMPI_COMM_WORLD_SIZE": "mpirun (Open MPI)",
    "PMI_SIZE": "mpirun/mpiexec (MPICH, Intel MPI)",
}


def launch_note(env: dict[str, str] | None = None) -> str:
    """A line if this process is one of several that srun or mpirun started without torchrun (see :data:`LAUNCHERS`),
    "" under torchrun (RANK or WORLD_SIZE set), alone, or as the one task of a step. train.main prints it as a
    warning, and adds it to the refusal of an --out another task holds."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return ""
    for name, launcher in LAUNCHERS.items():
        size = env.get(name, "")
        if size.isdigit() and int(size) > 1:
            return (
                f"this process is one of {size} tasks that {launcher} started without torchrun ({name}={size}), so "
                "it trains alone, as a run of its own. If they were meant as one run, start one torchrun per node "
                'instead, e.g. srun --ntasks-per-node 1 torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 '
                '--rdzv_backend c10d --rdzv_endpoint "$(scontrol show hostnames | head -n 1)":$((20000 + '
                'SLURM_JOB_ID % 12000)) --rdzv_id "$SLURM_JOB_ID" -m train.main ... (the README\'s Training section '
                "has a batch script)"
            )
    return ""


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes checkpoints."""
    return get_rank() == 0


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` over ranks along dim 0, in rank order, keeping the autograd graph: ``(b, ...) -> (W*b, ...)``.

    Every rank must pass the same shape. The backward sends each rank the sum over ranks of the gradient of its own
    slice (see the module docstring for why this, followed by DDP's average, is the single-process gradient).
    Identity without a process group.
    """
    if not is_distributed():
        return x
    import torch.distributed.nn.functional as dist_fn  # only needed (and only importable) with torch.distributed

    # torch.distributed.nn's all_gather is differentiable; plain dist.all_gather returns leaves without a graph, so
    # the other ranks' rows would contribute nothing to this rank's gradient.
    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public differentiable gather
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(x)
    return torch.cat(parts, dim=0)  # (W*b, ...)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` over ranks along dim 0, in rank order, without gradient (teacher embeddings).

    Every rank must pass the same shape. Identity (detached) without a process group.
    """
    if not is_distributed():
        return x.detach()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)  # (W*b, ...)


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over ranks (for logging metrics; no gradient). Integer tensors are averaged in float64.

    Returns a new detached tensor; ``x`` itself is not modified. Identity without a process group.
    """
    y = x.detach().clone()
    if not y.is_floating_point():
        y = y.double()
    if is_distributed():
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        y /= dist.get_world_size()
    return y


@torch.no_grad()
def all_reduce_int(n: int, device: torch.device, op: str = "sum") -> int:
    """The sum (``op`` "sum": e.g. each rank's dropped samples) or the largest ("max": e.g. a signal one rank
    received) of an integer over ranks; ``n`` without a process group."""
    if not is_distributed():
        return n
    total = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(total, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return int(total.item())


def barrier() -> None:
    """Wait for all ranks; no-op without a process group."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (any picklable object) on every rank; ``obj`` itself without a process group."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (any picklable object), in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    boxes: list = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, obj)
    return boxes


def cleanup() -> None:
    """Destroy the process group if one is running; safe to call more than once."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
