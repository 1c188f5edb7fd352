"""SGLD family defaults (issue 14): the step size and the Laplace preconditioner chosen from the
model, the preconditioned update's stationary law, and pSGLD's frozen RMSprop average."""

import logging
import math

import pyro
import pyro.distributions as dist
import pytest
import scipy.linalg
import torch
from user_models import collinear_regression_data

from mcmc import sgld as sgld_module
from mcmc.laplace import hessian, largest_eigenvalue
from mcmc.sgld import CVSGLD, SGLD, pSGLD

F64 = torch.float64

# ---------------------------------------------------------------- a linear-Gaussian target
N, B = 100, 10
A = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=F64)


def gaussian_model(x):
    """theta ~ N(0, I_2); x_n ~ N(A theta, I_2), indexed by the plate (minibatches on request)."""
    theta = pyro.sample("theta", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]) as idx:
        pyro.sample("x", dist.Normal(theta @ A.T, 1.0).to_event(1), obs=x[idx])


def gaussian_data():
    g = torch.Generator().manual_seed(0)
    return torch.tensor([1.0, -1.0], dtype=F64) @ A.T + torch.randn(N, 2, generator=g,
                                                                    dtype=F64)


def exact(x):
    """Posterior precision and mean; minibatch gradient-noise covariance (rows drawn without
    replacement)."""
    P = torch.eye(2, dtype=F64) + N * A.T @ A
    mean = torch.linalg.solve(P, A.T @ x.sum(0))
    xc = x - x.mean(0)
    V = N**2 / B * (A.T @ (xc.T @ xc / N) @ A) * (N - B) / (N - 1)
    return P, mean, V


def moments_with_se(draws):
    """Mean and covariance over (C, S, D) draws, SEs from the C independent chains."""
    C = draws.shape[0]
    mean = draws.mean((0, 1))
    mean_se = draws.mean(1).std(0) / math.sqrt(C)
    dc = draws - mean
    prod = (dc[..., :, None] * dc[..., None, :]).mean(1)
    return mean, mean_se, prod.mean(0), prod.std(0) / math.sqrt(C)


def test_laplace_preconditioned_sgld_matches_the_whitened_linear_gaussian_formula():
    """``precondition="laplace"``: z' = z - h M g + sqrt(2h) L xi with M = L L^T = H^-1. In the
    coordinates y = L^-1 z this is plain SGLD on precision P_y = L^T P L (= I here) with gradient
    noise V_y = L^T V L, so the stationary covariance is L Sigma_y L^T with Sigma_y solving
    Sigma_y = (I - h P_y) Sigma_y (I - h P_y)^T + 2h I + h^2 V_y; the mean is exact. A large
    whitened step (h = 0.3) makes the discretisation and noise terms visible (+30-60 % in
    variance)."""
    x = gaussian_data()
    P, mean, V = exact(x)
    h = 0.3
    kernel = SGLD(gaussian_model, step_size=h, precondition="laplace", subsample_size=B, seed=0)
    d = kernel.sample_chains(10, num_chains=1000, warmup_steps=40, thinning=8, model_args=(x,),
                             diagnostics=False)["theta"]
    L = kernel.scale_tril
    torch.testing.assert_close(L @ L.T, torch.linalg.inv(P))
    Py, Vy = L.T @ P @ L, L.T @ V @ L
    eye = torch.eye(2, dtype=F64)
    sigma_y = torch.from_numpy(scipy.linalg.solve_discrete_lyapunov(
        (eye - h * Py).numpy(), (2 * h * eye + h * h * Vy).numpy()))
    target = L @ sigma_y @ L.T
    m, m_se, cov, cov_se = moments_with_se(d)
    print("var / posterior var", (cov.diagonal() * P.inverse().diagonal().reciprocal()).tolist(),
          "formula", (target.diagonal() * P.inverse().diagonal().reciprocal()).tolist())
    assert ((m - mean).abs() <= 4 * m_se).all()
    assert ((cov - target).abs() <= 4 * cov_se).all()
    # and the inflation is what the formula says, not noise: > 20 % on the diagonal
    assert (target.diagonal() > 1.2 * P.inverse().diagonal()).all()


def test_step_size_none_chooses_step_preconditioner_and_start(caplog):
    """``SGLD(model, subsample_size=B)``: mode and Laplace factor at the mode (exact here), the
    whitened gradient noise V (the top eigenvalue of L^T V L, estimated from 64 minibatches:
    relative error ~20 %), h = min(0.1, 0.5 / (1 + V)), chains at Laplace draws; one INFO line."""
    x = gaussian_data()
    P, mean, V = exact(x)
    with caplog.at_level(logging.INFO, logger="mcmc.sgld"):
        kernel = SGLD(gaussian_model, subsample_size=B, seed=0)
        kernel.sample_chains(0, num_chains=4000, model_args=(x,), diagnostics=False)
    cov = torch.linalg.inv(P)
    torch.testing.assert_close(kernel.mode[0], mean)
    torch.testing.assert_close(kernel.scale_tril @ kernel.scale_tril.T, cov)
    L = kernel.scale_tril
    v_true = float(torch.linalg.eigvalsh(L.T @ V @ L).max())
    print(f"whitened gradient noise: formula {v_true:.3g}, estimate {kernel.gradient_noise:.3g}; "
          f"step {kernel.schedule(0):.3g}")
    assert kernel.gradient_noise == pytest.approx(v_true, rel=0.5)
    assert kernel.schedule(0) == pytest.approx(min(0.1, 0.5 / (1 + kernel.gradient_noise)))
    z0 = kernel.state.z  # the chains' starting points: draws from N(mode, H^-1)
    se = cov.diagonal() * math.sqrt(2 / z0.shape[0])
    assert ((torch.cov(z0.T) - cov).diagonal().abs() <= 4 * se).all()
    assert any("Laplace preconditioner" in r.getMessage() for r in caplog.records)

    # plain SGLD (precondition=None): h = min(0.1 / lambda_max, 0.5 / (lambda_max + V)), at the
    # mode; an explicit step size keeps "auto" from preconditioning (the model's coordinates)
    plain = SGLD(gaussian_model, subsample_size=B, precondition=None, seed=0)
    plain.sample_chains(1, num_chains=2, model_args=(x,), diagnostics=False)
    lam = float(torch.linalg.eigvalsh(P).max())
    assert plain.scale_tril is None
    assert plain.schedule(0) == pytest.approx(min(0.1 / lam, 0.5 / (lam + plain.gradient_noise)),
                                              rel=1e-3)
    given = SGLD(gaussian_model, 1e-3, subsample_size=B, seed=0)
    given.sample_chains(1, model_args=(x,), diagnostics=False)
    assert given.scale_tril is None and given.mode is None and given.schedule(0) == 1e-3
    # CV-SGLD: the anchor is the mode; its gradient noise vanishes there
    cv = CVSGLD(gaussian_model, subsample_size=B, seed=0)
    cv.sample_chains(1, model_args=(x,), diagnostics=False)
    assert cv.gradient_noise == 0.0 and cv.schedule(0) == pytest.approx(0.1)
    torch.testing.assert_close(cv.mode, cv._anchor_z)


def test_auto_preconditioning_stops_at_max_laplace_dim(monkeypatch, caplog):
    x = gaussian_data()
    monkeypatch.setattr(sgld_module, "MAX_LAPLACE_DIM", 1)
    with caplog.at_level(logging.INFO, logger="mcmc.sgld"):
        kernel = SGLD(gaussian_model, seed=0)
        kernel.sample_chains(1, model_args=(x,), diagnostics=False)
    assert kernel.scale_tril is None and kernel.mode is not None
    assert any("MAX_LAPLACE_DIM" in r.getMessage() for r in caplog.records)


def test_checkpoint_keeps_the_chosen_geometry():
    """A checkpoint of a run with the model-derived defaults resumes bit-identically."""
    x = gaussian_data()
    first = SGLD(gaussian_model, subsample_size=B, seed=3)
    first.sample_chains(5, num_chains=3, model_args=(x,), diagnostics=False)
    sd = first.state_dict()
    rest = first.sample_chains(5, num_chains=3, model_args=(x,), diagnostics=False)["theta"]
    resumed = SGLD(gaussian_model, subsample_size=B, seed=99)  # other seed: geometry from sd
    resumed.load_state_dict(sd)
    again = resumed.sample_chains(5, num_chains=3, model_args=(x,), diagnostics=False)["theta"]
    assert torch.equal(rest, again)
    assert torch.equal(resumed.scale_tril, first.scale_tril)


# ---------------------------------------------------------------- pSGLD (issue 14, item 3)
def regression(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[-1], dtype=X.dtype), 10.0).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w + b, sigma), obs=y[idx])


def scaled_data():
    """Diagonal ill-conditioning only (column scales 3 .. 0.03): what a diagonal (RMSprop)
    preconditioner is meant for."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, 4, generator=g, dtype=F64) * torch.tensor([3.0, 1.0, 0.3, 0.03],
                                                                    dtype=F64)
    return X, X @ torch.tensor([0.5, -1.0, 2.0, 5.0], dtype=F64) + 0.5 \
        + 0.5 * torch.randn(200, generator=g, dtype=F64)


# NUTS (4 chains x (1000 + 2500), float64, full mass matrix; R-hat <= 1.0003, ESS >= 12000):
# mean and sd of the unconstrained (w, b, log sigma)
REFS = {
    "collinear": (collinear_regression_data,
                  [-0.08703, 0.5646, 1.905, 0.2854, 0.4895, -0.6539],
                  [1.228, 1.228, 0.258, 0.01901, 0.05432, 0.07194]),
    "scaled": (scaled_data,
               [0.48193, -1.0021, 1.99431, 3.1004, 0.52674, -0.68358],
               [0.01192, 0.04028, 0.1303, 1.173, 0.03623, 0.05121]),
}


def check(name, z):
    _, mean, sd = REFS[name]
    mean, sd = torch.tensor(mean, dtype=F64), torch.tensor(sd, dtype=F64)
    flat = z.reshape(-1, z.shape[-1])
    return (flat.mean(0) - mean).abs() / sd, flat.std(0) / sd


@pytest.mark.parametrize("name", ["collinear", "scaled"])
def test_psgld_defaults_on_ill_conditioned_regressions(name):
    """Issue 14: pSGLD with defaults, sd ratios within 15 % of NUTS on an ill-conditioned
    regression (minibatches of 32 rows; 64 chains, 500 warm-up steps, 500 draws 2 steps apart).
    The defaults -- Laplace preconditioner, RMSprop average on top of it, frozen after warm-up --
    give sd ratios 1.05-1.11 (within the +12 % minibatch-noise budget of the default step).

    The paper's pSGLD (``precondition=None``; frozen average, same run) does not get there in
    such runs: a diagonal preconditioner cannot straighten the collinear pair (their sds 0.36x
    NUTS with 256 chains from the mode after 3000 steps: they would need ~1e5 steps), and even
    with diagonal-only ill-conditioning RMSprop only takes the square root of it (the flat
    coordinate's sd 0.81x, split R-hat 2.4 -- which the end-of-run check reports)."""
    data, _, _ = REFS[name]
    X, y = data()
    k = pSGLD(regression, subsample_size=32, seed=0)
    z = k.sample_chains(500, num_chains=64, warmup_steps=500, thinning=2, model_args=(X, y),
                        unconstrained=True, progress=False)["_z"]
    err, ratio = check(name, z)
    print(f"{name}: step {k.schedule(0):.3g}, mean errors {[round(float(e), 3) for e in err]} sd,"
          f" sd ratios {[round(float(r), 3) for r in ratio]}; {k.convergence.summary}")
    assert (err < 0.2).all()
    assert ((ratio - 1).abs() < 0.15).all()
    assert k.convergence.ok


@pytest.mark.slow
def test_psgld_bias_comes_from_the_adapting_preconditioner():
    """The cause of pSGLD's inflated spread (issue 14: sigma's sd 1.22-1.32x at alpha = 0.99): the
    RMSprop average follows the chain's recent positions (~1 / (1 - alpha) = 100 steps), so the
    preconditioner depends on the state and the omitted Gamma term biases the draws -- in full
    batch too, so minibatch noise is not the cause. Many chains started at Laplace draws, same
    seed and step (common random numbers) for both: frozen after warm-up the stationary sds are
    within a few % of NUTS; adapting throughout, the worst is ~1.17x (measured with 512 chains
    and 4000 steps: 1.166 vs 0.99 on w3, Monte-Carlo error +-0.01)."""
    X, y = collinear_regression_data()
    out = {}
    for freeze in (True, False):
        k = pSGLD(regression, precondition=None, freeze_preconditioner=freeze, seed=0)
        pot = k.setup_potential((X, y))
        L = torch.linalg.cholesky(torch.linalg.inv(hessian(pot, k.mode)))
        g = torch.Generator().manual_seed(0)
        z0 = k.mode + torch.randn(256, pot.dim, generator=g, dtype=F64) @ L.T
        z = k.sample_chains(100, num_chains=256, warmup_steps=1000, thinning=10,
                            model_args=(X, y), initial_params=z0, unconstrained=True,
                            diagnostics=False, progress=False)["_z"]
        out[freeze] = check("collinear", z)[1]
    print({k: [round(float(r), 3) for r in v] for k, v in out.items()})
    # the well-determined coordinates (w3, w4, b, log sigma; the collinear pair relaxes too
    # slowly for either to be judged here)
    assert ((out[True][2:] - 1).abs() < 0.06).all()
    assert out[False][2:].max() > 1.1
    assert (out[False][2:] - out[True][2:]).max() > 0.08


def test_psgld_default_start_avoids_the_first_step_blow_up():
    """pSGLD chains start at the mode, where the gradient is ~0: a running average started at
    the first g^2 would make the first step ~h / eps huge. The default starts it at E[g^2] =
    diag(H) (+ minibatch noise) instead."""
    prec = torch.tensor([[50.0, 3.0], [3.0, 2.0]], dtype=F64)
    mu = torch.tensor([1.0, -2.0], dtype=F64)

    def model():
        pyro.sample("x", dist.MultivariateNormal(mu, precision_matrix=prec))

    k = pSGLD(model, precondition=None, seed=0, max_plate_nesting=0)
    x = k.sample_chains(200, num_chains=4, diagnostics=False)["x"]
    torch.testing.assert_close(k.square_avg0[0], prec.diagonal())
    assert (x - mu).abs().max() < 2
    lam = largest_eigenvalue(k.potential, k.mode)
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(prec).max()), rel=1e-3)
