r"""Coin MSVGD: mirrored SVGD for constrained targets, with coin betting instead of a step size.

Mirrored SVGD (Shi, Liu & Mackey, "Sampling with mirror Stein operators", ICLR 2022) keeps the
particles in the *dual* space of a mirror map ``psi`` (:mod:`mcmc.mirror`): ``eta = grad psi(x)``,
``x = grad psi^*(eta)``, so every iterate maps back inside the constrained domain (e.g. the
simplex) by construction. With a scalar kernel ``k`` on the primal points and ``H(x) = Hess psi(x)``
the MSVGD direction for dual particle ``i`` is

    g(x_i) = (1/N) sum_j [ k(x_j, x_i) H_j^{-1} grad log p(x_j) + div_{x_j}(k(x_j, x_i) H_j^{-1}) ]

and equals plain SVGD in dual coordinates for the pushed-forward target
``p_eta(eta) = p(x) |det d x / d eta| = p(x) / det H(x)`` with the kernel evaluated on primal
points (using ``div H^{-1} = -H^{-1} grad log det H``):

    g(x_i) = (1/N) sum_j [ k_ij s_eta(eta_j) + 2 f'(r2_ij) H_j^{-1} (x_j - x_i) ],
    s_eta = H^{-1} (grad log p(x) - grad log det H(x)).

Coin MSVGD (Sharrock, Mackey & Nemeth, "Learning rate free sampling in constrained domains",
NeurIPS 2023) bets on ``c_t = g_t`` for each dual coordinate with :class:`mcmc.coin.CoinBetting`.

The repulsive term needs ``H_j^{-1} x_i`` for every pair ``(i, j)``; it is formed in row blocks of
shape ``(b, N, d)`` (memory ``O(b N d)``), using the mirror map's ``inverse_hessian_matvec``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .coin import FunctionPotential, ParticleSampler
from .kernels import RBFKernel, StationaryKernel, resolve_chunk_size
from .mirror import MirrorMap
from .potential import Potential

__all__ = ["CoinMSVGD", "msvgd_direction"]


def msvgd_direction(
    x: torch.Tensor,
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    mirror: MirrorMap,
    kernel: StationaryKernel,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mirrored SVGD direction (dual space) at primal particles ``x (N, d)`` (see module doc)."""
    n, d = x.shape
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        obj = log_prob(xx) - mirror.logdet_hessian(xx)
        (g,) = torch.autograd.grad(obj.sum(), xx)
    x = x.detach()
    score_eta = mirror.inverse_hessian_matvec(x, g)
    l2 = kernel.bandwidth_sq(x)
    if chunk_size is None:  # blocks are (b, N, d) here, hence the d in the default
        chunk_size = max(1, min(n, (1 << 22) // max(n * d, 1)))
    else:
        chunk_size = resolve_chunk_size(chunk_size, n)  # validates it
    hinv_x = mirror.inverse_hessian_matvec(x, x)  # H_j^{-1} x_j, (N, d)
    sq = x.pow(2).sum(-1)
    out = []
    for i in range(0, n, chunk_size):
        xi = x[i : i + chunk_size]
        r2 = (sq[i : i + chunk_size, None] + sq[None, :] - 2 * xi @ x.T).clamp_min(0)
        f, f1, _ = kernel.profile(r2, l2)
        # H_j^{-1} x_i for all pairs of the block: (b, N, d)
        hinv_xi = mirror.inverse_hessian_matvec(x.unsqueeze(0), xi.unsqueeze(1).expand(-1, n, -1))
        rep = 2 * (f1 @ hinv_x - (f1.unsqueeze(-1) * hinv_xi).sum(1))
        out.append(f @ score_eta + rep)
    return torch.cat(out) / n


class CoinMSVGD(ParticleSampler):
    """Learning-rate-free mirrored SVGD for a log-density on a constrained domain.

    Args:
        log_prob: ``(N, d) -> (N,)`` unnormalised log density of the target in the mirror map's
            primal coordinates (for :class:`mcmc.mirror.SimplexEntropy`: the first ``K - 1``
            coordinates of a point of the ``K``-simplex).
        mirror: a :class:`mcmc.mirror.MirrorMap` whose domain is the constraint set.
        num_particles: ``N >= 2``.
        initial_particles: ``(N, d)`` primal points inside the domain (required).
        kernel: a :class:`mcmc.kernels.StationaryKernel` on primal points (default RBF, median).
        optim: ``None`` for coin betting; ``params -> Optimizer`` or ``PyroOptim`` for MSVGD with
            a learning rate (applied to the dual particles).
        chunk_size: rows per block.

    The optimizer state lives in the dual space: :attr:`particles` holds ``eta = grad psi(x)``;
    :meth:`get_named_particles` returns ``{name: primal (N, d)}`` (for :meth:`from_model`,
    ``{site: value (N, *site_shape)}``, e.g. the full simplex vector).
    """

    def __init__(
        self,
        log_prob: Callable[[torch.Tensor], torch.Tensor],
        mirror: MirrorMap,
        num_particles: int,
        initial_particles: torch.Tensor,
        kernel: StationaryKernel | None = None,
        *,
        optim=None,
        chunk_size: int | None = None,
        name: str = "x",
    ) -> None:
        if not isinstance(mirror, MirrorMap):
            raise TypeError(f"mirror must be a mcmc.mirror.MirrorMap, got {type(mirror).__name__}")
        x0 = torch.as_tensor(initial_particles)
        if x0.dim() != 2:
            raise ValueError(f"initial_particles must be (N, d), got {tuple(x0.shape)}")
        mirror.check_domain(x0, "initial_particles")
        kernel = RBFKernel() if kernel is None else kernel
        if not isinstance(kernel, StationaryKernel):
            raise TypeError(f"kernel must be a mcmc.kernels.StationaryKernel, got "
                            f"{type(kernel).__name__}")
        pot = FunctionPotential(log_prob, x0.shape[1], name=name)
        # The dual coordinates of the mirror map are already O(1) for the simplex map; no Laplace
        # whitening here (the target is not a Pyro potential in unconstrained space).
        super().__init__(pot, num_particles, optim=optim, initial_particles=mirror.grad_phi(x0),
                         precondition=None)
        self.mirror = mirror
        self.kernel = kernel
        self.chunk_size = chunk_size
        self.log_prob = log_prob
        self._to_value = None

    @classmethod
    def from_model(
        cls,
        model: Callable,
        site: str,
        mirror: MirrorMap,
        num_particles: int,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        *,
        max_plate_nesting: int | None = None,
        initial_particles: torch.Tensor | None = None,
        **kwargs,
    ) -> CoinMSVGD:
        """Coin MSVGD for a Pyro model whose only latent site ``site`` lives in the mirror
        map's domain (for :class:`mcmc.mirror.SimplexEntropy`: a ``simplex``-supported site such
        as a ``Dirichlet``, whose first ``K - 1`` coordinates are the primal particles).

        The target is the model's log joint at the *constrained* value (no Jacobian: the mirror
        map, not a bijection to R^d, handles the constraint), evaluated for all particles at once
        under a particle plate left of the model's plates
        (:meth:`mcmc.potential.Potential.log_density`). ``initial_particles`` (primal
        ``(N, d)``) default to draws from the site's prior.
        """
        from .mirror import SimplexEntropy

        model_kwargs = dict(model_kwargs or {})
        with torch.no_grad(), poutine.block():
            proto = poutine.trace(model).get_trace(*model_args, **model_kwargs)
        latent = [n for n, node in proto.nodes.items() if node["type"] == "sample"
                  and not node["is_observed"] and not site_is_subsample(node)]
        if site not in latent:
            raise ValueError(f"site {site!r} is not a latent sample site of the model "
                             f"(latent sites: {latent})")
        others = [n for n in latent if n != site]
        if others:
            raise ValueError(f"CoinMSVGD.from_model needs {site!r} to be the only latent site; "
                             f"the model also samples {others}")
        # The shared potential layer gives the particle-plate log joint at constrained values.
        pot = Potential(model, model_args, model_kwargs, max_plate_nesting=max_plate_nesting)
        node = proto.nodes[site]
        shape = node["value"].shape
        simplex = isinstance(mirror, SimplexEntropy)
        to_value = mirror.to_simplex if simplex else (lambda x: x)

        def log_prob(x: torch.Tensor) -> torch.Tensor:
            return pot.log_density({site: to_value(x).reshape((x.shape[0],) + shape)})

        if initial_particles is None:
            with torch.no_grad():
                draws = node["fn"].sample((num_particles,)).reshape((num_particles,) + shape)
            initial_particles = mirror.from_simplex(draws) if simplex else draws
        out = cls(log_prob, mirror, num_particles, initial_particles, name=site, **kwargs)
        out._to_value = to_value
        return out

    def primal(self) -> torch.Tensor:
        """Primal particles ``x = grad psi^*(eta)``, ``(N, d)``."""
        return self.mirror.grad_phi_conj(self.get_particles())

    def direction(self, pot, eta):
        return msvgd_direction(self.mirror.grad_phi_conj(eta), self.log_prob, self.mirror,
                               self.kernel, self.chunk_size)

    def get_named_particles(self) -> dict[str, torch.Tensor]:
        x = self.primal()
        return {self.potential.name: x if self._to_value is None else self._to_value(x)}

    def scores(self) -> torch.Tensor:
        """``grad log p`` at the primal particles (primal coordinates)."""
        return -self.potential.value_and_grad(self.primal())[1]

    def _whitened_ksd(self, z):
        raise NotImplementedError  # no Euclidean KSD on a bounded domain (see ksd)

    def ksd(self, kernel=None, chunk_size=None) -> float:
        raise NotImplementedError(
            "the Euclidean KSD is not a valid discrepancy on a bounded domain; use "
            "models.metrics.energy_distance against reference draws instead"
        )
