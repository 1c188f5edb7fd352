"""Control variates for gradient estimators: the ``g - c (h - E h)`` layer and Gaussian-guide CVs.

A control variate (CV) is a random quantity ``h`` with known mean ``E h``, correlated with an
estimator ``g``. For any coefficient ``c`` that is independent of the current draw,

    g_cv = g - c * (h - E h)

has the same mean as ``g``; the variance-minimising coefficient is ``c* = Cov(g, h) / Var(h)``
(per coordinate; or one joint scalar ``sum_j Cov_j / sum_j Var_j``). Estimating ``c*`` from the
same draw it is applied to correlates ``c`` with ``h`` and biases ``g_cv``; this module avoids
that in one of two documented ways:

* ``coefficient="loo"`` (default): with K >= 2 particles along ``dim``, particle k uses ``c``
  estimated from the other K - 1 particles (independent of particle k, so exactly zero-mean);
* :class:`PreviousStepCoefficient`: ``c`` from exponentially weighted moments of *previous* steps
  only (also exactly unbiased; works with K = 1).

Shipped control variates:

* the baselines of the core (``vi_estimators.baselines``: moving average, RLOO, learned) are the
  score-function CVs; they are used through the core's ``Reinforce(baseline=...)`` and are not
  duplicated here;
* :func:`taylor_control_variate` — Miller et al. (2017), "Reducing reparameterization gradient
  variance", sec. 3: the reparameterised gradient ``grad f(mu + sigma * eps)`` of a Gaussian guide
  is approximated by its first-order Taylor expansion around the mean,
  ``grad f(mu) + H(mu) (sigma * eps)``, whose expectation is known (``grad f(mu)`` for the location
  part, ``diag(H) * sigma`` for the scale part); the Hessian comes from ``d`` reverse passes
  over the gradient (``diag(H)`` is needed exactly; fine for the modest ``d`` of such guides);
* :class:`DiagQuadraticCV` — Geffner & Domke (2020), "Approximation based variance reduction for
  reparameterization gradients": a diagonal quadratic surrogate ``f~(z) = b^T (z - mu)
  + 1/2 sum_i a_i (z_i - mu_i)^2`` whose gradient ``b + a * sigma * eps`` is the CV (mean ``b`` for
  the location, ``a * sigma`` for the scale); ``(b, a)`` are fitted by per-coordinate least
  squares of the observed gradients on ``sigma * eps`` using *previous* steps only (EMA), so the
  current estimate stays unbiased.

:func:`apply_control_variate` works on any site's gradient or on the whole objective's gradient:
pass the per-particle estimates (any trailing shape) and the CV values. Inside an objective
program of the core, a CV enters the surrogate as a zero-valued term instead:
:func:`taylor_cv_term` returns, per particle, a term with value 0 whose gradient is
``c (h - E h)`` for the Taylor CV of a Gaussian site; subtract it from the program's per-particle
estimate (``return log_p - log_q - taylor_cv_term(...)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .baselines import loo_mean
from .state import CarriesState, note

__all__ = [
    "DiagQuadraticCV",
    "PreviousStepCoefficient",
    "apply_control_variate",
    "optimal_coefficient",
    "reparam_gradients",
    "taylor_control_variate",
    "taylor_cv_term",
]


def _flat(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(dim, 0).reshape(x.size(dim), -1)


def optimal_coefficient(
    g: torch.Tensor, h: torch.Tensor, dim: int = 0, joint: bool = False
) -> torch.Tensor:
    """Leave-one-out estimate of ``Cov(g, h) / Var(h)`` for every particle along ``dim``.

    Returns a detached tensor broadcastable against ``g`` (the particle dim kept, size K): particle
    k's coefficient uses only the other K - 1 particles. Per coordinate by default; with
    ``joint=True`` one scalar per particle (``sum Cov / sum Var`` over coordinates).
    """
    k = g.size(dim)
    if k < 2:
        raise ValueError(
            f"leave-one-out control-variate coefficient needs >= 2 particles along dim {dim}, "
            f"got {k}"
        )
    g, h = torch.broadcast_tensors(g.detach(), h.detach())
    mg, mh = loo_mean(g, dim), loo_mean(h, dim)
    cov = loo_mean(g * h, dim) - mg * mh
    var = loo_mean(h * h, dim) - mh * mh
    if joint:
        dims = [i for i in range(g.dim()) if i != (dim % g.dim())]
        cov = cov.sum(dims, keepdim=True) if dims else cov
        var = var.sum(dims, keepdim=True) if dims else var
    return _ratio(cov, var)


def _ratio(cov: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``cov / var`` guarded against a zero variance (a constant CV gets coefficient 0)."""
    return cov / var.clamp_min(torch.finfo(var.dtype).tiny)


class PreviousStepCoefficient(CarriesState):
    """Optimal CV coefficient from exponentially weighted moments of previous steps.

    ``coefficient()`` is computed *before* the current draw is folded in (by :meth:`update`), so
    it is independent of that draw and ``g - c (h - E h)`` stays unbiased. Returns 0 (no CV)
    until the first update. The moments are carried by captured objectives as graph
    inputs/outputs (:mod:`vi_estimators.state`).
    """

    _MOMENTS = ("mean_g", "mean_h", "mean_gh", "mean_hh")

    def __init__(self, decay: float = 0.9, joint: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.joint = decay, joint
        self._moments: list[torch.Tensor] | None = None

    def get_state(self) -> dict[str, torch.Tensor]:
        if self._moments is None:
            return {}
        return dict(zip(self._MOMENTS, self._moments))

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self._moments = [state[k] for k in self._MOMENTS] if state else None

    @property
    def moments(self) -> tuple[torch.Tensor, ...] | None:
        """``(E g, E h, E gh, E hh)`` of the previous steps (``None`` before the first update)."""
        note(self)
        return None if self._moments is None else tuple(self._moments)

    def coefficient(self, like: torch.Tensor) -> torch.Tensor:
        note(self)
        if self._moments is None:
            return torch.zeros((), dtype=like.dtype, device=like.device)
        mg, mh, mgh, mhh = self._moments
        cov, var = mgh - mg * mh, mhh - mh * mh
        if self.joint:
            cov, var = cov.sum(), var.sum()
        return _ratio(cov, var)

    def update(self, g: torch.Tensor, h: torch.Tensor, dim: int | None = 0) -> None:
        note(self)
        g, h = torch.broadcast_tensors(g.detach(), h.detach())
        if dim is None:
            g, h = g.unsqueeze(0), h.unsqueeze(0)
            dim = 0
        new = [g.mean(dim), h.mean(dim), (g * h).mean(dim), (h * h).mean(dim)]
        if self._moments is None:
            self._moments = new
        else:
            self._moments = [
                self.decay * old + (1 - self.decay) * x for old, x in zip(self._moments, new)
            ]


def apply_control_variate(
    g: torch.Tensor,
    h: torch.Tensor,
    h_mean: torch.Tensor,
    dim: int = 0,
    coefficient: str | float | torch.Tensor | PreviousStepCoefficient = "loo",
    joint: bool = False,
) -> torch.Tensor:
    """Per-particle ``g - c (h - E h)``.

    Args:
        g: per-particle estimates, particles along ``dim`` (any trailing shape: a site's gradient,
            the flattened gradient of the whole objective, a scalar objective value, ...).
        h: the control variate's per-particle values (broadcastable to ``g``).
        h_mean: its exact expectation (broadcastable; no particle dim).
        dim: the particle dim.
        coefficient: ``"loo"`` (leave-one-out optimal, needs K >= 2), a fixed number/tensor, or a
            :class:`PreviousStepCoefficient` (used, then updated with this step's draws).
        joint: one coefficient for all coordinates instead of one per coordinate (``"loo"``).

    Returns:
        The corrected per-particle estimates (average over ``dim`` for the final estimate); their
        mean is unchanged because ``c`` never depends on the particle it is applied to.
    """
    centred = h - h_mean
    if isinstance(coefficient, str):
        if coefficient != "loo":
            raise ValueError(
                f"coefficient must be 'loo', a number, a tensor or a PreviousStepCoefficient; "
                f"got {coefficient!r}"
            )
        c = optimal_coefficient(g, h, dim=dim, joint=joint)
    elif isinstance(coefficient, PreviousStepCoefficient):
        c = coefficient.coefficient(g)
        coefficient.update(g, h, dim)
    else:
        c = coefficient
    return g - c * centred


def reparam_gradients(
    log_p: Callable[[torch.Tensor], torch.Tensor], loc: torch.Tensor, scale: torch.Tensor,
    eps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-particle reparameterised gradients of ``E_q[log_p(z)]`` for ``q = N(loc, diag scale^2)``.

    ``eps`` is ``(K, d)``; returns ``(g_loc, g_scale)``, each ``(K, d)``: ``grad log_p(z)`` and
    ``grad log_p(z) * eps`` at ``z = loc + scale * eps`` (``log_p`` maps ``(K, d) -> (K,)``).
    """
    z = (loc.detach() + scale.detach() * eps).requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(log_p(z).sum(), z)
    return grad, grad * eps


def _grad_and_hessian(log_p, mu):
    """``grad log_p(mu)`` and the Hessian ``H(mu)`` (d reverse passes over the gradient; the
    Taylor CV needs ``diag(H)`` exactly anyway, and guides using it have modest d)."""
    with torch.enable_grad():
        x = mu.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(log_p(x.unsqueeze(0)).sum(), x, create_graph=True)
        rows = []
        for i in range(x.numel()):
            (r,) = torch.autograd.grad(g[i], x, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(x) if r is None else r)
    return g.detach(), torch.stack(rows).detach()


def _taylor_terms(log_p, mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor):
    """``(grad f(mu), H(mu) (sigma * eps_k) for each row k of eps (K, d), diag H(mu))``: the
    pieces of the first-order Taylor CV, shared by the value-level and surrogate-level forms."""
    g0, hess = _grad_and_hessian(log_p, mu)
    return g0, (sigma * eps) @ hess.T, torch.diagonal(hess)


def taylor_control_variate(
    log_p: Callable[[torch.Tensor], torch.Tensor],
    loc: torch.Tensor,
    scale: torch.Tensor,
    eps: torch.Tensor,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """First-order Taylor CV of the reparameterised gradient (Miller et al. 2017, eq. 9-11).

    With ``z = mu + sigma * eps`` and ``g~(z) = grad f(mu) + H(mu) (z - mu)``:

        h_loc   = grad f(mu) + H(mu) (sigma * eps),          E h_loc   = grad f(mu)
        h_scale = (grad f(mu) + H(mu) (sigma * eps)) * eps,  E h_scale = diag(H(mu)) * sigma

    Args:
        log_p: ``(K, d) -> (K,)`` log-density (the model part of the ELBO); must be twice
            differentiable.
        loc, scale: ``(d,)`` guide parameters; eps: ``(K, d)`` the standard-normal draws used for
            the gradient estimate the CV is applied to.

    Returns:
        ``((h_loc, h_scale), (mean_loc, mean_scale))`` — values ``(K, d)`` and means ``(d,)``,
        all detached. Use with :func:`apply_control_variate` (``coefficient=1.0`` is the paper's
        choice; ``"loo"`` re-estimates it).
    """
    mu, sigma = loc.detach(), scale.detach()
    g0, hv_eps, diag_h = _taylor_terms(log_p, mu, sigma, eps)
    h_loc = g0 + hv_eps
    return (h_loc.detach(), (h_loc * eps).detach()), (g0.detach(), (diag_h * sigma).detach())


class DiagQuadraticCV:
    """Diagonal quadratic approximation CV for Gaussian guides (Geffner & Domke 2020).

    The surrogate ``f~(z) = b^T (z - mu) + 1/2 sum_i a_i (z_i - mu_i)^2`` has gradient
    ``b + a * sigma * eps`` at ``z = mu + sigma * eps``, so

        h_loc   = b + a * sigma * eps,          E h_loc   = b
        h_scale = (b + a * sigma * eps) * eps,  E h_scale = a * sigma.

    ``(b, a)`` minimise the squared error between ``grad f(z)`` and ``grad f~(z)``, i.e. a
    per-coordinate regression of the gradient on ``delta = z - mu``; they are fitted from
    exponentially weighted moments of *previous* calls to :meth:`update` (decay ``decay``), never
    from the draw the CV is applied to. Until the first update the CV is zero.
    """

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        # the per-coordinate regression slope of g on delta is exactly the previous-step optimal
        # CV coefficient Cov(g, delta) / Var(delta): one EMA of moments serves both
        self._fit = PreviousStepCoefficient(decay)

    @property
    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The current ``(b, a)`` or ``None`` before the first update."""
        moments = self._fit.moments
        if moments is None:
            return None
        mg, md = moments[:2]
        a = self._fit.coefficient(mg)
        b = mg - a * md
        return b, a

    def __call__(
        self, scale: torch.Tensor, eps: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``((h_loc, h_scale), (mean_loc, mean_scale))`` for draws ``eps`` ``(K, d)``."""
        sigma = scale.detach()
        coef = self.coefficients
        if coef is None:
            zero = torch.zeros_like(eps)
            return (zero, zero), (zero[0], zero[0])
        b, a = coef
        h_loc = b + a * sigma * eps
        return (h_loc, h_loc * eps), (b, a * sigma)

    def update(self, g_loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor) -> None:
        """Fold this step's per-particle location gradients ``(K, d)`` into the fit."""
        self._fit.update(g_loc, scale.detach() * eps, dim=0)


def taylor_cv_term(
    log_p: Callable[[torch.Tensor], torch.Tensor],
    loc: torch.Tensor,
    scale: torch.Tensor,
    z: torch.Tensor,
    coefficient: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Zero-valued per-particle surrogate term carrying the Taylor CV of a Gaussian site.

    ``z = loc + scale * eps`` are the site's reparameterised draws ``(K, d)`` (attached to the
    guide parameters through ``loc`` and ``scale``, both ``(d,)`` and attached). The term's
    gradient w.r.t. the guide parameters is ``c (h - E h)`` chained through ``d(loc, scale)/dphi``,
    with ``h`` the first-order Taylor CV of :func:`taylor_control_variate`:

        h . dz/dphi      from  (grad f(mu) + H(mu) sigma eps) . z        (per particle)
        E h . d/dphi     from  grad f(mu) . loc + 1/2 diag(H(mu)) . scale^2

    (both evaluated with ``mu = stop(loc)``, so the gradients match at the current parameters).
    Subtract it from the per-particle objective estimate: its mean is unchanged for any fixed
    ``c``; ``c = 1`` is Miller et al.'s choice.
    """
    mu, sigma = loc.detach(), scale.detach()
    eps = ((z - loc) / scale).detach()
    g0, hv_eps, diag_h = _taylor_terms(log_p, mu, sigma, eps.reshape(-1, mu.numel()))
    hv_eps = hv_eps.reshape(eps.shape)
    h = ((g0 + hv_eps).detach() * z).sum(-1)
    h_mean = (g0.detach() * loc).sum() + 0.5 * (diag_h.detach() * scale**2).sum()
    term = coefficient * (h - h_mean)
    return term - term.detach()
