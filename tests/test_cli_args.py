"""pipeline.cli: every form fire gives a comma-separated argument in, and the checks of counts."""

from __future__ import annotations

import fire
import pytest

from pipeline.cli import comma_list, count_problems


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
