"""Hierarchical (marginalised) guides: ``marginal``, HVI, IWHVI and DIWHVI.

A hierarchical guide ``q(z, psi) = q(psi) q(z | psi)`` has an intractable marginal ``q(z)``.
:func:`marginal` turns it into a guide over the kept latents ``z`` whose ``log q(z)`` is an
importance-sampling estimate (an upper bound in expectation), so every objective written with
``sim``/``density`` works with it; :class:`HVI`, :class:`IWHVI` (ELBOs) and :class:`DIWHVI`
(an IWELBO) are those objectives with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from .core import PARTICLE_PLATE, current_run, plate_frames, sum_to_frames
from .objectives import ELBO, IWELBO
from .program import logmeanexp, sim

__all__ = ["DIWHVI", "HVI", "IWHVI", "marginal"]

INNER_PLATE = "marginal_particles"  # the plate of the inner importance samples


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
    return _marginal_guide(guide, keep, proposal, num_particles)


def _site_total(trace: Trace, names) -> torch.Tensor:
    """Sum of the scaled/masked log-probs of ``names`` over every dim but the inner-sample and
    particle plates: ``(M, K)``, ``(K,)``, ``(M,)`` or ``()`` (those two plates are the leftmost
    dims, so they lead the reduced layout)."""
    total = 0.0
    for name in names:
        site = trace.nodes[name]
        t = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
        frames = plate_frames(site)
        keep = [f for f in frames if f.name in (PARTICLE_PLATE, INNER_PLATE)]
        t = sum_to_frames(t, frames, keep)
        total = total + t.reshape(t.shape[:len(keep)])
    return total


def _check_inner_reparam(trace: Trace, aux) -> None:
    # The inner samples psi_1..M are plain pyro.sample draws (rsample where available): their
    # gradient is pathwise only. A non-reparameterisable one would silently drop its score term.
    for name in aux:
        fn = trace.nodes[name]["fn"]
        if not fn.has_rsample:
            raise ValueError(
                f"marginal: auxiliary site {name!r} ({type(fn).__name__}) has no rsample; the "
                "inner importance samples need reparameterisable auxiliary sites (use "
                "num_particles=0 with a proposal, i.e. HVI, for discrete ones)"
            )


def _marginal_guide(guide: Callable, keep, proposal: Callable | None, num_particles: int):
    keep = tuple(keep)
    if not keep:
        raise ValueError("marginal: keep must name at least one guide site")
    if not isinstance(num_particles, int) or num_particles < 0:
        raise ValueError(f"marginal: num_particles must be an integer >= 0, got {num_particles!r}")
    if proposal is None and num_particles == 0:
        raise ValueError("marginal: with proposal=None at least one inner particle is needed "
                         "(num_particles >= 1)")
    keep_set = set(keep)

    def marginal_guide(*args, **kwargs):
        run = current_run()
        if run is None or not run.frames or run.frames[-1].mode != "sim":
            # outside an objective program: just the kept sites (e.g. for Predictive)
            hide = pyro.poutine.block(
                guide, hide_fn=lambda m: m["type"] == "sample" and m["name"] not in keep_set
            )
            return hide(*args, **kwargs)
        outer = run.frames[-1]
        inner, log_joint = sim(guide, *args, **kwargs)
        latent = [n for n, s in inner.nodes.items() if s["type"] == "sample"
                  and not s["is_observed"] and not site_is_subsample(s)]
        missing = keep_set - set(latent)
        if missing:
            raise ValueError(f"marginal: kept sites {sorted(missing)} are not sampled by the guide")
        aux = [n for n in latent if n not in keep_set]
        for name, site in inner.nodes.items():
            if name not in aux and name not in outer.trace.nodes:
                outer.trace.add_node(name, **site)
        z = {n: inner.nodes[n]["value"] for n in keep}
        psi0 = {n: inner.nodes[n]["value"] for n in aux}
        inner_dim = -(run.max_plate_nesting + 1) - (1 if run.particle_dim is not None else 0)
        with run.frame("off"):
            # the draw psi_0 that produced z is always one of the inner samples: this keeps the
            # estimate an upper bound of log q(z) in expectation (Sobolev & Vetrov 2019, thm. 1)
            if proposal is not None:
                tr0 = pyro.poutine.trace(pyro.poutine.condition(proposal, data=psi0)).get_trace(
                    z, *args, **kwargs)
                log_r0 = _site_total(tr0, aux)
            else:
                log_r0 = _site_total(inner, aux)
            terms = [(log_joint - log_r0).unsqueeze(0)]
            if num_particles:
                with pyro.plate(INNER_PLATE, num_particles, dim=inner_dim):
                    if proposal is not None:
                        tr_r = pyro.poutine.trace(proposal).get_trace(z, *args, **kwargs)
                        _check_inner_reparam(tr_r, aux)
                        psi = {n: tr_r.nodes[n]["value"] for n in aux}
                        log_r = _site_total(tr_r, aux)
                        tr_q = pyro.poutine.trace(
                            pyro.poutine.condition(guide, data={**psi, **z})
                        ).get_trace(*args, **kwargs)
                        terms.append(_site_total(tr_q, latent) - log_r)
                    else:
                        # r = the guide's own distribution of the auxiliary sites: q(z | psi_m)
                        tr_q = pyro.poutine.trace(
                            pyro.poutine.condition(guide, data=z)
                        ).get_trace(*args, **kwargs)
                        _check_inner_reparam(tr_q, aux)
                        terms.append(_site_total(tr_q, keep))
            log_terms = torch.cat([t.expand((t.shape[0],) + log_joint.shape) for t in terms], 0)
            log_q = torch.logsumexp(log_terms, 0) - math.log(log_terms.shape[0])
        outer.add_total(log_q, run)
        return None

    return marginal_guide


def _no_path_gradient(name: str, options: dict) -> None:
    # stopped_log_prob re-runs the guide outside sim(), where a marginal() guide hides and
    # redraws its auxiliary sites: log q(z) at stopped parameters is not available there
    if options.get("path_gradient"):
        raise ValueError(
            f"{name}: path_gradient=True is not supported for marginalised (hierarchical) "
            "guides; their log q(z) is an importance-sampling estimate, not a density that can "
            "be re-evaluated at stopped parameters"
        )


class HVI(ELBO):
    """Hierarchical VI (Ranganath et al. 2016): the ELBO of ``marginal(guide, keep, proposal,
    0)``, i.e. ``E[log p(x, z) + log r(psi | z) - log q(z, psi)]`` with the reverse model
    ``r = proposal`` (called as ``proposal(z_dict, *args, **kwargs)``)."""

    num_inner = 0

    def __init__(self, keep, proposal: Callable, **options):
        _no_path_gradient(type(self).__name__, options)
        super().__init__(**options)
        self.keep, self.proposal = tuple(keep), proposal

    def program(self, model, guide, *args, **kwargs):
        mg = _marginal_guide(guide, self.keep, self.proposal, self.num_inner)
        return super().program(model, mg, *args, **kwargs)


class IWHVI(HVI):
    """Importance-weighted hierarchical VI (Sobolev & Vetrov 2019): the ELBO with log q(z)
    replaced by its ``num_inner``-sample importance-weighted upper bound."""

    def __init__(self, keep, proposal: Callable | None = None, num_inner: int = 10, **options):
        _no_path_gradient(type(self).__name__, options)
        ELBO.__init__(self, **options)
        self.keep, self.proposal, self.num_inner = tuple(keep), proposal, num_inner


class DIWHVI(IWELBO):
    """Doubly importance-weighted HVI (Sobolev & Vetrov 2019, sec. 4): an IWELBO over
    ``num_particles`` outer samples with each log q(z_k) estimated from ``num_inner`` inner
    samples."""

    def __init__(self, keep, proposal: Callable | None = None, num_inner: int = 10, *,
                 num_particles: int = 8, **options):
        _no_path_gradient(type(self).__name__, options)
        super().__init__(num_particles=num_particles, **options)
        self.keep, self.proposal, self.num_inner = tuple(keep), proposal, num_inner

    def program(self, model, guide, *args, **kwargs):
        mg = _marginal_guide(guide, self.keep, self.proposal, self.num_inner)
        _, log_p, log_q = self.log_weights(model, mg, *args, **kwargs)
        return logmeanexp(log_p - log_q)
