r"""Mode, curvature and Laplace approximation of a potential: the one place samplers get them.

Every sampler that needs to know "where the posterior is and how wide it is" before it starts
uses these functions: the coin samplers (whitened coordinates and a start in the bulk,
:class:`mcmc.coin.ParticleSampler`), the SGLD family (default step size and the Laplace
preconditioner, :mod:`mcmc.sgld`), CV-SGLD (its anchor), the federated samplers (shard modes) and
the CLI.

For a potential ``U(z) = -log p(z | D)`` on ``R^D`` (:class:`mcmc.potential.Potential`, or any
object with ``__call__(z (C, D)) -> (C,)`` differentiable in ``z``):

* :func:`find_mode`: ``z_hat = argmin U`` by L-BFGS with a strong-Wolfe line search.
* :func:`hessian_vector_product`: ``H(z) v`` for a batch of vectors ``v_1..v_K``, exact, by
  double back-propagation through ``K`` copies of ``z`` evaluated as ``K`` chains (the rows are
  independent, so row ``k`` of ``grad_Z sum_k v_k . grad U(Z_k)`` is ``H v_k``).
* :func:`hessian`: the dense ``D x D`` Hessian, ``chunk_size`` products at a time;
  :func:`hessian_diagonal` its diagonal (exact, or Hutchinson's estimator for large ``D``).
* :func:`largest_eigenvalue`: ``lambda_max(H)`` by power iteration on exact Hessian-vector
  products.
* :func:`laplace_approximation`: ``N(z_hat, H^{-1})`` (Laplace's method; e.g. Bishop, *Pattern
  Recognition and Machine Learning*, Sec. 4.4), returned as the mode and the lower Cholesky
  factor ``L`` of ``H^{-1}``. Eigenvalues of ``H`` are floored at ``rel_floor * lambda_max`` so
  that flat or slightly non-convex directions (a mode not fully converged, a saddle, a funnel)
  still give a finite scale.
* :func:`gradient_noise`: the largest eigenvalue ``V`` of the covariance of minibatch gradient
  estimates at a point (optionally in whitened coordinates ``L^T g``).
* :func:`default_step_size`: the Langevin step size
  ``h = min(2 b / lambda_max, 2 b_V / (lambda_max + V))``.

Why that step size
------------------
For a Gaussian target of precision ``P`` and gradient noise of covariance ``V`` the (stochastic)
Langevin chain ``z' = z - h g + sqrt(2h) xi`` has the stationary covariance ``Sigma`` solving
``Sigma = (I - hP) Sigma (I - hP)^T + 2hI + h^2 V`` (Welling & Teh 2011; the linear-Gaussian
analysis of e.g. Vollmer, Zygalakis & Teh, JMLR 2016). In one dimension
``Sigma = (1 + hV/2) / (P (1 - hP/2))``: the variance is inflated by about ``1 + h (P + V) / 2``.
``h = 2 b / (lambda_max + V_max)`` keeps that inflation below ``1 + b`` in every direction.
:func:`default_step_size` bounds the discretisation part (``V = 0``) by ``b = 5 %`` -- the
familiar ``0.1 / lambda_max`` in full batch, ``0.1`` in Laplace-whitened coordinates (``P ~ I``)
-- and the total, minibatch noise included, by ``b_V = 25 %``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "Laplace",
    "default_step_size",
    "find_mode",
    "gradient_noise",
    "hessian",
    "hessian_diagonal",
    "hessian_vector_product",
    "laplace_approximation",
    "largest_eigenvalue",
    "minibatch_gradients",
]


class Laplace(NamedTuple):
    """Gaussian approximation ``N(mode, scale_tril scale_tril^T)`` of a posterior."""

    mode: torch.Tensor  # (D,)
    scale_tril: torch.Tensor  # (D, D) lower triangular; scale_tril @ scale_tril.T = H^{-1}
    hessian: torch.Tensor  # (D, D) at the mode (before flooring)


def _as_point(z: torch.Tensor) -> torch.Tensor:
    z = torch.as_tensor(z).detach()
    if z.dim() == 1:
        z = z.unsqueeze(0)
    if z.dim() != 2 or z.shape[0] != 1:
        raise ValueError(f"expected one point of shape (D,) or (1, D), got {tuple(z.shape)}")
    return z


def find_mode(
    potential,
    z0: torch.Tensor,
    *,
    num_steps: int = 200,
    tolerance: float = 1e-9,
) -> torch.Tensor:
    """Minimise the full-data potential from ``z0`` (``(D,)`` or ``(1, D)``) with L-BFGS
    (strong-Wolfe line search, at most ``num_steps`` iterations).

    Returns the mode ``(1, D)`` (detached). A potential that does not depend on ``z`` (zero
    gradient) returns ``z0``. Raises ``FloatingPointError`` when the search diverges (a
    non-finite point or potential; e.g. a funnel, which has no mode).
    """
    z = _as_point(z0).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [z],
        max_iter=num_steps,
        tolerance_grad=tolerance,
        tolerance_change=tolerance * 1e-3,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        if not bool(torch.isfinite(z).all()):
            raise FloatingPointError("the mode search diverged (non-finite point)")
        u = potential(z).sum()
        if u.requires_grad:
            u.backward()
        else:
            z.grad = torch.zeros_like(z)
        return u

    opt.step(closure)
    z = z.detach()
    if not bool(torch.isfinite(z).all()) or not bool(torch.isfinite(potential(z)).all()):
        raise FloatingPointError("the mode search diverged (non-finite point or potential)")
    return z


def hessian_vector_product(potential, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H(z) v_k`` for each row ``v_k`` of ``v (K, D)`` at one point ``z`` (``(D,)``/``(1, D)``).

    The potential is evaluated at ``K`` copies of ``z`` (``K`` chains: vectorised the way the
    potential vectorises chains) and differentiated twice. Returns ``(K, D)`` (detached).
    """
    z = _as_point(z)
    v = torch.as_tensor(v, dtype=z.dtype, device=z.device).detach()
    if v.dim() == 1:
        v = v.unsqueeze(0)
    with torch.enable_grad():
        Z = z.expand(v.shape[0], -1).clone().requires_grad_(True)
        u = potential(Z)
        if not u.requires_grad:
            return torch.zeros_like(v)
        (g,) = torch.autograd.grad(u.sum(), Z, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:  # linear (or constant) potential
            return torch.zeros_like(v)
        (hv,) = torch.autograd.grad((g * v).sum(), Z, allow_unused=True)
    return torch.zeros_like(v) if hv is None else hv.detach()


def hessian(potential, z: torch.Tensor, *, chunk_size: int | None = 64) -> torch.Tensor:
    """Exact (symmetrised) Hessian ``(D, D)`` of ``potential`` at ``z``, ``chunk_size``
    Hessian-vector products per batch (``None``: all ``D`` at once)."""
    z = _as_point(z)
    D = z.shape[-1]
    chunk = D if chunk_size is None else max(1, int(chunk_size))
    eye = torch.eye(D, dtype=z.dtype, device=z.device)
    H = torch.cat([hessian_vector_product(potential, z, eye[i : i + chunk])
                   for i in range(0, D, chunk)])
    return (H + H.T) / 2


def hessian_diagonal(
    potential,
    z: torch.Tensor,
    *,
    max_exact_dim: int = 1024,
    num_probes: int = 64,
    chunk_size: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Diagonal ``(D,)`` of the Hessian at ``z``: exact (``D`` Hessian-vector products, in
    batches of ``chunk_size``) when ``D <= max_exact_dim``, else Hutchinson's estimator
    ``mean_k v_k * (H v_k)`` over ``num_probes`` Rademacher vectors ``v_k`` (unbiased)."""
    z = _as_point(z)
    D = z.shape[-1]
    if D <= max_exact_dim:
        eye = torch.eye(D, dtype=z.dtype, device=z.device)
        return torch.cat([
            hessian_vector_product(potential, z, eye[i : i + chunk_size])
            .gather(1, torch.arange(i, min(i + chunk_size, D), device=z.device)[:, None])[:, 0]
            for i in range(0, D, chunk_size)
        ])
    v = torch.randint(2, (num_probes, D), generator=generator).to(z) * 2 - 1
    out = torch.zeros(D, dtype=z.dtype, device=z.device)
    for i in range(0, num_probes, chunk_size):
        vi = v[i : i + chunk_size]
        out += (vi * hessian_vector_product(potential, z, vi)).sum(0)
    return out / num_probes


def largest_eigenvalue(
    potential,
    z: torch.Tensor,
    *,
    num_iters: int = 30,
    rtol: float = 1e-3,
    generator: torch.Generator | None = None,
    preconditioner=None,
) -> float:
    """``|lambda|`` of the dominant eigenvalue of the Hessian at ``z`` by power iteration on exact
    Hessian-vector products: at most ``num_iters`` products, stopping when the Rayleigh quotient
    changes by less than ``rtol`` (relative). ``0.0`` for a potential with zero curvature.

    ``preconditioner``: a map ``v (1, D) -> P v`` with ``P`` symmetric positive definite; the
    iteration then runs on ``P H``, whose eigenvalues are those of ``P^{1/2} H P^{1/2}``: the
    curvature relative to the metric ``P^{-1}`` (e.g. ``P`` the inverse Hessian of a mirror
    map, the quantity a mirror-Langevin step size must stay below)."""
    z = _as_point(z)
    v = torch.randn(z.shape, generator=generator, dtype=z.dtype, device="cpu").to(z.device)
    v = v / v.norm()
    lam = float("nan")
    for _ in range(num_iters):
        hv = hessian_vector_product(potential, z, v)
        if preconditioner is not None:
            hv = preconditioner(hv)
        new = float((hv * v).sum())
        norm = hv.norm()
        if not bool(torch.isfinite(norm)):
            raise FloatingPointError("largest_eigenvalue: non-finite Hessian-vector product at "
                                     "the point (is the potential finite there?)")
        if float(norm) == 0.0:
            return 0.0
        v = hv / norm
        if not math.isnan(lam) and abs(new - lam) <= rtol * abs(new):
            lam = new
            break
        lam = new
    return abs(lam)


def laplace_approximation(
    potential,
    z0: torch.Tensor,
    *,
    num_steps: int = 200,
    rel_floor: float = 1e-8,
    chunk_size: int | None = 64,
    mode: torch.Tensor | None = None,
) -> Laplace:
    """Mode (L-BFGS from ``z0``, or ``mode`` as given) and the Cholesky factor of ``H^{-1}``
    there (see the module docstring). Cost: one mode search, ``D`` Hessian-vector products and
    an ``O(D^3)`` eigendecomposition; memory ``O(D^2)``.

    Raises ``FloatingPointError`` when the mode search or the Hessian is not finite.
    """
    if mode is None:
        mode = find_mode(potential, z0, num_steps=num_steps)
    mode = _as_point(mode)
    if not bool(torch.isfinite(mode).all()):
        raise FloatingPointError("Laplace approximation: the mode search diverged (non-finite "
                                 "point)")
    H = hessian(potential, mode, chunk_size=chunk_size)
    if not bool(torch.isfinite(H).all()):
        raise FloatingPointError("Laplace approximation: non-finite Hessian at the mode")
    ev, V = torch.linalg.eigh(H)
    top = float(ev.abs().max())
    floor = rel_floor * top if top > 0 else 1.0
    ev = ev.clamp_min(floor)
    # H^{-1} = R R^T with R = V diag(ev^-1/2); its lower Cholesky factor is L = T^T for the QR
    # decomposition R^T = Q T (then R R^T = T^T T), which never forms the ill-conditioned H^{-1}.
    root = V * ev.rsqrt()
    tri = torch.linalg.qr(root.T).R
    sign = torch.sign(tri.diagonal())
    scale_tril = tri.T * torch.where(sign != 0, sign, torch.ones_like(sign))
    return Laplace(mode[0], scale_tril, H)


def minibatch_gradients(
    potential,
    z: torch.Tensor,
    *,
    num_batches: int = 64,
    generator: torch.Generator | None = None,
    with_replacement: bool = False,
) -> torch.Tensor:
    """``(num_batches, D)`` minibatch gradient estimates of ``grad U(z)``, one per independent
    minibatch (:meth:`mcmc.potential.Potential.draw_indices`, one per copy of ``z``); the
    full-data gradient repeated for a potential without subsampled plates."""
    z = _as_point(z)
    idx = None
    if getattr(potential, "subsampled", False):
        idx = potential.draw_indices(num_batches, generator, with_replacement=with_replacement)
    _, g = potential.value_and_grad(z.expand(num_batches, -1).clone(), idx)
    if not bool(torch.isfinite(g).all()):
        raise FloatingPointError("non-finite minibatch gradient at the point")
    return g


def gradient_noise(
    potential=None,
    z: torch.Tensor | None = None,
    *,
    num_batches: int = 64,
    generator: torch.Generator | None = None,
    scale_tril: torch.Tensor | None = None,
    with_replacement: bool = False,
    gradients: torch.Tensor | None = None,
) -> float:
    """Largest eigenvalue ``V`` of the covariance of minibatch gradient estimates at ``z``.

    ``gradients`` (``(K, D)``, e.g. from :func:`minibatch_gradients`) or ``num_batches`` fresh
    ones at ``z``; with ``scale_tril=L`` the covariance of ``L^T g`` (the noise in the
    coordinates ``z = L y``). The top eigenvalue comes from the ``K x K`` Gram matrix, cheap for
    any ``D``. ``0.0`` for a potential without subsampled plates.
    """
    if gradients is None:
        if not getattr(potential, "subsampled", False):
            return 0.0
        gradients = minibatch_gradients(potential, z, num_batches=num_batches,
                                        generator=generator, with_replacement=with_replacement)
    g = gradients if scale_tril is None else gradients @ scale_tril
    g = g - g.mean(0, keepdim=True)
    gram = (g @ g.T) / max(g.shape[0] - 1, 1)
    return float(torch.linalg.eigvalsh(gram).max().clamp_min(0))


def default_step_size(
    potential,
    z: torch.Tensor,
    *,
    fraction: float = 0.05,
    noise_fraction: float = 0.25,
    curvature: float | None = None,
    noise: float = 0.0,
    num_iters: int = 30,
    generator: torch.Generator | None = None,
) -> float:
    """Langevin step size ``h = min(2 b / lambda_max, 2 b_V / (lambda_max + V))`` at ``z`` (usually
    the mode), with ``b = fraction`` and ``b_V = noise_fraction``.

    ``lambda_max`` is the largest Hessian eigenvalue (:func:`largest_eigenvalue`, unless
    ``curvature`` is given, e.g. 1 in whitened coordinates) and ``V`` the gradient-noise
    eigenvalue (:func:`gradient_noise`; 0 for full-data gradients). On a Gaussian target the
    stationary variance is inflated by about ``1 + h (lambda + V) / 2`` (module docstring): the
    discretisation alone by at most ``1 + b`` (default 5 %, i.e. ``h = 0.1 / lambda_max`` in full
    batch), discretisation and minibatch noise together by at most ``1 + b_V`` (default 25 %,
    sd +12 %, in the noisiest direction). Minibatch noise is SGLD's price for cheap gradients;
    a smaller step would shrink that bias only at the cost of mixing (a relaxation time of
    ``~1 / (h lambda_min)`` steps), so beyond ``b_V`` the step shrinks, below it the
    discretisation bound rules.
    """
    for what, b in (("fraction", fraction), ("noise_fraction", noise_fraction)):
        if not 0 < b < 1:
            raise ValueError(f"{what} must be in (0, 1), got {b!r}")
    lam = curvature if curvature is not None else largest_eigenvalue(
        potential, z, num_iters=num_iters, generator=generator)
    if not (math.isfinite(lam) and math.isfinite(noise)) or lam <= 0:
        raise ValueError(
            f"cannot choose a step size from the curvature ({lam:.3g}) and gradient noise "
            f"({noise:.3g}) at the mode (not a strict local minimum?); give step_size "
            "explicitly")
    return min(2.0 * fraction / lam, 2.0 * noise_fraction / (lam + noise))
