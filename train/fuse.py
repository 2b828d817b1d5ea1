"""Weight-space fusion of teacher and student (FitCLIP, Section 3.2; WiSE-FT).

    python -m train.fuse --student runs/x/best.pt --alpha 0.4 --out runs/x/fitclip.pt \\
        [--model ViT-B-16-quickgelu] [--teacher openai]

theta = (1 - alpha) * theta_teacher + alpha * theta_student, alpha the student's
weight. The output is a plain open_clip state dict:
``open_clip.create_model(M, pretrained="runs/x/fitclip.pt")`` loads it. ``--model`` and ``--teacher`` default to
those a train.main checkpoint was trained with (its config; a random teacher's ``teacher_init.pt`` beside it), and
for a plain state dict to ViT-B-16-quickgelu and openai.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline.cli import file_problems, fire_main, number_problems, refuse
from pipeline.writer import remove_abandoned
from train.checkpoint import atomic_save, load
from train.model import (
    EMPTY_STUDENT,
    EMPTY_WEIGHTS,
    WEIGHT_SUFFIXES,
    check_weights,
    create_clip,
    load_state_dict,
)

DEFAULT_MODEL, DEFAULT_TEACHER = "ViT-B-16-quickgelu", "openai"  # for a student file that names neither


def fuse_state_dicts(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], alpha: float) -> dict:
    """(1 - alpha) * teacher + alpha * student for floating-point tensors; other tensors from the teacher.

    Computed in float64 and cast back, so alpha = 0 and 1 give the teacher and the student exactly.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if teacher.keys() != student.keys():
        diff = sorted(teacher.keys() ^ student.keys())
        raise ValueError(f"teacher and student have different parameters, e.g. {diff[:5]}: are they the same model?")
    fused = {}
    for name, t in teacher.items():
        s = student[name]
        if t.shape != s.shape:
            raise ValueError(f"{name}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
        if t.is_floating_point():
            mixed = (1 - alpha) * t.double() + alpha * s.to(t.device).double()
            fused[name] = mixed.to(t.dtype)
        else:
            fused[name] = t.clone()
    return fused


def teacher_state_dict(model: str, teacher: str) -> dict[str, torch.Tensor]:
    """The teacher's weights: an open_clip pretrained tag or a file."""
    return {k: v.detach().cpu() for k, v in create_clip(model, teacher).state_dict().items()}


def fuse(model: str, teacher: str, student: str, alpha: float, out: str) -> str:
    """Fuse and write ``out`` atomically; returns its path."""
    fused = fuse_state_dicts(teacher_state_dict(model, teacher), load_state_dict(student), alpha)
    remove_abandoned(out)  # the temporary of a run that was killed mid-save: a whole model's size
    atomic_save(fused, out)
    return str(out)


def trained_with(student: str) -> dict[str, str]:
    """The ``model`` and ``teacher`` a train.main checkpoint at ``student`` was trained with, from its config (a
    random teacher, ``--teacher_weights ""``: the ``teacher_init.pt`` the run saved beside it); {} for a file that
    names neither (a plain state dict) or cannot be read (loading it says why)."""
    try:
        state = load(student, mmap=True)
    except Exception:
        return {}
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        return {}
    teacher = config.get("teacher_weights")
    if not isinstance(teacher, str):
        return {"model": config["model"]}
    return {"model": config["model"], "teacher": teacher or str(Path(student).parent / "teacher_init.pt")}


def _relative_hint(recorded: dict[str, str], model: str, teacher: str) -> str:
    """For a path taken from the checkpoint's config that is relative and not found from here: where it came from.
    (Runs since 2026-11-28 record absolute paths.)"""
    lost = [
        f"--{flag} {recorded[key]}"
        for flag, key, used in (("model", "model", model), ("teacher", "teacher", teacher))
        if recorded.get(key) == used
        and not Path(used).is_absolute()
        and not Path(used).exists()
        and (used.endswith(".json") or Path(used).suffix in WEIGHT_SUFFIXES)
    ]
    if not lost:
        return ""
    return (
        f" ({' and '.join(lost)}: as the checkpoint records it, relative to the folder train.main ran in; run "
        "train.fuse from there, or give the flag)"
    )


def main(student: str, out: str, model: str | None = None, teacher: str | None = None, alpha: float = 0.4) -> None:
    """Fuse teacher and student weights: (1 - alpha) * teacher + alpha * student.

    Args:
        student: the student's weights: a train.main checkpoint (best.pt, latest.pt) or a state dict file.
        out: the fused open_clip state dict to write (.pt); not the student's or the teacher's file.
        model: open_clip model name or model-config JSON (the teacher's and the student's architecture); by default
            the one the checkpoint was trained with, else ViT-B-16-quickgelu.
        teacher: the teacher's weights: an open_clip pretrained tag (openai) or a state dict file; by default the
            one the checkpoint was trained with (its teacher_init.pt for a random teacher), else openai.
        alpha: the student's weight, in [0, 1] (the paper uses 0.4).
    """
    problems = number_problems({"alpha": (alpha, 0, 1)})
    for flag, given, advice in (("teacher", teacher, EMPTY_WEIGHTS), ("student", student, EMPTY_STUDENT)):
        if given is not None and not str(given).strip():  # open_clip would build random weights, each run others
            problems.append(f"--{flag} is empty; {advice}")
    recorded = trained_with(str(student)) if str(student).strip() else {}
    model = str(model) if model is not None else recorded.get("model", DEFAULT_MODEL)
    teacher = str(teacher) if teacher is not None else recorded.get("teacher", DEFAULT_TEACHER)
    if Path(str(out)).is_dir():
        problems.append(f"--out {out} is a folder; give the file to write (e.g. {Path(str(out)) / 'fitclip.pt'})")
    else:
        problems += file_problems({"out": out})
    for flag, given in (("student", str(student)), ("teacher", teacher)):
        if given.strip() and Path(given).resolve() == Path(str(out)).resolve():
            problems.append(f"--out {out} is the --{flag}'s file: give another file to write the fused model to")
    refuse(problems)
    if recorded:  # which defaults came from the checkpoint
        said = [f"--model {recorded['model']}"] + ([f"teacher {recorded['teacher']}"] if "teacher" in recorded else [])
        print(f"train.fuse: {student} was trained with {' and '.join(said)}")
    try:
        for weights in (str(student), teacher):  # cheap (mapped files, tags not fetched): before the teacher loads
            check_weights(model, weights)
        path = fuse(model, teacher, str(student), float(alpha), str(out))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}{_relative_hint(recorded, model, teacher)}")
    except KeyboardInterrupt:  # the write is atomic: OUT is the whole fused model, or as it was
        sys.exit(f"interrupted: {out} is as it was before, or holds the whole fused model if it was written just then")
    print(f"train.fuse: (1 - {alpha}) * {teacher} + {alpha} * {student} -> {path}")


def cli() -> None:
    """The installed command (setup.cfg's console_scripts)."""
    fire_main(main, texts=True)


if __name__ == "__main__":
    cli()
