"""``eight_schools``: the classic hierarchical model (Rubin 1981; Gelman et al., BDA3 5.5),
non-centred parameterisation.

``mu ~ N(0, 5^2)``, ``tau ~ HalfCauchy(5)``, ``theta_tilde_j ~ N(0, 1)``,
``theta_j = mu + tau * theta_tilde_j``, ``y_j ~ N(theta_j, sigma_j^2)`` with known ``sigma_j``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ..registry import register
from ..spec import ModelSpec
from ._common import load_reference

# Estimated coaching effects and their standard errors (BDA3, Table 5.2).
Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)


def eight_schools_model(y: torch.Tensor, sigma: torch.Tensor) -> None:
    """Non-centred eight schools; latent ``mu``, ``tau`` and ``theta_tilde`` (8,)."""
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_full((), 5.0)))
    with pyro.plate("schools", y.shape[-1], device=y.device):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(y.new_zeros(()), 1.0))
        # mu, tau are () or (*B, 1): they broadcast against the schools plate at dim -1.
        theta = mu + tau * theta_tilde
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


@register("eight_schools")
def build_eight_schools(with_reference: bool = True) -> ModelSpec:
    """Eight schools hierarchical model (non-centred), with a stored NUTS reference."""
    y, sigma = torch.tensor(Y), torch.tensor(SIGMA)
    reference, note = load_reference("eight_schools", {}, enabled=with_reference)
    return ModelSpec(
        name="eight_schools",
        model=eight_schools_model,
        args=(y, sigma),
        reference=reference,
        reference_note=note,
        latent_sites={"mu": (), "tau": (), "theta_tilde": (8,)},
        max_plate_nesting=1,
        data_size=8,
        supports_subsampling=False,
        observed={"y": y},
        options={"with_reference": with_reference, "reference_options": {}},
        description=(
            "Eight schools (non-centred): mu ~ N(0, 5^2), tau ~ HalfCauchy(5), theta_tilde ~ "
            "N(0, 1), y_j ~ N(mu + tau theta_tilde_j, sigma_j^2). Default guide: AutoNormal."
        ),
    )
