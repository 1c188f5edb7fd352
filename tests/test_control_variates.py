"""Control variates: the g - c (h - E h) layer, Taylor (Miller et al. 2017) and diagonal
quadratic (Geffner & Domke 2020) CVs for Gaussian guides; mean unchanged, variance reported."""

import pytest
import torch

from vi_estimators.control_variates import (
    DiagQuadraticCV,
    PreviousStepCoefficient,
    apply_control_variate,
    optimal_coefficient,
    reparam_gradients,
    taylor_control_variate,
)

D, K, R = 4, 8, 2000  # R replicates of K particles: 16000 single-draw gradients


def log_p(z):
    """A non-Gaussian target with closed-form Gaussian expectations of its gradient."""
    return (torch.sin(z).sum(-1) - 0.05 * (z**4).sum(-1)
            + 0.3 * (z[..., :-1] * z[..., 1:]).sum(-1))


MU = torch.tensor([0.3, -0.5, 1.0, 0.1], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 0.8, 0.3, 0.6], dtype=torch.float64)


def exact_gradients(mu=MU, sig=SIGMA):
    """d/dmu and d/dsigma of E_{N(mu, sig^2)} log_p (E sin = sin(mu) e^{-s^2/2}, E z^4 = ...)."""
    e = torch.exp(-(sig**2) / 2)
    zero = mu.new_zeros(1)
    neighbours = torch.cat([mu[1:], zero]) + torch.cat([zero, mu[:-1]])
    g_mu = torch.cos(mu) * e - 0.2 * (mu**3 + 3 * mu * sig**2) + 0.3 * neighbours
    g_sig = -sig * torch.sin(mu) * e - 0.05 * (12 * mu**2 * sig + 12 * sig**3)
    return g_mu, g_sig


def _draws(seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(R, K, D, generator=g, dtype=torch.float64)
    gl, gs = reparam_gradients(log_p, MU, SIGMA, eps.reshape(-1, D))
    return eps, gl.reshape(R, K, D), gs.reshape(R, K, D)


def _check(name, g_loc, g_scale, plain=None):
    """Mean within 4 SE of the exact gradient (SE over the R replicate means)."""
    ex_loc, ex_scale = exact_gradients()
    out = {}
    for part, g, ex in (("loc", g_loc, ex_loc), ("scale", g_scale, ex_scale)):
        m = g.mean(1)  # (R, D) replicate estimates
        se = m.std(0) / R**0.5
        z = (m.mean(0) - ex) / se
        assert (z.abs() < 4).all(), (name, part, z)
        out[part] = m.var(0).sum().item()
    if plain is not None:
        print(f"{name}: variance reduction loc x{plain['loc'] / out['loc']:.2f}, "
              f"scale x{plain['scale'] / out['scale']:.2f}")
    return out


def test_plain_reparam_gradient_matches_closed_form():
    _, gl, gs = _draws()
    _check("plain", gl, gs)


def test_taylor_cv_keeps_mean_and_reduces_variance():
    eps, gl, gs = _draws()
    plain = _check("plain", gl, gs)
    (hl, hs), (ml, ms) = taylor_control_variate(log_p, MU, SIGMA, eps.reshape(-1, D))
    hl, hs = hl.reshape(R, K, D), hs.reshape(R, K, D)
    # E h is exact: compare with the Monte-Carlo mean of h (i.i.d. draws), coordinate-wise
    for h, m in ((hl, ml), (hs, ms)):
        flat = h.reshape(-1, D)
        assert ((flat.mean(0) - m).abs() <= 4 * flat.std(0) / flat.shape[0] ** 0.5).all()
    for coef in (1.0, "loo"):
        out = _check(f"taylor c={coef}",
                     apply_control_variate(gl, hl, ml, dim=1, coefficient=coef),
                     apply_control_variate(gs, hs, ms, dim=1, coefficient=coef), plain)
        assert out["loc"] < plain["loc"]


def test_diag_quadratic_cv_keeps_mean_and_reduces_variance():
    eps, gl, gs = _draws(seed=1)
    plain = _check("plain", gl, gs)
    cv = DiagQuadraticCV(decay=0.9)
    out_l, out_s = [], []
    for r in range(R):  # coefficients from previous steps only
        (hl, hs), (ml, ms) = cv(SIGMA, eps[r])
        out_l.append(apply_control_variate(gl[r], hl, ml, dim=0, coefficient=1.0))
        out_s.append(apply_control_variate(gs[r], hs, ms, dim=0, coefficient=1.0))
        cv.update(gl[r], SIGMA, eps[r])
    out = _check("diag quadratic", torch.stack(out_l), torch.stack(out_s), plain)
    assert out["loc"] < plain["loc"] and out["scale"] < plain["scale"]


def test_previous_step_coefficient_on_the_whole_objective():
    """CV on a scalar objective estimate (the whole ELBO integrand) with c from past steps."""
    eps, _, _ = _draws(seed=2)
    z = MU + SIGMA * eps
    f = log_p(z)  # (R, K) objective values
    mu = MU.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(log_p(mu), mu)
    h = (g0 * SIGMA * eps).sum(-1)  # linearisation of f around mu: E h = 0
    coef = PreviousStepCoefficient(decay=0.9)
    corrected = torch.stack([apply_control_variate(f[r], h[r], 0.0, dim=0, coefficient=coef)
                             for r in range(R)])
    m0, m1 = f.mean(1), corrected.mean(1)
    # paired replicates (same draws): the SE of the mean change comes from the differences
    diff = m1 - m0
    se = diff.std() / R**0.5
    print(f"whole-objective CV: variance reduction x{(m0.var() / m1.var()).item():.2f}; "
          f"mean change {diff.mean().item():.2e} (se {se.item():.2e})")
    assert diff.mean().abs() < 4 * se
    assert m1.var() < m0.var()


def test_loo_coefficient_excludes_own_particle():
    g = torch.randn(6, 3, dtype=torch.float64)
    h = torch.randn(6, 3, dtype=torch.float64)
    c = optimal_coefficient(g, h, dim=0)
    for k in range(6):
        keep = [j for j in range(6) if j != k]
        gk, hk = g[keep], h[keep]
        cov = ((gk - gk.mean(0)) * (hk - hk.mean(0))).mean(0)
        assert torch.allclose(c[k], cov / hk.var(0, unbiased=False))
    joint = optimal_coefficient(g, h, dim=0, joint=True)
    assert joint.shape == (6, 1)


def test_bad_input():
    with pytest.raises(ValueError, match=">= 2 particles"):
        optimal_coefficient(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="coefficient must be 'loo'"):
        apply_control_variate(torch.zeros(3, 2), torch.zeros(3, 2), 0.0, coefficient="best")
    with pytest.raises(ValueError, match="decay must be in"):
        PreviousStepCoefficient(decay=1.0)
    with pytest.raises(ValueError, match="decay must be in"):
        DiagQuadraticCV(decay=-0.1)


@pytest.mark.slow
def test_taylor_cv_term_inside_a_core_objective():
    """A custom objective program subtracting the zero-valued Taylor CV term: the ELBO gradient
    keeps its mean (closed form) and loses variance."""
    import pyro
    import pyro.distributions as dist
    from torch.distributions import constraints

    from vi_estimators import density, objective, particles, sim
    from vi_estimators.control_variates import taylor_cv_term

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(D, dtype=torch.float64), 10.0).to_event(1))
        pyro.factor("f", log_p(z))

    def guide():
        loc = pyro.param("loc", MU.clone())
        scale = pyro.param("scale", SIGMA.clone(), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def make(use_cv):
        @objective(num_particles=16, vectorize_particles=True, max_plate_nesting=0)
        def elbo(model, guide):
            with particles():
                trace, log_q = sim(guide)
                log_p_total = density(model, trace)
            value = log_p_total - log_q
            if use_cv:
                value = value - taylor_cv_term(
                    log_p, pyro.param("loc"), pyro.param("scale"), trace.nodes["z"]["value"])
            return value

        return elbo

    ex_loc, ex_scale = exact_gradients()
    ex_loc = ex_loc - MU / 100.0  # N(0, 10^2) prior
    ex_scale = ex_scale - SIGMA / 100.0 + 1.0 / SIGMA  # prior and entropy
    R, var = 300, {}
    for use_cv in (False, True):
        obj, grads = make(use_cv), []
        for _ in range(R):
            loss = obj.differentiable_loss(model, guide)
            params = [pyro.param("loc").unconstrained(), pyro.param("scale").unconstrained()]
            gl, gu = torch.autograd.grad(-loss, params)
            grads.append(torch.cat([gl, gu / pyro.param("scale").detach()]))  # d/d scale
        g = torch.stack(grads)
        z = (g.mean(0) - torch.cat([ex_loc, ex_scale])) / (g.std(0) / R**0.5)
        assert (z.abs() < 4).all(), (use_cv, z)
        var[use_cv] = g.var(0).sum().item()
    print(f"Taylor CV term in a core objective: variance reduction x{var[False] / var[True]:.2f}")
    assert var[True] < var[False]
