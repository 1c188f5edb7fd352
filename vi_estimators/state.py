"""Tensor state that objects carry from one step to the next, and how a capture sees it.

Some pieces of an objective keep tensors between steps: a :class:`~vi_estimators.baselines.
MovingAverage` baseline (its running averages), a :class:`~vi_estimators.control_variates.
PreviousStepCoefficient` (its running moments), :class:`~vi_estimators.objectives.CUBO` (its
running constant). A captured objective (:mod:`vi_estimators.capture`) runs the program's
Python only when it traces it, so such state must become graph inputs and outputs. The protocol:

* the object subclasses :class:`CarriesState` and implements ``get_state() -> {key: tensor}``
  and ``set_state({key: tensor})`` (a missing value is simply an absent key); it never mutates
  its state tensors in place (it stores new tensors), so that a captured graph may read the
  old ones as inputs and return the new ones as outputs;
* whenever a program uses it, it calls :func:`note` ``(self)`` first.

:func:`note` is a no-op unless a capture is watching (:func:`watching`); then it records the
object with a copy of its state before the step (so the capture can restore it and compare the
state after the step), or, for an object that does not carry state this way (a user-defined
baseline or estimator), a shallow fingerprint of its attributes: if the fingerprint changes
during the step the object keeps Python state that a graph cannot carry, and the capture falls
back to eager execution.

:func:`capturing` is True while a program is being traced; value checks that need a host sync
(``bool(tensor)``) skip themselves then -- the eager set-up step that precedes every capture has
made them once.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["CarriesState", "Watch", "capturing", "note", "tracing", "watching"]


class CarriesState:
    """Mixin of objects whose tensors persist across steps (see the module docstring)."""

    def get_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


def _fingerprint(obj: Any) -> dict | None:
    """Identity of every attribute value, one level into dicts and lists (``None`` when the
    object has no ``__dict__``)."""
    attrs = getattr(obj, "__dict__", None)
    if attrs is None:
        return None
    out = {}
    for k, v in attrs.items():
        if isinstance(v, dict):
            out[k] = ("dict", id(v), tuple((kk, id(vv)) for kk, vv in v.items()))
        elif isinstance(v, list):
            out[k] = ("list", id(v), tuple(id(vv) for vv in v))
        elif isinstance(v, (int, float, str, bool, type(None))):
            out[k] = ("value", v)
        else:
            out[k] = ("id", id(v))
    return out


class Watch:
    """What a watched step used: ``carriers`` (CarriesState objects, each with a clone of its
    state before the step) and ``others`` (other noted objects with their fingerprints)."""

    def __init__(self):
        self.carriers: dict[int, tuple[CarriesState, dict[str, torch.Tensor]]] = {}
        self.others: dict[int, tuple[Any, dict | None]] = {}

    def add(self, obj: Any) -> None:
        key = id(obj)
        if key in self.carriers or key in self.others:
            return
        if isinstance(obj, CarriesState):
            before = {k: v.detach().clone() for k, v in obj.get_state().items()}
            self.carriers[key] = (obj, before)
        else:
            self.others[key] = (obj, _fingerprint(obj))

    def changed_others(self) -> list[tuple[Any, str]]:
        """Noted non-carrier objects whose attributes changed during the step, with the first
        changed attribute's name."""
        out = []
        for obj, before in self.others.values():
            after = _fingerprint(obj)
            if before != after:
                keys = sorted(set(before or {}) | set(after or {}))
                name = next((k for k in keys if (before or {}).get(k) != (after or {}).get(k)),
                            "?")
                out.append((obj, name))
        return out


_WATCHES: list[Watch] = []
_CAPTURING: list[bool] = []


def note(obj: Any) -> None:
    """Record that the running program uses ``obj`` (a no-op unless a capture is watching)."""
    if _WATCHES:
        _WATCHES[-1].add(obj)


@contextmanager
def watching():
    """Collect the objects :func:`note` d while the block runs; yields a :class:`Watch`."""
    w = Watch()
    _WATCHES.append(w)
    try:
        yield w
    finally:
        _WATCHES.pop()


@contextmanager
def tracing():
    """Mark the block as a capture's tracing run (:func:`capturing` is True inside)."""
    _CAPTURING.append(True)
    try:
        yield
    finally:
        _CAPTURING.pop()


def capturing() -> bool:
    """True while a program is traced for capture (or by ``torch.jit.trace``): value checks
    that need ``bool(tensor)`` must skip themselves."""
    return bool(_CAPTURING) or bool(torch._C._get_tracing_state())
