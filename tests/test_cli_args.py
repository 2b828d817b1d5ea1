"""pipeline.cli: every form fire gives a comma-separated argument in, and the checks of counts."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import fire
import pytest
from conftest import REPO, run_cli
from fire import docstrings

from pipeline.cli import (
    comma_list,
    count_problems,
    fire_main,
    number_problems,
    pair_problems,
    positive_problems,
    unknown_flags,
)


def fire_value(arg: str):
    """What fire hands a function for ``--x ARG``."""
    got = []
    fire.Fire(lambda x=None: got.append(x), command=["--x", arg])
    return got[0]


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("a,b", ["a", "b"]),  # a tuple of str
        ("1,2", ["1", "2"]),  # of ints
        ("0,0.5", ["0", "0.5"]),  # of numbers
        ("5", ["5"]),  # an int
        ("[a, b]", ["a", "b"]),  # a list
        ("ucf101", ["ucf101"]),  # a str
        ("'a, b,,c'", ["a", "b", "c"]),  # a str: stripped, empty items dropped
    ],
)
def test_comma_list_reads_each_form_fire_gives(arg, expected):
    value = fire_value(arg)
    assert comma_list(value) == expected
    assert isinstance(value, (tuple, list, int, str))


def test_comma_list_of_nothing_is_empty():
    assert comma_list(None) == comma_list("") == comma_list(()) == comma_list(" , ") == []


def test_count_problems_names_each_count_that_is_not_a_whole_number_of_at_least_its_least():
    counts = {"a": (1, 1), "b": (0, 0), "c": (0, 1), "d": (1.5, 1), "e": ("abc", 1), "f": (True, 1)}
    assert count_problems(counts) == [
        "--c must be a whole number of at least 1, got 0",
        "--d must be a whole number of at least 1, got 1.5",
        "--e must be a whole number of at least 1, got 'abc'",
        "--f must be a whole number of at least 1, got True",
    ]


def test_number_problems_names_each_value_that_is_not_a_finite_number_within_its_bounds():
    numbers = {
        "ok": (0.5, 0, 1),
        "int": (3, 0, None),
        "word": (fire_value("abc"), 0, None),  # fire: a str
        "pair": (fire_value("1,2"), None, None),  # a tuple
        "switch": (True, None, None),
        "nan": (float("nan"), None, None),
        "low": (-0.1, 0, 1),
        "high": (3, None, 2),
    }
    assert number_problems(numbers) == [
        "--word must be a number of at least 0, got 'abc'",
        "--pair must be a number, got (1, 2)",
        "--switch must be a number, got True",
        "--nan must be a number, got nan",
        "--low must be a number from 0 to 1, got -0.1",
        "--high must be a number of at most 2, got 3",
    ]


def test_positive_problems_names_each_value_that_is_not_a_finite_number_greater_than_0():
    numbers = {"ok": 0.5, "int": 3, "zero": 0, "negative": -1.5, "word": fire_value("abc"), "switch": True}
    numbers |= {"inf": float("inf"), "pair": fire_value("1,2")}
    assert positive_problems(numbers) == [
        "--zero must be a number greater than 0, got 0",
        "--negative must be a number greater than 0, got -1.5",
        "--word must be a number greater than 0, got 'abc'",
        "--switch must be a number greater than 0, got True",
        "--inf must be a number greater than 0, got inf",
        "--pair must be a number greater than 0, got (1, 2)",
    ]


def test_pair_problems_names_each_value_that_is_not_two_numbers():
    pairs = {"ok": fire_value("0.9,0.999"), "one": fire_value("0.9"), "word": fire_value("0.9,abc"), "three": (1, 2, 3)}
    assert pair_problems(pairs) == [
        "--one must be two numbers separated by a comma, got 0.9",
        "--word must be two numbers separated by a comma, got (0.9, 'abc')",
        "--three must be two numbers separated by a comma, got (1, 2, 3)",
    ]


CLIS = (
    "demo.__main__",
    "eval.run",
    "eval.tag",
    "pipeline.shard",
    "pipeline.subset",
    "train.fuse",
    "train.main",
    "benchmarks.batch_bench",
    "benchmarks.pool_bench",
    "benchmarks.epilogue_bench",
    "benchmarks.eval_bench",
    "benchmarks.gpu_numerics",
    "benchmarks.gpu_prep",
    "benchmarks.issue6_verdict",
    "benchmarks.kernel_bench",
    "benchmarks.loader_bench",
    "benchmarks.shard_bench",
    "benchmarks.step_variants",
    "benchmarks.tar_read_bench",
    "benchmarks.text_bench",
    "benchmarks.train_step",
)


def docstring_args(doc: str) -> dict[str, str]:
    """The ``Args:`` entries of a Google-style docstring as written: each entry's lines joined."""
    lines = inspect.cleandoc(doc).split("\n")
    args, name = {}, None
    for line in lines[lines.index("Args:") + 1 :]:
        if not line.strip():
            break
        entry = re.match(r"^    (\w+): (.*)$", line)
        if entry:
            name, args[entry[1]] = entry[1], entry[2]
        else:
            args[name] += " " + line.strip()
    return args


@pytest.mark.parametrize("module", CLIS)
def test_fire_shows_each_flags_whole_help(module):
    """fire reads a continuation line that looks like an entry of its own ("... (unreachable, HTTP 5xx): those ...")
    as one, and --help then shows the flag's text cut there. Every CLI's Args entries, as fire parses them, must be
    the whole text written, one for each of its flags."""
    main = importlib.import_module(module).main
    if module == "train.main":  # its help is made from the config's comments
        importlib.import_module(module)._signature_for_help(helping=True)
    written = docstring_args(main.__doc__)
    parsed = {arg.name: " ".join((arg.description or "").split()) for arg in docstrings.parse(main.__doc__).args}
    assert parsed == written
    assert sorted(written) == sorted(inspect.signature(main).parameters)  # every flag has help, and no other entry
    assert all(written.values())


def test_unknown_flags_are_the_names_a_function_does_not_take():
    def main(src: str = "", samples_per_shard: int = 1, progress: bool = True):
        return src

    argv = ["--src", "a.csv", "--sample_per_shard", "3", "--noprogress", "--samples-per-shard=2", "--bogus=1", "-x"]
    assert unknown_flags(argv, main) == ["--sample_per_shard", "--bogus", "--x"]
    # as fire reads them: one dash or three, a one-letter shortcut of exactly one name, negative numbers as values
    assert unknown_flags(
        ["-src", "a", "---progress", "-p", "--samples_per_shard", "-1", "-0.5", "-sed", "3"], main
    ) == ["--sed"]
    assert unknown_flags(["-s", "1"], main) == ["--s"]  # src or samples_per_shard: fire refuses it too
    assert unknown_flags(["--help"], main) == [] and unknown_flags(["--", "--interactive"], main) == []
    assert unknown_flags(["--anything"], lambda **flags: flags) == []  # a function that takes any flag checks its own
    with pytest.raises(SystemExit) as e:
        fire_main(main, ["--src", "a.csv", "--sample_per_shard", "3"])
    assert str(e.value).startswith("error: unknown flag(s) --sample_per_shard (did you mean --samples_per_shard?);")
    assert str(e.value).endswith("valid flags: --progress --samples_per_shard --src")


# Runs each CLI as ``python -m`` does (runpy, as __main__), all in one process: a process per CLI spent 5 s each
# importing torch, 100 s of the suite. Prints {module: [exit status, stderr]} as Python would end each.
_EACH_AS_MAIN = """
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore", RuntimeWarning)  # runpy's: the module was imported before, by another CLI
ended = {}
for module in sys.argv[1:]:
    sys.argv, err, code = [module, "--no_such_flag", "1"], io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    except BaseException as e:
        code = f"Traceback: {type(e).__name__}: {e}"
    if isinstance(code, str):  # sys.exit("...") prints it to stderr and exits 1
        err.write(code + "\\n")
        code = 1
    ended[module] = [code or 0, err.getvalue()]
print(json.dumps(ended))
"""


def test_every_cli_refuses_a_misspelt_flag_before_any_work():
    """fire reported a flag it could not consume only after the job, run with the flag's default (eval.run --dataset
    ucf101 scored every dataset), or never, where the CLI exits itself (pipeline.shard --sample_per_shard 3 sharded
    with 1000 per shard). train.main takes **flags: it has its own check."""
    modules = [m for m in CLIS if m != "train.main"]
    proc = subprocess.run(
        [sys.executable, "-c", _EACH_AS_MAIN, *modules], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    ended = json.loads(proc.stdout.splitlines()[-1])
    wrong = {
        m: ended[m]
        for m in modules
        if ended[m][0] != 1
        or not ended[m][1].startswith("error: unknown flag(s) --no_such_flag;")
        or "Traceback" in ended[m][1]
    }
    assert list(ended) == modules and not wrong, wrong


def test_the_short_flags_train_mains_help_shows_are_taken(tmp_path):
    """--help shows -u, -o and -m (fire gives a parameter whose first letter is its own a short form), but fire hands
    them to main's **flags as they are, which refused them as unknown flags."""
    proc = run_cli("train.main", "--help")
    assert "-o, --out=OUT" in proc.stderr and "-u, --unlabeled=UNLABELED" in proc.stderr  # fire helps on stderr
    proc = run_cli("train.main", "-u", tmp_path / "none", "-o", tmp_path / "out", "-m", "nosuch", check=False)
    assert proc.returncode != 0 and "unknown flag" not in proc.stderr
    assert f"shard folder '{tmp_path / 'none'}' does not exist" in proc.stderr and "--model 'nosuch'" in proc.stderr
    proc = run_cli("train.main", "-r", "demo", check=False)  # not in --help: resume, recipe, run_name, ...
    assert "error: unknown flag(s) --r; valid flags: --alpha " in proc.stderr


def test_the_installed_commands_run_from_a_folder_whose_own_scripts_would_hide_the_packages(tmp_path):
    """`python -m train.main` in a folder holding a train.py runs that file: Python puts the current folder first on
    its path. The installed commands (setup.cfg's console_scripts) do not."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in config["options.entry_points"]["console_scripts"].strip().splitlines())
    assert set(scripts) == {f"fitclip-{n}" for n in ("shard", "subset", "train", "fuse", "eval", "tag", "demo")}
    for target in scripts.values():
        module, function = target.split(":")
        assert function == "cli" and callable(importlib.import_module(module).cli), target
    for name in ("train", "eval", "pipeline", "demo"):
        (tmp_path / f"{name}.py").write_text("raise SystemExit('the folder own script ran')\n")
    bin_dir = Path(sys.executable).parent
    for command, says in (("fitclip-train", "--batch_labeled"), ("fitclip-shard", "--samples_per_shard")):
        proc = subprocess.run([bin_dir / command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and says in proc.stdout + proc.stderr, (command, proc.stderr)
    hidden = subprocess.run(
        [sys.executable, "-m", "train.main", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert hidden.returncode != 0 and "the folder own script ran" in hidden.stderr  # what the commands avoid


@pytest.mark.parametrize(
    "module, argv, says",
    [
        ("pipeline.subset", ["--src", "s", "--out", "sh,v1"], "--out ('sh', 'v1') reached us as a tuple"),
        ("pipeline.shard", ["--src", "w.csv", "--out", "2024_06_01"], "--out 20240601 reached us as a number"),
        ("train.fuse", ["--student", "s.pt", "--out"], "--out needs a value (fire reads a bare --out as True)"),
        ("eval.run", ["--out", "1e3"], "--out 1000.0 reached us as a number"),
        ("eval.tag", ["--videos", "v", "--labels", "a,b", "--cache"], "--cache needs a value"),
        ("demo.__main__", ["--out", "a,b"], "--out ('a', 'b') reached us as a tuple"),
    ],
)
def test_a_path_fire_did_not_hand_over_as_text_is_refused_before_any_work(module, argv, says, monkeypatch):
    """fire reads ``--out sh,v1`` as a tuple, ``--out 2024_06_01`` as the int 20240601 and a bare ``--out`` as True:
    each CLI but train.main (which had its own check) wrote into a folder of that name, ``('sh', 'v1')``,
    ``20240601`` or ``True``, after the work."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).cli()
    assert str(e.value.code).startswith("error: ") and says in str(e.value.code), e.value.code


def test_a_number_typed_as_it_is_reaches_a_text_flag_as_the_text(monkeypatch):
    """``--out 2024`` is the int 2024 to fire: it is given back as the text typed, and names the folder 2024."""
    from pipeline.cli import fire_main

    seen = {}

    def main(src: str, out: str, n: int = 1, root: str | None = None) -> None:
        seen.update(src=src, out=out, n=n, root=root)

    monkeypatch.setattr(sys, "argv", ["x", "--src", "s", "--out", "2024", "--n", "7"])
    fire_main(main, texts=True)
    assert seen == {"src": "s", "out": "2024", "n": 7, "root": None}  # a None default is no text to check


def test_a_comma_list_reaches_the_cli_as_typed(monkeypatch):
    """fire reads each item of ``--names 2024_06_01,b`` as Python would: the model was named 20240601; ``1e3`` became
    1000.0 and ``0x1F`` 31. The list is handed over as typed; fire's own list syntax is left to fire."""
    from pipeline.cli import comma_list, fire_main

    seen = {}

    def main(names: str = "", alpha_sweep: str = "", out: str = "o") -> None:
        seen.update(names=comma_list(names), alpha_sweep=comma_list(alpha_sweep))

    for argv, names, alphas in (
        (["--names", "2024_06_01,b"], ["2024_06_01", "b"], []),
        (["--names=1e3,0x1F", "--alpha-sweep", "0,0.50,1"], ["1e3", "0x1F"], ["0", "0.50", "1"]),
        (["--names", "[2024_06_01, b]"], ["20240601", "b"], []),  # fire's list: as fire read it
        (["--names", "a,b"], ["a", "b"], []),
        (["--names", "None"], [], []),  # fire's None: the default names, as before
        (["--names=1,2", "--names"], ["True"], []),  # the last one given, bare: fire's True, as before
    ):
        monkeypatch.setattr(sys, "argv", ["x", *argv])
        fire_main(main, texts=True, lists=("names", "alpha_sweep"))
        assert (seen["names"], seen["alpha_sweep"]) == (names, alphas), argv


def test_a_value_that_starts_with_a_dash_or_a_quoted_tilde_is_explained(monkeypatch, capsys):
    """``--src -data.csv`` was an unknown flag --data.csv and no more; ``--out "~/shards"`` made a folder ``~`` here
    and printed ``~/shards/...``, which reads as the home folder."""
    from pipeline.cli import fire_main

    def main(src: str = "", out: str = "", top: int = 3) -> None:
        print(f"ran with {src!r}")

    monkeypatch.setattr(sys, "argv", ["x", "--src", "-data.csv", "--top", "-1"])
    with pytest.raises(SystemExit) as e:
        fire_main(main, texts=True)
    assert str(e.value.code).endswith(
        "; a value that starts with a dash goes after an = (--src='-data.csv'; a file: ./-data.csv)"
    )  # and not for --top -1, a number
    monkeypatch.setattr(sys, "argv", ["x", "--src", "~/data.csv"])
    fire_main(main, texts=True)
    out, err = capsys.readouterr()
    assert "ran with '~/data.csv'" in out  # taken as written
    assert "note: --src ~/data.csv names a folder called ~ in this one" in err and "$HOME/data.csv" in err
