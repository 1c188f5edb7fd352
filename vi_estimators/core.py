"""The run of an objective program: its state, the one reduction of log-densities, the surrogate.

This module is the single owner of particle and plate shapes in :mod:`vi_estimators`. One
evaluation of an objective program is a :class:`Run`; ``sim``/``density``/``particles`` (in
:mod:`vi_estimators.program`) drive it through :class:`RunMessenger`, which sits below every
other handler and so sees each sample site after all plates (the particle plate included) have
broadcast it. Every log-density term is reduced by :func:`sum_to_frames` (its ``per_particle``
form gives the totals that ``sim``/``density`` return); :func:`assemble` turns the finished runs
into the DiCE surrogate.

The cost ledger and the surrogate
---------------------------------
Every top-level ``sim``/``density`` records each site's scaled, masked log-density term (after
contracting Enumerate/MVD alternatives) in the run's *ledger* together with the site's plate
frames: guide terms count ``-log q``, model terms ``+log p``; ``R = sum(ledger)`` (per particle)
is ``log p - log q``. Each site whose estimator returns a ``score`` ``l`` (Reinforce, RSVI)
contributes the zero-valued term (Foerster et al. 2018, DiCE; Schulman et al. 2015, eq. 9)

    sum_e (s_e - b_e) * (l_e - stop(l_e))

summed over the site's plate elements ``e`` (particles included), where ``s_e`` is the signal
of element ``e`` and ``b_e`` its baseline (independent of that element's draw). With ``F`` the
program's value (per particle, or a scalar) and ``rao_blackwellize``:

* ``"plate"`` (default, what ``Trace_ELBO`` does): ``s_e = F - (R - R_e)``, where ``R_e`` keeps,
  of every ledger term, the part that shares the site's plate elements (terms in other plates are
  summed, terms outside the site's plates count fully: ``MultiFrameTensor.sum_to`` in Pyro).
  ``R - R_e`` is a sum of terms at *other* elements of the site's plates, which by Pyro's plate
  semantics do not depend on element ``e``'s draw, so subtracting it never biases the gradient;
  for the ELBO (``F = R``) ``s_e = R_e`` is exactly ``Trace_ELBO``'s ``log_r.sum_to(stack)``;
* ``"graph"`` (what ``TraceGraph_ELBO`` does): ``R_e`` keeps only the terms that depend on the
  site in the model/guide dependency graph (Pyro's provenance tracking,
  :mod:`pyro.ops.provenance`), at the site's plate elements; terms upstream of the site or in
  other branches are dropped as well. As in Pyro, a dependency carried only by Python control
  flow on a value (``if z.item() > 0: ...``) is not seen: use ``"plate"`` for such programs. A
  marginalised guide's ``log q`` estimate counts as depending on every draw before it;
* ``None``: ``s = F`` per particle (no decomposition).

The decomposition applies when ``F`` is per particle (or the program runs without particles);
a scalar ``F`` over vectorised particles (``logmeanexp``: IWELBO, VIMCO) uses the whole ``F`` as
each particle's signal, with VIMCO's leave-one-out baselines for RLOO (Mnih & Rezende 2016).
Looped particles (``vectorize_particles=False``) are assembled together after the loop, so
leave-one-out baselines work across them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.ops.provenance import detach_provenance, get_provenance, track_provenance
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape

from .baselines import RLOO, BaselineInfo, MovingAverage
from .estimators import Alternatives, Estimator, SiteDraw, default_estimator
from .state import note

__all__ = [
    "PARTICLE_PLATE",
    "RAO_BLACKWELLIZE",
    "Entry",
    "Frame",
    "Run",
    "RunMessenger",
    "Score",
    "alternatives",
    "assemble",
    "current_run",
    "execute",
    "per_particle",
    "plate_frames",
    "require_run",
    "sum_to_frames",
]

#: Name of the plate that vectorises particles (Pyro's own name for ``vectorize_particles``).
PARTICLE_PLATE = "num_particles_vectorized"

#: Accepted values of the objectives' ``rao_blackwellize`` option.
RAO_BLACKWELLIZE = ("plate", "graph", None)


# ---------------------------------------------------------------------------------------------
# The one reduction
# ---------------------------------------------------------------------------------------------


def plate_frames(site) -> tuple:
    """The vectorised plate frames of a trace site (the particle plate included).

    Frames are compared by ``(name, dim)`` here (one plate per name and dim within a run), not
    with ``CondIndepStackFrame.__eq__``/``__hash__``, which are costly on the hot path."""
    return tuple(f for f in site["cond_indep_stack"] if f.dim is not None)


def _particle_frame(frames: Iterable[CondIndepStackFrame]) -> CondIndepStackFrame | None:
    for f in frames:
        if f.name == PARTICLE_PLATE:
            return f
    return None


def _shares(f: CondIndepStackFrame, frames) -> bool:
    for g in frames:
        if f.dim == g.dim and f.name == g.name:
            return True
    return False


def _broadcast_shape(a, b) -> tuple:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return tuple(y if x == 1 else x for x, y in zip(a, b))


def sum_to_frames(term: torch.Tensor, frames: Iterable[CondIndepStackFrame],
                  keep: Iterable[CondIndepStackFrame]) -> torch.Tensor:
    """Sum a site's log-density ``term`` to the plate elements of the frames ``keep``.

    ``term`` has the site's right-aligned batch layout and ``frames`` are the site's vectorised
    plate frames. The dim of every frame in both ``frames`` and ``keep`` is kept; every other dim
    (other plates, batch dims outside any plate) is summed. The result has the layout of ``keep``:
    ``max(-f.dim for f in keep)`` dims (0 when ``keep`` is empty), of size 1 where nothing is
    kept, so results for different sites broadcast against each other. This is Pyro's
    ``MultiFrameTensor.sum_to`` for one term, with batch dims outside plates summed too.
    """
    keys = {(f.name, f.dim) for f in keep}
    ndim = max((-d for _, d in keys), default=0)
    kept = {f.dim for f in frames if (f.name, f.dim) in keys}
    nd = term.dim()
    sum_dims = [d for d in range(-nd, 0) if d not in kept and term.shape[d] != 1]
    if sum_dims:
        term = term.sum(sum_dims, keepdim=True)
    if nd > ndim:
        return term.reshape(term.shape[nd - ndim:])
    if nd < ndim:
        return term.reshape((1,) * (ndim - nd) + tuple(term.shape))
    return term


def per_particle(term: torch.Tensor, frames: Iterable[CondIndepStackFrame], name: str
                 ) -> torch.Tensor:
    """A site's log-density summed to one value per particle.

    ``(K,)`` when the site is inside the particle plate (found by its name,
    :data:`PARTICLE_PLATE`), a scalar otherwise. Batch dims left of the particle dim that belong
    to no plate of the site mean the model does not broadcast over particles: an error. (The
    special case of :func:`sum_to_frames` that keeps only the particle plate.)
    """
    pf = _particle_frame(frames)
    if pf is None:
        return term.sum()
    d, nd = pf.dim, term.dim()
    if nd < -d:  # broadcast over particles: every particle has the whole term
        return term.sum().expand(pf.size)
    if nd == -d and term.shape[0] == pf.size:  # the common case
        return term.reshape(pf.size, -1).sum(-1) if nd > 1 else term
    if nd > -d:
        left = term.shape[:nd + d]
        if any(s != 1 for s in left):
            plate_dims = {f.dim for f in frames}
            if any(term.shape[i] != 1 and i not in plate_dims for i in range(-nd, d)):
                raise ValueError(
                    f"site {name!r}: log-density of shape {tuple(term.shape)} has batch dims "
                    f"left of the particle dim {d} that belong to no plate (the model or guide "
                    "does not broadcast over vectorised particles: declare its batch dims with "
                    "pyro.plate or use vectorize_particles=False)"
                )
            term = term.sum(tuple(range(nd + d)))
        else:
            term = term.reshape(term.shape[nd + d:])
    if term.dim() > 1:
        term = term.reshape(term.shape[0], -1).sum(-1)
    return term.expand(pf.size) if term.shape[0] != pf.size else term


def _contract(t: torch.Tensor, alts: list[Alternatives], name: str) -> torch.Tensor:
    """Contract the alternative dims of Enumerate/MVD sites in a log-density term (keepdim)."""
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
    return t


def alternatives(trace: Trace) -> list[Alternatives]:
    """The Enumerate/MVD alternatives of a ``sim`` trace, in sampling order."""
    out = []
    for site in trace.nodes.values():
        draw = site.get("estimator_draw")
        if draw is not None and draw.alt is not None:
            out.append(draw.alt)
    return out


def _as_total(total, trace: Trace, args) -> torch.Tensor:
    """A frame's log-density total as a tensor: a program without sites contributes a zero on
    the device/dtype of the traced values (else of the first tensor argument, else torch's
    default) -- never a CPU float32 constant next to CUDA/float64 tensors."""
    if isinstance(total, torch.Tensor):
        return total
    like = [s.get("value") for s in trace.nodes.values()] + list(args)
    like = [t for t in like if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return like[0].new_zeros(()) if like else torch.zeros(())


# ---------------------------------------------------------------------------------------------
# Run state
# ---------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One term of a run's cost ledger: a site's scaled/masked log-density (alternatives
    contracted, provenance removed), its side (``+1`` model, ``-1`` guide), plate frames and, in
    ``"graph"`` mode, the score sites it depends on."""

    name: str
    sign: float
    term: torch.Tensor
    frames: tuple
    total: torch.Tensor  # detached, one value per particle (or a scalar)
    provenance: frozenset = frozenset()


@dataclass
class Score:
    """A score-function term of a run: ``score`` has the site's batch layout."""

    name: str
    token: int
    score: torch.Tensor
    baseline: Any
    frames: tuple


class Frame:
    """One ``sim`` (guide) or ``density`` (model) call in progress, or ``"off"`` (sites pass
    through untouched, e.g. the inner samples of a marginalised guide). ``nested``: inside
    another sim/density, so its terms stay out of the ledger."""

    __slots__ = ("alts", "extra", "guide_trace", "mode", "nested", "pending", "sites", "tokens",
                 "trace")

    def __init__(self, mode: str, trace: Trace | None = None, guide_trace: Trace | None = None,
                 nested: bool = False):
        self.mode, self.trace, self.guide_trace, self.nested = mode, trace, guide_trace, nested
        self.alts: list = []
        self.pending: dict = {}
        self.tokens: dict = {}
        self.sites: list = []
        self.extra: list = []

    def add_total(self, value: torch.Tensor, run: Run) -> None:
        """Add a per-particle log-density (e.g. a marginalised guide's ``log q`` estimate) to this
        frame's total; it enters the ledger as a term of the particle plate only."""
        self.extra.append((value, run.particle_frame))


class Run:
    """One evaluation of an objective program (estimators see it as their ``SiteContext``).

    Owns the particle plate (``num_particles``, ``particle_dim``), the alternative dims, the cost
    ledger (``entries``), the score terms (``scores``), the ``logmeanexp`` records used for
    VIMCO's baselines (``lme``) and ``reported``: a value the program asks to report as the
    estimate instead of its return value (CUBO reports its bound while differentiating
    ``E[w^n]``).
    """

    def __init__(self, obj, model, guide, args, kwargs, default_k):
        self.obj = obj
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.default_k = default_k  # None: particles() is a no-op (looped particles)
        self.num_particles = 1
        self.particle_dim: int | None = None
        self.particle_frame: CondIndepStackFrame | None = None
        self.in_particles = False
        self.num_alts = 0
        self.frames: list[Frame] = []
        self.entries: list[Entry] = []
        self.scores: list[Score] = []
        self.lme: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reported: torch.Tensor | None = None
        self.deferred: list[tuple[Trace, Exception]] = []
        self.validate = is_validation_enabled()
        self.graph = obj.rao_blackwellize == "graph"
        self.num_tokens = 0
        self.logs: list[tuple[str, str, torch.Tensor]] = []
        self.force_estimator: Estimator | None = None
        self.default_estimator = obj.estimator

    # -- shapes -------------------------------------------------------------------------------
    @property
    def max_plate_nesting(self) -> int:
        """The model's plate nesting (particle and alternative dims excluded)."""
        obj = self.obj
        if obj.model_plate_nesting == float("inf"):
            obj._guess_max_plate_nesting(self.model, self.guide, self.args, self.kwargs)
            extra = 1 if obj.vectorize_particles and obj.num_particles > 1 else 0
            obj.model_plate_nesting = obj.max_plate_nesting - extra
        return int(obj.model_plate_nesting)

    def _check_nesting(self) -> float:
        """The nesting Pyro's shape checks use (the particle plate included; inf if unknown)."""
        if self.obj.model_plate_nesting == float("inf"):
            return float("inf")
        return self.obj.model_plate_nesting + (1 if self.particle_dim is not None else 0)

    def new_alt_dim(self) -> int:
        """A fresh batch dim, left of the particle and plate dims, for alternative values."""
        base = -(self.max_plate_nesting + 1) - (1 if self.particle_dim is not None else 0)
        dim = base - self.num_alts
        self.num_alts += 1
        return dim

    @contextmanager
    def particles(self, k: int):
        """The particle plate: ``pyro.plate(PARTICLE_PLATE, k)`` left of the model's plates."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"particles: num_particles must be a positive integer, got {k!r}")
        if self.in_particles:
            raise ValueError("particles() blocks cannot be nested")
        if self.particle_dim is not None and self.num_particles != k:
            raise ValueError(
                f"particles({k}): this program already used particles({self.num_particles}); "
                "all particle blocks of one program must have the same size"
            )
        dim = -(self.max_plate_nesting + 1)
        with pyro.plate(PARTICLE_PLATE, k, dim=dim):
            self.particle_dim, self.num_particles, self.in_particles = dim, k, True
            self.particle_frame = CondIndepStackFrame(PARTICLE_PLATE, dim, k, 0, k)
            try:
                yield dim
            finally:
                self.in_particles = False

    def reduce(self, term: torch.Tensor, trace: Trace, name: str) -> torch.Tensor:
        """Contract the Enumerate/MVD alternatives of ``trace`` in ``term`` and sum it to one
        value per particle (for program values that are not log-densities, e.g. an expectation
        of a function of the draws)."""
        t = _contract(term, alternatives(trace), name)
        if self.particle_frame is None:
            return t.sum()
        return per_particle(t, (self.particle_frame,), name)

    # -- estimator choice ---------------------------------------------------------------------
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
        note(est)  # a capture checks that estimators keep no Python state across steps
        return est

    # -- frames -------------------------------------------------------------------------------
    def push_frame(self, mode: str, trace: Trace | None = None,
                   guide_trace: Trace | None = None) -> Frame:
        """Open a frame (pop it with ``frames.pop()``; :meth:`frame` does both)."""
        nested = any(f.mode != "off" for f in self.frames)
        frame = Frame(mode, trace, guide_trace, nested)
        if mode == "density":
            frame.alts = alternatives(guide_trace)
        self.frames.append(frame)
        return frame

    @contextmanager
    def frame(self, mode: str, trace: Trace | None = None, guide_trace: Trace | None = None):
        frame = self.push_frame(mode, trace, guide_trace)
        try:
            yield frame
        finally:
            self.frames.pop()

    # -- guide sites (sim) --------------------------------------------------------------------
    def sim_sample(self, frame: Frame, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        est = self.choose(msg)
        draw = est.draw(msg["name"], msg["fn"], self)
        if not isinstance(draw, SiteDraw):
            raise TypeError(f"site {msg['name']!r}: {type(est).__name__}.draw must return a "
                            f"SiteDraw, got {type(draw).__name__}")
        if draw.alt is not None and self.validate:
            self._check_alt_plates(msg, draw)
        value = draw.value
        if self.graph and draw.score is not None:
            # TraceGraph_ELBO's provenance tracking: every term computed from this value records
            # that it depends on this site
            token = self.num_tokens
            self.num_tokens += 1
            frame.tokens[msg["name"]] = token
            value = track_provenance(value, frozenset({token}))
        msg["value"] = value
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

    def sim_post(self, frame: Frame, msg) -> None:
        name = msg["name"]
        if site_is_subsample(msg):
            frame.trace.add_node(name, **msg)
            return
        draw = frame.pending.pop(name, None)
        if draw is not None and draw.alt is not None:
            frame.alts.append(draw.alt)
        if draw is not None and draw.log_prob is not None:
            lp = draw.log_prob
        else:
            lp = msg["fn"].log_prob(msg["value"], *msg["args"], **msg["kwargs"])
        try:
            term = scale_and_mask(lp, msg["scale"], msg["mask"])
        except RuntimeError as e:
            # Trace_ELBO scores the guide only after the model ran: report after density()
            self.deferred.append((frame.trace, ValueError(
                f"guide site {name!r}: its log-density of shape {tuple(lp.shape)} cannot be "
                f"scaled/masked (mask shape "
                f"{tuple(getattr(msg['mask'], 'shape', ()))}): {e}")))
            term = None
        frame.trace.add_node(name, **msg)
        node = frame.trace.nodes[name]
        if term is not None:
            node["log_prob"] = term
        if draw is not None:
            node["estimator_draw"] = draw
        frame.sites.append(name)

    def finish_sim(self, frame: Frame, args) -> torch.Tensor:
        """Validate the guide trace like Trace_ELBO, fill the ledger, return ``log q``."""
        trace = frame.trace
        if self.validate:
            nesting = self._check_nesting()
            for name in frame.sites:
                node = trace.nodes[name]
                if "log_prob" in node:
                    check_site_shape(node, nesting)
            check_if_enumerated(trace)
        linear = self.obj.linear_in_log_q and not frame.nested
        total = 0.0
        for name in frame.sites:
            node = trace.nodes[name]
            term = node.get("log_prob")
            if term is None:
                continue
            frames = plate_frames(node)
            draw = node.get("estimator_draw")
            score = draw.score if draw is not None else None
            baseline = draw.baseline if draw is not None else None
            if score is None and node["is_observed"] and _is_score_factor(node):
                # pyro.factor(..., has_rsample=False) in the guide: Trace_ELBO's score term
                score, baseline = term, "auto"
            c = _contract(term, frame.alts, name) if frame.alts else term
            if score is not None:
                self._add_score(frame, name, score, baseline, frames)
            token = frame.tokens.get(name)
            prov = frozenset()
            if self.graph:
                prov = get_provenance(c) | (frozenset() if token is None else {token})
                c = detach_provenance(c)
            if self.validate:
                self.logs.append((name, "guide", c))
            pp = per_particle(c, frames, name)
            # a score-function site's own log q has a zero-mean explicit gradient; objectives
            # linear in log q drop it (Trace_ELBO's entropy_term = 0 for such sites)
            own = score is not None and (draw is None or score is draw.log_prob)
            total = total + (pp.detach() if linear and own else pp)
            if not frame.nested:
                self.entries.append(Entry(name, -1.0, c, frames, pp.detach(), prov))
        for value, pf in frame.extra:
            total = total + value
            if not frame.nested:
                # its provenance is lost in the estimate: it may depend on every draw so far
                prov = frozenset(range(self.num_tokens)) if self.graph else frozenset()
                self.entries.append(_extra_entry(value, pf, -1.0, prov))
        return _as_total(total, trace, args)

    def _add_score(self, frame: Frame, name, score, baseline, frames) -> None:
        for alt in frame.alts:
            d = alt.dim
            if score.dim() >= -d and score.size(d) > 1:
                raise NotImplementedError(
                    f"site {name!r}: a score-function site downstream of the Enumerate/MVD site "
                    f"{alt.site!r} is not supported; use Reparam for {name!r} or Reinforce for "
                    f"{alt.site!r}"
                )
        token = frame.tokens.get(name)
        if token is None:
            token = self.num_tokens
            self.num_tokens += 1
            frame.tokens[name] = token
        self.scores.append(Score(name, token, detach_provenance(score), baseline, frames))

    # -- model sites (density) ----------------------------------------------------------------
    def density_sample(self, frame: Frame, msg) -> None:
        name = msg["name"]
        gt = frame.guide_trace.nodes
        if site_is_subsample(msg):
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
        msg["value"] = site["value"]

    def density_post(self, frame: Frame, msg) -> None:
        # a second site of the same name raises, like Pyro; log-densities are computed after
        # the model ran (as Trace_ELBO does), so errors raised by the model come first
        frame.trace.add_node(msg["name"], **msg)
        if not site_is_subsample(msg):
            frame.sites.append(msg["name"])

    def finish_density(self, frame: Frame, args) -> torch.Tensor:
        """Validate model and guide traces like Trace_ELBO, fill the ledger, return ``log p``."""
        trace, guide_trace = frame.trace, frame.guide_trace
        if self.validate:
            check_model_guide_match(trace, guide_trace, self._check_nesting())
        for name in frame.sites:
            node = trace.nodes[name]
            node["log_prob"] = scale_and_mask(
                node["fn"].log_prob(node["value"], *node["args"], **node["kwargs"]),
                node["scale"], node["mask"])
        if self.validate:
            nesting = self._check_nesting()
            for name in frame.sites:
                check_site_shape(trace.nodes[name], nesting)
            self.raise_deferred(guide_trace)
        for name, site in guide_trace.nodes.items():
            if (site["type"] == "sample" and name not in trace.nodes
                    and not site["is_observed"] and not site["infer"].get("is_auxiliary")
                    and not site_is_subsample(site)):
                raise ValueError(
                    f"guide sample site {name!r} does not appear in the model; mark it "
                    "infer={'is_auxiliary': True} if it is an auxiliary variable"
                )
        total = 0.0
        for name in frame.sites:
            node = trace.nodes[name]
            frames = plate_frames(node)
            c = _contract(node["log_prob"], frame.alts, name) if frame.alts else node["log_prob"]
            prov = frozenset()
            if self.graph:
                prov = get_provenance(c)
                c = detach_provenance(c)
            if self.validate:
                self.logs.append((name, "model", c))
            pp = per_particle(c, frames, name)
            total = total + pp
            if not frame.nested:
                self.entries.append(Entry(name, 1.0, c, frames, pp.detach(), prov))
        return _as_total(total, guide_trace, args)

    def raise_deferred(self, trace: Trace | None = None) -> None:
        """Raise a guide error held back until the model ran (all of them when ``trace`` is
        None: the program has finished)."""
        for t, err in self.deferred:
            if trace is None or t is trace:
                raise err


def _is_score_factor(node) -> bool:
    """``pyro.factor(name, f, has_rsample=False)`` in a guide: ``f`` is the log-density of a
    non-reparameterised draw made by hand, so it takes a score-function term (as in Pyro)."""
    fn = node["fn"]
    return (node["is_observed"] and type(fn).__name__ == "Unit"
            and fn.__dict__.get("has_rsample") is False)


def _extra_entry(value: torch.Tensor, pf, sign: float, prov: frozenset) -> Entry:
    value = detach_provenance(value)
    if pf is None:
        value = value.sum()
        return Entry("<total>", sign, value, (), value.detach(), prov)
    value = value.expand(pf.size)
    shape = (pf.size,) + (1,) * (-pf.dim - 1)
    return Entry("<total>", sign, value.reshape(shape), (pf,), value.detach(), prov)


class RunMessenger(Messenger):
    """Sits at the bottom of the handler stack for the whole program, so it sees every site
    after all plates (the particle plate included) have broadcast it."""

    def __init__(self, run: Run):
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


_RUNS: list[Run] = []


def current_run() -> Run | None:
    """The innermost active program run (``None`` outside objective programs)."""
    return _RUNS[-1] if _RUNS else None


def require_run(what: str) -> Run:
    if not _RUNS:
        raise RuntimeError(
            f"{what}() must be called inside an objective program (a function decorated with "
            "vi_estimators.objective, run through .loss/.loss_and_grads/.differentiable_loss)"
        )
    return _RUNS[-1]


def execute(run: Run, program: Callable, *args, **kwargs):
    """Run ``program(*args, **kwargs)`` as ``run``; returns its value."""
    _RUNS.append(run)
    try:
        with RunMessenger(run):
            value = program(*args, **kwargs)
    finally:
        _RUNS.pop()
    run.raise_deferred()
    return value


# ---------------------------------------------------------------------------------------------
# The surrogate
# ---------------------------------------------------------------------------------------------


_RLOO = RLOO()


@dataclass
class _Signal:
    """One score term ready for its baseline: signal and score in the ``(P, *elements)`` layout
    (P: particles sharing the term; 1 for a site shared by all particles)."""

    name: str
    signal: torch.Tensor
    score: torch.Tensor
    baseline: Any
    independent: bool  # the P slices depend on independent draws (leave-one-out is valid)
    why: str  # why not, for the error message
    loo: torch.Tensor | None
    subsampled: bool
    weight: float


def _check_value(obj, run: Run, value) -> bool:
    """Validate a program's return value; True if it is per particle."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"objective {getattr(obj, '__name__', type(obj).__name__)!r} must return a tensor, "
            f"got {type(value).__name__}"
        )
    k = run.num_particles
    per = value.dim() == 1 and run.particle_dim is not None and value.shape[0] == k
    if value.dim() != 0 and not per:
        raise ValueError(
            f"objective must return a scalar tensor (or a per-particle tensor of shape ({k},) "
            f"inside particles()), got shape {tuple(value.shape)}"
        )
    return per


def _vimco_loo(x: torch.Tensor) -> torch.Tensor:
    """Leave-one-out logmeanexp: x_k replaced by the mean of the other x_j (Mnih & Rezende 2016,
    eq. 9 with the arithmetic mean)."""
    k = x.size(0)
    x = x.detach()
    m = (x.sum() - x) / (k - 1)
    mat = x.expand(k, k).clone()
    mat.diagonal().copy_(m)
    return torch.logsumexp(mat, -1) - math.log(k)


def _signals(run: Run, value: torch.Tensor, per: bool, mode) -> list[_Signal]:
    """Signals of every score term of one run (see the module docstring)."""
    v = value.detach()
    k = run.num_particles if run.particle_frame is not None else 1
    pf = run.particle_frame
    decompose = mode is not None and (per or pf is None)
    loo = None
    if not per and pf is not None and k > 1:
        rec = run.lme.get(id(value))
        if rec is not None and rec[0] is value:
            loo = _vimco_loo(rec[1])
    if decompose:
        r = 0.0
        for e in run.entries:
            r = r + e.sign * e.total
        residual = v - r  # zero for the ELBO: its value is the ledger
        if per:
            residual = residual.reshape((k,) + (1,) * (-pf.dim - 1))
            res_frames = (pf,)
        else:
            res_frames = ()
    out = []
    for s in run.scores:
        keep = s.frames
        local = pf is not None and _shares(pf, keep)
        if decompose:
            sig = sum_to_frames(residual, res_frames, keep)
            for e in run.entries:
                if mode == "graph" and s.token not in e.provenance:
                    continue
                sig = sig + e.sign * sum_to_frames(e.term.detach(), e.frames, keep)
            if per and not local:
                sig = sig / k
            independent, why = local or pf is None, "outside"
        elif per:
            if local:
                sig = sum_to_frames(v.reshape((k,) + (1,) * (-pf.dim - 1)), (pf,), keep)
            else:
                sig = v.mean()
            independent, why = local, "outside"
        else:
            sig = v
            independent = (local and loo is not None) or pf is None
            why = "scalar" if local else "outside"
        score = sum_to_frames(s.score, s.frames, keep)
        if not local:
            score, sig = score.unsqueeze(0), sig.reshape((1,) + tuple(sig.shape))
        shape = _broadcast_shape(sig.shape, score.shape)
        sig, score = sig.expand(shape), score.expand(shape)
        weight = 1.0 / k if per and local else 1.0
        subsampled = any(f.full_size is not None and f.full_size != f.size for f in keep
                         if f.name != PARTICLE_PLATE)
        out.append(_Signal(s.name, sig, score, s.baseline, independent, why,
                           loo if local else None, subsampled, weight))
    return out


def _stack(per_run: list[list[_Signal]]) -> list[_Signal] | None:
    """Looped particles: stack the runs' signals of each site on the particle axis (None if the
    runs' site structures differ)."""
    first = per_run[0]
    for other in per_run[1:]:
        if len(other) != len(first) or any(
            a.name != b.name or a.signal.shape != b.signal.shape or a.signal.shape[0] != 1
            for a, b in zip(first, other)
        ):
            return None
    out = []
    for i, s in enumerate(first):
        out.append(_Signal(
            s.name, torch.cat([r[i].signal for r in per_run]),
            torch.cat([r[i].score for r in per_run]), s.baseline, True, "", None,
            s.subsampled, s.weight))
    return out


def _baseline_for(obj, s: _Signal, num: int, looped: bool):
    baseline = s.baseline
    if baseline == "auto":
        if num > 1 and s.independent:
            return _RLOO
        b = obj.auto_baselines.get(s.name)
        if b is None:
            b = obj.auto_baselines[s.name] = MovingAverage(0.9)
        return b
    if isinstance(baseline, RLOO) and not s.independent:
        if s.why == "outside":
            raise ValueError(
                f"RLOO baseline at site {s.name!r}: the site is sampled outside particles(), so "
                "the other particles' signals depend on it; sample it inside particles() or use "
                "MovingAverage()"
            )
        raise ValueError(
            f"RLOO baseline at site {s.name!r}: the objective returned a scalar that is not a "
            "logmeanexp over particles, so per-particle signals are unknown; return the "
            "per-particle estimates (shape (K,)) or use MovingAverage()"
        )
    if isinstance(baseline, RLOO) and num < 2 and looped:
        raise ValueError(
            f"RLOO baseline at site {s.name!r}: the looped particles (vectorize_particles=False) "
            "sampled different sites or site shapes, so their signals cannot be paired; use "
            "vectorize_particles=True (models that broadcast) or MovingAverage()"
        )
    if baseline is not None:
        note(baseline)  # a capture carries its state or checks that it keeps none
    return baseline


def assemble(obj, runs: list[Run], values: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiCE surrogate and the estimate of finished runs (one, or one per looped particle).

    Returns ``(surrogate, estimate)``: the surrogate has the estimate's value (plus nothing: every
    added term is zero-valued) and its gradient is an unbiased estimate of the gradient of the
    expected objective.
    """
    n = len(runs)
    estimate = 0.0
    surrogate = 0.0
    per_run = []
    for run, value in zip(runs, values):
        per = _check_value(obj, run, value)
        est = value.mean() if per else value
        if run.reported is not None:  # report this value; keep the surrogate's gradient
            est = est + (run.reported - est).detach()
        estimate = estimate + est / n if n > 1 else est
        if run.scores and torch.is_grad_enabled():
            sig = _signals(run, value, per, obj.rao_blackwellize)
            if n > 1:
                for s in sig:
                    s.weight = s.weight / n
            per_run.append(sig)
    surrogate = estimate
    if not per_run:
        return surrogate, estimate
    looped = n > 1
    groups = [_stack(per_run)] if looped and len(per_run) == n else None
    if groups is None or groups[0] is None:
        groups = per_run
    run0 = runs[0]
    for group in groups:
        for s in group:
            num = s.signal.shape[0]
            b = _baseline_for(obj, s, num, looped)
            if b is None:
                adv = s.signal
            else:
                loo = s.loo
                if loo is not None:
                    loo = loo.reshape((num,) + (1,) * (s.signal.dim() - 1))
                info = BaselineInfo(num_particles=num if s.independent else 1, loo=loo,
                                    args=run0.args, kwargs=run0.kwargs,
                                    subsampled=s.subsampled)
                bval = b(s.name, s.signal, info)
                if b.trainable:
                    sq = (s.signal - bval) ** 2
                    surrogate = surrogate - (sq - sq.detach()).sum()
                adv = s.signal - bval.detach()
            term = (adv * (s.score - s.score.detach())).sum()
            surrogate = surrogate + s.weight * term
    return surrogate, estimate
