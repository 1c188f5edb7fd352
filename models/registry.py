"""Registry of zoo models: builders register by name; ``get`` builds and moves to a device."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch

from .device import resolve_device
from .spec import ModelSpec

_BUILDERS: dict[str, Callable[..., ModelSpec]] = {}


def register(name: str) -> Callable[[Callable[..., ModelSpec]], Callable[..., ModelSpec]]:
    """Decorator: register ``builder(**options) -> ModelSpec`` (tensors on CPU) under ``name``."""

    def decorate(builder: Callable[..., ModelSpec]) -> Callable[..., ModelSpec]:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return decorate


def names() -> list[str]:
    """The names of all zoo models, sorted."""
    _load_zoo()
    return sorted(_BUILDERS)


def description(name: str) -> str:
    """One line about model ``name``: the zoo's catalog entry, else the first paragraph of the
    builder's docstring (cheap: builds nothing)."""
    from .catalog import MODELS

    if name in MODELS:
        return MODELS[name]
    _load_zoo()
    doc = (_BUILDERS[name].__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def get(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **options
) -> ModelSpec:
    """Build the zoo model ``name`` with ``options`` and move its tensors to ``device``.

    ``device`` accepts ``"auto"``, ``"cpu"``, ``"cuda"`` (see :func:`models.device.resolve_device`);
    ``dtype`` casts floating data and references (e.g. ``torch.float64`` for precise tests).
    Unknown names raise a ``KeyError`` listing the valid ones.
    """
    _load_zoo()
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, _BUILDERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown model {name!r}{hint}; valid models: {', '.join(sorted(_BUILDERS))}")
    spec = _BUILDERS[name](**options)
    return spec.to(resolve_device(device), dtype)


def _load_zoo() -> None:
    # Importing the zoo package runs the @register decorators of every model module.
    from . import zoo  # noqa: F401
