"""Objectives as programs: ``objective``, ``sim``, ``density``, ``particles``, ``logmeanexp``.

An objective is a Python function ``program(model, guide, *args, **kwargs)`` that returns a
Monte-Carlo estimate ``F`` of a quantity to *maximise*. Inside it:

* ``trace, log_q = sim(guide, *args, **kwargs)`` runs the guide; every latent sample site is drawn
  by its :mod:`estimator <vi_estimators.estimators>` (``infer={"estimator": ...}``, else the
  objective's ``estimator=`` option, else Reparam/Reinforce by ``has_rsample``);
* ``log_p = density(model, trace, *args, **kwargs)`` is the model's log joint at the traced
  latents (observed sites included, plate/subsample scales and masks applied);
* ``with particles() as dim:`` vectorises K independent copies on a new leftmost batch dim;
  ``log_q``/``log_p`` are then *per-particle* tensors of shape ``(K,)``;
* ``logmeanexp(x)`` averages per-particle weights in log space;
* ``with with_estimator(est):`` changes the default estimator for the sites sampled inside.

The transformation (DiCE-style surrogate, Foerster et al. 2018; Becker et al. PLDI 2024)
-------------------------------------------------------------------------------------------
Running the program records, for every site whose estimator returns a ``score`` (Reinforce,
RSVI), that score per plate element, and every log-density term of ``sim``/``density`` with its
plates. With ``F`` the returned value:

* ``F`` of shape ``(K,)`` (per particle: ``F_k`` must depend only on particle k's draws): the
  estimate is ``mean_k F_k`` and the surrogate is

      S = mean_k [ F_k + sum_e (s_{k,e} - b_{k,e}) * (l_{k,e} - stop(l_{k,e})) ]

  over the plate elements ``e`` of each score site, with the signal ``s`` Rao-Blackwellised by
  plates (``rao_blackwellize="plate"``, ``Trace_ELBO``'s estimator), by the dependency graph
  (``"graph"``, ``TraceGraph_ELBO``'s) or ``s_{k,e} = F_k`` (``None``); see
  :mod:`vi_estimators.core`. ``RLOO`` uses ``b_{k,e} = mean_{j != k} s_{j,e}``.
* ``F`` a scalar: ``S = F + sum_{k,e} (F - b_k) * (l_{k,e} - stop(l_{k,e}))``. When ``F`` is
  exactly the result of ``logmeanexp(x)`` over particles, RLOO uses VIMCO's leave-one-out value
  ``b_k = log((sum_{j != k} e^{x_j} + e^{mean_{j != k} x_j}) / K)`` (Mnih & Rezende 2016).

``stop`` is ``detach``; ``S`` has the value of the estimate and ``grad S`` is an unbiased estimate
of ``grad E[F]``: autograd through ``F`` is the pathwise part (reparameterised draws) plus the
explicit parameter dependence; the added terms are the score-function part, baselines being
independent of the draw they multiply. Enumerate/MVD sites are contracted term by term inside
``sim``/``density`` (see :mod:`vi_estimators.estimators`).

Options (one mechanism): keyword arguments of :func:`objective` / of the shipped objectives'
constructors -- Pyro's ``ELBO`` arguments (``num_particles``, ``max_plate_nesting``,
``vectorize_particles``, ``strict_enumeration_warning``, ...) plus ``estimator=`` (an Estimator or
``{site: Estimator}``), ``rao_blackwellize=`` (``"plate"``, ``"graph"`` or ``None``) and
``capture=`` (``False``; ``True`` or a backend name: trace the step once and run it as a flat graph,
see :mod:`vi_estimators.capture`). ``particles()`` without an argument uses ``num_particles``. With ``vectorize_particles=False``
(Pyro's default, for models that do not broadcast) and ``num_particles = K > 1``, the program is
run K times with ``particles()`` a no-op and the K runs are assembled into one surrogate, like
``Trace_ELBO`` (leave-one-out baselines pair the runs' signals); objectives that combine
particles non-linearly (IWELBO, ...) require ``vectorize_particles=True``.

With ``pyro.enable_validation(True)`` (Pyro's default) every check ``Trace_ELBO`` makes is made:
site names, model/guide site and shape agreement, plates in the guide but not the model, site
shapes against plates, ``pyro.factor`` in the guide, enumeration configs; Pyro's own helpers
raise the same errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from pyro.infer.elbo import ELBO as _PyroELBO
from pyro.poutine.trace_struct import Trace
from pyro.util import warn_if_nan

from .capture import ObjectiveCapture, check_capture
from .core import RAO_BLACKWELLIZE, Run, assemble, current_run, execute, require_run
from .estimators import Estimator

__all__ = [
    "Objective",
    "density",
    "logmeanexp",
    "objective",
    "particles",
    "sim",
    "with_estimator",
]


# ---------------------------------------------------------------------------------------------
# Program constructs
# ---------------------------------------------------------------------------------------------


def sim(guide: Callable, *args, **kwargs) -> tuple[Trace, torch.Tensor]:
    """Run ``guide(*args, **kwargs)`` with each latent site drawn by its estimator.

    Returns ``(trace, log_q)``: a :class:`pyro.poutine.Trace` of the guide (sample and param
    sites; each latent sample site also carries its scaled/masked ``log_prob`` and, under the key
    ``"estimator_draw"``, the :class:`~vi_estimators.estimators.SiteDraw` of its estimator) and
    ``log_q``, the guide's log-density of the draws (plate scales/masks applied, plate dims
    summed, Enumerate/MVD alternatives contracted): shape ``(K,)`` inside ``particles()``, else
    ``()``.
    """
    run = require_run("sim")
    frame = run.push_frame("sim", Trace())
    try:
        guide(*args, **kwargs)
    finally:
        run.frames.pop()
    return frame.trace, run.finish_sim(frame, args)


def density(model: Callable, trace: Trace, *args, **kwargs) -> torch.Tensor:
    """The model's log joint at the latent values of ``trace`` (from :func:`sim`).

    Every sample site of the model is scored: latent sites at the traced value (an error names a
    model latent missing from the trace), observed sites at their data, each scaled/masked as
    Pyro does (``subsample_size`` scaling included; subsample indices are replayed from the
    trace). Guide latents that the model never samples raise an error unless marked
    ``infer={"is_auxiliary": True}``. Same shape convention as ``sim``'s ``log_q``.
    """
    run = require_run("density")
    frame = run.push_frame("density", Trace(), trace)
    try:
        model(*args, **kwargs)
    finally:
        run.frames.pop()
    return run.finish_density(frame, args)


@contextmanager
def particles(num_particles: int | None = None):
    """Vectorise ``num_particles`` independent copies on a new leftmost batch dim.

    Opens ``pyro.plate("num_particles_vectorized", K, dim=-(max_plate_nesting + 1))`` and yields
    its dim (like Pyro's ``vectorize_particles``); ``sim``/``density`` inside return ``(K,)``
    tensors. Without an argument K is the objective's ``num_particles``; with
    ``vectorize_particles=False`` it is then a no-op yielding ``None`` (the objective loops).
    """
    run = require_run("particles")
    k = num_particles if num_particles is not None else run.default_k
    if k is None:
        yield None
        return
    with run.particles(k) as dim:
        yield dim


def logmeanexp(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``log(mean(exp(x), dim))``, computed stably.

    ``dim`` defaults to 0, the particle dim of the per-particle tensors returned by ``sim`` and
    ``density``; the (site-level) dim index yielded by ``particles()`` is accepted too and mapped
    to 0 for such tensors. Inside a program, a logmeanexp over particles is recorded so that RLOO
    baselines can form VIMCO's leave-one-out signals when the program returns its result.
    """
    run = current_run()
    if dim is None or (run is not None and dim == run.particle_dim and x.dim() < -dim):
        dim = 0
    n = x.size(dim)
    out = torch.logsumexp(x, dim) - math.log(n)
    if run is not None:
        if run.num_alts:
            raise ValueError(
                "logmeanexp in a program with Enumerate/MVD sites: these estimators contract "
                "their alternatives term by term, which is exact only for objectives linear in "
                "log p and log q (the ELBO family); use Reinforce or Reparam here"
            )
        if x.dim() == 1 and run.particle_dim is not None and n == run.num_particles:
            run.lme[id(out)] = (out, x)
    return out


@contextmanager
def with_estimator(estimator: Estimator, force: bool = False):
    """Inside a program: make ``estimator`` the default for sites without their own choice
    (``force=True``: for every site, overriding ``infer={"estimator": ...}``)."""
    run = require_run("with_estimator")
    old = (run.default_estimator, run.force_estimator)
    if force:
        run.force_estimator = estimator
    else:
        run.default_estimator = estimator
    try:
        yield
    finally:
        run.default_estimator, run.force_estimator = old


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


class Objective(_PyroELBO):
    """A variational objective written as a program; behaves like a ``pyro.infer.ELBO``.

    ``loss`` = minus the estimate (a float), ``differentiable_loss`` = minus the surrogate (value:
    minus the estimate; ``.backward()``: an unbiased gradient of minus the expected objective),
    ``loss_and_grads`` = both. Subclasses override :meth:`program`; :func:`objective` wraps a
    function. Keyword options: see the module docstring.

    ``linear_in_log_q`` (class attribute): the program's value is ``log_p - log_q`` per particle
    (the ELBO family). Then a score-function site's own ``log q`` term, whose explicit gradient
    has expectation zero, enters ``log_q`` without it, exactly like ``Trace_ELBO`` (its
    ``entropy_term`` is zero for non-reparameterised sites).
    """

    linear_in_log_q = False

    def __init__(
        self,
        program: Callable | None = None,
        *,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        max_iarange_nesting=None,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        jit_options=None,
        retain_graph=None,
        tail_adaptive_beta: float = -1.0,
        estimator: Estimator | dict | None = None,
        rao_blackwellize: str | None = "plate",
        capture: bool | str = False,
    ):
        if not isinstance(num_particles, int) or isinstance(num_particles, bool) or \
                num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        if rao_blackwellize not in RAO_BLACKWELLIZE:
            raise ValueError(f"rao_blackwellize must be 'plate', 'graph' or None, got "
                             f"{rao_blackwellize!r}")
        #: the model's own plate nesting (without the particle plate); inf until known
        self.model_plate_nesting = max_plate_nesting if max_iarange_nesting is None else \
            max_iarange_nesting
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            max_iarange_nesting=max_iarange_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            jit_options=jit_options,
            retain_graph=retain_graph,
            tail_adaptive_beta=tail_adaptive_beta,
        )
        if estimator is not None and not isinstance(estimator, (Estimator, dict)):
            raise TypeError(
                f"estimator must be an Estimator or a dict {{site: Estimator}}, got "
                f"{type(estimator).__name__}"
            )
        self.estimator = estimator
        self.rao_blackwellize = rao_blackwellize
        if program is not None:
            if not callable(program):
                raise TypeError(f"objective: program must be callable, got {type(program)}")
            self._program = program
            self.__doc__ = getattr(program, "__doc__", None) or self.__doc__
            self.__name__ = getattr(program, "__name__", type(self).__name__)
        self.auto_baselines: dict[str, Any] = {}  # the "auto" moving averages, per site
        backend = check_capture(capture)
        #: the capture backend (``None``: eager) and the captured graphs (vi_estimators.capture)
        self.capture = backend
        self.captured = None if backend is None else ObjectiveCapture(
            getattr(self, "__name__", type(self).__name__), backend, self._surrogate_terms)

    def _get_trace(self, model, guide, args, kwargs):
        # pyro.infer.ELBO's abstract hook; objective programs build their own traces.
        raise NotImplementedError("objective programs do not expose Pyro's _get_trace")

    def program(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The objective's program; returns the estimate to maximise."""
        return self._program(model, guide, *args, **kwargs)

    # -- the transformation ---------------------------------------------------------------
    def _run(self, model, guide, args, kwargs, default_k):
        run = Run(self, model, guide, args, kwargs, default_k)
        value = execute(run, self.program, model, guide, *args, **kwargs)
        return run, value

    def _check_finite(self, surrogate, runs) -> None:
        if math.isfinite(surrogate.item()):  # the surrogate is a scalar (one host sync)
            return
        if runs[0].validate:
            for run in runs:
                for name, kind, term in run.logs:
                    if isinstance(term, torch.Tensor) and not torch.isfinite(term).all():
                        raise ValueError(
                            f"non-finite objective: the {kind} log-density at site {name!r} is "
                            f"non-finite (first such site)"
                        )
            raise ValueError("non-finite objective value (all site log-densities are finite)")
        warn_if_nan(surrogate, "loss")

    def _runs(self, model, guide, args, kwargs):
        if self.vectorize_particles or self.num_particles == 1:
            default_k = self.num_particles if self.vectorize_particles else None
            runs_values = [self._run(model, guide, args, kwargs, default_k)]
        else:
            runs_values = [self._run(model, guide, args, kwargs, None)
                           for _ in range(self.num_particles)]
        runs = [r for r, _ in runs_values]
        s, e = assemble(self, runs, [v for _, v in runs_values])
        return s, e, runs

    def _surrogate_terms(self, model, guide, args, kwargs):
        """``(surrogate, estimate)`` without the finiteness check (no host sync): what a
        capture traces."""
        s, e, _ = self._runs(model, guide, args, kwargs)
        return s, e

    def surrogate(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(surrogate, estimate)``; with looped particles the K runs are assembled together.
        Always eager (``capture`` applies to ``loss``, ``loss_and_grads`` and
        ``differentiable_loss``)."""
        s, e, runs = self._runs(model, guide, args, kwargs)
        self._check_finite(s, runs)
        return s, e

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        if self.captured is not None and torch.is_grad_enabled():
            return self.captured.differentiable_loss(
                model, guide, args, kwargs,
                lambda: self._eager_differentiable_loss(model, guide, args, kwargs))
        return self._eager_differentiable_loss(model, guide, args, kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        if self.captured is not None:
            with torch.no_grad():
                return self.captured.loss(model, guide, args, kwargs,
                                          lambda: self._eager_loss(model, guide, args, kwargs))
        return self._eager_loss(model, guide, args, kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        if self.captured is not None and torch.is_grad_enabled():
            return self.captured.loss_and_grads(
                model, guide, args, kwargs,
                lambda: self._eager_loss_and_grads(model, guide, args, kwargs))
        return self._eager_loss_and_grads(model, guide, args, kwargs)

    def _eager_differentiable_loss(self, model, guide, args, kwargs) -> torch.Tensor:
        return -self.surrogate(model, guide, *args, **kwargs)[0]

    def _eager_loss(self, model, guide, args, kwargs) -> float:
        with torch.no_grad():
            _, estimate = self.surrogate(model, guide, *args, **kwargs)
        loss = -float(estimate)
        warn_if_nan(loss, "loss")
        return loss

    def _eager_loss_and_grads(self, model, guide, args, kwargs) -> float:
        s, estimate = self.surrogate(model, guide, *args, **kwargs)
        if s.requires_grad:
            (-s).backward(retain_graph=self.retain_graph)
        loss = -float(estimate.detach())
        warn_if_nan(loss, "loss")
        return loss

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self, '__name__', '')})"


def objective(program: Callable | None = None, **options) -> Objective | Callable:
    """Turn ``program(model, guide, *args, **kwargs) -> estimate`` into an :class:`Objective`.

    Use as ``@objective`` or ``@objective(num_particles=8, vectorize_particles=True)``; options
    are the keyword arguments of :class:`Objective`.
    """
    if program is None:
        return lambda fn: Objective(fn, **options)
    return Objective(program, **options)
