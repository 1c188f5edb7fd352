"""Logistic regressions: ``logistic_regression`` (Wisconsin breast cancer, Gaussian prior),
``logistic_regression_synthetic`` (size-configurable) and ``sparse_logistic`` (Laplace prior).

Data: the Wisconsin diagnostic breast cancer table (569 rows, 30 features; label 1 = benign),
split 80/20 into train/held-out with a fixed seed, features standardised with the training
mean and standard deviation. See ``models/data/README.md`` for provenance.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from ..registry import register
from ..spec import ModelSpec
from ._common import (
    load_reference,
    load_table,
    seeded_generator,
    standardise,
    strip_plate_dims,
)
from .linear_regression import linear_predictor

HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


def breast_cancer(with_intercept: bool = True) -> tuple[torch.Tensor, ...]:
    """``(X_train, y_train, X_heldout, y_heldout)``: standardised features (float32), labels
    as float 0/1; column 0 is the intercept when ``with_intercept``."""
    X_train, y_train, X_test, y_test = load_table("breast_cancer.npz", (569, 30),
                                                  HELDOUT_FRACTION, SPLIT_SEED)
    X_train, X_test = standardise(X_train, X_test)
    if with_intercept:
        X_train = torch.cat([torch.ones(len(X_train), 1, dtype=X_train.dtype), X_train], -1)
        X_test = torch.cat([torch.ones(len(X_test), 1, dtype=X_test.dtype), X_test], -1)
    return X_train.float(), y_train.float(), X_test.float(), y_test.float()


def logistic_model(
    X: torch.Tensor, y: torch.Tensor, prior_scale: torch.Tensor, subsample_size: int | None = None
) -> None:
    """``w ~ N(0, diag(prior_scale^2))``, ``y_n ~ Bernoulli(sigmoid(X_n w))``."""
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), prior_scale).to_event(1))
    with pyro.plate(
        "data", X.shape[0], subsample_size=subsample_size, device=X.device
    ) as idx:
        pyro.sample("y", dist.Bernoulli(logits=linear_predictor(X[idx], w)), obs=y[idx])


@register("logistic_regression")
def build_logistic_regression(prior_scale: float = 1.0, with_reference: bool = True) -> ModelSpec:
    """Breast-cancer logistic regression, 455 training rows, 31 weights (intercept first)."""
    if prior_scale <= 0:
        raise ValueError(f"logistic_regression: prior_scale={prior_scale} must be > 0")
    X, y, X_test, y_test = breast_cancer()
    d = X.shape[-1]
    kw = {"prior_scale": torch.full((d,), float(prior_scale))}
    ref_options = {"prior_scale": prior_scale}
    reference, note = load_reference("logistic_regression", ref_options, enabled=with_reference)
    return ModelSpec(
        name="logistic_regression",
        model=logistic_model,
        args=(X, y),
        kwargs=dict(kw),
        reference=reference,
        reference_note=note,
        latent_sites={"w": (d,)},
        max_plate_nesting=1,
        data_size=X.shape[0],
        supports_subsampling=True,
        heldout=((X_test, y_test), dict(kw)),
        observed={"y": y},
        options={"prior_scale": prior_scale, "with_reference": with_reference,
                 "reference_options": ref_options},
        description=(
            "Logistic regression on the Wisconsin breast-cancer table (455 train / 114 held-out "
            "rows, 30 standardised features + intercept), w ~ N(0, I). Default guide: AutoNormal."
        ),
    )


@register("logistic_regression_synthetic")
def build_logistic_regression_synthetic(
    num_rows: int = 1000,
    dim: int = 10,
    prior_scale: float = 1.0,
    num_heldout: int | None = None,
    seed: int = 0,
) -> ModelSpec:
    """The ``logistic_regression`` model on synthetic data of any size (``dim`` includes the
    intercept). True weights are ``2 / sqrt(dim)`` x standard normal, so logits have sd ~ 2."""
    if num_rows < 1 or dim < 1 or num_rows > 10**7:
        raise ValueError(f"logistic_regression_synthetic: need 1 <= num_rows <= 1e7 and dim >= 1, "
                         f"got num_rows={num_rows}, dim={dim}")
    if prior_scale <= 0:
        raise ValueError(f"logistic_regression_synthetic: prior_scale={prior_scale} must be > 0")
    if num_heldout is None:
        num_heldout = max(1, min(num_rows // 5, 10_000))
    gen = seeded_generator(seed)
    total = num_rows + num_heldout
    X = torch.randn(total, dim, generator=gen)
    X[:, 0] = 1.0
    w_true = 2.0 / math.sqrt(dim) * torch.randn(dim, generator=gen)
    y = torch.bernoulli(torch.sigmoid(X @ w_true), generator=gen)
    kw = {"prior_scale": torch.full((dim,), float(prior_scale))}
    X_train, y_train = X[:num_rows].contiguous(), y[:num_rows].contiguous()
    return ModelSpec(
        name="logistic_regression_synthetic",
        model=logistic_model,
        args=(X_train, y_train),
        kwargs=dict(kw),
        reference=None,
        reference_note=(
            "no reference: the posterior has no closed form and changes with num_rows/dim/seed; "
            "use logistic_regression (stored NUTS draws) for accuracy checks, this one for scaling"
        ),
        latent_sites={"w": (dim,)},
        max_plate_nesting=1,
        data_size=num_rows,
        supports_subsampling=True,
        heldout=((X[num_rows:].contiguous(), y[num_rows:].contiguous()), dict(kw)),
        observed={"y": y_train},
        options={"num_rows": num_rows, "dim": dim, "prior_scale": prior_scale,
                 "num_heldout": num_heldout, "seed": seed, "true_w": w_true.tolist()},
        description=(
            "Logistic regression on synthetic Gaussian features (num_rows up to 1e6, dim incl. "
            "intercept), w ~ N(0, I); for scaling studies. Default guide: AutoNormal."
        ),
    )


# ----------------------------------------------------------------------------- sparse_logistic


def sparse_logistic_model(
    X: torch.Tensor,
    y: torch.Tensor,
    laplace_scale: torch.Tensor,
    intercept_scale: torch.Tensor,
    subsample_size: int | None = None,
) -> None:
    """``intercept ~ N(0, s^2)``, ``beta_j ~ Laplace(0, b_j)``, ``y ~ Bernoulli(sigmoid(X beta +
    intercept))``. The Laplace log-density is ``-|beta_j| / b_j - log(2 b_j)``: its nonsmooth
    part is the weighted l1 penalty ``sum_j |beta_j| / b_j``."""
    intercept = pyro.sample("intercept", dist.Normal(X.new_zeros(()), intercept_scale))
    beta = pyro.sample(
        "beta", dist.Laplace(X.new_zeros(X.shape[-1]), laplace_scale).to_event(1)
    )
    intercept = strip_plate_dims(intercept, event_dim=0).unsqueeze(-1)
    with pyro.plate(
        "data", X.shape[0], subsample_size=subsample_size, device=X.device
    ) as idx:
        logits = linear_predictor(X[idx], beta) + intercept
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[idx])


@register("sparse_logistic")
def build_sparse_logistic(laplace_scale: float = 0.25, with_reference: bool = True) -> ModelSpec:
    """Breast-cancer logistic regression with a Laplace(0, b) prior on the 30 feature weights."""
    if laplace_scale <= 0:
        raise ValueError(f"sparse_logistic: laplace_scale={laplace_scale} must be > 0")
    X, y, X_test, y_test = breast_cancer(with_intercept=False)
    d = X.shape[-1]
    b = torch.full((d,), float(laplace_scale))
    kw = {"laplace_scale": b, "intercept_scale": torch.tensor(5.0)}
    ref_options = {"laplace_scale": laplace_scale}
    reference, note = load_reference("sparse_logistic", ref_options, enabled=with_reference)
    return ModelSpec(
        name="sparse_logistic",
        model=sparse_logistic_model,
        args=(X, y),
        kwargs=dict(kw),
        reference=reference,
        reference_note=note,
        latent_sites={"intercept": (), "beta": (d,)},
        max_plate_nesting=1,
        data_size=X.shape[0],
        supports_subsampling=True,
        heldout=((X_test, y_test), dict(kw)),
        nonsmooth={"beta": {"penalty": "l1", "weight": 1.0 / b}},
        observed={"y": y},
        options={"laplace_scale": laplace_scale, "with_reference": with_reference,
                 "reference_options": ref_options},
        description=(
            "Sparse logistic regression on the breast-cancer table: intercept ~ N(0, 5^2), "
            "beta ~ Laplace(0, b) (30 weights; nonsmooth l1 term, weight 1/b, marked for "
            "proximal samplers). Default guide: AutoNormal."
        ),
    )
