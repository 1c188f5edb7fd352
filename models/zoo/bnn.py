"""``bnn_regression``: a one-hidden-layer Bayesian neural network on the diabetes table.

Data: 442 patients, 10 baseline variables, target = disease progression after one year
(Efron et al. 2004; see ``models/data/README.md``). Split 80/20 (fixed seed) into train/held-out;
features and target are standardised with the training mean and standard deviation.

Model (``H`` tanh units)::

    w1 ~ N(0, 1) (10, H),  b1 ~ N(0, 1) (H,),  w2 ~ N(0, 1/H) (H,),  b2 ~ N(0, 1),
    sigma ~ HalfNormal(1),  y_n ~ N(w2 . tanh(x_n w1 + b1) + b2, sigma^2)
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from ..registry import register
from ..spec import ModelSpec
from ._common import load_reference, load_table, standardise, strip_plate_dims

HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


def diabetes() -> tuple[torch.Tensor, ...]:
    """``(X_train, y_train, X_heldout, y_heldout)``, standardised with training statistics."""
    X_train, y_train, X_test, y_test = load_table("diabetes.npz", (442, 10), HELDOUT_FRACTION,
                                                  SPLIT_SEED)
    X_train, X_test = standardise(X_train, X_test)
    y_train, y_test = standardise(y_train, y_test)
    return X_train.float(), y_train.float(), X_test.float(), y_test.float()


def bnn_forward(
    X: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """Network output for ``X`` (n, d) and plain or batched (Pyro layout) weights -> (*B, n)."""
    w1 = strip_plate_dims(w1, 2)  # (*B, d, H)
    b1 = strip_plate_dims(b1, 1)  # (*B, H)
    w2 = strip_plate_dims(w2, 1)  # (*B, H)
    b2 = strip_plate_dims(b2, 0).unsqueeze(-1)  # (*B, 1)
    hidden = torch.tanh(X @ w1 + b1.unsqueeze(-2))  # (*B, n, H)
    return (hidden @ w2.unsqueeze(-1)).squeeze(-1) + b2


def bnn_model(
    X: torch.Tensor, y: torch.Tensor, num_hidden: int = 10, subsample_size: int | None = None
) -> None:
    """One hidden layer of ``num_hidden`` tanh units, Gaussian priors, HalfNormal noise scale."""
    d, H = X.shape[-1], num_hidden
    zero, one = X.new_zeros(()), X.new_ones(())
    w1 = pyro.sample("w1", dist.Normal(zero, one).expand([d, H]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(zero, one).expand([H]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(zero, one / math.sqrt(H)).expand([H]).to_event(1))
    b2 = pyro.sample("b2", dist.Normal(zero, one))
    sigma = pyro.sample("sigma", dist.HalfNormal(one))
    sigma = strip_plate_dims(sigma, 0).unsqueeze(-1)
    with pyro.plate(
        "data", X.shape[0], subsample_size=subsample_size, device=X.device
    ) as idx:
        mean = bnn_forward(X[idx], w1, b1, w2, b2)
        pyro.sample("y", dist.Normal(mean, sigma), obs=y[idx])


@register("bnn_regression")
def build_bnn_regression(num_hidden: int = 10, with_reference: bool = True) -> ModelSpec:
    """BNN regression on the diabetes table (354 train / 88 held-out rows)."""
    if num_hidden < 1:
        raise ValueError(f"bnn_regression: num_hidden={num_hidden} must be >= 1")
    X, y, X_test, y_test = diabetes()
    d = X.shape[-1]
    ref_options = {"num_hidden": num_hidden}
    reference, note = load_reference("bnn_regression", ref_options, enabled=with_reference)
    return ModelSpec(
        name="bnn_regression",
        model=bnn_model,
        args=(X, y),
        kwargs={"num_hidden": num_hidden},
        reference=reference,
        reference_note=note,
        latent_sites={"w1": (d, num_hidden), "b1": (num_hidden,), "w2": (num_hidden,),
                      "b2": (), "sigma": ()},
        max_plate_nesting=1,
        data_size=X.shape[0],
        supports_subsampling=True,
        heldout=((X_test, y_test), {"num_hidden": num_hidden}),
        observed={"y": y},
        options={"num_hidden": num_hidden, "with_reference": with_reference,
                 "reference_options": ref_options},
        description=(
            f"One-hidden-layer BNN ({num_hidden} tanh units) on the diabetes table (354 train / "
            "88 held-out rows, standardised); Gaussian weight priors, sigma ~ HalfNormal(1). "
            "Multimodal posterior. Default guide: AutoNormal."
        ),
    )
