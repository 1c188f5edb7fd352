"""Zoo model modules; importing this package registers every model."""

from . import (  # noqa: F401
    bnn,
    conjugate,
    discrete_mixture,
    eight_schools,
    federated_blobs,
    linear_regression,
    logistic,
    vae,
)
