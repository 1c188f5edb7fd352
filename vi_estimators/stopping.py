"""Stopped (detached) parameters: the ingredient of every path gradient.

A path gradient (Roeder et al. 2017; Tucker et al. 2019; Vaitl et al. 2024) evaluates a guide's
log-density ``log q(z; stop(phi))`` at attached draws ``z(phi)`` with the guide's parameters
detached, so that ``d/dphi log q(z(phi); stop(phi)) = (d log q / dz)(dz / dphi)``. Guides reach
their parameters in two ways, and both are stopped here:

* ``pyro.param`` statements (autoguides' ``PyroParam``s included): :class:`StopParamMessenger`;
* ``nn.Parameter``s of a guide that is an ``nn.Module`` (or of transform modules):
  :func:`with_stopped_params` swaps them for detached copies with ``torch.func.functional_call``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from pyro.nn.module import PyroModule
from pyro.poutine.messenger import Messenger

__all__ = ["StopParamMessenger", "with_stopped_params"]


class _DetachedUnconstrained:
    """Stand-in for the ``.unconstrained`` weakref of a constrained param: returns the detached
    unconstrained tensor (a weakref would die with the temporary)."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __call__(self) -> torch.Tensor:
        return self.value


class StopParamMessenger(Messenger):
    """Detaches the value of every ``pyro.param`` statement (including PyroModule ``PyroParam``s).

    The constrained value is detached; ``value.unconstrained()`` keeps working and returns the
    detached unconstrained tensor. Subsampled params (``event_dim`` inside a subsampled plate) are
    indexed by the plate as usual; the indices come from the replayed trace.
    """

    def _pyro_post_param(self, msg) -> None:
        value = msg["value"]
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            return
        detached = value.detach()
        unconstrained = getattr(value, "unconstrained", None)
        if unconstrained is not None:
            raw = unconstrained()
            if raw is not None:
                detached.unconstrained = _DetachedUnconstrained(raw.detach())
        msg["value"] = detached


def _module_params_to_stop(
    module: torch.nn.Module, pyro_params: bool = False
) -> dict[str, torch.Tensor]:
    """Detached copies of the module's plain ``nn.Parameter``s, for ``functional_call``.

    ``PyroParam`` storage (``<name>_unconstrained`` of a ``PyroModule``) is skipped unless
    ``pyro_params``: inside a guide it is read through ``pyro.param`` (handled by
    :class:`StopParamMessenger`), and swapping it would fight PyroModule's param-store
    synchronisation.
    """
    stopped, detached = {}, {}
    for mod_name, mod in module.named_modules():
        pyro_names = mod.__dict__.get("_pyro_params", {}) \
            if isinstance(mod, PyroModule) and not pyro_params else {}
        for p_name, p in mod._parameters.items():
            if p is None:
                continue
            if p_name.endswith("_unconstrained") and \
                    p_name[: -len("_unconstrained")] in pyro_names:
                continue
            # Tied aliases (e.g. an autoguide's _prototype_tensor) get the very same tensor.
            if id(p) not in detached:
                detached[id(p)] = p.detach()
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            stopped[full] = detached[id(p)]
    return stopped


class _StoppedRunner(torch.nn.Module):
    """Runs ``fn(guide)`` with the guide's nn.Parameters swapped for detached copies.

    Everything that reads the parameters (the guide *and* the lazy ``log_prob`` of distributions
    holding transform modules) must run inside ``functional_call``, hence this wrapper.
    """

    def __init__(self, guide: torch.nn.Module):
        super().__init__()
        self.guide = guide

    def forward(self, fn):
        return fn(self.guide)



def with_stopped_params(guide: Callable, fn: Callable, pyro_params: bool = False):
    """Evaluate ``fn(guide)`` with the guide module's nn.Parameters detached (``fn`` applies
    :class:`StopParamMessenger` for ``pyro.param`` statements itself; ``pyro_params=True``
    detaches PyroParam storage too, for code that does not read it through ``pyro.param``)."""
    if isinstance(guide, torch.nn.Module):
        runner = _StoppedRunner(guide)
        stopped = {f"guide.{k}": v
                   for k, v in _module_params_to_stop(guide, pyro_params).items()}
        with warnings.catch_warnings():
            # pyro.module warns about the (detached) parameters not requiring grad.
            warnings.filterwarnings("ignore", message=".*was not registered in the param store")
            return torch.func.functional_call(runner, stopped, (fn,), strict=False)
    return fn(guide)


