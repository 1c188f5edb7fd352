"""RSVI (Naesseth et al. 2017): unbiasedness against closed forms, the role of g_cor, boosting."""

import itertools

import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from torch.distributions import Dirichlet, Gamma, Multinomial, Poisson

import models
from vi_estimators.rejection import (
    RSVI,
    mt_eps_from_gamma,
    mt_log_accept_density,
    mt_proposal,
    rsvi_beta,
    rsvi_dirichlet,
    rsvi_gamma,
    rsvi_sample,
    rsvi_surrogate,
)

S = 20000  # draws per estimate (each draw is one single-sample gradient)


def _gamma_poisson():
    spec = models.get("gamma_poisson", dtype=torch.float64)
    x = spec.args[0]
    return x, x.sum(), x.numel() + 1


def _closed_form_grad(A, B, a, b):
    """d ELBO / d(a, b) for prior Gamma(1,1), Poisson likelihood, guide Gamma(a, b).

    ELBO = A (psi(a) - log b) - B a / b + a - log b + lgamma(a) + (1 - a) psi(a) + const, so
    d/da = (A + 1 - a) psi'(a) - B / b + 1 and d/db = -A / b + B a / b^2 - 1 / b.
    """
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.stack([(A + 1 - a) * torch.polygamma(1, a) - B / b + 1,
                        -A / b + B * a / b**2 - 1 / b])


def _elbo_integrand(x, z, a, b):
    return (Poisson(z.unsqueeze(-1)).log_prob(x).sum(-1) + Gamma(1.0, 1.0).log_prob(z)
            - Gamma(a, b).log_prob(z))


def _per_draw_grads(x, a0, b0, method, boost=1, drop_gcor=False):
    """(S, 2) single-draw ELBO gradients in (a, b): one independent draw per row."""
    a = torch.full((S,), a0, dtype=torch.float64, requires_grad=True)
    b = torch.full((S,), b0, dtype=torch.float64, requires_grad=True)
    if method == "rsvi":
        z, log_pi = rsvi_gamma(a, b, boost=boost)
        f = _elbo_integrand(x, z, a, b)
        sur = rsvi_surrogate(f, log_pi.detach() if drop_gcor else log_pi)
    elif method == "implicit":  # torch's implicit reparameterisation gradient
        z = Gamma(a, b).rsample()
        sur = _elbo_integrand(x, z, a, b)
    elif method == "reinforce":
        z = Gamma(a, b).sample()
        f = _elbo_integrand(x, z, a, b)
        lq = Gamma(a, b).log_prob(z)
        sur = f + f.detach() * (lq - lq.detach())
    ga, gb = torch.autograd.grad(sur.sum(), [a, b])
    return torch.stack([ga, gb], -1)


def test_marsaglia_tsang_pieces():
    alpha = torch.tensor([0.5, 1.5, 5.0, 50.0], dtype=torch.float64)
    eps = torch.tensor([-0.3, 0.1, 1.2, -2.0], dtype=torch.float64)
    z = mt_proposal(eps, alpha)
    assert torch.allclose(mt_eps_from_gamma(z, alpha), eps, atol=1e-12)
    # the accepted-eps density integrates to 1 (it is a change of variables of Gamma(alpha))
    grid = torch.linspace(-40, 40, 400001, dtype=torch.float64)
    for a in alpha:
        c = (9 * a - 3) ** -0.5
        lo = -1 / c + 1e-9
        e = grid[grid > lo]
        mass = torch.trapezoid(mt_log_accept_density(e, a.expand_as(e)).exp(), e)
        assert mass.item() == pytest.approx(1.0, abs=2e-4)


@pytest.mark.parametrize("boost", [0, 2])
def test_rsvi_draws_are_gamma_beta_dirichlet(boost):
    torch.manual_seed(0)
    a, b = torch.tensor(1.7, dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64)
    z, _ = rsvi_gamma(a, b, boost=boost, sample_shape=(20000,))
    assert scipy.stats.kstest(z.numpy(), scipy.stats.gamma(1.7, scale=1 / 2.5).cdf).pvalue > 1e-3
    x, _ = rsvi_beta(torch.tensor(0.9), torch.tensor(2.0), boost=boost + 1, sample_shape=(20000,))
    assert scipy.stats.kstest(x.numpy(), scipy.stats.beta(0.9, 2.0).cdf).pvalue > 1e-3
    p, lp = rsvi_dirichlet(torch.tensor([0.5, 1.0, 3.0]), boost=boost + 1, sample_shape=(20000,))
    assert lp.shape == (20000,)
    assert torch.allclose(p.sum(-1), torch.ones(20000))
    se = p.std(0) / 20000**0.5
    assert ((p.mean(0) - torch.tensor([0.5, 1.0, 3.0]) / 4.5).abs() < 4 * se).all()


@pytest.mark.parametrize("shape", [0.5, 1.5, 5.0, 50.0])
def test_rsvi_unbiased_gamma_poisson_elbo_gradient(shape):
    torch.manual_seed(0)
    x, A, B = _gamma_poisson()
    b0 = 2.0 * shape / 3.0 + 1.0  # a moderate rate, so b-gradients are informative too
    exact = _closed_form_grad(A, B, shape, b0)
    rows = []
    for method in ("rsvi", "implicit", "reinforce"):
        g = _per_draw_grads(x, shape, b0, method, boost=1)
        mean, se = g.mean(0), g.std(0) / S**0.5
        rows.append((method, g.var(0)))
        print(f"shape {shape} {method:9s} mean {mean.numpy().round(4)} exact "
              f"{exact.numpy().round(4)} z {((mean - exact) / se).numpy().round(2)} "
              f"var {g.var(0).numpy()}")
        assert ((mean - exact).abs() < 4 * se).all(), method
    assert rows[0][1][0] < rows[2][1][0]  # RSVI beats the score-function estimator on d/da


def test_dropping_gcor_is_biased():
    """g_rep alone (no correction term) misses the shape-gradient: the bias is many SEs."""
    torch.manual_seed(0)
    x, A, B = _gamma_poisson()
    exact = _closed_form_grad(A, B, 1.5, 2.0)
    g = _per_draw_grads(x, 1.5, 2.0, "rsvi", boost=0, drop_gcor=True)
    z = (g.mean(0)[0] - exact[0]) / (g.std(0)[0] / S**0.5)
    print("z-score of the d/da bias without g_cor:", z.item())
    assert z.abs() > 6
    g_full = _per_draw_grads(x, 1.5, 2.0, "rsvi", boost=0)
    assert (g_full.mean(0)[0] - exact[0]).abs() < 4 * g_full.std(0)[0] / S**0.5


def test_dirichlet_variance_falls_with_boost():
    """The correction term g_cor's variance falls by orders of magnitude as B grows; the total
    gradient variance falls too (towards the reparameterisation floor) and every B agrees in mean.
    """
    torch.manual_seed(0)
    spec = models.get("dirichlet_multinomial", dtype=torch.float64)
    counts, alpha0, n = spec.args[0], spec.kwargs["concentration"], spec.kwargs["total_count"]
    conc0 = torch.tensor([0.5, 0.7, 1.0, 1.5, 2.0], dtype=torch.float64)
    R = 5000

    def integrand(p, c):
        return (Multinomial(n, probs=p.unsqueeze(-2)).log_prob(counts).sum(-1)
                + Dirichlet(alpha0).log_prob(p) - Dirichlet(c).log_prob(p))

    total, gcor, means = [], [], []
    for boost in [0, 1, 2, 4]:
        c = conc0.expand(R, -1).clone().requires_grad_(True)
        p, log_pi = rsvi_dirichlet(c, boost=boost)
        f = integrand(p, c)
        (g_cor,) = torch.autograd.grad((f.detach() * log_pi).sum(), c, retain_graph=True)
        (g,) = torch.autograd.grad(rsvi_surrogate(f, log_pi).sum(), c)
        total.append(g.var(0).sum().item())
        gcor.append(g_cor.var(0).sum().item())
        means.append((g.mean(0), g.std(0) / R**0.5))
    c = conc0.expand(R, -1).clone().requires_grad_(True)
    p = Dirichlet(c).rsample()
    (g_imp,) = torch.autograd.grad(integrand(p, c).sum(), c)
    print("Dirichlet gradient variance, B = 0, 1, 2, 4: total", total, "g_cor part", gcor,
          "torch implicit rsample", g_imp.var(0).sum().item())
    assert all(v1 > 2 * v2 for v1, v2 in itertools.pairwise(gcor))
    assert total[0] > total[1] > total[-1]
    # every boost estimates the same gradient (and so does torch's implicit rsample)
    for m, s in means[1:] + [(g_imp.mean(0), g_imp.std(0) / R**0.5)]:
        m0, s0 = means[0]
        assert ((m0 - m).abs() < 4 * (s0**2 + s**2).sqrt()).all()


def test_loo_baseline_on_gcor_is_unbiased_and_reduces_variance():
    torch.manual_seed(0)
    x, A, B = _gamma_poisson()
    K, R = 4, 5000
    exact = _closed_form_grad(A, B, 1.5, 2.0)[0]
    out = {}
    for loo in (False, True):
        a = torch.full((R, 1), 1.5, dtype=torch.float64, requires_grad=True)
        z, log_pi = rsvi_gamma(a.expand(R, K), torch.tensor(2.0, dtype=torch.float64), boost=0)
        f = _elbo_integrand(x, z, a.expand(R, K), 2.0)
        sur = rsvi_surrogate(f, log_pi, particle_dim=1 if loo else None).mean(1)
        (g,) = torch.autograd.grad(sur.sum(), a)
        g = g.squeeze(1)
        assert (g.mean() - exact).abs() < 4 * g.std() / R**0.5
        out[loo] = g.var().item()
    print("K=4 variance of d/da: plain", out[False], "leave-one-out", out[True])
    assert out[True] < out[False]


def test_rsvi_sample_wrappers_and_bad_input():
    conc = torch.tensor([1.0, 2.0])
    v, lp = rsvi_sample(dist.Gamma(conc, 1.0).expand((3, 2)).to_event(1))
    assert v.shape == (3, 2) and lp.shape == (3,)
    with pytest.raises(ValueError, match="supported distributions: Gamma, Beta, Dirichlet"):
        rsvi_sample(dist.Normal(0.0, 1.0), site="z")
    with pytest.raises(ValueError, match="boost must be an integer >= 0"):
        RSVI(boost=-1)
    with pytest.raises(ValueError, match="must exceed 1/3"):
        rsvi_gamma(torch.tensor(0.2), boost=0)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        rsvi_surrogate(torch.zeros(1, 3), torch.zeros(1, 3), particle_dim=0)


@pytest.mark.parametrize("shape", [0.5, 5.0])
def test_rsvi_estimator_through_the_core_elbo(shape):
    """``infer={"estimator": RSVI()}`` in a guide, gradients from ``ELBO.differentiable_loss``."""
    import pyro
    from torch.distributions import constraints

    from vi_estimators.objectives import ELBO

    torch.manual_seed(0)
    spec = models.get("gamma_poisson", dtype=torch.float64)
    _, A, B = _gamma_poisson()
    b0 = 2.0

    def guide(x, subsample_size=None):
        a = pyro.param("a", torch.tensor(shape, dtype=torch.float64),
                       constraint=constraints.positive)
        b = pyro.param("b", torch.tensor(b0, dtype=torch.float64), constraint=constraints.positive)
        pyro.sample("rate", dist.Gamma(a, b), infer={"estimator": RSVI(boost=1)})

    obj = ELBO(num_particles=500, vectorize_particles=True, max_plate_nesting=1)
    grads = []
    for _ in range(20):  # 20 x 500 = 10^4 draws; the SE comes from the 20 replicate means
        loss = obj.differentiable_loss(spec.model, guide, *spec.args)
        a, b = pyro.param("a"), pyro.param("b")
        ga, gb = torch.autograd.grad(loss, [a.unconstrained(), b.unconstrained()])
        grads.append(torch.stack([-ga / a.detach(), -gb / b.detach()]))  # chain rule: exp
    g = torch.stack(grads)
    exact = _closed_form_grad(A, B, shape, b0)
    se = g.std(0) / len(g) ** 0.5
    print(f"core ELBO + RSVI, shape {shape}: mean {g.mean(0).numpy()} exact {exact.numpy()} "
          f"se {se.numpy()}")
    assert ((g.mean(0) - exact).abs() < 4 * se).all()


def test_rsvi_estimator_on_unsupported_site_lists_supported():
    import pyro

    from vi_estimators.objectives import ELBO

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1.0), infer={"estimator": RSVI()})

    with pytest.raises(ValueError, match="RSVI does not support Normal at site 'z'.*Gamma, Beta"):
        ELBO().differentiable_loss(model, guide)


def test_rsvi_with_rloo_and_one_particle_raises():
    import pyro
    from torch.distributions import constraints

    from vi_estimators import RLOO
    from vi_estimators.objectives import ELBO

    spec = models.get("gamma_poisson")

    def guide(x, subsample_size=None):
        a = pyro.param("a", torch.tensor(1.5), constraint=constraints.positive)
        pyro.sample("rate", dist.Gamma(a, 2.0), infer={"estimator": RSVI(baseline=RLOO())})

    elbo = ELBO(num_particles=1, vectorize_particles=True, max_plate_nesting=1)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        elbo.differentiable_loss(spec.model, guide, *spec.args)


@pytest.mark.cuda
def test_rsvi_runs_on_cuda():
    conc = torch.tensor([0.5, 1.0, 3.0], device="cuda", requires_grad=True)
    p, log_pi = rsvi_dirichlet(conc, boost=2, sample_shape=(10,))
    assert p.device.type == "cuda" and log_pi.device.type == "cuda"
    (p[:, 0].sum() + log_pi.sum()).backward()
    assert conc.grad.device.type == "cuda"
