r"""Coin betting: the learning-rate-free update behind coin sampling, as a torch optimizer.

Sharrock & Nemeth, "Coin Sampling: Gradient-Based Bayesian Inference without Learning Rates"
(ICML 2023) replace the step ``x_{t} = x_{t-1} + eps * phi_t(x_{t-1})`` of a particle method
(SVGD, KSD descent, ...) by a *bet*: each coordinate of each particle is a gambler who starts at
``x_0``, sees the "coin outcome" ``c_t = phi_t(x_{t-1})`` (the direction the method wants to move
in) and bets a fraction of its accumulated wealth on the next outcome. No step size appears.

The update (per coordinate; all operations elementwise)
------------------------------------------------------
With ``c_t = -grad_t`` (torch optimizers *minimise*: ``.grad`` is the gradient of a loss, so the
coin outcome is its negative) and state initialised to ``0``::

    L_t = max(L_{t-1}, |c_t|)                        # running scale of the outcomes
    G_t = G_{t-1} + |c_t|                            # sum of |outcomes|
    S_t = S_{t-1} + c_t                              # sum of outcomes
    R_t = max(R_{t-1} + c_t * (x_{t-1} - x_0), 0)    # reward: winnings of the past bets
    x_t = x_0 + S_t / (L_t * (G_t + L_t)) * (L_t + R_t)

``L_t + R_t`` is the gambler's wealth (initial wealth ``L_t``) and ``S_t / (L_t (G_t + L_t))`` a
Krichevsky-Trofimov betting fraction, normalised by the observed scale ``L_t`` so that no bound on
the outcomes is needed in advance. Coordinates that have only ever seen ``c = 0`` (``L_t = 0``)
stay at ``x_0``.

Mapping to the paper
--------------------
* Sharrock & Nemeth (2023), Sec. 3: coin sampling replaces the learning-rate step of a
  Wasserstein gradient method by a Krichevsky-Trofimov bet,
  ``x_t = x_0 + (1/t) sum_{s<t} c_s (1 + sum_{s<t} c_s (x_s - x_0))`` (initial wealth 1), which
  assumes ``|c_s| <= 1``; Coin SVGD is that bet with ``c_s`` the SVGD direction, Coin KSDD with
  ``c_s`` minus the gradient of the KSD.
* The bound on ``|c_s|`` is dropped by the adaptive form the paper uses in practice (after
  Orabona & Tommasi, "Training deep networks without learning rates through coin betting",
  NeurIPS 2017, Alg. 2 "COCOB-Backprop", here with ``alpha = 1``): outcomes are normalised per
  coordinate by the running maximum ``L_t``. That is the update above, and it is the update of
  the authors' reference code (``louissharrock/Coin-SVGD``, ``CoinSVGD.coin_update``). In it
  ``(G_t + L_t) / L_t`` plays the role of the KT form's ``t`` and ``L_t`` that of its initial
  wealth 1.
* Consequence: the iterates are invariant to rescaling every ``c_t`` by ``a > 0``, which is why no
  learning rate is needed (a step size would have to be retuned for each scale).
* Equation/algorithm numbers: the paper's text was not available to us while writing this, so we
  cite sections and algorithm names rather than numbers that we could not verify.

Use with Pyro's SVGD
--------------------
``pyro.infer.SVGD.step`` sets the particles' ``.grad`` to ``-phi`` (minus the Stein direction) and
calls the optimizer, so ``pyro.infer.SVGD(model, kernel, pyro.optim.PyroOptim(CoinBetting, {}),
num_particles, max_plate_nesting)`` *is* Coin SVGD: ``c_t = -grad = phi``. (Beware Pyro 1.9's
multi-site particle grouping bug — see :class:`mcmc.coin_svgd.CoinSVGD`, which avoids it.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "AffinePotential",
    "CoinBetting",
    "CoinState",
    "FunctionPotential",
    "ParticleSampler",
    "coin_betting_init",
    "coin_betting_step",
]


class CoinState(NamedTuple):
    """Per-coordinate coin-betting state (every field has the shape of the parameter)."""

    x0: torch.Tensor  # starting point
    grad_sum: torch.Tensor  # S_t: sum of coin outcomes c_s
    abs_grad_sum: torch.Tensor  # G_t: sum of |c_s|
    max_abs: torch.Tensor  # L_t: max |c_s|
    reward: torch.Tensor  # R_t: clipped cumulative winnings


def coin_betting_init(x: torch.Tensor) -> CoinState:
    """Fresh state for a bettor starting at ``x``."""
    x0 = x.detach().clone()
    zeros = torch.zeros_like(x0)
    return CoinState(x0, zeros, zeros.clone(), zeros.clone(), zeros.clone())


def coin_betting_step(
    x: torch.Tensor, c: torch.Tensor, state: CoinState
) -> tuple[torch.Tensor, CoinState]:
    """One coin-betting update (see the module docstring for the math).

    Args:
        x: current position ``x_{t-1}``.
        c: coin outcome ``c_t`` (the ascent direction, e.g. the SVGD direction ``phi_t``).
        state: the state after ``t - 1`` steps.

    Returns:
        ``(x_t, state_t)``.
    """
    L = torch.maximum(state.max_abs, c.abs())
    G = state.abs_grad_sum + c.abs()
    S = state.grad_sum + c
    R = (state.reward + c * (x - state.x0)).clamp_min(0)
    denom = L * (G + L)
    # L == 0 only where every outcome so far was 0 (then S == 0 too): stay at x0.
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    x_new = state.x0 + torch.where(denom > 0, S / safe * (L + R), torch.zeros_like(S))
    return x_new, CoinState(state.x0, S, G, L, R)


class CoinBetting(torch.optim.Optimizer):
    """Learning-rate-free coin-betting optimizer (per coordinate), see the module docstring.

    It *minimises* like every torch optimizer: the coin outcome is ``c = -p.grad``. The starting
    point ``x_0`` of each parameter is its value at the first :meth:`step` that sees a gradient.

    Args:
        params: iterable of tensors or param groups.
        check_finite: raise :class:`FloatingPointError` when a gradient is NaN/inf instead of
            letting it poison the state (default True).

    Example::

        optim = pyro.optim.PyroOptim(CoinBetting, {})
        svgd = pyro.infer.SVGD(model, RBFSteinKernel(), optim, num_particles=50,
                               max_plate_nesting=1)
    """

    def __init__(self, params: Iterable, check_finite: bool = True) -> None:
        super().__init__(params, {"check_finite": check_finite})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("CoinBetting does not support sparse gradients")
                if group["check_finite"] and not bool(torch.isfinite(p.grad).all()):
                    bad = (~torch.isfinite(p.grad)).nonzero()[:5].tolist()
                    raise FloatingPointError(
                        f"CoinBetting: non-finite gradient for a parameter of shape "
                        f"{tuple(p.shape)} at index/indices {bad} (step "
                        f"{self.state[p].get('step', 0) + 1})"
                    )
                state = self.state[p]
                if not state:
                    cs = coin_betting_init(p)
                    state.update(cs._asdict())
                    state["step"] = 0
                cs = CoinState(*(state[k] for k in CoinState._fields))
                x_new, cs = coin_betting_step(p, -p.grad, cs)
                p.copy_(x_new)
                state.update(cs._asdict())
                state["step"] += 1
        return loss

    def reset(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Forget the betting state (of ``params``, or all): the next step restarts at the
        current values as new ``x_0``."""
        targets = (
            [p for g in self.param_groups for p in g["params"]] if params is None else params
        )
        for p in targets:
            self.state.pop(p, None)


# ---------------------------------------------------------------------------------------------
# Framework glue shared by the coin particle samplers (Coin SVGD, Coin KSDD, Coin MSVGD).
# ---------------------------------------------------------------------------------------------


class FunctionPotential:
    """A :class:`mcmc.potential.Potential`-like wrapper around a log-density on ``R^D``.

    Lets the particle samplers run on plain targets (toy problems, tests) with the same interface
    as Pyro models: ``value_and_grad``, ``__call__`` (differentiable), ``unpack``, ``site_slices``.

    Args:
        log_prob: ``(N, D) -> (N,)`` unnormalised log density, differentiable with autograd.
        dim: ``D``.
        name: the name given to the single "site" in :meth:`unpack`.
    """

    def __init__(self, log_prob: Callable[[torch.Tensor], torch.Tensor], dim: int,
                 name: str = "x") -> None:
        if not callable(log_prob):
            raise TypeError(f"log_prob must be callable, got {type(log_prob).__name__}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.log_prob = log_prob
        self.dim = dim
        self.name = name
        self.site_slices = {name: slice(0, dim)}

    def __call__(self, z: torch.Tensor, **kwargs) -> torch.Tensor:
        return -self.log_prob(z)

    def value_and_grad(self, z: torch.Tensor, subsample_size=None, **kwargs):
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            u = -self.log_prob(zz)
            (g,) = torch.autograd.grad(u.sum(), zz)
        return u.detach(), g.detach()

    def unpack(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.name: z}

    def pack(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.as_tensor(values[self.name])


class AffinePotential:
    """The potential of ``z = loc + y scale_tril^T`` as a function of ``y`` (whitened coordinates).

    ``U_y(y) = U(loc + L y)`` and ``grad U_y = L^T grad U`` (the Jacobian ``|det L|`` is a
    constant), so ``exp(-U_y)`` is the target pushed through the affine map ``z -> L^{-1}(z -
    loc)`` and a sampler of ``y`` is a sampler of ``z``. Wraps any potential with
    ``value_and_grad`` (and ``__call__`` for samplers that differentiate through the score).
    """

    def __init__(self, potential, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        self.base = potential
        self.loc = loc
        self.scale_tril = scale_tril
        self.dim = potential.dim
        self.dtype = loc.dtype
        self.device = loc.device
        self.site_slices = getattr(potential, "site_slices", None)

    def to_base(self, y: torch.Tensor) -> torch.Tensor:
        """``z = loc + y L^T`` for ``y (N, D)``."""
        return self.loc + y @ self.scale_tril.T

    def from_base(self, z: torch.Tensor) -> torch.Tensor:
        """``y = L^{-1} (z - loc)`` for ``z (N, D)``."""
        return torch.linalg.solve_triangular(self.scale_tril, (z - self.loc).T, upper=False).T

    def __call__(self, y: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base(self.to_base(y), *args, **kwargs)

    def value_and_grad(self, y: torch.Tensor, *args, **kwargs):
        u, g = self.base.value_and_grad(self.to_base(y), *args, **kwargs)
        return u, g @ self.scale_tril


def _make_optimizer(optim, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """``None`` -> CoinBetting; a ``pyro.optim.PyroOptim``; or a factory ``params -> Optimizer``."""
    import pyro.optim

    if optim is None:
        return CoinBetting(params)
    if isinstance(optim, pyro.optim.PyroOptim):
        args = optim.pt_optim_args
        if callable(args):
            args = args("particles", params[0])
        return optim.pt_optim_constructor(params, **args)
    if isinstance(optim, torch.optim.Optimizer):
        raise TypeError(
            "optim must be None, a pyro.optim.PyroOptim or a factory params -> Optimizer "
            "(e.g. lambda p: torch.optim.Adam(p, lr=0.1)), not an already-built optimizer"
        )
    if callable(optim):
        opt = optim(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optim factory returned {type(opt).__name__}, not an Optimizer")
        return opt
    raise TypeError(f"optim must be None, a PyroOptim or a callable, got {type(optim).__name__}")


def _moment_whitening(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, L)`` with ``L L^T`` the particles' covariance (diagonal when ``N < 2 D``)."""
    n, d = z.shape
    loc = z.mean(0)
    cov = torch.cov(z.T).reshape(d, d)
    if n < 2 * d:
        cov = torch.diag(cov.diagonal())
    jitter = 1e-12 * float(cov.diagonal().mean()) + torch.finfo(z.dtype).tiny
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    tril, info = torch.linalg.cholesky_ex(cov + jitter * eye)
    if int(info) != 0 or not bool(torch.isfinite(tril).all()):
        tril = torch.diag(cov.diagonal().clamp_min(jitter).sqrt())
    return loc, tril


class ParticleSampler:
    """Base class: particles ``(N, D)`` in unconstrained space moved by an optimizer.

    Subclasses implement :meth:`direction` (the ascent direction ``phi_t``, shape ``(N, D)``);
    each :meth:`step` sets ``particles.grad = -phi_t`` and calls the optimizer (CoinBetting by
    default, i.e. coin sampling; any torch optimizer gives the learning-rate version).

    Args:
        target: a Pyro model (callable), or a potential object with ``value_and_grad`` and
            ``dim`` (:class:`mcmc.potential.Potential`, :class:`FunctionPotential`).
        num_particles: ``N >= 2``.
        max_plate_nesting: for Pyro models (inferred when None).
        optim: ``None`` (CoinBetting), a ``pyro.optim.PyroOptim`` or ``params -> Optimizer``.
        precondition: ``"laplace"`` (default) or ``None``. With ``"laplace"`` the sampler
            first finds the posterior mode ``m`` (L-BFGS) and the Hessian ``H`` there
            (:func:`mcmc.laplace.laplace_approximation`) and moves *whitened* particles
            ``y = L^{-1} (z - m)``, ``L L^T = H^{-1}`` (see "Preconditioning" below); the
            particles start at Laplace draws ``y ~ N(0, I)`` unless ``initial_particles`` are
            given. ``None``: the particles are the model's unconstrained coordinates, started
            from ``init_strategy`` (the paper's setting).
        warmup_steps: with ``precondition="laplace"``, the whitening is re-estimated from the
            particles' mean and covariance (diagonal when ``N < 2 D``) at iterations
            ``warmup_steps // 4``, ``warmup_steps // 2`` and ``warmup_steps``, and the
            optimizer (coin-betting) state restarts there; fixed afterwards. ``0``: keep the
            Laplace whitening throughout.
        init_strategy: Pyro init strategy: with ``precondition="laplace"`` the start of the mode
            search (default: the prior median); without, the initial particles (default
            ``init_to_sample``: prior draws, as Pyro's SVGD). ``init_to_value`` for models with
            flat ``ImproperUniform`` priors.
        vectorize: how the particles are evaluated (:class:`mcmc.potential.Potential`: a particle
            plate when the model broadcasts, else ``torch.func.vmap``, else a loop).
        capture: the potential's gradients as a captured graph (``"auto"``, a backend or
            ``"off"``; see :mod:`mcmc.potential`).
        initial_particles: ``(N, D)`` unconstrained tensor, or ``{site: (N, *shape)}``
            constrained values, instead of ``init_strategy``.

    For a Pyro model, ``step(*args, **kwargs)`` passes the model's data like Pyro's ``SVGD``; the
    potential (:class:`mcmc.potential.Potential`) is built at the first step and re-pointed at new
    data when the arguments change.

    Preconditioning (why it is the default)
    ---------------------------------------
    Coin betting is invariant to the scale of the outcomes but *not* to the scale of the
    particles: the bettor's displacement ``x_t - x_0 = S_t / (G_t + L_t) (1 + R_t / L_t)`` is
    measured in absolute units (its first step is ``+-1/2`` in every coordinate), and its state
    never forgets the largest outcome ``L_t`` or the sums ``S_t, G_t``. Started from prior draws
    on a posterior whose scale is far from 1 (e.g. a GLM on thousands of rows), the early
    outcomes are orders of magnitude larger than later ones, and particles whose ``S_t`` was
    driven the wrong way by that transient stay pinned far out for thousands of steps (they move
    ``~|c_t| / L_t`` as fast as they should; ``tests/test_coin_defaults.py`` shows it). Moving the
    particles in Laplace-whitened coordinates makes the posterior's scale ~1 in every direction
    and starting them at Laplace draws makes the outcome sequence roughly stationary from the
    first step. The target is unchanged: the particles ``y`` target the posterior pushed through
    a fixed affine map, and SVGD on ``y`` with a kernel ``k(y, y')`` is SVGD on ``z`` with the
    matrix-valued kernel ``L L^T k(L^{-1} z, L^{-1} z')`` (Wang, Tang, Bajaj & Liu, "Stein
    variational gradient descent with matrix-valued kernels", NeurIPS 2019, constant
    preconditioner). :attr:`particles` holds ``y``; :meth:`get_particles` returns ``z``. The
    set-up costs one L-BFGS mode search and ``D`` Hessian-vector products (a dense ``D x D``
    Hessian), once; for very large ``D`` pass ``precondition=None``. It applies to any ``optim``.

    The Laplace approximation can be poor (eight schools: the joint mode sits far in the tail of
    ``tau``), so during warm-up the affine map is re-fitted to the particles themselves and the
    bettor restarts from the current particles with a fresh state, as NUTS re-estimates its mass
    matrix in warm-up windows. Each phase is coin sampling of the same posterior in fixed affine
    coordinates started where the previous phase ended; after ``warmup_steps`` the map is fixed.
    (Restarts are only done in whitened coordinates: a fresh bettor's first step is ``+-1/2`` per
    coordinate, which is ~half a posterior sd there but can be many sds in the model's own
    coordinates.) A multimodal posterior is not helped by one Laplace approximation: use
    ``precondition=None`` with an ``init_strategy`` that covers the modes. When there is no
    usable mode (the mode search diverges, e.g. in a funnel) the first whitening is the initial
    particles' own mean and covariance (prior draws by default), logged as a warning.

    Diagnostics
    -----------
    At the end of :meth:`run` the particles are checked (:meth:`diagnose`): the fraction of
    particles stuck far outside the bulk (:func:`mcmc.diagnostics.stuck_particles`, in
    unconstrained coordinates), and their kernel Stein discrepancy in their own whitened
    coordinates against the level an exact sample of ``N`` draws has there
    (:func:`mcmc.kernels.whitened_ksd`: exact draws give 1-1.25x that level, a set that has not
    converged many times it, even when all its particles are stranded together). The summary is
    logged (INFO, logger ``mcmc.diagnostics``), kept in :attr:`convergence`, and one
    :class:`~mcmc.diagnostics.ConvergenceWarning` says what to change when something is wrong
    (``run(..., diagnostics=False)`` skips the check).
    """

    def __init__(
        self,
        target,
        num_particles: int,
        *,
        max_plate_nesting: int | None = None,
        optim=None,
        init_strategy: Callable | None = None,
        initial_particles=None,
        vectorize: str = "auto",
        precondition: str | None = "laplace",
        warmup_steps: int = 200,
        capture: str | bool = "auto",
    ) -> None:
        from .potential import capture_option

        self.capture = capture_option(capture, type(self).__name__)
        if isinstance(num_particles, bool) or not isinstance(num_particles, int):
            raise TypeError(f"num_particles must be an int, got {type(num_particles).__name__}")
        if num_particles < 2:
            raise ValueError(f"num_particles must be >= 2 (Stein methods need interacting "
                             f"particles), got {num_particles}")
        if max_plate_nesting is not None and (
            not isinstance(max_plate_nesting, int) or max_plate_nesting < 0
        ):
            raise ValueError(f"max_plate_nesting must be a non-negative int or None, "
                             f"got {max_plate_nesting!r}")
        if precondition not in ("laplace", None):
            raise ValueError(f"{type(self).__name__}(..., precondition={precondition!r}): must "
                             "be 'laplace' or None")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"{type(self).__name__}(..., warmup_steps={warmup_steps!r}): must be "
                             "a non-negative int")
        if hasattr(target, "value_and_grad") and hasattr(target, "dim"):
            self._potential = target
            self.model = None
        elif callable(target):
            self._potential = None
            self.model = target
        else:
            raise TypeError("target must be a Pyro model or a potential object with "
                            f"value_and_grad and dim, got {type(target).__name__}")
        self.num_particles = num_particles
        self.max_plate_nesting = max_plate_nesting
        self._optim_spec = optim
        self.init_strategy = init_strategy
        self.vectorize = vectorize
        self._initial = initial_particles
        self.precondition = precondition
        self.warmup_steps = warmup_steps
        self.laplace = None  # mcmc.laplace.Laplace once computed (precondition="laplace")
        self.loc: torch.Tensor | None = None  # current whitening z = loc + y scale_tril^T
        self.scale_tril: torch.Tensor | None = None
        self.convergence = None  # ConvergenceReport of the last run (mcmc.diagnostics)
        self._args_key = None
        self.particles: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.iteration = 0

    # -------------------------------------------------------------- potential & initialisation
    @property
    def potential(self):
        if self._potential is None:
            raise RuntimeError("the potential is built at the first step(*model_args)")
        return self._potential

    def _potential_for(self, args: tuple, kwargs: dict):
        if self.model is None:
            return self._potential
        key = (tuple(id(a) for a in args), tuple(sorted((k, id(v)) for k, v in kwargs.items())))
        if self._potential is None:
            from pyro.infer.autoguide.initialization import init_to_sample

            from .potential import Potential

            self._potential = Potential(
                self.model, args, kwargs, max_plate_nesting=self.max_plate_nesting,
                init_strategy=self.init_strategy or init_to_sample, vectorize=self.vectorize,
                owner=type(self).__name__, capture=self.capture,
            )
        elif key != self._args_key:
            # New data (e.g. a minibatch passed as an argument): same sites and transforms,
            # so re-point a shallow copy at the new arguments instead of re-initialising.
            import copy

            pot = copy.copy(self._potential)
            pot.model_args, pot.model_kwargs = tuple(args), dict(kwargs)
            self._potential = pot
        self._args_key = key
        return self._potential

    def _init_particles(self, pot) -> None:
        init = self._initial
        z = None
        if init is None:
            if self.precondition is None:
                if not hasattr(pot, "initial_params"):
                    raise ValueError("initial_particles is required for a potential without "
                                     "initial_params (e.g. FunctionPotential)")
                from pyro.infer.autoguide.initialization import init_to_sample

                z = pot.initial_params(self.num_particles, self.init_strategy or init_to_sample)
        elif isinstance(init, dict):
            z = pot.pack(init)
        else:  # the potential's dtype/device when it has them (Potential does)
            z = torch.as_tensor(init, dtype=getattr(pot, "dtype", None),
                                device=getattr(pot, "device", None))
        if z is not None and (z.dim() != 2 or z.shape != (self.num_particles, pot.dim)):
            raise ValueError(f"initial particles must have shape ({self.num_particles}, "
                             f"{pot.dim}), got {tuple(z.shape)}")
        if self.precondition == "laplace":
            try:
                self.laplace = self._laplace(pot, z)
            except FloatingPointError as e:
                # no usable mode (e.g. a funnel): whiten with the particles' own moments instead
                # (the warm-up re-fits continue from there)
                if z is None:
                    from pyro.infer.autoguide.initialization import init_to_sample

                    z = pot.initial_params(self.num_particles,
                                           self.init_strategy or init_to_sample)
                logger.warning("%s: %s; whitening with the initial particles' mean and "
                               "covariance instead", type(self).__name__, e)
                self.loc, self.scale_tril = _moment_whitening(z)
            else:
                self.loc, self.scale_tril = self.laplace.mode, self.laplace.scale_tril
            if z is None:  # Laplace draws
                y = torch.randn(self.num_particles, pot.dim, dtype=self.loc.dtype,
                                device=self.loc.device)
            else:
                y = AffinePotential(pot, self.loc, self.scale_tril).from_base(z)
        else:
            y = z
        self._set_particles(y)

    def _set_particles(self, y: torch.Tensor) -> None:
        """New particle tensor and a fresh optimizer (coin-betting) state."""
        self.particles = y.detach().clone().requires_grad_(True)
        self.optimizer = _make_optimizer(self._optim_spec, [self.particles])

    def _rewhiten(self) -> None:
        """Re-fit the affine map to the particles and restart the bettor (warm-up)."""
        z = self.get_particles()
        self.loc, self.scale_tril = _moment_whitening(z)
        y = torch.linalg.solve_triangular(self.scale_tril, (z - self.loc).T, upper=False).T
        self._set_particles(y)

    def _laplace(self, pot, z):
        """Laplace approximation; the mode search starts at the mean of the given initial
        particles, else (Pyro models) at a point of ``init_strategy`` or the prior median."""
        from .laplace import laplace_approximation

        if z is not None:
            start = z.mean(0, keepdim=True)
        elif hasattr(pot, "initial_params"):
            from pyro.infer.autoguide.initialization import init_to_median

            start = pot.initial_params(1, self.init_strategy or init_to_median)
        else:
            raise ValueError("initial_particles is required for a potential without "
                             "initial_params (e.g. FunctionPotential)")
        return laplace_approximation(pot, start)

    def _target(self, pot):
        """The potential the particles move in: ``pot`` itself or its whitened version."""
        if self.loc is None:
            return pot
        return AffinePotential(pot, self.loc, self.scale_tril)

    # -------------------------------------------------------------- stepping
    def direction(self, pot, z: torch.Tensor) -> torch.Tensor:
        """Ascent direction ``phi_t`` at particles ``z (N, D)``."""
        raise NotImplementedError

    def _check(self, name: str, tensor: torch.Tensor, pot) -> None:
        from .potential import check_finite

        try:
            check_finite(name, tensor, self.iteration, site_names=getattr(pot, "site_slices",
                                                                          None))
        except FloatingPointError as e:
            raise FloatingPointError(str(e).replace("chain(s)", "particle(s)")) from None

    def step(self, *args, **kwargs) -> dict[str, float]:
        """One update of every particle; returns ``{"mean_sq_direction": float}``."""
        pot = self._potential_for(args, kwargs)
        if self.particles is None:
            self._init_particles(pot)
        z = self.particles
        phi = self.direction(self._target(pot), z.detach())
        self._check("direction", phi, pot)
        z.grad = -phi
        self.optimizer.step()
        z.grad = None
        self.iteration += 1
        self._check("particles", z.detach(), pot)
        if self.loc is not None and self.iteration in self._warmup_windows():
            self._rewhiten()
        return {"mean_sq_direction": float(phi.pow(2).mean())}

    def _warmup_windows(self) -> set[int]:
        w = self.warmup_steps
        return {t for t in (w // 4, w // 2, w) if t > 0}

    def run(self, num_steps: int, *args, progress: bool = True,
            callback: Callable | None = None, diagnostics: bool = True,
            **kwargs) -> torch.Tensor:
        """``num_steps`` steps; ``callback(self, iteration)`` after each. Returns the particles.

        ``progress``: the package's progress bar (:func:`mcmc.chains.progress_bar`, shown for
        runs longer than a few seconds). ``diagnostics``: check the particles at the end (see the
        class docstring; the report is kept in :attr:`convergence`)."""
        from .chains import progress_bar

        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"{type(self).__name__}.run(num_steps={num_steps!r}): num_steps "
                             "must be a non-negative int")
        start = None
        if diagnostics and num_steps > 0:
            pot = self._potential_for(args, kwargs)
            if self.particles is None:
                self._init_particles(pot)
            start = self.get_particles().clone()
        with progress_bar(num_steps, progress=progress, desc=type(self).__name__) as bar:
            for t in range(num_steps):
                self.step(*args, **kwargs)
                if callback is not None:
                    callback(self, t)
                bar.update()
        if start is not None:
            self.convergence = self.diagnose(start)
            self.convergence.announce(stacklevel=2)
        return self.get_particles()

    def diagnose(self, start: torch.Tensor | None = None):
        """:class:`~mcmc.diagnostics.ConvergenceReport` of the current particles: the fraction
        stuck far outside the bulk (:func:`mcmc.diagnostics.stuck_particles`) and their KSD in
        their own whitened coordinates against the level of an exact sample
        (:func:`mcmc.kernels.whitened_ksd`); ``start`` (particles ``(N, D)``, model coordinates)
        adds the KSD at the start of the run to the summary."""
        from .diagnostics import check_convergence, stuck_particles

        z = self.get_particles()
        stuck = float(stuck_particles(z).mean())
        ksd = initial = level = None
        try:
            ksd, level = self._whitened_ksd(z)
            if start is not None:
                initial, _ = self._whitened_ksd(start)
        except NotImplementedError:  # e.g. Coin MSVGD: no Euclidean KSD
            pass
        return check_convergence(kind="particles", name=type(self).__name__, ksd=ksd,
                                 initial_ksd=initial, ksd_level=level, stuck_fraction=stuck)

    def _whitened_ksd(self, z: torch.Tensor) -> tuple[float, float]:
        """:func:`mcmc.kernels.whitened_ksd` of particles ``z`` (model coordinates)."""
        from .kernels import whitened_ksd

        return whitened_ksd(z, -self.potential.value_and_grad(z)[1])

    # -------------------------------------------------------------- results
    def get_particles(self) -> torch.Tensor:
        """Unconstrained particles ``(N, D)`` in the model's coordinates (detached)."""
        if self.particles is None:
            raise RuntimeError("no particles yet: call step() or run() first")
        y = self.particles.detach()
        if self.loc is None:
            return y
        return self.loc + y @ self.scale_tril.T

    def get_named_particles(self) -> dict[str, torch.Tensor]:
        """``{site: constrained values (N, *shape)}``, particle-major for every site."""
        return self.potential.unpack(self.get_particles())

    def scores(self) -> torch.Tensor:
        """``grad log p`` (unconstrained space) at the particles, ``(N, D)``."""
        return -self.potential.value_and_grad(self.get_particles())[1]

    def ksd(self, kernel=None, chunk_size: int | None = None) -> float:
        """Kernel Stein discrepancy of the particles to the target (unconstrained space);
        see :func:`mcmc.kernels.ksd` (default kernel IMQ with bandwidth 1)."""
        from .kernels import ksd

        return ksd(self.get_particles(), self.scores(), kernel, chunk_size)

    def to_inference_data(self, **kwargs):
        """ArviZ InferenceData with the particles as ONE chain (draw ``i`` = particle ``i``).

        Extra keywords go to :func:`mcmc.diagnostics.to_inference_data`. R-hat/ESS are not
        meaningful for a particle set (its particles interact; it is one joint sample).
        """
        from .diagnostics import to_inference_data

        return to_inference_data(self.get_named_particles(), kind="particles", **kwargs)
