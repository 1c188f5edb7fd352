"""SGLD-family and federated samplers for the CLI.

Step sizes are model-dependent; unless ``--option step_size=...`` is given, the CLI uses
``h = 0.1 / lambda_max`` with ``lambda_max`` the largest curvature of the potential at its mode
(power iteration on finite-difference Hessian-vector products): stable for Langevin schemes
(which need ``h < 2 / lambda_max``) and with a modest discretisation bias. Chains start at the
mode. Options (see ``pyroforge list --method sgld``): ``step_size``, ``num_chains`` (default 4),
``subsample_size`` (default: 10% of the rows, at least 32, for models that support subsampling;
full data otherwise), ``tau`` (federated local steps, default 10).
"""

from __future__ import annotations

import time

from .base import FitConfig, FitResult, Method, Option, chains_result, continuous_latents_only

STEP_SIZE = Option("step_size", float, None, "Langevin step size", low=0.0, low_open=True,
                   default_text="0.1 / lambda_max at the mode")
SUBSAMPLE_SIZE = Option("subsample_size", int, None, "minibatch rows per gradient", low=1,
                        default_text="10% of the rows (>= 32), full data without subsampling")


def num_chains_option(default: int) -> Option:
    return Option("num_chains", int, default, "independent chains (vectorised)", low=1)


def largest_curvature(pot, z, iters: int = 30) -> float:
    """Largest eigenvalue of the potential's Hessian at ``z (1, D)`` by power iteration."""
    import torch

    v = torch.randn_like(z)
    v = v / v.norm()
    eps = 1e-4 * (1 + float(z.abs().max()))
    lam = 1.0
    for _ in range(iters):
        hv = (pot.value_and_grad(z + eps * v)[1] - pot.value_and_grad(z - eps * v)[1]) / (2 * eps)
        lam = float((hv * v).sum())
        norm = hv.norm()
        if not torch.isfinite(norm) or norm == 0:
            break
        v = hv / norm
    return abs(lam)


def mode_and_step(spec, config: FitConfig) -> tuple:
    """The model's potential, its mode ``(1, D)`` and the step size to use."""
    from mcmc import Potential
    from mcmc.sgld import find_mode

    pot = Potential(spec.model, spec.args, spec.kwargs, max_plate_nesting=spec.max_plate_nesting)
    mode = find_mode(pot, pot.initial_params(1))
    step = config.options.get("step_size")
    if step is None:
        step = 0.1 / max(largest_curvature(pot, mode), 1e-12)
    return pot, mode, float(step)


def _subsample(spec, config: FitConfig) -> int | None:
    if config.options.get("subsample_size") is not None:
        return config.options["subsample_size"]
    if not spec.supports_subsampling or not spec.data_size:
        return None
    return min(spec.data_size, max(32, spec.data_size // 10))


def _sgld_method(name: str, kernel_name: str, description: str) -> Method:
    def fit(spec, config: FitConfig) -> FitResult:
        import pyro
        import torch

        from mcmc import sgld

        kernel_cls = getattr(sgld, kernel_name)
        pyro.set_rng_seed(config.seed)
        start = time.perf_counter()
        _, mode, step = mode_and_step(spec, config)
        num_chains = config.options["num_chains"]
        kwargs = {"anchor": mode} if kernel_cls is sgld.CVSGLD else {}
        start_at = mode.expand(num_chains, -1)
        if kernel_cls is sgld.pSGLD:
            # pSGLD's preconditioner is 1/sqrt(E[g^2]): at stationarity g ~ sqrt(lambda) per
            # coordinate, so the effective step is h/sqrt(lambda) and h = 0.1/sqrt(lambda_max)
            # is as stable as SGLD's 0.1/lambda_max. Its running average starts at the first
            # gradient squared, which vanishes at the mode: start one posterior sd away instead.
            lam = 0.1 / step
            if config.options["step_size"] is None:
                step = 0.1 / lam ** 0.5
            start_at = start_at + torch.randn(start_at.shape, dtype=mode.dtype,
                                              device=mode.device) / lam ** 0.5
        kernel = kernel_cls(spec.model, step, subsample_size=_subsample(spec, config),
                            max_plate_nesting=spec.max_plate_nesting, seed=config.seed, **kwargs)
        warmup = (config.warmup_steps if config.warmup_steps is not None
                  else config.num_samples // 2)
        draws = kernel.sample_chains(config.num_samples, num_chains=num_chains,
                                     warmup_steps=warmup, model_args=spec.args,
                                     model_kwargs=spec.kwargs,
                                     initial_params=start_at, progress=config.progress)
        wall = time.perf_counter() - start
        return chains_result(name, spec, draws, wall,
                             ess_defined=True, info={"step_size": step, "num_chains": num_chains,
                                                 "subsample_size": kernel.subsample_size})

    return Method(name, "mcmc", description, fit, continuous_latents_only,
                  (STEP_SIZE, num_chains_option(4), SUBSAMPLE_SIZE),
                  ("num_samples", "warmup_steps"))


def _federated_applies(spec) -> str | None:
    if not spec.shards:
        return "federated samplers need a model with shards (spec.shards), e.g. federated_blobs"
    return continuous_latents_only(spec)


def _federated_method(name: str, method: str, description: str) -> Method:
    def fit(spec, config: FitConfig) -> FitResult:
        import pyro

        from mcmc.federated import FederatedSGLD

        pyro.set_rng_seed(config.seed)
        start = time.perf_counter()
        _, mode, step = mode_and_step(spec, config)
        tau = config.options["tau"]
        num_chains = config.options["num_chains"]
        # the zoo's shard models scale their own likelihood (num_total=N)
        sampler = FederatedSGLD(spec.model, spec.shards, method=method, step_size=step, tau=tau,
                                subsample_size=config.options["subsample_size"],
                                scale_likelihood=False,
                                max_plate_nesting=spec.max_plate_nesting, seed=config.seed,
                                shard_sizes=spec.options.get("shard_sizes"))
        rounds = -(-config.num_samples // tau)
        warmup = (max(rounds // 2, 1) * tau if config.warmup_steps is None
                  else max(-(-config.warmup_steps // tau), 1) * tau)
        draws = sampler.sample_chains(config.num_samples, num_chains=num_chains,
                                      warmup_steps=warmup,
                                      initial_params=mode.expand(num_chains, -1),
                                      progress=config.progress)
        wall = time.perf_counter() - start
        return chains_result(name, spec, draws, wall,
                             ess_defined=True, info={"step_size": step, "tau": tau,
                                                 "num_shards": len(spec.shards)})

    return Method(name, "mcmc", description, fit, _federated_applies,
                  (STEP_SIZE, num_chains_option(4), SUBSAMPLE_SIZE,
                   Option("tau", int, 10, "local steps per shard visit", low=1)),
                  ("num_samples", "warmup_steps"))


# --------------------------------------------------------------------- proximal (nonsmooth) samplers
PENALTIES = {"l1": "L1"}


def _nonsmooth_terms(spec) -> dict:
    from mcmc import prox

    terms = {}
    for site, info in spec.nonsmooth.items():
        cls = getattr(prox, PENALTIES[info["penalty"]])
        terms[site] = cls(info["weight"])
    return terms


def _proximal_applies(spec) -> str | None:
    if not spec.nonsmooth:
        return "proximal samplers need a model with a marked nonsmooth term (spec.nonsmooth)"
    unknown = [s for s, info in spec.nonsmooth.items() if info.get("penalty") not in PENALTIES]
    if unknown:
        return f"no prox registered for the penalties of {unknown}"
    return continuous_latents_only(spec)


def _proximal_method(name: str, method: str, description: str) -> Method:
    def fit(spec, config: FitConfig) -> FitResult:
        import pyro

        from mcmc.bregman import BregmanProximalLangevin
        from mcmc.mirror import Hypentropy

        pyro.set_rng_seed(config.seed)
        start = time.perf_counter()
        pot, mode, step = mode_and_step(spec, config)
        mirror = Hypentropy(config.options["beta"]) if method == "bmumla" else None
        kernel = BregmanProximalLangevin(spec.model, _nonsmooth_terms(spec), mirror,
                                         step_size=step, method=method,
                                         max_plate_nesting=spec.max_plate_nesting)
        num_chains = config.options["num_chains"]
        warmup = (config.warmup_steps if config.warmup_steps is not None
                  else config.num_samples)
        draws = kernel.sample_chains(config.num_samples, num_chains=num_chains,
                                     warmup_steps=warmup, model_args=spec.args,
                                     model_kwargs=spec.kwargs, initial_params=pot.unpack(mode),
                                     progress=config.progress)
        wall = time.perf_counter() - start
        return chains_result(name, spec, draws, wall,
                             ess_defined=True, info={"step_size": step, "num_chains": num_chains})

    options = (STEP_SIZE, num_chains_option(8))
    if method == "bmumla":
        options += (Option("beta", float, 0.1, "hypentropy mirror-map parameter", low=0.0,
                           low_open=True),)
    return Method(name, "mcmc", description, fit, _proximal_applies, options,
                  ("num_samples", "warmup_steps"))


METHODS = (
    _sgld_method("sgld", "SGLD",
                 "SGLD (minibatch Langevin; step 0.1/lambda_max, 4 vectorised chains)"),
    _sgld_method("psgld", "pSGLD", "Preconditioned SGLD (RMSprop preconditioner)"),
    _sgld_method("cvsgld", "CVSGLD", "Control-variate SGLD (gradients centred at the mode)"),
    _federated_method("fsgld", "fsgld", "Federated SGLD with conducive gradients (shards, tau=10)"),
    _federated_method("dsgld", "dsgld", "Distributed SGLD (shards visited in turn, tau=10)"),
    _proximal_method("myula", "myula", "MYULA (Moreau-Yosida unadjusted Langevin; Euclidean prox)"),
    _proximal_method("bmumla", "bmumla",
                     "Bregman-Moreau unadjusted mirror Langevin (hypentropy, left envelope)"),
)
