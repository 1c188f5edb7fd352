"""Federated SGLD: distributed SGLD (DSGLD) and FSGLD with conducive gradients.

The data are split into ``S`` shards (clients). Shard ``s`` holds ``N_s`` rows and is visited
with probability ``p_s`` (default ``N_s / N``). A chain visits one shard per *round* and takes
``tau`` local Langevin steps there (:func:`mcmc.sgld.sgld_step`, ``z' = z - h g + sqrt(2h) xi``),
then moves to the next shard, drawn ``s ~ Categorical(p)`` (from a schedule generator seeded
with ``seed + 1``, so every process knows the whole visit schedule).

Local gradients
---------------
Each shard is given as the model plus the shard's data (``shards = [(args, kwargs), ...]``); its
local stand-in for the full potential is

    U_s(z) = U_prior(z) - (1 / p_s) log p(D_s | x(z)),

(``U_prior`` includes the log|det J| of the unconstrained transform). The likelihood is the
model's observed sample sites (``pyro.factor`` sites included): with ``scale_likelihood=True``
(default) the sampler multiplies them by ``1 / p_s``, so any model written for its own data
works -- e.g. a regression run on a slice of the rows. Pass ``scale_likelihood=False`` for shard
models that scale their likelihood themselves (the zoo's ``spec.shards``, which pass
``num_total=N``). ``subsample_size`` subsamples rows within the shard (unbiased via Pyro's plate
scaling, :mod:`mcmc.potential`).

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
``U_s`` is minimised with L-BFGS (:func:`mcmc.laplace.find_mode`; it exists even when the
likelihood alone is flat in some direction), and ``L_s(z) = p_s (U_s(z) - U_prior(z))`` (the
shard's negative log-likelihood, Jacobian terms cancel) is expanded to second order there:
``U_qs(z) = g_s^T (z - m_s) + (z - m_s)^T Lambda_s (z - m_s) / 2`` with ``g_s``, ``Lambda_s`` the
gradient and Hessian of ``L_s`` at the mode ``m_s``. Only the natural parameters
``Lambda_s`` (``D x D``) and ``eta_s = Lambda_s m_s - g_s`` (``grad U_qs(z) = Lambda_s z -
eta_s``) leave the shard. For Gaussian likelihoods the expansion is exact.

Execution
---------
:class:`FederatedSGLD` holds the algorithm (one implementation, run by the one chain driver
:class:`mcmc.chains.ChainDriver`). :meth:`FederatedSGLD.sample_chains` executes it in one process
(shards as tensors, ``C`` chains vectorised; step ``t`` runs on the shard of round ``t // tau``);
:func:`mcmc.distributed.run_worker` runs the same code with one process per shard, moving the
chains' packet (states, step counter and the chains' ``torch.Generator`` state) between
processes round by round (:meth:`FederatedSGLD.run_round`) -- the draws are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .chains import ChainDriver, StepRandomness, check_run_lengths
from .laplace import find_mode
from .potential import Potential, capture_option, check_finite
from .schedules import as_schedule
from .sgld import sgld_step

__all__ = [
    "ChainPacket",
    "FederatedSGLD",
    "FederatedState",
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


class FederatedState(NamedTuple):
    """State of ``C`` federated chains: the points, and the local potential and gradient that
    moved them there (at the previous points; zeros before the first step)."""

    z: torch.Tensor  # (C, D)
    potential_energy: torch.Tensor  # (C,)
    grad: torch.Tensor  # (C, D)


class _ScaleLikelihood(Messenger):
    """Multiply the ``scale`` of the model's own observed sites by :attr:`scale` (``1 / p_s``).

    It sits inside the potential's conditioning, so latent sites (conditioned on the chain
    states later) are not scaled."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = self.scale * msg["scale"]


class ShardWorker:
    """One shard: its potential, prior potential and (after fitting) its surrogate ``q_s``."""

    def __init__(
        self,
        index: int,
        model: Callable,
        model_args: tuple,
        model_kwargs: dict | None,
        *,
        scale_likelihood: bool = True,
        max_plate_nesting: int | None = None,
        subsample_size: int | Mapping[str, int] | None = None,
        init_strategy: Callable = init_to_uniform,
        vectorize: str = "auto",
        capture: str | bool = "auto",
    ) -> None:
        self.index = index
        model_kwargs = dict(model_kwargs or {})
        for a in list(model_args) + list(model_kwargs.values()):
            if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == 0:
                raise ValueError(f"shard {index} is empty (a data tensor has 0 rows)")
        self.likelihood_scale = _ScaleLikelihood(1.0) if scale_likelihood else None
        local = model if self.likelihood_scale is None else self.likelihood_scale(model)
        common = {"max_plate_nesting": max_plate_nesting, "init_strategy": init_strategy,
                  "vectorize": vectorize, "owner": "FederatedSGLD", "capture": capture}
        try:
            self.potential = Potential(local, model_args, model_kwargs,
                                       subsample_size=subsample_size, **common)
        except ValueError as e:
            raise ValueError(f"shard {index}: {e}") from e
        sizes = list(self.potential.data_plates.values())
        self.size = max(sizes) if sizes else 0
        if self.size == 0:
            raise ValueError(f"shard {index} has no data plate (or it is empty): the shard's rows "
                             "must sit in a pyro.plate")
        self.observed_shapes = dict(self.potential.observed_shapes)
        self.prior = Potential(local, model_args, model_kwargs,
                               exclude_sites=list(self.observed_shapes), **common)
        self.approximation: ShardApproximation | None = None

    def set_visit_probability(self, p_s: float) -> None:
        """Scale the likelihood by ``1 / p_s`` (when the sampler does the scaling)."""
        if self.likelihood_scale is not None and self.likelihood_scale.scale != 1.0 / p_s:
            self.likelihood_scale.scale = 1.0 / p_s
            self.potential.clear_captures()  # the scale is frozen into captured graphs
            self.prior.clear_captures()

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
        model: the Pyro model run on every shard (any model ``pyro.infer.NUTS`` runs).
        shards: ``[(args, kwargs), ...]`` one per shard (e.g. the model's data split by rows).
        method: ``"fsgld"`` (conducive gradients) or ``"dsgld"``.
        step_size: ``h > 0`` or a schedule ``t -> h_t``.
        tau: local steps per visit (``>= 1``).
        subsample_size: rows per local minibatch (``None``: the whole shard; an int or
            ``{plate: B}`` as for :class:`mcmc.sgld.SGLD`).
        shard_probs: visit probabilities ``p_s`` (default ``N_s / N``).
        scale_likelihood: multiply each shard's observed sites by ``1 / p_s`` (default); pass
            ``False`` when the shard models already scale their likelihood.
        seed: seed of the chains' generator (noise, minibatches, initial points) and, plus one,
            of the shard-visit schedule.
        mode_steps: L-BFGS iterations for each ``q_s`` fit.
        init_strategy, max_plate_nesting, with_replacement, vectorize, capture, block_size: as
            for :class:`mcmc.sgld.SGLD` (block steps in :meth:`sample_chains` only: a round of
            :meth:`run_round` is short and starts a fresh driver).
        shard_indices: build only these shards (distributed workers build their own one).
        shard_sizes: ``N_s`` of every shard (needed with ``shard_indices``).
    """

    def __init__(
        self,
        model: Callable,
        shards: Sequence[tuple[tuple, dict] | None],
        *,
        method: str = "fsgld",
        step_size: float | Callable[[int], float] = 1e-3,
        tau: int = 1,
        subsample_size: int | Mapping[str, int] | None = None,
        shard_probs: Sequence[float] | None = None,
        scale_likelihood: bool = True,
        max_plate_nesting: int | None = None,
        seed: int = 0,
        mode_steps: int = 200,
        init_strategy: Callable = init_to_uniform,
        with_replacement: bool = False,
        vectorize: str = "auto",
        capture: str | bool = "auto",
        block_size: int | str = "auto",
        shard_indices: Sequence[int] | None = None,
        shard_sizes: Sequence[int] | None = None,
    ) -> None:
        if method not in ("fsgld", "dsgld"):
            raise ValueError(f"FederatedSGLD(..., method={method!r}): method must be 'fsgld' or "
                             "'dsgld'")
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
            raise ValueError(f"FederatedSGLD(..., tau={tau!r}): tau must be an int >= 1")
        if subsample_size is not None and not isinstance(subsample_size, Mapping) and (
            isinstance(subsample_size, bool) or not isinstance(subsample_size, int)
            or subsample_size < 1
        ):
            raise ValueError(
                f"FederatedSGLD(..., subsample_size={subsample_size!r}): must be a positive int, "
                "{plate: positive int} or None"
            )
        if not shards:
            raise ValueError("FederatedSGLD: need at least one shard")
        self.model = model
        self.num_shards = len(shards)
        self.method = method
        self.schedule = as_schedule(step_size)
        self.tau = tau
        self.subsample_size = subsample_size
        self.with_replacement = with_replacement
        self.seed = int(seed)
        self.mode_steps = mode_steps
        self.init_strategy = init_strategy
        self.capture = capture_option(capture, "FederatedSGLD")
        self.block_size = block_size
        idx = range(self.num_shards) if shard_indices is None else shard_indices
        self.workers: dict[int, ShardWorker] = {}
        for s in idx:
            args, kwargs = shards[s]
            self.workers[s] = ShardWorker(
                s, model, tuple(args), kwargs, scale_likelihood=scale_likelihood,
                max_plate_nesting=max_plate_nesting, subsample_size=subsample_size,
                init_strategy=init_strategy, vectorize=vectorize, capture=capture,
            )
        _check_shards(list(self.workers.values()))
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
        self._driver: ChainDriver | None = None
        self.convergence = None  # ConvergenceReport of the last sample_chains (diagnostics)

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
                f"FederatedSGLD(..., shard_probs={shard_probs!r}): must be {self.num_shards} "
                "positive numbers summing to 1"
            )
        self.shard_probs = probs
        for s, w in self.workers.items():
            w.set_visit_probability(probs[s])
        if getattr(self, "_driver", None) is not None:
            self._driver.clear_captures()
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
        if getattr(self, "_driver", None) is not None:
            self._driver.clear_captures()  # captured blocks hold the old approximations

    # ------------------------------------------------------------------ the schedule
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

    def shard_for_step(self, t: int) -> int:
        """The shard that runs step ``t`` (round ``t // tau``)."""
        return self.shard_for_round(t // self.tau)

    # ------------------------------------------------------------------ the algorithm
    def local_gradient(
        self, s: int, z: torch.Tensor, indices: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_s(z), g)`` for shard ``s`` on the minibatch ``indices``: DSGLD's or FSGLD's
        local gradient."""
        if s not in self.workers:
            raise ValueError(f"shard {s} is not held by this process")
        pot = self.workers[s].potential
        u, g = pot.value_and_grad(z, indices)
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

    def init(self, z: torch.Tensor) -> FederatedState:
        return FederatedState(z, z.new_zeros(z.shape[0]), torch.zeros_like(z))

    def draw(self, state: FederatedState, generator: torch.Generator, t: int) -> StepRandomness:
        z = state.z
        s = self.shard_for_step(t)
        if s not in self.workers:
            raise ValueError(f"shard {s} is not held by this process")
        indices = self.workers[s].potential.draw_indices(
            z.shape[0], generator, with_replacement=self.with_replacement
        )
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return StepRandomness(noise, indices)

    def step(self, state: FederatedState, step_size, randomness: StepRandomness,
             t: int) -> FederatedState:
        """The local gradient on shard ``s(t)``, then ``z' = sgld_step(z, g, h, xi)``."""
        u, g = self.local_gradient(self.shard_for_step(t), state.z, randomness.indices)
        return FederatedState(sgld_step(state.z, g, step_size, randomness.noise), u, g)

    @staticmethod
    def positions(state: FederatedState) -> torch.Tensor:
        return state.z

    def block_key(self, t: int) -> int:
        """Step ``t`` runs on shard :meth:`shard_for_step` ``(t)``: blocks are captured per
        sequence of shards (see :class:`mcmc.chains.ChainDriver`)."""
        return self.shard_for_step(t)

    def nonfinite_error(self, old, new, t: int, note: str = "") -> FloatingPointError:
        s = self.shard_for_step(t)
        pot = self.workers[s].potential
        z = old.z
        chains, latent, model_sites = pot.nonfinite_report(z, new.potential_energy, new.grad)
        if not chains:  # the gradient was finite but the step overflowed
            chains = torch.nonzero(~torch.isfinite(new.z).all(-1)).flatten().tolist()
            latent = [k for k, sl in pot.site_slices.items()
                      if not bool(torch.isfinite(new.z[:, sl]).all())]
        zb = z[chains[:1]]
        return FloatingPointError(
            f"FederatedSGLD: non-finite potential/gradient on shard {s} {note}at iteration {t}: "
            f"chain(s) {chains[:10]}, latent site(s) with non-finite state or gradient {latent}, "
            f"model site(s) with non-finite log-density {model_sites}, at latent values "
            f"{ {k: v.tolist() for k, v in pot.unpack(zb).items()} }. "
            "Try a smaller step size, or check the model's parameters/data."
        )

    # ------------------------------------------------------------------ chains and packets
    def _prepare(self) -> None:
        if self.method == "fsgld" and self._sum_precision is None:
            if len(self.workers) != self.num_shards:
                raise RuntimeError("FSGLD needs every shard's approximation: call "
                                   "set_approximations()")
            self.set_approximations(self.fit_local_approximations())

    def _initial_z(self, num_chains: int, initial_params) -> torch.Tensor:
        if initial_params is None:
            w = self.workers[min(self.workers)]
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                return w.potential.initial_params(num_chains)
        if isinstance(initial_params, dict):
            initial_params = self.workers[min(self.workers)].potential.pack(initial_params)
        z = torch.as_tensor(initial_params, dtype=self.dtype, device=self.device)
        if z.shape != (num_chains, self.dim):
            raise ValueError(
                f"initial params must have shape ({num_chains}, {self.dim}), got {tuple(z.shape)}"
            )
        return z.detach().clone()

    def _new_driver(self, z: torch.Tensor, t: int, rng_state: torch.Tensor | None,
                    block_size: int | str = 1):
        gen = torch.Generator(device=self.device)
        if rng_state is None:
            gen.manual_seed(self.seed)
        else:
            gen.set_state(rng_state)
        driver = ChainDriver(self, self.schedule, generator=gen, name=self.method.upper(),
                             block_size=block_size, capture=self.capture)
        driver.start(z, t=t)
        return driver

    def initial_packet(
        self, num_chains: int, initial_params: torch.Tensor | dict | None = None
    ) -> ChainPacket:
        """Chains at their start (drawn on the lowest-index local shard, seeded) and the
        first shard to visit."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed)
        z = self._initial_z(num_chains, initial_params)
        return ChainPacket(z, 0, 0, self.shard_for_round(0), gen.get_state())

    def run_round(self, packet: ChainPacket) -> tuple[ChainPacket, torch.Tensor]:
        """``tau`` local steps on ``packet.shard`` (must be held here); returns the new packet
        (with the next shard drawn) and the ``(C, tau, D)`` draws of this round."""
        s = packet.shard
        if s not in self.workers:
            raise ValueError(f"shard {s} is not held by this process")
        self._prepare()
        driver = self._new_driver(packet.z, packet.t, packet.rng_state)
        draws = driver.run(self.tau, progress=False)
        nxt = self.shard_for_round(packet.round + 1)
        out = ChainPacket(driver.state.z, driver.t, packet.round + 1, nxt,
                          driver.generator.get_state(), dict(packet.extra))
        return out, draws

    def sample_chains(
        self,
        num_samples: int,
        *,
        num_chains: int = 1,
        warmup_steps: int = 0,
        thinning: int = 1,
        initial_params: torch.Tensor | dict | None = None,
        progress: bool = True,
        unconstrained: bool = False,
        diagnostics: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Run ``num_chains`` chains in this process (every shard held here); return
        ``{site: (C, num_samples, *shape)}`` (``"_z"``: flat unconstrained draws with
        ``unconstrained=True``).

        Step ``t`` runs on the shard of round ``t // tau``; ``warmup_steps`` steps are discarded,
        then every ``thinning``-th of ``num_samples * thinning`` steps is kept (``num_samples=0``:
        warm-up only). A second call continues the held chains (same ``num_chains``; another
        number is an error, :meth:`reset` starts afresh; ``initial_params`` start a fresh run).
        The draws are checked at the end as in :meth:`mcmc.chains.LangevinKernel.sample_chains`
        (report in :attr:`convergence`; ``diagnostics=False`` skips it).
        """
        check_run_lengths(num_samples, warmup_steps, thinning, "FederatedSGLD.sample_chains")
        if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"FederatedSGLD.sample_chains(..., num_chains={num_chains!r}): "
                             "must be a positive int")
        if len(self.workers) != self.num_shards:
            raise ValueError("in-process sampling needs every shard")
        self._prepare()
        held = None if self._driver is None else self._driver.num_chains
        if initial_params is not None or held is None:
            self._driver = self._new_driver(self._initial_z(num_chains, initial_params), 0, None,
                                            self.block_size)
        elif held != num_chains:
            raise ValueError(
                f"FederatedSGLD.sample_chains(..., num_chains={num_chains}): the sampler holds "
                f"{held} chain(s) and continues them; pass num_chains={held}, or call reset()"
            )
        zs = self._driver.run(num_samples, warmup_steps=warmup_steps, thinning=thinning,
                              progress=progress)
        if diagnostics:
            from .diagnostics import check_chains

            pot = next(iter(self.workers.values())).potential
            self.convergence = check_chains(zs, pot.site_slices, name=self.method.upper())
            self.convergence.announce(stacklevel=2)
        return {"_z": zs} if unconstrained else self.constrain(zs)

    def reset(self) -> None:
        """Forget the chains (the next run starts from fresh initial points)."""
        self._driver = None

    @property
    def driver(self) -> ChainDriver | None:
        """The :class:`mcmc.chains.ChainDriver` of the in-process chains (``None`` before)."""
        return self._driver

    def state_dict(self) -> dict:
        """The chains (driver state and generator), the shard approximations and the seed of
        the visit schedule: everything a bit-identical continuation needs."""
        if self._driver is None:
            raise RuntimeError("nothing to checkpoint: no chains yet")
        return {"kernel": "FederatedSGLD", "driver": self._driver.state_dict(),
                "approximations": dict(self.approximations), "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` output."""
        if sd.get("kernel") != "FederatedSGLD":
            raise ValueError(f"checkpoint is from {sd.get('kernel')!r}, not 'FederatedSGLD'")
        if sd["approximations"]:
            self.set_approximations(sd["approximations"])
        self.seed = int(sd["seed"])  # the shard-visit schedule is part of the chains' law
        if hasattr(self, "_schedule"):
            del self._schedule
        z = sd["driver"]["state"]["z"]
        self._driver = self._new_driver(z, int(sd["driver"]["t"]), None, self.block_size)
        self._driver.load_state_dict(sd["driver"], FederatedState)

    def constrain(self, draws: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(C, S, D)`` unconstrained draws -> ``{site: (C, S, *shape)}``."""
        pot = next(iter(self.workers.values())).potential
        C, S = draws.shape[:2]
        flat = pot.unpack(draws.reshape(C * S, draws.shape[-1]))
        return {k: v.reshape((C, S) + tuple(v.shape[1:])) for k, v in flat.items()}

