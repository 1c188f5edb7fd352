"""Variational objectives written as programs, transformed into unbiased gradient estimators.

See ``vi_estimators.program`` for the core idea (objective programs, ``sim``/``density``,
the DiCE-style surrogate), ``vi_estimators.estimators`` for the per-site estimator protocol and
``vi_estimators.objectives`` for the shipped objectives.
"""

from .baselines import RLOO, Baseline, BaselineInfo, Constant, Learned, MovingAverage
from .estimators import (
    MVD,
    Alternatives,
    Enumerate,
    Estimator,
    NoGrad,
    Reinforce,
    Reparam,
    SiteDraw,
    default_estimator,
)
from .objectives import CUBO, DIWHVI, ELBO, HVI, IWELBO, IWHVI, RWS, VIMCO, Renyi
from .program import (
    Objective,
    density,
    logmeanexp,
    marginal,
    objective,
    particles,
    sim,
    with_estimator,
)

__all__ = [
    "CUBO",
    "DIWHVI",
    "ELBO",
    "HVI",
    "IWELBO",
    "IWHVI",
    "MVD",
    "RLOO",
    "RWS",
    "VIMCO",
    "Alternatives",
    "Baseline",
    "BaselineInfo",
    "Constant",
    "Enumerate",
    "Estimator",
    "Learned",
    "MovingAverage",
    "NoGrad",
    "Objective",
    "Reinforce",
    "Renyi",
    "Reparam",
    "SiteDraw",
    "default_estimator",
    "density",
    "logmeanexp",
    "marginal",
    "objective",
    "particles",
    "sim",
    "with_estimator",
]

# Low-variance gradient estimators (RSVI, path gradients, control variates, sliced Wasserstein).
from .control_variates import (
    DiagQuadraticCV,
    PreviousStepCoefficient,
    apply_control_variate,
    optimal_coefficient,
    taylor_control_variate,
    taylor_cv_term,
)
from .path import (
    FlowPathGradient,
    fast_path_surrogate,
    flow_sample_and_score,
    forward_kl_path_surrogate,
    stopped_log_prob,
)
from .rejection import RSVI
from .sliced import sliced_wasserstein

__all__ += [
    "RSVI",
    "DiagQuadraticCV",
    "FlowPathGradient",
    "PreviousStepCoefficient",
    "apply_control_variate",
    "fast_path_surrogate",
    "flow_sample_and_score",
    "forward_kl_path_surrogate",
    "optimal_coefficient",
    "sliced_wasserstein",
    "stopped_log_prob",
    "taylor_control_variate",
    "taylor_cv_term",
]
