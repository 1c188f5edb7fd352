"""Coin SVGD: Stein variational gradient descent with coin betting instead of a learning rate.

Sharrock & Nemeth (ICML 2023), Sec. 3 (Coin SVGD): each particle coordinate bets on the SVGD
direction

    phi_t(x_i) = (1/N) sum_j [k(x_j, x_i) grad log p(x_j) + grad_{x_j} k(x_j, x_i)]

(Liu & Wang 2016, eq. 8) with the coin-betting update of :mod:`mcmc.coin`. Particles live in the
model's unconstrained space (``grad log p`` there is ``-grad U`` of :class:`mcmc.potential.
Potential`, Jacobian included), and are returned constrained by :meth:`get_named_particles`.

Why not ``pyro.infer.SVGD`` underneath
--------------------------------------
Pyro 1.9's ``SVGD`` keeps all particles in one ``AutoContinuous`` parameter ``svgd_particles``
that is packed *site-major* (``[site1 of particle 1..N, site2 of particle 1..N, ...]``, because the
model runs vectorised and each site's value ``(N, *shape)`` is flattened in turn) but then
``reshape(num_particles, -1)`` reads it *particle-major*. With a single latent site both orders
coincide; with two or more, the "particles" the kernel sees are mixtures of coordinates of
different particles, and the repulsion acts between the wrong points (the fixed point is wrong,
see ``tests/test_coin.py::test_multisite_matches_single_site``). Here the particles are an
``(N, D)`` tensor packed particle-major by :class:`mcmc.potential.Potential` (one row per
particle, sites concatenated along the row), so the grouping is right for any number of sites.
We therefore do not wrap ``pyro.infer.SVGD`` at all; Pyro's kernels (``RBFSteinKernel``,
``IMQSteinKernel``) are still accepted and used with Pyro's own ``univariate``/``multivariate``
formulas.
"""

from __future__ import annotations

import torch
from pyro.infer.svgd import SteinKernel

from .coin import ParticleSampler
from .kernels import RBFKernel, StationaryKernel, svgd_direction

__all__ = ["CoinSVGD", "pyro_kernel_direction"]


def pyro_kernel_direction(
    x: torch.Tensor, score: torch.Tensor, kernel: SteinKernel, mode: str = "univariate"
) -> torch.Tensor:
    """SVGD direction with a Pyro ``SteinKernel`` (same formulas as ``pyro.infer.SVGD.step``).

    Pyro's ``kernel_grad[n, m] = -grad_{x_m} log k(x_n, x_m)``, so the repulsive term is
    ``-sum_m k * kernel_grad``. Builds ``(N, N, D)`` tensors, as Pyro does.
    """
    n = x.shape[0]
    log_kernel, kernel_grad = kernel.log_kernel_and_grad(x)
    if mode == "multivariate":
        k = log_kernel.sum(-1).exp()
        attract = k @ score
        repulse = -torch.einsum("nm,nmd->nd", k, kernel_grad)
    elif mode == "univariate":
        k = log_kernel.exp()
        attract = torch.einsum("nmd,md->nd", k, score)
        repulse = -torch.einsum("nmd,nmd->nd", k, kernel_grad)
    else:
        raise ValueError(f"mode must be 'univariate' or 'multivariate', got {mode!r}")
    return (attract + repulse) / n


class CoinSVGD(ParticleSampler):
    """Learning-rate-free SVGD for Pyro models (or any potential), multi-site correct.

    Args:
        model: a Pyro model with continuous latent sites (discrete latents raise ValueError), or
            a potential object (:class:`mcmc.potential.Potential`, :class:`mcmc.coin.
            FunctionPotential`).
        kernel: a :class:`mcmc.kernels.StationaryKernel` (default ``RBFKernel()``, median
            bandwidth) or a Pyro ``SteinKernel``.
        num_particles: ``N >= 2``.
        max_plate_nesting: the model's plate nesting (inferred when None).
        mode: for Pyro kernels only: ``"univariate"`` (Pyro's default) or ``"multivariate"``.
        optim: ``None`` for coin betting; a ``pyro.optim.PyroOptim`` or ``params -> Optimizer``
            for ordinary (learning-rate) SVGD on the same code path.
        chunk_size: rows per kernel block (memory ``O(chunk_size * N)``).
        init_strategy, initial_particles, vectorize, precondition, warmup_steps, capture: see
            :class:`mcmc.coin.ParticleSampler` (default: Laplace-whitened particles started at
            Laplace draws, the whitening re-fitted to the particles during 200 warm-up steps;
            ``precondition=None`` with ``RBFKernel(median_rule="liu_wang")`` is the paper's
            setting).

    Example::

        svgd = CoinSVGD(model, num_particles=100)
        svgd.run(1000, data)                  # model args as in pyro.infer.SVGD.step
        draws = svgd.get_named_particles()    # {site: (100, *shape)}
        idata = svgd.to_inference_data()      # one chain of 100 draws
    """

    def __init__(
        self,
        model,
        kernel: StationaryKernel | SteinKernel | None = None,
        num_particles: int = 100,
        max_plate_nesting: int | None = None,
        *,
        mode: str | None = None,
        optim=None,
        chunk_size: int | None = None,
        init_strategy=None,
        initial_particles=None,
        vectorize: str = "auto",
        precondition: str | None = "laplace",
        warmup_steps: int = 200,
        capture: str | bool = "auto",
    ) -> None:
        super().__init__(
            model,
            num_particles,
            max_plate_nesting=max_plate_nesting,
            optim=optim,
            init_strategy=init_strategy,
            initial_particles=initial_particles,
            vectorize=vectorize,
            precondition=precondition,
            warmup_steps=warmup_steps,
            capture=capture,
        )
        kernel = RBFKernel() if kernel is None else kernel
        if isinstance(kernel, SteinKernel):
            mode = "univariate" if mode is None else mode
            if mode not in ("univariate", "multivariate"):
                raise ValueError(f"mode must be 'univariate' or 'multivariate', got {mode!r}")
        elif isinstance(kernel, StationaryKernel):
            if mode not in (None, "multivariate"):
                raise ValueError("mode applies to Pyro SteinKernels only; pyroforge kernels are "
                                 f"multivariate (got mode={mode!r})")
        else:
            raise TypeError("kernel must be a mcmc.kernels.StationaryKernel or a Pyro "
                            f"SteinKernel, got {type(kernel).__name__}")
        self.kernel = kernel
        self.mode = mode
        self.chunk_size = chunk_size

    def direction(self, pot, z: torch.Tensor) -> torch.Tensor:
        _, grad_u = pot.value_and_grad(z)
        self._check("potential gradient", grad_u, pot)
        score = -grad_u
        if isinstance(self.kernel, SteinKernel):
            return pyro_kernel_direction(z, score, self.kernel, self.mode)
        return svgd_direction(z, score, self.kernel, self.chunk_size)
