"""Typed, range-checked dataclass fields: the one place configs and task specs are validated.

A field's type annotation is its check: ``int`` is an integer and not a bool, ``float`` is a finite
number, ``X | None`` also allows None (the "unset" value; never -1), ``tuple[int, int]`` is a pair,
``dict[str, float]`` a mapping. `bounds` in the field's metadata adds a range or a list of choices,
applied to a number or to each element of a container::

    steps: int = field(default=2000, metadata=bounds(lo=1))

``check_fields(self, "TrainConfig")`` in ``__post_init__`` runs every check before anything is built;
an error is one line: the field, the value found and what was expected.
"""

from __future__ import annotations

import functools
import math
import numbers
import types
import typing
from dataclasses import fields
from typing import Any


def bounds(lo: float | None = None, hi: float | None = None, *, gt: float | None = None,
           choices: tuple | None = None) -> dict:
    """Field metadata: ``lo <= value <= hi``, ``value > gt``, or ``value in choices``."""
    return {"check": {"lo": lo, "hi": hi, "gt": gt, "choices": choices}}


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if origin is tuple or origin is list:
        if not isinstance(value, tuple | list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args, strict=True))
        return all(_conforms(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    try:
        return isinstance(value, origin or hint)
    except TypeError:  # an annotation these checks do not model: accept
        return True


def _in_range(value: Any, lo=None, hi=None, gt=None, choices=None) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return all(_in_range(v, lo, hi, gt, choices) for v in value.values())
    if isinstance(value, tuple | list) and choices is None:
        return all(_in_range(v, lo, hi, gt, choices) for v in value)
    if choices is not None:
        return value in choices
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return True
    return (lo is None or value >= lo) and (hi is None or value <= hi) and (gt is None or value > gt)


def describe(hint: Any) -> str:
    """``int | None`` -> 'null or an integer', in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in sorted(args, key=lambda a: a is not type(None)))
    words = {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number",
             str: "a string", dict: "a JSON object"}
    if hint in words:
        return words[hint]
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
        return f"a list of ({describe(args[0])})" if args else "a list"
    if origin is dict:
        return f"a JSON object of {describe(args[0])}: {describe(args[1])}"
    return getattr(hint, "__name__", str(hint))


def _range_words(lo=None, hi=None, gt=None, choices=None) -> str:
    if choices is not None:
        return f"one of {list(choices)}"
    parts = ([f"in {lo}..{hi}"] if lo is not None and hi is not None else
             [f">= {lo}"] if lo is not None else [f"<= {hi}"] if hi is not None else [])
    return ", ".join(parts + ([f"> {gt}"] if gt is not None else []))


def check_value(name: str, value: Any, hint: Any, lo=None, hi=None, gt=None, choices=None) -> None:
    """Refuse ``value`` unless it has type ``hint`` and lies in the range: one line naming ``name``."""
    if _conforms(value, hint) and _in_range(value, lo, hi, gt, choices):
        return
    from probekit.tasks.base import ProbekitError  # here: the tasks package imports this module

    rng = _range_words(lo, hi, gt, choices)
    raise ProbekitError(f"{name} = {value!r}; expected {describe(hint)}{', ' + rng if rng else ''}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve: check the fields that do
        mod = __import__(cls.__module__, fromlist=["_"])
        out = {}
        for name, ann in getattr(cls, "__annotations__", {}).items():
            try:
                out[name] = eval(ann, vars(mod)) if isinstance(ann, str) else ann  # noqa: S307
            except Exception:  # noqa: BLE001
                continue
        return out


def check_fields(obj: Any, what: str) -> None:
    """Check every field of the dataclass instance ``obj`` against its annotation and `bounds`."""
    hints = _hints(type(obj))
    for f in fields(obj):
        if f.name in hints:
            check_value(f"{what}.{f.name}", getattr(obj, f.name), hints[f.name], **f.metadata.get("check", {}))
