"""train.distributed: 2 gloo ranks on CPU give the single-process loss and gradient of the global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from train import distributed
from train.loss import contrastive_loss, distillation_loss, fitclip_loss, kl_distillation_loss

WORLD = 2
GLOBAL_BATCH = 8
DIM = 16
SIGMA = 0.1
LAM = 0.3
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class TinyEncoder(nn.Module):
    """Stand-in for the two CLIP towers: a linear map per modality, then L2 normalisation."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.video = nn.Linear(DIM, DIM, dtype=torch.float64)
        self.text = nn.Linear(DIM, DIM, dtype=torch.float64)

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.video(frames), dim=-1), F.normalize(self.text(tokens), dim=-1)  # (b, D), (b, D)


def make_problem() -> tuple[TinyEncoder, TinyEncoder, torch.Tensor, torch.Tensor]:
    """Student, frozen teacher and the fixed global batch (identical in every process)."""
    student, teacher = TinyEncoder(seed=0), TinyEncoder(seed=1).requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    frames = torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64)  # (B, D)
    tokens = torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64)  # (B, D)
    return student, teacher, frames, tokens


def step_loss(student: nn.Module, teacher: nn.Module, frames: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The trainer's step on this rank's slice: gather, then every loss over the global matrix."""
    video, text = student(frames, tokens)  # (b, D) each
    with torch.no_grad():
        t_video, t_text = teacher(frames, tokens)
    video, text = distributed.gather_with_grad(video), distributed.gather_with_grad(text)  # (B, D)
    t_video, t_text = distributed.gather_no_grad(t_video), distributed.gather_no_grad(t_text)  # (B, D)
    distill = distillation_loss(video, text, t_video, t_text, SIGMA) + 0.01 * kl_distillation_loss(
        video, text, t_video, t_text, SIGMA
    )
    return fitclip_loss(contrastive_loss(video, text, SIGMA), distill, LAM)


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()}


def rank_main(rank: int, port: int, out_dir: str) -> None:
    """One spawned rank: everything it measures goes to out_dir/rank{rank}.pt."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    info = distributed.init_distributed("cpu")
    try:
        student, teacher, frames, tokens = make_problem()
        b = GLOBAL_BATCH // WORLD
        mine = slice(rank * b, (rank + 1) * b)
        result: dict = {"info": info, "backend": dist.get_backend()}

        # Raw gather semantics: rank order, and the gradient each rank gets back for its own rows.
        x = torch.full((b, 3), float(rank), dtype=torch.float64, requires_grad=True)
        gathered = distributed.gather_with_grad(x)
        weights = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape)
        (gathered * weights).sum().backward()
        result["gathered"] = gathered.detach()
        result["gathered_no_grad"] = distributed.gather_no_grad(x)
        result["x_grad"] = x.grad

        # (a) Manual: same global loss on each rank, gradients summed then divided by WORLD (what DDP computes).
        loss = step_loss(student, teacher, frames[mine], tokens[mine])
        loss.backward()
        result["loss"] = loss.detach()
        result["local_grads"] = grads(student)
        for p in student.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= WORLD
        result["averaged_grads"] = grads(student)

        # (b) The real thing: DistributedDataParallel averages the gradients itself during backward.
        student.zero_grad(set_to_none=True)
        ddp = nn.parallel.DistributedDataParallel(student)
        step_loss(ddp, teacher, frames[mine], tokens[mine]).backward()
        result["ddp_grads"] = grads(student)

        result["mean"] = distributed.all_reduce_mean(torch.tensor(float(rank + 1)))
        from train import loop  # the trainer's count of dropped samples: every rank's, not rank 0's

        progress = loop.Progress(dropped_samples=10, unsynced_dropped=rank + 2)
        loop.sync_dropped(progress, torch.device("cpu"))
        result["dropped"] = (progress.dropped_samples, progress.unsynced_dropped)
        result["object"] = distributed.broadcast_object({"from": rank})
        result["is_main"] = distributed.is_main()
        distributed.barrier()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(rank_main, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradient of the global batch in one process, no process group."""
    assert not dist.is_initialized()
    student, teacher, frames, tokens = make_problem()
    loss = step_loss(student, teacher, frames, tokens)
    loss.backward()
    return loss.detach(), grads(student)


def test_ranks_started_a_gloo_group(rank_results):
    for rank, result in enumerate(rank_results):
        assert result["backend"] == "gloo"
        assert result["info"] == distributed.DistInfo(rank, WORLD, rank, torch.device("cpu"))
        assert result["is_main"] == (rank == 0)
        assert result["mean"].item() == pytest.approx(1.5)
        assert result["dropped"] == (10 + 2 + 3, 0)
        assert result["object"] == {"from": 0}


def test_gather_is_rank_ordered_and_routes_gradients(rank_results):
    b = GLOBAL_BATCH // WORLD
    expected = torch.cat([torch.full((b, 3), float(r), dtype=torch.float64) for r in range(WORLD)])
    weights = torch.arange(expected.numel(), dtype=torch.float64).reshape(expected.shape)
    for rank, result in enumerate(rank_results):
        torch.testing.assert_close(result["gathered"], expected, rtol=0, atol=0)
        torch.testing.assert_close(result["gathered_no_grad"], expected, rtol=0, atol=0)
        # Every rank computed the same sum(gathered * weights); its rows' gradient is summed over the WORLD ranks,
        # so after DDP's 1/WORLD average it is exactly the single-process gradient weights[mine].
        torch.testing.assert_close(result["x_grad"], WORLD * weights[rank * b : (rank + 1) * b], rtol=0, atol=0)


def test_each_rank_computes_the_global_loss(rank_results, single_process):
    loss, _ = single_process
    for result in rank_results:
        torch.testing.assert_close(result["loss"], loss, rtol=0, atol=1e-12)


@pytest.mark.parametrize("key", ["averaged_grads", "ddp_grads"])
def test_averaged_gradient_equals_single_process_gradient(rank_results, single_process, key):
    _, expected = single_process
    for result in rank_results:
        assert result[key].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(result[key][name], grad, rtol=1e-9, atol=1e-9, msg=f"{key} {name}")


def test_local_gradients_alone_are_not_the_answer(rank_results, single_process):
    """Each rank's own gradient only sees its slice (times WORLD); the average over ranks is what is correct."""
    _, expected = single_process
    total = {name: sum(r["local_grads"][name] for r in rank_results) for name in expected}
    for name, grad in expected.items():
        torch.testing.assert_close(total[name], WORLD * grad, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(rank_results[0]["local_grads"]["video.weight"], expected["video.weight"])


# ----- without a process group


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_helpers_are_identities_without_a_process_group(no_torchrun_env):
    assert not dist.is_initialized()
    x = torch.randn(4, 3, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    y = distributed.gather_no_grad(x)
    assert torch.equal(y, x) and not y.requires_grad
    mean = distributed.all_reduce_mean(x)
    assert torch.equal(mean, x) and not mean.requires_grad
    assert distributed.all_reduce_mean(torch.tensor(3)).item() == 3.0
    assert distributed.all_reduce_int(7, torch.device("cpu")) == 7
    obj = {"a": [1]}
    assert distributed.broadcast_object(obj) is obj
    assert distributed.is_main() and distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert not distributed.is_distributed()
    distributed.barrier()
    distributed.cleanup()


def test_init_single_process_makes_no_group(no_torchrun_env):
    info = distributed.init_distributed("cpu")
    assert info == distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert not dist.is_initialized()


def test_init_auto_picks_cpu_without_cuda(no_torchrun_env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.init_distributed("auto").device == torch.device("cpu")


def test_init_cuda_without_cuda_says_what_to_do(no_torchrun_env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available.*--device cpu"):
        distributed.init_distributed("cuda")


def test_init_rejects_bad_arguments(no_torchrun_env, monkeypatch):
    with pytest.raises(ValueError, match="device must be one of"):
        distributed.init_distributed("tpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.init_distributed("cpu")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        distributed.init_distributed("cpu")


# ----- launched by srun or mpirun without torchrun


@pytest.mark.parametrize(
    ("env", "launcher"),
    [
        ({"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3", "SLURM_NTASKS": "8"}, "srun"),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, "mpirun (Open MPI)"),
        ({"PMI_SIZE": "2"}, "mpirun/mpiexec (MPICH, Intel MPI)"),
    ],
)
def test_a_task_of_several_started_without_torchrun_is_told_it_trains_alone(env, launcher):
    note = distributed.launch_note(env)
    size = next(v for k, v in env.items() if k in distributed.LAUNCHERS)
    assert note.startswith(f"this process is one of {size} tasks that {launcher} started without torchrun")
    assert "srun --ntasks-per-node 1 torchrun" in note


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"},  # srun's one task (or salloc's interactive step)
        {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"},  # the batch script of an 8-task job: one process, no step
        {"SLURM_STEP_NUM_TASKS": "2", "RANK": "1", "WORLD_SIZE": "16"},  # torchrun under srun, one per node
        {"OMPI_COMM_WORLD_SIZE": "many"},
    ],
)
def test_torchrun_alone_or_one_task_gets_no_note(env):
    assert distributed.launch_note(env) == ""


def test_srun_tasks_sharing_an_out_are_told_why_all_but_one_are_refused(monkeypatch, tmp_path, capsys):
    """Each task saw no RANK or WORLD_SIZE and trained alone; all but one were refused --out as another run's, in
    words that named neither srun nor the fix. Tasks with an --out each (a sweep) run, as before, with a warning."""
    from train import checkpoint

    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    held = checkpoint.lock_run(tmp_path)  # the task that took --out first
    try:
        with pytest.raises(FileExistsError) as e:
            checkpoint.lock_run(tmp_path, grace=0)
    finally:
        held.close()
    assert str(e.value).startswith(f"another train.main run is writing {tmp_path}; wait for it to end or use another")
    assert "Note: this process is one of 8 tasks that srun started without torchrun" in str(e.value)
