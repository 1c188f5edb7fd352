"""RSVI: reparameterisation gradients through acceptance-rejection (Naesseth et al., AISTATS 2017).

Math (Naesseth et al. 2017, sec. 3-5). The Marsaglia-Tsang sampler for ``Gamma(alpha, 1)``
proposes ``z = h(eps, alpha) = (alpha - 1/3) (1 + eps / sqrt(9 alpha - 3))^3`` with
``eps ~ N(0, 1)`` and accepts so that accepted ``z`` is exactly Gamma-distributed. The *accepted*
``eps`` therefore has the change-of-variables density (eq. 6)

    pi(eps; alpha) = Gamma(h(eps, alpha); alpha, 1) * |dh/deps(eps, alpha)|,

and for any cost ``f`` (eq. 7-8)

    grad_alpha E_q[f(z)] = E_pi[ f'(h) dh/dalpha ]            (g_rep)
                         + E_pi[ f(h) d/dalpha log pi(eps; alpha) ]   (g_cor).

No rejection loop is needed on the hot path: the accepted ``eps`` is recovered from *any* exact
Gamma draw by inverting ``h`` (``eps = sqrt(9 alpha - 3) ((z / (alpha - 1/3))^(1/3) - 1)``).
This is a change of variables, valid for every ``alpha > 1/3``.

Shape augmentation (sec. 5, "boost" B >= 0): for ``u_i ~ U(0, 1)`` independent,

    z = z_{alpha + B} * prod_{i<B} u_i^{1/(alpha + i)} ~ Gamma(alpha, 1)   if z_{alpha+B} ~ Gamma(alpha+B),

so the rejection step runs at shape ``alpha + B`` (where g_cor is small) and the ``u_i`` factors
are reparameterised. The rate is a plain scale: ``Gamma(alpha, beta) = Gamma(alpha, 1) / beta``.
Beta and Dirichlet are normalised Gammas: ``X / (X + Y)`` and ``z / sum(z)`` (computed in log
space, so tiny Gammas do not underflow to 0/0).

A :class:`RSVI` estimator wiring this into the programmable core lives at the bottom of this
module; the pure functions above it have no Pyro dependency.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Beta, Dirichlet, Gamma

from .baselines import as_baseline, loo_mean
from .estimators import Estimator, SiteDraw, base_and_reinterpreted
from .state import capturing

__all__ = [
    "RSVI",
    "RSVI_SUPPORTED",
    "mt_eps_from_gamma",
    "mt_log_accept_density",
    "mt_proposal",
    "rsvi_beta",
    "rsvi_dirichlet",
    "rsvi_gamma",
    "rsvi_sample",
    "rsvi_surrogate",
]

RSVI_SUPPORTED = ("Gamma", "Beta", "Dirichlet")


def _check_boost(boost: int) -> int:
    if isinstance(boost, bool) or not isinstance(boost, int) or boost < 0:
        raise ValueError(f"RSVI: boost must be an integer >= 0, got {boost!r}")
    return boost


def _check_alpha(alpha: torch.Tensor, what: str = "concentration + boost") -> None:
    if not capturing() and bool((alpha <= 1.0 / 3.0).any()):
        raise ValueError(
            f"RSVI: {what} must exceed 1/3 for the Marsaglia-Tsang proposal "
            f"(min is {alpha.min().item():.4g}); use a larger boost (B >= 1 for shapes < 1)"
        )


def mt_proposal(eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Marsaglia-Tsang proposal ``h(eps, alpha) = (alpha - 1/3)(1 + eps / sqrt(9 alpha - 3))^3``."""
    d = alpha - 1.0 / 3.0
    return d * (1.0 + eps / torch.sqrt(9.0 * alpha - 3.0)) ** 3


def _log_mt_proposal(eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    d = alpha - 1.0 / 3.0
    return torch.log(d) + 3.0 * torch.log1p(eps / torch.sqrt(9.0 * alpha - 3.0))


def mt_eps_from_gamma(z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Invert the proposal: the accepted ``eps`` that yields the Gamma(alpha, 1) draw ``z``."""
    d = alpha - 1.0 / 3.0
    return torch.sqrt(9.0 * alpha - 3.0) * ((z / d) ** (1.0 / 3.0) - 1.0)


def mt_log_accept_density(eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``log pi(eps; alpha) = log Gamma(h(eps, alpha); alpha, 1) + log |dh/deps|`` (eq. 6).

    Written with ``log h`` so that it stays finite where ``h`` is tiny. Differentiable in
    ``alpha`` (its alpha-score is the g_cor weight) and in ``eps``.
    """
    c = torch.rsqrt(9.0 * alpha - 3.0)
    d = alpha - 1.0 / 3.0
    log1p_ce = torch.log1p(c * eps)
    log_h = torch.log(d) + 3.0 * log1p_ce
    # Gamma(h; alpha, 1) density: (alpha - 1) log h - h - lgamma(alpha)
    log_gamma = (alpha - 1.0) * log_h - torch.exp(log_h) - torch.lgamma(alpha)
    # dh/deps = 3 d c (1 + c eps)^2
    log_jac = math.log(3.0) + torch.log(d) + torch.log(c) + 2.0 * log1p_ce
    return log_gamma + log_jac


def rsvi_gamma(
    concentration: torch.Tensor,
    rate: torch.Tensor | None = None,
    boost: int = 1,
    sample_shape: tuple = (),
    log_space: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One RSVI draw from ``Gamma(concentration, rate)`` (elementwise).

    Returns ``(z, log_pi)``: ``z`` is differentiable in both parameters (the g_rep path, through
    ``h`` and the boost factors, with ``eps`` and ``u`` held fixed) and ``log_pi`` is
    ``log pi(eps; concentration + boost)`` per element, differentiable in ``concentration`` — its
    score times the cost is g_cor. With ``log_space=True`` the first output is ``log z``.
    """
    boost = _check_boost(boost)
    alpha = concentration + boost
    _check_alpha(alpha.detach())
    shape = torch.Size(sample_shape) + concentration.shape
    # An exact Gamma(alpha) draw, then the accepted eps that produced it (no rejection loop).
    with torch.no_grad():
        alpha_s = alpha.detach().expand(shape)
        z_tilde = torch._standard_gamma(alpha_s)
        eps = mt_eps_from_gamma(z_tilde, alpha_s)
    log_z = _log_mt_proposal(eps, alpha)
    if boost:
        u = torch.rand(shape + (boost,), dtype=concentration.dtype, device=concentration.device)
        i = torch.arange(boost, dtype=concentration.dtype, device=concentration.device)
        log_z = log_z + (torch.log(u) / (concentration.unsqueeze(-1) + i)).sum(-1)
    if rate is not None:
        log_z = log_z - torch.log(rate)
    log_pi = mt_log_accept_density(eps, alpha)
    return (log_z if log_space else torch.exp(log_z)), log_pi


def rsvi_beta(
    concentration1: torch.Tensor,
    concentration0: torch.Tensor,
    boost: int = 1,
    sample_shape: tuple = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """RSVI draw from ``Beta(c1, c0) = X / (X + Y)``, ``X ~ Gamma(c1)``, ``Y ~ Gamma(c0)``.

    Returns ``(x, log_pi)`` with ``log_pi`` the sum of both Gammas' accepted-eps log-densities.
    """
    c1, c0 = torch.broadcast_tensors(concentration1, concentration0)
    log_x, lp1 = rsvi_gamma(c1, None, boost, sample_shape, log_space=True)
    log_y, lp0 = rsvi_gamma(c0, None, boost, sample_shape, log_space=True)
    x = torch.sigmoid(log_x - log_y)
    return x, lp1 + lp0


def rsvi_dirichlet(
    concentration: torch.Tensor,
    boost: int = 1,
    sample_shape: tuple = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """RSVI draw from ``Dirichlet(concentration)`` as normalised Gammas (softmax of log Gammas).

    Returns ``(x, log_pi)``; ``log_pi`` is summed over the event dim (shape = batch shape).
    """
    log_z, lp = rsvi_gamma(concentration, None, boost, sample_shape, log_space=True)
    return torch.softmax(log_z, dim=-1), lp.sum(-1)


def rsvi_sample(
    fn: torch.distributions.Distribution,
    boost: int = 1,
    sample_shape: tuple = (),
    site: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RSVI draw ``(value, log_pi)`` from a Gamma / Beta / Dirichlet (possibly wrapped in
    ``Independent`` / Pyro's ``expand``/``mask`` wrappers); ``log_pi`` has the batch shape of
    ``fn`` (event dims summed).

    Raises ``ValueError`` listing the supported families for anything else.
    """
    base, reinterpreted = base_and_reinterpreted(fn)
    # the draw must have the full (expanded) shape of the site: expand the family's parameters
    shape = fn.batch_shape + fn.event_shape
    if isinstance(base, (Dirichlet, Beta, Gamma)):
        base = base.expand(shape[:-1] if isinstance(base, Dirichlet) else shape)
    if isinstance(base, Dirichlet):
        value, log_pi = rsvi_dirichlet(base.concentration, boost, sample_shape)
    elif isinstance(base, Beta):
        value, log_pi = rsvi_beta(base.concentration1, base.concentration0, boost, sample_shape)
    elif isinstance(base, Gamma) and type(base).__name__ in ("Gamma",):
        value, log_pi = rsvi_gamma(base.concentration, base.rate, boost, sample_shape)
    else:
        where = f" at site {site!r}" if site else ""
        raise ValueError(
            f"RSVI does not support {type(base).__name__}{where}; supported distributions: "
            f"{', '.join(RSVI_SUPPORTED)} (optionally wrapped in Independent/expand/mask)"
        )
    if reinterpreted:
        log_pi = log_pi.sum(tuple(range(-reinterpreted, 0)))
    return value, log_pi


def rsvi_surrogate(
    cost: torch.Tensor, log_pi: torch.Tensor, particle_dim: int | None = None
) -> torch.Tensor:
    """Surrogate whose gradient is g_rep + g_cor for the expectation of ``cost``.

    ``cost`` is f(z) with ``z`` from :func:`rsvi_sample` (so autograd gives g_rep); the added
    term ``(f - b).detach() * (log_pi - log_pi.detach())`` has value 0 and gradient
    ``(f - b) d log_pi`` (g_cor). With ``particle_dim`` set, ``b`` is the leave-one-out mean of
    ``f`` over the other particles (zero-mean: b_k is independent of particle k), which needs at
    least 2 particles; otherwise ``b = 0``. Returns the per-particle surrogate (same shape as
    ``cost``); average it over particles yourself.
    """
    f = cost.detach()
    if particle_dim is not None:
        k = f.size(particle_dim)
        if k < 2:
            raise ValueError(
                f"RSVI leave-one-out baseline needs num_particles >= 2, got {k} along dim "
                f"{particle_dim}"
            )
        f = f - loo_mean(f, particle_dim)
    return cost + f * (log_pi - log_pi.detach())


# ---------------------------------------------------------------------------------------------
# Estimator glue for the programmable core (see vi_estimators.estimators for the protocol)
# ---------------------------------------------------------------------------------------------


class RSVI(Estimator):
    """Rejection-sampling variational inference estimator for Gamma / Beta / Dirichlet sites.

    ``pyro.sample("z", dist.Gamma(a, b), infer={"estimator": RSVI(boost=1)})``. The draw is
    reparameterised through the Marsaglia-Tsang proposal (g_rep, plain autograd through the
    returned value), and the correction g_cor enters the core's surrogate as a score term
    ``log pi(eps; alpha + B)`` of the accepted proposal noise, multiplied by the downstream
    signal minus ``baseline``.

    Args:
        boost: shape augmentation ``B >= 0`` (default 1; needed for shapes <= 1/3, and it cuts
            the variance of g_cor sharply as it grows).
        baseline: baseline of the g_cor term: ``"auto"`` (the core's leave-one-out RLOO when the
            objective has K > 1 particles, a moving average when K = 1), any core
            :class:`~vi_estimators.baselines.Baseline`, a number, or ``None``.
    """

    def __init__(self, boost: int = 1, baseline="auto"):
        self.boost = _check_boost(boost)
        self.baseline = as_baseline(baseline)

    def draw(self, name, fn, ctx):
        value, log_pi = rsvi_sample(fn, self.boost, site=name)
        return SiteDraw(value, score=log_pi, baseline=self.baseline)

    def __repr__(self) -> str:
        return f"RSVI(boost={self.boost}, baseline={self.baseline!r})"
