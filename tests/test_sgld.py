"""Tests of SGLD, pSGLD, CV-SGLD and the step-size schedules."""

import math

import pyro
import pyro.distributions as dist
import pytest
import scipy.linalg
import torch

from mcmc.diagnostics import to_inference_data
from mcmc.laplace import find_mode
from mcmc.schedules import ConstantSchedule, CyclicalSchedule, PolynomialSchedule, as_schedule
from mcmc.sgld import CVSGLD, SGLD, cv_gradient, pSGLD, psgld_step, sgld_step

# ---------------------------------------------------------------- a linear-Gaussian target
N, B = 100, 10
A = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64)


def gaussian_model(x, subsample_size=None):
    """theta ~ N(0, I_2); x_n ~ N(A theta, I_2): Gaussian posterior with precision I + N A^T A."""
    theta = pyro.sample("theta", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("x", dist.Normal(theta @ A.T, 1.0).to_event(1), obs=x[idx])


def _gaussian_data():
    g = torch.Generator().manual_seed(0)
    return torch.tensor([1.0, -1.0], dtype=torch.float64) @ A.T + torch.randn(
        N, 2, generator=g, dtype=torch.float64
    )


def _exact(x):
    P = torch.eye(2, dtype=torch.float64) + N * A.T @ A
    mean = torch.linalg.solve(P, A.T @ x.sum(0))
    xc = x - x.mean(0)
    S = xc.T @ xc / N
    # minibatch gradient noise of N/B * sum over B rows drawn without replacement:
    # per-row gradient A^T (A theta - x_n) has covariance A^T S A over the rows.
    V = N**2 / B * (A.T @ S @ A) * (N - B) / (N - 1)
    return P, mean, V


def _stationary_cov(P, V, h):
    """Solve Sigma = (I - hP) Sigma (I - hP)^T + 2hI + h^2 V."""
    M = (torch.eye(2, dtype=torch.float64) - h * P).numpy()
    Q = (2 * h * torch.eye(2, dtype=torch.float64) + h * h * V).numpy()
    return torch.from_numpy(scipy.linalg.solve_discrete_lyapunov(M, Q))


def _moments_with_se(draws):
    """Mean and covariance over (C, S, 2) draws, SEs from the C independent chains."""
    C = draws.shape[0]
    mean = draws.mean((0, 1))
    per_chain_mean = draws.mean(1)
    mean_se = per_chain_mean.std(0) / math.sqrt(C)
    dc = draws - mean
    prod = (dc[..., :, None] * dc[..., None, :]).mean(1)  # (C, 2, 2) per-chain averages
    cov = prod.mean(0)
    cov_se = prod.std(0) / math.sqrt(C)
    return mean, mean_se, cov, cov_se


H = 0.008
RUN = {"num_samples": 10, "num_chains": 1000, "warmup_steps": 80, "thinning": 10}


def test_sgld_stationary_moments_match_the_linear_gaussian_formula():
    x = _gaussian_data()
    P, exact_mean, V = _exact(x)
    kernel = SGLD(gaussian_model, step_size=H, subsample_size=B)
    draws = kernel.sample_chains(model_args=(x,), **RUN)["theta"]
    assert draws.shape == (1000, 10, 2)
    mean, mean_se, cov, cov_se = _moments_with_se(draws)
    target = _stationary_cov(P, V, H)
    ula = _stationary_cov(P, torch.zeros(2, 2, dtype=torch.float64), H)
    print("SGLD mean err", mean - exact_mean, "SE", mean_se)
    print("SGLD cov", cov, "formula", target, "SE", cov_se, "ULA formula", ula)
    assert ((mean - exact_mean).abs() <= 4 * mean_se).all()
    assert ((cov - target).abs() <= 4 * cov_se).all()
    # the gradient-noise term h^2 V is what the test resolves: ULA's covariance is far off
    assert ((cov - ula).abs() > 10 * cov_se).any()


def test_cvsgld_variance_equals_full_batch_ula():
    x = _gaussian_data()
    P, exact_mean, _ = _exact(x)
    ula_formula = _stationary_cov(P, torch.zeros(2, 2, dtype=torch.float64), H)
    cv = CVSGLD(gaussian_model, step_size=H, subsample_size=B)
    d_cv = cv.sample_chains(model_args=(x,), **{**RUN, "num_chains": 600})["theta"]
    # the anchor is the posterior mode (= mean for this Gaussian)
    torch.testing.assert_close(
        cv.potential.unpack(cv._anchor_z)["theta"][0], exact_mean, rtol=1e-6, atol=1e-6
    )
    ula = SGLD(gaussian_model, step_size=H)  # full-data gradient
    d_ula = ula.sample_chains(model_args=(x,), **{**RUN, "num_chains": 600})["theta"]
    for name, d in (("CV-SGLD", d_cv), ("ULA", d_ula)):
        mean, mean_se, cov, cov_se = _moments_with_se(d)
        print(name, "mean err", mean - exact_mean, "cov", cov, "formula", ula_formula, cov_se)
        assert ((mean - exact_mean).abs() <= 4 * mean_se).all()
        assert ((cov - ula_formula).abs() <= 4 * cov_se).all()
    _, _, cov_cv, se_cv = _moments_with_se(d_cv)
    _, _, cov_ula, se_ula = _moments_with_se(d_ula)
    print("CV/ULA variance ratio", cov_cv.diagonal() / cov_ula.diagonal())
    assert ((cov_cv - cov_ula).abs() <= 4 * (se_cv**2 + se_ula**2).sqrt()).all()


def test_psgld_stationary_moments_match_the_frozen_preconditioner_formula():
    """pSGLD with alpha -> 1 behaves like SGLD preconditioned by a (nearly) fixed diagonal G:
    Sigma = (I - hGP) Sigma (I - hGP)^T + 2hG + h^2 G V G, mean exact (Gamma omitted, G ~ const).
    """
    x = _gaussian_data()
    P, exact_mean, V = _exact(x)
    post_cov = torch.linalg.inv(P)
    C, h = 300, 0.05
    g = torch.Generator().manual_seed(1)
    # start on the posterior so that the RMSprop average is adapted after a short warm-up
    z0 = (
        exact_mean
        + torch.randn(C, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(post_cov).T
    )
    kernel = pSGLD(gaussian_model, step_size=h, subsample_size=B, alpha=0.99)
    d = kernel.sample_chains(
        20, num_chains=C, warmup_steps=200, thinning=10, model_args=(x,), initial_params=z0
    )["theta"]
    mean, mean_se, cov, cov_se = _moments_with_se(d)
    G = torch.diag((1 / (1e-5 + kernel.state.square_avg.sqrt())).mean(0))
    M = (torch.eye(2, dtype=torch.float64) - h * G @ P).numpy()
    Q = (2 * h * G + h * h * G @ V @ G).numpy()
    target = torch.from_numpy(scipy.linalg.solve_discrete_lyapunov(M, Q))
    print("pSGLD mean err / SE", (mean - exact_mean) / mean_se)
    print("pSGLD cov", cov, "frozen-G formula", target, "SE", cov_se)
    print("pSGLD var / posterior var", cov.diagonal() / post_cov.diagonal())
    assert ((mean - exact_mean).abs() <= 4 * mean_se).all()
    assert ((cov - target).abs() <= 4 * cov_se).all()


# ---------------------------------------------------------------- pure step functions
def test_step_functions_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    z, grad, noise = (torch.randn(3, 4, generator=g) for _ in range(3))
    v = torch.rand(3, 4, generator=g)
    torch.testing.assert_close(
        sgld_step(z, grad, 0.1, noise), z - 0.1 * grad + math.sqrt(0.2) * noise
    )
    h = torch.tensor([[0.1], [0.2], [0.05]])
    torch.testing.assert_close(sgld_step(z, grad, h, noise), z - h * grad + (2 * h).sqrt() * noise)
    z2, v2 = psgld_step(z, grad, v, 0.1, noise, alpha=0.9, eps=1e-3)
    v_exp = 0.9 * v + 0.1 * grad**2
    G = 1 / (1e-3 + v_exp.sqrt())
    torch.testing.assert_close(v2, v_exp)
    torch.testing.assert_close(z2, z - 0.1 * G * grad + (0.2 * G).sqrt() * noise)
    torch.testing.assert_close(cv_gradient(grad, v, noise), noise + grad - v)


def test_schedules():
    assert ConstantSchedule(0.1)(0) == ConstantSchedule(0.1)(1000) == 0.1
    p = PolynomialSchedule(a=0.5, b=10, gamma=0.55)
    assert p(0) == pytest.approx(0.5 * 10**-0.55)
    assert p(90) == pytest.approx(0.5 * 100**-0.55)
    c = CyclicalSchedule(1.0, num_cycles=2, total_steps=100)
    assert c(0) == 1.0 and c(50) == 1.0
    assert c(25) == pytest.approx(0.5)
    assert c(49) < 0.01
    assert isinstance(as_schedule(0.3), ConstantSchedule) and as_schedule(p) is p
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        ConstantSchedule(0.0)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        ConstantSchedule(-1.0)
    with pytest.raises(ValueError, match="b must be >= 1"):
        PolynomialSchedule(1.0, b=0.5)
    with pytest.raises(ValueError, match="num_cycles"):
        CyclicalSchedule(1.0, num_cycles=0, total_steps=10)
    with pytest.raises(TypeError, match="step_size must be a number"):
        ConstantSchedule("0.1")


def test_schedule_sees_the_global_step_count_in_pyro_mcmc():
    """Pyro's MCMC never calls end_warmup: the kernel counts warmup + sampling steps itself."""
    x = _gaussian_data()
    seen = []

    def schedule(t):
        seen.append(t)
        return 1e-3

    kernel = SGLD(gaussian_model, step_size=schedule, subsample_size=B)
    mcmc = pyro.infer.MCMC(kernel, num_samples=30, warmup_steps=20, disable_progbar=True)
    mcmc.run(x)
    assert kernel.driver.t == 50
    assert seen[-1] == 49 and sorted(set(seen)) == list(range(50))
    samples = mcmc.get_samples()
    assert samples["theta"].shape == (30, 2)


# ---------------------------------------------------------------- Pyro MCMC + ArviZ
def test_pyro_mcmc_interface_and_inference_data():
    x = _gaussian_data()
    P, exact_mean, _ = _exact(x)
    kernel = SGLD(gaussian_model, step_size=2e-3, subsample_size=B)
    mcmc = pyro.infer.MCMC(kernel, num_samples=400, warmup_steps=100, disable_progbar=True)
    mcmc.run(x)
    s = mcmc.get_samples()["theta"]
    assert s.shape == (400, 2)
    # one short chain: loose check that it sits on the posterior
    sd = torch.linalg.inv(P).diagonal().sqrt()
    assert ((s.mean(0) - exact_mean).abs() < 4 * sd).all()
    idata = to_inference_data(mcmc)
    assert idata.posterior["theta"].shape == (1, 400, 2)
    # the vectorised driver's (C, S, *shape) dict converts too
    draws = kernel.sample_chains(50, num_chains=4, model_args=(x,))
    idata2 = to_inference_data(draws)
    assert idata2.posterior["theta"].shape == (4, 50, 2)
    try:
        import arviz

        idata3 = arviz.from_pyro(mcmc)
        assert idata3.posterior["theta"].shape == (1, 400, 2)
    except (ImportError, AttributeError):  # arviz without from_pyro
        pass


# ---------------------------------------------------------------- logistic regression (zoo)
@pytest.mark.slow
def test_logistic_regression_matches_nuts_reference():
    import models
    # the data and the NUTS reference ship with the package: missing ones fail, never skip
    spec = models.get("logistic_regression", dtype=torch.float64)
    assert spec.reference is not None, spec.reference_note
    ref = spec.reference.draws["w"]
    # Hessian eigenvalues at the mode span ~1..58, so h = 0.006 is small (h * 58 = 0.35) while
    # the slowest direction relaxes in ~170 steps. Chains start at the mode.
    C = 100
    kernel = SGLD(spec.model, step_size=0.006, subsample_size=50, seed=0)
    pot = kernel.setup_potential(spec.args, spec.kwargs)
    mode = find_mode(pot, pot.initial_params(1))
    draws = kernel.sample_chains(
        50,
        num_chains=C,
        warmup_steps=400,
        thinning=4,
        model_args=spec.args,
        model_kwargs=spec.kwargs,
        initial_params=mode.expand(C, -1),
    )["w"]
    per_chain = draws.mean(1)
    se = (per_chain.var(0) / C + ref.var(0) / ref.shape[0]).sqrt()
    err = draws.mean((0, 1)) - ref.mean(0)
    print(
        "max |err| / SE",
        (err.abs() / se).max(),
        "max |err| / posterior sd",
        (err.abs() / ref.std(0)).max(),
    )
    print(
        "variance ratio SGLD / NUTS: min",
        (draws.var((0, 1)) / ref.var(0)).min(),
        "max",
        (draws.var((0, 1)) / ref.var(0)).max(),
    )
    assert (err.abs() <= 4 * se).all()
    idata = to_inference_data({"w": draws})
    assert idata.posterior["w"].shape == (C, 50, ref.shape[1])


# ---------------------------------------------------------------- NaN / inf
def barrier_model():
    """N(0, 0.3^2) times (1 - z^2) on (-1, 1): log(1 - z^2) is NaN outside (a bad region)."""
    z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 0.3))
    pyro.factor("barrier", torch.log1p(-(z**2)))


def test_nonfinite_raises_naming_iteration_and_site():
    kernel = SGLD(barrier_model, step_size=0.5, seed=0)
    with pytest.raises(
        FloatingPointError, match=r"non-finite potential at iteration \d+: chain.*'barrier'"
    ):
        kernel.sample_chains(50, num_chains=4, initial_params=torch.zeros(4, 1))


def test_nonfinite_halve_opt_in_recovers():
    kernel = SGLD(barrier_model, step_size=0.5, on_nonfinite="halve", seed=0)
    d = kernel.sample_chains(200, num_chains=8, initial_params=torch.zeros(8, 1))
    assert torch.isfinite(d["z"]).all() and (d["z"].abs() < 1).all()
    assert kernel.driver.num_halvings > 0
    assert (kernel.driver.multiplier < 1).all()
    print("halvings", kernel.driver.num_halvings, "multipliers", kernel.driver.multiplier.T)
    # a hopeless step (always non-finite) still stops with the error after max_halvings
    kernel = SGLD(barrier_model, step_size=1e6, on_nonfinite="halve", max_halvings=2, seed=0)
    with pytest.raises(FloatingPointError, match="after 2 step halvings"):
        kernel.sample_chains(50, num_chains=2, initial_params=torch.zeros(2, 1))


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("cls", [SGLD, pSGLD, CVSGLD])
def test_checkpoint_resume_is_bit_identical(cls, tmp_path):
    x = _gaussian_data()
    full = cls(gaussian_model, step_size=2e-3, subsample_size=B, seed=7)
    d_full = full.sample_chains(30, num_chains=5, model_args=(x,), unconstrained=True)["_z"]

    first = cls(gaussian_model, step_size=2e-3, subsample_size=B, seed=7)
    d1 = first.sample_chains(12, num_chains=5, model_args=(x,), unconstrained=True)["_z"]
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")

    resumed = cls(gaussian_model, step_size=2e-3, subsample_size=B, seed=123)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    d2 = resumed.sample_chains(18, num_chains=5, model_args=(x,), unconstrained=True)["_z"]
    assert torch.equal(torch.cat([d1, d2], dim=1), d_full)


# ---------------------------------------------------------------- state between runs
def test_new_data_and_new_initial_params_are_not_ignored():
    """A second ``sample_chains`` call continues the chains, but (a) with new data its first
    step uses the new data's gradient (not the cached one of the old data) and (b) explicit
    ``initial_params`` start a fresh run from those points."""
    x = _gaussian_data()
    x2 = x + 3.0
    h = 1e-3
    kernel = SGLD(gaussian_model, step_size=h, seed=0)  # full-data gradients: no RNG for rows
    kernel.sample_chains(3, num_chains=2, model_args=(x,))
    z0 = kernel.state.z.clone()
    gen = torch.Generator().manual_seed(0)
    gen.set_state(kernel.generator.get_state())
    got = kernel.sample_chains(1, num_chains=2, model_args=(x2,), unconstrained=True)["_z"][:, 0]
    noise = torch.randn(z0.shape, generator=gen, dtype=z0.dtype)
    _, g_new = kernel.potential.value_and_grad(z0)
    torch.testing.assert_close(got, sgld_step(z0, g_new, h, noise))

    z_init = torch.full((2, 2), 5.0, dtype=torch.float64)
    tiny = SGLD(gaussian_model, step_size=1e-8, seed=0)
    tiny.sample_chains(3, num_chains=2, model_args=(x,))
    d = tiny.sample_chains(1, num_chains=2, model_args=(x,), initial_params=z_init,
                           unconstrained=True)["_z"][:, 0]
    assert (d - z_init).abs().max() < 1e-2


# ---------------------------------------------------------------- bad input
def test_bad_input():
    x = _gaussian_data()
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        SGLD(gaussian_model, step_size=0.0)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        pSGLD(gaussian_model, step_size=-1e-3)
    with pytest.raises(ValueError, match="subsample_size must be a positive int"):
        SGLD(gaussian_model, step_size=1e-3, subsample_size=0)
    with pytest.raises(ValueError, match=r"SGLD\(\.\.\., subsample_size=101\) is larger than the "
                       r"100 rows of plate 'data'"):
        SGLD(gaussian_model, step_size=1e-3, subsample_size=N + 1).sample_chains(5, model_args=(x,))
    with pytest.raises(ValueError, match=r"plate 'data' declares subsample_size=20 in the model, "
                       r"but SGLD\(\.\.\., subsample_size=10\)"):
        SGLD(gaussian_model, subsample_size=B).sample_chains(
            5, model_args=(x,), model_kwargs={"subsample_size": 20})
    with pytest.raises(ValueError, match=r"sample_chains\(\.\.\., num_samples=-1\)"):
        SGLD(gaussian_model).sample_chains(-1, model_args=(x,))
    with pytest.raises(ValueError, match="on_nonfinite"):
        SGLD(gaussian_model, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="give a Pyro `model`"):
        SGLD(step_size=1e-3)
    with pytest.raises(ValueError, match="alpha must be in"):
        pSGLD(gaussian_model, alpha=1.0)
    with pytest.raises(ValueError, match="initial params must have shape"):
        SGLD(gaussian_model).sample_chains(
            5, num_chains=3, model_args=(x,), initial_params=torch.zeros(2, 2)
        )
    with pytest.raises(ValueError, match="schedule gave h="):
        SGLD(gaussian_model, step_size=lambda t: 0.0).sample_chains(5, model_args=(x,))


def test_num_samples_zero():
    """Pyro's MCMC with num_samples=0 gets a clear error (not Pyro's 'stack expects a non-empty
    TensorList'); the vectorised driver runs the warm-up only and returns 0 draws (documented),
    and the next call continues from there."""
    x = _gaussian_data()
    mcmc = pyro.infer.MCMC(SGLD(gaussian_model, step_size=1e-3), num_samples=0, warmup_steps=3,
                           disable_progbar=True)
    with pytest.raises(ValueError, match=r"MCMC\(SGLD\(\.\.\.\), num_samples=0\): num_samples "
                       r"must be >= 1"):
        mcmc.run(x)
    kernel = SGLD(gaussian_model, step_size=1e-3, seed=0)
    d = kernel.sample_chains(0, num_chains=3, warmup_steps=5, model_args=(x,))
    assert d["theta"].shape == (3, 0, 2) and kernel.driver.t == 5
    d = kernel.sample_chains(4, num_chains=3, model_args=(x,))
    assert d["theta"].shape == (3, 4, 2) and kernel.driver.t == 9


def test_checkpoint_with_another_num_chains_is_an_error(tmp_path):
    """A loaded checkpoint is never silently discarded: another num_chains is a clear error;
    reset() starts afresh on purpose."""
    x = _gaussian_data()
    first = SGLD(gaussian_model, step_size=2e-3, subsample_size=B, seed=7)
    first.sample_chains(5, num_chains=4, model_args=(x,))
    sd = first.state_dict()
    resumed = SGLD(gaussian_model, step_size=2e-3, subsample_size=B)
    resumed.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"checkpoint holds 4 chain\(s\); it cannot continue as "
                       r"num_chains=2.*reset\(\)"):
        resumed.sample_chains(5, num_chains=2, model_args=(x,))
    # chains held from a previous run: the same rule
    with pytest.raises(ValueError, match=r"num_chains=2\): the kernel holds 4 chain"):
        first.sample_chains(5, num_chains=2, model_args=(x,))
    first.reset()
    assert first.sample_chains(3, num_chains=2, model_args=(x,))["theta"].shape == (2, 3, 2)
    # the checkpoint also continues inside Pyro's MCMC when it holds one chain
    one = SGLD(gaussian_model, step_size=2e-3, seed=1)
    one.sample_chains(3, num_chains=1, model_args=(x,))
    sd1 = one.state_dict()
    later = one.sample_chains(2, num_chains=1, model_args=(x,), unconstrained=True)["_z"][0]
    k2 = SGLD(gaussian_model, step_size=2e-3)
    k2.load_state_dict(sd1)
    mcmc = pyro.infer.MCMC(k2, num_samples=2, warmup_steps=0, disable_progbar=True)
    mcmc.run(x)
    torch.testing.assert_close(mcmc.get_samples()["theta"], later, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda():
    x = _gaussian_data().cuda()
    global A
    A_cpu = A
    try:
        A = A_cpu.cuda()
        d = SGLD(gaussian_model, step_size=1e-3, subsample_size=B).sample_chains(
            5, num_chains=3, model_args=(x,)
        )
        assert d["theta"].is_cuda
    finally:
        A = A_cpu
