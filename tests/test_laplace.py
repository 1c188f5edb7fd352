"""mcmc.laplace: mode, Hessian(-vector products), curvature, Laplace approximation, gradient
noise and the default Langevin step size -- against closed forms."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from mcmc.coin import FunctionPotential
from mcmc.laplace import (
    default_step_size,
    find_mode,
    gradient_noise,
    hessian,
    hessian_diagonal,
    hessian_vector_product,
    laplace_approximation,
    largest_eigenvalue,
    minibatch_gradients,
)
from mcmc.potential import Potential

F64 = torch.float64
MU = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
A = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.1, 0.0], [0.0, 0.3, 0.01]], dtype=F64)
COV = A @ A.T  # condition number ~1e5
PREC = torch.linalg.inv(COV)


def gauss_potential():
    def log_prob(x):
        r = x - MU
        return -0.5 * ((r @ PREC) * r).sum(-1)

    return FunctionPotential(log_prob, 3)


def test_exact_curvature_and_laplace_on_a_gaussian():
    pot = gauss_potential()
    z = torch.randn(1, 3, dtype=F64)
    torch.testing.assert_close(hessian(pot, z), PREC)
    torch.testing.assert_close(hessian(pot, z, chunk_size=1), PREC)
    v = torch.randn(5, 3, dtype=F64)
    torch.testing.assert_close(hessian_vector_product(pot, z, v), v @ PREC)
    torch.testing.assert_close(hessian_diagonal(pot, z), PREC.diagonal())
    lam = float(torch.linalg.eigvalsh(PREC).max())
    assert largest_eigenvalue(pot, z, num_iters=200, rtol=1e-10) == pytest.approx(lam, rel=1e-6)
    lap = laplace_approximation(pot, torch.zeros(1, 3, dtype=F64))
    torch.testing.assert_close(lap.mode, MU)
    torch.testing.assert_close(lap.scale_tril @ lap.scale_tril.T, COV)
    assert torch.equal(lap.scale_tril, lap.scale_tril.tril())
    assert (lap.scale_tril.diagonal() > 0).all()


def test_hutchinson_diagonal_is_unbiased():
    """Above ``max_exact_dim`` the diagonal is Hutchinson's estimate: mean over probes of
    v * Hv, unbiased; its error falls like 1/sqrt(probes)."""
    pot = gauss_potential()
    z = torch.zeros(1, 3, dtype=F64)
    est = torch.stack([hessian_diagonal(pot, z, max_exact_dim=0, num_probes=64,
                                        generator=torch.Generator().manual_seed(s))
                       for s in range(200)])
    # Var of v_i (Hv)_i = sum_{j != i} H_ij^2 for Rademacher v
    sd = ((PREC**2).sum(1) - PREC.diagonal() ** 2).sqrt() / math.sqrt(64)
    err = (est.mean(0) - PREC.diagonal()) / (sd / math.sqrt(200))
    print("Hutchinson mean error / SE", err.tolist())
    assert err.abs().max() < 4


def test_find_mode_on_a_pyro_model_and_a_divergent_search():
    def model():
        pyro.sample("x", dist.MultivariateNormal(MU, covariance_matrix=COV))

    pot = Potential(model, max_plate_nesting=0)
    torch.testing.assert_close(find_mode(pot, torch.zeros(3, dtype=F64))[0], MU, rtol=1e-6,
                               atol=1e-6)

    # no mode: U(z) = -z^3 decreases without bound; the search ends in a clear error
    unbounded = FunctionPotential(lambda x: x.pow(3).sum(-1), 1)
    with pytest.raises(FloatingPointError, match="mode search diverged"):
        find_mode(unbounded, torch.ones(1, 1, dtype=F64), num_steps=500)


# ---------------------------------------------------------------- gradient noise, step size
N, B = 200, 20
W_TRUE = torch.tensor([1.0, -1.0], dtype=F64)


def regression(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("y", dist.Normal(X[idx] @ w, 1.0), obs=y[idx])


def regression_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 2, generator=g, dtype=F64) * torch.tensor([3.0, 0.5], dtype=F64)
    return X, X @ W_TRUE + torch.randn(N, generator=g, dtype=F64)


def test_gradient_noise_matches_the_minibatch_covariance():
    """For minibatches of B rows without replacement, N/B times the sum of per-row gradients
    has covariance N^2 / B * S * (N - B) / (N - 1), S the covariance of the per-row gradients;
    the estimator's top eigenvalue (from K minibatches) is within its sampling error of it, and
    whitening (``scale_tril=L``) gives that of L^T g."""
    X, y = regression_data()
    pot = Potential(regression, (X, y), subsample_size=B)
    mode = find_mode(pot, torch.zeros(1, 2, dtype=F64))
    per_row = -X * (y - X @ mode[0])[:, None]  # gradient of each row's -log-likelihood
    S = torch.cov(per_row.T, correction=0)
    V = N**2 / B * S * (N - B) / (N - 1)
    top = float(torch.linalg.eigvalsh(V).max())
    gen = torch.Generator().manual_seed(1)
    got = gradient_noise(pot, mode, num_batches=4000, generator=gen)
    print(f"gradient noise: formula {top:.4g}, estimate {got:.4g}")
    assert got == pytest.approx(top, rel=0.1)  # 4000 draws: relative SE of a variance ~2-3 %
    L = torch.linalg.cholesky(torch.linalg.inv(hessian(pot.__class__(regression, (X, y)), mode)))
    g = minibatch_gradients(pot, mode, num_batches=4000,
                            generator=torch.Generator().manual_seed(1))
    assert gradient_noise(gradients=g, scale_tril=L) == pytest.approx(
        float(torch.linalg.eigvalsh(L.T @ V @ L).max()), rel=0.1)
    # no subsampled plate: no noise
    assert gradient_noise(Potential(regression, (X, y)), mode) == 0.0


def test_default_step_size_formula():
    pot = gauss_potential()
    lam = float(torch.linalg.eigvalsh(PREC).max())
    z = MU[None]
    assert default_step_size(pot, z, num_iters=200) == pytest.approx(0.1 / lam, rel=1e-3)
    # whitened coordinates (curvature 1) with gradient noise V: min(0.1, 0.5 / (1 + V))
    assert default_step_size(pot, z, curvature=1.0) == pytest.approx(0.1)
    assert default_step_size(pot, z, curvature=1.0, noise=3.0) == pytest.approx(0.1)
    assert default_step_size(pot, z, curvature=1.0, noise=9.0) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="give step_size explicitly"):
        default_step_size(pot, z, curvature=0.0)
    with pytest.raises(ValueError, match="fraction must be in"):
        default_step_size(pot, z, fraction=2.0)
