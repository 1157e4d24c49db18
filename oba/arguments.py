"""Argument checks shared by the public functions: one wording for one mistake."""

from __future__ import annotations

import numbers

__all__ = ["check_whole_number"]


def check_whole_number(name: str, value: object, low: int = 1, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer ``>= low`` (``bool`` is not one; ``None``
    passes when ``allow_none``)."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        either = "None or " if allow_none else ""
        raise ValueError(f"{name} must be {either}a whole number >= {low}, got {value!r}")
