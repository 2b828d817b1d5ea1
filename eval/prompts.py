"""Prompt templates and class-name formatting for zero-shot classification.

The UCF101 templates are CLIP's (openai/CLIP ``data/prompts.md``, section UCF101), in that file's order:
verb phrase outermost, then "a person" / "the person", then the opening.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_OPENINGS = ("a photo of", "a video of", "a example of", "a demonstration of")  # "a example" is CLIP's spelling
_PEOPLE = ("a person", "the person")
_VERBS = ("", "using ", "doing ", "during ", "performing ", "practicing ")

UCF101_TEMPLATES: tuple[str, ...] = tuple(
    f"{opening} {person} {verb}{{}}." for verb in _VERBS for person in _PEOPLE for opening in _OPENINGS
)  # 48 templates: "a photo of a person {}.", ..., "a demonstration of the person practicing {}."
TEMPLATES = UCF101_TEMPLATES  # the project's only multi-template set; other benchmarks use ("{}",)

# An acronym run (kept whole: "TVShow" -> "TV Show"), or one capital followed by non-capitals ("YoYo" -> "Yo Yo").
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[^A-Z]+")


def camel_case_to_words(name: str) -> str:
    """'ApplyEyeMakeup' -> 'Apply Eye Makeup', 'YoYo' -> 'Yo Yo' (UCF101 folder name to class name)."""
    return " ".join(_WORD.findall(name))


def class_prompts(classes: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """Every template filled with every class name: result[c][t] is templates[t] with classes[c] in its ``{}``.

    Filled by substitution, not ``str.format``, so braces inside a class name are safe.
    """
    if not templates:
        raise ValueError("no templates: give at least one, e.g. ('{}',)")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
    return [[template.replace("{}", name) for template in templates] for name in classes]
