"""Inference methods available to the ``pyroforge`` CLI.

A :class:`Method` adapts one algorithm (from Pyro, :mod:`vi_estimators` or :mod:`mcmc`) to the zoo:
``fit(spec, config) -> FitResult`` and ``applies_to(spec) -> None | reason``. Method modules in
this package register themselves with :func:`register_method` when imported; :func:`methods`
imports them all.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..spec import ModelSpec

__all__ = [
    "FitConfig", "FitResult", "Method", "chains_result", "get_method", "latent_names",
    "method_names", "register_method",
]


@dataclass
class FitConfig:
    """What every method is asked for: a number of posterior draws, a seed, a progress bar.

    ``num_steps``/``num_warmup`` override a method's default amount of work; ``options`` are
    method-specific keyword arguments (e.g. ``step_size``).
    """

    num_samples: int = 1000
    seed: int = 0
    progress: bool = True
    num_steps: int | None = None
    num_warmup: int | None = None
    options: dict = field(default_factory=dict)


@dataclass
class FitResult:
    """Posterior draws ``{site: (chains, draws, *shape)}`` (CPU tensors) plus bookkeeping.

    ``kind`` is ``"draws"`` (MCMC chains or iid draws from a guide) or ``"particles"`` (one joint
    particle set, stored as a single chain). ``ess_defined`` says whether ESS/s is meaningful.
    """

    method: str
    model: str
    draws: dict[str, torch.Tensor]
    wall_time: float
    kind: str = "draws"
    ess_defined: bool = False
    sample_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class Method:
    name: str
    fit: Callable[[ModelSpec, FitConfig], FitResult]
    applies_to: Callable[[ModelSpec], str | None]
    description: str = ""
    family: str = "mcmc"  # "mcmc" | "vi" | "particles"


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


def _load() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> list[str]:
    """Names of every registered method (in registration order)."""
    _load()
    return list(_METHODS)


def get_method(name: str) -> Method:
    """The method ``name``; unknown names raise a ``KeyError`` listing the valid ones."""
    _load()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; valid methods: {', '.join(_METHODS)}")
    return _METHODS[name]


def chains_result(method: str, spec: ModelSpec, draws: dict[str, torch.Tensor], wall_time: float,
                  **fields) -> FitResult:
    """A :class:`FitResult` holding the reported sites of ``draws`` (``(chains, draws, *shape)``,
    moved to the CPU); ``fields`` are the other :class:`FitResult` fields."""
    keep = [k for k in latent_names(spec) if k in draws]
    return FitResult(method, spec.name, {k: draws[k].detach().cpu() for k in keep}, wall_time,
                     **fields)


def latent_names(spec: ModelSpec) -> list[str]:
    """The global latent sites worth reporting: the reference's sites, else all latents."""
    if spec.reference is not None:
        return list(spec.reference.draws)
    return list(spec.latent_sites)
