"""Baselines for score-function terms: zero-mean control variates that never bias the gradient.

A score term of a site contributes ``sum_e (s_e - b_e) * grad l_e`` to the gradient, one term per
plate element ``e`` of the site (particles included; see :mod:`vi_estimators.core` for the
signals ``s_e``). It stays unbiased as long as ``b_e`` is independent of the draw that produced
``l_e`` (given everything upstream):

* :class:`Constant` -- a fixed number;
* :class:`MovingAverage` -- exponentially decaying average of *previous* steps' signals (the
  current signal is folded in only after it has been used), per plate element when the site's
  plates are not subsampled;
* :class:`RLOO` -- leave-one-out over particles: for particle ``k`` the mean of the other
  particles' signals at the same plate element (per-particle objectives, vectorised or looped
  particles), or VIMCO's leave-one-out value when the objective is ``logmeanexp`` over particles
  (Mnih & Rezende 2016, eq. 9 with the arithmetic mean of the other log-weights replacing
  ``log w_k``); needs K >= 2;
* :class:`Learned` -- an ``nn.Module`` of the site's inputs, trained on the squared residual
  ``(signal - b)^2`` through a zero-valued surrogate term.

Protocol: ``baseline(site, signal, info) -> b`` with ``signal`` detached, of shape
``(P, *elements)``: ``P`` is the number of particles (``info.num_particles`` when they are
independent; 1 for a site shared by all particles) and ``elements`` the site's plate shape
(size-1 dims outside its plates). ``b`` must broadcast to it. ``info`` is a
:class:`BaselineInfo`. A baseline with ``trainable = True`` may return a graph-connected ``b``;
the core detaches it for the score term and adds ``-((signal - b)^2 - same.detach()).sum()`` to
the surrogate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .state import CarriesState, note

__all__ = [
    "RLOO",
    "Baseline",
    "BaselineInfo",
    "Constant",
    "Learned",
    "MovingAverage",
    "as_baseline",
    "loo_mean",
]


def loo_mean(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Leave-one-out means along ``dim``: entry k is the mean of the other ``K - 1`` entries.

    The one helper behind every leave-one-out quantity of the package (RLOO baselines, RSVI's
    g_cor baseline, leave-one-out control-variate coefficients): entry k never depends on x_k,
    which is what keeps those corrections zero-mean. Needs ``K >= 2`` (callers check, to name
    their own argument in the error).
    """
    k = x.size(dim)
    return (x.sum(dim, keepdim=True) - x) / (k - 1)


@dataclass
class BaselineInfo:
    """What a baseline may use: ``num_particles`` (the independent particles along the signal's
    first dim; 1 when they are not independent); ``loo`` (VIMCO leave-one-out values, broadcast
    to the signal, when the objective is a registered ``logmeanexp`` over particles, else
    ``None``); ``args``/``kwargs`` of the guide (inputs for learned baselines); ``subsampled``
    (a plate of the site is subsampled, so its elements change from step to step)."""

    num_particles: int = 1
    loo: torch.Tensor | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    subsampled: bool = False


class Baseline:
    trainable = False

    def __call__(self, site: str, signal: torch.Tensor, info: BaselineInfo) -> torch.Tensor:
        raise NotImplementedError


class Constant(Baseline):
    """A constant baseline ``b = value``."""

    def __init__(self, value: float = 0.0):
        self.value = float(value)

    def __call__(self, site, signal, info):
        return torch.full_like(signal, self.value)

    def __repr__(self) -> str:
        return f"Constant({self.value})"


class MovingAverage(Baseline, CarriesState):
    """``b_t = decay * b_{t-1} + (1 - decay) * mean(signal_{t-1})`` per site; ``b_0 = 0``.

    The mean is over particles, per plate element (the site's plates are the same elements at
    every step), or over everything when a plate of the site is subsampled or its shape changed.
    ``state`` (``{site: average}``) is carried by captured objectives as graph inputs/outputs
    (:mod:`vi_estimators.state`).
    """

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MovingAverage: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.state: dict[str, torch.Tensor] = {}

    def get_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.state = dict(state)

    def __call__(self, site, signal, info):
        note(self)
        signal = signal.detach()
        new = signal.mean() if info.subsampled or signal.dim() == 0 else signal.mean(0)
        prev = self.state.get(site)
        if prev is None:
            b = torch.zeros_like(signal)
        else:
            if prev.shape != new.shape:
                prev = prev.mean()  # the element layout changed: restart from the overall mean
            b = prev.expand_as(signal)
            # a non-finite signal (reported by the objective's check) must not poison the
            # average for every later step: keep the previous value then (no host sync)
            new = torch.where(torch.isfinite(new), self.decay * prev + (1 - self.decay) * new,
                              prev)
        self.state[site] = new
        return b

    def __repr__(self) -> str:
        return f"MovingAverage(decay={self.decay})"


class RLOO(Baseline):
    """Leave-one-out baseline over the K particles (needs K >= 2)."""

    def __call__(self, site, signal, info):
        k = info.num_particles
        if k < 2 or signal.dim() == 0 or signal.shape[0] < 2:
            raise ValueError(
                f"RLOO baseline at site {site!r} needs num_particles >= 2 (got {k}); use "
                "MovingAverage() for a single particle"
            )
        if info.loo is not None:
            return info.loo
        return loo_mean(signal, 0)

    def __repr__(self) -> str:
        return "RLOO()"


class Learned(Baseline):
    """A learned baseline ``b = module(*inputs)``.

    ``inputs(args, kwargs)`` maps the guide's arguments to the module's inputs (default: the
    guide's positional arguments). The module's parameters are registered with
    ``pyro.module(name, module)`` so SVI optimises them; they are trained on the squared residual.
    ``name`` defaults to ``"learned_baseline[<site>]"``: two learned baselines registered under
    one name would share the param-store entries and one module would silently never train.
    """

    trainable = True

    def __init__(self, module: torch.nn.Module, inputs: Callable[..., tuple] | None = None,
                 name: str | None = None):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"Learned: module must be a torch.nn.Module, got {type(module)}")
        self.module = module
        self.inputs = inputs
        self.name = name

    def __call__(self, site, signal, info):
        import pyro

        pyro.module(self.name if self.name is not None else f"learned_baseline[{site}]",
                    self.module)
        x = self.inputs(info.args, info.kwargs) if self.inputs is not None else info.args
        b = self.module(*x)
        # one value per particle and element, one per particle (any shape holding P numbers,
        # e.g. a Linear's (P, 1)) or one value shared by all
        if b.numel() == signal.numel():
            return b.reshape(signal.shape)
        if b.numel() == 1:
            return b.reshape(()).expand_as(signal)
        if signal.dim() and b.numel() == signal.shape[0]:
            return b.reshape((signal.shape[0],) + (1,) * (signal.dim() - 1)).expand_as(signal)
        raise ValueError(
            f"Learned baseline at site {site!r}: the module returned shape {tuple(b.shape)}; "
            f"expected one value, one per particle ({signal.shape[0] if signal.dim() else 1}) "
            f"or one per particle and element ({signal.numel()})"
        )

    def __repr__(self) -> str:
        return f"Learned({type(self.module).__name__})"


def as_baseline(baseline: Any) -> Any:
    """Normalise a baseline argument: Baseline instances, ``"auto"``, ``None`` or a number."""
    if baseline is None or (isinstance(baseline, str) and baseline == "auto"):
        return baseline
    if isinstance(baseline, str):
        raise ValueError(  # noqa: TRY004 (a bad value, not a bad type)
            f"unknown baseline {baseline!r}; use 'auto', None, a number or a Baseline"
        )
    if isinstance(baseline, Baseline):
        return baseline
    if isinstance(baseline, (int, float)):
        return Constant(baseline)
    raise TypeError(
        f"baseline must be a Baseline, 'auto', None or a number, got {type(baseline).__name__}"
    )
