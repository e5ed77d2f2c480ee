"""Typed options: the keys a method, a regularizer or a distillation accepts, each with
its default and its types, checked when the config loads.

A declaration is a plain mapping ``{key: Option(default, types)}``; :func:`defaults`
gives the values a stage starts from and :func:`problems` names every unknown key and
every value of the wrong type. Nothing here imports torch (or the rest of detprune), so
``snakemake -n`` checks a config without loading a model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: what a type is called in an error message
_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    type(None): "null",
    object: "any value",
}


@dataclass(frozen=True)
class Option:
    """One accepted key: its ``default`` and the ``types`` a value may have (default: the
    type of ``default``; ``float`` accepts integers too, ``list`` accepts tuples, and
    ``None`` in ``types`` allows null, ``object`` anything). ``help`` says what it does."""

    default: Any
    types: tuple[type | None, ...] = ()
    help: str = ""

    def accepted_types(self) -> tuple[type, ...]:
        given = self.types or (type(self.default),)
        return tuple(type(None) if t is None else t for t in given)

    def accepts(self, value: Any) -> bool:
        for t in self.accepted_types():
            if t is object:
                return True
            if t is bool or isinstance(value, bool):
                if t is bool and isinstance(value, bool):
                    return True
                continue
            if t is float and isinstance(value, (int, float)):
                return True
            if t is list and isinstance(value, (list, tuple)):
                return True
            if t is dict and isinstance(value, Mapping):
                return True
            if isinstance(value, t):
                return True
        return False

    def type_name(self) -> str:
        return " or ".join(_NAMES.get(t, t.__name__) for t in self.accepted_types())


Options = Mapping[str, Option]


def defaults(options: Options) -> dict[str, Any]:
    """``{key: default}`` of a declaration (copies: a stage may change its dict)."""
    return {k: copy.deepcopy(o.default) for k, o in options.items()}


#: (config field, what is wrong with it)
Problem = tuple[str, str]


def problems(where: str, given: Any, options: Options, owner: str) -> list[Problem]:
    """What is wrong with the options ``given`` at config field ``where`` for ``owner`` (a
    method, regularizer, distillation or model, e.g. "method 'miep'"): one problem per
    unknown key (naming the accepted keys) and per value of the wrong type."""
    if not isinstance(given, Mapping):
        return [(where, f"the options of {owner} must be a mapping, got {given!r}")]
    out = []
    accepted = ", ".join(sorted(options)) or "none"
    for key, value in given.items():
        option = options.get(key)
        if option is None:
            out.append((f"{where}.{key}", f"unknown option of {owner}; accepted keys: {accepted}"))
        elif not option.accepts(value):
            out.append(
                (
                    f"{where}.{key}",
                    f"{owner} expects {option.type_name()}, got {value!r} ({type(value).__name__})",
                )
            )
    return out


def unknown_name(where: str, name: str, known: Iterable[str], what: str) -> Problem:
    """The problem of an unknown ``name`` (a method, regularizer, model, ...) at ``where``."""
    return (where, f"unknown {what} {name!r}; known: {', '.join(sorted(known))}")
