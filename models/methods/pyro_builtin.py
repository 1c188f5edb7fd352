"""Pyro's own NUTS and SVI (Trace_ELBO), the reference methods of every comparison."""

from __future__ import annotations

import time

import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO, config_enumerate
from tqdm.auto import tqdm

from ..spec import ModelSpec
from . import FitConfig, FitResult, Method, chains_result, latent_names, register_method


def model_params(spec: ModelSpec) -> list[str]:
    """Names of learnable parameters (``pyro.param``/``pyro.module``) the model itself declares."""
    tr = poutine.trace(spec.model).get_trace(*spec.args, **spec.kwargs)
    return [name for name, site in tr.nodes.items() if site["type"] == "param"]


def _nuts_applies(spec: ModelSpec) -> str | None:
    params = model_params(spec)
    if params:
        return (
            f"the model has learnable parameters ({', '.join(params[:3])}...); NUTS samples "
            "latents only — fit the parameters by VI"
        )
    return None


def _fit_nuts(spec: ModelSpec, config: FitConfig) -> FitResult:
    pyro.set_rng_seed(config.seed)
    model = config_enumerate(spec.model) if spec.discrete_sites else spec.model
    kernel = NUTS(model, max_plate_nesting=spec.max_plate_nesting, **config.options)
    warmup = config.num_warmup if config.num_warmup is not None else max(config.num_samples // 2, 50)
    mcmc = MCMC(kernel, num_samples=config.num_samples, warmup_steps=warmup, num_chains=1,
                disable_progbar=not config.progress)
    start = time.perf_counter()
    mcmc.run(*spec.args, **spec.kwargs)
    wall = time.perf_counter() - start
    samples = mcmc.get_samples(group_by_chain=True)
    divergences = sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values())
    return chains_result("nuts", spec, samples, wall, ess_defined=True,
                     info={"warmup_steps": warmup, "num_chains": 1, "divergences": divergences})


def _svi_applies(spec: ModelSpec) -> str | None:
    if spec.discrete_sites:
        return f"Trace_ELBO needs continuous latents; {', '.join(spec.discrete_sites)} are discrete"
    return None


def run_svi(spec: ModelSpec, config: FitConfig, loss, name: str, *, default_steps: int = 1000,
            lr: float = 0.05) -> FitResult:
    """Fit ``spec.make_guide()`` with ``pyro.infer.SVI(loss=loss)``, then draw from the guide.

    Shared by every VI method: ClippedAdam with learning rate ``lr``, decayed tenfold over the run, ``num_steps`` (default ``default_steps``) full-data steps, and
    ``config.num_samples`` guide draws of the reported sites.
    """
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    guide = spec.make_guide()
    num_steps = config.num_steps or default_steps
    # decay the learning rate tenfold over the run: fast progress first, small noise at the end
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / num_steps)})
    svi = SVI(spec.model, guide, optim, loss=loss)
    start = time.perf_counter()
    losses = []
    for _ in tqdm(range(num_steps), desc=f"{name} {spec.name}", disable=not config.progress):
        losses.append(svi.step(*spec.args, **spec.kwargs))
    with torch.no_grad():
        draws = Predictive(guide, num_samples=config.num_samples, return_sites=latent_names(spec),
                           parallel=True)(*spec.args, **spec.kwargs)
    wall = time.perf_counter() - start
    info = {"final_loss": sum(losses[-50:]) / len(losses[-50:]), "num_steps": num_steps,
            "guide": type(guide).__name__}
    return chains_result(name, spec, {k: v[None] for k, v in draws.items()}, wall, info=info)


def _fit_svi(spec: ModelSpec, config: FitConfig) -> FitResult:
    return run_svi(spec, config, Trace_ELBO(), "svi", lr=float(config.options.get("lr", 0.05)))


register_method(Method("nuts", _fit_nuts, _nuts_applies,
                       "Pyro NUTS (1 chain; discrete latents enumerated)", family="mcmc"))
register_method(Method("svi", _fit_svi, _svi_applies,
                       "Pyro SVI: Trace_ELBO + the spec's default guide (AutoNormal) and ClippedAdam",
                       family="vi"))
