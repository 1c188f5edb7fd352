"""Variational methods of the CLI: Pyro's ``Trace_ELBO`` and the objectives of :mod:`vi_estimators`,
all fitted by :func:`~models.methods.svi_runner.run_svi` (Adam, plateau schedule, stopping rule).

Defaults: ``lr`` 0.1 (0.05 for RWS, whose self-normalised wake-phi gradient is noisier and
diverged at 0.1 on ``gaussian_conjugate``); ``num_particles`` 8 -- averaged, vectorised ELBO
estimates for the ELBO family (nearly free on the zoo's models, and the noise it removes is what
made single-particle fits stall: the Gamma guide of ``gamma_poisson`` drifts along a flat ridge),
and K inside the importance-weighted bounds. Importance-weighted objectives get a first phase of
at least 1000 steps (their guide gradient is weaker) and report importance-resampled draws (see
:func:`~models.methods.svi_runner.guide_draws`).
"""

from __future__ import annotations

from .base import FitConfig, FitResult, Method, Option, model_params
from .svi_runner import StoppingRule, run_svi

ESTIMATORS = ("reparam", "reinforce", "mvd", "enumerate")
SETTINGS = ("num_samples", "num_steps")


def _options(lr: float, estimator: bool) -> tuple[Option, ...]:
    options = (
        Option("lr", float, lr, "Adam's initial learning rate (divided by 10 at each plateau)",
               low=0.0, low_open=True),
        Option("num_particles", int, 8, "ELBO estimates averaged per step (ELBO family) or "
               "importance samples K inside the bound", low=1),
    )
    if estimator:
        options += (Option("estimator", str, None, "objective-wide per-site gradient estimator",
                           choices=ESTIMATORS,
                           default_text="Reparam where the site has rsample, else Reinforce"),)
    return options


def _applies(spec) -> str | None:
    params = model_params(spec)
    if params:
        return (f"the model has network parameters ({params[0]}, ...): use the VAE tutorial or "
                "benchmarks for amortised training")
    return None


def _svi_applies(spec) -> str | None:
    if spec.discrete_sites:
        return f"Trace_ELBO needs continuous latents; {', '.join(spec.discrete_sites)} are discrete"
    return None


def _reparam_applies(spec) -> str | None:
    if spec.discrete_sites:
        return (f"DReG gradients need reparameterised latents; {', '.join(spec.discrete_sites)} "
                "are discrete (use iwelbo or vimco)")
    return _applies(spec)


def _vimco_applies(spec) -> str | None:
    if not spec.discrete_sites:
        return ("VIMCO is a score-function estimator for non-reparameterisable (discrete) "
                "latents; on continuous models use iwelbo or iwelbo_dreg")
    return _applies(spec)


def _objective(name: str):
    """``make(**kwargs) -> loss`` for the method ``name`` (imports vi_estimators lazily)."""
    import vi_estimators as vi

    return {
        "elbo": vi.ELBO,
        "elbo_stl": lambda **k: vi.ELBO(path_gradient=True, **k),
        "iwelbo": vi.IWELBO,
        "iwelbo_dreg": lambda **k: vi.IWELBO(path_gradient=True, **k),
        "vimco": vi.VIMCO,
        "rws": vi.RWS,
        "renyi": lambda **k: vi.Renyi(0.5, **k),
        "cubo": lambda **k: vi.CUBO(2.0, **k),
    }[name]


def _estimator(name: str | None):
    if name is None:
        return None
    import vi_estimators as vi

    return {"reparam": vi.Reparam, "reinforce": vi.Reinforce, "mvd": vi.MVD,
            "enumerate": vi.Enumerate}[name]()


def _fit_svi(spec, config: FitConfig) -> FitResult:
    from pyro.infer import Trace_ELBO

    k = config.options["num_particles"]
    loss = Trace_ELBO(num_particles=k, vectorize_particles=k > 1,
                      max_plate_nesting=spec.max_plate_nesting)
    return run_svi(spec, config, loss, "svi", lr=config.options["lr"])


def _vi_method(name: str, description: str, *, importance_weighted: bool, lr: float = 0.1,
               applies=_applies) -> Method:
    def fit(spec, config: FitConfig) -> FitResult:
        options = config.options
        kwargs = {"max_plate_nesting": spec.max_plate_nesting,
                  "num_particles": options["num_particles"]}
        if not importance_weighted:
            kwargs["vectorize_particles"] = options["num_particles"] > 1
        estimator = _estimator(options.get("estimator"))
        if estimator is not None:
            kwargs["estimator"] = estimator
        loss = _objective(name)(**kwargs)
        rule = StoppingRule(min_steps=1000 if importance_weighted else 200)
        return run_svi(spec, config, loss, name, lr=options["lr"], rule=rule,
                       resample=options["num_particles"] if importance_weighted else 0)

    return Method(name, "vi", description, fit, applies, _options(lr, estimator=True), SETTINGS)


METHODS = (
    Method("svi", "vi", "Pyro SVI: Trace_ELBO (8 vectorised particles) + the model's default guide",
           _fit_svi, _svi_applies, _options(0.1, estimator=False), SETTINGS),
    _vi_method("elbo", "vi_estimators.ELBO (drop-in Trace_ELBO; per-site estimators)",
               importance_weighted=False),
    _vi_method("elbo_stl", "ELBO with sticking-the-landing path gradients",
               importance_weighted=False),
    _vi_method("iwelbo", "IWELBO (importance weighted, K=8); importance-resampled draws",
               importance_weighted=True),
    _vi_method("iwelbo_dreg", "IWELBO with doubly reparameterised (DReG) gradients",
               importance_weighted=True, applies=_reparam_applies),
    _vi_method("vimco", "VIMCO (score-function gradients, leave-one-out per-particle signals)",
               importance_weighted=True, applies=_vimco_applies),
    _vi_method("rws", "Reweighted wake-sleep (wake-theta + wake-phi)", importance_weighted=True,
               lr=0.05),
    _vi_method("renyi", "Renyi divergence bound, alpha=0.5", importance_weighted=True),
    _vi_method("cubo", "Chi upper bound CUBO_2 (mass-covering)", importance_weighted=True),
)
