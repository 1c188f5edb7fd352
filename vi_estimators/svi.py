"""``CapturedSVI``: SVI steps as two captured graphs, the objective's and the optimizer's.

``pyro.infer.SVI(model, guide, optim, loss=obj)`` works unchanged with ``obj`` built with
``capture=True``: each ``svi.step`` runs the objective's captured graph
(:mod:`vi_estimators.capture`), then Pyro's per-parameter optimizers. What remains per step is
Pyro's own Python: a param-capturing trace, one ``torch.optim`` optimizer per parameter tensor,
the zeroing of gradients. :class:`CapturedSVI` takes the same arguments and drops that work:

* one ``torch.optim`` optimizer over all parameters, built from the ``PyroOptim``'s constructor
  and arguments with ``fused=True`` (torch's fused kernels: one call updates every parameter and
  keeps the step count in a tensor, so the update reads no Python state);
* the update -- gradients in, parameters and optimizer state updated in place -- traced once
  with ``make_fx`` and run as an FX graph (a few operations; keyed by the parameters and the
  optimizer's hyperparameters, so an ``lr`` schedule rebuilds it), checked against the eager
  update once, bit for bit;
* gradients go from the objective's graph straight to the update graph (no ``.grad``);
* :meth:`CapturedSVI.run` runs many steps and reads the losses back once (checking them for
  NaN/inf every ``check_every`` steps, naming the first bad step).

The step is then the objective's graph plus the update graph: ``SVI.step``'s math, exactly --
with the same objective and a fused torch optimizer, the parameters after n steps are those of
an eager loop ``loss_and_grads`` + ``optimizer.step()`` + zero gradients from the same seed
(bitwise; against ``pyro.infer.SVI`` with ``pyro.optim.Adam``, whose per-parameter optimizers
are not fused, to float rounding). Steps whose objective cannot be captured, and the set-up
steps (the first step of a new guide creates parameters and optimizer state), run eagerly
through the same optimizer. Optimizers without a fused implementation (``pyro.optim.ClippedAdam``,
per-parameter ``optim_args`` callables, ``clip_args``) are run eagerly exactly as
``pyro.infer.SVI`` runs them (one log line): their step reads Python numbers (a step counter)
that a graph would freeze.
"""

from __future__ import annotations

import inspect
import logging

import torch
from pyro import poutine
from pyro.infer.util import zero_grads
from pyro.optim import PyroOptim
from torch.fx.experimental.proxy_tensor import make_fx

from .capture import simplify_graph
from .program import Objective

__all__ = ["CapturedSVI"]

logger = logging.getLogger(__name__)


class _Update:
    """A captured optimizer update over a fixed list of parameters."""

    def __init__(self, run, params, states):
        self.run, self.params, self.states = run, params, states


def _state_tensors(optimizer: torch.optim.Optimizer, params) -> list[torch.Tensor] | None:
    out = []
    for p in params:
        st = optimizer.state.get(p)
        if not st:
            return None
        vals = list(st.values())
        if not all(isinstance(v, torch.Tensor) for v in vals):
            return None
        out.extend(vals)
    return out


class CapturedSVI:
    """Stochastic variational inference with the step captured: ``pyro.infer.SVI``'s arguments,
    ``step``, ``evaluate_loss``, plus :meth:`run` for many steps (see the module docstring).

    Args:
        model, guide: as for ``pyro.infer.SVI``.
        optim: a ``pyro.optim.PyroOptim`` (e.g. ``pyro.optim.Adam({"lr": 0.01})``); its torch
            optimizer class and arguments build one fused optimizer over all parameters
            (:attr:`optimizer`).
        loss: a :class:`~vi_estimators.program.Objective` built with ``capture=True`` (or a
            backend name).
        check_every: :meth:`run` checks the losses for NaN/inf every this many steps.
    """

    def __init__(self, model, guide, optim: PyroOptim, loss: Objective, check_every: int = 100):
        if not isinstance(loss, Objective):
            raise TypeError(f"CapturedSVI: loss must be a vi_estimators objective, got "
                            f"{type(loss).__name__}")
        if loss.captured is None:
            raise ValueError("CapturedSVI: build the objective with capture=True (or a backend "
                             f"name), e.g. {type(loss).__name__}(..., capture=True)")
        if not isinstance(optim, PyroOptim):
            raise TypeError(f"CapturedSVI: optim must be a pyro.optim.PyroOptim (e.g. "
                            f"pyro.optim.Adam({{'lr': 0.01}})), got {type(optim).__name__}")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"CapturedSVI: check_every must be a positive integer, got "
                             f"{check_every!r}")
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss
        self.check_every = check_every
        #: the fused torch optimizer over all parameters (``None`` before the first step, or
        #: when ``optim`` has no fused form and runs eagerly as in ``pyro.infer.SVI``)
        self.optimizer: torch.optim.Optimizer | None = None
        self._eager_reason = self._why_not_fused(optim)
        if self._eager_reason:
            logger.warning("CapturedSVI: the optimizer update runs eagerly: %s",
                           self._eager_reason)
        self._updates: dict[tuple, _Update | str] = {}

    # -- public --------------------------------------------------------------------------
    def step(self, *args, **kwargs) -> float:
        """One step; returns the loss (one host sync), like ``pyro.infer.SVI.step``."""
        values = self._step(args, kwargs)
        if isinstance(values, float):
            return values
        surrogate, estimate = values.tolist()
        return self.loss.captured.finish(surrogate, -estimate)

    def run(self, num_steps: int, *args, **kwargs) -> torch.Tensor:
        """``num_steps`` steps; returns their losses as a CPU tensor (read back every
        ``check_every`` steps, when they are also checked for NaN/inf)."""
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"CapturedSVI.run: num_steps must be an integer >= 0, got "
                             f"{num_steps!r}")
        losses, pending, first = [], [], 0
        for i in range(num_steps):
            values = self._step(args, kwargs)
            if isinstance(values, float):
                values = torch.tensor([-values, -values], dtype=torch.float64)
            pending.append(values)
            if len(pending) == self.check_every or i == num_steps - 1:
                block = torch.stack([v.detach().double().cpu() for v in pending])
                bad = (~torch.isfinite(block[:, 0])).nonzero()
                if len(bad):
                    raise ValueError(
                        f"CapturedSVI.run: non-finite objective value at step {first + int(bad[0])}"
                        " (counting from 0 in this call); the parameters are unusable from "
                        "there on")
                losses.append(-block[:, 1])
                first += len(pending)
                pending = []
        return torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)

    def evaluate_loss(self, *args, **kwargs) -> float:
        """The loss without a step (``loss.loss``, captured too), like ``SVI.evaluate_loss``."""
        with torch.no_grad():
            return self.loss.loss(self.model, self.guide, *args, **kwargs)

    # -- the step ------------------------------------------------------------------------
    def _step(self, args, kwargs):
        got = self.loss.captured.gradients(self.model, self.guide, args, kwargs)
        if got is None:
            return self._eager_step(args, kwargs)
        values, params, grads = got
        self._apply(params, grads)
        return values

    def _eager_step(self, args, kwargs) -> float:
        with poutine.trace(param_only=True) as ptr:
            loss = self.loss.loss_and_grads(self.model, self.guide, *args, **kwargs)
        params = list({id(t): t for t in (s["value"].unconstrained()
                                          for s in ptr.trace.nodes.values())}.values())
        optimizer = self._optimizer(params)
        if optimizer is None:
            self.optim(params)
            zero_grads(params)
        else:
            optimizer.step()
            for p in params:
                p.grad = None
        return loss

    def _apply(self, params, grads) -> None:
        optimizer = self._optimizer(params)
        if optimizer is not None:
            update = self._update(optimizer, params, grads)
            if update is not None:
                states = _state_tensors(optimizer, params)
                if states is not None and len(states) == len(update.states) and \
                        all(a is b for a, b in zip(states, update.states)):
                    with torch.no_grad():
                        update.run(*params, *grads, *states)
                    return
                self._updates.clear()  # the optimizer's state was replaced: rebuild
        for p, g in zip(params, grads):
            p.grad = g
        if optimizer is None:
            self.optim(params)
        else:
            optimizer.step()
        for p in params:
            p.grad = None

    # -- the optimizer -------------------------------------------------------------------
    @staticmethod
    def _why_not_fused(optim: PyroOptim) -> str:
        ctor = optim.pt_optim_constructor
        if callable(optim.pt_optim_args):
            return "per-parameter optim_args (a callable) need one optimizer per parameter"
        if optim.pt_clip_args:
            return "clip_args: Pyro clips each parameter's gradient before its own optimizer"
        if not (isinstance(ctor, type) and issubclass(ctor, torch.optim.Optimizer)):
            return f"{getattr(ctor, '__name__', ctor)} is not a torch.optim.Optimizer class"
        if "fused" not in inspect.signature(ctor).parameters:
            return f"{ctor.__name__} has no fused implementation (its step reads a Python " \
                   "step counter)"
        return ""

    def _optimizer(self, params) -> torch.optim.Optimizer | None:
        if self._eager_reason:
            return None
        if self.optimizer is None:
            kw = dict(self.optim.pt_optim_args)
            try:
                self.optimizer = self.optim.pt_optim_constructor(params, **kw, fused=True)
            except (RuntimeError, ValueError, TypeError) as e:
                self._eager_reason = f"the fused optimizer is not available here ({e})"
                logger.warning("CapturedSVI: the optimizer update runs eagerly: %s",
                               self._eager_reason)
                return None
            return self.optimizer
        known = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        new = [p for p in params if id(p) not in known]
        if new:
            self.optimizer.add_param_group({"params": new})
        return self.optimizer

    def _hyper(self, optimizer) -> tuple:
        return tuple(tuple((k, v) for k, v in g.items() if k != "params" and
                           isinstance(v, (int, float, bool, str, tuple, type(None))))
                     for g in optimizer.param_groups)

    def _update(self, optimizer, params, grads) -> _Update | None:
        key = (tuple(map(id, params)), self._hyper(optimizer))
        update = self._updates.get(key)
        if isinstance(update, str):
            return None
        if update is not None:
            return update
        states = _state_tensors(optimizer, params)
        if states is None:  # first update of these parameters: eager (creates the state)
            return None
        try:
            update = self._capture_update(optimizer, params, grads, states)
        except Exception as e:  # noqa: BLE001 (cannot capture: the update runs eagerly)
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            self._updates[key] = reason
            logger.warning("CapturedSVI: the optimizer update runs eagerly: %s", reason)
            return None
        self._updates[key] = update
        return update

    def _capture_update(self, optimizer, params, grads, states) -> _Update:
        everything = [p for g in optimizer.param_groups for p in g["params"]]
        held = {id(p): p.grad for p in everything}
        for p in everything:
            p.grad = None
        tensors = list(params) + list(states)
        start = [t.detach().clone() for t in tensors]

        def reset():
            with torch.no_grad():
                for t, s in zip(tensors, start):
                    t.copy_(s)

        def update(*flat):
            n = len(params)
            for p, g in zip(params, flat[n:2 * n]):
                p.grad = g
            optimizer.step()
            for p in params:
                p.grad = None
            return ()

        try:
            example = [g.detach().clone() for g in grads]
            gm = make_fx(update)(*params, *example, *states)
            reset()
            if any(v.requires_grad for _, v in gm.named_buffers()):
                raise RuntimeError("the update reads a trainable tensor that is not an input")
            gm = simplify_graph(gm)
            # the eager update from the same start, to check the graph against
            update(*params, *grads, *states)
            want = [t.detach().clone() for t in tensors]
            reset()
            with torch.no_grad():
                gm(*params, *grads, *states)
            same = all(torch.equal(t, w) for t, w in zip(tensors, want))
            reset()  # the caller applies this step's update
            if not same:
                raise RuntimeError("the captured update differs from the eager one")
        finally:
            for p in everything:
                p.grad = held[id(p)]
        return _Update(gm, list(params), list(states))
