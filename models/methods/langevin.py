"""SGLD-family, federated and proximal samplers for the CLI.

The SGLD family uses the samplers' own defaults (:class:`mcmc.sgld.SGLD`): unless
``--option step_size=...`` is given, each kernel finds the posterior mode, preconditions with the
Laplace approximation there (``precondition="auto"``: models with up to 1000 unconstrained
coordinates) and takes ``h = min(0.1 / lambda_max, 0.5 / (lambda_max + V))`` in those
coordinates (:func:`mcmc.laplace.default_step_size`: ``lambda_max`` the largest curvature, 1
when whitened, ``V`` the minibatch gradient noise); chains start at Laplace draws (at the mode
without the preconditioner). Whitened chains decorrelate in about ``1 / h`` steps, so each
kept draw is ``ceil(1 / (2 h))`` steps apart by default (``thinning``): with ``h = 0.05`` and 500
draws per chain, 4 chains then hold ~500 effective draws instead of ~50 (split R-hat ~1.01
instead of ~1.15 on logistic_regression). The federated samplers take ``0.1 / lambda_max`` at
the mode in the model's coordinates (power iteration on exact Hessian-vector products) and start
at the mode; the proximal samplers use their kernel's own rule
(:class:`mcmc.bregman.BregmanProximalLangevin`, ``step_size=None``: chains start at the mode)
with 2000 warm-up steps and a per-method thinning. Options (see ``pyroforge list --method sgld``):
``step_size``, ``precondition``, ``num_chains`` (default 4), ``subsample_size`` (default: 10% of
the rows, at least 32, for models that support subsampling; full data otherwise), ``tau``
(federated local steps, default 10), ``thinning``.
"""

from __future__ import annotations

import math
import time

from .base import FitConfig, FitResult, Method, Option, chains_result, continuous_latents_only

STEP_SIZE = Option("step_size", float, None, "Langevin step size", low=0.0, low_open=True,
                   default_text="min(0.1 / lambda_max, 0.5 / (lambda_max + V)) at the mode, "
                                "lambda_max = 1 with the Laplace preconditioner")
MODE_STEP_SIZE = Option("step_size", float, None, "Langevin step size", low=0.0, low_open=True,
                        default_text="0.1 / lambda_max at the mode")
PRECONDITION = Option("precondition", str, "auto",
                      "Laplace preconditioner at the mode ('none': the model's coordinates)",
                      choices=("auto", "laplace", "none"))
SUBSAMPLE_SIZE = Option("subsample_size", int, None, "minibatch rows per gradient", low=1,
                        default_text="10% of the rows (>= 32), full data without subsampling")
THINNING = Option("thinning", int, None, "sampler steps per kept draw", low=1,
                  default_text="ceil(1 / (2 h)) with the Laplace preconditioner, else 1")


def num_chains_option(default: int) -> Option:
    return Option("num_chains", int, default, "independent chains (vectorised)", low=1)


def mode_and_step(spec, config: FitConfig) -> tuple:
    """The model's potential, its mode ``(1, D)`` and the step size to use (``0.1 /
    lambda_max`` at the mode unless ``step_size`` is given)."""
    from mcmc import Potential
    from mcmc.laplace import default_step_size, find_mode

    pot = Potential(spec.model, spec.args, spec.kwargs, max_plate_nesting=spec.max_plate_nesting)
    mode = find_mode(pot, pot.initial_params(1))
    step = config.options.get("step_size")
    if step is None:
        step = default_step_size(pot, mode)
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

        from mcmc import sgld

        kernel_cls = getattr(sgld, kernel_name)
        pyro.set_rng_seed(config.seed)
        start = time.perf_counter()
        num_chains = config.options["num_chains"]
        precondition = config.options["precondition"]
        kernel = kernel_cls(spec.model, config.options["step_size"],
                            precondition=None if precondition == "none" else precondition,
                            subsample_size=_subsample(spec, config),
                            max_plate_nesting=spec.max_plate_nesting, seed=config.seed)
        warmup = (config.warmup_steps if config.warmup_steps is not None
                  else config.num_samples // 2)
        kernel.setup_potential(spec.args, spec.kwargs)  # finds the step size (step_size=None)
        thinning = config.options["thinning"]
        if thinning is None:
            # whitened coordinates relax at rate ~h per step: keep about every 1 / (2 h)-th
            # step so that 500 draws per chain carry a few hundred effective ones
            thinning = (math.ceil(0.5 / kernel.schedule(0)) if kernel.scale_tril is not None
                        else 1)
        # the CLI checks the draws itself (models.metrics.diagnose), once for every method
        draws = kernel.sample_chains(config.num_samples, num_chains=num_chains,
                                     warmup_steps=warmup, thinning=thinning,
                                     model_args=spec.args, model_kwargs=spec.kwargs,
                                     progress=config.progress, diagnostics=False)
        wall = time.perf_counter() - start
        info = {"step_size": kernel.schedule(0), "thinning": thinning, "num_chains": num_chains,
                "subsample_size": kernel.subsample_size,
                "precondition": "laplace" if kernel.scale_tril is not None else "none"}
        if kernel.gradient_noise is not None:
            info["gradient_noise"] = kernel.gradient_noise
        return chains_result(name, spec, draws, wall, ess_defined=True, info=info)

    return Method(name, "mcmc", description, fit, continuous_latents_only,
                  (STEP_SIZE, PRECONDITION, num_chains_option(4), SUBSAMPLE_SIZE, THINNING),
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
                                      progress=config.progress, diagnostics=False)
        wall = time.perf_counter() - start
        warnings = []
        if method == "dsgld":
            warnings.append(
                f"dsgld on {spec.name}: DSGLD follows one shard's (rescaled) likelihood for tau "
                "steps at a time, so with shards that are not identically distributed its draws "
                "are biased even when the chains look converged; it is the baseline that FSGLD's "
                "conducive gradients correct: use fsgld for the posterior")
        return chains_result(name, spec, draws, wall, warnings=warnings,
                             ess_defined=True, info={"step_size": step, "tau": tau,
                                                 "num_shards": len(spec.shards)})

    return Method(name, "mcmc", description, fit, _federated_applies,
                  (MODE_STEP_SIZE, num_chains_option(4), SUBSAMPLE_SIZE,
                   Option("tau", int, 10, "local steps per shard visit", low=1)),
                  ("num_samples", "warmup_steps"))


# --------------------------------------------------------------------- proximal (nonsmooth) samplers
PENALTIES = {"l1": "L1"}
#: warm-up steps of the proximal samplers unless ``--warmup-steps`` is given
PROXIMAL_WARMUP_STEPS = 2000


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
        mirror = Hypentropy(config.options["beta"]) if method == "bmumla" else None
        # step_size=None: the kernel's own rule (0.1 / the curvature at the mode, relative to
        # the mirror map) and chains started at the mode
        kernel = BregmanProximalLangevin(spec.model, _nonsmooth_terms(spec), mirror,
                                         step_size=config.options["step_size"], method=method,
                                         max_plate_nesting=spec.max_plate_nesting,
                                         seed=config.seed)
        num_chains, thinning = config.options["num_chains"], config.options["thinning"]
        warmup = (config.warmup_steps if config.warmup_steps is not None
                  else PROXIMAL_WARMUP_STEPS)
        draws = kernel.sample_chains(config.num_samples, num_chains=num_chains,
                                     warmup_steps=warmup, thinning=thinning,
                                     model_args=spec.args, model_kwargs=spec.kwargs,
                                     progress=config.progress, diagnostics=False)
        wall = time.perf_counter() - start
        return chains_result(name, spec, draws, wall, ess_defined=True,
                             info={"step_size": kernel.step_size, "thinning": thinning,
                                   "num_chains": num_chains})

    # Unpreconditioned (MYULA) or diagonally preconditioned (BMUMLA) chains mix in about
    # kappa / (h L) = 10 kappa steps (kappa the posterior's condition number in the mirror's
    # metric): these thinnings let 8 chains of 500 draws pass split R-hat on sparse_logistic
    # (kappa ~ 80), the zoo's model with a nonsmooth term.
    thinning = {"myula": 80, "bmumla": 40}[method]
    options = (Option("step_size", float, None, "Langevin step size", low=0.0, low_open=True,
                      default_text="0.1 / L, L the smooth part's curvature at the mode "
                                   "(relative to the mirror map)"),
               num_chains_option(8),
               Option("thinning", int, thinning, "sampler steps per kept draw", low=1))
    if method == "bmumla":
        options += (Option("beta", float, 0.1, "hypentropy mirror-map parameter", low=0.0,
                           low_open=True),)
    return Method(name, "mcmc", description, fit, _proximal_applies, options,
                  ("num_samples", "warmup_steps"))


METHODS = (
    _sgld_method("sgld", "SGLD",
                 "SGLD (minibatch Langevin; Laplace preconditioner and step size from the "
                 "model, 4 vectorised chains)"),
    _sgld_method("psgld", "pSGLD", "Preconditioned SGLD (RMSprop preconditioner, frozen after "
                 "warm-up; on top of the Laplace preconditioner)"),
    _sgld_method("cvsgld", "CVSGLD", "Control-variate SGLD (gradients centred at the mode)"),
    _federated_method("fsgld", "fsgld", "Federated SGLD with conducive gradients (shards, tau=10)"),
    _federated_method("dsgld", "dsgld", "Distributed SGLD (shards visited in turn, tau=10; biased "
                      "on non-iid shards: the baseline for fsgld)"),
    _proximal_method("myula", "myula", "MYULA (Moreau-Yosida unadjusted Langevin; Euclidean prox)"),
    _proximal_method("bmumla", "bmumla",
                     "Bregman-Moreau unadjusted mirror Langevin (hypentropy, left envelope)"),
)
