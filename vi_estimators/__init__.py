"""Variational objectives written as programs, transformed into unbiased gradient estimators.

Modules (imports go one way, top to bottom):

* ``baselines``, ``estimators``, ``rejection`` -- per-site estimators and their baselines;
* ``core`` -- the run of a program: particle/plate shapes, the cost ledger, the surrogate;
* ``program`` -- the user constructs ``sim``, ``density``, ``particles``, ``logmeanexp``,
  ``with_estimator``, ``Objective``/``objective``;
* ``stopping``, ``flows``, ``path`` -- stopped parameters, fast flow path gradients, STL/DReG;
* ``objectives`` -- ELBO, IWELBO, VIMCO, RWS, Renyi, CUBO; ``hierarchical`` -- ``marginal``,
  HVI, IWHVI, DIWHVI;
* ``control_variates``, ``sliced`` -- control variates and the sliced Wasserstein distance;
* ``state`` (bottom layer) -- tensors carried across steps; ``capture`` -- objectives traced once
  and run as flat graphs (``capture=True``); ``svi`` -- ``CapturedSVI``, SVI steps as captured
  graphs.
"""

from .baselines import RLOO, Baseline, BaselineInfo, Constant, Learned, MovingAverage
from .control_variates import (
    DiagQuadraticCV,
    PreviousStepCoefficient,
    apply_control_variate,
    optimal_coefficient,
    taylor_control_variate,
    taylor_cv_term,
)
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
from .flows import (
    FlowPathGradient,
    fast_path_surrogate,
    flow_sample_and_score,
    forward_kl_path_surrogate,
)
from .hierarchical import DIWHVI, HVI, IWHVI, marginal
from .objectives import CUBO, ELBO, IWELBO, RWS, VIMCO, Renyi
from .path import stopped_log_prob, stopped_trace
from .program import (
    Objective,
    density,
    logmeanexp,
    objective,
    particles,
    sim,
    with_estimator,
)
from .rejection import RSVI
from .sliced import sliced_wasserstein
from .svi import CapturedSVI

__all__ = [
    "CUBO",
    "DIWHVI",
    "ELBO",
    "HVI",
    "IWELBO",
    "IWHVI",
    "MVD",
    "RLOO",
    "RSVI",
    "RWS",
    "VIMCO",
    "Alternatives",
    "Baseline",
    "BaselineInfo",
    "CapturedSVI",
    "Constant",
    "DiagQuadraticCV",
    "Enumerate",
    "Estimator",
    "FlowPathGradient",
    "Learned",
    "MovingAverage",
    "NoGrad",
    "Objective",
    "PreviousStepCoefficient",
    "Reinforce",
    "Renyi",
    "Reparam",
    "SiteDraw",
    "apply_control_variate",
    "default_estimator",
    "density",
    "fast_path_surrogate",
    "flow_sample_and_score",
    "forward_kl_path_surrogate",
    "logmeanexp",
    "marginal",
    "objective",
    "optimal_coefficient",
    "particles",
    "sim",
    "sliced_wasserstein",
    "stopped_log_prob",
    "stopped_trace",
    "taylor_control_variate",
    "taylor_cv_term",
    "with_estimator",
]
