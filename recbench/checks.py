"""Range checks of configuration values, each failing with one line that names the key.

A leaf module (imports nothing from recbench): config dataclasses of every layer call it in their
``__post_init__``, so an impossible value is refused before anything is prepared or recorded.
"""
from __future__ import annotations

import math
from typing import Any, Optional


def check_number(key: str, value: Any, *, integer: bool = False, low: Optional[float] = None,
                 high: Optional[float] = None, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError("<key> must be ..., got <value>")`` unless ``value`` is a finite number
    (an integer when ``integer``) in the interval given by ``low``/``high`` (closed unless ``*_open``).

    Booleans and strings are refused even though Python orders some of them against numbers.
    """
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        if integer and isinstance(value, float) and value.is_integer() and math.isfinite(value):
            value = int(value)
        else:
            raise ValueError(f"{key} must be {kind}{_interval(low, high, low_open, high_open)}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite {kind[2:] if integer else 'number'}"
                         f"{_interval(low, high, low_open, high_open)}, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise ValueError(f"{key} must be {kind}{_interval(low, high, low_open, high_open)}, got {value!r}")


def _interval(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""
