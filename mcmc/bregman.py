"""Bregman proximal Langevin Monte Carlo: BMUMLA (left/right envelopes), MYULA, and the
Bregman proximal-gradient-like scheme.

Target ``pi(x) ∝ exp(-f(x) - g(x))`` with ``f`` smooth and ``g`` convex but nonsmooth
(:mod:`mcmc.prox`). Following Lau & Liu, "Bregman Proximal Langevin Monte Carlo via
Bregman-Moreau Envelopes" (ICML 2022; arXiv:2207.04387), ``g`` is replaced by a Bregman-Moreau
envelope for a Legendre function ``phi`` (:mod:`mcmc.mirror`), and the smooth surrogate
``pi_lam ∝ exp(-f - env_{lam g})`` is sampled by the unadjusted mirror-Langevin algorithm.

Envelopes (Bauschke, Dao & Lindstrom 2018, as used by Lau & Liu) with ``D`` the Bregman divergence:

* left:  ``env^L_{lam g}(x) = min_u g(u) + D(u, x)/lam``,
  ``grad env^L_{lam g}(x) = (1/lam) Hess phi(x) (x - P^L_{lam g}(x))``;
* right: ``env^R_{lam g}(x) = min_u g(u) + D(x, u)/lam``,
  ``grad env^R_{lam g}(x) = (1/lam) (grad phi(x) - grad phi(P^R_{lam g}(x)))``.

Both tend to ``g`` as ``lam -> 0``; with ``phi = |.|^2/2`` both are the Moreau envelope,
``grad = (x - prox_{lam g}(x))/lam``.

Step rules (``xi ~ N(0, I)``, ``A(x) A(x)^T = Hess phi(x)``):

* **BMUMLA** (Lau & Liu): the mirror-Langevin step on ``f + env_{lam g}``,
  ``grad phi(x') = grad phi(x) - gamma grad f(x) - gamma grad env_{lam g}(x)
  + sqrt(2 gamma) A(x) xi``, ``x' = grad phi^*(...)``.
* **MYULA** (Durmus, Moulines & Pereyra 2018): ``phi = |.|^2/2``,
  ``x' = x - gamma grad f(x) - (gamma/lam)(x - prox_{lam g}(x)) + sqrt(2 gamma) xi``.
* **Bregman proximal-gradient-like** (right envelope with ``lam = gamma``; Lau & Liu):
  ``grad phi(x') = grad phi(P^R_{gamma g}(x)) - gamma grad f(x) + sqrt(2 gamma) A(x) xi`` —
  the Bregman proximal gradient step of optimisation plus mirror-Langevin noise.

Parameters and guidance:

* ``gamma`` (step size, > 0): as for ULA, keep ``gamma`` well below ``1/L`` where ``L`` is the
  Lipschitz constant of ``grad f`` (relative to ``phi`` for mirror methods); the stationary
  law's bias shrinks with gamma (measured in ``tests/test_bregman.py``: on the Laplace target
  with rates 1..10, MYULA's variance bias is ~12% on average at gamma = lam = 5e-3 and within
  5% at 2e-4). Default in :class:`BregmanProximalLangevin`: ``0.1 / L`` with ``L`` measured at
  the mode (see "Defaults from the model" there).
* ``lam`` (envelope, > 0): the envelope's gradient is ``1/lam``-Lipschitz (Euclidean case), so
  stability needs ``gamma <~ lam``; the smoothing bias grows with ``lam``. Default: ``lam =
  gamma`` (the smallest lam that keeps the step stable); ``lam`` a few times ``gamma`` trades
  bias for stability.
* Hypentropy ``beta``: choose it comparable to the smallest posterior scales of the nonsmooth
  coordinates (beta = 0.1 halved MYULA's variance bias on the Laplace test; beta = 1 did not).

(Equation numbers are not quoted: the formulas above are derived here from the envelope
definitions and the mirror-Langevin step, and are checked numerically in the tests.)

Barrier mirror maps (Boltzmann-Shannon, Burg, FermiDirac, SimplexEntropy) keep every iterate
inside their domain, but the dual noise ``sqrt(2 gamma) Hess phi(x)^{1/2} xi`` grows like
``dist^{-1/2}`` near the boundary. Where the target does not push away from the boundary (e.g.
a uniform target), large steps make chains stick to it: for the uniform on a box with the
FermiDirac map, gamma = 1e-3 left 22% of 10^4 chains within 1e-6 (relative) of a wall after
2000 steps (variance inflated up to 85%); gamma = 1e-4 gave 2% and variances within 6%.
Use small steps and float64 there.

Pure step functions take ``x`` of shape ``(C, d)`` (``C`` chains), ``grad_f`` either a callable
``x -> (C, d)`` or the precomputed gradient ``(C, d)``, and a ``torch.Generator`` (or explicit
``noise``), and return the next ``(C, d)`` state. They do not check for NaN (keep them cheap).
:func:`sample_chains` (a plain ``grad_f`` on ``R^d``) and :class:`BregmanProximalLangevin` (a Pyro
model) run them through the one chain driver :class:`mcmc.chains.ChainDriver` (warm-up,
thinning, progress bar, NaN checks naming the iteration, chains and sites, checkpoints), with the
package's vocabulary: ``step_size`` (gamma), ``thinning``, ``num_chains``, ``num_samples``,
``warmup_steps``, ``seed``.

A smooth part that does not depend on a site (e.g. a pure Laplace prior with no likelihood) has a
zero gradient there; the samplers then move by the envelope and the noise alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.distributions import constraints

from .chains import ChainDriver, LangevinKernel, StepRandomness, check_run_lengths
from .laplace import default_step_size, find_mode, largest_eigenvalue
from .mirror import Euclidean, MirrorMap
from .potential import check_finite
from .prox import NonsmoothTerm
from .schedules import as_schedule

__all__ = [
    "BregmanProximalLangevin",
    "BregmanState",
    "bmumla_step",
    "bregman_proximal_gradient_step",
    "envelope_grad",
    "myula_step",
    "sample_chains",
]

GradF = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor

logger = logging.getLogger(__name__)

#: envelope parameter of the smoothed potential ``f + env_{lam g}`` whose minimiser is the
#: default start of :class:`BregmanProximalLangevin` (it is within ``lam |w|`` of the mode of
#: ``f + g`` for an l1 term of weight ``w``)
MODE_ENVELOPE = 1e-3


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _grad(grad_f: GradF, x: torch.Tensor) -> torch.Tensor:
    return grad_f(x) if callable(grad_f) else grad_f


def _noise(x: torch.Tensor, generator: torch.Generator | None,
           noise: torch.Tensor | None) -> torch.Tensor:
    if noise is not None:
        return noise
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def envelope_grad(x: torch.Tensor, g: NonsmoothTerm, lam: float,
                  mirror: MirrorMap | None = None, side: str = "left") -> torch.Tensor:
    """Gradient of the (Bregman-)Moreau envelope of ``lam * g`` at ``x (..., d)``.

    ``mirror=None`` (or ``Euclidean()``): ``(x - prox_{lam g}(x)) / lam``.
    ``side="left"``: ``Hess phi(x)(x - P^L(x)) / lam``; ``side="right"``:
    ``(grad phi(x) - grad phi(P^R(x))) / lam`` (see the module docstring).
    """
    if mirror is None:
        return (x - g.prox(x, lam)) / lam
    if side == "left":
        return mirror.hessian_matvec(x, x - g.left_prox(x, lam, mirror)) / lam
    if side == "right":
        return (mirror.grad_phi(x) - mirror.grad_phi(g.right_prox(x, lam, mirror))) / lam
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def myula_step(x: torch.Tensor, grad_f: GradF, g: NonsmoothTerm, *, step_size: float,
               lam: float | None = None, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """One MYULA step for ``C`` chains (Durmus, Moulines & Pereyra, SIAM J. Imaging Sci. 2018,
    Lau & Liu 2022 treat it as the Euclidean case of BMUMLA):

        x' = x - gamma grad f(x) - (gamma/lam)(x - prox_{lam g}(x)) + sqrt(2 gamma) xi.

    Args:
        x: ``(C, d)`` current states.
        grad_f: callable ``x -> grad f(x)`` or the precomputed ``(C, d)`` gradient.
        g: the nonsmooth term (its Euclidean ``prox`` is used).
        step_size: gamma > 0. lam: envelope parameter > 0 (default ``gamma``).
        generator / noise: source of ``xi`` (``noise`` overrides).
    """
    gamma = step_size
    lam = gamma if lam is None else lam
    _check_positive("step_size", gamma)
    _check_positive("lam", lam)
    # x' = (gamma/lam) [prox + (lam/gamma - 1) x] - gamma grad f + sqrt(2 gamma) xi: the same
    # update with fewer passes over memory (in-place ops on a fresh temporary only)
    out = torch.add(g.prox(x, lam), x, alpha=lam / gamma - 1.0).mul_(gamma / lam)
    out.add_(_grad(grad_f, x), alpha=-gamma)
    return out.add_(_noise(x, generator, noise), alpha=math.sqrt(2 * gamma))


def bmumla_step(x: torch.Tensor, grad_f: GradF, g: NonsmoothTerm, mirror: MirrorMap, *,
                step_size: float, lam: float | None = None, side: str = "left",
                generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """One BMUMLA step for ``C`` chains (Lau & Liu 2022; the mirror-Langevin
    discretisation of Zhang et al. 2020 applied to ``f + env_{lam g}``):

        y  = grad phi(x) - gamma grad f(x) - gamma grad env^{L|R}_{lam g}(x)
             + sqrt(2 gamma) Hess phi(x)^{1/2} xi,
        x' = grad phi^*(y),

    with the envelope gradients of :func:`envelope_grad`. ``x'`` lies in the mirror domain by
    construction (NaN if ``y`` leaves the dual domain, possible only for :class:`Burg`).

    Args:
        x: ``(C, d)`` states inside ``mirror``'s domain.
        grad_f: callable or precomputed ``(C, d)`` gradient of the smooth part.
        g: the nonsmooth term; must have a closed-form ``side`` Bregman prox for ``mirror``.
        mirror: the Legendre function phi.
        step_size: gamma > 0. lam: envelope parameter > 0 (default ``gamma``).
        side: ``"left"`` or ``"right"`` envelope.
    """
    gamma = step_size
    lam = gamma if lam is None else lam
    _check_positive("step_size", gamma)
    _check_positive("lam", lam)
    y = (mirror.grad_phi(x) - gamma * (_grad(grad_f, x) + envelope_grad(x, g, lam, mirror, side))
         + math.sqrt(2 * gamma) * mirror.hessian_sqrt_matvec(x, _noise(x, generator, noise)))
    return mirror.grad_phi_conj(y)


def bregman_proximal_gradient_step(x: torch.Tensor, grad_f: GradF, g: NonsmoothTerm,
                                   mirror: MirrorMap, *, step_size: float,
                                   generator: torch.Generator | None = None,
                                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """BMUMLA with the right envelope and ``lam = gamma`` (Lau & Liu 2022): the
    ``grad phi(x)`` terms cancel and the step is a Bregman proximal-gradient step plus noise,

        x' = grad phi^*( grad phi(P^R_{gamma g}(x)) - gamma grad f(x)
                         + sqrt(2 gamma) Hess phi(x)^{1/2} xi ).
    """
    gamma = step_size
    _check_positive("step_size", gamma)
    y = (mirror.grad_phi(g.right_prox(x, gamma, mirror)) - gamma * _grad(grad_f, x)
         + math.sqrt(2 * gamma) * mirror.hessian_sqrt_matvec(x, _noise(x, generator, noise)))
    return mirror.grad_phi_conj(y)


_METHODS = ("bmumla", "myula", "bpg")


def _make_step(method: str, g: NonsmoothTerm, mirror: MirrorMap | None, gamma: float,
               lam: float | None, side: str):
    """Validate the configuration once and return ``step(x, grad, generator, noise) -> x'``
    (``gamma``: the callers' ``step_size``)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"step_size must be a finite number > 0 (no schedule: lam is tied to "
                         f"it), got {gamma!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    _check_positive("step_size", gamma)
    lam = gamma if lam is None else lam
    _check_positive("lam", lam)
    if not isinstance(g, NonsmoothTerm):
        raise TypeError(f"the nonsmooth term must be an mcmc.prox.NonsmoothTerm, got {g!r}")
    if method == "myula":
        if mirror is not None and not (isinstance(mirror, Euclidean) and
                                       not isinstance(mirror.M, torch.Tensor) and mirror.M == 1):
            raise ValueError("method='myula' is the Euclidean special case: pass mirror=None "
                             "(or use method='bmumla' with this mirror map)")
        return lambda x, gr, gen, nz: myula_step(x, gr, g, step_size=gamma, lam=lam,
                                                 generator=gen, noise=nz)
    if mirror is None:
        raise ValueError(f"method={method!r} needs a mirror map (mcmc.mirror)")
    if not isinstance(mirror, MirrorMap):
        raise TypeError(f"mirror must be an mcmc.mirror.MirrorMap, got {mirror!r}")
    if method == "bpg":
        g.check_supported(mirror, "right")
        return lambda x, gr, gen, nz: bregman_proximal_gradient_step(
            x, gr, g, mirror, step_size=gamma, generator=gen, noise=nz)
    g.check_supported(mirror, side)
    return lambda x, gr, gen, nz: bmumla_step(x, gr, g, mirror, step_size=gamma, lam=lam,
                                              side=side, generator=gen, noise=nz)


class _GradientState(NamedTuple):
    """State of :func:`sample_chains`: the points and the smooth gradient there."""

    z: torch.Tensor  # (C, d)
    grad: torch.Tensor  # (C, d)


class _FunctionTarget:
    """The chain algorithm of :func:`sample_chains`: a plain ``grad_f`` on ``R^d``."""

    def __init__(self, grad_f, step_fn, method: str):
        self.grad_f = grad_f
        self.step_fn = step_fn
        self.method = method

    def init(self, z):
        return _GradientState(z, self.grad_f(z))

    def draw(self, state, generator, t):
        z = state.z
        return torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)

    def step(self, state, step_size, noise, t):
        z = self.step_fn(state.z, state.grad, None, noise)
        return _GradientState(z, self.grad_f(z))

    @staticmethod
    def positions(state):
        return state.z

    def nonfinite_error(self, old, new, t, note=""):
        for name, value in (("state", new.z), ("gradient of f", new.grad)):
            try:
                check_finite(f"{self.method} {name} {note}".rstrip(), value, t)
            except FloatingPointError as e:
                return e
        return FloatingPointError(f"non-finite {self.method} state at iteration {t}")


def sample_chains(x0: torch.Tensor, grad_f: Callable[[torch.Tensor], torch.Tensor],
                  g: NonsmoothTerm, *, method: str = "bmumla", mirror: MirrorMap | None = None,
                  step_size: float, lam: float | None = None, side: str = "left",
                  num_samples: int, warmup_steps: int = 0, thinning: int = 1,
                  seed: int | None = None, progress: bool = True,
                  diagnostics: bool = True) -> torch.Tensor:
    """Run ``C`` chains of MYULA / BMUMLA / the Bregman proximal-gradient scheme on a target
    ``exp(-f(x) - g(x))`` on ``R^d`` given by ``grad f`` (no Pyro model: toy targets, tests).

    Args:
        x0: ``(C, d)`` initial states (inside ``mirror``'s domain).
        grad_f: ``x (C, d) -> grad f(x) (C, d)``.
        g, method (``"bmumla" | "myula" | "bpg"``), mirror, step_size (gamma), lam, side: see
            the step functions.
        num_samples: draws kept per chain; warmup_steps: discarded steps; thinning: steps per
            draw; seed: of the noise generator (default: drawn from torch's global RNG);
            progress: progress bar for long runs; diagnostics: check the draws at the end
            (:func:`mcmc.diagnostics.check_chains`: INFO summary, one ``ConvergenceWarning`` if
            the chains disagree or the ESS is tiny).

    Returns:
        ``(C, num_samples, d)`` draws. A NaN/inf state or gradient raises ``FloatingPointError``
        naming the iteration and chains.
    """
    step = _make_step(method, g, mirror, step_size, lam, side)
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2:
        raise ValueError(f"x0 must be a (C, d) tensor, got "
                         f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0)}")
    if method != "myula":
        mirror.check_domain(x0, "x0 (initial point)")
    check_run_lengths(num_samples, warmup_steps, thinning, "sample_chains")
    gen = torch.Generator(device=x0.device)
    gen.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else int(seed))
    driver = ChainDriver(_FunctionTarget(grad_f, step, method), step_size, generator=gen,
                         name=method)
    driver.start(x0)
    draws = driver.run(num_samples, warmup_steps=warmup_steps, thinning=thinning,
                       progress=progress)
    if diagnostics:
        from .diagnostics import check_chains

        check_chains(draws, name=method).announce(stacklevel=2)
    return draws


# ---------------------------------------------------------------------------------------
# Pyro kernel
# ---------------------------------------------------------------------------------------


def _is_real(support) -> bool:
    """True for supports that are all of R^d (``real``, possibly wrapped in ``independent``):
    their unconstrained transform is the identity."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class BregmanState(NamedTuple):
    """State of ``C`` Bregman proximal Langevin chains: the points and the smooth part's
    potential ``f`` and gradient there."""

    z: torch.Tensor  # (C, D) unconstrained points
    potential_energy: torch.Tensor  # (C,) f at z (minibatch estimate)
    grad: torch.Tensor  # (C, D) gradient of f at z


class _SmoothedPotential:
    """``f(z) + sum_s env_{lam g_s}(z_s)``: the potential with each nonsmooth term replaced by its
    Euclidean Moreau envelope ``env(x) = g(p) + |x - p|^2 / (2 lam)``, ``p = prox_{lam g}(x)``,
    whose gradient is ``(x - p) / lam`` (the prox is held fixed when differentiating: Danskin).
    Smooth and finite everywhere (indicator terms included), so L-BFGS can minimise it."""

    def __init__(self, potential, terms: list, lam: float) -> None:
        self.potential, self.terms, self.lam = potential, terms, lam

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        u = self.potential(z)
        for sl, g in self.terms:
            x = z[:, sl]
            p = g.prox(x.detach(), self.lam)
            u = u + g(p) + (x - p).pow(2).sum(-1) / (2 * self.lam)
        return u


class BregmanProximalLangevin(LangevinKernel):
    """Bregman proximal Langevin (BMUMLA / MYULA / proximal-gradient-like) for Pyro models.

    The potential is split as ``U(z) = f(z) + sum_s g_s(z_s)``: every site ``s`` named in
    ``nonsmooth`` contributes the nonsmooth term ``g_s`` (applied to the site's flattened value)
    *instead of* its prior ``log_prob``, and ``f`` is the rest of the model's negative log joint,
    from :class:`mcmc.potential.Potential` with ``exclude_sites=tuple(nonsmooth)``. Make
    ``g_s`` equal to the prior's negative log density up to a constant (e.g. a
    ``Laplace(0, b)`` prior is ``L1(1/b)``), otherwise the target changes. When ``f`` does not
    depend on a site (e.g. no likelihood) its gradient there is zero.

    The mirror map acts on the nonsmooth sites' coordinates; the other sites take plain
    Langevin steps (Euclidean mirror), i.e. phi(z) = sum_s phi_s(z_s) + |z_rest|^2/2.

    Constrained sites: the potential lives in unconstrained space, where a nonsmooth term of
    the *constrained* value would no longer be convex; nonsmooth sites must therefore have
    support all of R^d (identity transform, e.g. Normal/Laplace priors), else ``ValueError``.
    Constraints are expressed by the nonsmooth term itself (``Box``, ``Simplex``, ...) together
    with a mirror map on the matching domain.

    Args:
        model: Pyro model. nonsmooth: ``{site: NonsmoothTerm}``.
        mirror: a MirrorMap for every nonsmooth site, or ``{site: MirrorMap}``; ``None`` with
            ``method="myula"``.
        step_size: gamma > 0, or ``None`` (default): chosen from the model at set-up (see
            "Defaults from the model" below). A number, not a schedule: ``lam`` is tied to it.
        lam: envelope parameter > 0 (default gamma).
        side: ``"left"`` / ``"right"`` envelope (BMUMLA). method: ``"bmumla"`` (default),
            ``"myula"`` or ``"bpg"`` (right envelope with lam = gamma).
        subsample_size, max_plate_nesting, init_strategy, with_replacement, shared_minibatch,
            seed, vectorize: as for :class:`mcmc.sgld.SGLD` (minibatch gradients of ``f``; the
            nonsmooth sites' initial values must lie in the mirror domain).

    Use it as ``pyro.infer.MCMC(kernel, num_samples, warmup_steps).run(*args)`` (one chain per
    Pyro chain), or, vectorised over many chains, :meth:`sample_chains`.

    Defaults from the model
    -----------------------
    With ``step_size=None`` the kernel, once per potential,

    * finds the mode ``z_hat`` of ``f + sum_s env_{lam0 g_s}`` (:class:`_SmoothedPotential`: each
      ``g_s`` replaced by its Euclidean Moreau envelope, ``lam0 =`` :data:`MODE_ENVELOPE`, so the
      objective is smooth and finite; L-BFGS, :func:`mcmc.laplace.find_mode`, from one point of
      ``init_strategy`` seeded by ``seed``); chains start there unless ``initial_params`` are
      given;
    * measures the curvature of the smooth part relative to the mirror map there,
      ``L = lambda_max(P H_f)`` with ``H_f`` the Hessian of ``f`` at ``z_hat`` and
      ``P = blockdiag(Hess phi_s(z_hat_s)^{-1}, I)`` (:func:`mcmc.laplace.largest_eigenvalue`
      with ``preconditioner=P``; ``P = I`` for MYULA). Linearising the mirror step,
      ``x' ~ x - gamma Hess phi^{-1} grad f + sqrt(2 gamma) Hess phi^{-1/2} xi``: a Langevin step
      with the constant metric ``Hess phi(z_hat)``, whose stability and bias are governed by
      ``gamma L`` as ``h lambda_max`` governs ULA's;
    * sets ``gamma = 0.1 / L`` (:func:`mcmc.laplace.default_step_size`, the rule of the SGLD
      family: on a Gaussian smooth part the discretisation inflates the stationary variance by
      at most about 5 %), and ``lam = gamma`` unless ``lam`` is given.

    ``L`` uses ``f`` only: the envelope's own curvature ``1 / lam`` is what ``lam = gamma``
    accounts for. The curvature is measured at the mode; with a mirror map whose inverse
    Hessian grows away from it (hypentropy: ``sqrt(x^2 + beta^2)``) chains far in the tails
    take relatively larger steps. The mode must lie inside every mirror map's domain (for
    barrier maps whose constrained mode is on the boundary give ``step_size``), and ``f`` must
    have some curvature (a model with no smooth term: give ``step_size``); otherwise
    ``ValueError``. :attr:`mode` and the ``step_size`` in :meth:`logging` report the choice
    (one INFO line on the ``mcmc.bregman`` logger too); a checkpoint stores them.
    """

    state_type = BregmanState

    def __init__(self, model: Callable, nonsmooth: dict[str, NonsmoothTerm],
                 mirror: MirrorMap | dict[str, MirrorMap] | None = None, *,
                 step_size: float | None = None, lam: float | None = None, side: str = "left",
                 method: str = "bmumla", **kwargs) -> None:
        if not isinstance(nonsmooth, dict) or not nonsmooth:
            raise ValueError("nonsmooth must be a non-empty dict {site: NonsmoothTerm}")
        if kwargs.get("on_nonfinite", "raise") != "raise":
            raise ValueError("BregmanProximalLangevin supports on_nonfinite='raise' only (the "
                             "envelope parameter is tied to the step size)")
        self.nonsmooth = dict(nonsmooth)
        if isinstance(mirror, dict):
            missing = set(self.nonsmooth) - set(mirror)
            if missing:
                raise ValueError(f"mirror dict lacks nonsmooth site(s) {sorted(missing)}")
            self.mirrors = {k: mirror[k] for k in self.nonsmooth}
        else:
            self.mirrors = {k: mirror for k in self.nonsmooth}
        self.auto_step_size = step_size is None
        self.lam_arg = lam
        self.side, self.method = side, method
        self.mode: torch.Tensor | None = None  # (1, D), found at set-up when step_size=None
        # validate every (term, mirror) pair now: clear errors before any model run (a
        # placeholder step when the step size is chosen at set-up)
        self._set_step_size(1.0 if step_size is None else step_size)
        super().__init__(model, self.step_size, **kwargs)
        self._fixed_ready = False
        if self.auto_step_size:
            self.schedule = None

    def _set_step_size(self, step_size: float) -> None:
        self.lam = step_size if self.lam_arg is None else self.lam_arg
        self._steps = {k: _make_step(self.method, t, self.mirrors[k], step_size, self.lam,
                                     self.side)
                       for k, t in self.nonsmooth.items()}
        self.step_size = step_size

    def _potential_options(self) -> dict:
        return {"exclude_sites": tuple(self.nonsmooth)}

    def _on_new_potential(self) -> None:
        pot = self.potential
        for site in self.nonsmooth:
            if site not in pot.site_slices:
                raise ValueError(f"nonsmooth site {site!r} is not a continuous latent site of the "
                                 f"model (latent sites: {sorted(pot.site_slices)})")
            if not _is_real(pot.supports[site]):
                raise ValueError(
                    f"nonsmooth site {site!r} has a constrained support (its unconstrained "
                    "transform is not the identity); a nonsmooth term of the constrained value is "
                    "not convex in unconstrained space. Give the site a prior on all of R^d "
                    "(e.g. Normal/Laplace/ImproperUniform(real)) and express the constraint with "
                    "a nonsmooth indicator term (Box, NonNegative, Simplex) plus a mirror map.")
        if self.auto_step_size:
            self._choose_step_size(pot)

    def setup_potential(self, model_args: tuple = (), model_kwargs: dict | None = None):
        pot = super().setup_potential(model_args, model_kwargs)
        if self._fixed_potential and self.auto_step_size and not self._fixed_ready:
            self._fixed_ready = True  # a potential given up front
            self._on_new_potential()
        return pot

    def _mirrored_sites(self) -> list[str]:
        """Nonsmooth sites whose steps use a (non-Euclidean-identity) mirror map."""
        return [] if self.method == "myula" else list(self.nonsmooth)

    def _choose_step_size(self, pot) -> None:
        """Mode, relative curvature and step size (see "Defaults from the model")."""
        name = type(self).__name__
        terms = [(pot.site_slices[k], t) for k, t in self.nonsmooth.items()]
        try:
            mode = find_mode(_SmoothedPotential(pot, terms, MODE_ENVELOPE), self._mode_start(pot))
        except FloatingPointError as e:
            raise ValueError(f"{name}(..., step_size=None): {e}; give step_size explicitly (or "
                             "another init_strategy)") from None
        for site in self._mirrored_sites():
            m = self.mirrors[site]
            if not bool(m.contains(mode[:, pot.site_slices[site]]).all()):
                raise ValueError(
                    f"{name}(..., step_size=None): the mode of site {site!r} lies outside the "
                    f"domain of the {m.name} mirror map ({m.domain}), where the step size would "
                    "be measured; give step_size explicitly")

        def precondition(v: torch.Tensor) -> torch.Tensor:  # v -> blockdiag(Hess phi^-1, I) v
            out = v.clone()
            for site in self._mirrored_sites():
                sl = pot.site_slices[site]
                out[:, sl] = self.mirrors[site].inverse_hessian_matvec(mode[:, sl], v[:, sl])
            return out

        gen = torch.Generator(device="cpu").manual_seed(0 if self.seed is None else self.seed)
        try:
            curvature = largest_eigenvalue(pot, mode, generator=gen, preconditioner=precondition)
            step = default_step_size(pot, mode, curvature=curvature)
        except (ValueError, FloatingPointError) as e:
            raise ValueError(f"{name}(..., step_size=None): {e}") from None
        self.mode = mode
        self._set_step_size(step)
        self.schedule = as_schedule(step)
        logger.info(f"{name}: mode found; curvature relative to the mirror map {curvature:.3g}; "
                    f"step_size {step:.3g}, lam {self.lam:.3g}; chains start at the mode")

    def _default_initial_z(self, num_chains: int) -> torch.Tensor:
        if self.mode is not None:
            return self.mode.expand(num_chains, -1).clone()
        return super()._default_initial_z(num_chains)

    def _extra_state_dict(self) -> dict:
        if not self.auto_step_size or self.mode is None:
            return {}
        return {"mode": self.mode.clone(), "step_size": self.step_size}

    def _load_extra_state_dict(self, sd: dict) -> None:
        if "step_size" in sd:
            self.mode = sd["mode"]
            self._set_step_size(sd["step_size"])
            self.schedule = as_schedule(sd["step_size"])

    def logging(self) -> dict:
        if self.schedule is None:
            return {"step_size": "auto"}
        return super().logging()

    def _check_init(self, z: torch.Tensor) -> None:
        for site, m in self.mirrors.items():
            if m is not None and self.method != "myula":
                m.check_domain(z[:, self.potential.site_slices[site]],
                               f"initial value of site {site!r}")

    def init(self, z: torch.Tensor) -> BregmanState:
        self._check_init(z)
        u, g = self.gradient(z, self._draw_indices(z.shape[0], self.generator))
        return BregmanState(z, u, g)

    def step(self, state, step_size, randomness: StepRandomness, t: int) -> BregmanState:
        """Plain Langevin on the smooth sites, the prox/mirror step on each nonsmooth site, then
        ``f`` and its gradient at the new points (on this step's minibatch rows)."""
        z, grad, xi = state.z, state.grad, randomness.noise
        new = z - step_size * grad + math.sqrt(2 * step_size) * xi
        for site, step in self._steps.items():
            sl = self.potential.site_slices[site]
            new[:, sl] = step(z[:, sl], grad[:, sl], None, xi[:, sl])
        u, g = self.gradient(new, randomness.indices)
        return BregmanState(new, u, g)

