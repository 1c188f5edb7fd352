"""Captured objectives (``capture=True``) and ``CapturedSVI``: same draws, losses, gradients,
carried state and parameters as the eager objective for the same seed; fallbacks logged once;
stateful baselines unbiased under capture."""

from __future__ import annotations

import copy
import logging
import math
from functools import partial

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal, AutoNormalizingFlow
from torch import nn
from torch.distributions import constraints
from user_models import BayesianRegression

import models
import vi_estimators as vi
from vi_estimators.capture import MAX_GRAPHS, Graph

LOGGER = "vi_estimators.capture"
DATA = torch.tensor([0.3, 1.2, -0.4, 2.1, 0.9, 1.5, -1.0, 0.7])


# ----------------------------------------------------------------------------- models, guides


def normal_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def normal_guide(x):
    m = pyro.param("m", torch.tensor(0.0))
    s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(m, s))


def mixture_model(x):
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(p))
        pyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x)


def mixture_guide(x):
    a = pyro.param("a", torch.tensor(2.0), constraint=constraints.positive)
    b = pyro.param("b", torch.tensor(2.0), constraint=constraints.positive)
    pyro.sample("p", dist.Beta(a, b))
    q = pyro.param("q", torch.full((x.shape[0],), 0.5), constraint=constraints.unit_interval)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Bernoulli(q))


def hier_model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def hier_guide(x):
    psi = pyro.sample("psi", dist.Normal(pyro.param("m", torch.tensor(0.3)), 0.8))
    pyro.sample("z", dist.Normal(psi, 0.6))


def prior_reverse(zd, x):
    pyro.sample("psi", dist.Normal(0.3, 0.8))


def iwae_program(model, guide, *args, **kwargs):
    with vi.particles():
        trace, log_q = vi.sim(guide, *args, **kwargs)
        log_p = vi.density(model, trace, *args, **kwargs)
        torch.randn(3)  # an unused draw still advances the generator (kept in the graph)
    return vi.logmeanexp(log_p - log_q)


def _learned():
    """A learned baseline b(x) (its Linear is registered with pyro.module and trained)."""
    net = nn.Linear(len(DATA), 1)
    nn.init.zeros_(net.weight)
    nn.init.zeros_(net.bias)
    return vi.Learned(net)


H = torch.tensor(1.5)
CASES = {
    "ELBO": (normal_model, normal_guide, (DATA,), lambda c: vi.ELBO(capture=c)),
    "ELBO looped K=3": (normal_model, normal_guide, (DATA,),
                        lambda c: vi.ELBO(num_particles=3, capture=c)),
    "ELBO STL": (normal_model, normal_guide, (DATA,),
                 lambda c: vi.ELBO(path_gradient=True, capture=c)),
    "IWELBO": (normal_model, normal_guide, (DATA,),
               lambda c: vi.IWELBO(num_particles=4, max_plate_nesting=1, capture=c)),
    "IWELBO DReG": (normal_model, normal_guide, (DATA,),
                    lambda c: vi.IWELBO(num_particles=4, path_gradient=True,
                                        max_plate_nesting=1, capture=c)),
    "VIMCO": (mixture_model, mixture_guide, (DATA,),
              lambda c: vi.VIMCO(num_particles=4, max_plate_nesting=1, capture=c)),
    "RWS": (mixture_model, mixture_guide, (DATA,),
            lambda c: vi.RWS(num_particles=4, max_plate_nesting=1, capture=c)),
    "Renyi": (normal_model, normal_guide, (DATA,),
              lambda c: vi.Renyi(alpha=0.5, num_particles=4, max_plate_nesting=1, capture=c)),
    "CUBO path": (normal_model, normal_guide, (DATA,),
                  lambda c: vi.CUBO(num_particles=4, max_plate_nesting=1, capture=c)),
    "CUBO score": (mixture_model, mixture_guide, (DATA,),
                   lambda c: vi.CUBO(num_particles=4, max_plate_nesting=1, capture=c)),
    "ELBO Reinforce MovingAverage": (mixture_model, mixture_guide, (DATA,),
                                     lambda c: vi.ELBO(max_plate_nesting=1, capture=c)),
    "ELBO Reinforce Learned": (mixture_model, mixture_guide, (DATA,),
                               lambda c: vi.ELBO(max_plate_nesting=1, capture=c,
                                                 estimator={"c": vi.Reinforce(_learned())})),
    "ELBO graph": (mixture_model, mixture_guide, (DATA,),
                   lambda c: vi.ELBO(max_plate_nesting=1, rao_blackwellize="graph", capture=c)),
    "ELBO Enumerate": (mixture_model, mixture_guide, (DATA,),
                       lambda c: vi.ELBO(max_plate_nesting=1, estimator={"c": vi.Enumerate()},
                                         capture=c)),
    "ELBO MVD": (mixture_model, mixture_guide, (DATA,),
                 lambda c: vi.ELBO(max_plate_nesting=1, estimator={"c": vi.MVD()}, capture=c)),
    "ELBO RSVI": (mixture_model, mixture_guide, (DATA,),
                  lambda c: vi.ELBO(max_plate_nesting=1, estimator={"p": vi.RSVI(boost=1)},
                                    capture=c)),
    "@objective": (normal_model, normal_guide, (DATA,),
                   lambda c: vi.objective(iwae_program, num_particles=4, vectorize_particles=True,
                                          max_plate_nesting=1, capture=c)),
    "HVI": (hier_model, hier_guide, (H,), lambda c: vi.HVI(["z"], prior_reverse, capture=c)),
    "IWHVI": (hier_model, hier_guide, (H,),
              lambda c: vi.IWHVI(["z"], prior_reverse, num_inner=5, capture=c)),
    "DIWHVI": (hier_model, hier_guide, (H,),
               lambda c: vi.DIWHVI(["z"], prior_reverse, num_inner=5, num_particles=4,
                                   capture=c)),
}


def _params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def _svi_run(model, guide, args, obj, num_steps=6, kwargs=None, lr=0.05):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": lr}), obj)
    losses = [svi.step(*args, **(kwargs or {})) for _ in range(num_steps)]
    return losses, _params()


def _graphs(obj):
    return [g for g in obj.captured.graphs.values() if isinstance(g, Graph)]


def _assert_identical(eager, captured):
    (le, pe), (lc, pc) = eager, captured
    assert le == lc
    assert pe.keys() == pc.keys()
    for k in pe:
        assert torch.equal(pe[k], pc[k]), k


# ----------------------------------------------------------------------------- captured == eager


@pytest.mark.parametrize("case", list(CASES))
def test_captured_equals_eager(case, caplog):
    """Six SVI steps from the same seed: identical losses and parameters (bit for bit), and the
    steps after set-up ran the captured graph (no fallback)."""
    model, guide, args, make = CASES[case]
    eager = _svi_run(model, guide, args, make(False))
    obj = make(True)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        captured = _svi_run(model, guide, args, obj)
    _assert_identical(eager, captured)
    assert _graphs(obj), f"{case}: nothing was captured"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_stateful_objects_follow_eager():
    """MovingAverage baselines and CUBO's running constant carry the same state as eager."""
    states = []
    for capture in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        ma = vi.MovingAverage(0.8)
        cubo = vi.CUBO(num_particles=4, max_plate_nesting=1, max_exponent=0.5, capture=capture)
        elbo = vi.ELBO(max_plate_nesting=1, estimator={"c": vi.Reinforce(ma)}, capture=capture)
        for _ in range(6):
            elbo.loss_and_grads(mixture_model, mixture_guide, DATA)
            cubo.loss_and_grads(normal_model, normal_guide, DATA)
        states.append((dict(ma.state), cubo.shift.clone(), cubo.num_rescaled))
    (ma0, shift0, n0), (ma1, shift1, n1) = states
    assert ma0.keys() == ma1.keys() == {"c"}
    assert torch.equal(ma0["c"], ma1["c"])
    assert torch.equal(shift0, shift1)
    assert n0 == n1 > 0  # the overflow guard fired (max_exponent=0.5), counted without a branch


def test_autonormal_flow_guide_with_tied_parameters():
    """AutoNormalizingFlow (nn.Module transforms, a parameter registered under two names):
    STL steps identical to eager."""
    spec = models.get("gaussian_conjugate")

    def flow(dim):
        return T.ComposeTransformModule([T.affine_coupling(dim, hidden_dims=[8]),
                                         T.Permute(torch.arange(dim).flip(0))])

    runs = []
    for capture in (False, True):
        pyro.set_rng_seed(0)
        guide = AutoNormalizingFlow(spec.model, partial(flow))
        obj = vi.ELBO(num_particles=4, vectorize_particles=True, path_gradient=True,
                      max_plate_nesting=1, capture=capture)
        runs.append(_svi_run(spec.model, guide, spec.args, obj, num_steps=4,
                             kwargs=spec.kwargs))
    _assert_identical(*runs)


def test_tutorial_pyromodule_regression():
    """Pyro's Bayesian regression tutorial model (PyroModule + PyroSample, from the user-model
    corpus), with an AutoDiagonalNormal guide."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(50, generator=g)
    runs = []
    for capture in (False, True):
        pyro.set_rng_seed(0)
        model = BayesianRegression(3, 1)
        guide = AutoDiagonalNormal(model)
        runs.append(_svi_run(model, guide, (x, y), vi.ELBO(capture=capture), num_steps=8))
    _assert_identical(*runs)


def test_vae_minibatch_steps():
    """The zoo VAE (pyro.module networks, subsampled plate, nn.Module kwarg): identical to
    eager, and the minibatch indices are fresh at every step."""
    runs = []
    for capture in (False, True):
        spec = models.get("vae_digits")
        guide = spec.make_guide()
        kwargs = dict(spec.kwargs, subsample_size=32)
        runs.append(_svi_run(spec.model, guide, spec.args, vi.ELBO(max_plate_nesting=1,
                                                                  capture=capture),
                             num_steps=5, kwargs=kwargs, lr=1e-3))
    _assert_identical(*runs)
    assert len(set(runs[1][0])) == 5  # different minibatches, different losses


def test_loss_and_differentiable_loss_match_eager():
    eager, captured = vi.ELBO(), vi.ELBO(capture=True)
    normal_guide(DATA)  # create the parameters
    leaves = [pyro.param("m").unconstrained(), pyro.param("s").unconstrained()]
    for _ in range(3):
        state = torch.get_rng_state()
        a = captured.loss(normal_model, normal_guide, DATA)
        torch.set_rng_state(state)
        assert a == eager.loss(normal_model, normal_guide, DATA)
        torch.set_rng_state(state)
        la = captured.differentiable_loss(normal_model, normal_guide, DATA)
        ga = torch.autograd.grad(2.0 * la, leaves)
        torch.set_rng_state(state)
        lb = eager.differentiable_loss(normal_model, normal_guide, DATA)
        gb = torch.autograd.grad(2.0 * lb, leaves)
        assert la.item() == lb.item()
        assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert {k[0] for k, g in captured.captured.graphs.items() if isinstance(g, Graph)} == \
        {"loss", "diff"}


def test_backends_agree():
    """"fx" is bit-identical to eager like "script" (the default)."""
    model, guide, args, _ = CASES["ELBO Reinforce MovingAverage"]
    eager = _svi_run(model, guide, args, vi.ELBO(max_plate_nesting=1))
    obj = vi.ELBO(max_plate_nesting=1, capture="fx")
    _assert_identical(eager, _svi_run(model, guide, args, obj))
    assert {g.backend for g in _graphs(obj)} == {"fx"}


def test_new_parameters_and_cleared_store_set_up_again():
    obj = vi.ELBO(capture=True)
    for _ in range(3):
        obj.loss_and_grads(normal_model, normal_guide, DATA)
    (g,) = _graphs(obj)
    pyro.clear_param_store()  # new parameter tensors: the graph must not use the old ones
    eager = vi.ELBO()
    pyro.set_rng_seed(3)
    a = [obj.loss_and_grads(normal_model, normal_guide, DATA) for _ in range(3)]
    pa = _params()
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    b = [eager.loss_and_grads(normal_model, normal_guide, DATA) for _ in range(3)]
    assert a == b
    assert all(torch.equal(pa[k], v) for k, v in _params().items())
    (g2,) = _graphs(obj)
    assert g2 is not g


class Model:
    """Model and guide as bound methods: a new method object at every attribute access."""

    def model(self, x):
        normal_model(x)

    def guide(self, x):
        normal_guide(x)


def test_bound_methods_and_copies():
    m, obj = Model(), vi.ELBO(capture=True)
    for _ in range(5):
        obj.loss_and_grads(m.model, m.guide, DATA)
    assert len(obj.captured.graphs) == 1 and len(_graphs(obj)) == 1
    clone = copy.deepcopy(obj)  # graphs are not copied: the copy sets up again
    assert clone.captured.graphs == {} and clone.capture == "script"
    clone.loss_and_grads(m.model, m.guide, DATA)


# ----------------------------------------------------------------------------- fallbacks


def _item_guide(x):
    m = pyro.param("m", torch.tensor(0.0))
    s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
    if m > 0.5:  # Python control flow on a tensor value
        s = 2 * s
    pyro.sample("mu", dist.Normal(m, s))


def _mask_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    kept = x[x > -5.0]  # value-dependent shape
    with pyro.plate("data", kept.shape[0]):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=kept)


_NET = nn.Linear(1, 1)


def _net_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", x.shape[0]):
        shift = _NET(x.unsqueeze(-1)).squeeze(-1)  # not registered with pyro.module
        pyro.sample("x", dist.Normal(mu + shift, 1.0), obs=x)


class LastSignal(vi.Baseline):
    """A user baseline with Python state that is not declared as carried state."""

    def __init__(self):
        self.last = None

    def __call__(self, site, signal, info):
        b = torch.zeros_like(signal) if self.last is None else self.last.expand_as(signal)
        self.last = signal.mean()
        return b


_LAST = LastSignal()


def _stateful_baseline_guide(x):
    m = pyro.param("m", torch.tensor(0.0))
    pyro.sample("mu", dist.Normal(m, 1.0), infer={"estimator": vi.Reinforce(_LAST)})


FALLBACKS = {
    "item": (normal_model, _item_guide, lambda: DATA, "control flow on a tensor value"),
    "mask": (_mask_model, normal_guide, lambda: DATA, "boolean mask"),
    "module": (_net_model, normal_guide, lambda: DATA, "not in the param store"),
    "baseline": (normal_model, _stateful_baseline_guide, lambda: DATA,
                 "LastSignal keeps Python state"),
    "grad arg": (normal_model, normal_guide, lambda: DATA.clone().requires_grad_(),
                 "requires grad"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallback_is_logged_once_and_stays_eager(case, caplog):
    model, guide, data, why = FALLBACKS[case]
    x = data()
    _LAST.last = None
    pyro.set_rng_seed(0)
    eager = [vi.ELBO().loss_and_grads(model, guide, x) for _ in range(4)]
    pe = _params()
    pyro.clear_param_store()
    _LAST.last = None
    pyro.set_rng_seed(0)
    obj = vi.ELBO(capture=True)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        captured = [obj.loss_and_grads(model, guide, x) for _ in range(4)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert why in warnings[0] and "running this step eagerly" in warnings[0]
    assert not _graphs(obj)
    assert captured == eager
    assert all(torch.equal(pe[k], v) for k, v in _params().items())


def test_too_many_signatures(caplog):
    """A Python number that changes at every step makes new keys; after MAX_GRAPHS of them the
    steps run eagerly (one log line)."""

    def model(x, scale):
        mu = pyro.sample("mu", dist.Normal(0.0, scale))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x, scale):
        normal_guide(x)

    obj = vi.ELBO(capture="fx")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for i in range(MAX_GRAPHS + 3):
            obj.loss_and_grads(model, guide, DATA, 1.0 + i)
    assert len(_graphs(obj)) == MAX_GRAPHS
    assert len(caplog.records) == 1 and "argument signatures" in caplog.records[0].getMessage()


def test_bad_capture_option():
    with pytest.raises(ValueError, match="capture must be True, False or one of"):
        vi.ELBO(capture="jit")


# ----------------------------------------------------------------------------- unbiasedness


def test_reinforce_moving_average_unbiased_under_capture():
    """Gamma-Poisson (prior Gamma(1, 1), guide Gamma(a, b)): captured score-function gradients
    with the auto moving-average baseline (its state lifted into the graph) average to the
    closed form d/da = (A + 1 - a) psi'(a) - B/b + 1, d/db = -A/b + B a / b^2 - 1/b."""
    x = torch.tensor([2.0, 0.0, 3.0, 1.0, 4.0], dtype=torch.float64)
    a0, b0 = 2.5, 1.3

    def model(x):
        z = pyro.sample("z", dist.Gamma(torch.tensor(1.0, dtype=x.dtype), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Poisson(z), obs=x)

    def guide(x):
        a = pyro.param("a", torch.tensor(a0, dtype=x.dtype), constraint=constraints.positive)
        b = pyro.param("b", torch.tensor(b0, dtype=x.dtype), constraint=constraints.positive)
        pyro.sample("z", dist.Gamma(a, b), infer={"estimator": vi.Reinforce()})

    obj = vi.ELBO(max_plate_nesting=1, capture=True)
    n = 4000
    grads = torch.empty(n, 2, dtype=torch.float64)
    for i in range(n):
        obj.loss_and_grads(model, guide, x)
        ua, ub = pyro.param("a").unconstrained(), pyro.param("b").unconstrained()
        # positive params are exp(u): d/da = d/du / a
        grads[i] = -torch.stack([ua.grad / a0, ub.grad / b0])
        ua.grad, ub.grad = None, None
    assert _graphs(obj) and any(g.carriers for g in _graphs(obj))
    A, B = x.sum().item(), x.shape[0] + 1
    psi1 = torch.polygamma(1, torch.tensor(a0, dtype=torch.float64)).item()
    exact = torch.tensor([(A + 1 - a0) * psi1 - B / b0 + 1,
                          -A / b0 + B * a0 / b0**2 - 1 / b0], dtype=torch.float64)
    burn = grads[100:]  # the baseline's first steps average from zero
    mean, se = burn.mean(0), burn.std(0) / math.sqrt(len(burn))
    print(f"captured Reinforce+MovingAverage: mean {mean.tolist()} exact {exact.tolist()} "
          f"se {se.tolist()} var {burn.var(0).tolist()}")
    assert ((mean - exact).abs() < 4 * se).all()


def test_previous_step_coefficient_cv_under_capture():
    """A program with a previous-step control variate (PreviousStepCoefficient carries its
    moments through the graph): captured == eager, and the CV'd pathwise gradient of
    E_q[-(z - 1)^2], q = N(m, 1), stays unbiased for -2 (m - 1) (h = z - m, mean 0)."""

    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.2, dtype=torch.float64)),
                                      1.0))

    def make(capture):
        coef = vi.PreviousStepCoefficient(decay=0.9)

        @vi.objective(num_particles=8, vectorize_particles=True, max_plate_nesting=0,
                      capture=capture)
        def program(model, guide, x):
            with vi.particles():
                trace, _ = vi.sim(guide, x)
            z = trace.nodes["mu"]["value"]
            m = pyro.param("m")
            h = (z - m).detach()  # the control variate, E h = 0
            g = (-2.0 * (z - 1.0)).detach()  # each particle's gradient of f
            c = coef.coefficient(g)  # from previous steps only
            coef.update(g, h)
            # zero-valued term whose gradient is -c h: the gradient is g - c (h - E h)
            return -((z - 1.0) ** 2) - c * h * (m - m.detach())

        return program, coef

    x = torch.zeros(1, dtype=torch.float64)
    runs = []
    for capture in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        program, coef = make(capture)
        g = []
        for _ in range(300):
            program.loss_and_grads(None, guide, x)
            u = pyro.param("m").unconstrained()
            g.append(-u.grad.item())
            u.grad = None
        runs.append((g, coef.get_state(), program))
    (g0, s0, _), (g1, s1, program) = runs
    assert _graphs(program) and _graphs(program)[0].carriers
    assert g0 == g1
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    g1 = torch.tensor(g1, dtype=torch.float64)
    mean, se = g1.mean(), g1.std() / math.sqrt(len(g1))
    print(f"PreviousStepCoefficient CV: mean {mean:.6f} exact 1.6 se {se:.3g} var {g1.var():.3g} "
          f"(first step, no CV yet: {g0[0]:.3f})")
    assert abs(mean - 1.6) < 4 * se + 1e-9
    assert g1[10:].var() < 1e-6  # h is exactly the noise of g: the CV removes it


# ----------------------------------------------------------------------------- CapturedSVI


def _logistic():
    spec = models.get("logistic_regression", with_reference=False)
    return spec, AutoNormal(spec.model)


def test_captured_svi_equals_eager_loop_with_the_same_fused_optimizer():
    spec, guide = _logistic()
    obj = vi.ELBO(max_plate_nesting=1)
    pyro.set_rng_seed(0)
    opt, losses = None, []
    for i in range(12):
        if i == 7:
            opt.param_groups[0]["lr"] = 0.003
        losses.append(obj.loss_and_grads(spec.model, guide, *spec.args, **spec.kwargs))
        params = [p for _, p in pyro.get_param_store().named_parameters()]
        opt = opt or torch.optim.Adam(params, lr=0.01, fused=True)
        opt.step()
        for p in params:
            p.grad = None
    eager = (losses, _params())

    pyro.clear_param_store()
    spec, guide = _logistic()
    pyro.set_rng_seed(0)
    svi = vi.CapturedSVI(spec.model, guide, pyro.optim.Adam({"lr": 0.01}),
                         vi.ELBO(max_plate_nesting=1, capture=True))
    losses = [svi.step(*spec.args, **spec.kwargs) for _ in range(4)]
    losses += svi.run(3, *spec.args, **spec.kwargs).tolist()
    svi.optimizer.param_groups[0]["lr"] = 0.003  # a schedule: the update graph is rebuilt
    losses += svi.run(5, *spec.args, **spec.kwargs).tolist()
    _assert_identical(eager, (losses, _params()))
    assert len(svi._updates) == 2


def test_captured_svi_close_to_pyro_svi():
    """Against pyro.infer.SVI + pyro.optim.Adam (per-parameter, unfused Adam): float rounding."""
    runs = []
    for cls in (pyro.infer.SVI, vi.CapturedSVI):
        pyro.clear_param_store()
        spec, guide = _logistic()
        pyro.set_rng_seed(0)
        svi = cls(spec.model, guide, pyro.optim.Adam({"lr": 0.01}),
                  vi.ELBO(max_plate_nesting=1, capture=True))
        losses = [svi.step(*spec.args, **spec.kwargs) for _ in range(20)]
        runs.append((losses, _params()))
    (l0, p0), (l1, p1) = runs
    assert l0 == pytest.approx(l1, rel=1e-5)
    for k in p0:
        assert torch.allclose(p0[k], p1[k], rtol=1e-5, atol=1e-6)


def test_captured_svi_unfused_optimizer_runs_like_pyro(caplog):
    runs = []
    with caplog.at_level(logging.WARNING, logger="vi_estimators.svi"):
        for cls in (pyro.infer.SVI, vi.CapturedSVI):
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            svi = cls(normal_model, normal_guide, pyro.optim.ClippedAdam({"lr": 0.05}),
                      vi.ELBO(capture=True))
            runs.append(([svi.step(DATA) for _ in range(6)], _params()))
    _assert_identical(*runs)
    assert len(caplog.records) == 1 and "ClippedAdam" in caplog.records[0].getMessage()


def test_captured_svi_detects_non_finite_losses():
    x = DATA.clone()
    svi = vi.CapturedSVI(normal_model, normal_guide, pyro.optim.Adam({"lr": 0.01}),
                         vi.ELBO(capture=True), check_every=4)
    svi.run(6, x)
    assert svi.loss.captured.gradients(normal_model, normal_guide, (x,), {}) is not None
    x[3] = float("nan")  # same tensor: the captured graph runs
    with pytest.raises(ValueError, match="non-finite objective value at step 0"):
        svi.run(10, x)
    with pytest.raises(ValueError, match="non-finite objective value"):
        svi.step(x)


def test_captured_svi_argument_checks():
    with pytest.raises(ValueError, match="capture=True"):
        vi.CapturedSVI(normal_model, normal_guide, pyro.optim.Adam({"lr": 0.01}), vi.ELBO())
    with pytest.raises(TypeError, match="PyroOptim"):
        vi.CapturedSVI(normal_model, normal_guide, torch.optim.Adam, vi.ELBO(capture=True))
    with pytest.raises(TypeError, match="vi_estimators objective"):
        vi.CapturedSVI(normal_model, normal_guide, pyro.optim.Adam({"lr": 0.01}),
                       pyro.infer.Trace_ELBO())


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_captured_equals_eager_on_cuda():
    """On a GPU: "fx" runs the eager kernels (bit for bit); "script" may fuse elementwise ops
    after profiling (float rounding)."""
    spec = models.get("logistic_regression", with_reference=False, device="cuda")
    runs = {}
    for capture in (False, "fx", "script"):
        guide = AutoNormal(spec.model)
        obj = vi.ELBO(max_plate_nesting=1, capture=capture)
        runs[capture] = _svi_run(spec.model, guide, spec.args, obj, num_steps=6,
                                 kwargs=spec.kwargs)
        assert capture is False or _graphs(obj)
    _assert_identical(runs[False], runs["fx"])
    (l0, p0), (l1, p1) = runs[False], runs["script"]
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert all(torch.allclose(p0[k], p1[k], rtol=1e-5, atol=1e-6) for k in p0)
