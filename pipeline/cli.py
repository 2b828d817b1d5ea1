"""What the command lines share: reading fire's forms of a comma-separated argument (torch-free)."""

from __future__ import annotations


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
