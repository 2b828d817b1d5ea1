"""CLI: train FitCLIP.

    torchrun --nproc_per_node 8 -m train.main --labeled shards/webvid-labeled --unlabeled shards/webvid \\
        --val shards/webvid-val --out runs/fitclip [--recipe paper|reference] [--steps 1000] [--resume auto]

Every field of :class:`train.config.TrainConfig` is a flag; ``--recipe`` picks
the preset the others default to. ``python -m train.main --help`` lists them.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys

import fire

from pipeline.cli import folder_problems, refuse
from train import config as config_module
from train.checkpoint import CheckpointError
from train.config import TrainConfig, resolve
from train.data import DataError
from train.model import WeightsError, check_crop, check_device
from train.monitor import online_problems


def main(recipe: str = "paper", **flags) -> None:
    flags = {k: v for k, v in flags.items() if v is not None}  # None: not given on the command line
    try:
        cfg = resolve(recipe, **flags)
        check_crop(cfg.model, cfg.crop)  # also an unknown --model name or a missing/broken config JSON
        check_device(cfg.device)
        refuse(folder_problems({"out": cfg.out}) + online_problems(cfg.wandb))
    except (ValueError, TypeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    from train.loop import run  # the training loop (wandb, the profiler) loads only once the flags are valid

    try:
        run(cfg)
    except (CheckpointError, DataError, WeightsError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


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


if __name__ == "__main__":
    command = _command(sys.argv[1:])
    _signature_for_help(helping=command == ["--", "--help"])
    fire.Fire(main, command=command)
