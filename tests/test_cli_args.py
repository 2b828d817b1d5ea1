"""pipeline.cli: every form fire gives a comma-separated argument in, and the checks of counts."""

from __future__ import annotations

import fire
import pytest

from pipeline.cli import comma_list, count_problems, number_problems, pair_problems


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


def test_pair_problems_names_each_value_that_is_not_two_numbers():
    pairs = {"ok": fire_value("0.9,0.999"), "one": fire_value("0.9"), "word": fire_value("0.9,abc"), "three": (1, 2, 3)}
    assert pair_problems(pairs) == [
        "--one must be two numbers separated by a comma (e.g. 0.9,0.999), got 0.9",
        "--word must be two numbers separated by a comma (e.g. 0.9,0.999), got (0.9, 'abc')",
        "--three must be two numbers separated by a comma (e.g. 0.9,0.999), got (1, 2, 3)",
    ]
