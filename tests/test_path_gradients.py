"""Path gradients: stopped-parameter log q (STL, DReG) and fast flow path gradients."""

import warnings

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as PT
import pytest
import torch
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal
from torch.distributions import constraints
from torch.distributions import transforms as TT

import models
from vi_estimators import flows
from vi_estimators.flows import (
    FlowPathGradient,
    dropin_stopped_log_prob,
    fast_path_surrogate,
    flow_sample_and_score,
    forward_kl_path_surrogate,
)
from vi_estimators.path import stopped_log_prob, stopped_trace

PARTICLES = "num_particles_vectorized"


def _per_particle_log_p(model, guide_trace, *args, **kwargs):
    """Model log joint per particle (particle plate at dim -2), via Pyro's replay."""
    tr = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    tr.compute_log_prob()
    total = 0.0
    for site in tr.nodes.values():
        if site["type"] == "sample":
            lp = site["log_prob"]
            total = total + (lp.reshape(lp.shape[0], -1).sum(-1) if lp.dim() >= 2 else lp)
    return total


# --------------------------------------------------------------------------- STL


def test_stl_has_zero_variance_at_the_posterior():
    spec = models.get("gaussian_conjugate", dtype=torch.float64)
    # exact posterior for the model's own (float32-rounded) prior and noise factors
    x, kw = spec.args[0], spec.kwargs
    s0_inv = torch.cholesky_inverse(kw["prior_scale_tril"])
    sig_inv = torch.cholesky_inverse(kw["obs_scale_tril"])
    cov = torch.linalg.inv(s0_inv + x.shape[0] * sig_inv)
    post = dist.MultivariateNormal(cov @ (s0_inv @ kw["prior_loc"] + sig_inv @ x.sum(0)),
                                   covariance_matrix=(cov + cov.T) / 2)
    assert torch.allclose(post.mean, spec.reference.analytic["mu"].mean, atol=1e-5)
    guide = spec.make_guide()
    pyro.param("mu_loc", post.mean.clone())
    pyro.param("mu_scale_tril", post.scale_tril.clone(), constraint=constraints.lower_cholesky)
    K = 32
    stl, std = [], []
    for _ in range(10):
        with pyro.plate(PARTICLES, K, dim=-2):
            tr = pyro.poutine.trace(guide).get_trace(*spec.args, **spec.kwargs)
            log_p = _per_particle_log_p(spec.model, tr, *spec.args, **spec.kwargs)
            log_q_stl = stopped_log_prob(guide, tr, *spec.args, **spec.kwargs)
        tr.compute_log_prob()
        log_q = tr.nodes["mu"]["log_prob"].reshape(K)
        assert log_q_stl.shape == (K,)
        assert torch.allclose(log_q_stl, log_q)  # same value, only the gradient differs
        params = [pyro.param("mu_loc").unconstrained(), pyro.param("mu_scale_tril").unconstrained()]
        g_stl = torch.autograd.grad((log_p - log_q_stl).mean(), params, retain_graph=True)
        g_std = torch.autograd.grad((log_p - log_q).mean(), params)
        stl.append(torch.cat([g.reshape(-1) for g in g_stl]))
        std.append(torch.cat([g.reshape(-1) for g in g_std]))
    stl, std = torch.stack(stl), torch.stack(std)
    print("max |STL grad| at the posterior:", stl.abs().max().item(),
          "std of standard (Trace_ELBO-style) grad:", std.std(0).max().item())
    assert stl.abs().max() < 1e-9  # every draw: exactly zero up to rounding
    assert std.std(0).max() > 1e-2  # the standard estimator is noisy there


def test_stl_autonormal_and_unconstrained_and_subsampling():
    """PyroModule params (AutoNormal), ``.unconstrained()`` inside a guide, replayed subsamples."""
    x = torch.randn(10, dtype=torch.float64)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", 10, subsample_size=4) as idx:
            z = pyro.sample("z", dist.Normal(mu.sum(-1, keepdim=True).squeeze(-1), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    auto = AutoNormal(pyro.poutine.block(model, hide=["z"]))

    def guide(x):
        auto(x)
        t = pyro.param("t", torch.tensor(1.5, dtype=torch.float64), constraint=constraints.positive)
        s = t.unconstrained().exp()  # .unconstrained() must keep working (and be stopped)
        with pyro.plate("data", 10, subsample_size=4):
            loc = pyro.param("loc", torch.zeros(10, dtype=torch.float64), event_dim=0)
            pyro.sample("z", dist.Normal(loc, s))

    tr = pyro.poutine.trace(guide).get_trace(x)
    tr.compute_log_prob()
    lq = stopped_log_prob(guide, tr, x)
    scale = tr.nodes["z"]["scale"]
    expected = sum(tr.nodes[n]["log_prob_sum"] for n in ("mu_unconstrained", "mu", "z"))
    assert scale == pytest.approx(2.5)
    assert torch.allclose(lq, expected)
    # gradient only through the sample: d/dloc log q(z(loc); stop) = scale * -(z - loc) / s^2
    # at the replayed subsample indices (the explicit d/dloc term is stopped), zero elsewhere
    (g_loc,) = torch.autograd.grad(lq, [pyro.param("loc")])
    idx = tr.nodes["data"]["value"]
    z, s = tr.nodes["z"]["value"], pyro.param("t").detach().log().exp()
    expected_g = torch.zeros(10, dtype=torch.float64)
    expected_g[idx] = -scale * (z - pyro.param("loc").detach()[idx]) / s**2
    assert torch.allclose(g_loc, expected_g)


# --------------------------------------------------------------------------- DReG


def _dreg_setup(R, D=3, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) + 1.0
    loc0 = torch.randn(D, generator=g, dtype=torch.float64) * 0.3
    scale0 = torch.full((D,), 0.8, dtype=torch.float64)

    def guide():
        loc = pyro.param("loc", loc0.expand(R, 1, D).clone())
        scale = pyro.param("scale", scale0.expand(R, 1, D).clone(), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def log_joint(z):  # z ~ N(0, I), x_n ~ N(z, I)
        prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        return prior + dist.Normal(z.unsqueeze(-2), 1.0).log_prob(x).sum((-1, -2))

    return guide, log_joint


def _iwae_grads(K, dreg, R=400):
    """(R, 2D) per-replicate gradients of the IWAE bound w.r.t. (loc, log-scale)."""
    pyro.clear_param_store()
    guide, log_joint = _dreg_setup(R)
    with pyro.plate("replicates", R, dim=-2), pyro.plate(PARTICLES, K, dim=-1):
        tr = pyro.poutine.trace(guide).get_trace()
        z = tr.nodes["z"]["value"]  # (R, K, D)
        # stopped_trace keeps every batch dim (replicates x particles) of each site's log q
        log_q = stopped_trace(guide, tr).nodes["z"]["log_prob"] if dreg else dist.Normal(
            pyro.param("loc"), pyro.param("scale")).to_event(1).log_prob(z)
    log_w = log_joint(z) - log_q  # (R, K)
    if dreg:  # Tucker et al. (2019), eq. 7: squared normalised weights on the path term
        w = torch.softmax(log_w.detach(), dim=-1)
        surrogate = (w**2 * log_w).sum(-1)
    else:
        surrogate = torch.logsumexp(log_w, -1)
    params = [pyro.param("loc"), pyro.param("scale").unconstrained()]
    grads = torch.autograd.grad(surrogate.sum(), params)
    return torch.cat([g.reshape(R, -1) for g in grads], -1)


@pytest.mark.slow
def test_dreg_unbiased_and_snr_grows_with_k():
    snr = {}
    for K in [4, 32, 256]:
        g_iwae, g_dreg = _iwae_grads(K, dreg=False), _iwae_grads(K, dreg=True)
        R = g_iwae.shape[0]
        diff = g_iwae.mean(0) - g_dreg.mean(0)
        se = (g_iwae.var(0) / R + g_dreg.var(0) / R).sqrt()
        assert (diff.abs() < 4 * se).all(), (K, (diff / se))
        snr[K] = tuple((g.mean(0).abs() / g.std(0)).mean().item() for g in (g_iwae, g_dreg))
    print("mean SNR (IWAE, DReG) by K:", snr)
    assert snr[256][1] > snr[4][1]  # DReG's encoder SNR grows with K ...
    assert snr[256][0] < snr[4][0]  # ... the standard IWAE encoder's shrinks
    assert all(snr[k][1] > snr[k][0] for k in (32, 256))


# --------------------------------------------------------------------------- flows


@pytest.fixture
def float64():
    # Pyro's AffineAutoregressive inverse allocates with the default dtype.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _random_flow(D=5, seed=0, unsupported=False):
    torch.manual_seed(seed)
    ts = [PT.affine_coupling(D, hidden_dims=[8]), PT.Permute(torch.randperm(D)),
          PT.spline_coupling(D, hidden_dims=[8]), PT.affine_autoregressive(D, hidden_dims=[8]),
          TT.AffineTransform(0.3 * torch.randn(D, dtype=torch.float64),
                             torch.rand(D, dtype=torch.float64) + 0.5),
          TT.SigmoidTransform(), TT.SigmoidTransform().inv, TT.ExpTransform()]
    if unsupported:
        ts.insert(1, PT.householder(D))
    for t in ts:
        if isinstance(t, torch.nn.Module):
            t.double()
            with torch.no_grad():
                for p in t.parameters():
                    p.add_(0.3 * torch.randn_like(p))
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1)
    params = [p for t in ts if isinstance(t, torch.nn.Module) for p in t.parameters()]
    return (lambda: dist.TransformedDistribution(base, ts)), params


def _log_p(x):
    return -0.5 * ((x - 1.0) ** 2).sum(-1) - 0.1 * (x**4).sum(-1)


def _max_rel_diff(g1, g2):
    return max(((a - b).abs().max() / (1 + b.abs().max())).item() for a, b in zip(g1, g2))


def test_fast_path_equals_dropin_reverse_kl(float64):
    make, params = _random_flow()
    torch.manual_seed(1)
    loss_fast, x1 = fast_path_surrogate(make(), _log_p, (64,))
    g_fast = torch.autograd.grad(loss_fast, params)
    torch.manual_seed(1)
    loss_drop, x2 = FlowPathGradient(fast=False)(make(), _log_p, (64,))
    g_drop = torch.autograd.grad(loss_drop, params)
    assert torch.equal(x1, x2)
    assert loss_fast.item() == pytest.approx(loss_drop.item(), rel=1e-10)
    err = _max_rel_diff(g_fast, g_drop)
    print("fast vs drop-in reverse-KL path gradient, max rel diff:", err)
    assert err < 1e-5


def test_fast_path_equals_dropin_forward_kl(float64):
    make, params = _random_flow(seed=3)
    with torch.no_grad():
        x = make().sample((64,))
    xr = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(_log_p(xr).sum(), xr)
    g_fast = torch.autograd.grad(forward_kl_path_surrogate(make(), x, score), params)
    # drop-in: x0 = T^-1(x) attached; log p0(x0) = log p(T_stop(x0)) + log|det J_stop(x0)|,
    # with log p only through its score (linear surrogate s . T_stop(x0)).
    d = make()
    flow = TT.ComposeTransform(list(d.transforms))
    x0 = flow.inv(x.clone())
    def pulled_back():
        x0v = x0.view_as(x0)
        y = flow(x0v)
        return (score * y).sum(-1) + flow.log_abs_det_jacobian(x0v, y)

    loss = (flows.stopped_flow_call(d, pulled_back) - d.base_dist.log_prob(x0)).mean()
    g_drop = torch.autograd.grad(loss, params)
    err = _max_rel_diff(g_fast, g_drop)
    print("fast vs drop-in forward-KL path gradient, max rel diff:", err)
    assert err < 1e-5


def test_unsupported_transform_falls_back_with_one_warning(float64):
    make, params = _random_flow(seed=2, unsupported=True)
    flows._WARNED.discard("Householder")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.manual_seed(1)
        loss, _ = fast_path_surrogate(make(), _log_p, (16,))
        fast_path_surrogate(make(), _log_p, (16,))
    msgs = [str(w.message) for w in rec if "Householder" in str(w.message)]
    assert len(msgs) == 1 and "falling back" in msgs[0]
    g1 = torch.autograd.grad(loss, params)
    torch.manual_seed(1)
    loss2, _ = FlowPathGradient(fast=False)(make(), _log_p, (16,))
    assert _max_rel_diff(g1, torch.autograd.grad(loss2, params)) < 1e-5


def test_score_recursion_matches_autograd_score(float64):
    make, _ = _random_flow(seed=4)
    x, log_q, score = flow_sample_and_score(make(), (8,))
    xv = x.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(dropin_stopped_log_prob(make(), xv).sum(), xv)
    assert torch.allclose(score, expected, rtol=1e-6, atol=1e-8)
    assert torch.allclose(log_q, make().log_prob(x.detach()), rtol=1e-8)


def test_autoguide_flow_stopped_log_prob():
    """Flow autoguides hold nn.Parameters: they are stopped via functional_call."""
    x = torch.randn(10)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", 10):
            pyro.sample("x", dist.Normal(mu.sum(-1), 1.0), obs=x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guide = AutoIAFNormal(model, num_transforms=2)
        guide(x)
    tr = pyro.poutine.trace(guide).get_trace(x)
    tr.compute_log_prob()
    lq = stopped_log_prob(guide, tr, x)
    expected = sum(s["log_prob_sum"] for s in tr.nodes.values() if s["type"] == "sample"
                   and not s["is_observed"])
    assert torch.allclose(lq, expected, atol=1e-5)
    # d/dtheta log q_stop(z(theta)) equals score . dz/dtheta computed by hand
    latent = tr.nodes["_AutoIAFNormal_latent"]["value"]
    zv = latent.detach().requires_grad_(True)
    d = tr.nodes["_AutoIAFNormal_latent"]["fn"]
    (s,) = torch.autograd.grad(dropin_stopped_log_prob(d, zv).sum(), zv)
    params = list(guide.parameters())
    g1 = torch.autograd.grad(lq, params, allow_unused=True, retain_graph=True)
    g2 = torch.autograd.grad((s * latent).sum(), params, allow_unused=True)
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            assert torch.allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_unstoppable_guide_raises():
    flow = PT.affine_coupling(2)
    x = torch.randn(3)

    def guide(x):  # the flow's parameters are reached through a closure, not the guide
        pyro.module("flow", flow)
        pyro.sample("mu", dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0)
                                                       .to_event(1), [flow]))

    tr = pyro.poutine.trace(guide).get_trace(x)
    # also when first called under no_grad (e.g. SVI.evaluate_loss): the check must not be
    # skipped and the guide then remembered as checked
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(
            ValueError, match="cannot be evaluated at stopped parameters"
        ):
            stopped_log_prob(guide, tr, x)


def test_guide_without_log_prob_raises():
    class NoDensity(dist.Normal):
        def log_prob(self, value):
            raise NotImplementedError

    def guide():
        loc = pyro.param("loc", torch.zeros(()))
        pyro.sample("z", NoDensity(loc, 1.0))

    tr = pyro.poutine.trace(guide).get_trace()
    with pytest.raises(ValueError, match="site 'z'.*cannot be evaluated"):
        stopped_log_prob(guide, tr)


def test_non_invertible_flow_raises_clear_error():
    torch.manual_seed(0)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [PT.planar(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="cannot be evaluated at stopped parameters.*Planar"):
            flow_sample_and_score(d, (4,))


def test_elbo_path_gradient_with_flow_autoguide_fast_equals_dropin():
    """ELBO(path_gradient=True) on an AutoNormalizingFlow (RealNVP-style) guide: the cache-based
    fast path inside ``stopped_log_prob`` gives the drop-in (inverse-pass) gradient."""
    from functools import partial

    from pyro.infer.autoguide import AutoNormalizingFlow

    from vi_estimators.objectives import ELBO

    spec = models.get("gaussian_conjugate")

    def realnvp(dim):
        ts = []
        for _ in range(3):
            ts += [PT.affine_coupling(dim, hidden_dims=[16]), PT.Permute(torch.arange(dim).flip(0))]
        return PT.ComposeTransformModule(ts)

    guide = AutoNormalizingFlow(spec.model, partial(realnvp))
    elbo = ELBO(num_particles=16, vectorize_particles=True, path_gradient=True,
                max_plate_nesting=1)
    elbo.differentiable_loss(spec.model, guide, *spec.args, **spec.kwargs)  # set up params
    params = list(guide.parameters())
    grads, engaged = {}, []
    original = flows.fast_flow_site_log_prob

    def spy(site):
        out = original(site)
        engaged.append(out is not None)
        return out

    for fast in (True, False):
        flows.USE_FAST_FLOW_PATH = fast
        flows.fast_flow_site_log_prob = spy
        try:
            pyro.set_rng_seed(3)
            loss = elbo.differentiable_loss(spec.model, guide, *spec.args, **spec.kwargs)
            grads[fast] = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            flows.USE_FAST_FLOW_PATH = True
            flows.fast_flow_site_log_prob = original
    assert any(engaged)  # the flow site really took the fast path
    for a, b in zip(grads[True], grads[False]):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- through the core


def _posterior_guide_params(spec):
    x, kw = spec.args[0], spec.kwargs
    s0_inv = torch.cholesky_inverse(kw["prior_scale_tril"])
    sig_inv = torch.cholesky_inverse(kw["obs_scale_tril"])
    cov = torch.linalg.inv(s0_inv + x.shape[0] * sig_inv)
    loc = cov @ (s0_inv @ kw["prior_loc"] + sig_inv @ x.sum(0))
    return loc, torch.linalg.cholesky((cov + cov.T) / 2)


def _core_guide_grads(obj, spec, guide, reps):
    out = []
    for _ in range(reps):
        loss = obj.differentiable_loss(spec.model, guide, *spec.args, **spec.kwargs)
        params = [pyro.param("mu_loc").unconstrained(),
                  pyro.param("mu_scale_tril").unconstrained()]
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out)


def test_core_elbo_path_gradient_is_stl_with_zero_variance_at_posterior():
    from vi_estimators.objectives import ELBO

    spec = models.get("gaussian_conjugate", dtype=torch.float64)
    loc, tril = _posterior_guide_params(spec)
    guide = spec.make_guide()
    pyro.param("mu_loc", loc.clone())
    pyro.param("mu_scale_tril", tril.clone(), constraint=constraints.lower_cholesky)
    stl = _core_guide_grads(ELBO(num_particles=8, vectorize_particles=True, path_gradient=True,
                                 max_plate_nesting=1), spec, guide, 5)
    std = _core_guide_grads(ELBO(num_particles=8, vectorize_particles=True,
                                 max_plate_nesting=1), spec, guide, 5)
    print("core ELBO at the posterior: max |STL grad|", stl.abs().max().item(),
          "max |standard grad|", std.abs().max().item())
    assert stl.abs().max() < 1e-9 and std.abs().max() > 1e-2


@pytest.mark.slow
def test_core_iwelbo_path_gradient_is_unbiased_dreg():
    from vi_estimators.objectives import IWELBO

    spec = models.get("gaussian_conjugate", dtype=torch.float64)
    loc, tril = _posterior_guide_params(spec)
    guide = spec.make_guide()
    pyro.param("mu_loc", loc + 0.5)  # away from the posterior: a non-zero gradient
    pyro.param("mu_scale_tril", 1.5 * tril, constraint=constraints.lower_cholesky)
    R, K = 200, 32
    g_dreg = _core_guide_grads(IWELBO(num_particles=K, path_gradient=True, max_plate_nesting=1),
                               spec, guide, R)
    g_iwae = _core_guide_grads(IWELBO(num_particles=K, max_plate_nesting=1), spec, guide, R)
    live = (g_iwae.var(0) > 0) & (g_dreg.var(0) > 0)  # unused (upper-triangle) coordinates
    g_dreg, g_iwae = g_dreg[:, live], g_iwae[:, live]
    se = (g_dreg.var(0) / R + g_iwae.var(0) / R).sqrt()
    z = (g_dreg.mean(0) - g_iwae.mean(0)) / se
    snr = [(g.mean(0).abs() / g.std(0)).mean().item() for g in (g_iwae, g_dreg)]
    print(f"core IWELBO K={K}: |z| max {z.abs().max().item():.2f}; mean SNR IWAE {snr[0]:.2f}, "
          f"DReG {snr[1]:.2f}")
    assert (z.abs() < 4).all()
    assert snr[1] > snr[0]


@pytest.mark.cuda
def test_fast_flow_path_on_cuda():
    ts = [PT.affine_coupling(4, hidden_dims=[8]).cuda(), PT.Permute(torch.arange(4).flip(0).cuda())]
    base = dist.Normal(torch.zeros(4, device="cuda"), 1.0).to_event(1)
    loss, x = fast_path_surrogate(dist.TransformedDistribution(base, ts), _log_p, (8,))
    loss.backward()
    assert x.device.type == "cuda"


@pytest.mark.slow
def test_core_rws_path_gradient_wake_phi_matches_standard():
    """RWS(path_gradient=True) (DReG wake-phi, Tucker et al. 2019 eq. 8) has the same expected
    guide gradient as the standard wake-phi update."""
    from vi_estimators.objectives import RWS

    spec = models.get("gaussian_conjugate", dtype=torch.float64)
    loc, tril = _posterior_guide_params(spec)
    guide = spec.make_guide()
    pyro.param("mu_loc", loc + 0.5)
    pyro.param("mu_scale_tril", 1.5 * tril, constraint=constraints.lower_cholesky)
    R, K = 200, 16
    g_dreg = _core_guide_grads(RWS(num_particles=K, path_gradient=True, max_plate_nesting=1),
                               spec, guide, R)
    g_std = _core_guide_grads(RWS(num_particles=K, max_plate_nesting=1), spec, guide, R)
    live = (g_std.var(0) > 0) & (g_dreg.var(0) > 0)
    g_dreg, g_std = g_dreg[:, live], g_std[:, live]
    z = (g_dreg.mean(0) - g_std.mean(0)) / (g_dreg.var(0) / R + g_std.var(0) / R).sqrt()
    print(f"core RWS wake-phi K={K}: |z| max {z.abs().max().item():.2f}; variance standard "
          f"{g_std.var(0).sum().item():.3g}, DReG {g_dreg.var(0).sum().item():.3g}")
    assert (z.abs() < 4).all()
