"""What the command lines share: fire's entry point with its flags checked first, the house form of a refusal, and
readings of fire's forms of an argument (torch-free)."""

from __future__ import annotations

import difflib
import errno
import functools
import inspect
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import fire

from pipeline.folder_lock import FolderLockError
from pipeline.writer import NAME_MAX


def fire_main(
    fn: Callable, argv: list[str] | None = None, texts: bool = False, lists: tuple[str, ...] = (), **fire_options
) -> None:
    """``fire.Fire(fn, **fire_options)``, after refusing the --flags ``fn`` does not take. fire reports a flag it
    could not consume only once ``fn`` has returned: after the whole job, run with the misspelt flag's default
    (``eval.run --dataset ucf101`` scored every dataset), or never, where ``fn`` exits itself (``pipeline.shard``).

    With ``texts``, ``fn``'s text parameters (annotated ``str``: paths, names), but for the comma ``lists``, are
    checked as fire hands them over, before ``fn`` runs (:func:`text_problem`): ``--out sh,v1`` wrote into a folder
    named ``('sh', 'v1')``, ``--out 2024_06_01`` into ``20240601``, and a bare ``--out`` into ``True``. (The
    benchmarks, whose text flags are mostly comma lists, go without.)"""
    argv = sys.argv[1:] if argv is None else argv
    unknown = unknown_flags(argv, fn)
    if unknown:
        names = sorted(inspect.signature(fn).parameters)
        hints = "".join(f"; {hint}" for hint in _dash_value_hints(argv, names))
        raise SystemExit(f"error: {unknown_flags_line(unknown, names)}{hints}")
    try:
        fire.Fire(_texts_checked(fn, argv, lists) if texts else fn, command=argv, **fire_options)
    except FolderLockError as e:  # an output folder's lock this user can neither make nor take: said, not traced
        raise SystemExit(f"error: {e}") from None


def unknown_flags_line(unknown: list[str], names: list[str]) -> str:
    """The line for flags ``unknown`` (each with its dashes) among the parameter ``names``: each with the name it
    comes closest to (none for one letter: -r is as close to --lr as to --resume), then every valid flag."""
    guesses = [difflib.get_close_matches(u.lstrip("-"), names, n=1) if len(u.lstrip("-")) > 1 else [] for u in unknown]
    said = ", ".join(f"{u} (did you mean --{g[0]}?)" if g else u for u, g in zip(unknown, guesses, strict=True))
    return f"unknown flag(s) {said}; valid flags: " + " ".join("--" + n for n in sorted(names))


def _dash_value_hints(argv: list[str], names: list[str]) -> list[str]:
    """How to give a value that starts with a dash, for each that follows a flag of ``names`` and was read as a
    flag (``--query "-sliding shapes"``, ``--src -data.csv``)."""
    return [
        f"a value that starts with a dash goes after an = ({flag}={value!r}; a file: ./{value})"
        for flag, value in zip(argv, argv[1:], strict=False)
        if flag.startswith("--")
        and "=" not in flag
        and flag[2:].replace("-", "_") in names
        and value[:1] == "-"
        and value[1:2] not in "0123456789."
    ]


def text_problem(flag: str, value, none_ok: bool = False) -> str | None:
    """The line for a text flag (a path, a name) that fire did not hand over as text, or None: a bare ``--out``
    comes as True; ``--out 2024_06_01`` as the int 20240601 and ``--out 1e3`` as the float 1000.0, not the text
    typed; ``--out a,b`` as a tuple. ``none_ok``: None is the flag's default."""
    if isinstance(value, str) or (value is None and none_ok):
        return None
    if isinstance(value, bool) or value is None:
        return f"--{flag} needs a value (fire reads a bare --{flag} as True)"
    kind = "number" if isinstance(value, (int, float)) else type(value).__name__
    return f"--{flag} {value!r} reached us as a {kind}, not as the text typed; quote it twice (--{flag} \"'...'\")"


def as_typed(value, argv: list[str]):
    """``value`` as typed where fire read a text as an int that the command line holds as it is (``--out 2024``):
    the text; else ``value``. fire also reads ``2024_06_01`` and ``0x1F`` as ints (20240601, 31), which are not
    what was typed: those stay numbers, for :func:`text_problem` to refuse with the fix."""
    typed = set(argv) | {token.split("=", 1)[1] for token in argv if token.startswith("-") and "=" in token}
    return str(value) if type(value) is int and str(value) in typed else value


def typed_list(argv: list[str], name: str) -> str | None:
    """The comma list flag ``--name`` (or ``--name-with-dashes``) as typed on the command line, the last one given,
    or None: fire reads each item as Python would, so ``--names 2024_06_01,b`` reached a CLI as (20240601, "b")
    and ``--names 1e3,b`` as (1000.0, "b"). None too for fire's own list syntax (``--x "[a, b]"``, quotes), which
    :func:`comma_list` reads as fire gave it."""
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    typed = None
    for flag, value in zip(argv, [*argv[1:], None], strict=True):
        if flag in flags:  # a bare flag (fire's True) too: the last one given is what fire handed over
            typed = value if value is not None and not value.startswith("--") else None
        elif "=" in flag and flag.split("=", 1)[0] in flags:
            typed = flag.split("=", 1)[1]
    if typed is None or typed == "None" or any(c in typed for c in "[](){}'\""):  # "None": fire's None, a default
        return None
    return typed


def _texts_checked(fn: Callable, argv: list[str], lists: tuple[str, ...]) -> Callable:
    """``fn`` with its text parameters (annotated ``str`` or ``str | None``, but ``lists``) refused in one line
    unless text, before it runs, and its comma ``lists`` handed over as typed (:func:`typed_list`); fire sees
    ``fn``'s own signature and help (``functools.wraps``)."""
    signature = inspect.signature(fn)
    texts = {
        name: param.default is None
        for name, param in signature.parameters.items()
        if name not in lists and param.annotation in ("str", "str | None", str)
    }

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        problems = []
        for name, none_ok in texts.items():
            if name in bound.arguments:  # given: a default is what it is
                bound.arguments[name] = value = as_typed(bound.arguments[name], argv)
                problems.append(text_problem(name, value, none_ok))
                if isinstance(value, str) and (value == "~" or value.startswith("~/")):
                    print(
                        f"note: --{name} {value} names a folder called ~ in this one: the shell expands ~ only "
                        f"unquoted (write $HOME{value[1:]} for your home folder)",
                        file=sys.stderr,
                    )
        refuse([problem for problem in problems if problem])
        for name in lists:
            if name in bound.arguments and not isinstance(bound.arguments[name], str):
                typed = typed_list(argv, name)
                bound.arguments[name] = bound.arguments[name] if typed is None else typed
        return fn(*bound.args, **bound.kwargs)

    return checked


def unknown_flags(argv: list[str], fn: Callable) -> list[str]:
    """The flags of ``argv`` that name no parameter of ``fn``, as fire reads them, up to fire's own ``--`` and
    besides its --help: ``--name value``, ``--name=value``, ``--no<name>``, ``-name`` (fire takes one dash or
    three as well), and one letter that starts exactly one parameter's name (fire's shortcut: ``-q`` for
    ``--quick``); a dash and a digit is a negative number. fire reads dashes in a name as underscores."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    unknown = []
    for token in argv:
        if token == "--":  # fire's own flags follow
            break
        name = token.lstrip("-").split("=", 1)[0].replace("-", "_")
        if not token.startswith("-") or not name or name[0].isdigit() or name[0] == ".":  # a value
            continue
        if len(name) == 1:
            if name == "h" or sum(p.startswith(name) for p in params) == 1:
                continue
        elif name in params or name == "help" or (name.startswith("no") and name[2:] in params):
            continue
        unknown.append("--" + name)
    return unknown


def comma_list(value) -> list[str]:
    """A fire argument meant as a comma list, as text items.

    fire gives ``--x a,b`` as the tuple ("a", "b"), ``--x 1,2`` as (1, 2), ``--x 5`` as the int 5, ``--x "[a, b]"``
    as a list, and a word (``--x ucf101``) or a quoted text (``--x "'a, b'"``) as a str; an absent argument is None
    or "". Items are stripped, empty ones dropped.
    """
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def switch_problems(switches: dict[str, object]) -> list[str]:
    """A line for each flag (name without dashes -> value) that must be True or False and is not. fire hands
    ``--x no`` over as the string "no", which Python would take as True."""
    wrong = {name: value for name, value in switches.items() if not isinstance(value, bool)}
    return [f"--{name} must be True or False, got {value!r}" for name, value in wrong.items()]


def count_problems(counts: dict[str, tuple[object, int]]) -> list[str]:
    """A line for each count (name without dashes -> (value, least)) that is not a whole number of at least its
    least. fire hands ``--x 1.5`` over as a float and ``--x abc`` as a str; True is an int to Python, not a count."""
    return [
        f"--{name} must be a whole number of at least {least}, got {value!r}"
        for name, (value, least) in counts.items()
        if isinstance(value, bool) or not isinstance(value, int) or value < least
    ]


def number_problems(numbers: dict[str, tuple[object, float | None, float | None]]) -> list[str]:
    """A line for each number (name without dashes -> (value, least, most), a bound None when there is none) that is
    not a finite real number within its bounds. fire hands ``--x abc`` over as a str and ``--x 1,2`` as a tuple; True
    is a number to Python, not here."""
    problems = []
    for name, (value, least, most) in numbers.items():
        real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if real and (least is None or value >= least) and (most is None or value <= most):
            continue
        bounds = {(False, False): "", (True, False): f" of at least {least}", (False, True): f" of at most {most}"}
        bounds[(True, True)] = f" from {least} to {most}"
        problems.append(f"--{name} must be a number{bounds[(least is not None, most is not None)]}, got {value!r}")
    return problems


def positive_problems(numbers: dict[str, object]) -> list[str]:
    """A line for each number (name without dashes -> value) that is not a finite real number greater than 0: a
    length, a rate or a time, where 0 means nothing. As in :func:`number_problems`, True is not a number here."""
    return [
        f"--{name} must be a number greater than 0, got {value!r}"
        for name, value in numbers.items()
        if number_problems({name: (value, None, None)}) or not value > 0
    ]


def pair_problems(pairs: dict[str, object]) -> list[str]:
    """A line for each flag (name without dashes -> value) that must be two numbers, as fire hands ``--x 0.5,1.0``
    over (a tuple); the bounds of each are the caller's to check."""
    return [
        f"--{name} must be two numbers separated by a comma, got {value!r}"
        for name, value in pairs.items()
        if not isinstance(value, (tuple, list))
        or len(value) != 2
        or number_problems({"x": (value[0], None, None), "y": (value[1], None, None)})
    ]


def raised_problems(check, *args, errors: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)) -> list[str]:
    """``check(*args)``'s refusal (one of ``errors``, whose message names the flag) as a line, or nothing: for the
    parsers that raise, beside the checks that return lines."""
    try:
        check(*args)
    except errors as e:
        return [str(e)]
    return []


def refuse(problems: list[str]) -> None:
    """Exit with one ``error:`` line naming every problem, if there is any: the house form of a refused flag, given
    before any long work."""
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def folder_problems(folders: dict[str, object], writable: bool = True) -> list[str]:
    """A line for each output-folder flag (name without dashes -> value) whose path, or a folder above it, is a file,
    or (``writable``) that this user may not write in or make: the folder is made and written only when something
    is written, often after the work, and failed there with a traceback."""
    problems = []
    for name, value in folders.items():
        path = Path(str(value))
        long = long_name_problems(name, value)
        if long:  # no more to ask: the path cannot even be looked up
            problems += long
            continue
        existing = nearest_existing(path)
        if existing is None:
            continue
        if not existing.is_dir():
            where = "" if existing == path else f": {existing}"
            problems.append(f"--{name} {value}{where} is a file; give a folder (made if missing)")
        elif writable and not may_write(existing):
            where = "" if existing == path else f" (it would be made in {existing})"
            problems.append(f"--{name} {value}{where}: no permission to write there; give a folder you can write")
    return problems


def file_problems(files: dict[str, object]) -> list[str]:
    """A line for each output-file flag (name without dashes -> value) whose folder, or one above it, is a file, or
    is a folder this user may not write in: the file is written at the end of the work (beside itself first, then
    renamed), and failed there with a traceback."""
    problems = []
    for name, value in files.items():
        long = long_name_problems(name, value)
        if long:
            problems += long
            continue
        if str(value).endswith(os.sep):  # Path() drops the slash: the file took the folder's name
            problems.append(f"--{name} {value} ends in {os.sep}: give a file's name, not a folder's")
            continue
        existing = nearest_existing(Path(str(value)).absolute().parent)
        if existing is not None and not existing.is_dir():
            problems.append(f"--{name} {value}: {existing} is a file, not a folder")
        elif existing is not None and not may_write(existing):
            problems.append(
                f"--{name} {value}: no permission to write in {existing}; give a file in a folder you can write"
            )
    return problems


def long_name_problems(flag: str, value: object) -> list[str]:
    """A line if a name in the path ``value`` is longer than a file name may be: made at the end of the work, it
    failed there ("File name too long")."""
    long = next((part for part in Path(str(value)).parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is None:
        return []
    return [f"--{flag}: the name {long[:40]}... is {len(os.fsencode(long))} bytes, over the {NAME_MAX} a name may have"]


def nearest_existing(path: Path) -> Path | None:
    """``path`` if it exists, else the nearest folder above it that does (where it would be made)."""
    return next((p for p in (path, *path.parents) if p.exists()), None)


def may_write(folder: str | Path) -> bool:
    """Whether this process may make and write files in the existing ``folder`` (its permissions, a read-only
    mount). Not a promise (a full disk, an ACL), but the usual cause of a write that fails, asked before the work."""
    return os.access(folder, os.W_OK | os.X_OK)


# what a write fails with for want of room or of a writable disk, not for the path given (a full disk, a quota, a
# file-size limit, a filesystem mounted read-only)
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def write_failed(error: OSError, what: str | Path, too_big: str = "") -> str:
    """One line for a failed write into ``what`` (a full disk, a file-size limit, a read-only folder), with what to
    do about it; ``too_big`` is the fix for a file larger than the filesystem or ``ulimit -f`` allows."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "Free space on its disk (or raise the quota)"
    elif error.errno == errno.EFBIG:
        fix = too_big or "A file is larger than this filesystem or ulimit -f allows: raise the limit"
    else:
        fix = f"Check that {what} can be written"
    return f"writing {what} failed: {error}. {fix}"


def error_line(error: BaseException) -> str:
    """``Type: first line of its message``: an error said within one line of ours (W&B's run to pages)."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"
