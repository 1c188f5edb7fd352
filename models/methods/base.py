"""What a CLI method is: its typed options, the settings it is fitted with, and its result.

Nothing here imports torch, so ``pyroforge --help`` and ``pyroforge list`` stay fast; the method
modules import their algorithms inside ``fit``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..spec import ModelSpec

__all__ = [
    "SETTINGS",
    "FitConfig",
    "FitResult",
    "Method",
    "Option",
    "OptionError",
    "chains_result",
    "continuous_latents_only",
    "latent_names",
    "model_params",
]

SETTINGS = {
    "num_samples": "--num-samples (posterior draws per chain)",
    "num_steps": "--num-steps (optimisation or particle iterations)",
    "warmup_steps": "--warmup-steps (discarded sampler steps per chain)",
}
"""The general settings (CLI flags) a method may read, besides its own options."""

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class OptionError(ValueError):
    """A method option is unknown or its value is not allowed (the message says what is)."""


@dataclass(frozen=True)
class Option:
    """One keyword option of a method: ``--option NAME=VALUE`` on the command line.

    ``type`` is ``int``, ``float``, ``str`` or ``bool``. Numbers must lie in ``[low, high]``
    (an open end with ``low_open``/``high_open``); strings must be one of ``choices`` when given.
    ``default=None`` means the method chooses (``default_text`` says how).
    """

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    default_text: str = ""

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``float > 0`` or ``one of reparam, mvd``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        kind = {int: "integer", float: "float", bool: "true/false", str: "string"}[self.type]
        lo = None if self.low is None else ((">" if self.low_open else ">=") + f" {self.low:g}")
        hi = None if self.high is None else (("<" if self.high_open else "<=") + f" {self.high:g}")
        if lo and hi:
            left, right = ("(" if self.low_open else "["), (")" if self.high_open else "]")
            return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        return " ".join(x for x in (kind, lo or hi) if x)

    def describe(self) -> str:
        default = self.default_text or ("chosen by the method" if self.default is None
                                        else repr(self.default))
        return f"{self.name} ({self.allowed()}; default {default}): {self.help}"

    def parse(self, value: Any, method: str) -> Any:
        """``value`` (a string from the command line, or a Python value) checked and typed."""
        where = f"{method}: option {self.name}"
        text = value.strip() if isinstance(value, str) else value
        if self.type is bool:
            if isinstance(text, bool):
                return text
            if str(text).lower() in _TRUE + _FALSE:
                return str(text).lower() in _TRUE
            raise OptionError(f"{where}={value!r} is not allowed; expected true or false")
        if self.type is str:
            text = str(text)
            if self.choices and text not in self.choices:
                raise OptionError(f"{where}={value!r} is not allowed; expected {self.allowed()}")
            return text
        try:
            number = float(text)
        except (TypeError, ValueError):
            raise OptionError(f"{where}={value!r} is not a number; expected {self.allowed()}") \
                from None
        if not math.isfinite(number):
            raise OptionError(f"{where}={value!r} is not finite; expected {self.allowed()}")
        if self.type is int:
            if number != int(number) or isinstance(text, bool):
                raise OptionError(f"{where}={value!r} is not an integer; expected "
                                  f"{self.allowed()}")
            number = int(number)
        too_low = self.low is not None and (number <= self.low if self.low_open
                                            else number < self.low)
        too_high = self.high is not None and (number >= self.high if self.high_open
                                              else number > self.high)
        if too_low or too_high:
            raise OptionError(f"{where}={value!r} is out of range; expected {self.allowed()}")
        return number


@dataclass
class FitConfig:
    """What every method is asked for.

    ``num_samples`` draws per chain, a ``seed``, a progress bar; ``num_steps`` caps a method's
    iterations (VI: the cap of its stopping rule; particles: the number of iterations) and
    ``warmup_steps`` overrides a sampler's warm-up, ``None`` meaning the method's default.
    ``options`` are the method's own options, already checked and completed with their defaults
    by :meth:`Method.parse_options`.
    """

    num_samples: int = 1000
    seed: int = 0
    progress: bool = True
    num_steps: int | None = None
    warmup_steps: int | None = None
    options: dict = field(default_factory=dict)


@dataclass
class FitResult:
    """Posterior draws ``{site: (chains, draws, *shape)}`` (CPU tensors) plus bookkeeping.

    ``kind`` is ``"draws"`` (MCMC chains or iid draws from a guide) or ``"particles"`` (particle
    sets, one per "chain"). ``ess_defined`` says whether ESS/s is meaningful. ``warnings`` are
    sentences the method wants the user to see (e.g. a VI fit that hit its step cap); ``info``
    holds what the method reports about itself (step size, number of steps, KSD, ...).
    """

    method: str
    model: str
    draws: dict[str, torch.Tensor]
    wall_time: float
    kind: str = "draws"
    ess_defined: bool = False
    sample_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    """One inference method of the CLI.

    ``fit(spec, config) -> FitResult``; ``applies_to(spec) -> None | reason``; ``family`` is
    ``"mcmc"``, ``"vi"`` or ``"particles"``; ``options`` are its typed keyword options;
    ``settings`` are the general settings (keys of :data:`SETTINGS`) it reads.
    """

    name: str
    family: str
    description: str
    fit: Callable[[ModelSpec, FitConfig], FitResult]
    applies_to: Callable[[ModelSpec], str | None]
    options: tuple[Option, ...] = ()
    settings: tuple[str, ...] = ("num_samples",)

    def __post_init__(self):
        unknown = set(self.settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown settings {sorted(unknown)}")

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def parse_options(self, raw: Mapping[str, Any]) -> dict:
        """``raw`` (strings or values) checked and typed, completed with the defaults.

        Unknown names and bad values raise :class:`OptionError` listing the valid options.
        """
        out = {o.name: o.default for o in self.options}
        for key, value in raw.items():
            opt = self.option(key)
            if opt is None:
                valid = ", ".join(o.name for o in self.options) or "none"
                raise OptionError(f"{self.name}: unknown option {key!r}; valid options: {valid} "
                                  f"(see `pyroforge list --method {self.name}`)")
            out[key] = opt.parse(value, self.name)
        return out

    def help_text(self) -> str:
        """Several lines: description, settings read, and one line per option."""
        lines = [f"{self.name} ({self.family}): {self.description}",
                 "  reads: " + ", ".join(SETTINGS[s].split(" (")[0] for s in self.settings)]
        if self.options:
            lines.append("  options (--option NAME=VALUE):")
            lines += [f"    {o.describe()}" for o in self.options]
        else:
            lines.append("  options: none")
        return "\n".join(lines)


def model_params(spec: ModelSpec) -> list[str]:
    """Names of learnable parameters (``pyro.param``/``pyro.module``) the model itself declares."""
    from pyro import poutine

    tr = poutine.trace(spec.model).get_trace(*spec.args, **spec.kwargs)
    return [name for name, site in tr.nodes.items() if site["type"] == "param"]


def continuous_latents_only(spec: ModelSpec) -> str | None:
    """``applies_to`` of samplers of continuous latents without model parameters."""
    if spec.discrete_sites:
        return (f"this sampler needs continuous latents; {', '.join(spec.discrete_sites)} "
                "are discrete")
    params = model_params(spec)
    if params:
        return (f"the model has learnable parameters ({', '.join(params[:3])}...); this sampler "
                "draws latents only -- fit the parameters by VI")
    return None


def latent_names(spec: ModelSpec) -> list[str]:
    """The global latent sites worth reporting: the reference's sites, else all latents."""
    if spec.reference is not None:
        return list(spec.reference.draws)
    return list(spec.latent_sites)


def chains_result(method: str, spec: ModelSpec, draws: Mapping[str, torch.Tensor],
                  wall_time: float, **fields) -> FitResult:
    """A :class:`FitResult` holding the reported sites of ``draws`` (``(chains, draws, *shape)``,
    moved to the CPU); ``fields`` are the other :class:`FitResult` fields."""
    keep = [k for k in latent_names(spec) if k in draws]
    return FitResult(method, spec.name, {k: draws[k].detach().cpu() for k in keep}, wall_time,
                     **fields)
