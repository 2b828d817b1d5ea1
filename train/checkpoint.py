"""Checkpoints: atomic save, ``weights_only`` load, resume.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)`` (no code runs on load):
``step``, ``student`` (state dict), ``optimizer``, ``scheduler``, ``config``,
``best_val_loss``, ``skipped_steps``, ``labeled_seen`` (where the labeled stream
goes on), ``passes_guarded`` (the order of its passes: train.passes). No random
state: a resumed run seeds each rank from ``--seed``, its rank and the step
(``train.loop.seed_process``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import torch

from pipeline.folder_lock import GRACE_S, lock_folder
from pipeline.writer import atomic_file
from train.data import validation_identity
from train.distributed import launch_note
from train.model import expected_shapes, fit_problem, register_model

LATEST, BEST, FUSED = "latest.pt", "best.pt", "fitclip.pt"
# what restoring a run needs (train.loop.restore); best.pt and fitclip.pt lack the optimizer's state and the rest
RESUMABLE_KEYS = ("step", "student", "optimizer", "scheduler", "best_val_loss", "skipped_steps")


class CheckpointError(ValueError):
    """A --resume file that cannot continue a run (not a training checkpoint, or another model's)."""


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary name in the same folder, then rename: a crash never leaves a torn file. A Ctrl-C
    during the save takes effect once the file is in place (``interrupt_after``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with interrupt_after(), atomic_file(path) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer reports a failed write ("unexpected pos"); the OSError says why
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
    return path


@contextlib.contextmanager
def interrupt_after():
    """Hold a Ctrl-C (SIGINT) that comes inside the block until its end, then raise it. torch.save stopped part-way
    raises an error of its own in place of the KeyboardInterrupt (its zip writer's "unexpected pos"), a traceback
    for a Ctrl-C, and the checkpoint being written is lost. In the main thread only (where Python handles
    signals); a block that raises keeps its own error."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
    if caught:
        raise KeyboardInterrupt


def best_val_loss(out: str | Path) -> float | None:
    """The validation loss that OUT/best.pt was saved with (inf if none): a crash between saving best.pt and
    latest.pt leaves latest.pt with an older, higher best; the resumed run must not replace best.pt with worse.
    None if best.pt cannot be read (damaged: the run replaces it)."""
    path = Path(out) / BEST
    try:
        return float(load(path, mmap=True)["val"]["loss"])
    except (FileNotFoundError, KeyError, TypeError):  # no best.pt, or one saved without validation
        return float("inf")
    except Exception:  # torch.load's errors for a damaged file: RuntimeError, UnpicklingError, EOFError, ...
        return None


def load(path: str | Path, mmap: bool = False) -> dict:
    """A checkpoint written by :func:`atomic_save` (weights_only: tensors and plain values); ``mmap`` maps the
    tensors instead of reading them (a cheap look at a file)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=mmap)


def resume_path(
    out: str | Path, resume: str, model: str = "", steps=None, validates: bool = False, selection: tuple | None = None
) -> Path | None:
    """The checkpoint to resume from: ``auto`` -> OUT/latest.pt if it exists; a path; or None (fresh run).

    ``model``: this run's --model, to refuse another model's checkpoint here rather than after the models are
    built; "" skips that check. ``steps`` and ``validates`` (the run's --steps, and whether it validates and
    fuses): to refuse a checkpoint with nothing left to train into an OUT without best.pt (see
    :func:`_unfusable_problem`); None skips that check. ``selection``: the run's (--val, --val_batch), to refuse
    choosing the best by another measure than OUT/best.pt was chosen by (:func:`selection_problem`); None skips it.

    Raises:
        FileExistsError: a fresh run into a folder that already holds a run.
        FileNotFoundError: an explicit path that does not exist.
        CheckpointError: a file that cannot continue a run (see :func:`_resumable_state`), or that leaves it
            nothing to train and nothing to fuse.
    """
    out = Path(out)
    path = None
    if resume == "auto":
        path = out / LATEST if (out / LATEST).is_file() else None
    elif resume:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        path = Path(resume)
    elif (out / LATEST).exists():
        raise FileExistsError(
            f"{out} already holds a run ({LATEST}); pass --resume auto to continue it, or choose another --out"
        )
    if path is None:
        return None
    problem = _unfusable_problem(path, _resumable_state(path, model)["step"], out, steps, validates)
    if not problem and selection is not None:
        problem = selection_problem(out, *selection)
    if problem:
        raise CheckpointError(problem)
    return path


def selection_problem(out: Path, val: str, val_batch) -> str:
    """The refusal of a resumed run whose best would be chosen by another measure than OUT/best.pt was ("" if
    none). A best.pt chosen by its validation loss on one --val with one --val_batch only gives way to a lower loss
    on the same: a run without --val keeps its last step as best.pt (the validated one was lost, and fused in its
    place), and a loss on another set or batch is not comparable with the best one."""
    try:
        best = load(out / BEST, mmap=True)
    except Exception:  # none, or one that cannot be read: nothing to keep (the run replaces a damaged one)
        return ""
    config = best.get("config") if isinstance(best, dict) and best.get("val") else None
    then = (config.get("val"), config.get("val_batch")) if isinstance(config, dict) else (None, None)
    if not then[0]:  # chosen without validation: the last step, which any run may replace
        return ""
    if val and val_batch == then[1] and _same_validation(val, then[0], best.get("val_identity")):
        return ""
    now = f"--val {val} --val_batch {val_batch}" if val else "no --val (the last step would be kept as best)"
    if val and Path(val).resolve() == Path(then[0]).resolve() and val_batch == then[1]:
        now += " (the same folder, but its shards have changed since)"
    typed = "" if Path(then[0]).is_absolute() else " (as typed then: relative to the folder that run was started in)"
    return (
        f"{out / BEST} was chosen by its validation loss on --val {then[0]} with --val_batch {then[1]}, and this "
        f"run gives {now}: it would replace that best.pt by another measure. Resume with --val {then[0]} "
        f"--val_batch {then[1]}{typed}, or move {BEST} out of {out} to choose anew"
    )


def _same_validation(val: str, then: str, identity: str | None) -> bool:
    """Whether --val ``val`` is the set best.pt was chosen on: ``then``, its --val as typed in the folder that run
    started in, and ``identity``, its content's digest (recorded since 2026-11-28; None before). By content first:
    a path typed relative to another folder, a tree moved, a shared folder mounted elsewhere on another node."""
    if identity is not None:
        try:
            return validation_identity(val) == identity
        except (ValueError, OSError):  # a folder that cannot be listed: refused by the checks of --val, named there
            return False
    return Path(val).resolve() == Path(then).resolve()


def _unfusable_problem(path: Path, step: int, out: Path, steps, validates: bool) -> str:
    """The refusal of a run resumed at or past its --steps, with validation, into an OUT without best.pt ("" if
    none): it trains nothing, so nothing in OUT is validated and there is no best.pt to fuse (it failed at its end
    saying best.pt was not found). Without validation the end keeps the resumed student as best.pt."""
    if not validates or type(steps) is not int or step < steps:
        return ""
    if (out / BEST).is_file() and best_val_loss(out) is not None:  # None: damaged, as good as none
        return ""
    return (
        f"--resume {path} is at step {step} and --steps is {steps}: nothing to train into {out}, which holds no "
        f"readable {BEST} to fuse; give more --steps to train on, or fuse {Path(path).parent / BEST} with python -m "
        "train.fuse"
    )


def _resumable_state(path: Path, model: str = "") -> dict:
    """The checkpoint at ``path``, memory-mapped, if it holds everything a run resumes from, with a student that
    fits ``model`` ("": any); else a :class:`CheckpointError` that names the fix.

    Checked before anything is built or written (memory-mapped: the tensors are not read), so a wrong file costs
    neither the minutes of building the models nor a half-made OUT folder.
    """
    try:
        state = load(path, mmap=True)
    except Exception as e:  # not a torch zip file, truncated, or holding objects weights_only refuses
        raise CheckpointError(
            f"--resume {path}: not a checkpoint torch can load ({type(e).__name__}); pass the latest.pt of a "
            "train.main run"
        ) from None
    missing = [k for k in RESUMABLE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(
            f"--resume {path}: not a training checkpoint (no {', '.join(missing)}). --resume continues a run from "
            f"its {LATEST}; {BEST} and {FUSED} hold weights only (evaluate them with eval.run --weights)"
        )
    problem = fit_problem(state["student"], expected_shapes(register_model(model))) if model else ""
    if problem:
        raise another_model(path, state, problem)
    return state


def another_model(path: Path, state: dict, problem: str) -> CheckpointError:
    """The refusal of a checkpoint whose student (or optimizer) does not fit this run's model: names the --model
    it was trained with."""
    trained = state.get("config", {}).get("model", "?")
    return CheckpointError(
        f"--resume {path} holds a student of another architecture or optimizer layout than this run's "
        f"(it was trained with --model {trained}): resume with the --model and recipe it was trained with "
        f"({problem})"
    )


def lock_run(out: Path, grace: float = GRACE_S):
    """An exclusive lock on OUT/.lock, so two runs never write one folder; released when the process ends (its
    DataLoader workers do not keep it), and waited for ``grace`` seconds (a run killed a moment ago may still hold
    it: ``pipeline.folder_lock``)."""
    handle = lock_folder(out, grace=grace)
    if handle is None:
        message = f"another train.main run is writing {out}; wait for it to end or use another --out"
        note = launch_note()  # the other run may be this one's sibling task, meant as one run with it
        raise FileExistsError(message + (f". Note: {note}" if note else ""))
    return handle
