"""Particle methods for the CLI: coin sampling (Coin SVGD, Coin KSDD, Coin MSVGD) and Pyro's SVGD.

Particles are reported as one chain whose draws are the particles (ESS is not defined).
Options: ``num_particles`` (default 100; 50 for KSDD), ``lr`` (Pyro SVGD's Adam, default 0.05).
"""

from __future__ import annotations

import time

import pyro
import torch
from pyro.infer import SVGD, RBFSteinKernel
from tqdm.auto import trange

from mcmc import CoinKSDD, CoinMSVGD, CoinSVGD, SimplexEntropy

from ..spec import ModelSpec
from . import FitConfig, FitResult, Method, chains_result, register_method
from .pyro_builtin import model_params


def _continuous_latents_only(spec: ModelSpec) -> str | None:
    if spec.discrete_sites:
        return f"particle methods need continuous latents; {', '.join(spec.discrete_sites)} are discrete"
    params = model_params(spec)
    if params:
        return f"the model has learnable parameters ({params[0]}, ...)"
    return None


def _result(name: str, spec: ModelSpec, named: dict, wall: float, info: dict) -> FitResult:
    return chains_result(name, spec, {k: v[None] for k, v in named.items()}, wall,
                         kind="particles", info=info)


def _fit_sampler(name: str, make, default_particles: int, default_steps: int):
    def fit(spec: ModelSpec, config: FitConfig) -> FitResult:
        pyro.set_rng_seed(config.seed)
        num_particles = int(config.options.get("num_particles", default_particles))
        sampler = make(spec, num_particles)
        num_steps = config.num_steps or default_steps
        start = time.perf_counter()
        sampler.run(num_steps, *spec.args, progress=config.progress, **spec.kwargs)
        wall = time.perf_counter() - start
        return _result(name, spec, sampler.get_named_particles(), wall,
                       {"num_particles": num_particles, "num_steps": num_steps})

    return fit


register_method(Method(
    "coin_svgd",
    _fit_sampler("coin_svgd", lambda spec, n: CoinSVGD(spec.model, num_particles=n,
                                                        max_plate_nesting=spec.max_plate_nesting),
                 100, 500),
    _continuous_latents_only, "Coin SVGD (learning-rate free; RBF kernel, median bandwidth)",
    family="particles"))
register_method(Method(
    "coin_ksdd",
    _fit_sampler("coin_ksdd", lambda spec, n: CoinKSDD(spec.model, num_particles=n,
                                                        max_plate_nesting=spec.max_plate_nesting),
                 50, 300),
    _continuous_latents_only, "Coin KSD descent (learning-rate free; IMQ kernel)",
    family="particles"))


def _simplex_site(spec: ModelSpec) -> str | None:
    """The model's single latent site if it is simplex-valued, else None."""
    if len(spec.latent_sites) != 1:
        return None
    (site,) = spec.latent_sites
    tr = pyro.poutine.trace(spec.model).get_trace(*spec.args, **spec.kwargs)
    support = tr.nodes[site]["fn"].support
    return site if support is torch.distributions.constraints.simplex else None


def _msvgd_applies(spec: ModelSpec) -> str | None:
    if _simplex_site(spec) is None:
        return "Coin MSVGD needs a model whose only latent site lives on the simplex"
    return None


def _fit_msvgd(spec: ModelSpec, config: FitConfig) -> FitResult:
    pyro.set_rng_seed(config.seed)
    site = _simplex_site(spec)
    n = int(config.options.get("num_particles", 100))
    sampler = CoinMSVGD.from_model(spec.model, site, SimplexEntropy(), n, spec.args, spec.kwargs,
                                   max_plate_nesting=spec.max_plate_nesting)
    num_steps = config.num_steps or 500
    start = time.perf_counter()
    sampler.run(num_steps, progress=config.progress)
    wall = time.perf_counter() - start
    return _result("coin_msvgd", spec, sampler.get_named_particles(), wall,
                   {"num_particles": n, "num_steps": num_steps})


register_method(Method("coin_msvgd", _fit_msvgd, _msvgd_applies,
                       "Coin mirrored SVGD on the simplex (entropic mirror map)", family="particles"))


def _fit_pyro_svgd(spec: ModelSpec, config: FitConfig) -> FitResult:
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    n = int(config.options.get("num_particles", 100))
    svgd = SVGD(spec.model, RBFSteinKernel(), pyro.optim.Adam({"lr": float(config.options.get("lr", 0.05))}),
                num_particles=n, max_plate_nesting=spec.max_plate_nesting)
    num_steps = config.num_steps or 500
    start = time.perf_counter()
    for _ in trange(num_steps, desc=f"svgd {spec.name}", disable=not config.progress):
        svgd.step(*spec.args, **spec.kwargs)
    wall = time.perf_counter() - start
    # Pyro keeps its particle plate's singleton dims: (N, 1, ..., *shape) -> (N, *shape)
    named = {}
    for k, v in svgd.get_named_particles().items():
        shape = tuple(spec.latent_sites.get(k, v.shape[1:]))
        named[k] = v.reshape((n,) + shape)
    return _result("svgd", spec, named, wall, {"num_particles": n, "num_steps": num_steps,
                                              "note": "Pyro 1.9 SVGD: multi-site grouping bug"})


register_method(Method("svgd", _fit_pyro_svgd, _continuous_latents_only,
                       "Pyro SVGD with Adam (reference; mis-groups particles of multi-site models)",
                       family="particles"))
