"""Stochastic-gradient Langevin dynamics: SGLD, preconditioned SGLD and control-variate SGLD.

Every sampler here targets ``pi(z) ∝ exp(-U(z))`` with ``U`` the unconstrained potential of a Pyro
model (:class:`mcmc.potential.Potential`), using a minibatch estimate ``g(z)`` of ``grad U(z)``.

Pure step functions (the math; no Pyro, vectorised over the leading chain dim)
------------------------------------------------------------------------------
* :func:`sgld_step` -- Welling & Teh (ICML 2011), eq. 4, written with ``h = epsilon / 2``::

      z' = z - h g(z) + sqrt(2 h) xi,          xi ~ N(0, I).

  For a Gaussian target ``U(z) = z^T P z / 2`` and gradient noise of covariance ``V`` the chain
  is a VAR(1) process with exact stationary mean and covariance solving
  ``Sigma = (I - hP) Sigma (I - hP)^T + 2hI + h^2 V`` (tested).
* :func:`psgld_step` -- Li, Chen, Carlson & Carin (AAAI 2016), Algorithm 1 / eq. 4, with the
  RMSprop preconditioner ``G = diag(1 / (lambda + sqrt(v)))``,
  ``v <- alpha v + (1 - alpha) g * g``::

      z' = z - h G g(z) + sqrt(2 h G) xi.

  The correction term ``Gamma_i(z) = sum_j dG_ij / dz_j`` of the paper's eq. 4 is **omitted**
  (as in the paper's own experiments): ``G`` depends on the past gradients, not on ``z`` directly,
  and changes slowly for ``alpha`` near 1, so the omitted term is ``O((1 - alpha) / h)``-small;
  the price is a small extra bias. We precondition with the gradient of ``U`` itself (the
  paper uses the per-datum mean gradient, i.e. ``g / N``), so ``lambda`` is on the scale of ``g``.
* :func:`cv_gradient` -- Baker, Fearnhead, Fox & Nemeth (Statistics and Computing 2019), eq. 5:
  ``g_cv(z) = grad U(z_hat) + g_B(z) - g_B(z_hat)``, with ``z_hat`` a mode found first by an
  optimiser, the full-data gradient at ``z_hat`` computed once, and the **same** minibatch ``B``
  for both minibatch terms. For a model whose log-likelihood is quadratic in ``z`` with a
  data-independent Hessian the correction is exact and CV-SGLD equals full-batch ULA (tested).

Pyro kernels
------------
:class:`SGLD`, :class:`pSGLD` and :class:`CVSGLD` are :class:`pyro.infer.mcmc.MCMCKernel` s and
take any model ``pyro.infer.NUTS`` takes::

    mcmc = pyro.infer.MCMC(SGLD(model, step_size=1e-3, subsample_size=100),
                           num_samples=1000, warmup_steps=200)
    mcmc.run(*model_args, **model_kwargs)

Minibatches are expressed the Pyro way (:mod:`mcmc.potential`): a plate the model declares with
``subsample_size=B``, or ``SGLD(model, subsample_size=B)`` (or ``{plate: B}``) on a model that
indexes its data with the plate's indices. The kernel draws the rows from its own generator.

They count their own steps (Pyro's ``MCMC`` never calls ``end_warmup``) so the step-size
schedule sees the global step index. :meth:`SGLD.sample_chains` runs ``C`` chains *vectorised*
in one process (each chain gets its own minibatch unless ``shared_minibatch=True``) through the
one chain driver :class:`mcmc.chains.ChainDriver` (warm-up, thinning, progress bar, NaN checks,
checkpoints) and is the fast path for many chains.

Non-finite values
-----------------
``on_nonfinite="raise"`` (default): a NaN/inf potential, gradient or state stops the run with a
:class:`FloatingPointError` naming the iteration, the chains and the sites affected.
``on_nonfinite="halve"`` (opt-in): the potential and gradient at each proposal are part of the
state, so when they are not finite that chain's proposal is rejected, its step-size multiplier
is halved **for the rest of the run** and a new proposal is drawn from the current point with
fresh noise; after ``max_halvings`` failures in one step the run stops with the error above.
Returned draws are always finite.

Checkpointing
-------------
:meth:`SGLD.state_dict` holds the chain states, the step counter, the multipliers and the state
of the sampler's ``torch.Generator`` (all randomness -- noise and minibatch rows -- comes from
it); :meth:`SGLD.load_state_dict` restores them, and the draws after resuming are bit-identical
to an uninterrupted run. A checkpoint continues with its own number of chains: asking for
another ``num_chains`` is an error (call :meth:`SGLD.reset` to start afresh).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .chains import LangevinKernel, StepRandomness
from .potential import Potential, check_finite

__all__ = [
    "CVSGLD",
    "SGLD",
    "PSGLDState",
    "SGLDState",
    "cv_gradient",
    "find_mode",
    "pSGLD",
    "psgld_step",
    "sgld_step",
]


# --------------------------------------------------------------------------- pure step functions
def _sqrt(x):
    return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)


def sgld_step(
    z: torch.Tensor, grad: torch.Tensor, step_size: float | torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """One SGLD step ``z - h grad + sqrt(2h) noise`` (Welling & Teh 2011, eq. 4, ``h = eps/2``).

    Args:
        z: ``(C, D)`` current points. grad: ``(C, D)`` (stochastic) gradient of ``U`` at ``z``.
        step_size: ``h`` (a number, or a ``(C, 1)`` tensor of per-chain step sizes).
        noise: ``(C, D)`` standard normal draws.
    """
    return z - step_size * grad + _sqrt(2 * step_size) * noise


def psgld_step(
    z: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    step_size: float | torch.Tensor,
    noise: torch.Tensor,
    alpha: float = 0.99,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pSGLD step (Li et al. 2016, Alg. 1) without the ``Gamma`` correction term.

    ``v' = alpha v + (1 - alpha) g*g``, ``G = 1 / (eps + sqrt(v'))``,
    ``z' = z - h G g + sqrt(2 h G) xi``. Returns ``(z', v')``.
    """
    v = alpha * square_avg + (1 - alpha) * grad * grad
    precond = 1.0 / (eps + v.sqrt())
    return z - step_size * precond * grad + (2 * step_size * precond).sqrt() * noise, v


def cv_gradient(
    grad_batch: torch.Tensor, grad_batch_anchor: torch.Tensor, grad_full_anchor: torch.Tensor
) -> torch.Tensor:
    """Control-variate gradient ``grad U(z_hat) + g_B(z) - g_B(z_hat)`` (Baker et al. 2019)."""
    return grad_full_anchor + grad_batch - grad_batch_anchor


def find_mode(
    potential: Potential,
    z0: torch.Tensor,
    *,
    num_steps: int = 200,
    tolerance: float = 1e-9,
) -> torch.Tensor:
    """Minimise the full-data potential from ``z0`` (``(1, D)``) with L-BFGS (strong Wolfe).

    Returns the mode ``(1, D)`` (detached). Used as CV-SGLD's anchor.
    """
    z = z0.detach().clone().requires_grad_(True)
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
        u = potential(z).sum()
        if u.requires_grad:
            u.backward()
        else:
            z.grad = torch.zeros_like(z)
        return u

    opt.step(closure)
    return z.detach()


# --------------------------------------------------------------------------- states
class SGLDState(NamedTuple):
    """State of ``C`` SGLD/CV-SGLD chains: the points and the potential/gradient there."""

    z: torch.Tensor  # (C, D) unconstrained points
    potential_energy: torch.Tensor  # (C,) U at z (minibatch estimate)
    grad: torch.Tensor  # (C, D) gradient estimate at z, used by the next step


class PSGLDState(NamedTuple):
    """State of ``C`` pSGLD chains: :class:`SGLDState` plus the RMSprop average ``v``."""

    z: torch.Tensor
    potential_energy: torch.Tensor
    grad: torch.Tensor
    square_avg: torch.Tensor  # (C, D)


# --------------------------------------------------------------------------- kernels
class SGLD(LangevinKernel):
    """Stochastic-gradient Langevin dynamics as a Pyro :class:`~pyro.infer.mcmc.MCMCKernel` and a
    vectorised many-chain sampler (:meth:`~mcmc.chains.LangevinKernel.sample_chains`).

    ``SGLD(model, step_size=1e-3, *, subsample_size=None, potential=None,
    max_plate_nesting=None, init_strategy=init_to_uniform, with_replacement=False,
    shared_minibatch=False, on_nonfinite="raise", max_halvings=20, seed=None,
    vectorize="auto")`` -- the arguments of :class:`mcmc.chains.LangevinKernel`. The update is
    :func:`sgld_step` with the minibatch gradient of :meth:`gradient`.
    """

    state_type = SGLDState

    def init(self, z: torch.Tensor) -> SGLDState:
        """State at ``z``; the gradient there uses a minibatch drawn from the generator."""
        u, g = self.gradient(z, self._draw_indices(z.shape[0], self.generator))
        return SGLDState(z, u, g)

    def step(self, state, step_size, randomness: StepRandomness, t: int) -> SGLDState:
        """``z' = sgld_step(z, g(z), h, xi)``, then ``(U, g)`` at ``z'`` on this step's rows."""
        z_new = sgld_step(state.z, state.grad, step_size, randomness.noise)
        u, g = self.gradient(z_new, randomness.indices)
        return SGLDState(z_new, u, g)


class pSGLD(SGLD):
    """Preconditioned SGLD (RMSprop preconditioner; ``Gamma`` term omitted -- see the module).

    Extra args: ``alpha`` (the RMSprop decay, default 0.99) and ``eps`` (``lambda``, default
    1e-5). The running average ``v`` starts at the first gradient squared.
    """

    state_type = PSGLDState

    def __init__(
        self, model=None, step_size=1e-3, *, alpha: float = 0.99, eps: float = 1e-5, **kwargs
    ) -> None:
        if not 0 <= alpha < 1:
            raise ValueError(f"pSGLD(..., alpha={alpha!r}): alpha must be in [0, 1)")
        if eps <= 0:
            raise ValueError(f"pSGLD(..., eps={eps!r}): eps must be > 0")
        super().__init__(model, step_size, **kwargs)
        self.alpha = alpha
        self.eps = eps

    def init(self, z: torch.Tensor) -> PSGLDState:
        u, g = self.gradient(z, self._draw_indices(z.shape[0], self.generator))
        return PSGLDState(z, u, g, g * g)

    def step(self, state, step_size, randomness: StepRandomness, t: int) -> PSGLDState:
        z_new, v = psgld_step(state.z, state.grad, state.square_avg, step_size,
                              randomness.noise, self.alpha, self.eps)
        u, g = self.gradient(z_new, randomness.indices)
        return PSGLDState(z_new, u, g, v)


class CVSGLD(SGLD):
    """Control-variate SGLD (Baker et al. 2019): minibatch gradients centred at a mode.

    At set-up the full-data potential is minimised with L-BFGS (:func:`find_mode`, at most
    ``mode_steps`` iterations) from one initial point (or ``anchor``, a flat ``(D,)``/``(1, D)``
    unconstrained point, is used as given); the full-data gradient there is computed once. Each
    step evaluates the minibatch gradient at the chains and at the anchor on the *same* rows.
    Chains start at the anchor unless ``initial_params`` are given.
    """

    def __init__(
        self,
        model=None,
        step_size=1e-3,
        *,
        anchor: torch.Tensor | None = None,
        mode_steps: int = 200,
        **kwargs,
    ) -> None:
        super().__init__(model, step_size, **kwargs)
        self.anchor = anchor
        self.mode_steps = mode_steps
        self._anchor_key = None
        if self._fixed_potential:
            self._on_new_potential()

    def _on_new_potential(self) -> None:
        pot = self.potential
        if self.anchor is not None:
            a = torch.as_tensor(self.anchor, dtype=pot.dtype, device=pot.device).reshape(1, -1)
        else:
            a = find_mode(pot, self._mode_start(pot), num_steps=self.mode_steps)
        _, g = pot.value_and_grad(a)
        check_finite(
            "gradient of the potential at the CV anchor", g, 0, site_names=pot.site_slices
        )
        self._anchor_z, self._anchor_grad = a, g

    def _default_initial_z(self, num_chains: int) -> torch.Tensor:
        return self._anchor_z.expand(num_chains, -1).clone()

    def _extra_state_dict(self) -> dict:
        # the anchor is part of the chain's law: a resumed run must reuse it bit for bit
        return {"anchor_z": self._anchor_z.clone(), "anchor_grad": self._anchor_grad.clone()}

    def _load_extra_state_dict(self, sd: dict) -> None:
        self._anchor_z, self._anchor_grad = sd["anchor_z"], sd["anchor_grad"]

    def _mode_start(self, pot: Potential) -> torch.Tensor:
        if self.seed is None:
            return pot.initial_params(1, init_strategy=self.init_strategy)
        devices = [pot.device.index or 0] if pot.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return pot.initial_params(1, init_strategy=self.init_strategy)

    def gradient(self, z, indices):
        if indices is None:
            return self.potential.value_and_grad(z)
        C = z.shape[0]
        both = torch.cat([z, self._anchor_z.expand(C, -1)])
        idx2 = {k: (torch.cat([v, v]) if v.shape[0] > 1 else v) for k, v in indices.items()}
        u, g = self.potential.value_and_grad(both, idx2)
        return u[:C], cv_gradient(g[:C], g[C:], self._anchor_grad)
