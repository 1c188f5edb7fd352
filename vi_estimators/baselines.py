"""Baselines for score-function terms: zero-mean control variates that never bias the gradient.

A score term of a site contributes ``(signal - b) * grad score`` to the gradient. It stays unbiased
as long as ``b`` is independent of the draw that produced ``score`` (given everything upstream):

* :class:`Constant` -- a fixed number;
* :class:`MovingAverage` -- exponentially decaying average of *previous* steps' signals (the
  current signal is folded in only after it has been used);
* :class:`RLOO` -- leave-one-out over particles: for particle ``k`` the mean of the other
  particles' signals (per-particle objectives), or VIMCO's leave-one-out value when the objective
  is ``logmeanexp`` over particles (Mnih & Rezende 2016, eq. 9 with the arithmetic mean of the
  other log-weights replacing ``log w_k``); needs K >= 2;
* :class:`Learned` -- an ``nn.Module`` of the site's inputs, trained on the squared residual
  ``(signal - b)^2`` through a zero-valued surrogate term.

Protocol: ``baseline(site, signal, info) -> b`` with ``signal`` detached, shape ``(K,)``
(per-particle) or ``()``; ``b`` broadcastable to it. ``info`` is a :class:`BaselineInfo`.
A baseline with ``trainable = True`` may return a graph-connected ``b``; the core detaches it
for the score term and adds ``-((signal - b)^2 - same.detach()).sum()`` to the surrogate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

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
    """What a baseline may use: ``num_particles``; ``loo`` (VIMCO leave-one-out values, shape
    ``(K,)``, when the objective is a registered ``logmeanexp`` over particles, else ``None``);
    ``args``/``kwargs`` of the guide (inputs for learned baselines)."""

    num_particles: int = 1
    loo: torch.Tensor | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


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


class MovingAverage(Baseline):
    """``b_t = decay * b_{t-1} + (1 - decay) * mean(signal_{t-1})`` per site; ``b_0 = 0``."""

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MovingAverage: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.state: dict[str, torch.Tensor] = {}

    def __call__(self, site, signal, info):
        prev = self.state.get(site)
        b = torch.zeros_like(signal) if prev is None else prev.expand_as(signal)
        new = signal.detach().mean()
        if prev is not None:
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
        if k < 2:
            raise ValueError(
                f"RLOO baseline at site {site!r} needs num_particles >= 2 (got {k}); use "
                "MovingAverage() for a single particle"
            )
        if info.loo is not None:
            return info.loo
        if signal.dim() == 0:
            raise ValueError(
                f"RLOO baseline at site {site!r}: the objective returned a scalar that is not a "
                "logmeanexp over particles, so per-particle signals are unknown; return the "
                "per-particle estimates (shape (K,)) or use MovingAverage()"
            )
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
        # one value per particle (any shape holding K numbers, e.g. a Linear's (K, 1)) or one
        # value shared by all particles
        if b.numel() == signal.numel():
            return b.reshape(signal.shape)
        if b.numel() == 1:
            return b.reshape(()).expand_as(signal)
        raise ValueError(
            f"Learned baseline at site {site!r}: the module returned shape {tuple(b.shape)}; "
            f"expected one value or one per particle ({signal.numel()})"
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
