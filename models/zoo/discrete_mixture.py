"""``discrete_mixture``: a 1-D Gaussian mixture with a discrete assignment per data point.

``weights ~ Dirichlet(1_K)``; ``locs`` is an *ordered* vector (support ``ordered_vector``):
``locs = T(u)`` with Pyro's ``OrderedTransform`` (``locs_0 = u_0``, ``locs_k = locs_{k-1} +
exp(u_k)``) and ``u_0 ~ N(m_0, 1)``, ``u_k ~ N(log 4, 0.5^2)`` (gaps of about 4); then
``z_n ~ Categorical(weights)``, ``x_n ~ N(locs[z_n], sigma^2)`` with known ``sigma``. The ordering
removes label switching, so the posterior of the continuous latents is unimodal (with an
unordered prior, chains started at random get stuck in the label-swapped mode). ``z`` is the discrete site (``discrete_sites=("z",)``); the model does *not* mark it for
enumeration, so VI users choose per-site estimators (wrap with ``pyro.infer.config_enumerate`` to
enumerate it, as the reference generator does).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

from ..registry import register
from ..spec import ModelSpec
from ._common import load_reference, seeded_generator


def discrete_mixture_model(
    x: torch.Tensor,
    weight_concentration: torch.Tensor,
    loc_prior_loc: torch.Tensor,
    loc_prior_scale: torch.Tensor,
    obs_scale: torch.Tensor,
    subsample_size: int | None = None,
) -> None:
    """Mixture of ``K`` Gaussians with a per-point assignment ``z`` in the ``data`` plate."""
    weights = pyro.sample("weights", dist.Dirichlet(weight_concentration))
    locs = pyro.sample("locs", ordered_prior(loc_prior_loc, loc_prior_scale))
    with pyro.plate(
        "data", x.shape[0], subsample_size=subsample_size, device=x.device
    ) as idx:
        z = pyro.sample("z", dist.Categorical(weights))
        # Vindex broadcasts the batch dims of ``locs`` (plain, particle or enumeration dims)
        # against those of ``z``.
        pyro.sample("x", dist.Normal(Vindex(locs)[..., z], obs_scale), obs=x[idx])


def ordered_prior(base_loc: torch.Tensor, base_scale: torch.Tensor) -> dist.Distribution:
    """``OrderedTransform`` of ``N(base_loc, base_scale^2)``: a distribution on ordered vectors."""
    return dist.TransformedDistribution(
        dist.Normal(base_loc, base_scale).to_event(1), dist.transforms.OrderedTransform()
    )


def discrete_mixture_guide(
    x: torch.Tensor,
    weight_concentration: torch.Tensor,
    loc_prior_loc: torch.Tensor,
    loc_prior_scale: torch.Tensor,
    obs_scale: torch.Tensor,
    subsample_size: int | None = None,
) -> None:
    """Mean-field guide: ``Dirichlet(weights_concentration)``; for ``locs`` the ordered transform
    of ``N(locs_loc, locs_scale^2)`` (params in the unconstrained ``u`` space, init at the prior's
    base); a per-point ``Categorical(z_probs[n])`` (param ``z_probs`` (N, K), init uniform).
    """
    K = loc_prior_loc.shape[-1]
    conc = pyro.param("weights_concentration", lambda: weight_concentration.detach().clone(),
                      constraint=constraints.positive)
    loc = pyro.param("locs_loc", lambda: loc_prior_loc.detach().clone())
    scale = pyro.param("locs_scale", lambda: 0.5 * loc_prior_scale.detach().clone(),
                       constraint=constraints.positive)
    z_probs = pyro.param("z_probs", lambda: x.new_full((x.shape[0], K), 1.0 / K),
                         constraint=constraints.simplex)
    pyro.sample("weights", dist.Dirichlet(conc))
    pyro.sample("locs", ordered_prior(loc, scale))
    with pyro.plate(
        "data", x.shape[0], subsample_size=subsample_size, device=x.device
    ) as idx:
        pyro.sample("z", dist.Categorical(z_probs[idx]))


def _guide_factory(model):
    return discrete_mixture_guide


def assignment_posterior(
    x: torch.Tensor, weights: torch.Tensor, locs: torch.Tensor, obs_scale: torch.Tensor
) -> torch.Tensor:
    """``p(z_n = k | weights, locs, x_n)`` for draws ``weights, locs`` (S, K) -> (S, N, K)."""
    log_p = weights.log().unsqueeze(-2) + dist.Normal(locs.unsqueeze(-2), obs_scale).log_prob(
        x.unsqueeze(-1)
    )
    return torch.softmax(log_p, -1)


@register("discrete_mixture")
def build_discrete_mixture(
    num_components: int = 2, num_obs: int = 50, seed: int = 0, with_reference: bool = True
) -> ModelSpec:
    """A well-separated ``num_components``-component 1-D mixture with ``num_obs`` points."""
    if num_components < 2 or num_obs < 1:
        raise ValueError(f"discrete_mixture: need num_components >= 2 and num_obs >= 1, got "
                         f"{num_components}, {num_obs}")
    K = num_components
    gen = seeded_generator(seed)
    centres = 4.0 * (torch.arange(K, dtype=torch.float32) - (K - 1) / 2)
    base_loc = torch.full((K,), math.log(4.0))
    base_loc[0] = centres[0]
    base_scale = torch.full((K,), 0.5)
    base_scale[0] = 1.0
    true_weights = torch.linspace(1.0, 2.0, K)
    true_weights = true_weights / true_weights.sum()
    obs_scale = 1.0
    z = torch.multinomial(true_weights, num_obs, replacement=True, generator=gen)
    x = centres[z] + obs_scale * torch.randn(num_obs, generator=gen)
    kwargs = {
        "weight_concentration": torch.ones(K),
        "loc_prior_loc": base_loc,
        "loc_prior_scale": base_scale,
        "obs_scale": torch.tensor(obs_scale),
    }
    options = {"num_components": num_components, "num_obs": num_obs, "seed": seed}
    reference, note = load_reference("discrete_mixture", options, enabled=with_reference)
    return ModelSpec(
        name="discrete_mixture",
        model=discrete_mixture_model,
        args=(x,),
        kwargs=kwargs,
        guide_factory=_guide_factory,
        reference=reference,
        reference_note=note,
        latent_sites={"weights": (K,), "locs": (K,), "z": (num_obs,)},
        max_plate_nesting=1,
        discrete_sites=("z",),
        data_size=num_obs,
        supports_subsampling=True,
        observed={"x": x},
        options={**options, "true_z": z.tolist(), "with_reference": with_reference,
                 "reference_options": options},
        description=(
            "1-D Gaussian mixture: weights ~ Dirichlet(1), ordered locs (first ~ N(m_0, 1), "
            "log-gaps ~ N(log 4, 0.5^2)), "
            "z_n ~ Categorical(weights) (discrete, per point), x_n ~ N(locs[z_n], 1). "
            "Default guide: Dirichlet('weights_concentration') x ordered-transformed Normal("
            "'locs_loc', 'locs_scale') x Categorical('z_probs'[n]) per point. Reference: NUTS with z "
            "enumerated; z draws from p(z | weights, locs, x)."
        ),
    )
