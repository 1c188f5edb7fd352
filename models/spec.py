"""The contract every zoo entry fulfils: :class:`ModelSpec` and its :class:`Reference` posterior.

A spec bundles a Pyro model with its data (as tensors on one device), a default guide factory, a
reference posterior and the structural facts that inference methods need (latent sites, plate
nesting, shards for federated methods, nonsmooth terms for proximal samplers, held-out data).

Conventions every zoo model follows (tests check them):

* ``spec.model(*spec.args, **spec.kwargs)`` runs the model on all of its data;
* the model broadcasts over extra batch dims on the left of ``-max_plate_nesting``, so Pyro's
  ``vectorize_particles=True`` and chain-vectorised potentials work;
* models with ``supports_subsampling`` take a ``subsample_size`` keyword that is passed to their
  data plate (``pyro.plate("data", N, subsample_size=...)``), so minibatch log-likelihoods are
  rescaled by Pyro and gradients stay unbiased;
* everything is a plain module-level function, so a spec can be pickled for worker processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .device import resolve_device


def _move(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move tensors (recursively through tuples, lists and dicts) to ``device``/``dtype``.

    Only floating tensors change dtype: integer data (counts, labels, indices) keep theirs.
    """
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device=device)
    if isinstance(value, torch.nn.Module):
        return value.to(device=device, dtype=dtype) if dtype is not None else value.to(device)
    if isinstance(value, dict):
        return {k: _move(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        moved = [_move(v, device, dtype) for v in value]
        return type(value)(moved) if isinstance(value, list) else tuple(moved)
    if isinstance(value, torch.distributions.Distribution):
        return _move_distribution(value, device, dtype)
    return value


def _move_distribution(d: torch.distributions.Distribution, device, dtype):
    """Rebuild a distribution with its tensor parameters moved (analytic references)."""
    params = {}
    for name in d.arg_constraints:
        if name in d.__dict__:
            params[name] = _move(getattr(d, name), device, dtype)
    base = getattr(d, "base_dist", None)
    if isinstance(d, torch.distributions.Independent):
        return torch.distributions.Independent(
            _move_distribution(base, device, dtype), d.reinterpreted_batch_ndims
        )
    # Multivariate normals are stored with one parametrisation; prefer scale_tril.
    if isinstance(d, torch.distributions.MultivariateNormal):
        return type(d)(
            _move(d.loc, device, dtype), scale_tril=_move(d.scale_tril, device, dtype)
        )
    return type(d)(**params)


def _as_float(v: torch.Tensor) -> torch.Tensor:
    """Discrete draws (e.g. mixture assignments) averaged as floats (frequencies)."""
    return v if v.is_floating_point() else v.to(torch.get_default_dtype())


@dataclass
class Reference:
    """A reference posterior over the model's latent sites (in the constrained space).

    ``kind`` is ``"analytic"`` (``analytic`` holds exact per-site posterior distributions, and
    ``draws`` are sampled from them with a fixed seed) or ``"nuts"`` (``draws`` were produced by
    Pyro NUTS and are stored in ``models/references``; ``note`` gives the command that regenerates
    them). ``draws[name]`` has shape ``(num_draws, *site_shape)``.
    """

    kind: str
    draws: dict[str, torch.Tensor]
    analytic: dict[str, torch.distributions.Distribution] | None = None
    note: str = ""

    def mean(self) -> dict[str, torch.Tensor]:
        """Posterior means: exact for analytic references, the draws' mean otherwise."""
        if self.analytic is not None:
            return {k: d.mean for k, d in self.analytic.items()}
        return {k: _as_float(v).mean(0) for k, v in self.draws.items()}

    def variance(self) -> dict[str, torch.Tensor]:
        """Posterior marginal variances: exact for analytic references, from the draws otherwise."""
        if self.analytic is not None:
            return {k: d.variance for k, d in self.analytic.items()}
        return {k: _as_float(v).var(0) for k, v in self.draws.items()}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Reference:
        device = torch.device(device)
        return dataclasses.replace(
            self,
            draws=_move(self.draws, device, dtype),
            analytic=_move(self.analytic, device, dtype) if self.analytic is not None else None,
        )


@dataclass
class ModelSpec:
    """A zoo model with its data, default guide, reference posterior and structural facts.

    Attributes:
        name: registry name (``models.get(name)``).
        model: the Pyro model callable.
        args, kwargs: how to call it on all of its data (tensors on ``device``).
        guide_factory: ``guide_factory(model)`` returns a fresh default guide for that model
            (e.g. ``AutoNormal``, or a hand-written amortised guide for the VAE).
        reference: the reference posterior, or ``None`` with the reason in ``reference_note``.
        latent_sites: ``{name: shape}`` of every latent (non-observed) sample site, constrained
            shapes, without plate batch dims for global sites; local sites include their plate dim.
        max_plate_nesting: how many plates the model nests (for ELBOs and vectorisation).
        discrete_sites: names of latent sites with discrete support.
        data_size: number of rows of the main data plate (``None`` if not applicable).
        supports_subsampling: whether the model takes ``subsample_size=`` for its data plate.
        heldout: ``(args, kwargs)`` of held-out data for predictive log-likelihood, or ``None``.
        shards: for federated models, a list of ``(args, kwargs)`` one per shard (client); each
            shard's kwargs include ``num_total`` so the shard model scales to the full data.
        nonsmooth: ``{site: {"penalty": "l1", "weight": tensor}}`` marks convex nonsmooth prior
            terms (proximal samplers use this; the model's density includes them as usual).
        observed: ``{site: tensor}`` of observed values (for ArviZ ``observed_data``).
        options: the keyword options the spec was built with (e.g. ``num_rows``).
        description: one line for ``pyroforge list``.
        device: where the tensors live.
    """

    name: str
    model: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    guide_factory: Callable[[Callable], Callable] | None = None
    reference: Reference | None = None
    reference_note: str = ""
    latent_sites: dict[str, tuple] = field(default_factory=dict)
    max_plate_nesting: int = 1
    discrete_sites: tuple[str, ...] = ()
    data_size: int | None = None
    supports_subsampling: bool = False
    heldout: tuple[tuple, dict] | None = None
    shards: list[tuple[tuple, dict]] | None = None
    nonsmooth: dict[str, dict] = field(default_factory=dict)
    observed: dict[str, torch.Tensor] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    description: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def make_guide(self) -> Callable:
        """A fresh default guide for this model (``AutoNormal`` unless the spec says otherwise)."""
        if self.guide_factory is None:
            from pyro.infer.autoguide import AutoNormal

            return AutoNormal(self.model)
        return self.guide_factory(self.model)

    def run_model(self, **extra_kwargs):
        """Call the model on its data (``extra_kwargs`` override/add keywords)."""
        return self.model(*self.args, **{**self.kwargs, **extra_kwargs})

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> ModelSpec:
        """A copy with every tensor moved to ``device`` (and floating tensors cast to ``dtype``)."""
        device = resolve_device(device)
        return dataclasses.replace(
            self,
            args=_move(self.args, device, dtype),
            kwargs=_move(self.kwargs, device, dtype),
            reference=self.reference.to(device, dtype) if self.reference is not None else None,
            heldout=_move(self.heldout, device, dtype) if self.heldout is not None else None,
            shards=_move(self.shards, device, dtype) if self.shards is not None else None,
            nonsmooth=_move(self.nonsmooth, device, dtype),
            observed=_move(self.observed, device, dtype),
            device=device,
        )
