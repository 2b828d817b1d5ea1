"""CLI: train FitCLIP.

    torchrun --nproc_per_node 8 -m train.main --labeled shards/webvid-labeled --unlabeled shards/webvid \\
        --val shards/webvid-val --out runs/fitclip [--recipe paper|reference] [--steps 1000] [--resume auto]

Every field of :class:`train.config.TrainConfig` is a flag; ``--recipe`` picks
the preset the others default to. ``python -m train.main --help`` lists them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import shutil
import sys
from pathlib import Path

import fire

from pipeline.cli import DISK_ERRNOS, as_typed, folder_problems, raised_problems, refuse, write_failed
from pipeline.folder_lock import FolderLockError
from train import config as config_module
from train.checkpoint import LATEST, CheckpointError, resume_path
from train.config import DEVICES, TEXT_FIELDS, TrainConfig, resolve
from train.data import DataError, check_frames, check_validation, list_shards
from train.distributed import launch_note
from train.model import WeightsError, check_crop, check_weights, device_problems
from train.monitor import online_problems
from train.preempt import Stopped


def main(recipe: str = "paper", **flags) -> None:
    flags = {_long_name(k): v for k, v in flags.items() if v is not None}  # None: not given on the command line
    cfg, problems = checked(recipe, typed_texts(flags, sys.argv[1:]))
    refuse(problems)
    note = launch_note()
    if note:
        print(f"warning: {note}", file=sys.stderr)
    cfg = with_absolute_files(cfg)
    from train.loop import run  # the training loop (wandb, the profiler) loads only once the flags are valid

    try:
        run(cfg)
    except Stopped as e:  # SIGTERM (train.preempt): saved; a scheduler's requeue or a rerun goes on from there
        if os.environ.get("RANK", "0") == "0":
            print(
                f"{e}: {Path(cfg.out) / LATEST} holds the run there; rerun the same command with --resume auto to go "
                "on from there",
                file=sys.stderr,
            )
        sys.exit(e.exit_code)
    # FolderLockError: said here, as pipeline.cli.fire_main says it for the other CLIs (this one runs fire itself)
    except (CheckpointError, DataError, WeightsError, FileExistsError, FileNotFoundError, FolderLockError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a file-size limit: the saves are atomic, so the last complete one stands
        if e.errno not in DISK_ERRNOS:
            raise
        where = Path(e.filename).parent if isinstance(e.filename, str) and e.filename else cfg.out
        sys.exit(
            f"error: {write_failed(e, where)}; then rerun the same command with --resume auto "
            f"({Path(cfg.out) / LATEST} holds the run as of its last complete save, if any)"
        )
    except RuntimeError as e:  # loader workers out of /dev/shm, in either of torch's two messages (and not a GPU
        # kernel's "out of resource: shared memory", Triton's, which a compiled step may raise)
        if not any(words in str(e) for words in SHM_ERRORS):
            raise
        sys.exit(
            f"error: the loader workers ran out of shared memory ({shared_memory()}), through which they hand over "
            "their batches: in Docker, run the container with --shm-size 8g (or --ipc host); else lower --workers "
            f"(--workers 0: none), then rerun with --resume auto ({Path(cfg.out) / LATEST} holds the last save, if any)"
        )
    except KeyboardInterrupt:  # Ctrl-C: a line that says what is kept (from rank 0 only), not a traceback
        latest = Path(cfg.out) / LATEST
        if os.environ.get("RANK", "0") != "0":
            sys.exit(1)
        if latest.is_file():
            sys.exit(
                f"interrupted: {latest} holds the run as of its last save (every --val_every steps); rerun the same "
                "command with --resume auto to go on from there"
            )
        sys.exit("interrupted before the run's first save: nothing to resume; rerun the command to start it again")


SHM_ERRORS = ("unable to allocate shared memory(shm)", "workers are out of shared memory")


def shared_memory(folder: str = "/dev/shm") -> str:
    """The size of ``folder``, the shared memory the loader workers' batches pass through, as a phrase."""
    try:
        return f"{folder} holds {shutil.disk_usage(folder).total / 2**20:.0f} MiB"
    except OSError:
        return f"{folder} cannot be read"


def with_absolute_files(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with --model's JSON file and --teacher_weights' file (not a tag) as absolute paths. The checkpoints
    record the config, and train.fuse takes both from there: as typed (``tiny-clip.json``), run from another folder
    it found neither. The shard folders stay as typed: a resume tells its --val by content (``best.pt`` records the
    validation set's identity), so a run moved, or mounted at another path on each node, resumes."""
    files = {
        name: str(Path(value).resolve())
        for name, value in (("model", cfg.model), ("teacher_weights", cfg.teacher_weights))
        if value and Path(value).is_file()
    }
    return dataclasses.replace(cfg, **files)


def _long_name(flag: str) -> str:
    """The flag a one-letter ``flag`` stands for, as fire's --help shows it (``-o, --out``): the one parameter whose
    name starts with that letter. fire itself hands a one-letter flag to ``**flags`` as it is."""
    names = {"recipe", *(f.name for f in dataclasses.fields(TrainConfig))}  # main's parameters in --help
    starting = {name for name in names if name[0] == flag} if len(flag) == 1 else set()
    return starting.pop() if len(starting) == 1 else flag


def typed_texts(flags: dict, argv: list[str]) -> dict:
    """``flags`` with each text flag that fire read as an int given back as the text, where the command line holds
    it as typed (``pipeline.cli.as_typed``)."""
    return {k: as_typed(v, argv) if k in TEXT_FIELDS else v for k, v in flags.items()}


REQUIRED_FOLDERS = {
    "labeled": "labeled shards (python -m pipeline.subset makes them)",
    "unlabeled": "unlabeled shards (python -m pipeline.shard makes them)",
}


def checked(recipe: str, flags: dict) -> tuple[TrainConfig | None, list[str]]:
    """The config of ``recipe`` with ``flags`` (None if it is refused), and every problem of the command: the
    config's checks, then those of --model, --device, --out, --wandb, the shard folders, the teacher's weights and
    --resume, each with the flag as given or its recipe's default. So a command with several wrong flags is
    refused once, naming them all (refused in turn, each relaunch would fail again on the next one). The inputs
    are checked as ``train.loop.run`` checks them first: cheaply (tar headers, mapped files)."""
    problems = []
    try:
        cfg = resolve(recipe, **flags)
    except (ValueError, TypeError) as e:
        cfg = None
        problems.append(str(e))
    given = cfg.to_dict() if cfg else {**config_module.preset(recipe)().to_dict(), **flags}
    text = {k for k, v in given.items() if isinstance(v, str)}  # other values of text flags are named above
    # a --crop or --frames out of range is named above too: the checks below take the model's own, or none
    crop = given["crop"] if type(given["crop"]) is int and given["crop"] >= 0 else 0
    frames = given["frames"] if type(given["frames"]) is int and given["frames"] >= 1 else 0
    problems += device_problems(given["device"]) if given["device"] in DEVICES else []  # else named above
    problems += folder_problems({"out": given["out"]}) + online_problems(given["wandb"])
    if cfg:
        problems += batch_of_one_problems(cfg, int(os.environ.get("WORLD_SIZE") or 1))
    checks = []
    if "model" in text:
        checks.append(functools.partial(check_crop, given["model"], crop))  # also an unknown --model, a broken JSON
    for name, make in REQUIRED_FOLDERS.items():
        if given[name] == "":
            problems.append(f"--{name} is missing: give the folder of the {make}")
    for folder in (given[k] for k in ("labeled", "unlabeled", "val") if k in text and given[k]):
        checks.append(
            functools.partial(check_frames, folder, frames) if frames else functools.partial(list_shards, folder)
        )
    if "val" in text and given["val"]:
        val_max = given["val_max"] if type(given["val_max"]) is int and given["val_max"] >= 0 else 0
        checks.append(functools.partial(check_validation, given["val"], val_max))
    if {"model", "teacher_weights"} <= text:
        checks.append(functools.partial(check_weights, given["model"], given["teacher_weights"]))
    if {"model", "out", "resume"} <= text:
        validates = bool(given["val"]) and given["fuse"] is True
        selection = (given["val"], given["val_batch"]) if "val" in text else None
        checks.append(
            functools.partial(
                resume_path, given["out"], given["resume"], given["model"], given["steps"], validates, selection
            )
        )
    for check in checks:  # CheckpointError, DataError, WeightsError are ValueErrors; FileExistsError an OSError
        problems += raised_problems(check, errors=(ValueError, TypeError, OSError))
    return cfg, list(dict.fromkeys(problems))  # a broken --model fails the crop and the weights checks alike


def batch_of_one_problems(cfg: TrainConfig, world_size: int) -> list[str]:
    """A line for each loss whose batch, over every process, would be one video: the loss over one pair, or one
    video's soft labels, is 0, so it trains nothing (as ``--val_batch 1`` scored 0). Not for a loss that ``--lam``
    gives no weight."""
    losses = (("batch_labeled", "contrastive", cfg.lam < 1), ("batch_unlabeled", "distillation", cfg.lam > 0))
    return [
        f"--{flag} {getattr(cfg, flag)} on {world_size} process(es): the {loss} loss over a batch of one video is 0, "
        "so it would train nothing; give 2 or more (the batch is per process)"
        for flag, loss, weighted in losses
        if weighted and getattr(cfg, flag) * world_size < 2
    ]


def _field_docs() -> dict[str, str]:
    """Each TrainConfig field's comment, for --help: the one after it on its line, else the lines of comment right
    above it (where a longer one is written)."""
    docs, above = {}, []
    for line in inspect.getsource(config_module.TrainConfig).splitlines():
        comment = re.fullmatch(r"\s+# (.*)", line)
        field = re.fullmatch(r"\s+(\w+): [^=]+= .*?(?:  # (.*))?", line)
        if comment:
            above.append(comment.group(1))
            continue
        if field and not field.group(1).startswith("_"):
            docs[field.group(1)] = field.group(2) or " ".join(above)
        above = []
    return docs


def _recipe_defaults(name: str, presets: dict[str, TrainConfig]) -> str:
    """A field's default in each recipe, for its help: "" when every recipe agrees, else "paper X, reference Y"."""
    values = {recipe: getattr(cfg, name) for recipe, cfg in presets.items()}
    if len({repr(v) for v in values.values()}) == 1:
        return ""
    return ", ".join(f"{recipe} {value!r}" for recipe, value in values.items())


def _signature_for_help(helping: bool = False) -> None:
    """Give ``main`` one keyword parameter per config field, so fire's --help lists them all. ``helping``: fire only
    prints the help, so each parameter shows the default recipe's value (otherwise it is None: "not given", so that
    the recipe fills it in), a flag whose recipes differ says so, and the signature leaves out ``**flags`` (fire
    would end the help with "Additional flags are accepted", which is not so)."""
    docs = _field_docs()
    presets = {name: make() for name, make in config_module.RECIPES.items()}
    params = [inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default="paper", annotation=str)]
    lines = [
        "Train FitCLIP: a student CLIP on labeled + unlabeled WebVid shards, distilled from the frozen teacher.",
        "",
        "Args:",
        "    recipe: preset for every default: paper, reference or demo (flags not given take its value; the defaults "
        "shown are paper's).",
    ]
    for f in dataclasses.fields(TrainConfig):
        if f.name == "recipe":
            continue
        default = getattr(presets["paper"], f.name) if helping else None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=f.type))
        differ = _recipe_defaults(f.name, presets)
        lines.append(f"    {f.name}: {docs.get(f.name, '')}" + (f" (by recipe: {differ})" if differ else ""))
    if not helping:  # **flags stays, so an unknown flag reaches resolve() and fails with the list of valid ones
        params.append(inspect.Parameter("flags", inspect.Parameter.VAR_KEYWORD))
    main.__signature__ = inspect.Signature(params)
    main.__doc__ = "\n".join(lines)


def _command(argv: list[str]) -> list[str]:
    """The arguments for fire: ``--help`` (or ``-h``) asks for the help. fire would hand it to ``main``'s **flags as a
    flag named help (which then fails as unknown), so it is turned into fire's own ``-- --help``."""
    return ["--", "--help"] if {"--help", "-h"} & set(argv) else argv


def cli() -> None:
    """The command: ``python -m train.main``, or the installed ``fitclip-train`` (setup.cfg's console_scripts)."""
    command = _command(sys.argv[1:])
    _signature_for_help(helping=command == ["--", "--help"])
    fire.Fire(main, command=command)


if __name__ == "__main__":
    cli()
