"""Pyro's own NUTS, the reference sampler of every comparison (Pyro's SVI is in ``vi.py``).

Chains are run one after another, each from its own random initial point (``init_to_uniform``,
Pyro's default), so split R-hat compares independent runs; running them in one process keeps the
CLI's behaviour the same on every machine (Pyro's ``MCMC(num_chains>1)`` forks processes when
there are enough cores).
"""

from __future__ import annotations

import time

from .base import FitConfig, FitResult, Method, Option, chains_result, model_params


def _nuts_applies(spec) -> str | None:
    params = model_params(spec)
    if params:
        return (
            f"the model has learnable parameters ({', '.join(params[:3])}...); NUTS samples "
            "latents only — fit the parameters by VI"
        )
    return None


def _fit_nuts(spec, config: FitConfig) -> FitResult:
    import pyro
    import torch
    from pyro.infer import MCMC, NUTS, config_enumerate

    options = config.options
    pyro.set_rng_seed(config.seed)
    model = config_enumerate(spec.model) if spec.discrete_sites else spec.model
    warmup = (config.warmup_steps if config.warmup_steps is not None
              else max(config.num_samples // 2, 50))
    chains, divergences = [], 0
    start = time.perf_counter()
    for _ in range(options["num_chains"]):
        kernel = NUTS(model, max_plate_nesting=spec.max_plate_nesting,
                      target_accept_prob=options["target_accept_prob"],
                      max_tree_depth=options["max_tree_depth"])
        mcmc = MCMC(kernel, num_samples=config.num_samples, warmup_steps=warmup, num_chains=1,
                    disable_progbar=not config.progress)
        mcmc.run(*spec.args, **spec.kwargs)
        chains.append(mcmc.get_samples(group_by_chain=True))
        if config.num_samples >= 4:  # MCMC.diagnostics() also computes R-hat (>= 4 draws)
            divergences += sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    wall = time.perf_counter() - start
    samples = {k: torch.cat([c[k] for c in chains]) for k in chains[0]}
    return chains_result("nuts", spec, samples, wall, ess_defined=True,
                         info={"warmup_steps": warmup, "num_chains": options["num_chains"],
                               "divergences": divergences})


METHODS = (
    Method("nuts", "mcmc", "Pyro NUTS (2 chains; discrete latents enumerated)", _fit_nuts,
           _nuts_applies,
           (Option("num_chains", int, 2, "independent chains, run one after another", low=1),
            Option("target_accept_prob", float, 0.8, "step-size adaptation target",
                   low=0.0, high=1.0, low_open=True, high_open=True),
            Option("max_tree_depth", int, 10, "maximum tree depth (2^depth leapfrog steps)",
                   low=1)),
           ("num_samples", "warmup_steps")),
)
