"""``linear_regression``: conjugate Bayesian linear regression with known noise, synthetic data.

``w ~ N(0, tau^2 I_d)`` (the first column of ``X`` is the intercept), ``y_n ~ N(x_n^T w, sigma^2)``
with known ``sigma``. The posterior is exact:
``Cov = (I / tau^2 + X^T X / sigma^2)^-1``, ``mean = Cov X^T y / sigma^2``.
Rows are generated with a seeded ``torch.Generator``, so ``num_rows = 10**6`` builds in well
under a second.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ..registry import register
from ..spec import ModelSpec
from ._common import analytic_reference, seeded_generator, strip_plate_dims


def linear_predictor(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``X w`` for ``X`` (n, d) and ``w`` (d,) or batched (*B, 1, d) -> (n,) or (*B, n).

    Computed as ``w @ X.T``: one (B, d) x (d, n) matrix product for batched ``w``, where
    ``X @ w.unsqueeze(-1)`` would broadcast ``X`` to a (*B, n, d) copy."""
    w = strip_plate_dims(w, event_dim=1)
    return w @ X.T


def linear_regression_model(
    X: torch.Tensor,
    y: torch.Tensor,
    prior_scale: torch.Tensor,
    obs_scale: torch.Tensor,
    subsample_size: int | None = None,
) -> None:
    """``w ~ N(0, prior_scale^2 I)``, ``y_n ~ N(X_n w, obs_scale^2)`` (known ``obs_scale``)."""
    d = X.shape[-1]
    w = pyro.sample("w", dist.Normal(X.new_zeros(d), prior_scale).to_event(1))
    with pyro.plate(
        "data", X.shape[0], subsample_size=subsample_size, device=X.device
    ) as idx:
        pyro.sample("y", dist.Normal(linear_predictor(X[idx], w), obs_scale), obs=y[idx])


@register("linear_regression")
def build_linear_regression(
    num_rows: int = 1000,
    dim: int = 5,
    prior_scale: float = 1.0,
    obs_scale: float = 0.5,
    num_heldout: int | None = None,
    seed: int = 0,
) -> ModelSpec:
    """Synthetic linear regression; ``dim`` counts the intercept column.

    ``num_heldout`` extra rows (default ``min(num_rows // 5, 10000)``, at least 1) form the
    held-out split.
    """
    if num_rows < 1 or dim < 1 or num_rows > 10**7:
        raise ValueError(f"linear_regression: need 1 <= num_rows <= 1e7 and dim >= 1, got "
                         f"num_rows={num_rows}, dim={dim}")
    if prior_scale <= 0 or obs_scale <= 0:
        raise ValueError("linear_regression: prior_scale and obs_scale must be > 0")
    if num_heldout is None:
        num_heldout = max(1, min(num_rows // 5, 10_000))
    gen = seeded_generator(seed)
    total = num_rows + num_heldout
    X = torch.randn(total, dim, generator=gen)
    X[:, 0] = 1.0
    w_true = prior_scale * torch.randn(dim, generator=gen)
    y = X @ w_true + obs_scale * torch.randn(total, generator=gen)
    X_train, y_train = X[:num_rows].contiguous(), y[:num_rows].contiguous()
    X_test, y_test = X[num_rows:].contiguous(), y[num_rows:].contiguous()

    Xd, yd = X_train.double(), y_train.double()
    precision = torch.eye(dim, dtype=torch.float64) / prior_scale**2 + Xd.T @ Xd / obs_scale**2
    cov = torch.cholesky_inverse(torch.linalg.cholesky(precision))
    cov = (cov + cov.T) / 2
    mean = cov @ (Xd.T @ yd) / obs_scale**2
    reference = analytic_reference(
        {"w": dist.MultivariateNormal(mean, covariance_matrix=cov)},
        "exact: MVN with precision I/tau^2 + X^T X/sigma^2; draws are 4000 seeded samples",
    )
    scales = {"prior_scale": torch.tensor(float(prior_scale)),
              "obs_scale": torch.tensor(float(obs_scale))}
    return ModelSpec(
        name="linear_regression",
        model=linear_regression_model,
        args=(X_train, y_train),
        kwargs=dict(scales),
        reference=reference,
        reference_note=reference.note,
        latent_sites={"w": (dim,)},
        max_plate_nesting=1,
        data_size=num_rows,
        supports_subsampling=True,
        heldout=((X_test, y_test), dict(scales)),
        observed={"y": y_train},
        options={"num_rows": num_rows, "dim": dim, "prior_scale": prior_scale,
                 "obs_scale": obs_scale, "num_heldout": num_heldout, "seed": seed,
                 "true_w": w_true.tolist()},
        description=(
            "w ~ N(0, tau^2 I) (intercept = column 0), y ~ N(X w, sigma^2) with known sigma; "
            "synthetic, num_rows up to 1e6; exact MVN posterior. Default guide: AutoNormal."
        ),
    )
