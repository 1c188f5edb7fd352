"""Shipped objectives, each written as a short program with the constructs of ``program.py``.

Every class takes the keyword options of :class:`~vi_estimators.program.Objective` (Pyro's
``ELBO`` arguments plus ``estimator=`` and ``rao_blackwellize=``) and has ``loss``, ``loss_and_grads`` and
``differentiable_loss``. ``num_particles`` is the number of independent ELBO estimates averaged
(``ELBO``) or the number of importance samples K inside the bound (the others, which require
``vectorize_particles=True``, their default).

Path gradients (``path_gradient=True``) come from :mod:`vi_estimators.path` (log q with the
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

import torch

from .baselines import RLOO
from .core import current_run
from .estimators import NoGrad, Reinforce
from .path import (
    check_reparameterized,
    dreg_surrogate,
    leaf_log_weights,
    path_term,
    stopped_log_prob,
)
from .program import Objective, density, logmeanexp, particles, sim, with_estimator
from .state import CarriesState, note

__all__ = ["CUBO", "ELBO", "IWELBO", "RWS", "VIMCO", "ImportanceWeighted", "Renyi"]


class ELBO(Objective):
    """The evidence lower bound ``E_q[log p(x, z) - log q(z)]``; a drop-in for ``Trace_ELBO``.

    Program::

        with particles():
            trace, log_q = sim(guide, *args, **kwargs)
            log_p = density(model, trace, *args, **kwargs)
        return log_p - log_q          # per particle; the estimate is the mean

    Score-function sites get ``Trace_ELBO``'s plate-wise Rao-Blackwellised signals by default
    (``rao_blackwellize="plate"``: each plate element's score multiplies only the cost terms that
    share its plate elements, plus the global ones), ``TraceGraph_ELBO``'s dependency-graph ones
    with ``rao_blackwellize="graph"``; see :mod:`vi_estimators.core`. With the default baseline
    ``"auto"`` they add leave-one-out baselines over particles (looped or vectorised), or a
    moving average per plate element for a single particle.

    ``path_gradient=True``: sticking the landing (``log_q`` at stopped guide parameters).
    """

    linear_in_log_q = True

    def __init__(self, *, path_gradient: bool = False, **options):
        super().__init__(**options)
        self.path_gradient = bool(path_gradient)

    def program(self, model, guide, *args, **kwargs):
        with particles():
            trace, log_q = sim(guide, *args, **kwargs)
            if self.path_gradient:
                log_q = stopped_log_prob(guide, trace, *args, **kwargs)
            log_p = density(model, trace, *args, **kwargs)
        return log_p - log_q


class ImportanceWeighted(Objective):
    """Base of the objectives that combine K vectorised particles inside a bound (IWELBO, RWS,
    Renyi, CUBO, DIWHVI): ``num_particles`` is K, ``vectorize_particles=True`` is required."""

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



class IWELBO(ImportanceWeighted):
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
            return dreg_surrogate(model, guide, args, kwargs, "IWELBO", lambda w: w**2)
        _, log_p, log_q = self.log_weights(model, guide, *args, **kwargs)
        return logmeanexp(log_p - log_q)


class VIMCO(IWELBO):
    """IWELBO with score-function gradients and VIMCO's leave-one-out baselines (Mnih & Rezende
    2016): the default estimator of every site is ``Reinforce(RLOO())``."""

    def __init__(self, *, num_particles: int = 8, estimator=None, **options):
        super().__init__(num_particles=num_particles,
                         estimator=estimator if estimator is not None else Reinforce(RLOO()),
                         **options)


class RWS(ImportanceWeighted):
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
            return dreg_surrogate(model, guide, args, kwargs, "RWS", lambda w: w - w**2)
        with particles():
            with with_estimator(NoGrad(), force=True):
                trace, log_q = sim(guide, *args, **kwargs)
            log_p = density(model, trace, *args, **kwargs)
        log_w = log_p - log_q
        estimate = logmeanexp(log_w).detach()
        w = torch.softmax(log_w.detach(), 0)
        wake = (w * (log_p + log_q)).sum()  # theta via log p, phi via log q (draws detached)
        return estimate + (wake - wake.detach())


class Renyi(ImportanceWeighted):
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


class CUBO(ImportanceWeighted, CarriesState):
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
      each ``F_k`` depends only on particle k's draw). ``F_k`` is not ``log_p - log_q``, so its
      signals are not decomposed by plates (``rao_blackwellize=None`` is the default here);
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
        options.setdefault("rao_blackwellize", None)
        super().__init__(num_particles=num_particles, **options)
        self.n = float(n)
        self.path_gradient = path_gradient
        self.decay = float(decay)
        self.max_exponent = float(max_exponent)
        self.shift: torch.Tensor | None = None
        self._rescaled: torch.Tensor | None = None  # count of rescaled steps (no host sync)

    @property
    def num_rescaled(self) -> int:
        """Number of steps the overflow guard rescaled (see the docstring)."""
        return 0 if self._rescaled is None else int(self._rescaled)

    def get_state(self) -> dict[str, torch.Tensor]:
        state = {}
        if self.shift is not None:
            state["shift"] = self.shift
        if self._rescaled is not None:
            state["rescaled"] = self._rescaled
        return state

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.shift = state.get("shift")
        self._rescaled = state.get("rescaled")

    def reset(self) -> None:
        """Forget the running constant ``shift`` (the next call re-initialises it)."""
        self.shift = None

    def _log_scale(self, n_log_w: torch.Tensor) -> torch.Tensor:
        """``n c`` for this step (detached), then the update of c; reports the batch's CUBO
        estimate as the run's value (``Run.reported``)."""
        note(self)
        # logmeanexp (not the bare helper): it refuses Enumerate/MVD sites
        log_mean = logmeanexp(n_log_w).detach()  # n * (this batch's CUBO estimate)
        if self.shift is None:
            old = log_mean  # first call only: the batch's own value (see the docstring)
        else:
            old = self.n * self.shift.to(device=log_mean.device, dtype=log_mean.dtype)
        # overflow guard (a biased, counted exception; see the docstring), without a branch on
        # the value so that the step can be captured
        excess = (n_log_w.detach().max() - old - self.max_exponent).clamp_min(0.0)
        n_c = old + excess
        rescaled = (excess > 0).long()
        self._rescaled = rescaled if self._rescaled is None else self._rescaled + rescaled
        # c is updated only now: this step used a constant independent of its own draws
        self.shift = (self.decay * old + (1.0 - self.decay) * log_mean) / self.n
        current_run().reported = -log_mean / self.n
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
        check_reparameterized(trace, "CUBO(path_gradient=True)")
        log_p, log_w, pairs = leaf_log_weights(model, guide, trace, args, kwargs)
        n_log_w = self.n * log_w.detach()
        s = torch.exp(n_log_w - self._log_scale(n_log_w))
        estimate = current_run().reported
        if not torch.is_grad_enabled():
            return estimate
        k = s.shape[0]
        theta = -(s * log_p).sum() / k
        return (estimate + (theta - theta.detach())
                + path_term(log_w, (self.n - 1.0) * s / k, pairs))
