"""Bregman proximal Langevin (BMUMLA / MYULA / proximal-gradient-like): envelope gradients,
Laplace / box / simplex targets with many parallel chains, the Pyro kernel, bad input."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from mcmc.bregman import (
    BregmanProximalLangevin,
    bmumla_step,
    bregman_proximal_gradient_step,
    envelope_grad,
    myula_step,
    sample_chains,
)
from mcmc.mirror import BoltzmannShannon, Burg, FermiDirac, Hypentropy, SimplexEntropy
from mcmc.prox import L1, Box, GroupL1, Simplex

D = 10
A = torch.arange(1, D + 1, dtype=torch.float32)  # Laplace rates a_i = i


def _zero_grad(x):
    return torch.zeros_like(x)


# ------------------------------------------------------------------------- envelopes


@pytest.mark.parametrize("mirror,side", [(Hypentropy(0.5), "left"), (Hypentropy(0.5), "right"),
                                         (BoltzmannShannon(), "left"),
                                         (BoltzmannShannon(), "right"), (Burg(), "left"),
                                         (Burg(), "right"), (None, "left")])
def test_envelope_gradient_matches_autograd(mirror, side):
    """grad env = d/dx [g(P(x)) + D(.,.)/lam] with P(x) held fixed (envelope theorem)."""
    torch.manual_seed(0)
    g = L1(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64))
    lam = 0.3
    x = torch.rand(20, 4, dtype=torch.float64) * 2 + 0.05
    if isinstance(mirror, Hypentropy) or mirror is None:
        x = x * torch.sign(torch.randn_like(x))
    ours = envelope_grad(x, g, lam, mirror, side)
    xr = x.clone().requires_grad_(True)
    if mirror is None:
        p = g.prox(x, lam)
        env = g(p) + 0.5 * ((p - xr) ** 2).sum(-1) / lam
    elif side == "left":
        p = g.left_prox(x, lam, mirror)
        env = g(p) + mirror.bregman_divergence(p, xr) / lam
    else:
        p = g.right_prox(x, lam, mirror)
        env = g(p) + mirror.bregman_divergence(xr, p) / lam
    (ref,) = torch.autograd.grad(env.sum(), xr)
    torch.testing.assert_close(ours, ref)
    # and the envelope is a lower bound of g that tends to g (value check at lam -> 0)
    assert bool((env <= g(x) + 1e-12).all())


def test_bpg_step_equals_right_bmumla_with_lam_gamma():
    torch.manual_seed(1)
    x = torch.randn(50, 4, dtype=torch.float64)
    grad = torch.randn_like(x)
    noise = torch.randn_like(x)
    m, g = Hypentropy(0.7), L1(1.5)
    a = bregman_proximal_gradient_step(x, grad, g, m, step_size=0.05, noise=noise)
    b = bmumla_step(x, grad, g, m, step_size=0.05, lam=0.05, side="right", noise=noise)
    torch.testing.assert_close(a, b)
    # MYULA = BMUMLA with the Euclidean mirror
    from mcmc.mirror import Euclidean
    torch.testing.assert_close(myula_step(x, grad, g, step_size=0.05, lam=0.1, noise=noise),
                               bmumla_step(x, grad, g, Euclidean(), step_size=0.05, lam=0.1,
                                           noise=noise))


# ------------------------------------------------------------------------- Laplace target


def _laplace_run(method, mirror, step_size, steps, num_chains, side="left", seed=0):
    """Chains start from exact draws, so the run measures the sampler's stationary bias: the
    fast coordinates (a_i >= 3, relaxation time ~ 1/a_i^2) forget the start many times over."""
    x0 = torch.distributions.Laplace(torch.zeros(D), 1 / A).sample((num_chains,))
    out = sample_chains(x0, _zero_grad, L1(A), method=method, mirror=mirror, step_size=step_size,
                        side=side, num_samples=1, warmup_steps=steps - 1, seed=seed)
    return out[:, 0]


@pytest.mark.slow
@pytest.mark.parametrize("method,mirror", [("myula", None), ("bmumla", Hypentropy(0.1))])
def test_laplace_moments(method, mirror):
    torch.manual_seed(0)
    C = 10000
    x = _laplace_run(method, mirror, step_size=2e-4, steps=1500, num_chains=C)
    e_abs = x.abs().mean(0)
    var = x.var(0)
    rel_abs = e_abs * A - 1
    rel_var = var * A**2 / 2 - 1
    # Monte-Carlo SEs for reference (|x| ~ Exp(a): SE of E|x| relative = 1/sqrt(C);
    # Laplace kurtosis 6: SE of the variance relative = sqrt(5/C))
    print(f"\n{method}: E|x_i| a_i - 1 = {[round(v, 3) for v in rel_abs.tolist()]}"
          f" (SE {1 / math.sqrt(C):.3f});\n  Var x_i a_i^2/2 - 1 = "
          f"{[round(v, 3) for v in rel_var.tolist()]} (SE {math.sqrt(5 / C):.3f})")
    assert bool((rel_abs.abs() < 0.05).all())
    assert bool((rel_var.abs() < 0.05).all())


@pytest.mark.slow
def test_hypentropy_lowers_variance_bias_vs_myula():
    """Lau & Liu's claim: at the same (large) step, hypentropy BMUMLA's variance estimates are
    less biased than MYULA's. Measured (mean_i |Var_i a_i^2/2 - 1|, gamma = lam = 5e-3, 10^4
    chains): MYULA ~0.12, hypentropy beta=0.1 ~0.06 (halved), hypentropy beta=1 ~0.13 (no
    gain: beta must be small relative to the scales of the coordinates)."""
    C, gamma, steps = 10000, 5e-3, 600
    bias = {}
    for name, method, mirror in [("myula", "myula", None),
                                 ("hyp0.1", "bmumla", Hypentropy(0.1)),
                                 ("hyp1", "bmumla", Hypentropy(1.0))]:
        x = _laplace_run(method, mirror, gamma, steps, C, seed=3)
        bias[name] = float((x.var(0) * A**2 / 2 - 1).abs().mean())
    print(f"\nmean |relative variance bias| at gamma = lam = {gamma}: {bias}")
    # the per-coordinate MC error of the ratio is ~0.022, its mean over 10 coords ~0.01
    assert bias["hyp0.1"] < 0.7 * bias["myula"]
    assert bias["myula"] > 0.05  # the step is large enough for MYULA's bias to show


# ------------------------------------------------------------------------- box / simplex


@pytest.mark.slow
def test_box_uniform_mirror_stays_inside():
    """Uniform on a box: BMUMLA with the Fermi-Dirac (box-entropy) mirror never leaves the
    box; MYULA (same gamma = lam) puts a visible fraction of its draws outside."""
    C, gamma, steps = 10000, 1e-4, 1500
    dt = torch.float64
    lo = torch.tensor([-1.0, 2.0, 0.0], dtype=dt)
    hi = torch.tensor([1.0, 4.0, 3.0], dtype=dt)
    g = Box(lo, hi)
    x0 = lo + (hi - lo) * torch.rand(C, 3, dtype=dt, generator=torch.Generator().manual_seed(0))
    mean, var = (lo + hi) / 2, (hi - lo) ** 2 / 12
    res = {}
    for name, method, mirror in [("myula", "myula", None),
                                 ("bmumla_fd", "bmumla", FermiDirac(lo, hi))]:
        x = sample_chains(x0, lambda x: torch.zeros_like(x), g, method=method, mirror=mirror,
                          step_size=gamma, num_samples=1, warmup_steps=steps - 1,
                          seed=1)[:, 0]
        res[name] = x
        print(f"\n{name}: outside {(~g.contains(x)).double().mean():.4f}, mean z "
              f"{((x.mean(0) - mean) / (var / C).sqrt()).tolist()}, var ratio "
              f"{(x.var(0) / var).tolist()}")
    assert bool(g.contains(res["bmumla_fd"]).all())
    assert float((~g.contains(res["myula"])).double().mean()) > 0.01
    x = res["bmumla_fd"]
    z_mean = (x.mean(0) - mean) / (x.var(0) / C).sqrt()
    assert bool((z_mean.abs() < 4).all())
    # variance SE for a uniform (kurtosis 1.8): sqrt(0.8 / C) relative
    z_var = (x.var(0) / var - 1) / math.sqrt(0.8 / C)
    assert bool((z_var.abs() < 4).all()), z_var


@pytest.mark.slow
def test_dirichlet_simplex_mirror_stays_inside():
    C, gamma, steps = 4000, 5e-5, 1000
    alpha = torch.tensor([2.0, 3.0, 4.0, 1.5], dtype=torch.float64)
    a0 = alpha.sum()

    def grad_f(x):  # f = -sum_i (alpha_i - 1) log p_i in the first K-1 coordinates
        last = 1 - x.sum(-1, keepdim=True)
        return -(alpha[:-1] - 1) / x + (alpha[-1] - 1) / last

    x0 = torch.distributions.Dirichlet(alpha).sample((C,))[:, :-1]
    out = sample_chains(x0, grad_f, Simplex(), method="bmumla", mirror=SimplexEntropy(),
                        step_size=gamma, num_samples=1, warmup_steps=steps - 1,
                        seed=2)[:, 0]
    assert bool(SimplexEntropy().contains(out).all())
    p = SimplexEntropy.to_simplex(out)
    m = alpha / a0
    v = m * (1 - m) / (a0 + 1)
    z_mean = (p.mean(0) - m) / (p.var(0) / C).sqrt()
    print(f"\nDirichlet: mean z {z_mean.tolist()}, var ratio {(p.var(0) / v).tolist()}")
    assert bool((z_mean.abs() < 4).all())
    # SE of the sample variance from the draws: sqrt((m4 - var^2) / C)
    c = p - p.mean(0)
    se_var = (((c**4).mean(0) - p.var(0) ** 2) / C).sqrt()
    assert bool(((p.var(0) - v).abs() < 4 * se_var).all())


# ------------------------------------------------------------------------- Pyro kernel


def _laplace_model(scale):
    pyro.sample("beta", dist.Laplace(torch.zeros(3), scale).to_event(1))
    pyro.sample("tau", dist.Normal(1.0, 0.5))


def test_kernel_laplace_model_sample_chains_and_mcmc():
    scale = torch.tensor([1.0, 0.5, 0.25])
    kernel = BregmanProximalLangevin(_laplace_model, nonsmooth={"beta": L1(1 / scale)},
                                     mirror=Hypentropy(0.3), step_size=2e-3,
                                     seed=0)
    C = 1000
    init = {"beta": torch.distributions.Laplace(torch.zeros(3), scale).sample((C,)),
            "tau": 1.0 + 0.5 * torch.randn(C)}
    draws = kernel.sample_chains(5, num_chains=C, warmup_steps=200, thinning=40,
                                 model_args=(scale,), initial_params=init)
    assert draws["beta"].shape == (C, 5, 3) and draws["tau"].shape == (C, 5)
    b = draws["beta"].reshape(-1, 3)
    rel = b.abs().mean(0) / scale - 1
    t = draws["tau"].reshape(-1)
    print(f"\nkernel: E|beta| / scale - 1 = {rel.tolist()}, tau mean {t.mean():.3f} sd "
          f"{t.std():.3f}")
    # 5 weakly dependent draws x 1000 chains: SE of E|beta|/scale ~ 1/sqrt(1000) = 0.032
    assert bool((rel.abs() < 0.12).all())
    assert abs(float(t.mean()) - 1.0) < 0.1 and abs(float(t.std()) - 0.5) < 0.06
    # pyro.infer.MCMC interface (one chain)
    mcmc = pyro.infer.MCMC(kernel, num_samples=20, warmup_steps=5, disable_progbar=True)
    mcmc.run(scale)
    s = mcmc.get_samples()
    assert s["beta"].shape == (20, 3) and torch.isfinite(s["beta"]).all()


# ------------------------------------------------------------------------- defaults from the model

# f(beta) = sum_i a_i (beta_i - m_i)^2 / 2 with an l1 term w |beta|: a product of 1-d targets
# exp(-a (x - m)^2 / 2 - w |x|), so the mode and the exact moments are known.
QUAD_A = torch.tensor([4.0, 1.0])


def _quadratic_l1_model(m, w):
    beta = pyro.sample("beta", dist.Laplace(torch.zeros(2), 1 / w).to_event(1))
    pyro.factor("f", -0.5 * (QUAD_A * (beta - m) ** 2).sum(-1))


def test_default_step_size_is_a_tenth_of_the_relative_curvature_at_the_mode():
    """step_size=None: mode of f + g (m_i - w sign(m_i) / a_i when |m_i| a_i > w), curvature of f
    relative to the mirror map there, L = max_i a_i / phi''(mode_i), and gamma = 0.1 / L; lam
    follows gamma; chains start at the mode; an explicit step_size is used as given."""
    m, w, beta = torch.tensor([2.0, -3.0]), 1.0, 0.5
    mode = m - w * torch.sign(m) / QUAD_A  # [1.75, -2.0]
    cases = [("myula", None, float(QUAD_A.max())),
             ("bmumla", Hypentropy(beta), float((QUAD_A * (mode**2 + beta**2).sqrt()).max()))]
    for method, mirror, curvature in cases:
        kernel = BregmanProximalLangevin(_quadratic_l1_model, {"beta": L1(w)}, mirror,
                                         method=method, seed=0)
        assert kernel.logging() == {"step_size": "auto"}
        draws = kernel.sample_chains(1, num_chains=3, model_args=(m, w), progress=False,
                                     diagnostics=False)
        assert torch.allclose(kernel.mode[0], mode, atol=1e-3), kernel.mode
        assert kernel.step_size == pytest.approx(0.1 / curvature, rel=1e-3), method
        assert kernel.lam == kernel.step_size
        assert draws["beta"].shape == (3, 1, 2)
        assert float(kernel.logging()["step_size"]) == pytest.approx(kernel.step_size, rel=1e-2)
        kernel.reset()
        kernel.init_state(3)
        assert torch.equal(kernel.state.z, kernel.mode.expand(3, -1))
    explicit = BregmanProximalLangevin(_quadratic_l1_model, {"beta": L1(w)}, Hypentropy(beta),
                                       step_size=1e-3, lam=4e-3, seed=0)
    explicit.sample_chains(1, num_chains=2, model_args=(m, w), progress=False,
                           diagnostics=False)
    assert explicit.step_size == 1e-3 and explicit.lam == 4e-3 and explicit.mode is None


def test_default_step_size_checkpoint_resumes_bit_identically():
    m, w = torch.tensor([0.5, -1.0]), 1.0
    kernel = BregmanProximalLangevin(_quadratic_l1_model, {"beta": L1(w)}, Hypentropy(0.5),
                                     seed=1)
    kernel.sample_chains(5, num_chains=4, model_args=(m, w), progress=False, diagnostics=False)
    sd = kernel.state_dict()
    rest = kernel.sample_chains(5, num_chains=4, model_args=(m, w), progress=False,
                                diagnostics=False)
    resumed = BregmanProximalLangevin(_quadratic_l1_model, {"beta": L1(w)}, Hypentropy(0.5),
                                      seed=7)
    resumed.load_state_dict(sd)
    again = resumed.sample_chains(5, num_chains=4, model_args=(m, w), progress=False,
                                  diagnostics=False)
    assert resumed.step_size == kernel.step_size
    assert torch.equal(again["beta"], rest["beta"])


def _exact_moments(a: float, m: float, w: float) -> tuple[float, float]:
    x = torch.linspace(m - 12, m + 12, 200001, dtype=torch.float64)
    logp = -0.5 * a * (x - m) ** 2 - w * x.abs()
    p = (logp - logp.max()).exp()
    p = p / p.sum()
    mean = float((p * x).sum())
    return mean, float((p * (x - mean) ** 2).sum().sqrt())


@pytest.mark.parametrize("method,mirror", [("myula", None), ("bmumla", Hypentropy(0.5))])
def test_default_configuration_matches_the_exact_posterior(method, mirror):
    """The default-configured kernel (step size and start from the model) on a target that
    straddles the l1 kink (mode of beta_2 exactly 0): means within 0.05 sd of the exact ones
    (numerical integration), sds within 5 % (MYULA) / 8 % (hypentropy BMUMLA). Monte-Carlo SE
    with 500 chains x 40 draws: ~0.01 sd for a mean, ~1 % for an sd; the rest is the
    discretisation bias the rule bounds at the mode (variance +5 % on a Gaussian, sd +2.5 %)
    plus the envelope's (lam = gamma). Hypentropy's step grows with sqrt(x^2 + beta^2): one sd
    out, beta_1's local gamma L is 1.6x the mode's, hence the wider sd band (measured with
    seed 0: sd ratios 1.036 / 1.008 MYULA, 1.057 BMUMLA on beta_1)."""
    m, w = torch.tensor([0.5, -1.0]), 1.0
    kernel = BregmanProximalLangevin(_quadratic_l1_model, {"beta": L1(w)}, mirror,
                                     method=method, seed=0)
    draws = kernel.sample_chains(40, num_chains=500, warmup_steps=600, thinning=20,
                                 model_args=(m, w), progress=False)["beta"].reshape(-1, 2)
    for i in range(2):
        mean, sd = _exact_moments(float(QUAD_A[i]), float(m[i]), w)
        err = (float(draws[:, i].mean()) - mean) / sd
        ratio = float(draws[:, i].std()) / sd
        print(f"{method} beta_{i}: step {kernel.step_size:.3g}, mean error {err:+.3f} sd, "
              f"sd ratio {ratio:.3f}")
        assert abs(err) < 0.05 and abs(ratio - 1) < (0.05 if method == "myula" else 0.08)
    assert kernel.convergence.ok, kernel.convergence.summary


def test_default_step_size_errors_say_what_to_give():
    # a mode on the boundary of a barrier mirror's domain: the step cannot be measured there
    m, w = torch.tensor([-1.0, -1.0]), 1.0
    kernel = BregmanProximalLangevin(_quadratic_l1_model, {"beta": L1(w)}, BoltzmannShannon())
    with pytest.raises(ValueError, match=r"step_size=None.*site 'beta'.*positive orthant.*give "
                                         r"step_size"):
        kernel.sample_chains(1, num_chains=2, model_args=(m, w))

    # no smooth part: no curvature to measure
    def laplace_only():
        pyro.sample("x", dist.Laplace(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"step_size=None.*give step_size"):
        BregmanProximalLangevin(laplace_only, {"x": L1(1.0)}, Hypentropy(0.5)) \
            .sample_chains(1, num_chains=2)


# ------------------------------------------------------------------------- bad input


def test_bad_input():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="step_size"):
        myula_step(x, x, L1(1.0), step_size=0.0)
    with pytest.raises(ValueError, match="lam"):
        bmumla_step(x, x, L1(1.0), Hypentropy(1.0), step_size=0.1, lam=-1.0)
    with pytest.raises(ValueError, match="step_size"):
        BregmanProximalLangevin(_laplace_model, {"beta": L1(1.0)}, Hypentropy(1.0),
                                step_size=-1e-3)
    with pytest.raises(ValueError, match="lam"):
        BregmanProximalLangevin(_laplace_model, {"beta": L1(1.0)}, Hypentropy(1.0), lam=0.0)
    # unsupported (term, mirror): lists the supported pairs
    with pytest.raises(ValueError, match=r"Supported \(term, mirror, side\) pairs"):
        BregmanProximalLangevin(_laplace_model, {"beta": GroupL1(None, 1.0)}, Hypentropy(1.0))
    with pytest.raises(ValueError, match="no closed-form right"):
        sample_chains(torch.full((2, 2), 0.2), _zero_grad, L1(1.0), mirror=SimplexEntropy(),
                      method="bpg", step_size=1e-3, num_samples=1)
    # initial point outside the mirror domain: names the site and the domain
    kernel = BregmanProximalLangevin(_laplace_model, {"beta": L1(1.0)}, BoltzmannShannon(),
                                     step_size=1e-3)
    with pytest.raises(ValueError, match=r"site 'beta'.*positive orthant"):
        kernel.sample_chains(1, num_chains=2, model_args=(torch.ones(3),),
                             initial_params={"beta": -torch.ones(2, 3), "tau": torch.ones(2)})
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        kernel.sample_chains(1, num_chains=2, warmup_steps=-1, model_args=(torch.ones(3),))
    mcmc = pyro.infer.MCMC(kernel, num_samples=2, warmup_steps=0, disable_progbar=True,
                           initial_params={"beta": -torch.ones(3), "tau": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"site 'beta'.*positive orthant"):
        mcmc.run(torch.ones(3))
    with pytest.raises(ValueError, match=r"x0.*positive orthant"):
        sample_chains(-torch.ones(2, 3), _zero_grad, L1(1.0), mirror=BoltzmannShannon(),
                      step_size=1e-3, num_samples=1)
    # a nonsmooth site with a constrained support is rejected
    def constrained_model():
        pyro.sample("s", dist.HalfNormal(torch.ones(2)).to_event(1))

    with pytest.raises(ValueError, match=r"'s' has a constrained support"):
        BregmanProximalLangevin(constrained_model, {"s": L1(1.0)}, BoltzmannShannon()) \
            .sample_chains(1, num_chains=2)
    with pytest.raises(ValueError, match="nope"):
        BregmanProximalLangevin(_laplace_model, {"nope": L1(1.0)}, Hypentropy(1.0)) \
            .sample_chains(1, num_chains=2, model_args=(torch.ones(3),))
    with pytest.raises(ValueError, match="mirror map"):
        sample_chains(x, _zero_grad, L1(1.0), method="bmumla", mirror=None, step_size=1e-3,
                      num_samples=1)


def test_nan_detection():
    # a gradient that turns NaN at some point: reported with the iteration
    def bad_grad(x):
        return torch.where(x.abs() > 0.5, torch.full_like(x, float("nan")), x)

    with pytest.raises(FloatingPointError, match="iteration"):
        sample_chains(torch.zeros(8, 2), bad_grad, L1(1.0), method="myula", step_size=0.5,
                      num_samples=50, seed=0)

    # Burg: a dual iterate leaving (-inf, 0) has no primal image -> NaN -> reported
    with pytest.raises(FloatingPointError, match="iteration"):
        sample_chains(torch.full((8, 2), 5.0), _zero_grad, L1(0.1), method="bmumla",
                      mirror=Burg(), step_size=1.0, num_samples=50,
                      seed=0)

    # Pyro kernel: a model whose log density is NaN for some values -> names the site
    def nan_model():
        b = pyro.sample("beta", dist.Laplace(torch.zeros(2), 1.0).to_event(1))
        nan_or_one = torch.where(b.abs().sum(-1) > 0.5, torch.tensor(float("nan")),
                                 torch.tensor(1.0))
        pyro.factor("bad", -b.pow(2).sum(-1) * nan_or_one)

    kernel = BregmanProximalLangevin(nan_model, {"beta": L1(1.0)}, Hypentropy(1.0),
                                     step_size=0.5, seed=0)
    # (distribution validation would refuse the NaN factor itself; turn it off to reach the
    # sampler's own check)
    with pyro.validation_enabled(False), \
            pytest.raises(FloatingPointError, match=r"iteration.*beta|beta.*iteration"):
        kernel.sample_chains(50, num_chains=4,
                             initial_params={"beta": torch.zeros(4, 2)})


@pytest.mark.parametrize("method,mirror", [("myula", None), ("bmumla", Hypentropy(0.2))])
def test_pure_nonsmooth_target_has_a_zero_smooth_gradient(method, mirror):
    """A model whose only term is the marked Laplace prior: the smooth part does not depend on
    the site (its gradient is zero, not an autograd error) and the kernel samples the Laplace
    target, E|x| = b, Var x = 2 b^2 (measured bias at step_size = 2e-3: within 10 %)."""
    b = torch.tensor([1.0, 0.5])

    def laplace_only():
        pyro.sample("x", dist.Laplace(torch.zeros(2), b).to_event(1))

    kernel = BregmanProximalLangevin(laplace_only, {"x": L1(1 / b)}, mirror, method=method,
                                     step_size=2e-3, seed=0)
    C = 2000
    init = {"x": torch.distributions.Laplace(torch.zeros(2), b).sample((C,))}
    assert kernel.setup_potential().vectorization() == "plate"
    d = kernel.sample_chains(2, num_chains=C, warmup_steps=400, thinning=200,
                             initial_params=init, progress=False)["x"].reshape(-1, 2)
    assert bool((kernel.state.grad == 0).all())
    rel_abs = d.abs().mean(0) / b - 1
    rel_var = d.var(0) / (2 * b**2) - 1
    print(f"{method}: E|x|/b - 1 = {rel_abs.tolist()}, Var/(2b^2) - 1 = {rel_var.tolist()}")
    # SEs with 4000 weakly dependent draws: ~0.016 (E|x|), ~0.035 (Var)
    assert bool((rel_abs.abs() < 0.1).all()) and bool((rel_var.abs() < 0.15).all())


@pytest.mark.parametrize("method,mirror,side", [("myula", None, "left"),
                                                ("bmumla", Hypentropy(0.5), "right"),
                                                ("bpg", Hypentropy(0.5), "left")])
def test_kernel_methods_run(method, mirror, side):
    kernel = BregmanProximalLangevin(_laplace_model, {"beta": L1(2.0)}, mirror, method=method,
                                     side=side, step_size=1e-2,
                                     seed=0)
    draws = kernel.sample_chains(3, num_chains=4, warmup_steps=2, model_args=(torch.ones(3),))
    assert draws["beta"].shape == (4, 3, 3) and bool(torch.isfinite(draws["beta"]).all())


@pytest.mark.cuda
def test_steps_follow_cuda_tensors():
    dev = torch.device("cuda")
    x = torch.randn(64, 5, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.linspace(0.5, 2.0, 5, device=dev)
    for out in (myula_step(x, x, L1(w), step_size=1e-2, generator=g),
                bmumla_step(x, x, L1(w), Hypentropy(0.5), step_size=1e-2, generator=g),
                bmumla_step(x, x, L1(w), Hypentropy(0.5), step_size=1e-2, side="right",
                            generator=g),
                bregman_proximal_gradient_step(x, x, L1(w), Hypentropy(0.5), step_size=1e-2,
                                               generator=g)):
        assert out.device.type == "cuda" and bool(torch.isfinite(out).all())
    p = SimplexEntropy.from_simplex(torch.full((8, 4), 0.25, device=dev))
    assert bmumla_step(p, torch.zeros_like(p), Simplex(), SimplexEntropy(), step_size=1e-3,
                       generator=g).device.type == "cuda"
    from mcmc.prox import TV1D
    assert TV1D(0.5).prox(torch.randn(40, 9, device=dev), 1.0).device.type == "cuda"
