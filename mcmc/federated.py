"""Federated SGLD: distributed SGLD (DSGLD) and FSGLD with conducive gradients.

The data are split into ``S`` shards (clients). Shard ``s`` holds ``N_s`` rows and is visited
with probability ``p_s`` (default ``N_s / N``). A chain visits one shard per *round* and takes
``tau`` local Langevin steps there (:func:`mcmc.sgld.sgld_step`, ``z' = z - h g + sqrt(2h) xi``),
then moves to the next shard, drawn ``s ~ Categorical(p)`` (from a schedule generator seeded
with ``seed + 1``, so every process knows the whole visit schedule).

Local gradients
---------------
Each shard is given as a Pyro model plus its shard data, whose potential is the shard's local
stand-in for the full potential,

    U_s(z) = U_prior(z) - (1 / p_s) log p(D_s | x(z)),

(``U_prior`` includes the log|det J| of the unconstrained transform). The zoo's federated models
do exactly this with ``num_total=N`` (they scale the shard log-likelihood by ``N / N_s``, i.e.
``p_s = N_s / N``). ``subsample_size`` subsamples rows within the shard (unbiased via Pyro's
plate scaling).

* **DSGLD** (Ahn, Shahbaba & Welling, ICML 2014): ``g = grad U_s(z)``. Unbiased for
  ``grad U`` only on average over shards, so within a long local trajectory (large ``tau``) the
  chain drifts towards shard ``s``'s own posterior and the spread blows up on non-iid shards.
* **FSGLD** (El Mekkaoui, Mesquita, Blomstedt & Kaski, UAI 2021, eq. 6-7): adds the
  *conducive gradient* of Gaussian surrogates ``q_k`` of every shard's likelihood,
  ``g = grad U_s(z) + grad [ sum_k U_qk(z) - (1 / p_s) U_qs(z) ]`` with ``U_qk = -log q_k``.
  Its expectation over ``s`` is still ``grad U``, and when ``q_s`` is exact (Gaussian
  likelihoods) the shard terms cancel: every local step uses the exact full-data gradient, so
  the stationary law is the single-machine one for *any* ``tau``.

How ``q_s`` is fitted (once per shard, on the shard; only its parameters are shared)
--------------------------------------------------------------------------------------
Laplace-type second-order expansion of the shard log-likelihood: the shard's local posterior
``U_s`` is minimised with L-BFGS (:func:`mcmc.sgld.find_mode`; it exists even when the
likelihood alone is flat in some direction), and ``L_s(z) = p_s (U_s(z) - U_prior(z))`` (the
shard's negative log-likelihood, Jacobian terms cancel) is expanded to second order there:
``U_qs(z) = g_s^T (z - m_s) + (z - m_s)^T Lambda_s (z - m_s) / 2`` with ``g_s``, ``Lambda_s`` the
gradient and Hessian of ``L_s`` at the mode ``m_s``. Only the natural parameters
``Lambda_s`` (``D x D``) and ``eta_s = Lambda_s m_s - g_s`` (``grad U_qs(z) = Lambda_s z -
eta_s``) leave the shard. For Gaussian likelihoods the expansion is exact.

Execution
---------
:class:`FederatedSGLD` holds the algorithm (one implementation). :meth:`FederatedSGLD.run`
executes it in one process (shards as tensors, ``C`` chains vectorised); :mod:`mcmc.distributed`
runs the same code with one process per shard, moving the chains' packet (states, step counter
and the chains' ``torch.Generator`` state) between processes -- the draws are bit-identical.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .potential import Potential, check_finite
from .schedules import as_schedule
from .sgld import find_mode, sgld_step

__all__ = [
    "ChainPacket",
    "FederatedSGLD",
    "ShardApproximation",
    "ShardWorker",
    "fit_shard_approximation",
]


@dataclass
class ShardApproximation:
    """Gaussian surrogate of one shard's likelihood: ``-log q_s(z) = z^T P z / 2 - eta^T z + c``.

    ``precision``: ``(D, D)``; ``eta``: ``(D,)``; ``mode``: the shard-posterior mode the
    expansion was taken at (diagnostic only; it is not needed by the sampler).
    """

    precision: torch.Tensor
    eta: torch.Tensor
    mode: torch.Tensor

    def grad_neg_log(self, z: torch.Tensor) -> torch.Tensor:
        """``grad(-log q_s)(z) = P z - eta`` for ``z`` of shape ``(C, D)``."""
        return z @ self.precision.T - self.eta

    def mean(self) -> torch.Tensor:
        """The Gaussian's mean ``P^-1 eta`` (needs ``P`` positive definite)."""
        return torch.linalg.solve(self.precision, self.eta)


@dataclass
class ChainPacket:
    """What travels between shards: the chains and their randomness, nothing else.

    ``z``: ``(C, D)`` states; ``t``: global step counter; ``round``: rounds done;
    ``shard``: the shard that runs the next round; ``rng_state``: the chains' generator state.
    """

    z: torch.Tensor
    t: int
    round: int
    shard: int
    rng_state: torch.Tensor
    extra: dict = field(default_factory=dict)


def _shard_size(pot: Potential) -> int:
    sizes = [s for name, s in pot._plate_sizes.items() if not name.startswith("_")]
    return max(sizes) if sizes else 0


class ShardWorker:
    """One shard: its potential, prior potential and (after fitting) its surrogate ``q_s``."""

    def __init__(
        self,
        index: int,
        model: Callable,
        model_args: tuple,
        model_kwargs: dict | None,
        *,
        max_plate_nesting: int | None = None,
    ) -> None:
        self.index = index
        model_kwargs = dict(model_kwargs or {})
        for a in list(model_args) + list(model_kwargs.values()):
            if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == 0:
                raise ValueError(f"shard {index} is empty (a data tensor has 0 rows)")
        self.potential = Potential(
            model, model_args, model_kwargs, max_plate_nesting=max_plate_nesting
        )
        self.size = _shard_size(self.potential)
        if self.size == 0:
            raise ValueError(f"shard {index} is empty (its data plate has 0 rows)")
        observed = [
            name
            for name, node in self.potential._proto_nodes.items()
            if node["type"] == "sample" and node["is_observed"]
        ]
        self.observed_shapes = {
            name: tuple(self.potential._proto_nodes[name]["fn"].event_shape) for name in observed
        }
        self.prior = Potential(
            model,
            model_args,
            model_kwargs,
            max_plate_nesting=max_plate_nesting,
            exclude_sites=observed,
        )
        self.approximation: ShardApproximation | None = None

    def fit_approximation(self, p_s: float, mode_steps: int = 200) -> ShardApproximation:
        """Fit ``q_s`` (see the module docstring); deterministic (starts at ``z = 0``)."""
        self.approximation = fit_shard_approximation(
            self.potential, self.prior, p_s, mode_steps=mode_steps
        )
        return self.approximation


def fit_shard_approximation(
    potential: Potential, prior: Potential, p_s: float, *, mode_steps: int = 200
) -> ShardApproximation:
    """Second-order expansion of the shard's negative log-likelihood at its posterior mode."""
    D = potential.dim
    z0 = torch.zeros(1, D, dtype=potential.dtype, device=potential.device)
    if not bool(torch.isfinite(potential(z0)).all()):
        z0 = potential.initial_params(1)
    mode = find_mode(potential, z0, num_steps=mode_steps)[0]

    def neg_log_lik(z: torch.Tensor) -> torch.Tensor:
        zz = z.unsqueeze(0)
        return p_s * (potential(zz) - prior(zz)).sum()

    with torch.enable_grad():
        zz = mode.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(neg_log_lik(zz), zz)
    H = torch.autograd.functional.hessian(neg_log_lik, mode.detach())
    H = (H + H.T) / 2
    check_finite("Hessian of the shard log-likelihood", H.reshape(1, -1))
    eta = H @ mode - g
    return ShardApproximation(H.detach(), eta.detach(), mode.detach())


def _check_shards(workers: Sequence[ShardWorker]) -> None:
    first = workers[0]
    for w in workers[1:]:
        if w.potential.site_shapes != first.potential.site_shapes:
            raise ValueError(
                f"shards 0 and {w.index} have different latent sites/shapes: "
                f"{dict(first.potential.site_shapes)} vs {dict(w.potential.site_shapes)}"
            )
        if w.observed_shapes != first.observed_shapes:
            raise ValueError(
                f"shards 0 and {w.index} have different observed event shapes: "
                f"{first.observed_shapes} vs {w.observed_shapes}"
            )


class FederatedSGLD:
    """DSGLD / FSGLD over a list of shards (see the module docstring).

    Args:
        model: the Pyro model run on every shard.
        shards: ``[(args, kwargs), ...]`` one per shard (e.g. ``spec.shards``).
        method: ``"fsgld"`` (conducive gradients) or ``"dsgld"``.
        step_size: ``h > 0`` or a schedule ``t -> h_t``.
        tau: local steps per visit (``>= 1``).
        subsample_size: rows per local minibatch (``None``: the whole shard).
        shard_probs: visit probabilities ``p_s`` (default ``N_s / N``); they must match the
            ``1 / p_s`` scaling of the shard models.
        seed: seed of the chains' generator (noise, minibatches, shard visits, initial points).
        mode_steps: L-BFGS iterations for each ``q_s`` fit.
        shard_indices: build only these shards (distributed workers build their own one).
    """

    def __init__(
        self,
        model: Callable,
        shards: Sequence[tuple[tuple, dict]],
        *,
        method: str = "fsgld",
        step_size: float | Callable[[int], float] = 1e-3,
        tau: int = 1,
        subsample_size: int | None = None,
        shard_probs: Sequence[float] | None = None,
        max_plate_nesting: int | None = None,
        seed: int = 0,
        mode_steps: int = 200,
        shard_indices: Sequence[int] | None = None,
        shard_sizes: Sequence[int] | None = None,
    ) -> None:
        if method not in ("fsgld", "dsgld"):
            raise ValueError(f"method must be 'fsgld' or 'dsgld', got {method!r}")
        if not isinstance(tau, int) or tau < 1:
            raise ValueError(f"tau must be an int >= 1, got {tau!r}")
        if subsample_size is not None and (
            not isinstance(subsample_size, int) or subsample_size < 1
        ):
            raise ValueError(
                f"subsample_size must be a positive int or None, got {subsample_size!r}"
            )
        if not shards:
            raise ValueError("need at least one shard")
        self.model = model
        self.num_shards = len(shards)
        self.method = method
        self.schedule = as_schedule(step_size)
        self.tau = tau
        self.subsample_size = subsample_size
        self.seed = int(seed)
        self.mode_steps = mode_steps
        idx = range(self.num_shards) if shard_indices is None else shard_indices
        self.workers: dict[int, ShardWorker] = {}
        for s in idx:
            args, kwargs = shards[s]
            self.workers[s] = ShardWorker(
                s, model, tuple(args), kwargs, max_plate_nesting=max_plate_nesting
            )
        _check_shards(list(self.workers.values()))
        for w in self.workers.values():
            if subsample_size is not None and subsample_size > w.size:
                raise ValueError(
                    f"subsample_size={subsample_size} is larger than shard {w.index} "
                    f"({w.size} rows)"
                )
        if shard_sizes is None:
            if len(self.workers) != self.num_shards:
                raise ValueError("pass shard_sizes when building only some shards")
            shard_sizes = [self.workers[s].size for s in range(self.num_shards)]
        self.set_shard_sizes(shard_sizes, shard_probs)
        any_pot = next(iter(self.workers.values())).potential
        self.dim = any_pot.dim
        self.dtype, self.device = any_pot.dtype, any_pot.device
        self.approximations: dict[int, ShardApproximation] = {}
        self._sum_precision = None
        self._sum_eta = None

    def set_shard_sizes(self, shard_sizes: Sequence[int], shard_probs=None) -> None:
        """Record ``N_s`` and the visit probabilities (default ``p_s = N_s / N``)."""
        self.shard_sizes = [int(n) for n in shard_sizes]
        if len(self.shard_sizes) != self.num_shards:
            raise ValueError(f"need {self.num_shards} shard sizes, got {self.shard_sizes}")
        empty = [s for s, n in enumerate(self.shard_sizes) if n < 1]
        if empty:
            raise ValueError(f"shard(s) {empty} are empty")
        if shard_probs is None:
            total = sum(self.shard_sizes)
            shard_probs = [n / total for n in self.shard_sizes]
        probs = [float(p) for p in shard_probs]
        if len(probs) != self.num_shards or min(probs) <= 0 or abs(sum(probs) - 1) > 1e-6:
            raise ValueError(
                f"shard_probs must be {self.num_shards} positive numbers summing "
                f"to 1, got {shard_probs!r}"
            )
        self.shard_probs = probs
        if hasattr(self, "_schedule"):
            del self._schedule

    # ------------------------------------------------------------------ q_s
    def fit_local_approximations(self) -> dict[int, ShardApproximation]:
        """Fit ``q_s`` on every shard held here (FSGLD needs them; DSGLD does not)."""
        for s, w in self.workers.items():
            self.approximations[s] = w.fit_approximation(self.shard_probs[s], self.mode_steps)
        return self.approximations

    def set_approximations(self, approximations: dict[int, ShardApproximation]) -> None:
        """Install every shard's ``q_s`` (after they crossed the wire) and their sums."""
        if sorted(approximations) != list(range(self.num_shards)):
            raise ValueError(f"need one approximation per shard 0..{self.num_shards - 1}")
        self.approximations = dict(approximations)
        # summed in shard order, so every process gets the same bits
        self._sum_precision = sum(approximations[s].precision for s in range(self.num_shards))
        self._sum_eta = sum(approximations[s].eta for s in range(self.num_shards))

    # ------------------------------------------------------------------ the algorithm
    def initial_packet(
        self, num_chains: int, initial_params: torch.Tensor | None = None
    ) -> ChainPacket:
        """Chains at their start (drawn on the lowest-index local shard, seeded) and the
        first shard to visit."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed)
        if initial_params is None:
            w = self.workers[min(self.workers)]
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                z = w.potential.initial_params(num_chains)
        else:
            z = torch.as_tensor(initial_params, dtype=self.dtype, device=self.device)
            if z.shape != (num_chains, self.dim):
                raise ValueError(
                    f"initial params must have shape ({num_chains}, {self.dim}), "
                    f"got {tuple(z.shape)}"
                )
        return ChainPacket(z.detach().clone(), 0, 0, self.shard_for_round(0), gen.get_state())

    def shard_for_round(self, r: int) -> int:
        """The shard visited in round ``r``: ``s_r ~ Categorical(p)`` i.i.d., from a generator
        seeded with ``seed + 1`` -- every process can compute the whole visit schedule, so
        the chains' packet always goes to a known peer (no any-source receives)."""
        if not hasattr(self, "_schedule"):
            self._schedule: list[int] = []
            self._schedule_gen = torch.Generator().manual_seed(self.seed + 1)
            self._probs = torch.tensor(self.shard_probs, dtype=torch.float64)
        while len(self._schedule) <= r:
            nxt = torch.multinomial(self._probs, 1, generator=self._schedule_gen).item()
            self._schedule.append(int(nxt))
        return self._schedule[r]

    def local_gradient(
        self, s: int, z: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_s(z), g)`` for shard ``s``: DSGLD's or FSGLD's local gradient."""
        pot = self.workers[s].potential
        u, g = pot.value_and_grad(z, self.subsample_size, generator=gen)
        if self.method == "fsgld":
            if self._sum_precision is None:
                raise RuntimeError(
                    "FSGLD needs the shard approximations: call "
                    "fit_local_approximations() and set_approximations()"
                )
            q = self.approximations[s]
            conducive = (z @ self._sum_precision.T - self._sum_eta) - (
                q.grad_neg_log(z) / self.shard_probs[s]
            )
            g = g + conducive
        return u, g

    def run_round(self, packet: ChainPacket) -> tuple[ChainPacket, torch.Tensor]:
        """``tau`` local steps on ``packet.shard`` (must be held here); returns the new packet
        (with the next shard drawn) and the ``(C, tau, D)`` draws of this round."""
        s = packet.shard
        if s not in self.workers:
            raise ValueError(f"shard {s} is not held by this process")
        gen = torch.Generator(device=self.device)
        gen.set_state(packet.rng_state)
        z, t = packet.z, packet.t
        slices = self.workers[s].potential.site_slices
        draws = []
        for _ in range(self.tau):
            h = float(self.schedule(t))
            if not (math.isfinite(h) and h > 0):
                raise ValueError(f"step-size schedule gave h={h!r} at iteration {t}; need h > 0")
            u, g = self.local_gradient(s, z, gen)
            if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(g).all())):
                self._raise_nonfinite(s, z, u, g, t)
            noise = torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device)
            z = sgld_step(z, g, h, noise)
            check_finite(f"state on shard {s}", z, t, site_names=slices)
            draws.append(z)
            t += 1
        nxt = self.shard_for_round(packet.round + 1)
        out = ChainPacket(z, t, packet.round + 1, nxt, gen.get_state(), copy.copy(packet.extra))
        return out, torch.stack(draws, dim=1)

    def _raise_nonfinite(self, s, z, u, g, t) -> None:
        pot = self.workers[s].potential
        chains, latent, model_sites = pot.nonfinite_report(z, u, g)
        zb = z[chains]
        raise FloatingPointError(
            f"non-finite potential/gradient on shard {s} at iteration {t}: chain(s) "
            f"{chains[:10]}, latent site(s) with non-finite state or gradient {latent}, "
            f"model site(s) with non-finite log-density {model_sites}, at latent values "
            f"{ {k: v.tolist() for k, v in pot.unpack(zb[:1]).items()} }. "
            "Try a smaller step size, or check the model's parameters/data."
        )

    # ------------------------------------------------------------------ in-process execution
    def run(
        self,
        num_rounds: int,
        num_chains: int = 1,
        *,
        initial_params: torch.Tensor | None = None,
        packet: ChainPacket | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, ChainPacket]:
        """Run ``num_rounds`` rounds in this process (all shards held here).

        Returns ``(draws (C, num_rounds * tau, D) unconstrained, final packet)``; pass the
        packet back (``packet=``) to continue -- it is the whole checkpoint (with
        :attr:`approximations`). Use :meth:`constrain` for ``{site: (C, S, *shape)}``.
        """
        from tqdm.auto import tqdm

        if len(self.workers) != self.num_shards:
            raise ValueError("in-process run needs every shard")
        if self.method == "fsgld" and self._sum_precision is None:
            self.set_approximations(self.fit_local_approximations())
        if packet is None:
            packet = self.initial_packet(num_chains, initial_params)
        draws = []
        for _ in tqdm(range(num_rounds), disable=not progress, desc=self.method.upper()):
            packet, d = self.run_round(packet)
            draws.append(d)
        return torch.cat(draws, dim=1), packet

    def constrain(self, draws: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(C, S, D)`` unconstrained draws -> ``{site: (C, S, *shape)}``."""
        pot = next(iter(self.workers.values())).potential
        C, S = draws.shape[:2]
        flat = pot.unpack(draws.reshape(C * S, -1))
        return {k: v.reshape((C, S) + tuple(v.shape[1:])) for k, v in flat.items()}
