"""``federated_blobs``: a Gaussian-mean model whose data sit on non-iid shards (clients).

Model: ``theta ~ N(0, s0^2 I_d)``, ``x_n ~ N(theta, sigma^2 I_d)`` with known ``sigma``.
Data: shard ``k`` draws its rows around its own centre ``c_k`` (the centres lie on a circle of
radius ``spread`` around a common point), so each shard alone points to a different ``theta``
while the full-data posterior is the exact diagonal Gaussian with precision
``1/s0^2 + N/sigma^2`` and mean ``(sum_n x_n / sigma^2) / precision``.

Shard structure (for DSGLD/FSGLD-style methods)
-----------------------------------------------
The same model function runs on every shard; only its data and ``num_total`` change:

* ``model(x_k, **kw, num_total=N)`` (``spec.shards[k]``): log prior + ``(N / N_k)`` x shard-k
  log-likelihood, the shard's unbiased stand-in for the full log joint (DSGLD's local target);
* ``model(x_k, **kw)`` (``num_total=None``): prior x shard-k likelihood, the shard-only posterior;
* the shard-k log-likelihood alone is the observed site ``"x"`` of a trace of the shard model with
  ``num_total=None`` (``trace.nodes["x"]["fn"].log_prob(...)``, or ``log_prob_sum`` of that site).

``spec.options["shard_sizes"]`` lists ``N_k`` and ``spec.options["shard_centres"]`` the centres.
``subsample_size`` still subsamples inside a shard (Pyro rescales by ``N_k / B``, then the
``num_total`` factor applies on top).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from ..registry import register
from ..spec import ModelSpec
from ._common import analytic_reference, seeded_generator


def federated_blobs_model(
    x: torch.Tensor,
    prior_scale: torch.Tensor,
    obs_scale: torch.Tensor,
    num_total: int | None = None,
    subsample_size: int | None = None,
) -> None:
    """``theta ~ N(0, prior_scale^2 I)``; ``x_n ~ N(theta, obs_scale^2 I)``.

    With ``num_total`` the likelihood of these rows is scaled by ``num_total / len(x)``.
    """
    d = x.shape[-1]
    theta = pyro.sample("theta", dist.Normal(x.new_zeros(d), prior_scale).to_event(1))
    scale = 1.0 if num_total is None else float(num_total) / x.shape[0]
    with (
        poutine.scale(scale=scale),
        pyro.plate(
            "data", x.shape[0], subsample_size=subsample_size, device=x.device
        ) as idx,
    ):
        pyro.sample("x", dist.Normal(theta, obs_scale).to_event(1), obs=x[idx])


@register("federated_blobs")
def build_federated_blobs(
    num_shards: int = 4,
    dim: int = 2,
    num_per_shard: int = 50,
    shard_sizes: list[int] | None = None,
    spread: float = 3.0,
    prior_scale: float = 5.0,
    obs_scale: float = 1.0,
    seed: int = 0,
) -> ModelSpec:
    """Non-iid Gaussian blobs split over ``num_shards`` clients of unequal sizes.

    By default shard ``k`` holds ``num_per_shard + k * num_per_shard // 2`` rows; pass
    ``shard_sizes`` to choose them.
    """
    if num_shards < 1 or dim < 1:
        raise ValueError(f"federated_blobs: need num_shards >= 1 and dim >= 1, got "
                         f"num_shards={num_shards}, dim={dim}")
    if shard_sizes is None:
        shard_sizes = [num_per_shard + k * num_per_shard // 2 for k in range(num_shards)]
    shard_sizes = [int(s) for s in shard_sizes]
    if len(shard_sizes) != num_shards or min(shard_sizes) < 1:
        raise ValueError(f"federated_blobs: shard_sizes={shard_sizes} must have num_shards="
                         f"{num_shards} entries, each >= 1")
    if prior_scale <= 0 or obs_scale <= 0:
        raise ValueError("federated_blobs: prior_scale and obs_scale must be > 0")
    gen = seeded_generator(seed)
    base = torch.randn(dim, generator=gen, dtype=torch.float64)
    if dim == 1:
        directions = torch.tensor([[(-1.0) ** k] for k in range(num_shards)], dtype=torch.float64)
    else:
        angles = torch.tensor([2 * math.pi * k / num_shards for k in range(num_shards)],
                              dtype=torch.float64)
        directions = torch.zeros(num_shards, dim, dtype=torch.float64)
        directions[:, 0], directions[:, 1] = angles.cos(), angles.sin()
    centres = base + spread * directions
    shards_x = [
        (c + obs_scale * torch.randn(n, dim, generator=gen, dtype=torch.float64)).float()
        for c, n in zip(centres, shard_sizes)
    ]
    x = torch.cat(shards_x)
    N = x.shape[0]

    xd = x.double()
    precision = 1.0 / prior_scale**2 + N / obs_scale**2
    post_mean = (xd.sum(0) / obs_scale**2) / precision
    post_tril = torch.eye(dim, dtype=torch.float64) / math.sqrt(precision)
    reference = analytic_reference(
        {"theta": dist.MultivariateNormal(post_mean, scale_tril=post_tril)},
        "exact (full data): MVN, diagonal covariance I / (1/s0^2 + N/sigma^2); 4000 seeded draws",
    )
    kw = {"prior_scale": torch.tensor(float(prior_scale)),
          "obs_scale": torch.tensor(float(obs_scale))}
    shards = [((xs,), {**kw, "num_total": N}) for xs in shards_x]
    return ModelSpec(
        name="federated_blobs",
        model=federated_blobs_model,
        args=(x,),
        kwargs=dict(kw),
        reference=reference,
        reference_note=reference.note,
        latent_sites={"theta": (dim,)},
        max_plate_nesting=1,
        data_size=N,
        supports_subsampling=True,
        shards=shards,
        observed={"x": x},
        options={"num_shards": num_shards, "dim": dim, "shard_sizes": shard_sizes,
                 "shard_centres": centres.tolist(), "spread": spread,
                 "prior_scale": prior_scale, "obs_scale": obs_scale, "seed": seed},
        description=(
            "theta ~ N(0, s0^2 I), x ~ N(theta, sigma^2 I) on non-iid shards (one blob per "
            "client, unequal sizes); spec.shards[k] = ((x_k,), {..., num_total: N}) runs the same "
            "model with the shard likelihood scaled by N/N_k (num_total=None: shard-only "
            "posterior). Exact MVN posterior. Default guide: AutoNormal."
        ),
    )
