"""Checks of user-given knobs: each error names the knob, what it got and what it takes.

Python's ``bool`` is an ``int`` and a string is truthy, so plain ``isinstance`` and truth tests accept
``n_sink=True`` or ``layerwise="no"``; these checks do not.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


class KnobTypeError(TypeError, ValueError):
    """A knob of the wrong type. Also a ``ValueError``, so one ``except ValueError`` catches every bad knob."""


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def require_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int``: an integer (not a bool, not a float) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise KnobTypeError(f"{name} must be an integer, got {_got(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def require_real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    meaning: str = "",
) -> float:
    """``value`` as a finite ``float`` within ``low .. high`` (each bound open or closed)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise KnobTypeError(f"{name} must be a number, got {_got(value)}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name} must be in {span}{' (' + meaning + ')' if meaning else ''}, got {value}")
    return value


def require_bool(name: str, value: Any) -> bool:
    """``value`` itself when it is a ``bool``; strings and numbers are refused (``"no"`` is truthy)."""
    if not isinstance(value, bool):
        raise KnobTypeError(f"{name} must be True or False, got {_got(value)}")
    return value


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of the string ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {_got(value)}")
    return value


def require_window(name: str, value: Any, fraction: bool = True) -> int | float:
    """A recent window: an integer token count >= 0, or (when ``fraction``) a float in (0, 1), a fraction of the
    context."""
    if fraction and isinstance(value, Real) and not isinstance(value, (bool, Integral)):
        return require_real(
            f"{name} (a float is a fraction of the context)", value, 0, 1, low_open=True, high_open=True
        )
    if not fraction and isinstance(value, Real) and not isinstance(value, (bool, Integral)):
        raise KnobTypeError(f"{name} is a token count here (an integer >= 0), got {_got(value)}")
    return require_int(f"{name} (tokens)", value, minimum=0)
