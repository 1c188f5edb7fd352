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
  5% at 2e-4). Default in :class:`BregmanProximalLangevin`: ``1e-3``.
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
``noise``), and return the next ``(C, d)`` state. They do not check for NaN (keep them cheap);
:func:`sample_chains` and :class:`BregmanProximalLangevin` do, via
:func:`mcmc.potential.check_finite`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch.distributions.transforms import (
    ComposeTransform,
    IndependentTransform,
    _InverseTransform,
)
from tqdm.auto import tqdm

from mcmc.mirror import Euclidean, MirrorMap
from mcmc.potential import Potential, check_finite
from mcmc.prox import NonsmoothTerm

__all__ = [
    "BregmanProximalLangevin",
    "bmumla_step",
    "bregman_proximal_gradient_step",
    "envelope_grad",
    "myula_step",
    "sample_chains",
]

GradF = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor


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


def myula_step(x: torch.Tensor, grad_f: GradF, g: NonsmoothTerm, *, gamma: float,
               lam: float | None = None, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """One MYULA step for ``C`` chains (Durmus, Moulines & Pereyra, SIAM J. Imaging Sci. 2018,
    Lau & Liu 2022 treat it as the Euclidean case of BMUMLA):

        x' = x - gamma grad f(x) - (gamma/lam)(x - prox_{lam g}(x)) + sqrt(2 gamma) xi.

    Args:
        x: ``(C, d)`` current states.
        grad_f: callable ``x -> grad f(x)`` or the precomputed ``(C, d)`` gradient.
        g: the nonsmooth term (its Euclidean ``prox`` is used).
        gamma: step size > 0. lam: envelope parameter > 0 (default ``gamma``).
        generator / noise: source of ``xi`` (``noise`` overrides).
    """
    lam = gamma if lam is None else lam
    _check_positive("gamma", gamma)
    _check_positive("lam", lam)
    # x' = (gamma/lam) [prox + (lam/gamma - 1) x] - gamma grad f + sqrt(2 gamma) xi: the same
    # update with fewer passes over memory (in-place ops on a fresh temporary only)
    out = torch.add(g.prox(x, lam), x, alpha=lam / gamma - 1.0).mul_(gamma / lam)
    out.add_(_grad(grad_f, x), alpha=-gamma)
    return out.add_(_noise(x, generator, noise), alpha=math.sqrt(2 * gamma))


def bmumla_step(x: torch.Tensor, grad_f: GradF, g: NonsmoothTerm, mirror: MirrorMap, *,
                gamma: float, lam: float | None = None, side: str = "left",
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
        gamma: step > 0. lam: envelope parameter > 0 (default ``gamma``).
        side: ``"left"`` or ``"right"`` envelope.
    """
    lam = gamma if lam is None else lam
    _check_positive("gamma", gamma)
    _check_positive("lam", lam)
    y = (mirror.grad_phi(x) - gamma * (_grad(grad_f, x) + envelope_grad(x, g, lam, mirror, side))
         + math.sqrt(2 * gamma) * mirror.hessian_sqrt_matvec(x, _noise(x, generator, noise)))
    return mirror.grad_phi_conj(y)


def bregman_proximal_gradient_step(x: torch.Tensor, grad_f: GradF, g: NonsmoothTerm,
                                   mirror: MirrorMap, *, gamma: float,
                                   generator: torch.Generator | None = None,
                                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """BMUMLA with the right envelope and ``lam = gamma`` (Lau & Liu 2022): the
    ``grad phi(x)`` terms cancel and the step is a Bregman proximal-gradient step plus noise,

        x' = grad phi^*( grad phi(P^R_{gamma g}(x)) - gamma grad f(x)
                         + sqrt(2 gamma) Hess phi(x)^{1/2} xi ).
    """
    _check_positive("gamma", gamma)
    y = (mirror.grad_phi(g.right_prox(x, gamma, mirror)) - gamma * _grad(grad_f, x)
         + math.sqrt(2 * gamma) * mirror.hessian_sqrt_matvec(x, _noise(x, generator, noise)))
    return mirror.grad_phi_conj(y)


_METHODS = ("bmumla", "myula", "bpg")


def _make_step(method: str, g: NonsmoothTerm, mirror: MirrorMap | None, gamma: float,
               lam: float | None, side: str):
    """Validate the configuration once and return ``step(x, grad, generator, noise) -> x'``."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    _check_positive("gamma (step_size)", gamma)
    lam = gamma if lam is None else lam
    _check_positive("lam", lam)
    if not isinstance(g, NonsmoothTerm):
        raise TypeError(f"the nonsmooth term must be an mcmc.prox.NonsmoothTerm, got {g!r}")
    if method == "myula":
        if mirror is not None and not (isinstance(mirror, Euclidean) and
                                       not isinstance(mirror.M, torch.Tensor) and mirror.M == 1):
            raise ValueError("method='myula' is the Euclidean special case: pass mirror=None "
                             "(or use method='bmumla' with this mirror map)")
        return lambda x, gr, gen, nz: myula_step(x, gr, g, gamma=gamma, lam=lam, generator=gen,
                                                 noise=nz)
    if mirror is None:
        raise ValueError(f"method={method!r} needs a mirror map (mcmc.mirror)")
    if not isinstance(mirror, MirrorMap):
        raise TypeError(f"mirror must be an mcmc.mirror.MirrorMap, got {mirror!r}")
    if method == "bpg":
        g.check_supported(mirror, "right")
        return lambda x, gr, gen, nz: bregman_proximal_gradient_step(
            x, gr, g, mirror, gamma=gamma, generator=gen, noise=nz)
    g.check_supported(mirror, side)
    return lambda x, gr, gen, nz: bmumla_step(x, gr, g, mirror, gamma=gamma, lam=lam, side=side,
                                              generator=gen, noise=nz)


def sample_chains(x0: torch.Tensor, grad_f: Callable[[torch.Tensor], torch.Tensor],
                  g: NonsmoothTerm, *, method: str = "bmumla", mirror: MirrorMap | None = None,
                  gamma: float, lam: float | None = None, side: str = "left",
                  num_samples: int, warmup_steps: int = 0, thin: int = 1,
                  generator: torch.Generator | None = None, progress: bool = False,
                  check_every: int = 1) -> torch.Tensor:
    """Run ``C`` chains of MYULA / BMUMLA / the Bregman proximal-gradient scheme.

    Args:
        x0: ``(C, d)`` initial states (inside ``mirror``'s domain).
        grad_f: ``x (C, d) -> grad f(x) (C, d)``.
        g, method (``"bmumla" | "myula" | "bpg"``), mirror, gamma, lam, side: see the step
            functions.
        num_samples: draws kept per chain; warmup_steps: discarded steps; thin: steps per draw.
        check_every: test the state for NaN/inf every this many steps (raises
            ``FloatingPointError`` naming the iteration).

    Returns:
        ``(C, num_samples, d)`` draws.
    """
    step = _make_step(method, g, mirror, gamma, lam, side)
    if x0.dim() != 2:
        raise ValueError(f"x0 must have shape (C, d), got {tuple(x0.shape)}")
    if method != "myula":
        mirror.check_domain(x0, "x0 (initial point)")
    for name, v in (("num_samples", num_samples), ("thin", thin), ("check_every", check_every)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    x = x0
    out = torch.empty((x0.shape[0], num_samples, x0.shape[1]), dtype=x0.dtype, device=x0.device)
    total = warmup_steps + num_samples * thin
    for it in tqdm(range(1, total + 1), disable=not progress, desc=method):
        x = step(x, grad_f(x), generator, None)
        if it % check_every == 0:
            check_finite("state", x, it)
        k = it - warmup_steps
        if k > 0 and k % thin == 0:
            out[:, k // thin - 1] = x
    return out


# ---------------------------------------------------------------------------------------
# Pyro kernel
# ---------------------------------------------------------------------------------------


def _is_identity(t) -> bool:
    """True for (inverses / Independent wrappers of) the empty ComposeTransform, which is what
    ``biject_to`` gives for supports that are all of R^d."""
    while True:
        if isinstance(t, IndependentTransform):
            t = t.base_transform
        elif isinstance(t, _InverseTransform):
            t = t.inv
        else:
            return isinstance(t, ComposeTransform) and len(t.parts) == 0


class BregmanProximalLangevin(MCMCKernel):
    """Bregman proximal Langevin (BMUMLA / MYULA / proximal-gradient-like) for Pyro models.

    The potential is split as ``U(z) = f(z) + sum_s g_s(z_s)``: every site ``s`` named in
    ``nonsmooth`` contributes the nonsmooth term ``g_s`` (applied to the site's flattened value)
    *instead of* its prior ``log_prob``, and ``f`` is the rest of the model's negative log joint,
    from :class:`mcmc.potential.Potential` with ``exclude_sites=tuple(nonsmooth)``. Make
    ``g_s`` equal to the prior's negative log density up to a constant (e.g. a
    ``Laplace(0, b)`` prior is ``L1(1/b)``), otherwise the target changes.

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
        step_size: gamma > 0 (default 1e-3). lam: envelope parameter > 0 (default gamma).
        side: ``"left"`` / ``"right"`` envelope (BMUMLA). method: ``"bmumla"`` (default),
            ``"myula"`` or ``"bpg"`` (right envelope with lam = gamma).
        max_plate_nesting, init_strategy: as in Pyro (initial points are drawn in unconstrained
            space; the nonsmooth sites' initial values must lie in the mirror domain).
        generator: ``torch.Generator`` for the noise (default: the global RNG).

    Use it as ``pyro.infer.MCMC(kernel, num_samples, warmup_steps).run(*args)`` (one chain per
    Pyro chain), or, vectorised over many chains, :meth:`run_chains`.
    """

    def __init__(self, model: Callable, nonsmooth: dict[str, NonsmoothTerm],
                 mirror: MirrorMap | dict[str, MirrorMap] | None = None, *,
                 step_size: float = 1e-3, lam: float | None = None, side: str = "left",
                 method: str = "bmumla", max_plate_nesting: int | None = None,
                 init_strategy: Callable = init_to_uniform,
                 generator: torch.Generator | None = None) -> None:
        if not isinstance(nonsmooth, dict) or not nonsmooth:
            raise ValueError("nonsmooth must be a non-empty dict {site: NonsmoothTerm}")
        self.model = model
        self.nonsmooth = dict(nonsmooth)
        if isinstance(mirror, dict):
            missing = set(self.nonsmooth) - set(mirror)
            if missing:
                raise ValueError(f"mirror dict lacks nonsmooth site(s) {sorted(missing)}")
            self.mirrors = {k: mirror[k] for k in self.nonsmooth}
        else:
            self.mirrors = {k: mirror for k in self.nonsmooth}
        self.step_size = step_size
        self.lam = step_size if lam is None else lam
        self.side, self.method = side, method
        # validate every (term, mirror) pair now: clear errors before any model run
        self._steps = {k: _make_step(method, t, self.mirrors[k], step_size, self.lam, side)
                       for k, t in self.nonsmooth.items()}
        self.max_plate_nesting = max_plate_nesting
        self.init_strategy = init_strategy
        self.generator = generator
        self.potential: Potential | None = None
        self._initial_params = None
        self._iteration = 0
        self.transforms = None

    # -- setup ---------------------------------------------------------------------------
    def _build(self, args: tuple, kwargs: dict) -> Potential:
        pot = Potential(self.model, args, kwargs, max_plate_nesting=self.max_plate_nesting,
                        exclude_sites=tuple(self.nonsmooth))
        for site in self.nonsmooth:
            if site not in pot.site_slices:
                raise ValueError(f"nonsmooth site {site!r} is not a continuous latent site of the "
                                 f"model (latent sites: {sorted(pot.site_slices)})")
            if not _is_identity(pot.transforms[site]):
                raise ValueError(
                    f"nonsmooth site {site!r} has a constrained support (its unconstrained "
                    "transform is not the identity); a nonsmooth term of the constrained value is "
                    "not convex in unconstrained space. Give the site a prior on all of R^d "
                    "(e.g. Normal/Laplace/ImproperUniform(real)) and express the constraint with "
                    "a nonsmooth indicator term (Box, NonNegative, Simplex) plus a mirror map.")
        self.potential = pot
        self.transforms = pot.transforms
        return pot

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        pot = self._build(args, kwargs)
        self._iteration = 0
        if self._initial_params is None:
            z = pot.initial_params(1, self.init_strategy)
            self._initial_params = {k: v[0] for k, v in pot.unpack_unconstrained(z).items()}
        else:  # given by the user (unconstrained values, Pyro's convention)
            z = pot.pack_unconstrained({k: torch.as_tensor(v).unsqueeze(0)
                                        for k, v in self._initial_params.items()})
        self._check_init(z)

    def _check_init(self, z: torch.Tensor) -> None:
        for site, m in self.mirrors.items():
            if m is not None and self.method != "myula":
                m.check_domain(z[:, self.potential.site_slices[site]],
                               f"initial value of site {site!r}")

    @property
    def initial_params(self):
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params):
        self._initial_params = params

    # -- one step on flat (C, D) states ----------------------------------------------------
    def step_flat(self, z: torch.Tensor, iteration: int = 0) -> torch.Tensor:
        """One step for the flat unconstrained states ``z (C, D)`` of ``C`` chains."""
        pot = self.potential
        u, grad = pot.value_and_grad(z)
        # the gradient first: its message names the offending site(s)
        check_finite("gradient of the smooth potential", grad, iteration,
                     site_names=pot.site_slices)
        check_finite("smooth potential", u, iteration)
        xi = torch.randn(z.shape, generator=self.generator, dtype=z.dtype, device=z.device)
        # plain Langevin on the smooth sites; the nonsmooth sites are overwritten below
        new = z - self.step_size * grad + math.sqrt(2 * self.step_size) * xi
        for site, step in self._steps.items():
            sl = pot.site_slices[site]
            new[:, sl] = step(z[:, sl], grad[:, sl], None, xi[:, sl])
        check_finite("state", new, iteration, site_names=pot.site_slices)
        return new

    def sample(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pot = self.potential
        z = pot.pack_unconstrained({k: v.unsqueeze(0) for k, v in params.items()})
        self._iteration += 1
        z = self.step_flat(z, self._iteration)
        return {k: v[0] for k, v in pot.unpack_unconstrained(z).items()}

    def logging(self):
        return None

    def diagnostics(self):
        return {}

    # -- vectorised driver ----------------------------------------------------------------
    def run_chains(self, *args, num_chains: int, num_samples: int, warmup_steps: int = 0,
                   thin: int = 1, initial_params: dict[str, torch.Tensor] | None = None,
                   progress: bool = False, **kwargs) -> dict[str, torch.Tensor]:
        """Run ``num_chains`` chains at once (one model evaluation per step for all chains).

        ``initial_params``: optional ``{site: constrained value (C, *shape)}``.
        Returns ``{site: constrained draws (num_chains, num_samples, *shape)}``, ready for
        :func:`mcmc.diagnostics.to_inference_data`.
        """
        for name, v in (("num_chains", num_chains), ("num_samples", num_samples),
                        ("thin", thin)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        pot = self._build(args, kwargs)
        if initial_params is not None:
            z = pot.pack(initial_params)
            if z.shape[0] == 1 and num_chains > 1:
                z = z.expand(num_chains, -1).clone()
        else:
            z = pot.initial_params(num_chains, self.init_strategy)
        self._check_init(z)
        draws = torch.empty((num_chains, num_samples, pot.dim), dtype=z.dtype, device=z.device)
        total = warmup_steps + num_samples * thin
        for it in tqdm(range(1, total + 1), disable=not progress, desc=self.method):
            z = self.step_flat(z, it)
            k = it - warmup_steps
            if k > 0 and k % thin == 0:
                draws[:, k // thin - 1] = z
        flat = draws.reshape(num_chains * num_samples, pot.dim)
        return {k: v.reshape((num_chains, num_samples) + v.shape[1:])
                for k, v in pot.unpack(flat).items()}
