"""Captured objectives: trace an objective's step once, then run it as a flat graph.

``Objective(..., capture=True)`` (every shipped objective and every ``@objective`` program) runs
``loss_and_grads``, ``loss`` and ``differentiable_loss`` through this module. In the spirit of
Pyro's ``JitTrace_ELBO``, the Pyro/poutine Python of a step runs once per *cache key*, under
:func:`torch.fx.experimental.proxy_tensor.make_fx`, which records only the aten operations it
executes (the program's forward pass *and* the backward pass of ``torch.autograd.grad``); later
steps with the same key execute that flat graph.

How a step is captured
----------------------
* **Key**: the model and guide (by identity), the shapes/dtypes/devices of the tensors in
  ``args``/``kwargs`` (any nesting), the values of their other leaves (numbers, strings; other
  objects, e.g. an ``nn.Module`` argument, by identity) and the kind of call. A Python number
  that changes every step therefore makes a new key every step: pass it as a tensor. At most
  :data:`MAX_GRAPHS` keys per objective are captured; later ones run eagerly (logged).
* **Graph inputs**: the parameters the step reads (its ``pyro.param`` sites, which include
  ``pyro.module`` / ``PyroModule`` parameters: the unconstrained tensors of the param store),
  the tensors carried from step to step by the objects the step uses (:mod:`vi_estimators.state`:
  moving-average baselines, previous-step CV coefficients, CUBO's running constant), and the
  tensors of ``args``/``kwargs``. ``make_fx`` in its "real" mode runs the program on these very
  tensor objects, so no Pyro code needs to know it is being traced: every use of one of them is
  a use of a graph input.
* **Graph outputs**: the surrogate and the estimate, the gradient of minus the surrogate for
  every parameter it reaches (``loss_and_grads``/``differentiable_loss``), and the new carried
  state (written back after each call).
* **Randomness**: random draws are aten operations of the graph (``normal_``, ``randperm``, ...),
  which read torch's global generator when the graph runs, exactly as the eager step does. The
  tracing runs happen under :func:`torch.random.fork_rng` with the generator reset to its state
  before the step, so they do not perturb the stream: for the same seed a captured objective
  draws the same numbers, and gives the same losses, gradients and parameters, as the eager
  one (bit for bit with the ``"script"`` and ``"fx"`` backends; to float rounding with
  ``"inductor"``, which fuses operations). Dead code is removed from the graph, random
  operations excepted (an unused draw still advances the generator, as in eager).
* **Set-up**: the first call with a new key runs the step *eagerly* (this is the call's
  result, with Pyro's validation as configured), recording the parameters and carried state it
  used. If that step created parameters or changed the layout of carried state (the first step
  of a guide or of a moving average), the next call sets up again. Otherwise the step is traced
  (with validation off: the eager step checked the model and guide), compiled and run once
  from the same generator state and carried state as the eager step; the graph is kept only if
  it reproduces the eager step's value, gradients and new state (three runs for ``"script"``,
  whose executor optimises a graph after profiling it). The parameters are re-checked by
  identity at every call (``pyro.clear_param_store()`` or a re-created module sets up again).

Fallbacks (one log line each, on logger ``vi_estimators.capture``; the step runs eagerly,
always correctly): Python control flow on a tensor value or ``.item()`` (e.g. data-dependent
loops), operations whose output shape depends on values (boolean masks, ``nonzero``,
``unique``), trainable tensors that are not in the param store (an ``nn.Module`` not registered
with ``pyro.module``), tensor arguments that require grad, estimators or baselines keeping Python
state that is not declared through :mod:`vi_estimators.state`, parameters or state created at
every step, or a graph that disagrees with the eager step. Limits that cannot be detected
(as for ``JitTrace_ELBO``): the graph replays the Python decisions of the traced step, so a
program whose structure changes from step to step *without* a tensor-value branch (e.g. on a
global counter), or Python state other than the above, must not be captured.

Backends (``capture=``): ``True``/``"script"`` (default) -- the graph run by TorchScript
(``torch.jit.trace`` of the captured aten graph; set-up well under a second for the zoo's
models); ``"fx"`` -- the graph's generated Python (portable; used when TorchScript is missing
or fails); ``"inductor"`` -- ``torch.compile`` of the graph (fused C++ kernels, the fastest
per step on CPU, but tens of seconds of compilation per key: for long runs).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import traceback
import warnings
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import am_i_wrapped
from pyro.util import warn_if_nan
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .state import CarriesState, tracing, watching

__all__ = [
    "BACKENDS",
    "MAX_GRAPHS",
    "CaptureError",
    "Graph",
    "ObjectiveCapture",
    "check_capture",
    "simplify_graph",
]

logger = logging.getLogger(__name__)

#: Accepted values of ``capture=`` besides ``False`` (``True`` means ``"script"``).
BACKENDS = ("script", "fx", "inductor")

#: Captured keys kept per objective; a further key runs eagerly.
MAX_GRAPHS = 8

#: Set-up attempts for one key whose step keeps creating parameters or state.
MAX_SETUPS = 3


class CaptureError(RuntimeError):
    """Capture is impossible for this step; the message says why (it is logged)."""


def check_capture(capture) -> str | None:
    """Normalise an objective's ``capture=`` option: ``None`` (off) or a backend name."""
    if capture is False or capture is None:
        return None
    if capture is True:
        return "script"
    if isinstance(capture, str) and capture in BACKENDS:
        return capture
    raise ValueError(f"capture must be True, False or one of {BACKENDS}, got {capture!r}")


# ---------------------------------------------------------------------------------------------
# Arguments: tensors become graph inputs, the rest goes into the key
# ---------------------------------------------------------------------------------------------

_CONTAINERS = (list, tuple, dict)
_VALUES = (int, float, complex, str, bool, type(None), torch.dtype, torch.device)


def _leaf_key(x) -> tuple:
    if isinstance(x, _VALUES):
        return (type(x).__name__, x)
    return ("id", id(x))


def _flatten_args(args: tuple, kwargs: dict):
    """``(tensors, key)``: the tensor leaves of ``(args, kwargs)`` and a hashable key of
    everything else (tensor metadata, aliasing between tensor leaves, other leaves)."""
    if all(not isinstance(a, _CONTAINERS) for a in args) and \
            all(not isinstance(v, _CONTAINERS) for v in kwargs.values()):
        leaves, spec = list(args) + list(kwargs.values()), (len(args), tuple(kwargs))
    else:
        leaves, tspec = tree_flatten((args, kwargs))
        spec = ("tree", str(tspec))
    tensors, key, seen = [], [spec], {}
    for x in leaves:
        if isinstance(x, torch.Tensor):
            alias = seen.setdefault(id(x), len(tensors))
            key.append((tuple(x.shape), x.dtype, x.device, x.requires_grad, alias))
            tensors.append(x)
        else:
            key.append(_leaf_key(x))
    return tensors, tuple(key)


def _devices(tensors) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


class _Rng:
    """The global generators' states (CPU and the given CUDA devices)."""

    def __init__(self, devices: list[int]):
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(s, d)

    def __eq__(self, other) -> bool:
        return torch.equal(self.cpu, other.cpu) and \
            all(torch.equal(a, b) for a, b in zip(self.cuda, other.cuda))


# ---------------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------------


class _DataDependenceGuard(TorchDispatchMode):
    """Refuses operations whose output *shape* depends on tensor values: a graph would replay
    the traced shape. (Reading a value, ``.item()``/``bool()``, is refused by make_fx itself.)"""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.dynamic_output_shape in func.tags:
            if func is torch.ops.aten.index.Tensor:
                idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                       for i in idx):
                    raise CaptureError(
                        f"indexing with a boolean mask (output shape depends on values){_where()}")
            else:
                raise CaptureError(f"{func} has a value-dependent output shape{_where()}")
        return func(*args, **kwargs)


_INTERNAL = ("/torch/", "/pyro/", "/vi_estimators/capture.py", "/vi_estimators/state.py")


def _where(tb=None) -> str:
    """`` at file:line`` of the innermost frame outside torch, Pyro and this module."""
    frames = traceback.extract_tb(tb) if tb is not None else traceback.extract_stack()
    for fr in reversed(frames):
        if not any(s in fr.filename.replace("\\", "/") for s in _INTERNAL):
            return f" (at {fr.filename}:{fr.lineno})"
    return ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CaptureError):
        return str(exc)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "_local_scalar_dense" in msg or "data-dependent" in msg:
        return ("Python control flow on a tensor value or .item() (the graph would replay one "
                f"branch){_where(exc.__traceback__)}")
    return f"tracing failed: {type(exc).__name__}: {msg[:300]}{_where(exc.__traceback__)}"


def _is_impure(node) -> bool:
    target = node.target
    if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and \
            torch.Tag.nondeterministic_seeded in target.tags:
        return True  # an unused draw still advances the generator
    return node.is_impure()


_aten = torch.ops.aten


def _val(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _same_layout(a, b) -> bool:
    va, vb = _val(a), _val(b)
    return va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype


def _is_view(node) -> bool:
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and \
        bool(target._schema.returns) and target._schema.returns[0].alias_info is not None


def _never_written(node) -> bool:
    """No in-place op writes ``node``'s value or a view of it, and it is not a graph output
    (so it may alias another tensor)."""
    for user in node.users:
        if user.op != "call_function" or not isinstance(user.target, torch._ops.OpOverload):
            return False
        if user.target._schema.is_mutable:
            return False
        if _is_view(user) and not _never_written(user):
            return False
    return True


def _full_arange(node, size: int) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target is _aten.arange.default and node.args == (size,)
            and node.kwargs.get("dtype") is None)


def _identity_of(node):
    """The node's input when the node provably returns that input's values unchanged (a no-op
    reshape or expand, ``detach``, ``neg(neg(x))``, ``x ** 1.0``, ``x[arange(len(x))]``), else
    ``None``. Replacing the node by its input changes no value, bit for bit."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    target, x = node.target, node.args[0]
    if target in (_aten.expand.default, _aten.view.default, _aten.reshape.default,
                  _aten._unsafe_view.default):
        return x if _same_layout(node, x) else None
    if target is _aten.detach.default:
        return x  # the graph runs without autograd
    if not _never_written(node):
        return None  # a copy that might be written in place: keep it
    if target is _aten.neg.default and x.op == "call_function" and \
            x.target is _aten.neg.default and isinstance(x.args[0], torch.fx.Node):
        return x.args[0]
    if target is _aten.pow.Tensor_Scalar and node.args[1] == 1.0 and _same_layout(node, x):
        return x
    if target is _aten.index.Tensor and _same_layout(node, x):
        idx = node.args[1]
        if len(idx) == 1 and _full_arange(idx[0], _val(x).shape[0]):
            return x
    return None


def simplify_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Value-preserving clean-up of a captured graph: no-op reshapes/expands, ``detach``,
    double negations, ``x ** 1.0`` and full-range row gathers ``x[arange(n)]`` (a plate
    without subsampling) are bypassed; dead code (random ops excepted) and profiler markers
    are removed. Unused random draws become extra outputs after the graph's own (callers read
    outputs by position from the front)."""
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and \
                target.namespace == "profiler" and not node.users:
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            src = _identity_of(node)
            if src is not None:
                node.replace_all_uses_with(src)
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    # an unused draw must still run (it advances the generator): make it an extra, trailing
    # output, which tracing backends (TorchScript) would otherwise prune
    unused = [n for n in graph.nodes if n.op == "call_function" and not n.users
              and _is_impure(n) and isinstance(n.target, torch._ops.OpOverload)
              and torch.Tag.nondeterministic_seeded in n.target.tags
              and isinstance(n.meta.get("val"), torch.Tensor)]
    if unused:
        out = next(n for n in graph.nodes if n.op == "output")
        out.args = (tuple(out.args[0]) + tuple(unused),)
    graph.lint()
    gm.recompile()
    return gm


def _trainable_constants(gm: torch.fx.GraphModule) -> list[str]:
    """Constants of the graph that require grad: trainable tensors the step reads that were not
    graph inputs (so their gradients would be lost)."""
    tensors = list(gm.named_buffers()) + list(gm.named_parameters())
    return [name for name, value in tensors if value.requires_grad]


def _compile(gm: torch.fx.GraphModule, flat: list[torch.Tensor], backend: str, what: str):
    """The callable that runs ``gm`` with ``backend`` (``(callable, backend actually used)``)."""
    if backend == "script":
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # jit.trace's deprecation and tracer warnings
                return torch.jit.trace(gm, tuple(flat), check_trace=False), "script"
        except Exception as e:  # noqa: BLE001 (any TorchScript failure: run the FX graph)
            logger.info("%s: TorchScript failed (%s: %s); running the captured graph as FX "
                        "Python", what, type(e).__name__, str(e).splitlines()[0][:200])
            return gm, "fx"
    if backend == "inductor":
        try:
            return torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False,
                                 options={"fallback_random": True}), "inductor"
        except Exception as e:  # noqa: BLE001
            logger.info("%s: torch.compile failed (%s); running the captured graph as FX "
                        "Python", what, e)
            return gm, "fx"
    return gm, "fx"


# ---------------------------------------------------------------------------------------------
# One captured graph
# ---------------------------------------------------------------------------------------------


@dataclass
class _Carrier:
    obj: CarriesState
    keys: tuple[str, ...]
    meta: tuple  # (shape, dtype, device) per key


def _state_meta(state: dict) -> tuple:
    return tuple((tuple(v.shape), v.dtype, v.device) for v in state.values())


@dataclass
class Graph:
    """A captured step: its compiled callable and the layout of its inputs and outputs."""

    run: Callable
    backend: str
    names: list[str]  # param-store names the step reads
    named: list[torch.Tensor]  # their tensors (re-checked by identity at every call)
    params: list[torch.Tensor]  # the distinct ones: the parameter inputs
    grad_params: list[torch.Tensor]  # the parameters with a gradient output, in output order
    carriers: list[_Carrier]
    refs: tuple  # model and guide, weakly (their ids are in the key)
    num_ops: int = 0
    setup_s: float = 0.0

    def state_inputs(self) -> list[torch.Tensor] | None:
        out = []
        for c in self.carriers:
            st = c.obj.get_state()
            if tuple(st) != c.keys or _state_meta(st) != c.meta:
                return None
            out.extend(st.values())
        return out

    def write_state(self, outs) -> None:
        i = 0
        for c in self.carriers:
            n = len(c.keys)
            c.obj.set_state(dict(zip(c.keys, outs[i:i + n])))
            i += n


def _ref(x):
    try:
        return weakref.ref(x)
    except TypeError:
        return lambda x=x: x


def _callable_key(f) -> tuple:
    """A model's or guide's part of the key: a bound method (a new object at every attribute
    access) by its instance and function."""
    if inspect.ismethod(f):
        return (id(f.__self__), id(f.__func__))
    return (id(f),)


class _CallableRef:
    """A weak reference to a model or guide that survives bound methods' re-creation."""

    __slots__ = ("func", "obj")

    def __init__(self, f):
        if inspect.ismethod(f):
            self.obj, self.func = _ref(f.__self__), f.__func__
        else:
            self.obj, self.func = _ref(f), None

    def matches(self, f) -> bool:
        if self.func is None:
            return self.obj() is f
        return inspect.ismethod(f) and self.obj() is f.__self__ and self.func is f.__func__


def _current_params(names: list[str]) -> list[torch.Tensor | None]:
    store = dict(pyro.get_param_store().named_parameters())
    return [store.get(n) for n in names]


def _close(a, b) -> bool:
    """Equal up to float rounding (bitwise for the "script"/"fx" backends in practice)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if a.shape != b.shape:
            return False
        if a.is_floating_point() or b.is_floating_point():
            a, b = a.double(), b.double()
            same = (a == b) | (torch.isnan(a) & torch.isnan(b))
            diff = torch.where(same, 0.0, (a - b).abs())
            scale = float(b.abs().nan_to_num(0.0, 0.0, 0.0).max()) if b.numel() else 0.0
            return bool((diff <= 1e-5 * max(1.0, scale)).all())
        return bool(torch.equal(a, b))
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


class _Precomputed(torch.autograd.Function):
    """A loss whose gradients were computed by a captured graph: ``backward`` scales them."""

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None) + tuple(None if g is None else grad_output * g for g in ctx.grads)


# ---------------------------------------------------------------------------------------------
# The per-objective cache
# ---------------------------------------------------------------------------------------------


class ObjectiveCapture:
    """The captured graphs of one objective (one per key; see the module docstring).

    ``surrogate(model, guide, args, kwargs) -> (surrogate, estimate)`` must run the objective's
    program without host syncs (the objective's finiteness check is made here, on the graph's
    output); the ``eager_*`` callables given to each method are the objective's eager paths.
    """

    def __init__(self, name: str, backend: str, surrogate: Callable):
        self.name = name
        self.backend = backend
        self.surrogate = surrogate
        self.graphs: dict[tuple, Graph | str] = {}
        self.setups: dict[tuple, int] = {}
        self._full_logged = False

    def __repr__(self) -> str:
        return f"ObjectiveCapture({self.name}, backend={self.backend!r}, " \
               f"{len(self.graphs)} key(s))"

    def __getstate__(self):  # copies and pickles start without graphs (they set up again)
        state = dict(self.__dict__)
        state["graphs"], state["setups"] = {}, {}
        return state

    # -- the three entry points -----------------------------------------------------------
    def loss_and_grads(self, model, guide, args, kwargs, eager: Callable) -> float:
        graph, key, tensors = self._lookup("grads", model, guide, args, kwargs)
        if graph is None:
            return self._setup(key, "grads", model, guide, args, kwargs, tensors, eager)
        outs = self._execute(graph, tensors)
        if outs is None:  # parameters or state changed under the graph: set up again
            return self._setup(key, "grads", model, guide, args, kwargs, tensors, eager)
        surrogate, estimate = outs[0].tolist()
        loss = self.finish(surrogate, -estimate)
        g = len(graph.grad_params)
        for p, grad in zip(graph.grad_params, outs[1:1 + g]):
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)
        graph.write_state(outs[1 + g:])
        self._emit_params(graph)
        return loss

    def gradients(self, model, guide, args, kwargs):
        """The captured graph's ``(values, params, grads)`` for this step without touching
        ``.grad`` and without a host sync (``values``: the surrogate and the estimate, to be
        checked by the caller), or ``None`` when this step has no graph yet (or runs eagerly):
        then call :meth:`loss_and_grads`, which sets the step up."""
        graph, _, tensors = self._lookup("grads", model, guide, args, kwargs)
        if graph is None:
            return None
        outs = self._execute(graph, tensors)
        if outs is None:
            return None
        g = len(graph.grad_params)
        graph.write_state(outs[1 + g:])
        return outs[0], graph.grad_params, outs[1:1 + g]

    def loss(self, model, guide, args, kwargs, eager: Callable) -> float:
        graph, key, tensors = self._lookup("loss", model, guide, args, kwargs)
        if graph is None:
            return self._setup(key, "loss", model, guide, args, kwargs, tensors, eager)
        outs = self._execute(graph, tensors)
        if outs is None:
            return self._setup(key, "loss", model, guide, args, kwargs, tensors, eager)
        (estimate,) = outs[0].tolist()
        loss = self.finish(estimate, -estimate)
        graph.write_state(outs[1:])
        self._emit_params(graph)
        return loss

    def differentiable_loss(self, model, guide, args, kwargs, eager: Callable) -> torch.Tensor:
        graph, key, tensors = self._lookup("diff", model, guide, args, kwargs)
        if graph is None:
            return self._setup(key, "diff", model, guide, args, kwargs, tensors, eager)
        outs = self._execute(graph, tensors)
        if outs is None:
            return self._setup(key, "diff", model, guide, args, kwargs, tensors, eager)
        surrogate = outs[0][0]
        self.finish(float(surrogate), -float(surrogate))
        g = len(graph.grad_params)
        graph.write_state(outs[1 + g:])
        self._emit_params(graph)
        return _Precomputed.apply(-surrogate, tuple(outs[1:1 + g]), *graph.grad_params)

    # -- hit path ------------------------------------------------------------------------
    def _lookup(self, mode, model, guide, args, kwargs):
        tensors, arg_key = _flatten_args(args, kwargs)
        key = (mode, _callable_key(model), _callable_key(guide), arg_key)
        entry = self.graphs.get(key)
        if isinstance(entry, Graph) and not (entry.refs[0].matches(model)
                                             and entry.refs[1].matches(guide)):
            del self.graphs[key]  # a new object reused an id
            entry = None
        return entry, key, tensors

    def _execute(self, graph: Graph | str, tensors):
        if isinstance(graph, str):
            return None
        named = _current_params(graph.names)
        if any(p is not q for p, q in zip(named, graph.named)):
            return None
        states = graph.state_inputs()
        if states is None:
            return None
        with torch.no_grad():
            return graph.run(*graph.params, *states, *tensors)

    def _emit_params(self, graph: Graph) -> None:
        # under handlers (pyro.infer.SVI's param capture) the step shows its param sites
        if am_i_wrapped():
            for name in graph.names:
                pyro.param(name)

    def finish(self, surrogate: float, loss: float) -> float:
        if not math.isfinite(surrogate):
            if is_validation_enabled():
                raise ValueError(
                    f"non-finite objective value ({self.name}, captured graph); run the objective "
                    "with capture=False to find the site whose log-density is non-finite")
            warn_if_nan(surrogate, "loss")
        warn_if_nan(loss, "loss")
        return loss

    # -- set-up --------------------------------------------------------------------------
    def _setup(self, key, mode, model, guide, args, kwargs, tensors, eager):
        """Run the step eagerly (the call's result) and, when it is stable, capture it."""
        if isinstance(self.graphs.get(key), str):
            return eager()
        self.graphs.pop(key, None)
        if len(self.graphs) >= MAX_GRAPHS:
            if not self._full_logged:
                self._full_logged = True
                logger.warning(
                    "%s(capture=%r): %d argument signatures captured already; this one and "
                    "later new ones run eagerly (a Python number that changes every step? pass "
                    "it as a tensor)", self.name, self.backend, MAX_GRAPHS)
            return eager()
        store = pyro.get_param_store()
        names_before = set(store.keys())
        grads_before = {n: (None if p.grad is None else p.grad.clone())
                        for n, p in store.named_parameters()}
        devices = _devices(tensors + [p for _, p in store.named_parameters()])
        rng = _Rng(devices)
        t0 = time.perf_counter()
        with poutine.trace(param_only=True) as ptr, watching() as watch:
            result = eager()
        rng_after = _Rng(devices)
        names = list(dict.fromkeys(n for n, s in ptr.trace.nodes.items() if s["type"] == "param"))

        # is the step capturable, and stable (no new parameters, same state layout)?
        unstable = [n for n in names if n not in names_before]
        carriers, befores, afters = [], [], []
        for obj, before in watch.carriers.values():
            after = obj.get_state()
            if tuple(after) != tuple(before) or _state_meta(after) != _state_meta(before):
                unstable.append(type(obj).__name__)
            carriers.append(_Carrier(obj, tuple(after), _state_meta(after)))
            befores.append(before)
            afters.append(dict(after))
        changed = watch.changed_others()
        if changed:
            obj, attr = changed[0]
            return self._fallback(key, (
                f"{type(obj).__name__} keeps Python state between steps (attribute {attr!r} "
                "changed); declare it through vi_estimators.state.CarriesState to capture it"),
                result)
        if mode != "loss" and any(t.requires_grad for t in tensors):
            return self._fallback(key, "a tensor argument requires grad (gradients through "
                                  "arguments are not captured)", result)
        if unstable:
            n = self.setups[key] = self.setups.get(key, 0) + 1
            if n >= MAX_SETUPS:
                return self._fallback(
                    key, f"every step creates parameters or changes carried state ({unstable[0]})",
                    result)
            return result

        # the eager step's outcome, to check the graph against
        named = _current_params(names)
        params = list({id(p): p for p in named}.values())  # tied names share one tensor
        if mode == "grads":
            ref_loss = result
            first = {}
            for n, p in zip(names, named):
                first.setdefault(id(p), n)
            ref_grads = [None if p.grad is None else
                         (p.grad if grads_before.get(first[id(p)]) is None
                          else p.grad - grads_before[first[id(p)]])
                         for p in params]
        elif mode == "diff":
            ref_loss = float(result.detach())
            ref_grads = self._diff_reference(result, params)
        else:
            ref_loss, ref_grads = result, None
        try:
            graph = self._capture(mode, model, guide, args, kwargs, tensors, names, named,
                                  params, carriers, befores, rng, devices)
            why = self._check(graph, mode, tensors, (rng, rng_after), devices, befores, ref_loss,
                              ref_grads, afters)
        except Exception as e:  # noqa: BLE001 (any failure to capture means: run eagerly)
            why = _reason(e)
        finally:
            for c, state in zip(carriers, afters):
                c.obj.set_state(state)
        if why:
            return self._fallback(key, why, result)
        graph.setup_s = time.perf_counter() - t0
        self.graphs[key] = graph
        self.setups.pop(key, None)
        logger.info("%s: captured a %s step (%d aten ops, %d parameter tensors, %d state "
                    "tensors, backend %s, set-up %.2f s)", self.name, mode, graph.num_ops,
                    len(params), sum(len(c.keys) for c in carriers), graph.backend,
                    graph.setup_s)
        return result

    @staticmethod
    def _diff_reference(loss, params):
        wanted = [p for p in params if p.requires_grad]
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad or not wanted:
            return [None] * len(params)
        grads = iter(torch.autograd.grad(loss, wanted, retain_graph=True, allow_unused=True))
        return [next(grads) if p.requires_grad else None for p in params]

    def _fallback(self, key, reason: str, result):
        self.graphs[key] = reason
        self.setups.pop(key, None)
        logger.warning("%s(capture=%r): running this step eagerly: %s", self.name,
                       self.backend, reason)
        return result

    def _capture(self, mode, model, guide, args, kwargs, tensors, names, named, params,
                 carriers, befores, rng, devices) -> Graph:
        """Trace the step from its starting point (generator and carried state as before the
        eager step) and compile the graph."""
        surrogate_fn = self.surrogate
        wanted = [p for p in params if p.requires_grad] if mode != "loss" else []
        grad_slots: list[int] = []

        def step(*flat):
            # ``flat`` holds the very tensors the program reads (make_fx's real mode tracks
            # them by identity): nothing needs substituting
            with ExitStack() as stack:
                stack.enter_context(tracing())
                stack.enter_context(pyro.validation_enabled(False))
                stack.enter_context(_DataDependenceGuard())
                stack.enter_context(torch.no_grad() if mode == "loss" else torch.enable_grad())
                s, e = surrogate_fn(model, guide, args, kwargs)
                s, e = torch.as_tensor(s), torch.as_tensor(e)
                if mode == "loss":
                    outs = [e.detach().reshape(1)]
                else:
                    outs = [torch.stack([s.detach(), e.detach()])]
                    grads = torch.autograd.grad(-s, wanted, allow_unused=True) \
                        if wanted and s.requires_grad else [None] * len(wanted)
                    grad_slots[:] = [i for i, g in enumerate(grads) if g is not None]
                    outs.extend(g for g in grads if g is not None)
            for c in carriers:
                st = c.obj.get_state()
                if tuple(st) != c.keys:
                    raise CaptureError(f"{type(c.obj).__name__}'s carried state changed layout "
                                       "while tracing")
                outs.extend(st.values())
            return tuple(outs)

        for c, st in zip(carriers, befores):
            c.obj.set_state({k: v.clone() for k, v in st.items()})
        flat = list(params) + [v for c in carriers for v in c.obj.get_state().values()] + \
            list(tensors)
        with torch.random.fork_rng(devices=devices):
            rng.restore()
            gm = make_fx(step)(*flat)
        if _trainable_constants(gm):
            raise CaptureError(
                "the step reads a trainable tensor that is not in the param store (an "
                "nn.Module or tensor not registered with pyro.module/pyro.param)")
        gm = simplify_graph(gm)
        num_ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
        for c, st in zip(carriers, befores):  # tracing ran the step: start from before again
            c.obj.set_state({k: v.clone() for k, v in st.items()})
        flat = list(params) + [v for c in carriers for v in c.obj.get_state().values()] + \
            list(tensors)
        with torch.random.fork_rng(devices=devices):
            run, backend = _compile(gm, flat, self.backend, self.name)
        return Graph(run=run, backend=backend, names=names, named=named, params=params,
                     grad_params=[wanted[i] for i in grad_slots], carriers=carriers,
                     refs=(_CallableRef(model), _CallableRef(guide)), num_ops=num_ops)

    def _check(self, graph, mode, tensors, rngs, devices, befores, ref_loss, ref_grads, afters):
        """Run the graph from the eager step's starting point; ``""`` if it reproduces the
        eager step's loss, gradients, new state and use of the random generators, else why
        not."""
        rng, rng_after = rngs
        repeats = 3 if graph.backend == "script" else 1
        for _ in range(repeats):
            for c, st in zip(graph.carriers, befores):
                c.obj.set_state({k: v.clone() for k, v in st.items()})
            states = graph.state_inputs()
            with torch.random.fork_rng(devices=devices):
                rng.restore()
                with torch.no_grad():
                    outs = graph.run(*graph.params, *states, *tensors)
                if _Rng(devices) != rng_after:
                    return ("the captured graph draws a different amount of random numbers "
                            "than the eager step")
            values = outs[0].tolist()
            loss = -values[0] if mode in ("loss", "diff") else -values[1]
            if not _close(loss, ref_loss):
                return (f"the captured graph's loss {loss!r} differs from the eager step's "
                        f"{ref_loss!r}")
            rest = outs[1:]
            if mode != "loss":
                g = len(graph.grad_params)
                got = dict(zip(map(id, graph.grad_params), outs[1:1 + g]))
                for p, r in zip(graph.params, ref_grads):
                    mine = got.get(id(p))
                    if (mine is None) != (r is None) or (r is not None and not _close(mine, r)):
                        name = graph.names[[id(q) for q in graph.named].index(id(p))]
                        return (f"the captured graph's gradient of {name!r} differs from the "
                                "eager step's")
                rest = outs[1 + g:]
            i = 0
            for c, want in zip(graph.carriers, afters):
                for k in c.keys:
                    if not _close(rest[i], want[k]):
                        return (f"the captured graph's new state {k!r} of "
                                f"{type(c.obj).__name__} differs from the eager step's")
                    i += 1
        return ""
