"""Inference methods available to the ``pyroforge`` CLI.

A :class:`~models.methods.base.Method` adapts one algorithm (from Pyro, :mod:`vi_estimators` or
:mod:`mcmc`) to the zoo: ``fit(spec, config) -> FitResult``, ``applies_to(spec) -> None | reason``
and its typed ``options``. The method modules below each export a ``METHODS`` tuple; this list is
explicit (a new module is added here), and importing them does not import torch (their ``fit``
functions import their algorithms), so ``pyroforge --help`` and ``pyroforge list`` stay fast.
"""

from __future__ import annotations

from .base import (
    SETTINGS,
    FitConfig,
    FitResult,
    Method,
    Option,
    OptionError,
    chains_result,
    latent_names,
)

__all__ = [
    "SETTINGS", "FitConfig", "FitResult", "Method", "Option", "OptionError", "chains_result",
    "get_method", "latent_names", "method_names", "methods",
]


def methods() -> dict[str, Method]:
    """Every method of the CLI by name, in listing order."""
    from . import langevin, particles, pyro_builtin, vi

    table: dict[str, Method] = {}
    for module in (pyro_builtin, vi, langevin, particles):
        for method in module.METHODS:
            if method.name in table:
                raise ValueError(f"method {method.name!r} is declared twice")
            table[method.name] = method
    return table


def method_names() -> list[str]:
    """Names of every method (in listing order)."""
    return list(methods())


def get_method(name: str) -> Method:
    """The method ``name``; unknown names raise a ``KeyError`` listing the valid ones."""
    table = methods()
    if name not in table:
        raise KeyError(f"unknown method {name!r}; valid methods: {', '.join(table)}")
    return table[name]
