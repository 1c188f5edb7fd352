"""Tests of the shipped objectives beyond the ELBO: path gradients (STL, DReG), Renyi, CUBO, RWS,
hierarchical guides (marginal, HVI, IWHVI, DIWHVI) and a VAE trained with IWELBO."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import models
import vi_estimators as vi

# ----------------------------------------------------------------------------- toy hierarchical

M0, S0, T0 = 0.3, 0.8, 0.6
X = torch.tensor(1.5)


def _model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _hier_guide(x):
    psi = pyro.sample("psi", dist.Normal(pyro.param("m", torch.tensor(M0)), S0))
    pyro.sample("z", dist.Normal(psi, T0))


def _exact_reverse(zd, x):
    """The exact q(psi | z) of the toy hierarchical guide."""
    v = S0**2 + T0**2
    z = zd["z"]
    pyro.sample("psi", dist.Normal(M0 + S0**2 / v * (z - M0), (S0**2 * T0**2 / v) ** 0.5))


def _prior_reverse(zd, x):
    pyro.sample("psi", dist.Normal(M0, S0))


Q_Z = dist.Normal(M0, (S0**2 + T0**2) ** 0.5)  # the guide's exact marginal over z


def _per_particle_values(obj_program, num):
    """Run a per-particle program once and return its (num,) values."""
    box = {}

    @vi.objective(num_particles=num, vectorize_particles=True, max_plate_nesting=0)
    def prog(model, guide, *args, **kwargs):
        value = obj_program(model, guide, *args, **kwargs)
        box["v"] = value.detach()
        return value

    prog.loss(_model, _hier_guide, X)
    return box["v"]


def test_marginal_with_exact_reverse_model_is_exact():
    def prog(model, guide, x):
        mg = vi.marginal(guide, keep=["z"], proposal=_exact_reverse, num_particles=3)
        with vi.particles():
            trace, log_q = vi.sim(mg, x)
        assert "psi" not in trace.nodes and "z" in trace.nodes
        return log_q - Q_Z.log_prob(trace.nodes["z"]["value"])

    err = _per_particle_values(prog, 1000)
    assert err.abs().max() < 1e-4


def _bound_values(num_inner, proposal, num=20000):
    def prog(model, guide, x):
        mg = vi.marginal(guide, keep=["z"], proposal=proposal, num_particles=num_inner)
        with vi.particles():
            trace, log_q = vi.sim(mg, x)
            log_p = vi.density(model, trace, x)
        return log_p - log_q

    return _per_particle_values(prog, num)


def test_hierarchical_bounds_are_ordered():
    """HVI <= IWHVI(M=10) <= the exact ELBO of the marginal guide, and IWHVI tightens with M."""
    z = Q_Z.sample((200000,))
    exact = (dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(X)
             - Q_Z.log_prob(z))
    true, true_se = exact.mean(), exact.std() / math.sqrt(exact.numel())
    vals = {
        "hvi": _bound_values(0, _prior_reverse),
        "iwhvi2": _bound_values(2, _prior_reverse),
        "iwhvi20": _bound_values(20, _prior_reverse),
        "iwhvi20-self": _bound_values(20, None),
    }
    means = {k: v.mean() for k, v in vals.items()}
    ses = {k: v.std() / math.sqrt(v.numel()) for k, v in vals.items()}
    print({k: (round(means[k].item(), 4), round(ses[k].item(), 4)) for k in vals},
          "exact", true.item())
    assert means["hvi"] + 4 * ses["hvi"] < means["iwhvi2"]
    assert means["iwhvi2"] + 4 * ses["iwhvi2"] < means["iwhvi20"]
    for k in ("iwhvi20", "iwhvi20-self"):
        assert means[k] <= true + 4 * (ses[k] ** 2 + true_se**2).sqrt()
        assert means[k] > true - 0.1  # close to the exact ELBO with 20 inner samples


def test_hvi_classes_run_and_train():
    for obj in (vi.HVI(["z"], _exact_reverse), vi.IWHVI(["z"], _prior_reverse, num_inner=5),
                vi.DIWHVI(["z"], _prior_reverse, num_inner=5, num_particles=4)):
        pyro.clear_param_store()
        svi = pyro.infer.SVI(_model, _hier_guide, pyro.optim.Adam({"lr": 0.05}), obj)
        for _ in range(5):
            loss = svi.step(X)
        assert math.isfinite(loss)
        assert pyro.param("m").item() != M0  # the guide parameter was updated through SVI


def test_hvi_rejects_path_gradient_and_discrete_inner_samples():
    for cls in (vi.HVI, vi.IWHVI):
        with pytest.raises(ValueError, match="path_gradient=True is not supported"):
            cls(["z"], _exact_reverse, path_gradient=True)

    def discrete_guide(x):
        c = pyro.sample("c", dist.Bernoulli(0.3))
        pyro.sample("z", dist.Normal(c, T0))

    with pytest.raises(ValueError, match="auxiliary site 'c'.*no rsample"):
        vi.IWHVI(["z"], None, num_inner=2).loss(_model, discrete_guide, X)


@pytest.mark.parametrize("cls", ["HVI", "IWHVI"])
def test_hvi_gradient_unbiased_with_exact_reverse_model(cls):
    """At m = M0 the exact reverse model r = q(psi | z) makes the HVI / IWHVI gap (>= 0, and 0
    there) stationary, so the expected gradient is the marginal ELBO's: d/dm = x - 2 m."""
    num = 20000
    pyro.param("m", torch.full((num,), M0))  # one copy per particle: per-draw gradients
    opts = {"num_particles": num, "vectorize_particles": True, "max_plate_nesting": 0}
    obj = vi.HVI(["z"], _exact_reverse, **opts) if cls == "HVI" else \
        vi.IWHVI(["z"], _exact_reverse, num_inner=3, **opts)
    loss = obj.differentiable_loss(_model, _hier_guide, X)
    (g,) = torch.autograd.grad(loss, [pyro.param("m")])
    g = -g.double() * num
    mean, se = g.mean(), g.std() / math.sqrt(num)
    expected = X.item() - 2 * M0
    print(f"{cls} d/dm: mean {mean:.4f} expected {expected:.4f} se {se:.4f} var {g.var():.4g}")
    assert (mean - expected).abs() <= 4 * se


# ----------------------------------------------------------------------------- Renyi / CUBO / RWS


def test_renyi_cubo_values_for_the_same_draws():
    spec = models.get("gamma_poisson")
    guide = spec.make_guide()

    def value(obj):
        pyro.set_rng_seed(3)
        return -obj.loss(spec.model, guide, *spec.args, **spec.kwargs)

    iw = value(vi.IWELBO(num_particles=6))
    assert value(vi.Renyi(0.0, num_particles=6)) == pytest.approx(iw, rel=1e-6)
    pyro.set_rng_seed(3)
    pyro_renyi = -pyro.infer.RenyiELBO(alpha=0.5, num_particles=6, vectorize_particles=True).loss(
        spec.model, guide, *spec.args, **spec.kwargs)
    assert value(vi.Renyi(0.5, num_particles=6)) == pytest.approx(pyro_renyi, rel=1e-5)
    # power means: ELBO-type mean log w <= IWELBO <= CUBO_2 for the same weights
    elbo_same = value(vi.Renyi(1.0, num_particles=6))
    cubo = -value(vi.CUBO(2.0, num_particles=6))
    assert elbo_same <= iw <= cubo
    with pytest.raises(ValueError, match="n must be > 1"):
        vi.CUBO(1.0)


# CUBO: 1-D model z ~ N(theta, 1), x | z ~ N(z, 1) (x = X), guide q = N(m, s).
CUBO_THETA, CUBO_M, CUBO_S = 0.2, 0.1, 1.1


def _cubo_log_l(theta, m, s):
    """Closed form of log E_q[w^2] = 2 log p(x) + log int post(z)^2 / q(z) dz (float64).

    ``post = N(a, v)``; ``N(z; a, v)^2 = N(z; a, v/2) / (2 sqrt(pi v))`` and
    ``int N(z; a, t) / N(z; m, s^2) dz = s/sqrt(t) sqrt(2 pi / A) exp(B^2 / 2A - C)`` with
    ``A = 1/t - 1/s^2``, ``B = a/t - m/s^2``, ``C = a^2/2t - m^2/2s^2``."""
    x = X.double()
    log_px = dist.Normal(theta, math.sqrt(2.0)).log_prob(x)
    a, v = (theta + x) / 2, 0.5
    t = v / 2
    big_a = 1 / t - 1 / s**2
    big_b = a / t - m / s**2
    big_c = a**2 / (2 * t) - m**2 / (2 * s**2)
    log_int = (torch.log(s) - 0.5 * math.log(t) + 0.5 * torch.log(2 * math.pi / big_a)
               + big_b**2 / (2 * big_a) - big_c)
    return 2 * log_px - math.log(2 * math.sqrt(math.pi * v)) + log_int


@pytest.mark.parametrize("mode", ["path", "pathwise", "reinforce"])
def test_cubo_gradient_unbiased_for_exponentiated_bound(mode):
    """-grad of CUBO's surrogate is unbiased for (1/n) exp(-n c) grad E_q[w^n] (model and guide
    parameters), for the doubly reparameterised form (default), the plain pathwise form and
    score-function draws (DiCE with RLOO baselines). P independent copies of the parameters,
    one particle each, give P independent gradient draws in one vectorised call."""
    num = 20000
    n = 2.0

    def model(x):
        z = pyro.sample("z", dist.Normal(pyro.param("theta", torch.full((num,), CUBO_THETA)), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("m", torch.full((num,), CUBO_M)),
                                     pyro.param("s", torch.full((num,), CUBO_S))))

    options = {"path": {}, "pathwise": {"path_gradient": False},
               "reinforce": {"path_gradient": False, "estimator": vi.Reinforce()}}[mode]
    obj = vi.CUBO(n, num_particles=num, max_plate_nesting=0, **options)
    exact = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
             for v in (CUBO_THETA, CUBO_M, CUBO_S)]
    log_l = _cubo_log_l(*exact)
    grad_log_l = torch.stack(torch.autograd.grad(log_l, exact))
    c = log_l.item() / n + 0.3  # a fixed constant, not the optimum: the multiple is checked too
    obj.shift = torch.tensor(c)
    loss = obj.differentiable_loss(model, guide, X)
    names = ["theta", "m", "s"]
    grads = torch.autograd.grad(loss, [pyro.param(k).unconstrained() for k in names])
    draws = torch.stack([g.double() * num for g in grads], 1)  # -grad S per copy
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(num)
    # (1/n) exp(-n c) grad L = (1/n) exp(log L - n c) grad log L
    expected = (log_l.detach() - n * c).exp() * grad_log_l / n
    print(f"CUBO {mode}: mean {mean.tolist()} expected {expected.tolist()} se {se.tolist()} "
          f"var {draws.var(0).tolist()}")
    assert obj.num_rescaled == 0  # the overflow guard did not touch these draws
    assert ((mean - expected).abs() <= 4 * se).all()
    # the reported value is still the CUBO estimate (1/n) log mean_k w_k^n
    assert loss.item() == pytest.approx(log_l.item() / n, abs=0.05)


def test_cubo_value_matches_the_draws_and_updates_the_constant():
    def model(x):
        z = pyro.sample("z", dist.Normal(CUBO_THETA, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(CUBO_M, CUBO_S))

    k, n = 7, 3.0
    for options in ({}, {"path_gradient": False}):
        obj = vi.CUBO(n, num_particles=k, max_plate_nesting=0, decay=0.5, **options)
        pyro.set_rng_seed(1)
        value = obj.differentiable_loss(model, guide, X).item()
        first = obj.shift.clone()
        pyro.set_rng_seed(1)
        z = dist.Normal(CUBO_M, CUBO_S).sample((k,))
        log_w = (dist.Normal(CUBO_THETA, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(X)
                 - dist.Normal(CUBO_M, CUBO_S).log_prob(z))
        cubo = ((torch.logsumexp(n * log_w, 0) - math.log(k)) / n).item()
        assert value == pytest.approx(cubo, abs=1e-5)
        assert first.item() == pytest.approx(cubo, abs=1e-5)  # c starts at the first batch
        pyro.set_rng_seed(2)
        second = obj.loss(model, guide, X)
        # c <- decay c + (1 - decay) (this batch's CUBO), after the batch used the old c
        assert obj.shift.item() == pytest.approx(0.5 * cubo + 0.5 * second, abs=1e-5)
        obj.reset()
        assert obj.shift is None


def test_cubo_overflow_guard_and_bad_options():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    obj = vi.CUBO(2.0, num_particles=4, max_plate_nesting=0)
    obj.shift = torch.tensor(-1e3)  # far below any log w: exp would overflow without the guard
    loss = obj.differentiable_loss(model, guide, X)
    assert obj.num_rescaled == 1 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="decay must be in"):
        vi.CUBO(2.0, decay=1.0)
    with pytest.raises(ValueError, match="max_exponent must be in"):
        vi.CUBO(2.0, max_exponent=0.0)
    with pytest.raises(TypeError, match="path_gradient must be"):
        vi.CUBO(2.0, path_gradient="yes")

    def discrete_model():
        pyro.sample("c", dist.Bernoulli(0.5))

    def discrete_guide():
        pyro.sample("c", dist.Bernoulli(pyro.param("p", torch.tensor(0.3),
                                                   constraint=constraints.unit_interval)))

    with pytest.raises(ValueError, match="site 'c' is not reparameterised"):
        vi.CUBO(2.0, num_particles=3, path_gradient=True).differentiable_loss(
            discrete_model, discrete_guide)
    # default: score-function sites switch to the plain form (runs, finite)
    assert math.isfinite(vi.CUBO(2.0, num_particles=3).loss(discrete_model, discrete_guide))


def _cubo_svi(spec, steps, loc0, tril0):
    pyro.param("mu_loc", loc0.clone())
    pyro.param("mu_scale_tril", tril0.clone(), constraint=constraints.lower_cholesky)
    obj = vi.CUBO(2.0, num_particles=8)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.1 ** (1 / steps)})
    svi = pyro.infer.SVI(spec.model, spec.make_guide(), optim, obj)
    for _ in range(steps):
        loss = svi.step(*spec.args, **spec.kwargs)
    loc = pyro.param("mu_loc").detach().double()
    tril = pyro.param("mu_scale_tril").detach().double()
    return loss, obj, loc, (tril @ tril.T).diagonal().sqrt()


def test_cubo_svi_converges_on_gaussian_conjugate():
    """From 6 posterior sd off with a 6x too wide guide, CUBO(2, K=8) reaches the exact
    posterior (the guide family contains it) and stays mass-covering."""
    spec = models.get("gaussian_conjugate")
    post = spec.reference.analytic["mu"]
    mean, sd = spec.reference.mean()["mu"].double(), spec.reference.variance()["mu"].double().sqrt()
    loss, obj, loc, q_sd = _cubo_svi(spec, 1200, post.mean.float() + 6 * sd.float(),
                                     6 * post.scale_tril.float())
    z = (loc - mean) / sd
    print(f"CUBO SVI: loss {loss:.3f}, (loc - mean)/sd {z.tolist()}, sd ratio "
          f"{(q_sd / sd).tolist()}, rescaled steps {obj.num_rescaled}")
    assert (z.abs() < 0.5).all()
    assert (q_sd >= 0.9 * sd).all() and (q_sd <= 1.5 * sd).all()


def test_cubo_svi_does_not_diverge_from_the_prior():
    """Regression: minus the K-sample CUBO estimate (the old objective) sent the guide scale to
    1e15 from the prior initialisation. Now the guide stays bounded and moves towards p."""
    spec = models.get("gaussian_conjugate")
    mean, sd = spec.reference.mean()["mu"].double(), spec.reference.variance()["mu"].double().sqrt()
    loc0, tril0 = spec.kwargs["prior_loc"], spec.kwargs["prior_scale_tril"]
    start = ((loc0.double() - mean) / sd).norm()
    loss, _, loc, q_sd = _cubo_svi(spec, 300, loc0, tril0)
    print(f"CUBO from the prior: |z| {start:.2f} -> {((loc - mean) / sd).norm():.2f}, "
          f"sd ratio {(q_sd / sd).tolist()}, loss {loss:.2f}")
    assert math.isfinite(loss) and loss > -1e3
    assert ((loc - mean) / sd).norm() < start
    assert (q_sd / sd).max() < 100


def test_rws_gradients_match_manual_formula():
    """Wake-theta / wake-phi gradients equal sum_k w~_k grad log p / grad log q at the draws."""
    def model(x):
        z = pyro.sample("z", dist.Normal(pyro.param("prior_loc", torch.tensor(0.2)), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("q_loc", torch.tensor(-0.4)), 0.9))

    k = 7
    pyro.set_rng_seed(0)
    loss = vi.RWS(num_particles=k, max_plate_nesting=0).differentiable_loss(model, guide, X)
    g_prior, g_q = torch.autograd.grad(loss, [pyro.param("prior_loc"), pyro.param("q_loc")])
    pyro.set_rng_seed(0)
    z = dist.Normal(torch.tensor(-0.4), 0.9).sample((k,))
    log_w = (dist.Normal(0.2, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(X)
             - dist.Normal(-0.4, 0.9).log_prob(z))
    w = torch.softmax(log_w, 0)
    assert torch.allclose(-g_prior, (w * (z - 0.2)).sum(), atol=1e-5)
    assert torch.allclose(-g_q, (w * (z + 0.4) / 0.81).sum(), atol=1e-5)


# ----------------------------------------------------------------------------- path gradients

P = 4000


def _gaussian_per_particle(at_posterior: bool):
    spec = models.get("gaussian_conjugate")
    post = spec.reference.analytic["mu"]
    d = spec.options["dim"]
    if at_posterior:
        loc0, tril0 = post.mean.float(), post.scale_tril.float()
    else:
        loc0, tril0 = torch.tensor([0.5, -1.0, 2.0])[:d], spec.kwargs["prior_scale_tril"] * 0.5
    pyro.param("mu_loc", loc0.expand(P, 1, d).clone())
    pyro.param("mu_scale_tril", tril0.expand(P, 1, d, d).clone(),
               constraint=constraints.lower_cholesky)
    prec = torch.linalg.inv(post.covariance_matrix).double()
    return spec, -prec @ (loc0.double() - post.mean.double())


def _grad_draws(obj, spec, names):
    loss = obj.differentiable_loss(spec.model, spec.make_guide(), *spec.args, **spec.kwargs)
    grads = torch.autograd.grad(loss, [pyro.param(n).unconstrained() for n in names])
    return [-g.reshape(P, -1) * P for g in grads]


def test_stl_zero_variance_at_posterior_and_unbiased_elsewhere():
    spec, _ = _gaussian_per_particle(at_posterior=True)
    stl = vi.ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1,
                  path_gradient=True)
    g_loc, g_tril = _grad_draws(stl, spec, ["mu_loc", "mu_scale_tril"])
    plain = vi.ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1)
    p_loc, p_tril = _grad_draws(plain, spec, ["mu_loc", "mu_scale_tril"])
    print(f"at the posterior: STL grad var {g_loc.var(0).max():.2e} {g_tril.var(0).max():.2e}; "
          f"plain {p_loc.var(0).max():.3g} {p_tril.var(0).max():.3g}")
    assert g_loc.abs().max() < 1e-3 and g_tril.abs().max() < 1e-3
    assert p_loc.var(0).min() > 0.1
    pyro.clear_param_store()
    spec, expected = _gaussian_per_particle(at_posterior=False)
    (g_loc,) = _grad_draws(stl, spec, ["mu_loc"])
    mean, se = g_loc.double().mean(0), g_loc.double().std(0) / math.sqrt(P)
    print("STL d/dloc", mean.tolist(), expected.tolist(), se.tolist())
    assert ((mean - expected).abs() <= 4 * se).all()


def _loop_grads(obj, model, guide, args, names, reps):
    leaves = [pyro.param(n).unconstrained() for n in names]
    out = []
    for _ in range(reps):
        for leaf in leaves:
            leaf.grad = None
        obj.loss_and_grads(model, guide, *args)
        out.append(torch.cat([-leaf.grad.reshape(-1) for leaf in leaves]))
    return torch.stack(out).double()


def test_dreg_unbiased_for_iwelbo_and_rws():
    """DReG has the same expected gradient as the standard estimators, with lower variance for
    the guide."""
    def model(x):
        z = pyro.sample("z", dist.Normal(pyro.param("prior_loc", torch.tensor(0.2)), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("q_loc", torch.tensor(-0.4)),
                                     pyro.param("q_scale", torch.tensor(0.9),
                                                constraint=constraints.positive)))

    names = ["prior_loc", "q_loc", "q_scale"]
    pyro.param("prior_loc", torch.tensor(0.2))
    pyro.param("q_loc", torch.tensor(-0.4))
    pyro.param("q_scale", torch.tensor(0.9), constraint=constraints.positive)
    reps, k = 400, 6
    for plain, dreg in ((vi.IWELBO(num_particles=k), vi.IWELBO(num_particles=k,
                                                                 path_gradient=True)),
                        (vi.RWS(num_particles=k), vi.RWS(num_particles=k, path_gradient=True))):
        a = _loop_grads(plain, model, guide, (X,), names, reps)
        b = _loop_grads(dreg, model, guide, (X,), names, reps)
        diff = a.mean(0) - b.mean(0)
        se = (a.var(0) / reps + b.var(0) / reps).sqrt()
        print(f"{type(plain).__name__}: plain {a.mean(0).tolist()} var {a.var(0).tolist()}; "
              f"DReG {b.mean(0).tolist()} var {b.var(0).tolist()}")
        assert (diff.abs() <= 4 * se).all()
        assert (b.var(0)[1:] < a.var(0)[1:]).all()  # guide parameters: lower variance


def test_path_gradient_rejects_score_function_sites():
    def model():
        pyro.sample("c", dist.Bernoulli(0.5))

    def guide():
        pyro.sample("c", dist.Bernoulli(pyro.param("p", torch.tensor(0.3),
                                                   constraint=constraints.unit_interval)))

    with pytest.raises(ValueError, match="site 'c' is not reparameterised"):
        vi.IWELBO(num_particles=3, path_gradient=True).differentiable_loss(model, guide)


# ----------------------------------------------------------------------------- VAE


@pytest.mark.slow
def test_vae_digits_trains_with_iwelbo():
    """SVI with IWELBO(num_particles=5) on vae_digits: the held-out IWELBO (K=50) per digit
    improves by more than 8 nats within ~40 s of CPU."""
    spec = models.get("vae_digits")
    guide = spec.make_guide()
    (x_test,), test_kwargs = spec.heldout
    evaluate = vi.IWELBO(num_particles=50)

    def heldout():
        with torch.no_grad():
            return -evaluate.loss(spec.model, guide, x_test, **test_kwargs) / x_test.shape[0]

    svi = pyro.infer.SVI(spec.model, guide, pyro.optim.Adam({"lr": 3e-3}),
                         vi.IWELBO(num_particles=5))
    before = heldout()
    for _ in range(600):
        svi.step(*spec.args, subsample_size=128, **spec.kwargs)
    after = heldout()
    print(f"held-out IWELBO per digit: {before:.2f} -> {after:.2f}")
    assert after > before + 8.0
