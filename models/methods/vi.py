"""The objectives of :mod:`vi_estimators` as CLI methods (fitted with ``pyro.infer.SVI``).

Method options (``pyroforge run ... --option KEY=VALUE``): ``lr`` (default 0.05; 0.1 for the
importance-weighted bounds),
``num_particles`` (default 8 for importance-weighted objectives, 1 for ELBO) and ``estimator``
(the objective-wide default per-site estimator: ``reparam``, ``reinforce``, ``mvd``,
``enumerate``; default: Reparam where the site has ``rsample``, else Reinforce with baselines).
"""

from __future__ import annotations

import vi_estimators as vi

from ..spec import ModelSpec
from . import FitConfig, FitResult, Method, register_method
from .pyro_builtin import model_params, run_svi

ESTIMATORS = {"reparam": vi.Reparam, "reinforce": vi.Reinforce, "mvd": vi.MVD,
              "enumerate": vi.Enumerate}


def _estimator(options: dict):
    name = options.get("estimator")
    if name is None:
        return None
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is not known; choose one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]()


def _applies(spec: ModelSpec) -> str | None:
    params = model_params(spec)
    if params:
        return (f"the model has network parameters ({params[0]}, ...): use the VAE tutorial or "
                "benchmarks for amortised training")
    return None


def _register(name: str, description: str, make_loss, *, importance_weighted: bool,
              applies=None, default_lr: float | None = None) -> None:
    def fit(spec: ModelSpec, config: FitConfig) -> FitResult:
        options = dict(config.options)
        kwargs = {"max_plate_nesting": spec.max_plate_nesting}
        estimator = _estimator(options)
        if estimator is not None:
            kwargs["estimator"] = estimator
        if "num_particles" in options or importance_weighted:
            kwargs["num_particles"] = int(options.get("num_particles", 8))
        loss = make_loss(**kwargs)
        # Importance-weighted bounds move the guide more slowly (the signal-to-noise ratio of
        # its gradient falls with K), so they get a larger learning rate and more steps.
        lr = float(options.get("lr", default_lr or (0.1 if importance_weighted else 0.05)))
        return run_svi(spec, config, loss, name, lr=lr,
                       default_steps=1500 if importance_weighted else 1000)

    register_method(Method(name, fit, applies or _applies, description, family="vi"))


_register("elbo", "vi_estimators.ELBO (drop-in Trace_ELBO; per-site estimators)", vi.ELBO,
          importance_weighted=False)
_register("elbo_stl", "ELBO with sticking-the-landing path gradients",
          lambda **k: vi.ELBO(path_gradient=True, **k), importance_weighted=False)
_register("iwelbo", "IWELBO (importance weighted, K=8)", vi.IWELBO, importance_weighted=True)
_register("iwelbo_dreg", "IWELBO with doubly reparameterised (DReG) gradients",
          lambda **k: vi.IWELBO(path_gradient=True, **k), importance_weighted=True)
def _vimco_applies(spec: ModelSpec) -> str | None:
    if not spec.discrete_sites:
        return ("VIMCO is a score-function estimator for non-reparameterisable (discrete) "
                "latents; on continuous models use iwelbo or iwelbo_dreg")
    return _applies(spec)


_register("vimco", "VIMCO (score-function gradients, leave-one-out per-particle signals)",
          vi.VIMCO, importance_weighted=True, applies=_vimco_applies)
# wake-phi's self-normalised gradient is noisier than the bound's: a smaller default step
_register("rws", "Reweighted wake-sleep (wake-theta + wake-phi)", vi.RWS, importance_weighted=True,
          default_lr=0.05)
_register("renyi", "Renyi divergence bound, alpha=0.5", lambda **k: vi.Renyi(0.5, **k),
          importance_weighted=True)
_register("cubo", "Chi upper bound CUBO_2", lambda **k: vi.CUBO(2.0, **k), importance_weighted=True)
