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
:class:`SGLD`, :class:`pSGLD` and :class:`CVSGLD` are :class:`pyro.infer.mcmc.MCMCKernel` s::

    mcmc = pyro.infer.MCMC(SGLD(model, step_size=1e-3, subsample_size=100),
                           num_samples=1000, warmup_steps=200)
    mcmc.run(*model_args, **model_kwargs)

They count their own steps (Pyro's ``MCMC`` never calls ``end_warmup``) so the step-size
schedule sees the global step index. :meth:`SGLD.sample_chains` runs ``C`` chains *vectorised*
in one process (one model evaluation per step for all chains; each chain gets its own minibatch
unless ``shared_minibatch=True``) and is the fast path for many chains.

Non-finite values
-----------------
``on_nonfinite="raise"`` (default): a NaN/inf potential, gradient or state stops the run with a
:class:`FloatingPointError` naming the iteration, the chains and the latent sites affected.
``on_nonfinite="halve"`` (opt-in): the potential and gradient at each proposal are computed in
the same step (they are needed for the next step anyway), so when they are not finite that chain's
proposal is rejected, its step-size multiplier is halved **for the rest of the run** and a new
proposal is drawn from the current point with fresh noise; after ``max_halvings`` failures in one
step the run stops with the error above. Returned draws are always finite.

Checkpointing
-------------
:meth:`SGLD.state_dict` holds the chain states, the step counter, the sampler's statistics and
the state of its ``torch.Generator`` (all randomness -- noise and minibatch rows -- comes from
it); :meth:`SGLD.load_state_dict` restores them, and the draws after resuming are bit-identical
to an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from tqdm.auto import tqdm

from .potential import Potential, check_finite
from .schedules import as_schedule

__all__ = [
    "CVSGLD",
    "SGLD",
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
        u.backward()
        return u

    opt.step(closure)
    return z.detach()


# --------------------------------------------------------------------------- kernels
class SGLD(MCMCKernel):
    """Stochastic-gradient Langevin dynamics as a Pyro :class:`~pyro.infer.mcmc.MCMCKernel`.

    Args:
        model: a Pyro model with continuous latent sites (or ``None`` with ``potential=``).
        step_size: ``h > 0``, or a schedule ``t -> h_t`` from :mod:`mcmc.schedules`.
        subsample_size: minibatch rows per step (``None``: full-data gradients, i.e. ULA). The
            model must take a ``subsample_size`` keyword (the zoo convention).
        potential: a ready :class:`~mcmc.potential.Potential` (then ``model`` is not needed
            and the model args given to ``setup``/``sample_chains`` are ignored).
        max_plate_nesting: passed to :class:`~mcmc.potential.Potential`.
        init_strategy: Pyro init strategy for the chains' starting points.
        with_replacement: draw minibatch rows with replacement (cheaper for huge data).
        shared_minibatch: all vectorised chains use the same minibatch at each step.
        on_nonfinite: ``"raise"`` or ``"halve"`` (see the module docstring).
        max_halvings: how many halvings one step may try before giving up.
        seed: seed of the sampler's ``torch.Generator`` (default: drawn from torch's global RNG
            at setup, so ``pyro.set_rng_seed`` makes runs reproducible).
    """

    def __init__(
        self,
        model: Callable | None = None,
        step_size: float | Callable[[int], float] = 1e-3,
        *,
        subsample_size: int | None = None,
        potential: Potential | None = None,
        max_plate_nesting: int | None = None,
        init_strategy: Callable = init_to_uniform,
        with_replacement: bool = False,
        shared_minibatch: bool = False,
        on_nonfinite: str = "raise",
        max_halvings: int = 20,
        seed: int | None = None,
    ) -> None:
        if model is None and potential is None:
            raise ValueError("give a Pyro `model` or a ready `potential`")
        self.model = model
        self.schedule = as_schedule(step_size)
        if subsample_size is not None and (
            isinstance(subsample_size, bool)
            or not isinstance(subsample_size, int)
            or subsample_size < 1
        ):
            raise ValueError(
                f"subsample_size must be a positive int or None, got {subsample_size!r}"
            )
        if on_nonfinite not in ("raise", "halve"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'halve', got {on_nonfinite!r}")
        self.subsample_size = subsample_size
        self.max_plate_nesting = max_plate_nesting
        self.init_strategy = init_strategy
        self.with_replacement = with_replacement
        self.shared_minibatch = shared_minibatch
        self.on_nonfinite = on_nonfinite
        self.max_halvings = int(max_halvings)
        self.seed = seed
        self.potential = potential
        self._fixed_potential = potential is not None
        self._model_key = None
        self._initial_params = None
        self._pending_state = None
        self.state: dict | None = None
        self.generator: torch.Generator | None = None
        if potential is not None:
            self._check_subsample()

    # ------------------------------------------------------------------ set-up
    @property
    def transforms(self):
        return None if self.potential is None else self.potential.transforms

    def setup_potential(
        self, model_args: tuple = (), model_kwargs: dict | None = None
    ) -> Potential:
        """Build (or reuse, for the same data objects) the model's potential."""
        if self._fixed_potential:
            return self.potential
        model_kwargs = dict(model_kwargs or {})
        key = (tuple(id(a) for a in model_args), tuple((k, id(v)) for k, v in model_kwargs.items()))
        if self.potential is None or key != self._model_key:
            self.potential = Potential(
                self.model, model_args, model_kwargs, max_plate_nesting=self.max_plate_nesting
            )
            self._model_key = key
            self._check_subsample()
            if self.state is not None:
                # the cached (U, grad U) belong to the old data: recompute at the next step
                self.state["cache"] = None
        return self.potential

    def _check_subsample(self) -> None:
        if self.subsample_size is not None:
            self.potential._subsample_info(self.subsample_size)  # raises on bad sizes

    def init_state(self, num_chains: int, initial_z: torch.Tensor | None = None) -> None:
        """Fresh state for ``num_chains`` chains (at ``initial_z`` ``(C, D)`` if given)."""
        pot = self.potential
        if pot is None:
            raise RuntimeError("call setup_potential(model_args, model_kwargs) first")
        if self.generator is None or self.generator.device != pot.device:
            self.generator = torch.Generator(device=pot.device)
        seed = self.seed if self.seed is not None else int(torch.randint(2**62, ()).item())
        self.generator.manual_seed(seed)
        if initial_z is None:
            if self.seed is None:
                initial_z = self._default_initial_z(num_chains)
            else:
                # Pyro's init strategies use torch's global RNG: fork it so that ``seed``
                # alone fixes the whole run (initial points included).
                devices = [pot.device.index or 0] if pot.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    initial_z = self._default_initial_z(num_chains)
        z = torch.as_tensor(initial_z, dtype=pot.dtype, device=pot.device)
        if z.shape != (num_chains, pot.dim):
            raise ValueError(
                f"initial params must have shape ({num_chains}, {pot.dim}), got {tuple(z.shape)}"
            )
        self.state = {
            "z": z.detach().clone(),
            "t": 0,
            "multiplier": torch.ones(num_chains, 1, dtype=pot.dtype, device=pot.device),
            "cache": None,
            "num_halvings": 0,
        }
        self._init_extra_state()

    def _default_initial_z(self, num_chains: int) -> torch.Tensor:
        return self.potential.initial_params(num_chains, init_strategy=self.init_strategy)

    def _init_extra_state(self) -> None:
        pass

    # ------------------------------------------------------------------ the algorithm
    def _gradient(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.potential.value_and_grad(
            z,
            self.subsample_size,
            generator=self.generator,
            with_replacement=self.with_replacement,
            shared_minibatch=self.shared_minibatch,
        )

    def _update(self, z, grad, h, noise, extra):
        """Return the proposed points and the new sampler statistics (``extra``)."""
        return sgld_step(z, grad, h, noise), extra

    def _extra(self):
        return None

    def _set_extra(self, extra) -> None:
        pass

    def step(self) -> torch.Tensor:
        """Advance every chain by one step; returns the new ``(C, D)`` state.

        The gradient at the proposal is computed in the same step (and cached for the next
        one), so a proposal with a non-finite potential/gradient is caught before it is
        returned: it raises, or (``on_nonfinite="halve"``) is rejected and redrawn.
        """
        st = self.state
        if st is None:
            raise RuntimeError("no state: call init_state / sample_chains first")
        t, z = st["t"], st["z"]
        if st["cache"] is None:  # potential and gradient at the current point
            u, g = self._gradient(z)
            if not self._finite(z, u, g).all():
                self._raise_nonfinite(z, u, g, t, "at the initial point ")
            st["cache"] = (u, g)
        u, g = st["cache"]
        h = float(self.schedule(t))
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"step-size schedule gave h={h!r} at iteration {t}; need h > 0")
        extra = self._extra()
        noise = torch.randn(z.shape, generator=self.generator, dtype=z.dtype, device=z.device)
        z_new, extra_new = self._update(z, g, h * st["multiplier"], noise, extra)
        u_new, g_new = self._gradient(z_new)
        halvings = 0
        while True:
            bad = ~self._finite(z_new, u_new, g_new)
            if not bool(bad.any()):
                break
            if self.on_nonfinite == "raise" or halvings >= self.max_halvings:
                note = f"after {halvings} step halvings " if halvings else ""
                self._raise_nonfinite(z_new, u_new, g_new, t, note)
            # Reject the bad chains' proposals, halve their step size (for good), redraw them.
            halvings += 1
            st["num_halvings"] += 1
            st["multiplier"] = torch.where(bad[:, None], st["multiplier"] / 2, st["multiplier"])
            noise = torch.randn(z.shape, generator=self.generator, dtype=z.dtype, device=z.device)
            redo, extra_redo = self._update(z, g, h * st["multiplier"], noise, extra)
            z_new = torch.where(bad[:, None], redo, z_new)
            extra_new = self._merge_extra(bad, extra_redo, extra_new)
            u_new, g_new = self._gradient(z_new)
        self._set_extra(extra_new)
        st["z"] = z_new
        st["cache"] = (u_new, g_new)
        st["t"] = t + 1
        return z_new

    @staticmethod
    def _finite(z, u, g) -> torch.Tensor:
        return torch.isfinite(u) & torch.isfinite(g).all(-1) & torch.isfinite(z).all(-1)

    def _raise_nonfinite(self, z, u, g, t, note="") -> None:
        """Raise FloatingPointError naming the iteration, chains, latent and model sites."""
        chains, latent, model_sites = self.potential.nonfinite_report(z, u, g)
        bad = ~self._finite(z, u, g)
        what = (
            "potential"
            if not bool((~torch.isfinite(g[bad])).any())
            else "gradient of the potential"
        )
        raise FloatingPointError(
            f"non-finite {what} {note}at iteration {t}: chain(s) {chains[:10]}"
            f"{' ...' if len(chains) > 10 else ''}, latent site(s) {latent}, model site(s) with "
            f"non-finite log-density {model_sites}. Try a smaller step size (or "
            "on_nonfinite='halve'), or check the model's parameters/data."
        )

    def _merge_extra(self, bad, extra_redo, extra_new):
        return extra_redo

    # ------------------------------------------------------------------ vectorised driver
    def sample_chains(
        self,
        num_samples: int,
        *,
        num_chains: int = 1,
        warmup_steps: int = 0,
        thinning: int = 1,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        initial_params: torch.Tensor | dict | None = None,
        progress: bool = False,
        unconstrained: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Run ``num_chains`` vectorised chains; return ``{site: (C, num_samples, *shape)}``.

        ``warmup_steps`` steps are run and discarded first, then ``num_samples * thinning``
        steps of which every ``thinning``-th is kept. If the kernel already holds a state for
        ``num_chains`` chains (a previous call, or :meth:`load_state_dict`), the run continues
        from it (unless ``initial_params`` are given: they always start a fresh run); call
        :meth:`reset` to start afresh. ``initial_params``: a flat ``(C, D)``
        unconstrained tensor or a dict of constrained values ``(C, *shape)``. With
        ``unconstrained=True`` the flat unconstrained draws ``(C, S, D)`` are returned under
        the key ``"_z"`` instead.
        """
        for name, v in (("num_samples", num_samples), ("thinning", thinning)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        pot = self.setup_potential(model_args, model_kwargs)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        if (
            self.state is None
            or self.state["z"].shape[0] != num_chains
            or initial_params is not None  # explicit starting points start a fresh run
        ):
            z0 = initial_params
            if isinstance(z0, dict):
                z0 = pot.pack(z0)
            self.init_state(num_chains, z0)
        draws = []
        total = warmup_steps + num_samples * thinning
        for i in tqdm(range(total), disable=not progress, desc=type(self).__name__):
            z = self.step()
            if i >= warmup_steps and (i - warmup_steps + 1) % thinning == 0:
                draws.append(z)
        zs = torch.stack(draws, dim=1)  # (C, S, D)
        if unconstrained:
            return {"_z": zs}
        C, S = zs.shape[:2]
        flat = pot.unpack(zs.reshape(C * S, -1))
        return {k: v.reshape((C, S) + tuple(v.shape[1:])) for k, v in flat.items()}

    def reset(self) -> None:
        """Forget the chain state (the next run starts from fresh initial points)."""
        self.state = None
        self._pending_state = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Chain states, step counter, sampler statistics and RNG state (deep copies)."""
        if self.state is None:
            raise RuntimeError("nothing to checkpoint: the kernel has no state yet")
        return {
            "kernel": type(self).__name__,
            "state": copy.deepcopy(self.state),
            "rng_state": self.generator.get_state(),
            "extra": copy.deepcopy(self._extra_state_dict()),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; the next step continues bit-identically."""
        if state_dict.get("kernel") != type(self).__name__:
            raise ValueError(
                f"checkpoint is from {state_dict.get('kernel')!r}, not {type(self).__name__!r}"
            )
        if self.potential is None:
            self._pending_state = state_dict  # applied once the potential exists
        else:
            self._apply_state(state_dict)

    def _apply_state(self, sd: dict) -> None:
        pot = self.potential
        if self.generator is None or self.generator.device != pot.device:
            self.generator = torch.Generator(device=pot.device)
        self.generator.set_state(sd["rng_state"])
        self.state = copy.deepcopy(sd["state"])
        self._load_extra_state_dict(copy.deepcopy(sd["extra"]))

    def _extra_state_dict(self) -> dict:
        return {}

    def _load_extra_state_dict(self, sd: dict) -> None:
        pass

    # ------------------------------------------------------------------ MCMCKernel interface
    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        self.setup_potential(args, kwargs)
        z0 = None
        if self._initial_params is not None:
            z0 = self.potential.pack_unconstrained(
                {k: v.unsqueeze(0) for k, v in self._initial_params.items()}
            )
        self.init_state(1, z0)

    @property
    def initial_params(self):
        if self._initial_params is not None:
            return self._initial_params
        if self.state is None:
            return None
        u = self.potential.unpack_unconstrained(self.state["z"][:1])
        return {k: v[0] for k, v in u.items()}

    @initial_params.setter
    def initial_params(self, params):
        self._initial_params = params

    def sample(self, params: dict) -> dict:
        z = self.potential.pack_unconstrained({k: v.unsqueeze(0) for k, v in params.items()})
        if not torch.equal(z, self.state["z"]):
            self.state["z"] = z
            self.state["cache"] = None
        z = self.step()
        return {k: v[0] for k, v in self.potential.unpack_unconstrained(z).items()}

    def logging(self) -> dict:
        t = self.state["t"] if self.state else 0
        return {"step_size": f"{self.schedule(max(t - 1, 0)):.3g}"}

    def diagnostics(self) -> dict:
        if not self.state:
            return {}
        # "divergences" (none: SGLD has no accept/reject) keeps arviz.from_pyro working.
        return {
            "divergences": [],
            "num_steps": self.state["t"],
            "num_halvings": self.state["num_halvings"],
        }


class pSGLD(SGLD):
    """Preconditioned SGLD (RMSprop preconditioner; ``Gamma`` term omitted -- see the module).

    Extra args: ``alpha`` (the RMSprop decay, default 0.99) and ``eps`` (``lambda``, default
    1e-5). The running average ``v`` starts at the first gradient squared.
    """

    def __init__(
        self, model=None, step_size=1e-3, *, alpha: float = 0.99, eps: float = 1e-5, **kwargs
    ) -> None:
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        super().__init__(model, step_size, **kwargs)
        self.alpha = alpha
        self.eps = eps

    def _init_extra_state(self) -> None:
        self.state["square_avg"] = None

    def _extra(self):
        return self.state["square_avg"]

    def _set_extra(self, extra) -> None:
        self.state["square_avg"] = extra

    def _merge_extra(self, bad, extra_redo, extra_new):
        return torch.where(bad[:, None], extra_redo, extra_new)

    def _update(self, z, grad, h, noise, extra):
        v = grad * grad if extra is None else extra
        return psgld_step(z, grad, v, h, noise, self.alpha, self.eps)


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

    def setup_potential(self, model_args=(), model_kwargs=None):
        pot = super().setup_potential(model_args, model_kwargs)
        if self._anchor_key is not pot:
            if self.anchor is not None:
                a = torch.as_tensor(self.anchor, dtype=pot.dtype, device=pot.device).reshape(1, -1)
            else:
                a = find_mode(pot, self._mode_start(pot), num_steps=self.mode_steps)
            _, g = pot.value_and_grad(a)
            check_finite(
                "gradient of the potential at the CV anchor", g, 0, site_names=pot.site_slices
            )
            self._anchor_z, self._anchor_grad = a, g
            self._anchor_key = pot
        return pot

    def _default_initial_z(self, num_chains: int) -> torch.Tensor:
        return self._anchor_z.expand(num_chains, -1).clone()

    def _extra_state_dict(self) -> dict:
        # the anchor is part of the chain's law: a resumed run must reuse it bit for bit
        return {"anchor_z": self._anchor_z, "anchor_grad": self._anchor_grad}

    def _load_extra_state_dict(self, sd: dict) -> None:
        self._anchor_z, self._anchor_grad = sd["anchor_z"], sd["anchor_grad"]

    def _mode_start(self, pot: Potential) -> torch.Tensor:
        if self.seed is None:
            return pot.initial_params(1, init_strategy=self.init_strategy)
        devices = [pot.device.index or 0] if pot.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return pot.initial_params(1, init_strategy=self.init_strategy)

    def _gradient(self, z):
        if self.subsample_size is None:
            return self.potential.value_and_grad(z)
        C = z.shape[0]
        idx = self.potential.minibatch_indices(
            C,
            self.subsample_size,
            generator=self.generator,
            with_replacement=self.with_replacement,
            shared=self.shared_minibatch,
        )
        both = torch.cat([z, self._anchor_z.expand(C, -1)])
        idx2 = {k: torch.cat([v, v]) for k, v in idx.items()}
        u, g = self.potential.value_and_grad(both, self.subsample_size, indices=idx2)
        return u[:C], cv_gradient(g[:C], g[C:], self._anchor_grad)
