"""Checks at the edges: each raises ValueError naming the field, the bad value and what is OK."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value)
    )


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    if not _is_number(value) or (integer and int(value) != value) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be {kind} > 0")


def check_non_negative(name: str, value: Any, *, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    if not _is_number(value) or (integer and int(value) != value) or value < 0:
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be {kind} >= 0")


def check_range(name: str, value: Any, low: float, high: float) -> None:
    if not _is_number(value) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be in [{low}, {high}]")


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> None:
    options = list(allowed)
    if value not in options:
        raise ValueError(f"{name}={value!r} is not one of: {', '.join(options)}")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """One dict lookup by name with an error listing what exists (no if-chains)."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        allowed = ", ".join(sorted(registry))
        raise ValueError(f"unknown {what} {name!r}; allowed: {allowed}") from None
