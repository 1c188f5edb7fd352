"""Names and one-line descriptions of the zoo models, readable without importing torch.

``pyroforge list`` and the CLI's argument checks use this table, so they answer instantly; the
models themselves are built by :mod:`models.registry` (a test checks that both agree).
"""

MODELS = {
    "bnn_regression": "Bayesian neural network (10 tanh units) on the diabetes table.",
    "dirichlet_multinomial": "Multinomial counts, Dirichlet prior; exact Dirichlet posterior.",
    "discrete_mixture": "1-D Gaussian mixture with a discrete assignment per point.",
    "eight_schools": "Eight schools hierarchical model (non-centred), NUTS reference.",
    "federated_blobs": "Gaussian mean from non-iid shards (federated); exact posterior.",
    "gamma_poisson": "Poisson counts, Gamma(1, 1) prior on the rate; exact Gamma posterior.",
    "gaussian_conjugate": "Vector Gaussian mean, full-covariance prior; exact Gaussian posterior.",
    "linear_regression": "Synthetic linear regression with known noise; exact Gaussian posterior.",
    "logistic_regression": "Breast-cancer logistic regression (455 rows, 31 weights).",
    "logistic_regression_synthetic": "Logistic regression on synthetic data of any size.",
    "sparse_logistic": "Breast-cancer logistic regression with a Laplace (l1) prior.",
    "vae_digits": "Variational autoencoder on binarised 8x8 digits (amortised guide).",
}
"""``{name: one-line description}`` of every zoo model, sorted by name."""
