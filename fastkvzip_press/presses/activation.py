"""Which Fast KVzip press is active on a model, and which kvpress wrapper a press was entered through.

Two presses entered on one model (or one press entered twice) would hook every attention layer twice and fail deep
inside a forward; :func:`exclusive` refuses that when the second one is entered. kvpress's wrappers call a press's
``post_init_from_model`` but never say who they are; :func:`enclosing_wrapper` finds the wrapper among the callers,
so that what a wrapper cannot carry is refused there, naming it.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from kvpress.presses.base_press import BasePress
from torch import nn

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()
# Attributes through which kvpress's wrappers hold the presses they wrap.
_WRAPPED_FIELDS = ("press", "presses", "base_press", "prefilling_press", "decoding_press")
_MAX_FRAMES = 8


@contextmanager
def exclusive(press: object, model: nn.Module) -> Iterator[None]:
    """Mark ``press`` active on ``model`` for the ``with`` block; refuse when a Fast KVzip press already is."""
    active = _ACTIVE.get(model)
    if active is press:
        raise RuntimeError(
            f"this {type(press).__name__} is already active on the model: it was entered twice (nested "
            "`with press(model)`). Enter it once."
        )
    if active is not None:
        raise RuntimeError(
            f"{type(active).__name__} is already active on the model; a second press ({type(press).__name__}) would "
            "hook the same layers. Use one press at a time, or combine prefill and decoding eviction with kvpress's "
            "PrefillDecodingPress(prefilling_press=FastKVzipPress(...), decoding_press=FastKVzipDecodingPress(...))."
        )
    _ACTIVE[model] = press
    try:
        yield
    finally:
        _ACTIVE.pop(model, None)


def _holds(wrapper: object, press: object) -> bool:
    for name in _WRAPPED_FIELDS:
        held = getattr(wrapper, name, None)
        if held is press or (isinstance(held, list | tuple) and any(item is press for item in held)):
            return True
    return False


def enclosing_wrapper(press: object) -> object | None:
    """The kvpress wrapper whose ``post_init_from_model`` (or hook) is calling into ``press`` now, or ``None`` when
    the press was entered on its own."""
    frame = inspect.currentframe()
    try:
        for _ in range(_MAX_FRAMES):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            caller = frame.f_locals.get("self")
            if isinstance(caller, BasePress) and caller is not press and _holds(caller, press):
                return caller
        return None
    finally:
        del frame
