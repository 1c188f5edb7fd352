"""Shipped objectives, each written as a short program with the constructs of ``program.py``.

Every class takes the keyword options of :class:`~vi_estimators.program.Objective` (Pyro's
``ELBO`` arguments plus ``estimator=``) and has ``loss``, ``loss_and_grads`` and
``differentiable_loss``. ``num_particles`` is the number of independent ELBO estimates averaged
(``ELBO``) or the number of importance samples K inside the bound (the others, which require
``vectorize_particles=True``, their default).

Path gradients (``path_gradient=True``) use ``vi_estimators.path.stopped_log_prob`` (log q with the
guide's parameters stopped):

* ``ELBO``: sticking the landing (Roeder et al. 2017) -- ``log_p - log q(z; stop(phi))``;
* ``IWELBO``: DReG (Tucker et al. 2019, eq. 7): guide gradient ``sum_k w~_k^2 d log w_k / dz_k
  dz_k / dphi``, model gradient ``sum_k w~_k grad_theta log p``;
* ``RWS``: DReG wake-phi (Tucker et al. 2019, eq. 8): ``sum_k (w~_k - w~_k^2) d log w_k / dz_k
  dz_k / dphi``.

(IWAE with plain STL is biased, so ``IWELBO(path_gradient=True)`` is DReG, never STL.) The
``d log w_k / dz_k`` are *partial* derivatives per site, evaluated at detached leaf copies of the
draws, then chained through the attached draws, so hierarchical guides are not double counted.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro.poutine.trace_struct import Trace

from .baselines import RLOO
from .estimators import NoGrad, Reinforce
from .program import (
    Objective,
    _density,
    _logmeanexp,
    current_run,
    density,
    logmeanexp,
    particles,
    sim,
    with_estimator,
)

__all__ = ["CUBO", "DIWHVI", "ELBO", "HVI", "IWELBO", "IWHVI", "RWS", "VIMCO", "Renyi"]


def _stopped_log_prob(guide, trace, args, kwargs):
    # Lazy import: the path-gradient machinery lives in vi_estimators.path.
    from .path import stopped_log_prob

    if getattr(trace, "_vi_alts", None):
        raise ValueError("path_gradient=True cannot be combined with Enumerate/MVD sites")
    return stopped_log_prob(guide, trace, *args, **kwargs)


def _check_all_reparam(trace, what):
    for name, site in trace.nodes.items():
        draw = site.get("estimator_draw")
        if draw is not None and (draw.score is not None or draw.alt is not None):
            raise ValueError(
                f"{what}: site {name!r} is not reparameterised (its estimator adds a score term "
                "or alternatives); DReG needs pathwise (Reparam) draws at every latent site"
            )


def _leaf_log_weights(model, guide, trace, args, kwargs):
    """log w at detached leaf copies of the draws (model params attached, guide params
    stopped) and the ``(leaf, attached value)`` pairs."""
    leaf_trace = trace.copy()
    pairs = []
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and \
                type(site["fn"]).__name__ != "_Subsample":
            value = site["value"]
            leaf = value.detach().requires_grad_(value.requires_grad)
            leaf_trace.nodes[name] = dict(site, value=leaf)
            if value.requires_grad:
                pairs.append((leaf, value))
    leaf_trace._vi_alts = []
    with particles():  # re-enter the particle plate: the model and guide run again
        log_p = _density(model, leaf_trace, args, kwargs)[0]
        log_q = _stopped_log_prob(guide, leaf_trace, args, kwargs)
    return log_p, log_p - log_q, pairs


def _path_term(log_w, coef, pairs):
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


class ELBO(Objective):
    """The evidence lower bound ``E_q[log p(x, z) - log q(z)]``; a drop-in for ``Trace_ELBO``.

    Program::

        with particles():
            trace, log_q = sim(guide, *args, **kwargs)
            log_p = density(model, trace, *args, **kwargs)
        return log_p - log_q          # per particle; the estimate is the mean

    ``path_gradient=True``: sticking the landing (``log_q`` at stopped guide parameters).
    """

    def __init__(self, *, path_gradient: bool = False, **options):
        super().__init__(**options)
        self.path_gradient = bool(path_gradient)

    def program(self, model, guide, *args, **kwargs):
        with particles():
            trace, log_q = sim(guide, *args, **kwargs)
            if self.path_gradient:
                log_q = _stopped_log_prob(guide, trace, args, kwargs)
            log_p = density(model, trace, *args, **kwargs)
        return log_p - log_q


class _ImportanceWeighted(Objective):
    def __init__(self, *, num_particles: int = 8, vectorize_particles: bool = True, **options):
        if not vectorize_particles and num_particles > 1:
            raise ValueError(
                f"{type(self).__name__} combines its particles inside a logmeanexp and needs "
                "vectorize_particles=True (the model and guide must broadcast over a left batch "
                "dim)"
            )
        super().__init__(num_particles=num_particles, vectorize_particles=True, **options)

    def log_weights(self, model, guide, *args, **kwargs):
        with particles():
            trace, log_q = sim(guide, *args, **kwargs)
            log_p = density(model, trace, *args, **kwargs)
        return trace, log_p, log_q

    def _dreg(self, model, guide, args, kwargs, what: str, path_coef: Callable):
        """Doubly reparameterised surrogate: value the IWELBO estimate; model-parameter gradient
        ``sum_k w~_k grad_theta log p(x, z_k)``; guide gradient ``sum_k path_coef(w~)_k
        d log w_k / dz_k dz_k / dphi`` (partials at stopped guide parameters)."""
        with particles():
            trace, _ = sim(guide, *args, **kwargs)  # only the draws: log w is re-evaluated
        _check_all_reparam(trace, f"{what}(path_gradient=True)")
        log_p, log_w, pairs = _leaf_log_weights(model, guide, trace, args, kwargs)
        estimate = logmeanexp(log_w).detach()
        if not torch.is_grad_enabled():
            return estimate
        w = torch.softmax(log_w.detach(), 0)
        theta = (w * log_p).sum()
        return estimate + (theta - theta.detach()) + _path_term(log_w, path_coef(w), pairs)


class IWELBO(_ImportanceWeighted):
    """Importance-weighted bound (IWAE, Burda et al. 2016): ``E[log mean_k w_k]``.

    Program::

        with particles():
            trace, log_q = sim(guide, *args, **kwargs)
            log_p = density(model, trace, *args, **kwargs)
        return logmeanexp(log_p - log_q)

    ``path_gradient=True``: DReG (needs Reparam at every latent site).
    """

    def __init__(self, *, num_particles: int = 8, path_gradient: bool = False, **options):
        super().__init__(num_particles=num_particles, **options)
        self.path_gradient = bool(path_gradient)

    def program(self, model, guide, *args, **kwargs):
        if self.path_gradient:  # DReG, Tucker et al. (2019) eq. 7
            return self._dreg(model, guide, args, kwargs, "IWELBO", lambda w: w**2)
        _, log_p, log_q = self.log_weights(model, guide, *args, **kwargs)
        return logmeanexp(log_p - log_q)


class VIMCO(IWELBO):
    """IWELBO with score-function gradients and VIMCO's leave-one-out baselines (Mnih & Rezende
    2016): the default estimator of every site is ``Reinforce(RLOO())``."""

    def __init__(self, *, num_particles: int = 8, estimator=None, **options):
        super().__init__(num_particles=num_particles,
                         estimator=estimator if estimator is not None else Reinforce(RLOO()),
                         **options)


class RWS(_ImportanceWeighted):
    """Reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019).

    Wake-theta ascends ``sum_k w~_k log p(x, z_k)`` in the model parameters, wake-phi ascends
    ``sum_k w~_k log q(z_k)`` in the guide parameters (an estimate of ``-KL(p(z|x) || q)``),
    with ``w~`` the normalised importance weights and the draws ``z_k`` detached. The reported
    value is the IWELBO estimate. ``path_gradient=True`` uses DReG for wake-phi.
    Sleep-phi is not implemented.
    """

    def __init__(self, *, num_particles: int = 8, path_gradient: bool = False, **options):
        super().__init__(num_particles=num_particles, **options)
        self.path_gradient = bool(path_gradient)

    def program(self, model, guide, *args, **kwargs):
        if self.path_gradient:  # DReG wake-phi, Tucker et al. (2019) eq. 8
            return self._dreg(model, guide, args, kwargs, "RWS", lambda w: w - w**2)
        with particles():
            with with_estimator(NoGrad(), force=True):
                trace, log_q = sim(guide, *args, **kwargs)
            log_p = density(model, trace, *args, **kwargs)
        log_w = log_p - log_q
        estimate = logmeanexp(log_w).detach()
        w = torch.softmax(log_w.detach(), 0)
        wake = (w * (log_p + log_q)).sum()  # theta via log p, phi via log q (draws detached)
        return estimate + (wake - wake.detach())


class Renyi(_ImportanceWeighted):
    """Renyi's alpha-divergence bound (Li & Turner 2016): ``1/(1-a) log mean_k w_k^(1-a)``.

    ``alpha=0`` is the IWELBO; ``alpha -> 1`` the ELBO (computed as ``mean_k log w_k``)."""

    def __init__(self, alpha: float = 0.0, *, num_particles: int = 8, **options):
        super().__init__(num_particles=num_particles, **options)
        self.alpha = float(alpha)

    def program(self, model, guide, *args, **kwargs):
        _, log_p, log_q = self.log_weights(model, guide, *args, **kwargs)
        log_w = log_p - log_q
        if abs(self.alpha - 1.0) < 1e-12:
            return log_w
        if self.alpha == 0.0:
            return logmeanexp(log_w)
        return logmeanexp((1.0 - self.alpha) * log_w) / (1.0 - self.alpha)


class CUBO(_ImportanceWeighted):
    r"""The chi upper bound (Dieng et al. 2017, "Variational inference via chi upper bound
    minimization", NeurIPS): ``CUBO_n = (1/n) log E_q[w^n]``, ``w = p(x, z) / q(z)``, ``n > 1``.

    **Value.** ``loss`` (and the value of ``differentiable_loss``) is the K-sample estimate
    ``(1/n) log mean_k w_k^n`` -- the bound users want to see (for the same draws it is >= the
    IWELBO >= ``mean_k log w_k``).

    **Gradient.** That value is *not* what is differentiated: its expectation is not an upper
    bound for finite K (``E log <= log E``) and it is unbounded below in the guide (a very wide
    q drives it to ``-inf``), so ascending minus it diverges. As Dieng et al. (sec. 3) do, the
    gradient is that of the exponentiated bound ``L = exp(n CUBO_n) = E_q[w^n]`` (exp is
    monotone: minimising L minimises CUBO_n), whose K-sample estimate ``mean_k w_k^n`` is
    unbiased. With ``s_k = exp(n (log w_k - c))`` (c a constant, below), ``-grad`` of the
    surrogate is an unbiased estimate of ``(1/n) exp(-n c) grad E_q[w^n]``, a positive multiple
    of ``grad L`` (about ``grad CUBO_n = grad L / (n L)`` when ``exp(n c)`` is close to L):

    * ``path_gradient=True`` (doubly reparameterised; needs Reparam at every latent site):
      since ``E_q[g(z) d log q / dphi] = E[dg/dz dz/dphi]`` for a fixed g, the guide gradient
      of ``E_q[w^n]`` is ``-n (n - 1) E[w^n  d log w / dz  dz / dphi]`` (partials of log w at
      stopped guide parameters; the same rewriting as DReG, Tucker et al. 2019, eq. 5-7), and
      the model gradient is ``n E[w^n d log p / dtheta]``. The surrogate's guide gradient is
      ``(n - 1) mean_k s_k d log w_k / dz_k dz_k / dphi`` and its model gradient
      ``-mean_k s_k d log p_k / dtheta``. Every draw then pushes q towards p (far-out draws of
      a too-wide q say "narrow"), where the plain pathwise form relies on rare draws near the
      posterior to say so -- which adaptive optimisers (Adam's normalisation, clipping) cannot
      weight correctly, so the plain form drifts to ever wider q in practice;
    * ``path_gradient=False``: the program returns the per-particle values
      ``F_k = -(1/n) s_k``; reparameterised draws get the pathwise gradient, score-function
      sites the DiCE terms with signal ``F_k`` and RLOO baselines ``mean_{j != k} F_j`` (valid:
      each ``F_k`` depends only on particle k's draw);
    * ``path_gradient=None`` (default): the first when every latent site is reparameterised,
      else the second.

    Minimising an upper bound in the *model* parameters lowers ``p(x)``; use CUBO for the guide
    (model parameters fixed or trained by another objective) unless that is what you want.

    **The constant c** (attribute ``shift``: a detached 0-dim tensor, ``None`` before the first
    call) is a running average of past CUBO estimates, ``c <- decay * c + (1 - decay) *
    (1/n) log mean_k w_k^n``, updated *after* the current batch has used the old value.
    Conditionally on the past it is independent of the current draws, so each step's gradient
    is unbiased for the positive multiple ``exp(-n c) / n`` of ``grad E_q[w^n]``. Two
    exceptions, both biased:

    * the first call (``shift is None``) sets c from its own batch: that one step is a
      self-normalised (ratio) estimator (O(1/K) bias). Set ``shift`` yourself (e.g.
      ``torch.tensor(0.)``) to avoid it; ``reset()`` when switching model or data;
    * overflow guard: if ``max_k n (log w_k - c) > max_exponent``, that step uses
      ``n c' = max_k n log w_k - max_exponent``: it points in the direction of the same
      per-batch estimate, shortened by ``exp(max_exponent - max_k n (log w_k - c)) < 1``, a
      factor that depends on the draws (so such steps down-weight extreme batches).
      ``num_rescaled`` counts them.

    Enumerate/MVD sites are not supported (the objective is not linear in log w).
    """

    def __init__(self, n: float = 2.0, *, num_particles: int = 8,
                 path_gradient: bool | None = None, decay: float = 0.9,
                 max_exponent: float = 20.0, **options):
        if n <= 1:
            raise ValueError(f"CUBO: n must be > 1, got {n}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"CUBO: decay must be in [0, 1), got {decay}")
        if not 0.0 < max_exponent <= 80.0:
            raise ValueError(f"CUBO: max_exponent must be in (0, 80], got {max_exponent}")
        if path_gradient not in (None, True, False):
            raise TypeError(f"CUBO: path_gradient must be None, True or False, got "
                            f"{path_gradient!r}")
        super().__init__(num_particles=num_particles, **options)
        self.n = float(n)
        self.path_gradient = path_gradient
        self.decay = float(decay)
        self.max_exponent = float(max_exponent)
        self.shift: torch.Tensor | None = None
        self.num_rescaled = 0

    def reset(self) -> None:
        """Forget the running constant ``shift`` (the next call re-initialises it)."""
        self.shift = None

    def _log_scale(self, n_log_w: torch.Tensor) -> torch.Tensor:
        """``n c`` for this step (detached), then the update of c; records the batch's
        estimate (minus its CUBO value) on the run."""
        # logmeanexp (not the bare helper): it refuses Enumerate/MVD sites
        log_mean = logmeanexp(n_log_w).detach()  # n * (this batch's CUBO estimate)
        if self.shift is None:
            old = log_mean  # first call only: the batch's own value (see the docstring)
        else:
            old = self.n * self.shift.to(device=log_mean.device, dtype=log_mean.dtype)
        excess = n_log_w.detach().max() - old - self.max_exponent
        if excess > 0:  # overflow guard (a biased, counted exception; see the docstring)
            self.num_rescaled += 1
            n_c = old + excess
        else:
            n_c = old
        # c is updated only now: this step used a constant independent of its own draws
        self.shift = (self.decay * old + (1.0 - self.decay) * log_mean) / self.n
        current_run().cubo_estimate = -log_mean / self.n
        return n_c

    def program(self, model, guide, *args, **kwargs):
        with particles():
            trace, log_q = sim(guide, *args, **kwargs)
            if self.path_gradient is None:
                reparam = all(
                    s.get("estimator_draw") is None
                    or (s["estimator_draw"].score is None and s["estimator_draw"].alt is None)
                    for s in trace.nodes.values())
                path = reparam
            else:
                path = self.path_gradient
            if not path:
                log_p = density(model, trace, *args, **kwargs)
        if not path:
            n_log_w = self.n * (log_p - log_q)
            return -torch.exp(n_log_w - self._log_scale(n_log_w)) / self.n
        _check_all_reparam(trace, "CUBO(path_gradient=True)")
        log_p, log_w, pairs = _leaf_log_weights(model, guide, trace, args, kwargs)
        n_log_w = self.n * log_w.detach()
        s = torch.exp(n_log_w - self._log_scale(n_log_w))
        estimate = current_run().cubo_estimate
        if not torch.is_grad_enabled():
            return estimate
        k = s.shape[0]
        theta = -(s * log_p).sum() / k
        return (estimate + (theta - theta.detach())
                + _path_term(log_w, (self.n - 1.0) * s / k, pairs))

    def _assemble(self, run, value):
        surrogate, _, run = super()._assemble(run, value)
        # report the bound; the gradient stays that of the surrogate built by the program
        estimate = run.cubo_estimate
        return surrogate + (estimate - surrogate).detach(), estimate, run


# ---------------------------------------------------------------------------------------------
# Hierarchical guides: marginal(), HVI, IWHVI, DIWHVI
# ---------------------------------------------------------------------------------------------


def _site_total(trace: Trace, names, run, extra_dims: int) -> torch.Tensor:
    """Sum of the scaled/masked log-probs of ``names`` with the model's plate dims summed;
    keeps the inner-sample dim (``extra_dims=1``) and the particle dim: ``(M, K)``, ``(K,)``,
    ``(M,)`` or ``()``."""
    from pyro.distributions.util import scale_and_mask

    n_plate = run.max_plate_nesting
    keep = extra_dims + (1 if run.particle_dim is not None else 0)
    total = 0.0
    for name in names:
        site = trace.nodes[name]
        t = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
        if n_plate:
            t = t.flatten(t.dim() - n_plate).sum(-1) if t.dim() >= n_plate else t.sum()
        while t.dim() < keep:
            t = t.unsqueeze(0)
        if t.dim() > keep:
            t = t.reshape(t.shape[t.dim() - keep:])
        total = total + t
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
    from .program import _Frame

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
                  and not s["is_observed"] and type(s["fn"]).__name__ != "_Subsample"]
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
        off = _Frame("off")
        run.frames.append(off)
        try:
            # the draw psi_0 that produced z is always one of the inner samples: this keeps the
            # estimate an upper bound of log q(z) in expectation (Sobolev & Vetrov 2019, thm. 1)
            if proposal is not None:
                tr0 = pyro.poutine.trace(pyro.poutine.condition(proposal, data=psi0)).get_trace(
                    z, *args, **kwargs)
                log_r0 = _site_total(tr0, aux, run, 0)
            else:
                log_r0 = _site_total(inner, aux, run, 0)
            terms = [(log_joint - log_r0).unsqueeze(0)]
            if num_particles:
                with pyro.plate("marginal_particles", num_particles, dim=inner_dim):
                    if proposal is not None:
                        tr_r = pyro.poutine.trace(proposal).get_trace(z, *args, **kwargs)
                        _check_inner_reparam(tr_r, aux)
                        psi = {n: tr_r.nodes[n]["value"] for n in aux}
                        log_r = _site_total(tr_r, aux, run, 1)
                        tr_q = pyro.poutine.trace(
                            pyro.poutine.condition(guide, data={**psi, **z})
                        ).get_trace(*args, **kwargs)
                        terms.append(_site_total(tr_q, latent, run, 1) - log_r)
                    else:
                        # r = the guide's own distribution of the auxiliary sites: q(z | psi_m)
                        tr_q = pyro.poutine.trace(
                            pyro.poutine.condition(guide, data=z)
                        ).get_trace(*args, **kwargs)
                        _check_inner_reparam(tr_q, aux)
                        terms.append(_site_total(tr_q, keep, run, 1))
            log_terms = torch.cat([t.expand((t.shape[0],) + log_joint.shape) for t in terms], 0)
            log_q = _logmeanexp(log_terms, 0)
        finally:
            run.frames.pop()
        outer.total = outer.total + log_q
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


class DIWHVI(_ImportanceWeighted):
    """Doubly importance-weighted HVI (Sobolev & Vetrov 2019, sec. 4): an IWELBO over
    ``num_particles`` outer samples with each log q(z_k) estimated from ``num_inner`` inner
    samples."""

    def __init__(self, keep, proposal: Callable | None = None, num_inner: int = 10, *,
                 num_particles: int = 8, **options):
        super().__init__(num_particles=num_particles, **options)
        self.keep, self.proposal, self.num_inner = tuple(keep), proposal, num_inner

    def program(self, model, guide, *args, **kwargs):
        mg = _marginal_guide(guide, self.keep, self.proposal, self.num_inner)
        _, log_p, log_q = self.log_weights(model, mg, *args, **kwargs)
        return logmeanexp(log_p - log_q)
