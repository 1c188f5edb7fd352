"""Particle methods for the CLI: coin sampling (Coin SVGD, Coin KSDD, Coin MSVGD) and Pyro's SVGD.

A particle set is one joint sample, so ESS is not defined for it. Each method runs
``num_chains`` independent particle sets (default 2, from different random starts) and reports
them as chains ``(sets, num_particles, *shape)``: split R-hat between the sets then says whether
independent runs agree. The coin methods also report the kernel Stein discrepancy after the first
and the last iteration (the diagnostics warn when it has not fallen). ``--num-steps`` is the
number of iterations; the number of particles is ``--option num_particles=N``.
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
    """``num_chains`` runs of the coin sampler ``make()``; KSD after the first and last step."""
    import pyro

    pyro.set_rng_seed(config.seed)
    num_steps = config.num_steps or default_steps
    sets, ksd_first, ksd_last = [], [], []
    start = time.perf_counter()
    for _ in range(config.options["num_chains"]):
        sampler = make()
        sampler.run(1, *spec.args, **spec.kwargs)
        ksd_first.append(sampler.ksd())
        sampler.run(num_steps - 1, *spec.args, progress=config.progress, **spec.kwargs)
        ksd_last.append(sampler.ksd())
        sets.append(sampler.get_named_particles())
    wall = time.perf_counter() - start
    info = {"num_particles": config.options["num_particles"], "num_steps": num_steps,
            "initial_ksd": max(ksd_first), "ksd": max(ksd_last)}
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
    import pyro

    from mcmc import CoinMSVGD, SimplexEntropy

    pyro.set_rng_seed(config.seed)
    site = _simplex_site(spec)
    n = config.options["num_particles"]
    num_steps = config.num_steps or 500
    sets = []
    start = time.perf_counter()
    for _ in range(config.options["num_chains"]):
        sampler = CoinMSVGD.from_model(spec.model, site, SimplexEntropy(), n, spec.args,
                                       spec.kwargs, max_plate_nesting=spec.max_plate_nesting)
        sampler.run(num_steps, progress=config.progress)
        sets.append(sampler.get_named_particles())
    wall = time.perf_counter() - start
    return _sets_result("coin_msvgd", spec, sets, wall, {"num_particles": n,
                                                         "num_steps": num_steps})


def _fit_pyro_svgd(spec, config: FitConfig) -> FitResult:
    import pyro
    from pyro.infer import SVGD, RBFSteinKernel
    from tqdm.auto import trange

    pyro.set_rng_seed(config.seed)
    n = config.options["num_particles"]
    num_steps = config.num_steps or 500
    sets = []
    start = time.perf_counter()
    for _ in range(config.options["num_chains"]):
        pyro.clear_param_store()
        svgd = SVGD(spec.model, RBFSteinKernel(), pyro.optim.Adam({"lr": config.options["lr"]}),
                    num_particles=n, max_plate_nesting=spec.max_plate_nesting)
        for _ in trange(num_steps, desc=f"svgd {spec.name}", disable=not config.progress):
            svgd.step(*spec.args, **spec.kwargs)
        # Pyro keeps its particle plate's singleton dims: (N, 1, ..., *shape) -> (N, *shape)
        sets.append({k: v.reshape((n,) + tuple(spec.latent_sites.get(k, v.shape[1:])))
                     for k, v in svgd.get_named_particles().items()})
    wall = time.perf_counter() - start
    return _sets_result("svgd", spec, sets, wall, {
        "num_particles": n, "num_steps": num_steps,
        "note": "Pyro 1.9 SVGD: multi-site grouping bug"})


METHODS = (
    Method("coin_svgd", "particles", "Coin SVGD (learning-rate free; RBF kernel, median bandwidth)",
           _fit_coin_svgd, continuous_latents_only, _options(100), SETTINGS),
    Method("coin_ksdd", "particles", "Coin KSD descent (learning-rate free; IMQ kernel)",
           _fit_coin_ksdd, continuous_latents_only, _options(50), SETTINGS),
    Method("coin_msvgd", "particles", "Coin mirrored SVGD on the simplex (entropic mirror map)",
           _fit_msvgd, _msvgd_applies, _options(100), SETTINGS),
    Method("svgd", "particles",
           "Pyro SVGD with Adam (reference; mis-groups particles of multi-site models)",
           _fit_pyro_svgd, continuous_latents_only,
           _options(100, Option("lr", float, 0.05, "Adam's learning rate", low=0.0,
                                low_open=True)), SETTINGS),
)
