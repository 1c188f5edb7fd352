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
  state is NaN/inf (names the iteration, chains and model sites);
* optionally ``block_key(t) -> hashable``: declares that ``step`` can be captured as a graph
  (:mod:`mcmc.capture`) and says what Python-level choice step ``t`` depends on (``None`` if
  none; e.g. the shard a federated step runs on). Only such algorithms get block steps.

:class:`ChainDriver` runs it: the step size ``h_t`` comes from a schedule
(:mod:`mcmc.schedules`); every step checks the new state's tensors for NaN/inf and either raises
(``on_nonfinite="raise"``) or, with ``"halve"``, rejects the bad chains' proposals, halves their
step-size multiplier for the rest of the run and redraws them (at most ``max_halvings`` times per
step). :meth:`ChainDriver.run` keeps every ``thinning``-th state after ``warmup_steps`` steps;
``num_samples = 0`` runs the warm-up only and returns ``(C, 0, D)`` draws.
:meth:`ChainDriver.state_dict` holds the state, step counter, multipliers and the generator's
state, so a resumed run is bit-identical to an uninterrupted one.

Block steps
-----------
With ``block_size=k`` and capture on, :meth:`ChainDriver.run` runs ``k`` steps per call of one
captured graph: the randomness of the ``k`` steps is drawn first, from the sampler's generator
in the order single steps draw it (``draw(state, generator, t)`` for ``t = t0, ..., t0 + k -
1``), then the ``k`` updates run unrolled in one graph (each distinct step recorded once with
:func:`mcmc.capture.trace_graph`, the copies joined by :func:`mcmc.capture.unroll`; the step
sizes of a non-constant schedule are graph inputs), which also returns every step's position
and a per-chain checksum that is non-finite whenever a state entry is. If any chain became
NaN/inf inside the block, the block is discarded, the generator rewound to its start and the
``k`` steps replayed one by one -- so NaN checks, step halving and their errors happen at the
exact step, and block and single-step runs give the same draws for the same seed,
bit-identical (TorchScript runs blocks with its optimising executor off: it would regroup a
block's arithmetic, 1-4 ulp; see :func:`mcmc.capture.compile_steps`). Checkpoints fall between
blocks and
stay exact. Runs with a ``callback`` use single steps, and so do steps whose ``block_key``
changes within the next ``k`` steps (a block never spans two keys, e.g. two federated rounds).

``block_size="auto"`` (the samplers' default) is for runs of at least
:data:`AUTO_BLOCK_MIN_STEPS` steps with at most :data:`AUTO_BLOCK_MAX_ELEMENTS` state entries
``C * D``: blocks of :data:`AUTO_BLOCK_SIZE` steps whose captured *step* graph is called from a
short Python loop (capturing costs about as much as one step graph), or, in runs of at least
:data:`AUTO_UNROLL_MIN_STEPS` steps, unrolled into one graph (compiling it takes up to about a
second; it runs faster). Blocks are kept only if timing shows they beat single steps (per-step
Python overhead dominates small steps; a step that is mostly tensor work gains nothing). Timing
decides only the speed: the draws are the same either way.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from tqdm.auto import tqdm

from .capture import CaptureError, compile_steps, trace_graph
from .potential import Potential, capture_option
from .schedules import ConstantSchedule, as_schedule

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
#: steps per captured block with ``block_size="auto"``
AUTO_BLOCK_SIZE = 16
#: ``block_size="auto"`` uses blocks only when the state has at most this many entries ``C * D``
AUTO_BLOCK_MAX_ELEMENTS = 1 << 14
#: a driver that needs more distinct block graphs than this turns block steps off
MAX_BLOCK_GRAPHS = 8
#: ``block_size="auto"``: single steps timed before trying blocks, blocks timed to judge them
AUTO_PROBE_STEPS = 10
AUTO_PROBE_BLOCKS = 3
#: ``block_size="auto"`` tries blocks in runs of at least this many steps, and unrolls them into
#: one graph (dearer to compile, faster) in runs of at least ``AUTO_UNROLL_MIN_STEPS``
AUTO_BLOCK_MIN_STEPS = 1000
AUTO_UNROLL_MIN_STEPS = 10000

logger = logging.getLogger(__name__)


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


def _all_finite(state: NamedTuple) -> bool:
    """Whether every floating-point entry of the state is finite, with one reduction per field
    (the per-step check's fast path: a sum is finite only if all its terms are; a sum of finite
    entries that overflows reads as False, and the caller then checks row by row)."""
    total = None
    for v in state:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            s = v.sum()
            total = s if total is None else total + s
    return total is None or bool(torch.isfinite(total))


def _finite_rows(state: NamedTuple) -> torch.Tensor:
    """``(C,)`` True where every tensor field of the state is finite for that chain."""
    ok = None
    for v in state:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            f = torch.isfinite(v.reshape(v.shape[0], -1)).all(-1) if v.dim() else \
                torch.isfinite(v).expand(1)
            ok = f if ok is None else ok & f
    return ok


def _flatten(obj, leaves: list) -> tuple:
    """Tensors of a step's inputs (appended to ``leaves``) and a hashable description of the
    rest (numbers are part of it: they are baked into a captured graph). Plain Python: this
    runs for every step of a block, where ``torch.utils._pytree`` costs more than the step."""
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return ("T", tuple(obj.shape), obj.dtype, obj.device)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return ("C", obj)
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
        return ("N", type(obj), tuple(_flatten(v, leaves) for v in obj))
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(_flatten(v, leaves) for v in obj))
    if isinstance(obj, dict):
        keys = tuple(obj)
        return ("D", keys, tuple(_flatten(obj[k], leaves) for k in keys))
    raise CaptureError(f"block steps cannot pass a {type(obj).__name__} between steps")


def _leaves(obj, out: list) -> None:
    """Append the tensors of ``obj`` to ``out`` in :func:`_flatten`'s order."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _leaves(v, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _leaves(v, out)


def _unflatten(spec: tuple, leaves) -> object:
    """Inverse of :func:`_flatten` (``leaves``: an iterator over the tensors)."""
    kind = spec[0]
    if kind == "T":
        return next(leaves)
    if kind == "C":
        return spec[1]
    if kind == "N":
        return spec[1](*(_unflatten(c, leaves) for c in spec[2]))
    if kind == "D":
        return {k: _unflatten(c, leaves) for k, c in zip(spec[1], spec[2])}
    return kind(_unflatten(c, leaves) for c in spec[1])


def _checksum(state: NamedTuple, position: torch.Tensor) -> torch.Tensor:
    """``(C,)`` sum of every floating-point entry of each chain's state: non-finite whenever an
    entry is (a cheaper test than :func:`_finite_rows` inside a block; a finite overflow to inf
    only makes the driver replay the block step by step)."""
    total = None
    for v in state:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            part = v.reshape(v.shape[0], -1).sum(-1) if v.dim() > 1 else v
            total = part if total is None else total + part
    return position.new_zeros(position.shape[0]) if total is None else total


def _block_size_option(block_size, owner: str) -> int | str:
    if block_size == "auto":
        return "auto"
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{owner}(..., block_size={block_size!r}): block_size must be an int >= 1 "
                         "or 'auto'")
    return block_size


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
        block_size: steps per captured call in :meth:`run` (an int ``k >= 1``, or ``"auto"``;
            see the module docstring). Needs an algorithm with ``block_key``.
        capture: the capture backend of the block graphs (``"auto"``, ``"script"``, ``"fx"``,
            ``"inductor"``) or ``"off"`` (single steps only).

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
        block_size: int | str = 1,
        capture: str | bool = "auto",
    ) -> None:
        if on_nonfinite not in ("raise", "halve"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'halve', got {on_nonfinite!r}")
        self.block_size = _block_size_option(block_size, "ChainDriver")
        self.capture = capture_option(capture, "ChainDriver")
        self._blocks: dict = {}  # block key -> CapturedGraph; ("step", key) -> step graph
        self._block_failure: str | None = None
        self._auto: bool | None = None  # block_size="auto": None until timed
        self._single_times: list[float] = []
        self._block_times: list[float] = []
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
            if _all_finite(new):
                break
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
        after every step (and turns block steps off)."""
        check_run_lengths(num_samples, warmup_steps, thinning, "run")
        pos = self.algorithm.positions(self.state)
        draws = pos.new_empty((pos.shape[0], num_samples, pos.shape[1]))
        total = warmup_steps + num_samples * thinning
        k = 1 if callback is not None else self.block_length(total)
        # "auto": unrolled blocks (faster, dearer to compile) only in long runs
        unrolled = self.block_size != "auto" or total >= AUTO_UNROLL_MIN_STEPS
        i = 0
        with progress_bar(total, progress=progress, desc=self.name) as bar:
            while i < total:
                n = 1
                if (k > 1 and total - i >= k and self._block_failure is None
                        and self._auto is not False and self._uniform_keys(k)):
                    if self.block_size == "auto" and self._auto is None \
                            and len(self._single_times) < AUTO_PROBE_STEPS:
                        n = 0  # "auto": time single steps first (below)
                    else:
                        start = time.perf_counter()
                        block = self._block(k, unrolled)
                        if block is not None:
                            self._judge_blocks(k, time.perf_counter() - start)
                            steps = [s for s in range(i, i + k) if s >= warmup_steps
                                     and (s - warmup_steps + 1) % thinning == 0]
                            if steps:
                                slots = [(s - warmup_steps + 1) // thinning - 1 for s in steps]
                                draws[:, slots] = block[[s - i for s in steps]].transpose(0, 1)
                            i += k
                            bar.update(k)
                            continue
                        n = k  # the block was not run: its steps one by one
                for _ in range(max(n, 1)):
                    start = time.perf_counter()
                    state = self.step()
                    if n == 0:
                        self._single_times.append(time.perf_counter() - start)
                    j = i - warmup_steps + 1
                    if j > 0 and j % thinning == 0:
                        draws[:, j // thinning - 1] = self.algorithm.positions(state)
                    if callback is not None:
                        callback(self.t, state)
                    i += 1
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

    # ------------------------------------------------------------------ block steps
    def block_length(self, total_steps: int) -> int:
        """Steps per captured block for a run of ``total_steps`` (1: single steps)."""
        if (self.capture == "off" or self.state is None or self._block_failure is not None
                or not hasattr(self.algorithm, "block_key")):
            return 1
        if self.block_size != "auto":
            return self.block_size
        pos = self.algorithm.positions(self.state)
        if self._auto is False or pos.numel() > AUTO_BLOCK_MAX_ELEMENTS:
            return 1
        if self._auto is None and total_steps < AUTO_BLOCK_MIN_STEPS:
            return 1
        return AUTO_BLOCK_SIZE

    def _judge_blocks(self, k: int, seconds: float) -> None:
        """``block_size="auto"``: keep blocks only if they beat single steps (timed: the draws
        are the same either way). The first block (its capture) is not counted."""
        if self.block_size != "auto" or self._auto is not None:
            return
        self._block_times.append(seconds / k)
        if len(self._block_times) <= AUTO_PROBE_BLOCKS:
            return
        single = sorted(self._single_times[2:])[len(self._single_times[2:]) // 2]
        block = sorted(self._block_times[1:])[len(self._block_times[1:]) // 2]
        self._auto = block < 0.9 * single
        logger.debug(f"{self.name}: block_size='auto': {k} steps per block take "
                     f"{1e3 * block:.3g} ms/step vs {1e3 * single:.3g} ms/step single: "
                     f"{'block steps' if self._auto else 'single steps'}")

    def _uniform_keys(self, k: int) -> bool:
        """Whether the next ``k`` steps share one ``block_key`` (a block spans one kind of step
        only, e.g. one shard's round: single steps run up to the next change)."""
        key = self.algorithm.block_key(self.t)
        return all(self.algorithm.block_key(self.t + j) == key for j in range(1, k))

    @property
    def capture_info(self) -> dict:
        """Block steps so far: ``{"block_graphs": number captured, "backend": what runs them
        (None before the first), "off": why block steps were turned off (or None), "auto":
        the timing decision of ``block_size="auto"`` (None while undecided)}``."""
        graphs = [g for key, g in self._blocks.items() if key[0] != "step"]
        return {"block_graphs": len(graphs), "backend": graphs[-1].backend if graphs else None,
                "off": self._block_failure, "auto": self._auto}

    def clear_captures(self) -> None:
        """Forget the captured blocks (their graphs hold the sampler's constants: call this
        when the sampler's potential or constants change)."""
        self._blocks.clear()
        self._block_failure = None
        self._auto = None
        self._single_times.clear()
        self._block_times.clear()

    def _block(self, k: int, unrolled: bool = True) -> torch.Tensor | None:
        """Run ``k`` steps as one captured graph; returns their positions ``(k, C, D)``, or
        ``None`` (generator rewound, nothing changed) when the block cannot be captured or a
        chain became non-finite in it."""
        algo, state, t0 = self.algorithm, self.state, self.t
        gen_state = self.generator.get_state()
        hs = [self.step_size_at(t0 + j) for j in range(k)]
        rand = [algo.draw(state, self.generator, t0 + j) for j in range(k)]
        pos = algo.positions(state)
        if self.on_nonfinite == "halve":
            sizes = [h * self.multiplier for h in hs]
        elif isinstance(self.schedule, ConstantSchedule):
            sizes = hs  # constant: part of the graph
        else:  # a schedule: graph inputs (float64 scalars round exactly as Python floats)
            sizes = [torch.tensor(h, dtype=torch.float64, device=pos.device) for h in hs]
        inputs: list = []
        state_spec = _flatten(state, inputs)
        num_carry = len(inputs)
        spec = _flatten((sizes[0], rand[0]), inputs)
        shapes = [v.shape for v in inputs[num_carry:]]
        for j in range(1, k):  # the steps draw alike: check shapes only (cheap)
            start = len(inputs)
            _leaves((sizes[j], rand[j]), inputs)
            if [v.shape for v in inputs[start:]] != shapes:
                self._block_failure = "the steps' randomness differs in structure"
                self.generator.set_state(gen_state)
                return None
        steps = [((algo.block_key(t0 + j), state_spec, spec), t0 + j) for j in range(k)]
        block_key = (k, unrolled) + tuple(step[0][0] for step in steps) + (state_spec, spec)
        graph = self._blocks.get(block_key)
        if graph is None:
            try:
                one = [self._step_graph(key, t) for key, t in steps]
                graph = compile_steps(one, num_carry, inputs, self.capture, unrolled=unrolled)
            except CaptureError as e:
                self._block_failure = e.reason
                logger.info(f"{self.name}: block steps are off (capture is not possible: "
                            f"{e.reason}); running single steps")
                self.generator.set_state(gen_state)
                return None
            logger.debug(f"{self.name}: {k} steps captured as one graph ({graph.backend})")
            self._blocks[block_key] = graph
            if sum(1 for key in self._blocks if key[0] != "step") > MAX_BLOCK_GRAPHS:
                self._block_failure = f"more than {MAX_BLOCK_GRAPHS} distinct blocks"
                logger.info(f"{self.name}: block steps are off ({self._block_failure}); running "
                            "single steps")
        out = graph(*inputs)
        if not bool(torch.isfinite(out[-1]).all()):
            self.generator.set_state(gen_state)
            return None
        self.state = _unflatten(state_spec, iter(out[:num_carry]))
        self.t = t0 + k
        return out[-2]

    def _step_graph(self, key, t: int):
        """The FX graph of one step ``(state..., size..., randomness...) -> (state'...,
        position, checksum)``, traced once per step ``key`` (the algorithm's ``block_key``
        and the structure of the step's inputs)."""
        gm = self._blocks.get(("step",) + key)
        if gm is not None:
            return gm
        algo = self.algorithm
        _, state_spec, spec = key
        examples: list = []
        _unflatten_examples(state_spec, examples)
        num_carry = len(examples)
        _unflatten_examples(spec, examples)

        def one(*inputs):
            state = _unflatten(state_spec, iter(inputs[:num_carry]))
            size, randomness = _unflatten(spec, iter(inputs[num_carry:]))
            new = algo.step(state, size, randomness, t)
            flat: list = []
            if _flatten(new, flat) != state_spec:
                raise CaptureError("a step changes the structure of the sampler's state")
            position = algo.positions(new)
            return (*flat, position, _checksum(new, position))

        # the drawn row indices (the integer tensors among the randomness) are valid rows
        gather = [i for i, v in enumerate(examples)
                  if i >= num_carry and not v.is_floating_point()]
        gm, _ = trace_graph(one, examples, gather_inputs=gather)
        self._blocks[("step",) + key] = gm
        return gm


def _unflatten_examples(spec: tuple, out: list) -> None:
    """Append an example tensor (zeros) for every tensor leaf of a :func:`_flatten` spec."""
    kind = spec[0]
    if kind == "T":
        out.append(torch.zeros(spec[1], dtype=spec[2], device=spec[3]))
    elif kind == "N" or kind == "D":
        for c in spec[2]:
            _unflatten_examples(c, out)
    elif kind != "C":
        for c in spec[1]:
            _unflatten_examples(c, out)


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
        capture: ``"auto"`` (default): the potential, and blocks of steps, run as captured
            graphs where possible (eager with one log line otherwise); ``"script"``, ``"fx"``,
            ``"inductor"`` (a backend, :mod:`mcmc.capture`) or ``"off"``.
        block_size: steps per captured call in :meth:`sample_chains` (``"auto"`` or an int;
            see :mod:`mcmc.chains`); the draws do not depend on it.

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
        capture: str | bool = "auto",
        block_size: int | str = "auto",
    ) -> None:
        name = type(self).__name__
        self.capture = capture_option(capture, name)
        self.block_size = _block_size_option(block_size, name)
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
                vectorize=self.vectorize, owner=type(self).__name__, capture=self.capture,
                **self._potential_options(),
            )
            self._model_key = key
            self._on_new_potential()
            if self._driver is not None:
                self._driver.clear_captures()  # block graphs hold the old potential's data
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
                           name=type(self).__name__, block_size=self.block_size,
                           capture=self.capture)

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

    def _mode_start(self, pot) -> torch.Tensor:
        """Where a mode search starts: one point of ``init_strategy``, drawn under ``seed`` (when
        given) without touching the global RNG streams."""
        if self.seed is None:
            return pot.initial_params(1, init_strategy=self.init_strategy)
        devices = [pot.device.index or 0] if pot.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return pot.initial_params(1, init_strategy=self.init_strategy)

    def draw(self, state, generator: torch.Generator, t: int) -> StepRandomness:
        z = state.z
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return StepRandomness(noise, self._draw_indices(z.shape[0], generator))

    @staticmethod
    def positions(state) -> torch.Tensor:
        return state.z

    def block_key(self, t: int) -> None:
        """Steps do not depend on ``t`` beyond their inputs: any ``k`` of them can run as one
        captured block (:class:`ChainDriver`)."""
        return

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
