"""One chain driver for every Langevin-type sampler: warm-up, thinning, progress bar, NaN checks,
step halving and checkpoints.

A sampler (SGLD, pSGLD, CV-SGLD, the Bregman proximal kernels, federated SGLD) provides an
*algorithm* in the BlackJAX style -- a state ``NamedTuple`` whose tensor fields all have the
chains on their leading dim, and pure tensor functions:

* ``init(z) -> state``: the state at the unconstrained points ``z (C, D)``;
* ``draw(state, generator, t) -> randomness``: everything random about step ``t`` (Gaussian
  noise, minibatch row indices), drawn from the sampler's own ``torch.Generator`` -- so the
  randomness of ``k`` steps can be drawn ahead and the steps run as one captured graph;
* ``step(state, step_size, randomness, t) -> state``: the update, a function of tensors only;
* ``positions(state) -> (C, D)``: what a draw records (the unconstrained point);
* ``nonfinite_error(old, new, t, note) -> Exception``: the user-facing error when a chain's new
  state is NaN/inf (names the iteration, chains and model sites).

:class:`ChainDriver` runs it: the step size ``h_t`` comes from a schedule
(:mod:`mcmc.schedules`); every step checks the new state's tensors for NaN/inf and either raises
(``on_nonfinite="raise"``) or, with ``"halve"``, rejects the bad chains' proposals, halves their
step-size multiplier for the rest of the run and redraws them (at most ``max_halvings`` times per
step). :meth:`ChainDriver.run` keeps every ``thinning``-th state after ``warmup_steps`` steps;
``num_samples = 0`` runs the warm-up only and returns ``(C, 0, D)`` draws.
:meth:`ChainDriver.state_dict` holds the state, step counter, multipliers and the generator's
state, so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from tqdm.auto import tqdm

from .potential import Potential
from .schedules import as_schedule

__all__ = [
    "ChainAlgorithm",
    "ChainDriver",
    "LangevinKernel",
    "StepRandomness",
    "check_run_lengths",
    "progress_bar",
]

#: seconds a run must last before its progress bar appears (short runs stay quiet)
PROGRESS_DELAY = 2.0


def progress_bar(total: int, *, progress: bool = True, desc: str | None = None):
    """The progress bar of every sampler loop: ``tqdm.auto``, shown only for runs that last
    longer than :data:`PROGRESS_DELAY` seconds (``progress=False`` hides it)."""
    return tqdm(total=total, disable=not progress, desc=desc, delay=PROGRESS_DELAY, leave=False)


def check_run_lengths(num_samples: Any, warmup_steps: Any = 0, thinning: Any = 1,
                      owner: str = "sample_chains") -> None:
    """Validate ``num_samples >= 0``, ``warmup_steps >= 0``, ``thinning >= 1`` (ints)."""
    for name, value, low in (("num_samples", num_samples, 0), ("warmup_steps", warmup_steps, 0),
                             ("thinning", thinning, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{owner}(..., {name}={value!r}): {name} must be an int >= {low}")


class ChainAlgorithm(Protocol):
    """What :class:`ChainDriver` needs from a sampler (see the module docstring)."""

    def init(self, z: torch.Tensor) -> NamedTuple: ...

    def draw(self, state: NamedTuple, generator: torch.Generator, t: int) -> Any: ...

    def step(self, state: NamedTuple, step_size, randomness: Any, t: int) -> NamedTuple: ...

    def positions(self, state: NamedTuple) -> torch.Tensor: ...

    def nonfinite_error(self, old: NamedTuple, new: NamedTuple, t: int,
                        note: str) -> Exception: ...


def _finite_rows(state: NamedTuple) -> torch.Tensor:
    """``(C,)`` True where every tensor field of the state is finite for that chain."""
    ok = None
    for v in state:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            f = torch.isfinite(v.reshape(v.shape[0], -1)).all(-1) if v.dim() else \
                torch.isfinite(v).expand(1)
            ok = f if ok is None else ok & f
    return ok


def _where(bad: torch.Tensor, new: NamedTuple, old: NamedTuple) -> NamedTuple:
    """Per chain: ``new`` where ``bad`` else ``old`` (every tensor field, chains leading)."""
    out = []
    for a, b in zip(new, old):
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            out.append(torch.where(bad.reshape((-1,) + (1,) * (a.dim() - 1)), a, b))
        else:
            out.append(a)
    return type(new)(*out)


class ChainDriver:
    """Runs ``C`` chains of a :class:`ChainAlgorithm` (see the module docstring).

    Args:
        algorithm: the sampler's state/step functions.
        step_size: ``h > 0`` or a schedule ``t -> h_t``.
        generator: the sampler's ``torch.Generator`` (all of its randomness).
        on_nonfinite: ``"raise"`` or ``"halve"``.
        max_halvings: how many halvings one step may try before giving up.
        name: shown on the progress bar.

    Attributes:
        state: the algorithm's state (``None`` before :meth:`start`).
        t: steps taken so far (the schedule's argument for the next step).
        multiplier: ``(C, 1)`` per-chain step-size multipliers (``"halve"``).
        num_halvings: proposals rejected and redrawn so far.
    """

    def __init__(
        self,
        algorithm: ChainAlgorithm,
        step_size: float | Callable[[int], float],
        *,
        generator: torch.Generator,
        on_nonfinite: str = "raise",
        max_halvings: int = 20,
        name: str | None = None,
    ) -> None:
        if on_nonfinite not in ("raise", "halve"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'halve', got {on_nonfinite!r}")
        self.algorithm = algorithm
        self.schedule = as_schedule(step_size)
        self.generator = generator
        self.on_nonfinite = on_nonfinite
        self.max_halvings = int(max_halvings)
        self.name = name or type(algorithm).__name__
        self.state: NamedTuple | None = None
        self.t = 0
        self.multiplier: torch.Tensor | None = None
        self.num_halvings = 0

    @property
    def num_chains(self) -> int | None:
        return None if self.state is None else self.algorithm.positions(self.state).shape[0]

    def start(self, z: torch.Tensor, t: int = 0) -> None:
        """Initialise the state at ``z (C, D)``; a non-finite start raises the algorithm's error."""
        state = self.algorithm.init(z)
        ok = _finite_rows(state)
        if ok is not None and not bool(ok.all()):
            raise self.algorithm.nonfinite_error(state, state, t, "at the initial point ")
        self.state = state
        self.t = t
        pos = self.algorithm.positions(state)
        self.multiplier = torch.ones(pos.shape[0], 1, dtype=pos.dtype, device=pos.device)
        self.num_halvings = 0

    def step_size_at(self, t: int) -> float:
        h = self.schedule(t)
        h = float(h)
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"step-size schedule gave h={h!r} at iteration {t}; need h > 0")
        return h

    def step(self) -> NamedTuple:
        """One step of every chain; returns the new state."""
        if self.state is None:
            raise RuntimeError("no chain state yet: start the chains first")
        algo, state, t = self.algorithm, self.state, self.t
        h = self.step_size_at(t)
        size = h if self.on_nonfinite == "raise" else h * self.multiplier
        new = algo.step(state, size, algo.draw(state, self.generator, t), t)
        halvings = 0
        while True:
            ok = _finite_rows(new)
            if ok is None or bool(ok.all()):
                break
            if self.on_nonfinite == "raise" or halvings >= self.max_halvings:
                note = f"after {halvings} step halvings " if halvings else ""
                raise algo.nonfinite_error(state, new, t, note)
            bad = ~ok
            halvings += 1
            self.num_halvings += 1
            self.multiplier = torch.where(bad[:, None], self.multiplier / 2, self.multiplier)
            redo = algo.step(state, h * self.multiplier, algo.draw(state, self.generator, t), t)
            new = _where(bad, redo, new)
        self.state = new
        self.t = t + 1
        return new

    def run(
        self,
        num_samples: int,
        *,
        warmup_steps: int = 0,
        thinning: int = 1,
        progress: bool = True,
        callback: Callable[[int, NamedTuple], None] | None = None,
    ) -> torch.Tensor:
        """``warmup_steps`` steps, then ``num_samples * thinning`` steps keeping every
        ``thinning``-th position: returns ``(C, num_samples, D)``. ``callback(t, state)`` runs
        after every step."""
        check_run_lengths(num_samples, warmup_steps, thinning, "run")
        pos = self.algorithm.positions(self.state)
        draws = pos.new_empty((pos.shape[0], num_samples, pos.shape[1]))
        total = warmup_steps + num_samples * thinning
        with progress_bar(total, progress=progress, desc=self.name) as bar:
            for i in range(total):
                state = self.step()
                k = i - warmup_steps + 1
                if k > 0 and k % thinning == 0:
                    draws[:, k // thinning - 1] = self.algorithm.positions(state)
                if callback is not None:
                    callback(self.t, state)
                bar.update()
        return draws

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """State (as a dict of tensors), step counter, multipliers, halvings, generator state."""
        if self.state is None:
            raise RuntimeError("nothing to checkpoint: the chains have not started")
        return {
            "state_type": type(self.state).__name__,
            "state": {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                      for k, v in self.state._asdict().items()},
            "t": self.t,
            "multiplier": self.multiplier.clone(),
            "num_halvings": self.num_halvings,
            "rng_state": self.generator.get_state(),
        }

    def load_state_dict(self, sd: dict, state_type: type) -> None:
        """Restore :meth:`state_dict` output (``state_type``: the algorithm's state class)."""
        if sd.get("state_type") != state_type.__name__:
            raise ValueError(
                f"checkpoint holds a {sd.get('state_type')!r} state, not {state_type.__name__!r}"
            )
        self.state = state_type(**{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                   for k, v in sd["state"].items()})
        self.t = int(sd["t"])
        self.multiplier = sd["multiplier"].clone()
        self.num_halvings = int(sd["num_halvings"])
        self.generator.set_state(sd["rng_state"])


# ---------------------------------------------------------------------------------------------
# Pyro kernel glue shared by the Langevin-type samplers (SGLD family, Bregman proximal kernels)
# ---------------------------------------------------------------------------------------------
class StepRandomness(NamedTuple):
    """Everything random about one Langevin step: Gaussian noise and the minibatch rows."""

    noise: torch.Tensor  # (C, D)
    indices: dict[str, torch.Tensor] | None  # {plate: (C or 1, B)} or None (full data)


class LangevinKernel(MCMCKernel):
    """Base class of the Langevin-type samplers: a Pyro :class:`~pyro.infer.mcmc.MCMCKernel`
    (one chain inside ``pyro.infer.MCMC``) and a vectorised many-chain sampler
    (:meth:`sample_chains`), both run by :class:`ChainDriver` on the model's
    :class:`mcmc.potential.Potential`.

    Subclasses define the algorithm: a state ``NamedTuple`` class (:attr:`state_type`, with
    fields ``z``, ``potential_energy``, ``grad`` first), :meth:`init` and :meth:`step`.

    Args:
        model: a Pyro model with continuous latent sites (or ``None`` with ``potential=``).
        step_size: ``h > 0``, or a schedule ``t -> h_t`` from :mod:`mcmc.schedules`.
        subsample_size: minibatch rows per step: ``None`` (full data -- unless the model's plate
            declares ``subsample_size`` itself), an int (the model's data plate) or
            ``{plate: size}``. See :mod:`mcmc.potential`.
        potential: a ready :class:`~mcmc.potential.Potential` (then ``model`` is not needed
            and the model args given to ``setup``/``sample_chains`` are ignored).
        max_plate_nesting: passed to :class:`~mcmc.potential.Potential`.
        init_strategy: Pyro init strategy for the chains' starting points (and the values of
            the model's first trace: ``init_to_value`` for flat ``ImproperUniform`` priors).
        with_replacement: draw minibatch rows with replacement (``O(B)``; default: without
            replacement within a minibatch).
        shared_minibatch: all vectorised chains use the same minibatch at each step.
        on_nonfinite: ``"raise"`` or ``"halve"`` (see :class:`ChainDriver`).
        max_halvings: how many halvings one step may try before giving up.
        seed: seed of the sampler's ``torch.Generator`` (default: drawn from torch's global RNG
            at set-up, so ``pyro.set_rng_seed`` makes runs reproducible).
        vectorize: how many chains are evaluated (:class:`~mcmc.potential.Potential`).

    Checkpoints: :meth:`state_dict` / :meth:`load_state_dict` (bit-identical continuation; the
    next run must use the checkpoint's number of chains).
    """

    state_type: type = NamedTuple

    def __init__(
        self,
        model: Callable | None = None,
        step_size: float | Callable[[int], float] = 1e-3,
        *,
        subsample_size: int | Mapping[str, int] | None = None,
        potential: Potential | None = None,
        max_plate_nesting: int | None = None,
        init_strategy: Callable = init_to_uniform,
        with_replacement: bool = False,
        shared_minibatch: bool = False,
        on_nonfinite: str = "raise",
        max_halvings: int = 20,
        seed: int | None = None,
        vectorize: str = "auto",
    ) -> None:
        name = type(self).__name__
        if model is None and potential is None:
            raise ValueError(f"{name}: give a Pyro `model` or a ready `potential`")
        self.model = model
        self.schedule = as_schedule(step_size)
        if subsample_size is not None and not isinstance(subsample_size, Mapping) and (
            isinstance(subsample_size, bool)
            or not isinstance(subsample_size, int)
            or subsample_size < 1
        ):
            raise ValueError(
                f"{name}(..., subsample_size={subsample_size!r}): subsample_size must be a "
                "positive int, {plate: positive int} or None"
            )
        if on_nonfinite not in ("raise", "halve"):
            raise ValueError(f"{name}(..., on_nonfinite={on_nonfinite!r}): must be 'raise' or "
                             "'halve'")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{name}(..., seed={seed!r}): seed must be an int or None")
        self.subsample_size = subsample_size
        self.max_plate_nesting = max_plate_nesting
        self.init_strategy = init_strategy
        self.with_replacement = with_replacement
        self.shared_minibatch = shared_minibatch
        self.on_nonfinite = on_nonfinite
        self.max_halvings = int(max_halvings)
        self.seed = seed
        self.vectorize = vectorize
        self.potential = potential
        self._fixed_potential = potential is not None
        self._model_key = None
        self._initial_params = None
        self._pending_checkpoint: dict | None = None
        self._driver: ChainDriver | None = None
        self.generator: torch.Generator | None = None
        self._setup_warmup = 0
        self._steps_since_setup = 0
        self._num_samples_checked = True
        self._in_pyro_mcmc = False
        self._pyro_draws: list[torch.Tensor] = []  # one Pyro MCMC chain's kept points
        self.convergence = None  # ConvergenceReport of the last run (mcmc.diagnostics)

    # ------------------------------------------------------------------ set-up
    @property
    def transforms(self):
        return None if self.potential is None else self.potential.transforms

    @property
    def state(self) -> NamedTuple | None:
        """The chains' state (a :attr:`state_type`), ``None`` before a run."""
        return None if self._driver is None else self._driver.state

    @property
    def driver(self) -> ChainDriver | None:
        """The :class:`ChainDriver` running the chains (``None`` before a run)."""
        return self._driver

    def _potential_options(self) -> dict:
        """Extra keyword arguments for :class:`~mcmc.potential.Potential` (e.g. exclude_sites)."""
        return {}

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
                self.model, model_args, model_kwargs, max_plate_nesting=self.max_plate_nesting,
                init_strategy=self.init_strategy, subsample_size=self.subsample_size,
                vectorize=self.vectorize, owner=type(self).__name__, **self._potential_options(),
            )
            self._model_key = key
            self._on_new_potential()
            if self._driver is not None and self._driver.state is not None:
                # the state's (U, grad U) belong to the old data: recompute them at its points
                self._driver.state = self.init(self.positions(self._driver.state))
        return self.potential

    def _on_new_potential(self) -> None:
        pass

    def _new_generator(self) -> torch.Generator:
        gen = torch.Generator(device=self.potential.device)
        seed = self.seed if self.seed is not None else int(torch.randint(2**62, ()).item())
        gen.manual_seed(seed)
        return gen

    def _new_driver(self) -> ChainDriver:
        return ChainDriver(self, self.schedule, generator=self.generator,
                           on_nonfinite=self.on_nonfinite, max_halvings=self.max_halvings,
                           name=type(self).__name__)

    def init_state(self, num_chains: int, initial_z: torch.Tensor | None = None) -> None:
        """Fresh chains: ``num_chains`` of them, at ``initial_z`` ``(C, D)`` if given."""
        pot = self.potential
        if pot is None:
            raise RuntimeError("call setup_potential(model_args, model_kwargs) first")
        self.generator = self._new_generator()
        if initial_z is None:
            if self.seed is None:
                initial_z = self._default_initial_z(num_chains)
            else:
                # Pyro's init strategies use torch's global RNG: fork it so that ``seed``
                # alone fixes the whole run (initial points included).
                devices = [pot.device.index or 0] if pot.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed)
                    initial_z = self._default_initial_z(num_chains)
        z = torch.as_tensor(initial_z, dtype=pot.dtype, device=pot.device)
        if z.shape != (num_chains, pot.dim):
            raise ValueError(
                f"initial params must have shape ({num_chains}, {pot.dim}), got {tuple(z.shape)}"
            )
        self._driver = self._new_driver()
        self._driver.start(z.detach().clone())

    def _default_initial_z(self, num_chains: int) -> torch.Tensor:
        return self.potential.initial_params(num_chains, init_strategy=self.init_strategy)

    # ------------------------------------------------------------------ algorithm pieces
    def gradient(
        self, z: torch.Tensor, indices: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, g)`` at ``z (C, D)``: the minibatch (``indices``) estimate of ``U`` and its
        gradient (the gradient estimator of this sampler)."""
        return self.potential.value_and_grad(z, indices)

    def _draw_indices(self, num_chains: int, generator: torch.Generator):
        return self.potential.draw_indices(num_chains, generator, shared=self.shared_minibatch,
                                           with_replacement=self.with_replacement)

    def init(self, z: torch.Tensor) -> NamedTuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, state, step_size, randomness, t: int) -> NamedTuple:  # pragma: no cover
        raise NotImplementedError

    def draw(self, state, generator: torch.Generator, t: int) -> StepRandomness:
        z = state.z
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return StepRandomness(noise, self._draw_indices(z.shape[0], generator))

    @staticmethod
    def positions(state) -> torch.Tensor:
        return state.z

    def nonfinite_error(self, old, new, t: int, note: str = "") -> FloatingPointError:
        """The error for chains whose new state is NaN/inf: iteration, chains, sites."""
        z, u, g = new.z, new.potential_energy, new.grad
        chains, latent, model_sites = self.potential.nonfinite_report(z, u, g)
        bad = ~(torch.isfinite(u) & torch.isfinite(g).all(-1) & torch.isfinite(z).all(-1))
        if not bool(torch.isfinite(z[bad]).all()):
            what = "state"
        elif not bool(torch.isfinite(g[bad]).all()):
            what = "gradient of the potential"
        else:
            what = "potential"
        if note == "at the initial point ":
            hint = "Check the model's parameters/data, or give other initial_params."
        else:
            hint = ("Try a smaller step size"
                    + (" (or on_nonfinite='halve')" if self.on_nonfinite == "raise" else "")
                    + ", or check the model's parameters/data.")
        return FloatingPointError(
            f"{type(self).__name__}: non-finite {what} {note}at iteration {t}: chain(s) "
            f"{chains[:10]}{' ...' if len(chains) > 10 else ''}, latent site(s) {latent}, model "
            f"site(s) with non-finite log-density {model_sites}. {hint}"
        )

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
        progress: bool = True,
        unconstrained: bool = False,
        diagnostics: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Run ``num_chains`` vectorised chains; return ``{site: (C, num_samples, *shape)}``.

        ``warmup_steps`` steps are run and discarded first, then ``num_samples * thinning``
        steps of which every ``thinning``-th is kept (``num_samples=0``: warm-up only; the
        draws then have ``0`` samples). If the kernel already holds chains (a previous call, or
        :meth:`load_state_dict`), the run continues from them -- with the same ``num_chains``
        (another number is an error; :meth:`reset` starts afresh). Explicit ``initial_params``
        (a flat ``(C, D)`` unconstrained tensor or ``{site: constrained (C, *shape)}``) always
        start a fresh run. ``progress``: a progress bar for runs longer than a few seconds.
        With ``unconstrained=True`` the flat unconstrained draws ``(C, S, D)`` are returned
        under the key ``"_z"`` instead.

        After the run the draws are checked (:func:`mcmc.diagnostics.check_chains`: split R-hat
        with >= 2 chains, bulk ESS): the one-line summary goes to the ``mcmc.diagnostics``
        logger (INFO), the report to :attr:`convergence`, and one
        :class:`~mcmc.diagnostics.ConvergenceWarning` saying what to change is issued when the
        chains disagree (R-hat > 1.05) or the ESS is tiny. ``diagnostics=False`` skips this.
        """
        name = type(self).__name__
        check_run_lengths(num_samples, warmup_steps, thinning, f"{name}.sample_chains")
        if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"{name}.sample_chains(..., num_chains={num_chains!r}): must be a "
                             "positive int")
        pot = self.setup_potential(model_args, model_kwargs)
        if self._pending_checkpoint is not None and initial_params is None:
            self._apply_checkpoint(self._pending_checkpoint, num_chains)
        self._pending_checkpoint = None
        # chains left by pyro.infer.MCMC (one chain per MCMC run) are not continued here
        held = None if self._driver is None or self._in_pyro_mcmc else self._driver.num_chains
        self._in_pyro_mcmc = False
        if initial_params is not None or held is None:
            z0 = initial_params
            if isinstance(z0, dict):
                z0 = pot.pack(z0)
                if z0.shape[0] == 1 and num_chains > 1:
                    z0 = z0.expand(num_chains, -1).clone()
            self.init_state(num_chains, z0)
        elif held != num_chains:
            raise ValueError(
                f"{name}.sample_chains(..., num_chains={num_chains}): the kernel holds {held} "
                f"chain(s) (from a previous run or a loaded checkpoint) and continues them; pass "
                f"num_chains={held}, or call reset() (or give initial_params) to start "
                f"{num_chains} fresh chains"
            )
        zs = self._driver.run(num_samples, warmup_steps=warmup_steps, thinning=thinning,
                              progress=progress)
        if diagnostics:
            self._check_draws(zs)
        if unconstrained:
            return {"_z": zs}
        C, S = zs.shape[:2]
        flat = pot.unpack(zs.reshape(C * S, zs.shape[-1]))
        return {k: v.reshape((C, S) + tuple(v.shape[1:])) for k, v in flat.items()}

    def _check_draws(self, zs: torch.Tensor, stacklevel: int = 3) -> None:
        """End-of-run diagnostics of ``(C, S, D)`` draws (see :meth:`sample_chains`)."""
        from .diagnostics import check_chains

        self.convergence = check_chains(zs, self.potential.site_slices, name=type(self).__name__)
        self.convergence.announce(stacklevel=stacklevel)

    def reset(self) -> None:
        """Forget the chains (the next run starts from fresh initial points)."""
        self._driver = None
        self._pending_checkpoint = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Chain states, step counter, multipliers and RNG state (copies)."""
        if self._driver is None or self._driver.state is None:
            raise RuntimeError("nothing to checkpoint: the kernel has no chains yet")
        return {"kernel": type(self).__name__, "driver": self._driver.state_dict(),
                "extra": self._extra_state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; the next run continues bit-identically (and must use
        the checkpoint's number of chains)."""
        if state_dict.get("kernel") != type(self).__name__:
            raise ValueError(
                f"checkpoint is from {state_dict.get('kernel')!r}, not {type(self).__name__!r}"
            )
        self._driver = None
        self._pending_checkpoint = state_dict  # applied once the model's data are known

    def _apply_checkpoint(self, sd: dict, num_chains: int) -> None:
        held = sd["driver"]["state"]["z"].shape[0]
        if held != num_chains:
            raise ValueError(
                f"the loaded {type(self).__name__} checkpoint holds {held} chain(s); it cannot "
                f"continue as num_chains={num_chains}. Sample with num_chains={held}, or call "
                "reset() to discard the checkpoint"
            )
        self._load_extra_state_dict(sd["extra"])
        self.generator = torch.Generator(device=self.potential.device)
        self._driver = self._new_driver()
        self._driver.load_state_dict(sd["driver"], self.state_type)

    def _extra_state_dict(self) -> dict:
        return {}

    def _load_extra_state_dict(self, sd: dict) -> None:
        pass

    # ------------------------------------------------------------------ MCMCKernel interface
    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        self.setup_potential(args, kwargs)
        self._setup_warmup = warmup_steps
        self._steps_since_setup = 0
        self._num_samples_checked = False
        self._in_pyro_mcmc = True
        self._pyro_draws = []
        if self._pending_checkpoint is not None:
            self._apply_checkpoint(self._pending_checkpoint, 1)
            self._pending_checkpoint = None
            return
        z0 = None
        if self._initial_params is not None:
            z0 = self.potential.pack_unconstrained(
                {k: torch.as_tensor(v).unsqueeze(0) for k, v in self._initial_params.items()}
            )
        self.init_state(1, z0)

    @property
    def initial_params(self):
        if self._initial_params is not None:
            return self._initial_params
        if self.state is None:
            return None
        u = self.potential.unpack_unconstrained(self.state.z[:1])
        return {k: v[0] for k, v in u.items()}

    @initial_params.setter
    def initial_params(self, params):
        self._initial_params = params

    def sample(self, params: dict) -> dict:
        z = self.potential.pack_unconstrained({k: v.unsqueeze(0) for k, v in params.items()})
        drv = self._driver
        if not torch.equal(z, drv.state.z):
            drv.state = self.init(z)
        self._steps_since_setup += 1
        state = drv.step()
        if self._steps_since_setup > self._setup_warmup:
            self._pyro_draws.append(state.z.detach().clone())
        return {k: v[0] for k, v in self.potential.unpack_unconstrained(state.z).items()}

    def cleanup(self) -> None:
        # Pyro's MCMC calls cleanup after the last draw; with MCMC(..., num_samples=0) it would
        # then fail inside Pyro with "stack expects a non-empty TensorList": say what is wrong.
        if self._num_samples_checked:
            return
        self._num_samples_checked = True
        if self._driver is not None and self._steps_since_setup <= self._setup_warmup:
            raise ValueError(
                f"MCMC({type(self).__name__}(...), num_samples=0): num_samples must be >= 1 "
                f"(for a warm-up-only run use {type(self).__name__}(...).sample_chains(0, "
                "warmup_steps=...))"
            )
        # the end of one Pyro MCMC chain: its bulk ESS (R-hat needs the other chains, which
        # Pyro may run in other processes: use sample_chains, or MCMC.diagnostics(), for it)
        if self._pyro_draws:
            zs = torch.cat(self._pyro_draws)[None]
            self._pyro_draws = []
            self._check_draws(zs, stacklevel=4)

    def logging(self) -> dict:
        t = self._driver.t if self._driver is not None else 0
        return {"step_size": f"{self.schedule(max(t - 1, 0)):.3g}"}

    def diagnostics(self) -> dict:
        if self._driver is None:
            return {}
        # "divergences" (none: no accept/reject) keeps arviz.from_pyro working.
        return {
            "divergences": [],
            "num_steps": self._driver.t,
            "num_halvings": self._driver.num_halvings,
        }
