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
