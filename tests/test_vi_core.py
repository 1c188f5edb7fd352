"""Statistical tests of the vi_estimators core: unbiased gradients for every estimator.

Vectorised gradient draws: the guide's parameters get one copy per particle (shape (P, 1, ...)),
so the gradient of the mean surrogate with respect to copy k is 1/P times particle k's gradient
draw. Means are compared with closed forms within 4 standard errors computed from the draws;
variances are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import models
import vi_estimators as vi
from models.zoo.discrete_mixture import ordered_prior

P = 20000  # vectorised gradient draws


def _draws(obj, model, guide, args, kwargs, names, num=P):
    """Per-particle gradient draws of the objective w.r.t. the unconstrained params ``names``."""
    loss = obj.differentiable_loss(model, guide, *args, **kwargs)
    leaves = [pyro.param(n).unconstrained() for n in names]
    grads = torch.autograd.grad(loss, leaves)
    return {n: -g * num for n, g in zip(names, grads)}


def _check_mean(draws: torch.Tensor, expected: torch.Tensor, label: str, z: float = 4.0):
    draws = draws.reshape(draws.shape[0], -1).double()
    expected = torch.as_tensor(expected, dtype=torch.float64).reshape(-1)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    print(f"{label}: mean {mean.tolist()} expected {expected.tolist()} se {se.tolist()} "
          f"var {draws.var(0).tolist()}")
    assert ((mean - expected).abs() <= z * se).all(), (label, mean, expected, se)
    return draws.var(0)


# ----------------------------------------------------------------------------- gamma-Poisson


def _gamma_poisson_setup(a0=2.0, b0=0.5, num=P):
    spec = models.get("gamma_poisson")
    pyro.param("a", torch.full((num, 1), a0), constraint=constraints.positive)
    pyro.param("b", torch.full((num, 1), b0), constraint=constraints.positive)
    A, B = spec.options["sum_x"], spec.options["num_obs"] + 1
    # closed-form ELBO gradient w.r.t. (a, b), chained to the unconstrained log a, log b
    ga = (A + 1 - a0) * torch.polygamma(1, torch.tensor(a0, dtype=torch.float64)) - B / b0 + 1
    gb = -A / b0 + B * a0 / b0**2 - 1 / b0
    return spec, spec.make_guide(), {"a": ga * a0, "b": torch.tensor(gb * b0)}


@pytest.mark.parametrize(
    "estimator",
    [
        vi.Reparam(),
        vi.Reinforce(),  # auto: RLOO over the particles
        vi.Reinforce(vi.RLOO()),
        vi.Reinforce(None),
        vi.Reinforce(vi.Constant(-60.0)),
        vi.Reinforce(vi.MovingAverage(0.5)),
        vi.Reinforce(
            vi.Learned(torch.nn.Linear(1, 1), inputs=lambda a, k: (a[0].mean().reshape(1),))
        ),
    ],
    ids=["reparam", "reinforce-auto", "reinforce-rloo", "reinforce-none", "reinforce-const",
         "reinforce-moving-average", "reinforce-learned"],
)
def test_elbo_gamma_poisson_unbiased(estimator):
    spec, guide, expected = _gamma_poisson_setup()
    obj = vi.ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1,
                  estimator=estimator)
    if isinstance(getattr(estimator, "baseline", None), vi.MovingAverage):
        # warm the moving average up: its value must come from earlier steps only
        obj.differentiable_loss(spec.model, guide, *spec.args, **spec.kwargs)
    g = _draws(obj, spec.model, guide, spec.args, spec.kwargs, ["a", "b"])
    _check_mean(g["a"], expected["a"], f"{estimator} d/dlog a")
    _check_mean(g["b"], expected["b"], f"{estimator} d/dlog b")


def test_pyro_trace_elbo_same_expected_gradient():
    """ELBO and pyro's Trace_ELBO agree in expectation (and in value for the same draws)."""
    spec, guide, expected = _gamma_poisson_setup()
    ours = _draws(vi.ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1),
                  spec.model, guide,
                  spec.args, spec.kwargs, ["a", "b"])
    pyro.set_rng_seed(3)
    theirs = _draws(pyro.infer.Trace_ELBO(num_particles=P, vectorize_particles=True,
                                          max_plate_nesting=1),
                    spec.model, guide, spec.args, spec.kwargs, ["a", "b"])
    for n in ("a", "b"):
        diff = ours[n].mean() - theirs[n].mean()
        se = (ours[n].var() / P + theirs[n].var() / P).sqrt()
        print(f"ELBO vs Trace_ELBO d/dlog {n}: diff {diff.item():.4f} se {se.item():.4f}")
        assert diff.abs() <= 4 * se
        _check_mean(theirs[n], expected[n], f"pyro d/dlog {n}")


# ----------------------------------------------------------------------------- Gaussian


def _gaussian_setup(num=P):
    spec = models.get("gaussian_conjugate")
    d = spec.options["dim"]
    loc0 = torch.tensor([0.5, -1.0, 2.0])[:d]
    tril0 = spec.kwargs["prior_scale_tril"] * 0.5
    pyro.param("mu_loc", loc0.expand(num, 1, d).clone())
    pyro.param("mu_scale_tril", tril0.expand(num, 1, d, d).clone(),
               constraint=constraints.lower_cholesky)
    post = spec.reference.analytic["mu"]
    prec = torch.linalg.inv(post.covariance_matrix)
    # E_q[log joint] = -(m - m_post)^T P (m - m_post) / 2 - tr(P S) / 2 + c
    # => d/dm = -P (m - m_post)
    expected = -prec.double() @ (loc0.double() - post.mean.double())
    return spec, spec.make_guide(), expected


@pytest.mark.parametrize(
    "estimator", [vi.Reparam(), vi.Reinforce(), vi.MVD()], ids=["reparam", "reinforce", "mvd"]
)
def test_elbo_gaussian_conjugate_loc_gradient(estimator):
    spec, guide, expected = _gaussian_setup()
    obj = vi.ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1,
                  estimator=estimator)
    g = _draws(obj, spec.model, guide, spec.args, spec.kwargs, ["mu_loc"])
    _check_mean(g["mu_loc"], expected, f"{estimator} d/dloc")


def test_mvd_univariate_normal_loc_and_scale():
    """MVD for a univariate Normal: d/dmu and d/dsigma of E[(x - 1)^2 + x^3] in closed form."""
    mu0, s0 = 0.3, 0.7

    def model():
        pass

    @vi.objective(num_particles=P, vectorize_particles=True, max_plate_nesting=0)
    def expectation(model, guide):
        with vi.particles():
            trace, _ = vi.sim(guide)
        x = trace.nodes["x"]["value"]
        # a continuation that is not a log-density: contract alternatives by hand
        return _contract(trace, (x - 1) ** 2 + x**3).reshape(P)

    def guide():
        mu = pyro.param("mu", torch.full((P,), mu0))
        s = pyro.param("s", torch.full((P,), s0), constraint=constraints.positive)
        pyro.sample("x", dist.Normal(mu, s), infer={"estimator": vi.MVD()})

    g = _draws(expectation, model, guide, (), {}, ["mu", "s"])
    # E = (mu-1)^2 + s^2 + mu^3 + 3 mu s^2 ; d/dmu = 2(mu-1) + 3mu^2 + 3s^2 ; d/ds = 2s + 6 mu s
    dmu = 2 * (mu0 - 1) + 3 * mu0**2 + 3 * s0**2
    ds = 2 * s0 + 6 * mu0 * s0
    _check_mean(g["mu"], dmu, "MVD normal d/dmu")
    _check_mean(g["s"], ds * s0, "MVD normal d/dlog s")


def _contract(trace, t):
    from vi_estimators.core import current_run

    return current_run().reduce(t, trace, "f")


# ----------------------------------------------------------------------------- discrete mixture

PM = 4000


def _mixture_guide_factory(num, n, est):
    def guide(x, weight_concentration, loc_prior_loc, loc_prior_scale, obs_scale,
              subsample_size=None):
        k = loc_prior_loc.shape[-1]
        conc = pyro.param("weights_concentration",
                          lambda: weight_concentration.expand(num, 1, k).clone(),
                          constraint=constraints.positive)
        loc = pyro.param("locs_loc", lambda: loc_prior_loc.expand(num, 1, k).clone())
        scale = pyro.param("locs_scale", lambda: 0.5 * loc_prior_scale.expand(num, 1, k).clone(),
                           constraint=constraints.positive)
        zp = pyro.param("z_probs",
                        lambda: torch.softmax(torch.randn(n, k, generator=torch.Generator()
                                                          .manual_seed(1)), -1).expand(num, n, k)
                        .clone(), constraint=constraints.simplex)
        pyro.sample("weights", dist.Dirichlet(conc))
        pyro.sample("locs", ordered_prior(loc, scale))
        with pyro.plate("data", n, subsample_size=subsample_size) as idx:
            pyro.sample("z", dist.Categorical(zp[..., idx, :]), infer={"estimator": est})

    return guide


@pytest.mark.parametrize("subsample_size", [None, 5])
def test_discrete_mixture_reinforce_mvd_enumerate_agree(subsample_size):
    """Same expected gradient from the three estimators of the assignments z (with subsampling:
    the same minibatch for all three, so conditional expectations are compared)."""
    spec = models.get("discrete_mixture", num_obs=10, with_reference=False)
    n = spec.args[0].shape[0]
    names = ["z_probs", "locs_loc", "weights_concentration"]
    results = {}
    for est in (vi.Enumerate(), vi.MVD(), vi.Reinforce()):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = _mixture_guide_factory(PM, n, est)
        obj = vi.ELBO(num_particles=PM, vectorize_particles=True, max_plate_nesting=1)
        results[type(est).__name__] = _draws(obj, spec.model, guide, spec.args,
                                             dict(spec.kwargs, subsample_size=subsample_size),
                                             names, PM)
    for name in names:
        ref = results["Enumerate"][name].reshape(PM, -1).double()
        for other in ("MVD", "Reinforce"):
            o = results[other][name].reshape(PM, -1).double()
            diff = o.mean(0) - ref.mean(0)
            se = (o.var(0) / PM + ref.var(0) / PM).sqrt().clamp_min(1e-6)
            print(f"{name}: {other} vs Enumerate max |diff|/se {(diff.abs() / se).max():.2f}; "
                  f"mean var Enumerate {ref.var(0).mean():.4g}, {other} {o.var(0).mean():.4g}")
            assert (diff.abs() <= 4 * se).all(), (name, other)
    # the z gradient: Enumerate < MVD < Reinforce in variance
    v = {k: r["z_probs"].reshape(PM, -1).var(0).sum() for k, r in results.items()}
    assert v["Enumerate"] < v["MVD"] < v["Reinforce"], v


# ----------------------------------------------------------------------------- IWELBO


def _repeat(obj, spec, guide, names, reps):
    out = {n: [] for n in names}
    leaves = [pyro.param(n).unconstrained() for n in names]
    for _ in range(reps):
        for leaf in leaves:
            leaf.grad = None
        obj.loss_and_grads(spec.model, guide, *spec.args, **spec.kwargs)
        for n, leaf in zip(names, leaves):
            out[n].append(-leaf.grad.clone())
    return {n: torch.stack(v) for n, v in out.items()}


def test_iwelbo_matches_pyro_renyi_and_vimco():
    """IWELBO (reparam), VIMCO (score function + leave-one-out) and Pyro's RenyiELBO(alpha=0)
    have the same expected gradient; the value equals Pyro's for the same draws."""
    spec = models.get("gamma_poisson")
    guide = spec.make_guide()
    pyro.param("a", torch.tensor(2.0), constraint=constraints.positive)
    pyro.param("b", torch.tensor(0.5), constraint=constraints.positive)
    k, reps = 5, 800
    pyro.set_rng_seed(7)
    ours_val = vi.IWELBO(num_particles=k).loss(spec.model, guide, *spec.args, **spec.kwargs)
    pyro.set_rng_seed(7)
    theirs_val = pyro.infer.RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True).loss(
        spec.model, guide, *spec.args, **spec.kwargs)
    assert abs(ours_val - theirs_val) < 1e-3 * abs(theirs_val)
    res = {
        "iwelbo": _repeat(vi.IWELBO(num_particles=k), spec, guide, ["a", "b"], reps),
        "vimco": _repeat(vi.VIMCO(num_particles=k), spec, guide, ["a", "b"], reps),
        "pyro": _repeat(pyro.infer.RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True),
                        spec, guide, ["a", "b"], reps),
    }
    for n in ("a", "b"):
        ref = res["pyro"][n]
        for other in ("iwelbo", "vimco"):
            o = res[other][n]
            diff = o.mean() - ref.mean()
            se = (o.var() / reps + ref.var() / reps).sqrt()
            print(f"IWELBO K={k} d/dlog {n}: {other} {o.mean():.3f} (var {o.var():.3g}) pyro "
                  f"{ref.mean():.3f} (var {ref.var():.3g}) diff/se {(diff / se).item():.2f}")
            assert diff.abs() <= 4 * se


# ----------------------------------------------------------------------------- structure


def _nested_model(data, subsample_size=None):
    g = pyro.sample("g", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", data.shape[0], dim=-2):
        loc = pyro.sample("loc", dist.Normal(g, 1.0))
        with pyro.plate("obs", data.shape[1], subsample_size=subsample_size, dim=-1) as idx:
            pyro.sample("y", dist.Normal(loc, 0.5), obs=data.index_select(-1, idx))


def _nested_guide(data, subsample_size=None):
    g_loc = pyro.param("g_loc", torch.tensor(0.1))
    loc_loc = pyro.param("loc_loc", torch.zeros(data.shape[0], 1))
    pyro.sample("g", dist.Normal(g_loc, 1.0))
    with pyro.plate("groups", data.shape[0], dim=-2):
        pyro.sample("loc", dist.Normal(loc_loc, 0.7))


@pytest.mark.parametrize("subsample_size", [None, 3])
@pytest.mark.parametrize("vectorize", [False, True])
def test_drop_in_trace_elbo_nested_plates(subsample_size, vectorize):
    """Same draws => same loss and gradients as Trace_ELBO (nested plates, subsampling,
    global + local latents, looped or vectorised particles)."""
    data = torch.randn(4, 6)
    results = []
    for loss_cls in (vi.ELBO, pyro.infer.Trace_ELBO):
        pyro.clear_param_store()
        pyro.set_rng_seed(11)
        loss_fn = loss_cls(num_particles=3, vectorize_particles=vectorize, max_plate_nesting=2)
        loss = loss_fn.differentiable_loss(_nested_model, _nested_guide, data,
                                           subsample_size=subsample_size)
        grads = torch.autograd.grad(loss, [pyro.param("g_loc"), pyro.param("loc_loc")])
        results.append((loss.detach(), grads))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("autoguide", [pyro.infer.autoguide.AutoNormal,
                                       pyro.infer.autoguide.AutoDelta])
def test_autoguides_svi(autoguide):
    spec = models.get("linear_regression")
    guide = autoguide(spec.model)
    results = []
    for loss_cls in (vi.ELBO, pyro.infer.Trace_ELBO):
        pyro.clear_param_store()
        pyro.set_rng_seed(5)
        guide = autoguide(spec.model)
        svi = pyro.infer.SVI(spec.model, guide, pyro.optim.Adam({"lr": 0.01}), loss_cls())
        results.append([svi.step(*spec.args, **spec.kwargs) for _ in range(5)])
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_svi_with_iwelbo_and_objective_decorator():
    spec = models.get("gamma_poisson")
    guide = spec.make_guide()

    @vi.objective(num_particles=4, vectorize_particles=True)
    def my_iwae(model, guide, *args, **kwargs):
        with vi.particles():
            trace, log_q = vi.sim(guide, *args, **kwargs)
            log_p = vi.density(model, trace, *args, **kwargs)
        return vi.logmeanexp(log_p - log_q)

    trajectories = []
    for loss in (my_iwae, pyro.infer.RenyiELBO(alpha=0, num_particles=4, vectorize_particles=True)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        svi = pyro.infer.SVI(spec.model, guide, pyro.optim.Adam({"lr": 0.1}), loss)
        losses = [svi.step(*spec.args, **spec.kwargs) for _ in range(200)]
        trajectories.append(losses + [pyro.param("a").item(), pyro.param("b").item()])
    # same draws => the same SVI trajectory as Pyro's IWAE implementation
    assert trajectories[0] == pytest.approx(trajectories[1], rel=1e-4)
    assert sum(trajectories[0][180:200]) < sum(trajectories[0][:20])


# ----------------------------------------------------------------------------- bad input


def test_reparam_on_discrete_site_names_it():
    def guide():
        pyro.sample("coin", dist.Bernoulli(0.3), infer={"estimator": vi.Reparam()})

    def model():
        pyro.sample("coin", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="'coin'.*Reinforce.*RSVI"):
        vi.ELBO().loss(model, guide)


def test_enumerate_on_continuous_site():
    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0), infer={"estimator": vi.Enumerate()})

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="Enumerate at site 'z'"):
        vi.ELBO().loss(model, guide)


def test_missing_sites_named():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("w", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="model sample site 'w'"):
        vi.ELBO().loss(model, guide)

    def guide2():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    # Pyro's check_model_guide_match warns first (as with Trace_ELBO), then the error names it
    with pytest.warns(UserWarning, match="guide but not model"), \
            pytest.raises(ValueError, match="guide sample site 'extra'"):
        vi.ELBO().loss(model, guide2)


def test_non_scalar_objective_error():
    @vi.objective
    def bad(model, guide):
        _, log_q = vi.sim(guide)
        return torch.stack([log_q, log_q])

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"scalar.*\(2,\)"):
        bad.loss(guide, guide)


def test_nan_names_first_bad_site():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        # a valid but degenerate likelihood: log-density -inf in float32
        pyro.sample("obs", dist.Normal(0.0, 1e-30), obs=torch.tensor(1e10))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="model log-density at site 'obs'"):
        vi.ELBO().differentiable_loss(model, guide)
    def nan_model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=torch.tensor(float("nan")))

    pyro.enable_validation(False)  # without validation: Pyro's NaN warning, as in Trace_ELBO
    try:
        with pytest.warns(UserWarning, match="loss"):
            vi.ELBO().loss(nan_model, guide)
    finally:
        pyro.enable_validation(True)


def test_rloo_needs_particles_and_sim_outside_program():
    def model():
        pyro.sample("c", dist.Bernoulli(0.5))

    def guide():
        pyro.sample("c", dist.Bernoulli(0.3), infer={"estimator": vi.Reinforce(vi.RLOO())})

    with pytest.raises(ValueError, match="RLOO baseline at site 'c'"):
        vi.ELBO(num_particles=1).differentiable_loss(model, guide)
    with pytest.raises(RuntimeError, match="inside an objective program"):
        vi.sim(guide)
    with pytest.raises(ValueError, match="vectorize_particles=True"):
        vi.IWELBO(num_particles=4, vectorize_particles=False)


@pytest.mark.cuda
def test_objectives_and_estimators_follow_cuda_tensors():
    spec = models.get("gamma_poisson", device="cuda")
    guide = spec.make_guide()
    for obj in (vi.ELBO(num_particles=8, vectorize_particles=True),
                vi.ELBO(estimator=vi.Reinforce()), vi.IWELBO(num_particles=8),
                vi.VIMCO(num_particles=8), vi.IWELBO(num_particles=8, path_gradient=True)):
        pyro.clear_param_store()
        loss = obj.differentiable_loss(spec.model, guide, *spec.args, **spec.kwargs)
        loss.backward()
        assert loss.device.type == "cuda" and pyro.param("a").unconstrained().grad is not None
    mix = models.get("discrete_mixture", device="cuda", with_reference=False)
    for est in (vi.Enumerate(), vi.MVD(), vi.Reinforce()):
        pyro.clear_param_store()
        g = pyro.poutine.infer_config(
            mix.make_guide(), lambda s, est=est: {"estimator": est} if s["name"] == "z" else {})
        loss = vi.ELBO(num_particles=4, vectorize_particles=True).differentiable_loss(
            mix.model, g, *mix.args, **mix.kwargs)
        loss.backward()
        assert loss.device.type == "cuda"


def test_alternatives_rejected_where_not_exact():
    """Enumerate/MVD contract term by term: non-linear programs (logmeanexp) and unsupported
    distributions raise; so does a score-function site downstream of an enumerated one."""
    def model():
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("y", dist.Normal(c, 1.0), obs=torch.tensor(0.3))

    def guide(est):
        pyro.sample("c", dist.Bernoulli(0.3), infer={"estimator": est})

    with pytest.raises(ValueError, match="linear in log p and log q"):
        vi.IWELBO(num_particles=3).loss(model, lambda: guide(vi.Enumerate()))
    with pytest.raises(ValueError, match="MVD at site 'g'.*supported"):
        vi.ELBO().loss(lambda: pyro.sample("g", dist.Gamma(2.0, 1.0)),
                       lambda: pyro.sample("g", dist.Gamma(2.0, 1.0),
                                           infer={"estimator": vi.MVD()}))

    def model2():
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("d", dist.Bernoulli(0.5 + 0.2 * c))

    def guide2():
        c = pyro.sample("c", dist.Bernoulli(0.3), infer={"estimator": vi.Enumerate()})
        pyro.sample("d", dist.Bernoulli(0.4 + 0.1 * c), infer={"estimator": vi.Reinforce()})

    with pytest.raises(NotImplementedError, match="site 'd'.*downstream.*'c'"):
        vi.ELBO(max_plate_nesting=0).loss(model2, guide2)


def test_enumerate_exact_elbo_bernoulli():
    """With every latent enumerated the ELBO is exact: its value and gradient are deterministic
    and match the closed form sum_c q(c) (log p(c, y) - log q(c))."""
    y = torch.tensor(0.3)

    def model():
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("y", dist.Normal(2.0 * c, 1.0), obs=y)

    def guide():
        p = pyro.param("p", torch.tensor(0.3), constraint=constraints.unit_interval)
        pyro.sample("c", dist.Bernoulli(p), infer={"estimator": vi.Enumerate()})

    loss = vi.ELBO(max_plate_nesting=0).differentiable_loss(model, guide)
    u = pyro.param("p").unconstrained()  # unit_interval: p = sigmoid(u)
    (grad,) = torch.autograd.grad(loss, [u])
    u2 = u.detach().clone().requires_grad_()
    p = torch.sigmoid(u2)
    exact = sum(
        q * (math.log(0.5) + dist.Normal(2.0 * c, 1.0).log_prob(y) - torch.log(q))
        for c, q in ((1.0, p), (0.0, 1 - p))
    )
    (g_exact,) = torch.autograd.grad(-exact, [u2])
    assert torch.allclose(loss, -exact.detach(), atol=1e-6)
    assert torch.allclose(grad, g_exact, atol=1e-5)


def test_learned_baseline_trains_and_reduces_variance():
    """The learned baseline is fitted on the squared residual through the surrogate (its value is
    unchanged) and, once trained, cuts the score-function variance like a good constant."""
    spec, guide, expected = _gamma_poisson_setup(num=2000)
    net = torch.nn.Linear(1, 1)
    torch.nn.init.zeros_(net.weight)
    torch.nn.init.zeros_(net.bias)
    learned = vi.Learned(net, inputs=lambda a, k: (a[0].mean().reshape(1),))
    obj = vi.ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1,
                  estimator=vi.Reinforce(learned))
    opt = torch.optim.Adam(net.parameters(), lr=5.0)
    for _ in range(60):  # train only the baseline (guide parameters stay fixed)
        opt.zero_grad()
        obj.differentiable_loss(spec.model, guide, *spec.args, **spec.kwargs).backward()
        opt.step()
    trained = _draws(obj, spec.model, guide, spec.args, spec.kwargs, ["a", "b"], 2000)
    none = _draws(vi.ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1,
                          estimator=vi.Reinforce(None)),
                  spec.model, guide, spec.args, spec.kwargs, ["a", "b"], 2000)
    ratio = none["a"].var() / trained["a"].var()
    print(f"learned baseline b = {net.bias.item():.1f}; variance reduction {ratio:.1f}x")
    assert ratio > 2.0
    _check_mean(trained["a"], expected["a"], "learned baseline d/dlog a")


def test_pyro_enumeration_config_warns_like_trace_elbo():
    def model():
        pyro.sample("c", dist.Bernoulli(0.5))

    @pyro.infer.config_enumerate
    def guide():
        pyro.sample("c", dist.Bernoulli(0.3))

    for loss in (vi.ELBO(), pyro.infer.Trace_ELBO()):
        with pytest.warns(UserWarning, match="TraceEnum_ELBO"):
            loss.loss(model, guide)


def test_baseline_shapes_and_moving_average_not_poisoned_by_nan():
    """A learned baseline may return one value per particle in any shape ((K, 1) from a Linear)
    or one shared value; a non-finite signal does not poison a moving average's later values."""
    from vi_estimators.baselines import BaselineInfo

    info = BaselineInfo(num_particles=4)
    per_particle = vi.Learned(torch.nn.Linear(1, 1), inputs=lambda a, k: (torch.ones(4, 1),))
    assert per_particle("z", torch.zeros(4), info).shape == (4,)
    shared = vi.Learned(torch.nn.Linear(1, 1), inputs=lambda a, k: (torch.ones(1),))
    assert shared("v", torch.zeros(4), info).shape == (4,)
    # default names are per site: two modules never share (and fight over) param-store entries
    store = pyro.get_param_store()
    assert store["learned_baseline[z]$$$bias"] is per_particle.module.bias
    assert store["learned_baseline[v]$$$bias"] is shared.module.bias
    bad = vi.Learned(torch.nn.Linear(1, 3), inputs=lambda a, k: (torch.ones(1),))
    with pytest.raises(ValueError, match="Learned baseline at site 'z'.*shape"):
        bad("z", torch.zeros(4), info)
    ma = vi.MovingAverage(0.5)
    ma("z", torch.full((4,), 2.0), info)
    ma("z", torch.tensor([1.0, float("nan"), 1.0, 1.0]), info)
    assert ma("z", torch.zeros(4), info).tolist() == [2.0] * 4
