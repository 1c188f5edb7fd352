"""Path gradients: log q at stopped parameters, sticking the landing (STL) and DReG.

``stopped_log_prob(guide, guide_trace, *args, **kwargs) -> log_q`` re-evaluates the guide's
log-density at the values recorded in ``guide_trace`` with every guide parameter *detached*
(:mod:`vi_estimators.stopping`), while the values stay attached to the graph. Its gradient is
therefore the path (pathwise) part only:

    d/dphi log q(z(phi); stop(phi)) = (d log q / dz) (dz / dphi),

which is the "sticking the landing" estimator of Roeder et al. (2017) when used in the ELBO, and
the ingredient of DReG (Tucker et al. 2019, eq. 5-7) in IWAE/RWS. Flow sites whose sampling pass
is still in the transforms' caches (as right after ``sim``) take the fast, inverse-free path of
:mod:`vi_estimators.flows` automatically; any other site falls back to the re-evaluation.

Shape convention: one value per particle (the dim of the plate ``"num_particles_vectorized"``
is kept, every other dim summed; :func:`vi_estimators.core.per_particle`). For other batch
layouts use :func:`stopped_trace`, which returns every site's stopped log-density unreduced.
Site scales (``poutine.scale``, subsampling) and masks are applied as in Pyro's traces.

Inside objective programs (:mod:`vi_estimators.objectives`):

* STL (``ELBO(path_gradient=True)``): ``log_p - stopped_log_prob(...)``;
* DReG (``IWELBO``/``RWS(path_gradient=True)``, :func:`dreg_surrogate`): the guide gradient
  ``sum_k c(w~)_k d log w_k / dz_k dz_k / dphi`` with ``c(w~) = w~^2`` (IWELBO, eq. 7) or
  ``w~ - w~^2`` (RWS wake-phi, eq. 8), the model gradient ``sum_k w~_k grad_theta log p``. The
  ``d log w_k / dz_k`` are *partial* derivatives per site, evaluated at detached leaf copies of
  the draws (:func:`leaf_log_weights`), then chained through the attached draws
  (:func:`path_term`), so hierarchical guides are not double counted.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from . import flows
from .core import per_particle, plate_frames
from .program import density, logmeanexp, particles, sim
from .stopping import StopParamMessenger, with_stopped_params

__all__ = [
    "check_reparameterized",
    "dreg_surrogate",
    "leaf_log_weights",
    "path_term",
    "stopped_log_prob",
    "stopped_trace",
]


# ---------------------------------------------------------------------------------------------
# Stopped log q
# ---------------------------------------------------------------------------------------------


def _fresh_values(guide_trace):
    """A shallow copy of the trace whose sample values are new views of the same tensors.

    Views keep the graph but defeat transform caches (torch caches ``y -> x`` by identity), so the
    inverse and log-det-Jacobian are recomputed at the stopped parameters.
    """
    tr = guide_trace.copy()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            value = site["value"]
            if isinstance(value, torch.Tensor):
                tr.nodes[name] = dict(site, value=value.view_as(value))
    return tr



def stopped_trace(
    guide: Callable, guide_trace: pyro.poutine.Trace, *args, _skip: frozenset = frozenset(),
    **kwargs,
):
    """Re-run ``guide`` replaying ``guide_trace`` with all guide parameters detached.

    Returns the new trace with ``log_prob`` computed at every sample site (values equal to, and
    graph-connected with, ``guide_trace``'s; distribution parameters detached from every
    ``pyro.param`` and from the ``nn.Parameter``s of the guide if it is an ``nn.Module``).
    Subsample indices are replayed too. The log-probs are computed while the parameters are
    swapped, so transform modules see the detached values.
    """
    replay_trace = _fresh_values(guide_trace)

    def run(g):
        # block: handlers outside (an objective's run messenger, its particle plate) must not see
        # this re-run; the replayed values already carry every batch dim.
        with pyro.poutine.block(), StopParamMessenger():
            tr = pyro.poutine.trace(pyro.poutine.replay(g, trace=replay_trace)).get_trace(
                *args, **kwargs
            )
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and \
                    not site_is_subsample(site) and name not in _skip:
                site["log_prob"] = _site_log_prob(site)
        return tr

    return with_stopped_params(guide, run)


def _site_log_prob(site) -> torch.Tensor:
    try:
        log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    except NotImplementedError as e:
        raise ValueError(
            f"path_gradient: the guide's log-density at site {site['name']!r} "
            f"({type(site['fn']).__name__}) cannot be evaluated (log_prob is not implemented), "
            "so it cannot be evaluated at stopped parameters; use path_gradient=False for this "
            "guide"
        ) from e
    return scale_and_mask(log_p, site["scale"], site["mask"])

_CHECKED_GUIDES: weakref.WeakSet = weakref.WeakSet()


def _leaked_params(guide, guide_trace, args, kwargs) -> list[tuple[str, str]]:
    """(site, parameter) pairs whose log q still depends on a guide parameter after stopping."""
    params: dict[str, torch.Tensor] = {}
    for name, site in guide_trace.nodes.items():
        if site["type"] == "param":
            value = site["value"]
            unconstrained = getattr(value, "unconstrained", None)
            raw = unconstrained() if unconstrained is not None else None
            leaf = raw if raw is not None else value
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                params[name] = leaf
    if isinstance(guide, torch.nn.Module):
        for name, p in guide.named_parameters():
            if p.requires_grad:
                params.setdefault(name, p)
    if not params:
        return []
    detached_trace = guide_trace.copy()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            detached_trace.nodes[name] = dict(site, value=site["value"].detach())
    tr = stopped_trace(guide, detached_trace, *args, **kwargs)
    leaks = []
    names, leaves = list(params), list(params.values())
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        log_p = site["log_prob"]
        if not (isinstance(log_p, torch.Tensor) and log_p.requires_grad):
            continue
        grads = torch.autograd.grad(log_p.sum(), leaves, allow_unused=True, retain_graph=True)
        for p_name, g in zip(names, grads):
            if g is not None:
                leaks.append((name, p_name))
    return leaks


def _check_stoppable(guide, guide_trace, args, kwargs) -> None:
    try:
        if guide in _CHECKED_GUIDES:
            return
    except TypeError:  # not weak-referenceable: check every time
        pass
    with torch.enable_grad():  # under no_grad (e.g. a first .loss() call) nothing would leak
        leaks = _leaked_params(guide, guide_trace, args, kwargs)
    if leaks:
        site, param = leaks[0]
        raise ValueError(
            f"path_gradient: the guide's log-density at site {site!r} cannot be evaluated at "
            f"stopped parameters: it still depends on parameter {param!r} after detaching every "
            "pyro.param (and the guide's own nn.Parameters when the guide is an nn.Module). "
            "Parameters reached another way (e.g. pyro.module(...) inside a plain function, or a "
            "tensor captured in a closure) cannot be stopped: make the guide an nn.Module / "
            "PyroModule holding them, or use path_gradient=False"
        )
    try:
        _CHECKED_GUIDES.add(guide)
    except TypeError:
        pass



def stopped_log_prob(guide: Callable, guide_trace: pyro.poutine.Trace, *args, **kwargs):
    """log q of the values in ``guide_trace`` with every guide parameter stopped (detached).

    Args:
        guide: the guide callable that produced ``guide_trace`` (a function using ``pyro.param``,
            a ``PyroModule``/autoguide, or any ``nn.Module`` guide).
        guide_trace: a trace of ``guide(*args, **kwargs)`` (values attached to the graph).
        *args, **kwargs: the guide's arguments (the same as when it was traced).

    Returns:
        ``log_q`` per particle (``(K,)`` for sites in the particle plate
        ``"num_particles_vectorized"``, else a scalar): the sum over the guide's latent sample
        sites of ``scale * mask * log q(value; stop(params))``. Its gradient
        flows through the sampled values only. Observed and subsample sites are skipped.

    Raises:
        ValueError: if a site's log-density cannot be evaluated (no ``log_prob``), if a site is
            estimated by Enumerate/MVD alternatives, or, when Pyro
            validation is enabled (checked once per guide), if log q still depends on a guide
            parameter after stopping (a parameter that neither ``pyro.param`` nor the guide
            module exposes).
    """
    # Flow sites whose sampling pass is still in the transforms' caches get the fast path
    # gradient (no inverse pass); everything else is re-evaluated at stopped parameters. (Done
    # before the validation check, whose re-run overwrites those caches.)
    for name, site in guide_trace.nodes.items():
        draw = site.get("estimator_draw")
        if draw is not None and draw.alt is not None:
            raise ValueError(
                f"path gradient: site {name!r} is estimated by alternatives (Enumerate/MVD); "
                "path_gradient=True cannot be combined with Enumerate/MVD sites"
            )
    fast = {}
    if flows.USE_FAST_FLOW_PATH:
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and \
                    not site_is_subsample(site):
                lp = flows.fast_flow_site_log_prob(site)
                if lp is not None:
                    fast[name] = lp
    if pyro.poutine.util.is_validation_enabled():
        _check_stoppable(guide, guide_trace, args, kwargs)
    tr = stopped_trace(guide, guide_trace, *args, _skip=frozenset(fast), **kwargs)
    # Plate structure (particle plate included) comes from the original trace: the re-run is
    # blocked from outer plates.
    total = 0.0
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        frames = plate_frames(guide_trace.nodes.get(name, site))
        log_p = fast[name] if name in fast else site["log_prob"]
        total = total + per_particle(log_p, frames, name)
    if not isinstance(total, torch.Tensor):
        raise TypeError("path_gradient: the guide has no latent sample sites")
    return total


# ---------------------------------------------------------------------------------------------
# STL and DReG inside objective programs
# ---------------------------------------------------------------------------------------------


def check_reparameterized(trace, what: str) -> None:
    """Raise unless every latent site of a ``sim`` trace was drawn pathwise (no score term, no
    alternatives): DReG's identities need reparameterised draws everywhere."""
    for name, site in trace.nodes.items():
        draw = site.get("estimator_draw")
        if draw is not None and (draw.score is not None or draw.alt is not None):
            raise ValueError(
                f"{what}: site {name!r} is not reparameterised (its estimator adds a score term "
                "or alternatives); DReG needs pathwise (Reparam) draws at every latent site"
            )


def leaf_log_weights(model, guide, trace, args, kwargs):
    """``(log_p, log_w, pairs)``: log p and log w per particle at detached leaf copies of the
    draws of ``trace`` (model parameters attached, guide parameters stopped), and the
    ``(leaf, attached value)`` pairs of the draws that carry a gradient."""
    leaf_trace = trace.copy()
    pairs = []
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            value = site["value"]
            leaf = value.detach().requires_grad_(value.requires_grad)
            leaf_trace.nodes[name] = dict(site, value=leaf)
            if value.requires_grad:
                pairs.append((leaf, value))
    with particles():  # re-enter the particle plate: the model and guide run again
        log_p = density(model, leaf_trace, *args, **kwargs)
        log_q = stopped_log_prob(guide, leaf_trace, *args, **kwargs)
    return log_p, log_p - log_q, pairs


def path_term(log_w: torch.Tensor, coef: torch.Tensor, pairs) -> torch.Tensor | float:
    """Zero-valued term with gradient ``sum_k coef_k * d log w_k / dz_k * dz_k / dphi``."""
    if not pairs:
        return 0.0
    leaves = [p[0] for p in pairs]
    grads = torch.autograd.grad(log_w, leaves, grad_outputs=coef.detach(), retain_graph=True,
                                allow_unused=True)
    term = 0.0
    for g, (_, value) in zip(grads, pairs):
        if g is not None:
            term = term + (g.detach() * value).sum()
    return term - term.detach() if isinstance(term, torch.Tensor) else 0.0


def dreg_surrogate(model, guide, args, kwargs, what: str, path_coef: Callable):
    """Doubly reparameterised surrogate (Tucker et al. 2019): value the IWELBO estimate; model
    gradient ``sum_k w~_k grad_theta log p(x, z_k)``; guide gradient ``sum_k path_coef(w~)_k
    d log w_k / dz_k dz_k / dphi`` (partials at stopped guide parameters). Call it inside an
    objective program with vectorised particles."""
    with particles():
        trace, _ = sim(guide, *args, **kwargs)  # only the draws: log w is re-evaluated
    check_reparameterized(trace, f"{what}(path_gradient=True)")
    log_p, log_w, pairs = leaf_log_weights(model, guide, trace, args, kwargs)
    estimate = logmeanexp(log_w).detach()
    if not torch.is_grad_enabled():
        return estimate
    w = torch.softmax(log_w.detach(), 0)
    theta = (w * log_p).sum()
    return estimate + (theta - theta.detach()) + path_term(log_w, path_coef(w), pairs)
