"""Particle methods for the CLI: coin sampling (Coin SVGD, Coin KSDD, Coin MSVGD) and Pyro's SVGD.

A particle set is one joint sample, so ESS is not defined for it. Each method runs
``num_chains`` independent particle sets (default 2, from different random starts) and reports
them as chains ``(sets, num_particles, *shape)``: split R-hat between the sets then says whether
independent runs agree. Coin SVGD and Coin KSDD run with their defaults (Laplace-whitened
particles started at Laplace draws, :class:`mcmc.coin.ParticleSampler`) and report their own
end-of-run check (the worst set's): the kernel Stein discrepancy at the start and the end against
the level of an exact sample, and the fraction of stuck particles (the diagnostics warn when
either is off). Pyro's SVGD (``svgd``, the reference with a learning rate) runs, on single-site
models, with an RBF kernel in the metric of the Laplace approximation (:class:`LaplaceRBFKernel`:
the same fixed point as Coin SVGD's whitened particles); Pyro's own ``RBFSteinKernel`` --
per-dimension bandwidths ``med_d / log(N + 1)`` -- under-disperses on correlated posteriors
(logistic_regression, 31 coordinates: sd ratios 0.5-0.9 whatever its bandwidth factor or the
number of steps, "univariate" mode; 0.06-0.4 "multivariate"), and on multi-site models Pyro 1.9
mis-groups the particles anyway. ``--num-steps`` is the number of iterations; the number of
particles is ``--option num_particles=N``.
"""

from __future__ import annotations

import time

from .base import FitConfig, FitResult, Method, Option, chains_result, continuous_latents_only

SETTINGS = ("num_steps",)


def _options(num_particles: int, *extra: Option) -> tuple[Option, ...]:
    return (Option("num_particles", int, num_particles, "particles per set", low=2),
            Option("num_chains", int, 2, "independent particle sets", low=1), *extra)


def _sets_result(name: str, spec, sets: list[dict], wall: float, info: dict) -> FitResult:
    import torch

    stacked = {k: torch.stack([s[k] for s in sets]) for k in sets[0]}
    return chains_result(name, spec, stacked, wall, kind="particles", info=info)


def _run_coin(name: str, spec, config: FitConfig, make, default_steps: int) -> FitResult:
    """``num_chains`` runs of the coin sampler ``make()``, each checked at its end
    (:meth:`mcmc.coin.ParticleSampler.diagnose`); the info holds the worst set's numbers."""
    import warnings

    import pyro

    from mcmc.diagnostics import ConvergenceWarning

    pyro.set_rng_seed(config.seed)
    num_steps = config.num_steps or default_steps
    sets, reports = [], []
    start = time.perf_counter()
    for _ in range(config.options["num_chains"]):
        sampler = make()
        with warnings.catch_warnings():  # the CLI reports them itself (models.metrics)
            warnings.simplefilter("ignore", ConvergenceWarning)
            sampler.run(num_steps, *spec.args, progress=config.progress, **spec.kwargs)
        reports.append(sampler.convergence)
        sets.append(sampler.get_named_particles())
    wall = time.perf_counter() - start
    worst = max(reports, key=lambda r: r.ksd / r.ksd_level)
    info = {"num_particles": config.options["num_particles"], "num_steps": num_steps,
            "initial_ksd": worst.initial_ksd, "ksd": worst.ksd, "ksd_level": worst.ksd_level,
            "stuck_fraction": max(r.stuck_fraction for r in reports)}
    return _sets_result(name, spec, sets, wall, info)


def _fit_coin_svgd(spec, config: FitConfig) -> FitResult:
    from mcmc import CoinSVGD

    return _run_coin("coin_svgd", spec, config, lambda: CoinSVGD(
        spec.model, num_particles=config.options["num_particles"],
        max_plate_nesting=spec.max_plate_nesting), 500)


def _fit_coin_ksdd(spec, config: FitConfig) -> FitResult:
    from mcmc import CoinKSDD

    return _run_coin("coin_ksdd", spec, config, lambda: CoinKSDD(
        spec.model, num_particles=config.options["num_particles"],
        max_plate_nesting=spec.max_plate_nesting), 300)


def _simplex_site(spec) -> str | None:
    """The model's single latent site if it is simplex-valued, else None."""
    import pyro
    import torch

    if len(spec.latent_sites) != 1:
        return None
    (site,) = spec.latent_sites
    tr = pyro.poutine.trace(spec.model).get_trace(*spec.args, **spec.kwargs)
    support = tr.nodes[site]["fn"].support
    return site if support is torch.distributions.constraints.simplex else None


def _msvgd_applies(spec) -> str | None:
    if _simplex_site(spec) is None:
        return "Coin MSVGD needs a model whose only latent site lives on the simplex"
    return None


def _fit_msvgd(spec, config: FitConfig) -> FitResult:
    import warnings

    import pyro

    from mcmc import CoinMSVGD, SimplexEntropy
    from mcmc.diagnostics import ConvergenceWarning

    pyro.set_rng_seed(config.seed)
    site = _simplex_site(spec)
    n = config.options["num_particles"]
    num_steps = config.num_steps or 500
    sets, stuck = [], []
    start = time.perf_counter()
    for _ in range(config.options["num_chains"]):
        sampler = CoinMSVGD.from_model(spec.model, site, SimplexEntropy(), n, spec.args,
                                       spec.kwargs, max_plate_nesting=spec.max_plate_nesting)
        with warnings.catch_warnings():  # the CLI reports them itself (models.metrics)
            warnings.simplefilter("ignore", ConvergenceWarning)
            sampler.run(num_steps, progress=config.progress)
        stuck.append(sampler.convergence.stuck_fraction)
        sets.append(sampler.get_named_particles())
    wall = time.perf_counter() - start
    return _sets_result("coin_msvgd", spec, sets, wall, {"num_particles": n,
                                                         "num_steps": num_steps,
                                                         "stuck_fraction": max(stuck)})


def _laplace_rbf_kernel(spec):
    """A :class:`pyro.infer.svgd.SteinKernel`: ``k(x, x') = exp(-(x - x')^T H (x - x') / (2 h))``
    with ``H`` the Hessian of the potential at its mode (:func:`mcmc.laplace.
    laplace_approximation`, eigenvalues floored) and ``h`` the median of the pairwise squared
    distances in that metric (the classic median rule in whitened coordinates). In Pyro's
    ``"multivariate"`` mode its per-dimension ``log_kernel`` terms sum to the log kernel."""
    import torch
    from pyro.infer.svgd import SteinKernel

    from mcmc import Potential, laplace_approximation

    pot = Potential(spec.model, spec.args, spec.kwargs, max_plate_nesting=spec.max_plate_nesting)
    lap = laplace_approximation(pot, pot.initial_params(1))
    precision = torch.cholesky_inverse(lap.scale_tril)

    class LaplaceRBFKernel(SteinKernel):
        @torch.no_grad()
        def log_kernel_and_grad(self, particles):
            n = particles.shape[0]
            delta = particles.unsqueeze(0) - particles.unsqueeze(1)  # [n, m] = x_m - x_n
            pd = delta @ precision.to(particles)
            quad = delta * pd
            iu = torch.triu_indices(n, n, 1)
            h = quad.sum(-1)[iu[0], iu[1]].median().clamp_min(torch.finfo(particles.dtype).tiny)
            return -quad / (2 * h), pd / h  # Pyro: kernel_grad = -grad_{x_m} log k

    return LaplaceRBFKernel()


def _fit_pyro_svgd(spec, config: FitConfig) -> FitResult:
    import pyro
    from pyro.infer import SVGD, RBFSteinKernel
    from tqdm.auto import trange

    pyro.set_rng_seed(config.seed)
    n = config.options["num_particles"]
    num_steps = config.num_steps or 500
    sets = []
    start = time.perf_counter()
    single_site = len(spec.latent_sites) == 1
    for _ in range(config.options["num_chains"]):
        pyro.clear_param_store()
        if single_site:
            kernel, mode = _laplace_rbf_kernel(spec), "multivariate"
        else:  # Pyro's particle grouping is wrong here anyway (see mcmc.coin_svgd)
            kernel, mode = RBFSteinKernel(), "univariate"
        svgd = SVGD(spec.model, kernel, pyro.optim.Adam({"lr": config.options["lr"]}),
                    num_particles=n, max_plate_nesting=spec.max_plate_nesting, mode=mode)
        for _ in trange(num_steps, desc=f"svgd {spec.name}", disable=not config.progress):
            svgd.step(*spec.args, **spec.kwargs)
        # Pyro keeps its particle plate's singleton dims: (N, 1, ..., *shape) -> (N, *shape)
        sets.append({k: v.reshape((n,) + tuple(spec.latent_sites.get(k, v.shape[1:])))
                     for k, v in svgd.get_named_particles().items()})
    wall = time.perf_counter() - start
    return _sets_result("svgd", spec, sets, wall, {
        "num_particles": n, "num_steps": num_steps,
        "kernel": "Laplace-metric RBF" if single_site else "Pyro RBFSteinKernel",
        "note": "" if single_site else "Pyro 1.9 SVGD: multi-site grouping bug"})


METHODS = (
    Method("coin_svgd", "particles", "Coin SVGD (learning-rate free; RBF kernel, median bandwidth)",
           _fit_coin_svgd, continuous_latents_only, _options(100), SETTINGS),
    Method("coin_ksdd", "particles", "Coin KSD descent (learning-rate free; IMQ kernel)",
           _fit_coin_ksdd, continuous_latents_only, _options(50), SETTINGS),
    Method("coin_msvgd", "particles", "Coin mirrored SVGD on the simplex (entropic mirror map)",
           _fit_msvgd, _msvgd_applies, _options(100), SETTINGS),
    Method("svgd", "particles",
           "Pyro SVGD with Adam (reference; Laplace-metric RBF kernel on single-site models; "
           "mis-groups particles of multi-site models)",
           _fit_pyro_svgd, continuous_latents_only,
           _options(100, Option("lr", float, 0.1, "Adam's learning rate", low=0.0,
                                low_open=True)), SETTINGS),
)
