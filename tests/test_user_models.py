"""Every sampler on models written the way Pyro's tutorials write them (``tests/user_models.py``),
against Pyro NUTS on the same model: posterior means within 0.2 NUTS sd and sds within 15 %.

How the runs are set up (and why the tolerances hold with room to spare):

* Langevin samplers (SGLD full batch and minibatch, pSGLD, CV-SGLD, MYULA/BMUMLA, FSGLD) start
  256 chains at distinct NUTS reference draws, run ``T`` warm-up steps and keep 8 draws ``T / 4``
  apart, where ``T = 1 / (h lambda_min)`` is the slowest relaxation time; ``h = c / lambda_max``
  with ``lambda_min``, ``lambda_max`` the extreme eigenvalues of the potential's Hessian at a
  local mode (pSGLD, whose RMSprop preconditioner is ``~ 1 / sqrt(lambda)`` per direction:
  ``h = c / sqrt(lambda_max)``, ``T = 1 / (h sqrt(lambda_min))``). The comparison therefore sees
  each sampler's stationary law, finite-step bias included. That bias, on a Gaussian target (the
  linear-Gaussian stationary formula of ``tests/test_sgld.py``), multiplies a variance by
  ``1 / (1 - h lambda / 2)`` in full batch and by a further ``1 + h V / 2`` with minibatch
  gradient noise ``V ~ (N / B) lambda``: ``c = 0.05`` in full batch (<= 1.3 % in variance) and
  ``c = 0.02`` with minibatches (``N / B <= 10``: <= 10 % in variance, 5 % in sd). Monte-Carlo
  errors: ~0.05 sd on means, ~3 % on sds (NUTS reference: 2000 draws).
* Particle samplers (Coin SVGD, Coin KSDD) run with their defaults -- Laplace-whitened particles
  started at Laplace draws (the centred eight schools, which has no mode: at reference draws)
  -- and without a learning rate. Where they do not match NUTS the test is a strict ``xfail``
  whose reason gives the measured numbers and the cause; they all run on every model.
* Two models are compared on functionals: the net on its predictive mean at three inputs and
  its noise scale (the weights are identified only up to the net's symmetries), the centred
  eight schools on (mu, tau, theta) from NUTS on the non-centred model (NUTS itself diverges in
  the centred funnel).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from user_models import build_corpus, load_references

from mcmc import (
    CVSGLD,
    L1,
    SGLD,
    BregmanProximalLangevin,
    CoinKSDD,
    CoinSVGD,
    FederatedSGLD,
    Hypentropy,
    Potential,
    find_mode,
    pSGLD,
)

CORPUS = build_corpus()
REFS = load_references()
NAMES = list(CORPUS)
MINIBATCH = [n for n, m in CORPUS.items() if m.minibatch is not None]
NONSMOOTH = [n for n, m in CORPUS.items() if m.nonsmooth]
C = 256
pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------- helpers
def _options(m) -> dict:
    return {"init_strategy": m.init_strategy} if m.init_strategy is not None else {}


def _subsample(m):
    return m.minibatch if isinstance(m.minibatch, int) else None


class Geometry:
    """Potential, reference-draw starting points and Hessian eigenvalues of a corpus model."""

    def __init__(self, m, num_chains=C, exclude=()):
        self.pot = Potential(m.model, m.args, m.kwargs, exclude_sites=exclude, **_options(m))
        ref = REFS[m.name]
        sites = {k[len("sites/"):]: v for k, v in ref.items() if k.startswith("sites/")} or ref
        gen = torch.Generator().manual_seed(0)
        S = next(iter(ref.values())).shape[0]
        pick = torch.randint(S, (num_chains,), generator=gen)
        shapes = self.pot.site_shapes
        # start at NUTS draws (of the sites, stored with the reference when the comparison
        # quantities are functionals of them)
        self.start = self.pot.pack(
            {k: sites[k][pick].reshape((num_chains,) + tuple(shapes[k])) for k in shapes})
        # curvature at the local mode next to the most probable start (for a funnel, where there
        # is no mode, FIXED_STEP gives the step instead)
        best = self.start[self.pot(self.start).argmin()][None]
        centre = best if m.name in FIXED_STEP else find_mode(self.pot, best)
        H = torch.autograd.functional.hessian(lambda v: self.pot(v[None])[0], centre[0])
        ev = torch.linalg.eigvalsh((H + H.T) / 2)
        self.lmin, self.lmax = float(ev.min()), float(ev.max())
        self.centre = centre

    def laplace_draws(self, n, gen):
        """``n`` draws from N(mode, H^-1) at the potential's mode (unconstrained)."""
        mode = find_mode(self.pot, self.centre)
        H = torch.autograd.functional.hessian(lambda v: self.pot(v[None])[0], mode[0])
        L = torch.linalg.cholesky(torch.linalg.inv((H + H.T) / 2))
        return mode + torch.randn(n, self.pot.dim, generator=gen) @ L.T


def _compare(m, draws, label, *, mean_tol=0.2, sd_tol=0.15):
    """Assert posterior means within ``mean_tol`` NUTS sds and sds within ``sd_tol``."""
    flat = {k: v.reshape((-1,) + tuple(v.shape[2:])) for k, v in draws.items()}
    got = m.quantities_of(flat)
    lines, ok = [], True
    for q, ref in REFS[m.name].items():
        if q.startswith("sites/"):
            continue
        sd = ref.std(0)
        err = ((got[q].mean(0) - ref.mean(0)) / sd).abs()
        ratio = got[q].std(0) / sd
        lines.append(f"{q}: max |mean err| {float(err.max()):.3f} sd, sd ratio "
                     f"{float(ratio.min()):.3f}..{float(ratio.max()):.3f}")
        ok &= bool((err <= mean_tol).all()) and bool(((ratio - 1).abs() <= sd_tol).all())
    report = f"{label} on {m.name}: " + "; ".join(lines)
    print(report)
    assert ok, report


#: The centred eight schools is a funnel: its Hessian at the posterior mean is indefinite, so
#: the curvature rule gives no step size. Fixed step and relaxation time, chosen where SGLD is
#: stable down the funnel's neck (measured from the reference draws: h = 0.01, 0.003 and 0.001
#: all match NUTS within 0.12 sd in means and 13 % in sds).
FIXED_STEP = {"eight_schools_centered": (0.01, 200)}


def _langevin_run(kernel, m, geo, c, preconditioned=False):
    """``C`` chains from the reference draws: ``T`` warm-up steps, 8 draws ``T / 4`` apart.

    ``h = c / lambda_max`` and ``T = 1 / (h lambda_min)``; preconditioned (pSGLD, whose RMSprop
    preconditioner is ``~ 1 / sqrt(lambda)`` per direction): ``h = c / sqrt(lambda_max)`` and
    ``T = 1 / (h sqrt(lambda_min))``. ``T`` is capped at 300 steps (the net's flattest
    directions, which its predictions hardly depend on, would need far more)."""
    if m.name in FIXED_STEP:
        h, T = FIXED_STEP[m.name]
    elif preconditioned:
        h = c / math.sqrt(geo.lmax)
        T = int(1 / (h * math.sqrt(geo.lmin)))
    else:
        h = c / geo.lmax
        T = int(1 / (h * geo.lmin))
    T = min(max(T, 4), 300)
    # The chains start at exact posterior draws and the test checks that the pooled draws stay
    # distributed as the posterior; 8 draws per chain after ~one relaxation time are not meant
    # to make chains agree with each other, so the end-of-run R-hat/ESS check is off here.
    return kernel(h).sample_chains(8, num_chains=C, warmup_steps=T, thinning=T // 4,
                                   model_args=m.args, model_kwargs=m.kwargs,
                                   initial_params=geo.start, progress=False, diagnostics=False)


def _xfail(known: dict, names: list) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=known[n]))
            if n in known else n for n in names]


# --------------------------------------------------------------------------------- the corpus
def test_the_corpus():
    """At least 12 models in the styles the issue lists, each with a NUTS reference, and our
    one-chain potential equal to Pyro's own NUTS potential on each (where NUTS accepts it:
    not the model that subsamples)."""
    assert len(CORPUS) >= 12
    assert set(REFS) == set(CORPUS), "regenerate tests/user_model_references.npz"
    for m in CORPUS.values():
        pot = Potential(m.model, m.args, m.kwargs, **_options(m))
        z = pot.initial_params(1)
        if m.minibatch == "declared":
            with pytest.raises(NotImplementedError, match="subsample"):
                pyro.infer.mcmc.util.initialize_model(m.model, m.args, m.kwargs)
            continue
        _, pe_fn, _, _ = pyro.infer.mcmc.util.initialize_model(
            m.model, m.args, m.kwargs, init_strategy=m.init_strategy or
            pyro.infer.autoguide.init_to_uniform,
            max_plate_nesting=m.nuts_options.get("max_plate_nesting"))
        params = {k: v[0] for k, v in pot.unpack_unconstrained(z).items()}
        torch.testing.assert_close(pot(z)[0], pe_fn(params), rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------------- SGLD family
@pytest.mark.parametrize("name", NAMES)
def test_sgld_full_batch(name):
    m = CORPUS[name]
    geo = Geometry(m)
    d = _langevin_run(lambda h: SGLD(m.model, h, seed=0, **_options(m)), m, geo, 0.05)
    _compare(m, d, "SGLD")


@pytest.mark.parametrize("name", MINIBATCH)
def test_sgld_minibatch(name):
    """Minibatches the Pyro way: the model's own subsample_size, or SGLD(subsample_size=B) on a
    model that indexes its data with the plate's indices."""
    m = CORPUS[name]
    geo = Geometry(m)
    d = _langevin_run(lambda h: SGLD(m.model, h, subsample_size=_subsample(m), seed=0,
                                     **_options(m)), m, geo, 0.02)
    _compare(m, d, "minibatch SGLD")


#: pSGLD omits the Gamma term (O((1 - alpha) / h)); it matters where the curvature changes
#: strongly with the position, as in the funnel's neck. Measured on the centred eight schools
#: from the reference draws: tau mean +0.17..+0.26 sd and theta sds x1.17..1.22 for h = 0.001,
#: 0.003, 0.01 and alpha = 0.9999, 0.99999 (SGLD at the same h matches).
PSGLD_KNOWN = {"eight_schools_centered": "pSGLD without its Gamma term in a funnel: tau +0.2 "
                                         "sd, theta sds x1.2"}


@pytest.mark.parametrize("name", _xfail(PSGLD_KNOWN, NAMES))
def test_psgld(name):
    """pSGLD omits the Gamma correction term (``O((1 - alpha) / h)``, see :mod:`mcmc.sgld`):
    with ``alpha = 0.9999`` the preconditioner moves slowly and that bias is negligible here.
    (With the default 0.99 or 0.999 it shows: on ``nested_plates`` the group intercepts' sds
    came out up to 28 % too wide at 0.999 -- the default is under study, issue 14.)"""
    m = CORPUS[name]
    geo = Geometry(m)
    c = 0.05 if m.minibatch is None else 0.02  # as SGLD: minibatch noise adds (c / 2)(N / B)
    d = _langevin_run(lambda h: pSGLD(m.model, h, alpha=0.9999, subsample_size=_subsample(m),
                                      seed=0, **_options(m)), m, geo, c, preconditioned=True)
    _compare(m, d, "pSGLD")


@pytest.mark.parametrize("name", MINIBATCH)
def test_cvsgld(name):
    m = CORPUS[name]
    geo = Geometry(m)
    d = _langevin_run(lambda h: CVSGLD(m.model, h, subsample_size=_subsample(m), seed=0,
                                       **_options(m)), m, geo, 0.05)
    _compare(m, d, "CV-SGLD")


# --------------------------------------------------------------------------------- proximal
@pytest.mark.parametrize("name", NONSMOOTH)
@pytest.mark.parametrize("method", ["myula", "bmumla"])
def test_proximal(name, method):
    """MYULA / hypentropy BMUMLA with the marked Laplace site as an L1 term, on minibatches
    where the model takes them (the envelope's smoothing bias shrinks with lam = step_size; at
    c = 0.02 it is below the tolerances here)."""
    m = CORPUS[name]
    geo = Geometry(m)
    terms = {site: L1(w) for site, w in m.nonsmooth.items()}
    mirror = None if method == "myula" else Hypentropy(0.1)
    d = _langevin_run(lambda h: BregmanProximalLangevin(m.model, terms, mirror, method=method,
                                                        step_size=h, seed=0,
                                                        subsample_size=_subsample(m),
                                                        **_options(m)),
                      m, geo, 0.02)
    _compare(m, d, method + " (minibatch)" if m.minibatch else method)


# --------------------------------------------------------------------------------- federated
@pytest.mark.parametrize("method,tau", [("fsgld", 5), ("dsgld", 1)])
def test_federated_sharded_regression(method, tau):
    """The `X @ w` regression split into 4 shards by rows, the model unchanged (the sampler
    scales each shard's likelihood by 1 / p_s), matches NUTS on the full data: FSGLD with 5
    local steps per visit, DSGLD with one (its local gradient is unbiased only on average over
    shards; with longer local trajectories it drifts -- measured here at tau = 5: means off by
    up to 0.3 sd -- which is what FSGLD's conducive gradients correct, tests/test_federated.py)."""
    m = CORPUS["linreg_matmul"]
    geo = Geometry(m)
    h = 0.05 / geo.lmax
    T = max(int(1 / (h * geo.lmin)), 4)
    algo = FederatedSGLD(m.model, m.shards, method=method, step_size=h, tau=tau, seed=0)
    # the chains travel together, so they share the shard-visit schedule and its gradient noise:
    # a long window averages it out
    d = algo.sample_chains(32, num_chains=64, warmup_steps=T, thinning=T,
                           initial_params=geo.start[:64], progress=False)
    _compare(m, d, method.upper())


# --------------------------------------------------------------------------------- particles
def _particle_start(m, n):
    """The samplers' default start (Laplace draws), except for the centred eight schools: a
    funnel has no mode, so start it at reference draws."""
    if m.name == "eight_schools_centered":
        return Geometry(m, num_chains=n).start
    return None


@pytest.mark.parametrize("sampler", ["svgd", "ksdd"])
def test_coin_samplers_run_on_every_model(sampler):
    """Both coin samplers run on every corpus model (three steps from their default start;
    too few to converge, so the end-of-run check is off): finite particles of the right
    shapes, whichever vectorisation the model allows."""
    for m in CORPUS.values():
        cls = CoinSVGD if sampler == "svgd" else CoinKSDD
        s = cls(m.model, num_particles=10, **_options(m))
        s.run(3, *m.args, progress=False, diagnostics=False, **m.kwargs)
        particles = s.get_named_particles()
        assert all(bool(torch.isfinite(v).all()) for v in particles.values()), m.name
        assert {k: tuple(v.shape[1:]) for k, v in particles.items()} == \
            {k: tuple(v) for k, v in s.potential.site_shapes.items()}
        assert s.potential.vectorization() in ("plate", "vmap", "loop")


#: Where Coin SVGD (defaults: Laplace whitening, median bandwidth; 200 particles, 400 steps)
#: does not match NUTS within the tolerances, and why. (Before issue 14's defaults -- model
#: coordinates, the Liu-Wang bandwidth -- five models failed: SVGD's variance collapse on the
#: 6-8-dimensional ones, the tau tail and the funnel.)
COIN_SVGD_KNOWN = {
    "eight_schools_noncentered": "constrained tau's sd 1.17 of NUTS (the tail of tau; 200 exact "
                                 "draws exceed 1.15 3 % of the time); log tau within 5 % "
                                 "(tests/test_coin_defaults.py)",
}
@pytest.mark.parametrize("name", _xfail(COIN_SVGD_KNOWN, NAMES))
def test_coin_svgd(name):
    m = CORPUS[name]
    s = CoinSVGD(m.model, num_particles=200, initial_particles=_particle_start(m, 200),
                 **_options(m))
    s.run(400, *m.args, progress=False, **m.kwargs)
    _compare(m, {k: v[None] for k, v in s.get_named_particles().items()}, "Coin SVGD")


#: Where Coin KSDD (defaults: Laplace whitening; 50 particles, 200 steps) does not match NUTS,
#: and why. (Before issue 14's defaults coin betting's first bet moved every coordinate by ~1/2
#: whatever the posterior's scale and ten models failed, sds up to x35; the whitening fixed six.)
#: What is left is KSD descent's own fixed point on hierarchical scales -- unchanged with 600
#: steps or 100 particles -- and, since KSD descent minimises the KSD, its KSD is then no
#: larger than an exact sample's: the end-of-run check cannot see it.
COIN_KSDD_KNOWN = {
    "pyrosample_bnn": "sigma mean 0.31-0.34 sd off (0.23 with 100 particles), sd 0.82-0.86",
    "eight_schools_centered": "funnel: tau mean +0.7 sd, theta sds x1.1-1.4",
    "eight_schools_noncentered": "tau mean +2-3 sd, sd x2-2.8; eta sds 0.4-0.8",
    "nested_plates": "group-level mu and tau sds 0.76-0.82 of NUTS",
}
@pytest.mark.parametrize("name", _xfail(COIN_KSDD_KNOWN, NAMES))
def test_coin_ksdd(name):
    m = CORPUS[name]
    s = CoinKSDD(m.model, num_particles=50, initial_particles=_particle_start(m, 50),
                 **_options(m))
    s.run(200, *m.args, progress=False, **m.kwargs)
    _compare(m, {k: v[None] for k, v in s.get_named_particles().items()}, "Coin KSDD")


@pytest.mark.parametrize("name", ["linreg_matmul", "robust_expand"])
def test_ksd_descent_with_a_learning_rate_matches_nuts(name):
    """The KSD-descent direction on these models is right: with a learning rate (Adam, through
    CoinKSDD's ``optim=``) instead of coin betting, KSD descent matches NUTS."""
    m = CORPUS[name]
    s = CoinKSDD(m.model, num_particles=50, initial_particles=_particle_start(m, 50),
                 optim=lambda p: torch.optim.Adam(p, lr=1e-3), **_options(m))
    s.run(200, *m.args, progress=False, **m.kwargs)
    _compare(m, {k: v[None] for k, v in s.get_named_particles().items()}, "KSD descent + Adam")


# --------------------------------------------------------------------------------- paths agree
def broadcasting_regression(X, y):
    """A regression written to broadcast over extra batch dims (elementwise product)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("y", dist.Normal((X[idx] * w).sum(-1), sigma), obs=y[idx])


def test_vectorised_path_and_fallbacks_give_the_same_draws():
    """On a model that broadcasts, the chain plate (``"auto"`` picks it for shared minibatches;
    per-chain minibatches go through vmap), vmap and the loop give the same SGLD draws for the
    same seed, up to float rounding."""
    X, y = CORPUS["linreg_indexed"].args
    chosen = {}
    for shared in (False, True):
        runs = {}
        for path in ("auto", "plate", "vmap", "loop"):
            k = SGLD(broadcasting_regression, 1e-4, subsample_size=20, shared_minibatch=shared,
                     seed=3, vectorize=path)
            runs[path] = k.sample_chains(20, num_chains=6, model_args=(X, y), progress=False)
            if path == "auto":
                chosen[shared] = k.potential.vectorization(per_chain=not shared)
        for path in ("plate", "vmap", "loop"):
            for site in runs["auto"]:
                torch.testing.assert_close(runs[path][site], runs["auto"][site], rtol=1e-4,
                                           atol=1e-5)
    assert chosen == {False: "vmap", True: "plate"}
    # full data too
    runs = {path: SGLD(broadcasting_regression, 1e-4, seed=3, vectorize=path).sample_chains(
        20, num_chains=6, model_args=(X, y), progress=False) for path in ("plate", "vmap", "loop")}
    for path in ("vmap", "loop"):
        torch.testing.assert_close(runs[path]["w"], runs["plate"]["w"], rtol=1e-4, atol=1e-5)


def test_non_broadcasting_models_are_vectorised_with_vmap(caplog):
    """The issue's failing examples: an `X @ w` regression and an unsqueeze-style GLM run as
    many vectorised chains (through vmap, logged once) and as Pyro MCMC single chains."""
    with caplog.at_level(logging.INFO, logger="mcmc.potential"):
        for name in ("linreg_matmul", "poisson_glm_unsqueeze"):
            m = CORPUS[name]
            k = SGLD(m.model, 1e-4, seed=0)
            d = k.sample_chains(3, num_chains=4, model_args=m.args, progress=False)
            assert all(torch.isfinite(v).all() for v in d.values())
            assert k.potential.vectorization() == "vmap"
            mcmc = pyro.infer.MCMC(SGLD(m.model, 1e-4), num_samples=3, warmup_steps=2,
                                   disable_progbar=True)
            mcmc.run(*m.args)
    msgs = [r.getMessage() for r in caplog.records if r.name == "mcmc.potential"]
    assert any("'linreg_matmul': chains are evaluated with 'vmap'" in s for s in msgs)
    assert any("'poisson_glm': chains are evaluated with 'vmap'" in s for s in msgs)


# --------------------------------------------------------------------------------- README
def test_readme_user_model_example():
    """The README's user-written model example runs as written and agrees with the exact
    (Gaussian) posterior of its model."""
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    (code,) = [b for b in blocks if "# user-written model example" in b]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's own example
    X, y, w = ns["X"], ns["y"], ns["draws"]["w"].reshape(-1, 3)
    precision = torch.eye(3) + X.T @ X / 0.25
    cov = torch.linalg.inv(precision)
    mean = cov @ X.T @ y / 0.25
    sd = cov.diagonal().sqrt()
    err = ((w.mean(0) - mean) / sd).abs()
    ratio = w.std(0) / sd
    print(f"README example: |mean err| / sd {err.tolist()}, sd ratio {ratio.tolist()}")
    assert (err < 0.2).all() and ((ratio - 1).abs() < 0.15).all()

