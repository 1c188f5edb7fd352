"""Step-size schedules for stochastic-gradient MCMC: ``schedule(t) -> step size`` at step ``t``.

Steps count from ``t = 0`` (the first update). Every schedule is a small picklable callable
object, so kernels that hold one can be sent to worker processes and checkpointed.

* :class:`ConstantSchedule` -- ``h_t = h``.
* :class:`PolynomialSchedule` -- ``h_t = a (b + t)^(-gamma)`` (Welling & Teh 2011, Sec. 3: with
  ``gamma`` in (0.5, 1] the sums of ``h_t`` diverge and of ``h_t^2`` converge, so SGLD converges
  to the posterior without a Metropolis step).
* :class:`CyclicalSchedule` -- cosine cycles (Zhang et al., "Cyclical Stochastic Gradient MCMC for
  Bayesian Deep Learning", ICLR 2020, eq. 1): ``h_t = h0 / 2 * (cos(pi * (t mod L) / L) + 1)``
  with cycle length ``L = ceil(total_steps / num_cycles)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = [
    "ConstantSchedule",
    "CyclicalSchedule",
    "PolynomialSchedule",
    "Schedule",
    "as_schedule",
]


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class Schedule:
    """Base class: a step-size schedule is called with the step index ``t >= 0``."""

    def __call__(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class ConstantSchedule(Schedule):
    """``h_t = step_size``."""

    def __init__(self, step_size: float) -> None:
        self.step_size = _positive("step_size", step_size)

    def __call__(self, t: int) -> float:
        return self.step_size

    def __repr__(self) -> str:
        return f"ConstantSchedule({self.step_size:g})"


class PolynomialSchedule(Schedule):
    """``h_t = a * (b + t) ** (-gamma)`` with ``a > 0``, ``b >= 1``, ``gamma >= 0``."""

    def __init__(self, a: float, b: float = 1.0, gamma: float = 0.55) -> None:
        self.a = _positive("a", a)
        self.b = float(b)
        self.gamma = float(gamma)
        if self.b < 1:
            raise ValueError(f"b must be >= 1 (so that b + t > 0), got {b!r}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")

    def __call__(self, t: int) -> float:
        return self.a * (self.b + t) ** (-self.gamma)

    def __repr__(self) -> str:
        return f"PolynomialSchedule(a={self.a:g}, b={self.b:g}, gamma={self.gamma:g})"


class CyclicalSchedule(Schedule):
    """Cosine cycles: ``h_t = step_size / 2 * (cos(pi * (t mod L) / L) + 1)``.

    ``L = ceil(total_steps / num_cycles)``; each cycle starts at ``step_size`` (exploration) and
    decays towards 0 (sampling).
    """

    def __init__(self, step_size: float, num_cycles: int, total_steps: int) -> None:
        self.step_size = _positive("step_size", step_size)
        if not isinstance(num_cycles, int) or num_cycles < 1:
            raise ValueError(f"num_cycles must be an int >= 1, got {num_cycles!r}")
        if not isinstance(total_steps, int) or total_steps < num_cycles:
            raise ValueError(f"total_steps must be an int >= num_cycles, got {total_steps!r}")
        self.num_cycles = num_cycles
        self.total_steps = total_steps
        self.cycle_length = math.ceil(total_steps / num_cycles)

    def __call__(self, t: int) -> float:
        r = (t % self.cycle_length) / self.cycle_length
        return self.step_size / 2 * (math.cos(math.pi * r) + 1)

    def __repr__(self) -> str:
        return f"CyclicalSchedule({self.step_size:g}, num_cycles={self.num_cycles}, L={self.cycle_length})"


def as_schedule(step_size: float | Callable[[int], float]) -> Callable[[int], float]:
    """A number becomes :class:`ConstantSchedule`; a schedule (any callable ``t -> h``) is kept."""
    if callable(step_size):
        return step_size
    return ConstantSchedule(step_size)
