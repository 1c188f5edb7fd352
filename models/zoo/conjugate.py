"""Conjugate models with exact posteriors: ``gaussian_conjugate``, ``gamma_poisson``,
``dirichlet_multinomial``.

Each has a hand-written default guide in the conjugate family, built from ``pyro.param`` sites
with fixed names, so variational tests can evaluate closed-form ELBOs and gradients and can set
the guide exactly to the posterior (``pyro.param(name, value)`` before the first guide call).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ..registry import register
from ..spec import ModelSpec
from ._common import analytic_reference, seeded_generator

# ----------------------------------------------------------------------------- gaussian_conjugate


def gaussian_conjugate_model(
    x: torch.Tensor,
    prior_loc: torch.Tensor,
    prior_scale_tril: torch.Tensor,
    obs_scale_tril: torch.Tensor,
    subsample_size: int | None = None,
) -> None:
    """``mu ~ MVN(m0, S0)``, ``x_i ~ MVN(mu, Sigma)`` with known ``Sigma`` (Cholesky factors)."""
    mu = pyro.sample("mu", dist.MultivariateNormal(prior_loc, scale_tril=prior_scale_tril))
    # ``mu`` is (d,) or (*B, 1, d): its batch dims already line up with the data plate at -1.
    with pyro.plate(
        "data", x.shape[0], subsample_size=subsample_size, device=x.device
    ) as idx:
        pyro.sample("x", dist.MultivariateNormal(mu, scale_tril=obs_scale_tril), obs=x[idx])


def gaussian_conjugate_guide(
    x: torch.Tensor,
    prior_loc: torch.Tensor,
    prior_scale_tril: torch.Tensor,
    obs_scale_tril: torch.Tensor,
    subsample_size: int | None = None,
) -> None:
    """``q(mu) = MVN(mu_loc, scale_tril=mu_scale_tril)``, initialised at the prior."""
    loc = pyro.param("mu_loc", lambda: prior_loc.detach().clone())
    scale_tril = pyro.param(
        "mu_scale_tril", lambda: prior_scale_tril.detach().clone(),
        constraint=constraints.lower_cholesky,
    )
    pyro.sample("mu", dist.MultivariateNormal(loc, scale_tril=scale_tril))


def _gaussian_guide_factory(model):
    return gaussian_conjugate_guide


def _random_spd(d: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    """A well-conditioned random SPD matrix (float64) with eigenvalues around ``scale**2``."""
    a = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    return scale**2 * (0.5 * torch.eye(d, dtype=torch.float64) + a @ a.T / 2)


@register("gaussian_conjugate")
def build_gaussian_conjugate(dim: int = 3, num_obs: int = 20, seed: int = 0) -> ModelSpec:
    """Vector Gaussian mean with a full-covariance Gaussian prior and known noise covariance."""
    if dim < 1 or num_obs < 1:
        raise ValueError(f"gaussian_conjugate: dim={dim} and num_obs={num_obs} must be >= 1")
    gen = seeded_generator(seed)
    m0 = torch.zeros(dim, dtype=torch.float64)
    S0 = _random_spd(dim, gen, 2.0)
    Sigma = _random_spd(dim, gen, 1.0)
    mu_true = m0 + torch.linalg.cholesky(S0) @ torch.randn(dim, generator=gen, dtype=torch.float64)
    L_sigma = torch.linalg.cholesky(Sigma)
    x = mu_true + torch.randn(num_obs, dim, generator=gen, dtype=torch.float64) @ L_sigma.T
    x = x.float().double()  # the posterior is exact for the float32 data the model sees

    # Posterior precision P = S0^-1 + N Sigma^-1, mean = P^-1 (S0^-1 m0 + Sigma^-1 sum_i x_i).
    S0_inv, Sigma_inv = torch.linalg.inv(S0), torch.linalg.inv(Sigma)
    post_cov = torch.linalg.inv(S0_inv + num_obs * Sigma_inv)
    post_cov = (post_cov + post_cov.T) / 2
    post_mean = post_cov @ (S0_inv @ m0 + Sigma_inv @ x.sum(0))
    posterior = dist.MultivariateNormal(post_mean, covariance_matrix=post_cov)
    reference = analytic_reference(
        {"mu": posterior},
        "exact: MVN with precision S0^-1 + N Sigma^-1; draws are 4000 seeded samples from it",
    )
    x32 = x.float()
    return ModelSpec(
        name="gaussian_conjugate",
        model=gaussian_conjugate_model,
        args=(x32,),
        kwargs={
            "prior_loc": m0.float(),
            "prior_scale_tril": torch.linalg.cholesky(S0).float(),
            "obs_scale_tril": L_sigma.float(),
        },
        guide_factory=_gaussian_guide_factory,
        reference=reference,
        reference_note=reference.note,
        latent_sites={"mu": (dim,)},
        max_plate_nesting=1,
        data_size=num_obs,
        supports_subsampling=True,
        observed={"x": x32},
        options={"dim": dim, "num_obs": num_obs, "seed": seed},
        description=(
            "mu ~ MVN(m0, S0) in R^dim, x_i ~ MVN(mu, Sigma) with known full covariances; exact "
            "MVN posterior. Default guide: MVN with params 'mu_loc', 'mu_scale_tril' "
            "(lower_cholesky), initialised at the prior."
        ),
    )


# ----------------------------------------------------------------------------- gamma_poisson


def gamma_poisson_model(x: torch.Tensor, subsample_size: int | None = None) -> None:
    """``rate ~ Gamma(1, 1)``, ``x_i ~ Poisson(rate)``."""
    one = x.new_ones(())
    rate = pyro.sample("rate", dist.Gamma(one, one))
    with pyro.plate(
        "data", x.shape[0], subsample_size=subsample_size, device=x.device
    ) as idx:
        pyro.sample("x", dist.Poisson(rate), obs=x[idx])


def gamma_poisson_guide(x: torch.Tensor, subsample_size: int | None = None) -> None:
    """``q(rate) = Gamma(a, b)`` with positive params ``a`` (shape) and ``b`` (rate), both 1 at
    initialisation (the prior)."""
    a = pyro.param("a", lambda: x.new_ones(()), constraint=constraints.positive)
    b = pyro.param("b", lambda: x.new_ones(()), constraint=constraints.positive)
    pyro.sample("rate", dist.Gamma(a, b))


def _gamma_guide_factory(model):
    return gamma_poisson_guide


@register("gamma_poisson")
def build_gamma_poisson(num_obs: int = 20, true_rate: float = 3.0, seed: int = 0) -> ModelSpec:
    """Poisson counts with a Gamma(1, 1) prior on the rate; posterior Gamma(1 + sum x, 1 + N)."""
    if num_obs < 1 or true_rate <= 0:
        raise ValueError(f"gamma_poisson: need num_obs >= 1 and true_rate > 0, got "
                         f"num_obs={num_obs}, true_rate={true_rate}")
    gen = seeded_generator(seed)
    x = torch.poisson(torch.full((num_obs,), float(true_rate), dtype=torch.float64), generator=gen)
    posterior = dist.Gamma(1.0 + x.sum(), torch.tensor(1.0 + num_obs, dtype=torch.float64))
    reference = analytic_reference(
        {"rate": posterior}, "exact: Gamma(1 + sum x, 1 + N); draws are 4000 seeded samples"
    )
    x32 = x.float()
    return ModelSpec(
        name="gamma_poisson",
        model=gamma_poisson_model,
        args=(x32,),
        guide_factory=_gamma_guide_factory,
        reference=reference,
        reference_note=reference.note,
        latent_sites={"rate": ()},
        max_plate_nesting=1,
        data_size=num_obs,
        supports_subsampling=True,
        observed={"x": x32},
        options={"num_obs": num_obs, "true_rate": true_rate, "seed": seed,
                 "sum_x": float(x.sum())},
        description=(
            "rate ~ Gamma(1, 1), x_i ~ Poisson(rate); exact Gamma(1 + sum x, 1 + N) posterior. "
            "Default guide: Gamma(a, b) with positive params 'a' (shape), 'b' (rate), init 1, 1; "
            "its ELBO gradient is closed form (A = sum x, B = N + 1): d/da = (A + 1 - a) "
            "trigamma(a) - B/b + 1, d/db = -A/b + B a/b^2 - 1/b."
        ),
    )


# ----------------------------------------------------------------------------- dirichlet_multinomial


def dirichlet_multinomial_model(
    counts: torch.Tensor,
    concentration: torch.Tensor,
    total_count: int,
    subsample_size: int | None = None,
) -> None:
    """``probs ~ Dirichlet(alpha0)`` on the K-simplex, ``counts_i ~ Multinomial(n, probs)``."""
    probs = pyro.sample("probs", dist.Dirichlet(concentration))
    with pyro.plate(
        "data", counts.shape[0], subsample_size=subsample_size, device=counts.device
    ) as idx:
        pyro.sample("counts", dist.Multinomial(total_count, probs), obs=counts[idx])


def dirichlet_multinomial_guide(
    counts: torch.Tensor,
    concentration: torch.Tensor,
    total_count: int,
    subsample_size: int | None = None,
) -> None:
    """``q(probs) = Dirichlet(q_concentration)``, a positive param initialised at the prior's."""
    conc = pyro.param(
        "q_concentration", lambda: concentration.detach().clone(),
        constraint=constraints.positive,
    )
    pyro.sample("probs", dist.Dirichlet(conc))


def _dirichlet_guide_factory(model):
    return dirichlet_multinomial_guide


@register("dirichlet_multinomial")
def build_dirichlet_multinomial(
    num_categories: int = 5, num_obs: int = 10, total_count: int = 20, prior_concentration: float = 1.0,
    seed: int = 0,
) -> ModelSpec:
    """Multinomial counts with a symmetric Dirichlet prior; Dirichlet(alpha0 + sum counts) post."""
    if num_categories < 2 or num_obs < 1 or total_count < 1 or prior_concentration <= 0:
        raise ValueError(
            "dirichlet_multinomial: need num_categories >= 2, num_obs >= 1, total_count >= 1, "
            f"prior_concentration > 0; got {num_categories}, {num_obs}, {total_count}, "
            f"{prior_concentration}"
        )
    gen = seeded_generator(seed)
    # Uneven true probabilities so the posterior is far from the symmetric prior.
    true_probs = torch.linspace(1.0, 3.0, num_categories, dtype=torch.float64) ** 2
    true_probs = true_probs / true_probs.sum()
    draws = torch.multinomial(true_probs, num_obs * total_count, replacement=True, generator=gen)
    counts = torch.nn.functional.one_hot(draws.view(num_obs, total_count), num_categories)
    counts = counts.sum(1).double()
    alpha0 = torch.full((num_categories,), float(prior_concentration), dtype=torch.float64)
    posterior = dist.Dirichlet(alpha0 + counts.sum(0))
    reference = analytic_reference(
        {"probs": posterior}, "exact: Dirichlet(alpha0 + sum_i counts_i); 4000 seeded draws"
    )
    counts32 = counts.float()
    return ModelSpec(
        name="dirichlet_multinomial",
        model=dirichlet_multinomial_model,
        args=(counts32,),
        kwargs={"concentration": alpha0.float(), "total_count": int(total_count)},
        guide_factory=_dirichlet_guide_factory,
        reference=reference,
        reference_note=reference.note,
        latent_sites={"probs": (num_categories,)},
        max_plate_nesting=1,
        data_size=num_obs,
        supports_subsampling=True,
        observed={"counts": counts32},
        options={"num_categories": num_categories, "num_obs": num_obs,
                 "total_count": total_count, "prior_concentration": prior_concentration,
                 "seed": seed},
        description=(
            "probs ~ Dirichlet(alpha0) on the K-simplex, counts_i ~ Multinomial(n, probs); exact "
            "Dirichlet posterior. Default guide: Dirichlet with positive param "
            "'q_concentration', initialised at alpha0."
        ),
    )
