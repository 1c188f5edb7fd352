"""Per-site gradient estimators: how a guide sample site is drawn and how its gradient flows.

The estimator protocol
----------------------
An estimator is consulted by :func:`vi_estimators.sim` at every latent sample site of the guide
(chosen per site with ``pyro.sample(name, d, infer={"estimator": est})``, or objective-wide with
``objective(..., estimator=est)``; see :func:`default_estimator` for the default). It implements
one method::

    def draw(self, name: str, fn: Distribution, ctx: SiteContext) -> SiteDraw

``fn`` is the site's distribution *after* all plates (including the particle plate) have
broadcast it. The returned :class:`SiteDraw` tells the core:

* ``value`` -- the site's value. Autograd through ``value`` is the *pathwise* part of the gradient
  (a reparameterised draw keeps its graph; a score-function draw is detached).
* ``score`` -- optional tensor with (a shape broadcastable to) ``fn.batch_shape``: a log-density
  whose gradient multiplies the downstream signal. The core adds, per plate element ``e`` of the
  site (particles included), the DiCE-style term

      (signal_e - baseline_e).detach() * (score_e - score_e.detach())

  to the surrogate (value 0, gradient ``(signal_e - b_e) * grad score_e``); batch dims outside
  the site's plates are summed first. The signal of an element is Rao-Blackwellised by plates or
  by the dependency graph (:mod:`vi_estimators.core`). Reinforce returns ``log q(value)`` (the same
  tensor as its ``log_prob``: objectives linear in log q then drop that log q's zero-mean explicit
  gradient, as ``Trace_ELBO`` does); RSVI returns ``log pi(eps; theta)`` of the accepted proposal
  noise (its g_cor term).
* ``baseline`` -- the :class:`~vi_estimators.baselines.Baseline` for that score term, ``"auto"``
  (RLOO when the objective has K > 1 particles, a moving average when K = 1) or ``None`` (none).
* ``log_prob`` -- optional precomputed, *unscaled* ``fn.log_prob(value)`` (saves a second
  evaluation when the estimator needed it anyway). Must be graph-connected to the parameters.
* ``alt`` -- optional :class:`Alternatives`: the value tensor carries a new batch dim (allocated
  with ``ctx.new_alt_dim()``) holding alternative values of the site. The core evaluates every
  term of log p and log q that depends on the site at each alternative (vectorised: the rest of the
  program runs once, broadcast over that dim) and contracts the dim, either as an exact expectation
  (``mode="expect"``, weights ``q(v)``; :class:`Enumerate`) or as primary-value-plus-gradient
  (``mode="grad"``: value of alternative 0 plus ``sum_a coef_a * term_a.detach()`` where ``coef_a``
  has value 0 and carries the measure-valued derivative; :class:`MVD`).

``ctx`` (a :class:`SiteContext`) exposes ``num_particles`` (K of the active particle plate, 1 if
none), ``particle_dim`` (its dim or ``None``) and ``new_alt_dim()``.

Scope of alternative-value estimators: the contraction is done term by term on the log-densities
returned by ``sim``/``density``, so it is exact for objectives *linear* in log p and log q (the
ELBO family, per particle or averaged), including local sites inside plates. Non-linear uses
(``logmeanexp`` over particles: IWELBO, VIMCO, Renyi, CUBO) raise an error when such sites exist.
Score-function sites *downstream* of an Enumerate/MVD site are not supported (error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.distributions import (
    Bernoulli,
    Categorical,
    Independent,
    MultivariateNormal,
    Normal,
    OneHotCategorical,
)

from .baselines import Baseline, as_baseline

__all__ = [
    "MVD",
    "Alternatives",
    "Enumerate",
    "Estimator",
    "NoGrad",
    "Reinforce",
    "Reparam",
    "SiteContext",
    "SiteDraw",
    "base_and_reinterpreted",
    "default_estimator",
]


class SiteContext(Protocol):
    """What an estimator may ask the core about the current run."""

    num_particles: int
    particle_dim: int | None

    def new_alt_dim(self) -> int:
        """Allocate a fresh batch dim (left of the particle and plate dims) for alternatives."""
        ...


@dataclass
class Alternatives:
    """A batch dim of alternative values of a site (see the module docstring).

    ``dim``: the (negative) batch dim; ``mode``: ``"expect"`` (``weights`` are probabilities
    q(v), graph-connected, summing to one over ``dim``) or ``"grad"`` (alternative 0 is the
    primary draw; ``weights`` are zero-valued coefficients whose gradient is the derivative).
    ``weights`` broadcast against the site's log-prob shape (alt dim included).
    """

    dim: int
    mode: str
    weights: torch.Tensor
    site: str = ""


@dataclass
class SiteDraw:
    """What an estimator returns for one site (see the module docstring)."""

    value: torch.Tensor
    score: torch.Tensor | None = None
    baseline: Any = "auto"
    log_prob: torch.Tensor | None = None
    alt: Alternatives | None = None


class Estimator:
    """Base class of per-site estimators. Subclasses implement :meth:`draw`."""

    def draw(self, name: str, fn: torch.distributions.Distribution, ctx: SiteContext) -> SiteDraw:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Reparam(Estimator):
    """Pathwise (reparameterisation) gradient: ``value = fn.rsample()``; no score term."""

    def draw(self, name, fn, ctx):
        if not fn.has_rsample:
            raise ValueError(
                f"Reparam at site {name!r}: {type(fn).__name__} has no rsample (not "
                "reparameterisable); use Reinforce(), MVD(), Enumerate() (finite support) or "
                "RSVI() (Gamma/Beta/Dirichlet) for this site"
            )
        return SiteDraw(fn.rsample())


class NoGrad(Estimator):
    """A detached draw with no score term: no gradient flows through the site's sampling.

    Used by objectives that are not expectations under the guide (RWS wake phases)."""

    def draw(self, name, fn, ctx):
        return SiteDraw(fn.sample())


class Reinforce(Estimator):
    """Score-function (REINFORCE / likelihood-ratio) gradient with a baseline.

    ``value`` is a detached draw; ``score = log q(value)``. ``baseline`` is a
    :class:`~vi_estimators.baselines.Baseline`, a number (constant baseline), ``"auto"`` (RLOO
    when K > 1, a moving average otherwise) or ``None``.
    """

    def __init__(self, baseline: Baseline | float | str | None = "auto"):
        self.baseline = as_baseline(baseline)

    def draw(self, name, fn, ctx):
        value = fn.sample()
        log_prob = fn.log_prob(value)
        return SiteDraw(value, score=log_prob, baseline=self.baseline, log_prob=log_prob)

    def __repr__(self) -> str:
        return f"Reinforce(baseline={self.baseline!r})"


def base_and_reinterpreted(fn):
    """``(base, n)``: the distribution inside Pyro's ``Independent``/expand/mask wrappers and the
    number of batch dims the ``Independent`` layers reinterpret as event dims."""
    n = 0
    while isinstance(fn, Independent) or type(fn).__name__ in (
        "MaskedDistribution",
        "ExpandedDistribution",
    ):
        if isinstance(fn, Independent):
            n += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, n


def _to_alt(x: torch.Tensor, dim: int, event_ndim: int) -> torch.Tensor:
    """Reshape ``(A, *rest)`` so that A sits at batch dim ``dim`` (rest right-aligned)."""
    a = x.shape[0]
    rest = x.shape[1:]
    batch_rest = len(rest) - event_ndim
    pad = -dim - 1 - batch_rest
    if pad < 0:
        raise ValueError(f"cannot place alternatives at dim {dim}: value has too many batch dims")
    return x.reshape((a,) + (1,) * pad + tuple(rest))


class Enumerate(Estimator):
    """Exact expectation over a finite-support site, vectorised on a new batch dim.

    ``value`` holds every support value on a fresh dim; each log-density term depending on the
    site is contracted with the weights ``q(v)`` (see the module docstring for the scope).
    """

    def draw(self, name, fn, ctx):
        if not getattr(fn, "has_enumerate_support", False):
            raise ValueError(
                f"Enumerate at site {name!r}: {type(fn).__name__} has no finite support "
                "(has_enumerate_support is False); use Reparam(), Reinforce() or MVD()"
            )
        dim = ctx.new_alt_dim()
        support = fn.enumerate_support(expand=False)
        event_ndim = len(fn.event_shape)
        value = _to_alt(support.reshape((support.shape[0],) + support.shape[-event_ndim:] if
                                        event_ndim else (support.shape[0],)), dim, event_ndim)
        log_prob = fn.log_prob(value)
        return SiteDraw(value, log_prob=log_prob, alt=Alternatives(dim, "expect", log_prob.exp(),
                                                                    name))


class MVD(Estimator):
    """Measure-valued derivative (weak derivative) estimator.

    * Finite support (Bernoulli, Categorical, OneHotCategorical, ...): the primary value is a draw;
      the gradient is ``sum_v grad q(v) * f(v)`` with the continuation ``f`` evaluated at every
      support value ``v`` (vectorised). For Bernoulli this is ``grad p * (f(1) - f(0))``.
    * univariate Normal (event_dim 0; use plates for independent coordinates), with
      ``x = mu + sigma eps``:

          d/dmu    E f(x) = 1/(sigma sqrt(2 pi)) * (E f(mu + sigma W) - E f(mu - sigma W)),
          d/dsigma E f(x) = 1/sigma * (E f(mu + sigma M) - E f(mu + sigma eps)),

      with ``W ~ Rayleigh(1)`` (density ``w exp(-w^2/2)``: ``eps phi(eps)`` on ``eps > 0``
      normalised by ``1/sqrt(2 pi)``) and ``M`` double-sided Maxwell (density ``m^2 phi(m)``, the
      positive part of ``(eps^2 - 1) phi(eps)``; its negative part is ``phi``). The primary draw
      is detached and reused as the ``E f(mu + sigma eps)`` sample.

    * MultivariateNormal and ``Independent`` Normal (event_dim 1), ``x = mu + L eps``: the loc
      derivative is MVD per white-noise coordinate, ``d/dmu E f = L^{-T} g`` with
      ``g_i = 1/sqrt(2 pi) (E f(eps_i -> +W) - E f(eps_i -> -W))`` (2d alternatives, one
      coordinate of ``eps`` replaced by +-W); the scale part stays pathwise (``x`` keeps its graph
      through ``L`` but not through ``mu``).

    Alternatives run on a new batch dim (``mode="grad"``); see the module docstring for scope.
    """

    def draw(self, name, fn, ctx):
        if isinstance(fn, MultivariateNormal):
            return self._multivariate(name, fn, ctx)
        base, _ = base_and_reinterpreted(fn)
        if isinstance(base, Normal) and not isinstance(
            fn, torch.distributions.TransformedDistribution
        ):
            return self._normal(name, fn, base, ctx)
        if getattr(fn, "has_enumerate_support", False) and isinstance(
            base, (Bernoulli, Categorical, OneHotCategorical)
        ):
            return self._finite(name, fn, ctx)
        raise ValueError(
            f"MVD at site {name!r}: {type(base).__name__} is not supported; supported: Bernoulli, "
            "Categorical, OneHotCategorical (finite support) and Normal (loc and scale)"
        )

    def _finite(self, name, fn, ctx):
        dim = ctx.new_alt_dim()
        x0 = fn.sample()
        support = fn.enumerate_support(expand=True)  # (V, *batch, *event)
        event_ndim = len(fn.event_shape)
        values = torch.cat([x0.unsqueeze(0), support], 0)
        value = _to_alt(values, dim, event_ndim)
        log_prob = fn.log_prob(value)
        q = log_prob.exp()
        coef = q - q.detach()
        # alternative 0 (the draw) gets no gradient coefficient
        rest = coef.narrow(dim, 1, coef.size(dim) - 1)
        coef = torch.cat([torch.zeros_like(coef.narrow(dim, 0, 1)), rest], dim)
        return SiteDraw(value, log_prob=log_prob, alt=Alternatives(dim, "grad", coef, name))

    def _multivariate(self, name, fn, ctx):
        """Loc MVD per white-noise coordinate; pathwise for the scale (see class docstring)."""
        if isinstance(fn, MultivariateNormal):
            loc, tril = fn.loc, fn.scale_tril
            diag = None
        else:
            base, _ = base_and_reinterpreted(fn)
            if len(fn.event_shape) != 1:
                raise ValueError(
                    f"MVD at site {name!r}: Normal sites need event_dim 0 or 1, got "
                    f"{len(fn.event_shape)}"
                )
            shape = fn.batch_shape + fn.event_shape
            loc, diag = base.loc.expand(shape), base.scale.expand(shape)
        shape = fn.batch_shape + fn.event_shape
        d = shape[-1]
        opts = {"dtype": loc.dtype, "device": loc.device}
        loc = loc.expand(shape)
        with torch.no_grad():
            eps = torch.randn(shape, **opts)
            w = torch.sqrt(-2.0 * torch.log1p(-torch.rand(shape, **opts)))  # Rayleigh(1)
            noise = eps.unsqueeze(0).repeat((2 * d + 1,) + (1,) * len(shape))
            idx = torch.arange(d, device=loc.device)
            noise[1 + idx, ..., idx] = w.movedim(-1, 0)
            noise[1 + d + idx, ..., idx] = -w.movedim(-1, 0)
        if diag is None:
            values = loc.detach() + (tril @ noise.unsqueeze(-1)).squeeze(-1)
            u = torch.linalg.solve_triangular(
                tril.detach().expand(shape + (d,)), (loc - loc.detach()).unsqueeze(-1), upper=False
            ).squeeze(-1)
        else:
            values = loc.detach() + diag * noise
            u = (loc - loc.detach()) / diag.detach()
        u = u / math.sqrt(2 * math.pi)  # (*batch, d)
        u = u.movedim(-1, 0)  # (d, *batch)
        coef = torch.cat([torch.zeros_like(u[:1]), u, -u], 0)  # (2d + 1, *batch)
        dim = ctx.new_alt_dim()
        value = _to_alt(values, dim, 1)
        return SiteDraw(value, alt=Alternatives(dim, "grad", _to_alt(coef, dim, 0), name))

    def _normal(self, name, fn, base, ctx):
        if len(fn.event_shape):
            return self._multivariate(name, fn, ctx)
        dim = ctx.new_alt_dim()
        shape = fn.batch_shape + fn.event_shape
        loc = base.loc.expand(base.batch_shape)
        scale = base.scale.expand(base.batch_shape)
        # bring base params to the full (batch + event) shape of fn
        loc = loc.expand(shape) if loc.shape != shape else loc
        scale = scale.expand(shape) if scale.shape != shape else scale
        opts = {"dtype": loc.dtype, "device": loc.device}
        with torch.no_grad():
            eps = torch.randn(shape, **opts)
            w = torch.sqrt(-2.0 * torch.log1p(-torch.rand(shape, **opts)))  # Rayleigh(1)
            # double-sided Maxwell: +-sqrt(chi^2_3), chi^2_3 = Gamma(3/2, rate 1/2)
            chi2 = 2.0 * torch._standard_gamma(torch.full(shape, 1.5, **opts))
            sign = torch.where(torch.rand(shape, **opts) < 0.5, -1.0, 1.0).to(loc.dtype)
            m = sign * chi2.sqrt()
            mu, sd = loc.detach(), scale.detach()
            values = torch.stack([mu + sd * eps, mu + sd * w, mu - sd * w, mu + sd * m])
        value = _to_alt(values, dim, 0)
        c_mu = (loc - loc.detach()) / (sd * math.sqrt(2 * math.pi))
        c_sd = (scale - scale.detach()) / sd
        coef = torch.stack([-c_sd, c_mu, -c_mu, c_sd])
        coef = _to_alt(coef, dim, 0)
        return SiteDraw(value, alt=Alternatives(dim, "grad", coef, name))


def default_estimator(fn: torch.distributions.Distribution) -> Estimator:
    """``Reparam()`` where ``fn.has_rsample``, else ``Reinforce()`` (auto baseline: RLOO over
    particles when K > 1, a decaying moving average when K = 1)."""
    return _REPARAM if fn.has_rsample else _REINFORCE


_REPARAM = Reparam()
_REINFORCE = Reinforce()
