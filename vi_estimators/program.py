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
* ``logmeanexp(x)`` averages per-particle weights in log space.

The transformation (DiCE-style surrogate, Foerster et al. 2018; Becker et al. PLDI 2024)
-------------------------------------------------------------------------------------------
Running the program records, for every site whose estimator returns a ``score`` (Reinforce, RSVI),
that score summed to one number per particle, ``l_k``. With ``F`` the returned value:

* ``F`` of shape ``(K,)`` (per particle): the estimate is ``mean_k F_k`` and the surrogate is

      S = mean_k [ F_k + (F_k - b_k) * (l_k - stop(l_k)) ]

  (``F_k`` must depend only on particle k's draws: K independent estimates). ``RLOO`` uses
  ``b_k = mean_{j != k} F_j``.
* ``F`` a scalar: ``S = F + sum_k (F - b_k) * (l_k - stop(l_k))``. When ``F`` is exactly the
  result of ``logmeanexp(x)`` over particles, RLOO uses VIMCO's leave-one-out value
  ``b_k = log((sum_{j != k} e^{x_j} + e^{mean_{j != k} x_j}) / K)`` (Mnih & Rezende 2016).

``stop`` is ``detach``; ``S`` has the value of the estimate and ``grad S`` is an unbiased estimate
of ``grad E[F]``: autograd through ``F`` is the pathwise part (reparameterised draws) plus the
explicit parameter dependence; the added terms are the score-function part, baselines being
independent of the draw they multiply. Enumerate/MVD sites are contracted term by term inside
``sim``/``density`` (see :mod:`vi_estimators.estimators`).

Options (one mechanism): keyword arguments of :func:`objective` / of the shipped objectives'
constructors -- Pyro's ``ELBO`` arguments (``num_particles``, ``max_plate_nesting``,
``vectorize_particles``, ``strict_enumeration_warning``, ...) plus ``estimator=`` (an Estimator or
``{site: Estimator}``). ``particles()`` without an argument uses ``num_particles``. With
``vectorize_particles=False`` (Pyro's default, for models that do not broadcast) and
``num_particles = K > 1``, the program is run K times with ``particles()`` a no-op and the
surrogates are averaged, exactly like ``Trace_ELBO``; objectives that combine particles
non-linearly (IWELBO, ...) require ``vectorize_particles=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.elbo import ELBO as _PyroELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.util import check_if_enumerated, check_site_shape, warn_if_nan

from .baselines import RLOO, BaselineInfo, MovingAverage
from .estimators import Estimator, default_estimator

__all__ = [
    "Objective",
    "current_run",
    "density",
    "logmeanexp",
    "marginal",
    "objective",
    "particles",
    "sim",
    "with_estimator",
]

PARTICLE_PLATE = "num_particles_vectorized"  # Pyro's name; vi_estimators.path keeps this dim


# ---------------------------------------------------------------------------------------------
# The run: state of one evaluation of an objective program
# ---------------------------------------------------------------------------------------------


class _Frame:
    __slots__ = ("alts", "guide_trace", "mode", "pending", "record", "total", "trace", "visited")

    def __init__(self, mode, trace=None, guide_trace=None, record=False):
        self.mode = mode
        self.trace = trace
        self.guide_trace = guide_trace
        self.total = 0.0
        self.pending = {}
        self.visited = set()
        self.alts = [] if guide_trace is None else getattr(guide_trace, "_vi_alts", [])
        self.record = record


class _Run:
    """One evaluation of a program. Estimators see it as their ``SiteContext``."""

    def __init__(self, obj: Objective, model, guide, args, kwargs, default_k):
        self.obj = obj
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.default_k = default_k  # None: particles() is a no-op (loop mode)
        self.num_particles = 1
        self.particle_dim: int | None = None
        self.in_particles = False
        self.num_alts = 0
        self.frames: list[_Frame] = []
        self.scores: list[tuple[str, torch.Tensor, Any]] = []
        self.lme: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.validate = is_validation_enabled()
        self.logs: list[tuple[str, str, torch.Tensor]] | None = [] if self.validate else None
        self.force_estimator: Estimator | None = None
        self.default_estimator = obj.estimator

    # -- SiteContext ----------------------------------------------------------------------
    @property
    def max_plate_nesting(self) -> int:
        """The model's plate nesting (particle and alternative dims excluded)."""
        obj = self.obj
        if obj._model_nesting == float("inf"):
            obj._guess_max_plate_nesting(self.model, self.guide, self.args, self.kwargs)
            extra = 1 if obj.vectorize_particles and obj.num_particles > 1 else 0
            obj._model_nesting = obj.max_plate_nesting - extra
        return int(obj._model_nesting)

    def new_alt_dim(self) -> int:
        base = -(self.max_plate_nesting + 1) - (1 if self.particle_dim is not None else 0)
        dim = base - self.num_alts
        self.num_alts += 1
        return dim

    # -- reductions -------------------------------------------------------------------------
    def reduce(self, t: torch.Tensor, alts, name: str) -> torch.Tensor:
        """Contract alternative dims, then sum to one value per particle (or a scalar)."""
        if not isinstance(t, torch.Tensor):
            return t
        for alt in reversed(alts):
            d = alt.dim
            if t.dim() < -d or t.size(d) == 1:
                continue
            w = alt.weights
            for i in range(-1, d, -1):
                if w.dim() >= -i and w.size(i) > 1 and (t.dim() < -i or t.size(i) == 1):
                    raise ValueError(
                        f"site {name!r} depends on {alt.site!r} (estimated by alternatives on "
                        f"dim {d}) outside the plate of batch dim {i}: a non-local dependency. "
                        "Enumerate/MVD need every dependent term inside the site's plates"
                    )
            if alt.mode == "expect":
                t = (w * t).sum(d, keepdim=True)
            else:
                t = t.narrow(d, 0, 1) + (w * t.detach()).sum(d, keepdim=True)
        return self._per_particle(t, name)

    def _per_particle(self, t: torch.Tensor, name: str) -> torch.Tensor:
        pd = self.particle_dim
        nd = t.dim()
        if pd is None or nd < -pd:
            return t.sum()
        if pd < -1:  # sum the plate dims right of the particle dim
            t = t.flatten(nd + pd + 1).sum(-1)
        if t.dim() > 1:
            if t.shape[:-1].numel() != 1:
                raise ValueError(
                    f"site {name!r}: log-density of shape {tuple(t.shape)} has batch dims left of "
                    f"the particle dim {pd} that belong to no plate"
                )
            t = t.reshape(t.shape[-1:])
        return t

    # -- site handlers ----------------------------------------------------------------------
    def choose(self, msg) -> Estimator:
        if self.force_estimator is not None:
            return self.force_estimator
        est = msg["infer"].get("estimator")
        if est is None:
            d = self.default_estimator
            if isinstance(d, dict):
                est = d.get(msg["name"])
            elif d is not None:
                est = d
        if est is None:
            return default_estimator(msg["fn"])
        if not isinstance(est, Estimator):
            raise TypeError(
                f"site {msg['name']!r}: infer['estimator'] must be a vi_estimators Estimator, got "
                f"{type(est).__name__}"
            )
        return est

    def sim_sample(self, frame: _Frame, msg) -> None:
        if (msg["is_observed"] or msg["value"] is not None
                or type(msg["fn"]).__name__ == "_Subsample"):
            return
        est = self.choose(msg)
        draw = est.draw(msg["name"], msg["fn"], self)
        if draw.alt is not None and self.validate:
            self._check_alt_plates(msg, draw)
        msg["value"] = draw.value
        frame.pending[msg["name"]] = draw

    def _check_alt_plates(self, msg, draw) -> None:
        plate_dims = {f.dim for f in msg["cond_indep_stack"] if f.vectorized}
        shape = msg["fn"].batch_shape
        for i in range(1, len(shape) + 1):
            if shape[-i] > 1 and -i not in plate_dims:
                raise ValueError(
                    f"site {msg['name']!r}: {type(draw).__name__} alternatives need every batch "
                    f"dim of the site in a plate (batch shape {tuple(shape)}, dim {-i} is not); "
                    "wrap the site in pyro.plate or use .to_event()"
                )

    def sim_post(self, frame: _Frame, msg) -> None:
        name = msg["name"]
        fn = msg["fn"]
        if type(fn).__name__ == "_Subsample":
            frame.trace.add_node(name, **msg)
            return
        draw = frame.pending.pop(name, None)
        if draw is not None and draw.alt is not None:
            frame.alts.append(draw.alt)
        if draw is not None and draw.log_prob is not None:
            lp = draw.log_prob
        else:
            lp = fn.log_prob(msg["value"], *msg["args"], **msg["kwargs"])
        term = scale_and_mask(lp, msg["scale"], msg["mask"])
        if self.validate:
            msg["log_prob"] = term
            check_site_shape(msg, self._nesting())
            self.logs.append((name, "guide", term))
        frame.total = frame.total + self.reduce(term, frame.alts, name)
        if draw is not None and draw.score is not None:
            self._add_score(name, draw.score, draw.baseline, frame.alts)
        frame.trace.add_node(name, **msg)
        if draw is not None:
            frame.trace.nodes[name]["estimator_draw"] = draw

    def _nesting(self) -> float:
        if self.obj._model_nesting == float("inf"):
            return float("inf")
        # alternative dims sit left of these and are trimmed by check_site_shape
        return self.obj._model_nesting + (1 if self.particle_dim is not None else 0)

    def _add_score(self, name, score, baseline, alts) -> None:
        for alt in alts:
            d = alt.dim
            if score.dim() >= -d and score.size(d) > 1:
                raise NotImplementedError(
                    f"site {name!r}: a score-function site downstream of the Enumerate/MVD site "
                    f"{alt.site!r} is not supported; use Reparam for {name!r} or Reinforce for "
                    f"{alt.site!r}"
                )
        self.scores.append((name, self._per_particle(score, name), baseline))

    def density_sample(self, frame: _Frame, msg) -> None:
        name = msg["name"]
        gt = frame.guide_trace.nodes
        if type(msg["fn"]).__name__ == "_Subsample":
            site = gt.get(name)
            if site is not None:
                msg["value"] = site["value"]
            return
        if msg["is_observed"]:
            return
        site = gt.get(name)
        if site is None or site["type"] != "sample":
            raise ValueError(
                f"model sample site {name!r} does not appear in the guide trace; every latent "
                "site of the model needs a guide site of the same name"
            )
        if self.validate and site["fn"].event_dim != msg["fn"].event_dim:
            raise ValueError(
                f"Model and guide event_dims disagree at site '{name}': "
                f"{msg['fn'].event_dim} vs {site['fn'].event_dim}"
            )
        msg["value"] = site["value"]

    def density_post(self, frame: _Frame, msg) -> None:
        name = msg["name"]
        if type(msg["fn"]).__name__ == "_Subsample":
            return
        term = scale_and_mask(
            msg["fn"].log_prob(msg["value"], *msg["args"], **msg["kwargs"]),
            msg["scale"],
            msg["mask"],
        )
        if self.validate:
            msg["log_prob"] = term
            check_site_shape(msg, self._nesting())
            self.logs.append((name, "model", term))
        frame.visited.add(name)
        frame.total = frame.total + self.reduce(term, frame.alts, name)
        if frame.record:
            frame.trace.add_node(name, **msg)


class _RunMessenger(Messenger):
    """Sits at the bottom of the handler stack for the whole program, so it sees every site
    after all plates (the particle plate included) have broadcast it."""

    def __init__(self, run: _Run):
        super().__init__()
        self.run = run

    def _pyro_sample(self, msg) -> None:
        frames = self.run.frames
        if frames:
            frame = frames[-1]
            if frame.mode == "sim":
                self.run.sim_sample(frame, msg)
            elif frame.mode == "density":
                self.run.density_sample(frame, msg)

    def _pyro_post_sample(self, msg) -> None:
        frames = self.run.frames
        if frames:
            frame = frames[-1]
            if frame.mode == "sim":
                self.run.sim_post(frame, msg)
            elif frame.mode == "density":
                self.run.density_post(frame, msg)

    def _pyro_post_param(self, msg) -> None:
        frames = self.run.frames
        if frames and frames[-1].mode == "sim" and msg["name"] not in frames[-1].trace.nodes:
            frames[-1].trace.add_node(msg["name"], **msg)


_RUNS: list[_Run] = []


def current_run() -> _Run | None:
    """The innermost active program run (``None`` outside objective programs)."""
    return _RUNS[-1] if _RUNS else None


def _require_run(what: str) -> _Run:
    if not _RUNS:
        raise RuntimeError(
            f"{what}() must be called inside an objective program (a function decorated with "
            "vi_estimators.objective, run through .loss/.loss_and_grads/.differentiable_loss)"
        )
    return _RUNS[-1]


# ---------------------------------------------------------------------------------------------
# Program constructs
# ---------------------------------------------------------------------------------------------


def sim(guide: Callable, *args, **kwargs) -> tuple[Trace, torch.Tensor]:
    """Run ``guide(*args, **kwargs)`` with each latent site drawn by its estimator.

    Returns ``(trace, log_q)``: a :class:`pyro.poutine.Trace` of the guide (sample and param
    sites; each sample site also has its scaled/masked ``log_prob`` when validation is on) and
    ``log_q``, the guide's log-density of the draws (plate scales/masks applied, plate dims summed,
    Enumerate/MVD alternatives contracted): shape ``(K,)`` inside ``particles()``, else ``()``.
    """
    run = _require_run("sim")
    trace = Trace()
    frame = _Frame("sim", trace=trace)
    trace._vi_alts = frame.alts
    run.frames.append(frame)
    try:
        guide(*args, **kwargs)
    finally:
        run.frames.pop()
    if run.validate:
        # like Trace_ELBO: Pyro-style enumeration configs are ignored (use Enumerate()) -> warn
        check_if_enumerated(trace)
    return trace, _as_total(frame.total, trace, args)


def density(model: Callable, trace: Trace, *args, **kwargs) -> torch.Tensor:
    """The model's log joint at the latent values of ``trace`` (from :func:`sim`).

    Every sample site of the model is scored: latent sites at the traced value (an error names a
    model latent missing from the trace), observed sites at their data, each scaled/masked as
    Pyro does (``subsample_size`` scaling included; subsample indices are replayed from the
    trace). Guide latents that the model never samples raise an error unless marked
    ``infer={"is_auxiliary": True}``. Same shape convention as ``sim``'s ``log_q``.
    """
    return _density(model, trace, args, kwargs)[0]


def _density(model, trace, args, kwargs, record=False):
    run = _require_run("density")
    frame = _Frame("density", trace=Trace() if record else None, guide_trace=trace, record=record)
    run.frames.append(frame)
    try:
        model(*args, **kwargs)
    finally:
        run.frames.pop()
    visited = frame.visited
    for name, site in trace.nodes.items():
        if (
            site["type"] == "sample"
            and name not in visited
            and not site["is_observed"]
            and not site["infer"].get("is_auxiliary")
            and type(site["fn"]).__name__ != "_Subsample"
        ):
            raise ValueError(
                f"guide sample site {name!r} does not appear in the model; mark it "
                "infer={'is_auxiliary': True} if it is an auxiliary variable"
            )
    return _as_total(frame.total, trace, args), frame.trace


def _as_total(total, trace: Trace, args) -> torch.Tensor:
    """A frame's log-density total as a tensor: a program without sites contributes a zero on
    the device/dtype of the traced values (else of the first tensor argument, else torch's
    default) -- never a CPU float32 constant next to CUDA/float64 tensors."""
    if isinstance(total, torch.Tensor):
        return total
    like = [s.get("value") for s in trace.nodes.values()] + list(args)
    like = [t for t in like if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return like[0].new_zeros(()) if like else torch.zeros(())


@contextmanager
def particles(num_particles: int | None = None):
    """Vectorise ``num_particles`` independent copies on a new leftmost batch dim.

    Opens ``pyro.plate("num_particles_vectorized", K, dim=-(max_plate_nesting + 1))`` and yields
    its dim (like Pyro's ``vectorize_particles``); ``sim``/``density`` inside return ``(K,)``
    tensors. Without an argument K is the objective's ``num_particles``; with
    ``vectorize_particles=False`` it is then a no-op yielding ``None`` (the objective loops).
    """
    run = _require_run("particles")
    k = num_particles if num_particles is not None else run.default_k
    if k is None:
        yield None
        return
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"particles: num_particles must be a positive integer, got {k!r}")
    if run.in_particles:
        raise ValueError("particles() blocks cannot be nested")
    if run.particle_dim is not None and run.num_particles != k:
        raise ValueError(
            f"particles({k}): this program already used particles({run.num_particles}); all "
            "particle blocks of one program must have the same size"
        )
    dim = -(run.max_plate_nesting + 1)
    with pyro.plate(PARTICLE_PLATE, k, dim=dim):
        run.particle_dim, run.num_particles, run.in_particles = dim, k, True
        try:
            yield dim
        finally:
            run.in_particles = False


def _logmeanexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The bare ``log(mean(exp(x), dim))`` (no bookkeeping; for the package's internal uses)."""
    return torch.logsumexp(x, dim) - math.log(x.size(dim))


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
    out = _logmeanexp(x, dim)
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
    run = _require_run("with_estimator")
    old = (run.default_estimator, run.force_estimator)
    if force:
        run.force_estimator = estimator
    else:
        run.default_estimator = estimator
    try:
        yield
    finally:
        run.default_estimator, run.force_estimator = old


_RLOO = RLOO()


def _vimco_loo(x: torch.Tensor) -> torch.Tensor:
    """Leave-one-out logmeanexp: x_k replaced by the mean of the other x_j."""
    k = x.size(0)
    x = x.detach()
    m = (x.sum() - x) / (k - 1)
    mat = x.expand(k, k).clone()
    mat.diagonal().copy_(m)
    return _logmeanexp(mat, -1)


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


class Objective(_PyroELBO):
    """A variational objective written as a program; behaves like a ``pyro.infer.ELBO``.

    ``loss`` = minus the estimate (a float), ``differentiable_loss`` = minus the surrogate (value:
    minus the estimate; ``.backward()``: an unbiased gradient of minus the expected objective),
    ``loss_and_grads`` = both. Subclasses override :meth:`program`; :func:`objective` wraps a
    function. Keyword options: see the module docstring.
    """

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
    ):
        if not isinstance(num_particles, int) or isinstance(num_particles, bool) or \
                num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        self._model_nesting = max_plate_nesting if max_iarange_nesting is None else \
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
        if program is not None:
            if not callable(program):
                raise TypeError(f"objective: program must be callable, got {type(program)}")
            self._program = program
            self.__doc__ = getattr(program, "__doc__", None) or self.__doc__
            self.__name__ = getattr(program, "__name__", type(self).__name__)
        self._auto_baselines: dict[str, Any] = {}

    def _get_trace(self, model, guide, args, kwargs):
        # pyro.infer.ELBO's abstract hook; objective programs build their own traces.
        raise NotImplementedError("objective programs do not expose Pyro's _get_trace")

    def program(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The objective's program; returns the estimate to maximise."""
        return self._program(model, guide, *args, **kwargs)

    # -- the transformation ---------------------------------------------------------------
    def _baseline_for(self, name, baseline, run, local, loo_ok):
        if baseline == "auto":
            if run.num_particles > 1 and loo_ok:
                return _RLOO
            b = self._auto_baselines.get(name)
            if b is None:
                b = self._auto_baselines[name] = MovingAverage(0.9)
            return b
        if isinstance(baseline, RLOO) and not local:
            raise ValueError(
                f"RLOO baseline at site {name!r}: the site is sampled outside particles(), so "
                "the other particles' signals depend on it; use MovingAverage()"
            )
        return baseline

    def _surrogate_once(self, model, guide, args, kwargs, default_k):
        run = _Run(self, model, guide, args, kwargs, default_k)
        _RUNS.append(run)
        try:
            with _RunMessenger(run):
                value = self.program(model, guide, *args, **kwargs)
        finally:
            _RUNS.pop()
        return self._assemble(run, value)

    def _assemble(self, run: _Run, value):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"objective {getattr(self, '__name__', type(self).__name__)!r} must return a "
                f"tensor, got {type(value).__name__}"
            )
        k = run.num_particles
        per_particle = value.dim() == 1 and run.particle_dim is not None and value.shape[0] == k
        if value.dim() != 0 and not per_particle:
            raise ValueError(
                f"objective must return a scalar tensor (or a per-particle tensor of shape "
                f"({k},) inside particles()), got shape {tuple(value.shape)}"
            )
        estimate = value.mean() if per_particle else value
        surrogate = estimate
        if run.scores:
            signal = value.detach()
            loo = None
            rec = run.lme.get(id(value))
            if rec is not None and rec[0] is value and k > 1:
                loo = _vimco_loo(rec[1])
            info = BaselineInfo(num_particles=k, loo=loo, args=run.args, kwargs=run.kwargs)
            for name, score, baseline in run.scores:
                local = score.dim() == 1  # the site is inside particles(): one score per particle
                b = self._baseline_for(name, baseline, run, local,
                                       local and (per_particle or loo is not None))
                if local and (per_particle or loo is not None):
                    sig = signal if per_particle else signal.expand(k)
                else:
                    sig = signal.mean() if per_particle else signal
                if b is None:
                    adv = sig
                else:
                    bval = b(name, sig, info if local else BaselineInfo(1, None, run.args,
                                                                         run.kwargs))
                    if b.trainable:
                        sq = (sig - bval) ** 2
                        surrogate = surrogate - (sq - sq.detach()).sum()
                    adv = sig - bval.detach()
                term = adv * (score - score.detach())
                surrogate = surrogate + (term.mean() if per_particle and local else term.sum())
        return surrogate, estimate, run

    def _check_finite(self, surrogate, run: _Run) -> None:
        if torch.isfinite(surrogate).all():
            return
        if run.validate:
            for name, kind, term in run.logs:
                if isinstance(term, torch.Tensor) and not torch.isfinite(term).all():
                    raise ValueError(
                        f"non-finite objective: the {kind} log-density at site {name!r} is "
                        f"non-finite (first such site)"
                    )
            raise ValueError("non-finite objective value (all site log-densities are finite)")
        warn_if_nan(surrogate, "loss")

    def surrogate(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(surrogate, estimate)`` averaged over outer particles (loop mode)."""
        if self.vectorize_particles or self.num_particles == 1:
            default_k = self.num_particles if self.vectorize_particles else None
            s, e, run = self._surrogate_once(model, guide, args, kwargs, default_k)
            self._check_finite(s, run)
            return s, e
        s_tot, e_tot = 0.0, 0.0
        for _ in range(self.num_particles):
            s, e, run = self._surrogate_once(model, guide, args, kwargs, None)
            self._check_finite(s, run)
            s_tot, e_tot = s_tot + s, e_tot + e
        return s_tot / self.num_particles, e_tot / self.num_particles

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return -self.surrogate(model, guide, *args, **kwargs)[0]

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            _, estimate = self.surrogate(model, guide, *args, **kwargs)
        loss = -float(estimate)
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
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


# ---------------------------------------------------------------------------------------------
# Marginalised guides (HVI / IWHVI / DIWHVI)
# ---------------------------------------------------------------------------------------------


def marginal(guide: Callable, keep, proposal: Callable | None = None, num_particles: int = 1):
    """A guide whose auxiliary latents are marginalised by importance sampling.

    ``guide`` samples auxiliary latents ``psi`` (every latent site not in ``keep``) and the kept
    latents ``z`` given ``psi``. Inside an objective program, ``sim(marginal(...))`` draws
    ``(psi_0, z) ~ guide`` (each site by its estimator), records only the kept sites in the
    trace, and contributes to ``log_q`` the importance-weighted estimate (Sobolev & Vetrov 2019,
    IWHVI, eq. 9)

        log q(z) <~ log 1/(M+1) [ q(z, psi_0) / r(psi_0 | z)
                                  + sum_{m=1..M} q(z, psi_m) / r(psi_m | z) ],   psi_m ~ r(. | z),

    an upper bound of ``log q(z)`` in expectation for every M (so an ELBO built on it stays a
    lower bound), exact when ``r`` is the guide's own ``q(psi | z)``. ``proposal`` is the reverse
    model ``r``, called as ``proposal(z_dict, *args, **kwargs)`` and sampling the auxiliary
    sites under the same names; ``proposal=None`` uses the guide's own marginal over ``psi``
    (``r(psi | z) = q(psi)``, a SIVI-style bound; needs ``num_particles >= 1``).
    ``num_particles=0`` with a proposal is the HVI bound of Ranganath et al. (2016).
    The M inner samples are vectorised on a batch dim left of the particle dim, so the guide and
    proposal must broadcast. Outside a program the returned guide just runs ``guide`` with the
    auxiliary sites hidden (e.g. for ``Predictive``).
    """
    from .objectives import _marginal_guide  # the construction lives with the HVI objectives

    return _marginal_guide(guide, keep, proposal, num_particles)
