"""Capture a tensor function once as a flat graph of aten operations, then run that graph.

The potentials of :mod:`mcmc.potential` (and the block steps of :mod:`mcmc.chains`) are
ordinary Python: a Pyro model run under poutine handlers, distribution objects, autograd.
Per evaluation most of that Python is the same every time; only the tensors change. So we run
it **once** under :func:`torch.fx.experimental.proxy_tensor.make_fx` with *fake* tensors
(shapes and dtypes, no data), which records only the aten operations the Python issued --
forward and backward (``torch.autograd.grad`` inside the function is recorded too) -- and
execute the recorded graph from then on. Every tensor the function takes (chain states,
minibatch row indices, the model's data) is a graph input, so one graph serves every call with
the same shapes.

When capture is not possible (:class:`CaptureError`, with the reason and, where known, the
user's line of code):

* Python control flow on a tensor value (``if x.sum() > 0:``): fake tensors have no values;
* ``.item()`` / ``float(t)`` / ``int(t)``: the value would be baked into the graph;
* data-dependent shapes (``x[mask]``, ``nonzero``, ``unique``);
* random numbers drawn inside the function (the graph would draw them differently from eager
  code);
* any other error while tracing.

Backends (``backend=``):

* ``"script"``: the graph as TorchScript (``torch.jit.trace`` of the aten graph: C++
  interpreter, no per-op Python) -- what ``"auto"`` picks;
* ``"fx"``: the FX graph's generated Python (portable; used if TorchScript fails);
* ``"inductor"``: compiled by TorchInductor (fused C++/Triton kernels). Fastest by far on
  small-tensor work but its compile takes seconds (measured in ``benchmarks/RESULTS.md``), and
  fused reductions round differently, so results match eager only to float rounding. Opt-in.

``"fx"`` runs exactly the recorded aten operations in their recorded order, so its results are
bit-identical to the eager function on the same device. ``"script"`` runs them through
TorchScript's optimising executor, which may regroup arithmetic after its profiling runs (seen
as 1-4 ulp differences in unrolled blocks of steps with matrix products); captured potentials
have matched eager bit for bit in every test, and blocks of steps (:func:`compile_steps`) run
with that optimisation off, so they match too.

Row gathers: an advanced-indexing gather ``X[idx]`` whose index is (a view of) an input named
in ``gather_inputs`` is rewritten to ``index_select`` (about 3x cheaper on CPU for row
gathers). Only indices the caller vouches for are rewritten: ``index_select`` does not wrap
negative indices as ``X[idx]`` does.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence

import pyro
import torch

__all__ = [
    "BACKENDS",
    "CaptureError",
    "CapturedGraph",
    "capture",
    "compile_graph",
    "compile_steps",
    "is_tracing",
    "no_sample_validation",
    "simplify",
    "trace_graph",
    "unroll",
]

#: accepted values of ``backend``
BACKENDS = ("auto", "script", "fx", "inductor")

_state = threading.local()


class CaptureError(RuntimeError):
    """A function could not be captured; :attr:`reason` says why (for the fallback log line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_tracing() -> bool:
    """True while :func:`capture` traces a function (code that would otherwise use a captured
    graph should then run its eager Python, so that the outer trace records its operations)."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _tracing():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


# ------------------------------------------------------------------------------ locations
_LIB_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (torch, pyro)
) + (os.path.dirname(os.path.abspath(__file__)) + os.sep,
     os.path.dirname(os.path.abspath(contextlib.__file__)) + os.sep)


def _is_user_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    return not path.startswith(_LIB_DIRS) and not filename.startswith("<")


def _user_frame_of(frames) -> str:
    """``file:line `code``` of the innermost frame outside torch, Pyro, this package and the
    standard library; empty if none."""
    for fs in reversed(list(frames)):
        if _is_user_file(fs.filename):
            code = (fs.line or linecache.getline(fs.filename, fs.lineno)).strip()
            return f" at {os.path.basename(fs.filename)}:{fs.lineno} (`{code}`)"
    return ""


def _where_exc(err: BaseException) -> str:
    return _user_frame_of(traceback.extract_tb(err.__traceback__))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


# ------------------------------------------------------------------------------ tracing
_DATA_DEPENDENT_ERRORS: tuple[type, ...] = ()
try:  # names moved between torch versions: collect what exists
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    _DATA_DEPENDENT_ERRORS += (GuardOnDataDependentSymNode,)
except ImportError:  # pragma: no cover
    pass
try:
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
    )

    _DYNAMIC_SHAPE_ERRORS: tuple[type, ...] = (DynamicOutputShapeException,)
    _DATA_DEPENDENT_ERRORS += (DataDependentOutputException,)
except ImportError:  # pragma: no cover
    _DYNAMIC_SHAPE_ERRORS = ()


@contextlib.contextmanager
def no_sample_validation():
    """Skip ``Distribution._validate_sample`` inside the context (used while tracing, and
    under ``torch.func.vmap``, where value checks cannot run): a distribution built with
    validation on (e.g. a ``PyroSample`` prior created while Pyro's validation was enabled)
    keeps ``validate_args=True`` and checks every sample with a data-dependent ``if``. The
    method is patched on the class, so other threads skip sample validation meanwhile too."""
    from torch.distributions import Distribution

    original = Distribution._validate_sample
    Distribution._validate_sample = lambda self, value: None
    try:
        yield
    finally:
        Distribution._validate_sample = original


_T = torch.Tensor
#: Python-level reads of a tensor's value, and how to describe them
_VALUE_READS = {_T.item: ".item()", _T.tolist: ".tolist()", _T.__float__: "float(tensor)",
                _T.__int__: "int(tensor)", _T.__index__: "a tensor used as a Python index",
                _T.__bool__: "Python control flow on a tensor value"}
#: operations whose output shape depends on the values
_DYNAMIC_SHAPES = {torch.nonzero, _T.nonzero, torch.unique, _T.unique, torch.masked_select,
                   _T.masked_select, torch.unique_consecutive, torch.argwhere,
                   torch.repeat_interleave, _T.repeat_interleave}
#: common random draws (others are caught in the graph, without the line)
_RANDOM = {torch.randn, torch.rand, torch.randint, torch.randn_like, torch.rand_like,
           torch.randint_like, torch.normal, torch.bernoulli, torch.multinomial, torch.poisson,
           torch.randperm, _T.normal_, _T.uniform_, _T.bernoulli_, _T.exponential_,
           _T.random_, _T.cauchy_, _T.log_normal_, _T.geometric_}


def _where_now() -> str:
    return _user_frame_of(traceback.extract_stack()[:-2])


class _Refuse(torch.overrides.TorchFunctionMode):
    """Raise :class:`CaptureError` (with the user's line) at the first operation a graph cannot
    replay: a tensor value read in Python, a value-dependent shape, a random draw."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VALUE_READS:
            what = _VALUE_READS[func]
            reason = what if what.startswith("Python") else f"{what} (a tensor value read in Python)"
            raise CaptureError(reason + _where_now())
        if func in _DYNAMIC_SHAPES or (func is torch.where and len(args) + len(kwargs) == 1) or (
            func is _T.__getitem__ and _has_mask(args[1])
        ):
            raise CaptureError(f"data-dependent shapes ({getattr(func, '__name__', func)})"
                               + _where_now())
        if func in _RANDOM:
            raise CaptureError(f"random numbers drawn inside the function "
                               f"({getattr(func, '__name__', func)})" + _where_now())
        return func(*args, **kwargs)


def _has_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _trace(fn: Callable, example_inputs: Sequence[torch.Tensor]):
    from torch.fx.experimental.proxy_tensor import make_fx

    def guarded(*inputs):
        with _Refuse():
            return fn(*inputs)

    with _tracing(), pyro.validation_enabled(False), no_sample_validation(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return make_fx(guarded, tracing_mode="fake", _allow_non_fake_inputs=True)(
                *example_inputs)
        except CaptureError:
            raise
        except _DYNAMIC_SHAPE_ERRORS as e:
            raise CaptureError("data-dependent shapes (boolean-mask indexing, nonzero, unique, "
                               f"...){_where_exc(e)}") from e
        except _DATA_DEPENDENT_ERRORS as e:
            where = _where_exc(e)
            if ".item()" in where or "float(" in where or "int(" in where:
                raise CaptureError(f".item() (a tensor value read in Python){where}") from e
            raise CaptureError(f"Python control flow on a tensor value{where}") from e
        except RuntimeError as e:
            if "_local_scalar_dense" in str(e) or "data-dependent" in str(e):
                where = _where_exc(e)
                raise CaptureError(f"a tensor value read in Python (.item(), float(), or control "
                                   f"flow on a tensor value){where}") from e
            raise CaptureError(f"tracing failed: {_first_line(e)}{_where_exc(e)}") from e
        except Exception as e:
            raise CaptureError(f"tracing failed: {_first_line(e)}{_where_exc(e)}") from e


def _has_unbacked(val) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    vals = val if isinstance(val, (list, tuple)) else [val]
    for v in vals:
        if isinstance(v, torch.Tensor):
            if free_unbacked_symbols(v.shape):
                return True
        elif isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return True
    return False


def _check_graph(gm) -> None:
    """Refuse graphs that would not replay the function: values read in Python, shapes that
    depend on values, random draws."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = f"aten.{node.target._opname}" if hasattr(node.target, "_opname") else str(
            node.target)
        if node.target is torch.ops.aten._local_scalar_dense.default:
            raise CaptureError(".item() (a tensor value read in Python)")
        if torch.Tag.nondeterministic_seeded in node.target.tags:
            raise CaptureError(f"random numbers drawn inside the function ({name})"
                               f"")
        if _has_unbacked(node.meta.get("val")):
            raise CaptureError(f"data-dependent shapes ({name})")


_VIEW_OPS = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.expand.default,
    torch.ops.aten.select.int, torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim,
    torch.ops.aten.squeeze.default, torch.ops.aten.alias.default, torch.ops.aten.clone.default,
    torch.ops.aten._unsafe_view.default, torch.ops.aten.slice.Tensor,
    torch.ops.aten.detach.default,
}


def _rewrite_gathers(gm, gather_positions: Sequence[int]) -> int:
    """Row gathers ``aten.index(x, [idx])`` -> ``index_select(x, 0, idx)`` (reshaped for a
    multi-dim ``idx``) where ``idx`` is a view of one of the placeholders at
    ``gather_positions``, or a constant of valid rows of ``x``; a constant ``idx`` equal to
    ``arange(len(x))`` (a plate without subsampling) is dropped. Returns the count."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    trusted = {placeholders[i] for i in gather_positions}

    def origin(node):
        while node not in trusted:
            if node.op == "get_attr":
                return node
            if node.op != "call_function" or node.target not in _VIEW_OPS:
                return None
            node = node.args[0]
        return node

    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.index.Tensor:
            continue
        x, indices = node.args[0], node.args[1]
        if len(indices) != 1 or indices[0] is None:
            continue
        idx = indices[0]
        source = origin(idx)
        idx_val, x_val = idx.meta.get("val"), x.meta.get("val")
        if (source is None or idx_val is None or x_val is None or x_val.dim() == 0
                or idx_val.dtype not in (torch.int64, torch.int32)):
            continue
        if source.op == "get_attr":  # a constant: check its rows once, here
            value = getattr(gm, source.target)
            if idx is not source or not isinstance(value, torch.Tensor) or value.numel() == 0:
                continue
            n = x_val.shape[0]
            if not bool(((value >= 0) & (value < n)).all()):
                continue
            if value.dim() == 1 and value.numel() == n and torch.equal(
                    value, torch.arange(n, dtype=value.dtype, device=value.device)):
                node.replace_all_uses_with(x)  # x[arange(len(x))] is x (graphs do not mutate)
                graph.erase_node(node)
                count += 1
                continue
        out_shape = list(idx_val.shape) + list(x_val.shape[1:])
        with graph.inserting_before(node):
            if idx_val.dim() == 1:
                out = graph.call_function(torch.ops.aten.index_select.default, (x, 0, idx))
            else:
                flat = graph.call_function(torch.ops.aten.reshape.default, (idx, [-1]))
                sel = graph.call_function(torch.ops.aten.index_select.default, (x, 0, flat))
                out = graph.call_function(torch.ops.aten.reshape.default, (sel, out_shape))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


# ------------------------------------------------------------------------------ simplification
#: constants folded at capture time may hold at most this many elements (views: any size)
FOLD_MAX_NUMEL = 1 << 16

_IDENTITY_OPS = {torch.ops.aten.detach.default, torch.ops.aten.alias.default}
_SAME_SHAPE_VIEWS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                     torch.ops.aten.expand.default, torch.ops.aten._unsafe_view.default}
_SHAPE_FACTORIES = {
    torch.ops.aten.zeros_like.default: lambda v, n: torch.zeros_like(v),
    torch.ops.aten.ones_like.default: lambda v, n: torch.ones_like(v),
    torch.ops.aten.new_zeros.default: lambda v, n: torch.zeros_like(v),
    torch.ops.aten.new_ones.default: lambda v, n: torch.ones_like(v),
}


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _real_like(val: torch.Tensor) -> torch.Tensor:
    """A real tensor with ``val``'s shape, strides, dtype and device (contents unset)."""
    return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)


def _is_exact_noop(node, constant: dict) -> bool:
    """``x - 0``, ``x * 1``, ``x / 1``, ``x ** 1`` (a constant zero/one scalar or tensor that does
    not change ``x``'s shape or dtype): exactly ``x`` in IEEE arithmetic. (``x + 0`` is not:
    it turns ``-0.0`` into ``+0.0``.)"""
    unit = {torch.ops.aten.sub.Tensor: 0.0, torch.ops.aten.sub.Scalar: 0.0,
            torch.ops.aten.mul.Tensor: 1.0, torch.ops.aten.mul.Scalar: 1.0,
            torch.ops.aten.div.Tensor: 1.0, torch.ops.aten.div.Scalar: 1.0,
            torch.ops.aten.pow.Tensor_Scalar: 1.0}.get(node.target)
    if unit is None or len(node.args) != 2 or node.kwargs:
        return False
    x, other = node.args
    xv, val = _val(x), _val(node)
    if not isinstance(xv, torch.Tensor) or xv.shape != val.shape or xv.dtype != val.dtype:
        return False
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return float(other) == unit
    c = constant.get(other)
    return (c is not None and c.numel() <= FOLD_MAX_NUMEL and bool((c == unit).all())
            and (c.numel() <= 1 or torch.broadcast_shapes(c.shape, xv.shape) == xv.shape))


#: in-place operations that change only a tensor's shape/strides, and their out-of-place views
_METADATA_INPLACE = {
    torch.ops.aten.squeeze_.dim: torch.ops.aten.squeeze.dim,
    torch.ops.aten.squeeze_.default: torch.ops.aten.squeeze.default,
    torch.ops.aten.unsqueeze_.default: torch.ops.aten.unsqueeze.default,
    torch.ops.aten.t_.default: torch.ops.aten.t.default,
    torch.ops.aten.transpose_.default: torch.ops.aten.transpose.int,
}


def _functionalize_metadata_ops(graph) -> None:
    """``x.squeeze_(d)`` -> ``x.squeeze(d)`` (likewise ``unsqueeze_``, ``t_``, ``transpose_``)
    where ``x`` is an intermediate result used by nothing else: such an operation changes only
    ``x``'s shape, never any data, so its out-of-place view computes the same values (e.g. the
    ``squeeze_`` in ``matmul``'s decomposition, which would otherwise mark the whole graph as
    mutating and stop :func:`simplify`)."""
    for node in list(graph.nodes):
        view = _METADATA_INPLACE.get(node.target) if node.op == "call_function" else None
        if view is None or node.kwargs or not node.args:
            continue
        x = node.args[0]
        if not isinstance(x, torch.fx.Node) or x.op != "call_function" or len(x.users) != 1:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(view, tuple(node.args))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def simplify(gm) -> int:
    """Shrink a captured graph without changing any value it computes: drop ``detach`` /
    ``alias`` and same-shape views, and fold operations whose inputs are all constants (or
    that build zeros/ones of a known shape) into constants of at most :data:`FOLD_MAX_NUMEL`
    elements. Graphs with in-place operations are only pruned of dead code. Returns the number
    of nodes removed."""
    graph = gm.graph
    before = len(graph.nodes)
    _functionalize_metadata_ops(graph)
    mutating = any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        and n.target._schema.is_mutable for n in graph.nodes)
    if not mutating:
        constant: dict = {}  # node -> real tensor value
        for node in graph.nodes:
            if node.op == "get_attr":
                value = getattr(gm, node.target)
                if isinstance(value, torch.Tensor):
                    constant[node] = value
                continue
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            target, val = node.target, _val(node)
            if target in _IDENTITY_OPS or (
                target in _SAME_SHAPE_VIEWS and isinstance(val, torch.Tensor)
                and isinstance(_val(node.args[0]), torch.Tensor)
                and tuple(_val(node.args[0]).shape) == tuple(val.shape)
                and _val(node.args[0]).stride() == val.stride()
            ):
                node.replace_all_uses_with(node.args[0])
                continue
            if not isinstance(val, torch.Tensor) or torch.Tag.nondeterministic_seeded in \
                    target.tags:
                continue
            if _is_exact_noop(node, constant):
                node.replace_all_uses_with(node.args[0])
                continue
            if target in _SHAPE_FACTORIES and val.numel() <= FOLD_MAX_NUMEL:
                value = _SHAPE_FACTORIES[target](_real_like(val), node)
            else:
                inputs = node.all_input_nodes  # none: a factory (arange, zeros, ...)
                if not all(a in constant for a in inputs):
                    continue
                is_view = target._schema.returns and target._schema.returns[0].alias_info
                if not is_view and val.numel() > FOLD_MAX_NUMEL:
                    continue
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs),
                                                     lambda n: constant[n])
                try:
                    with torch.no_grad():
                        value = target(*args, **kwargs)
                except Exception:  # noqa: BLE001, S112 - cannot fold: leave the node as it is
                    continue
                if not isinstance(value, torch.Tensor):
                    continue
            name = f"_folded_{len(constant)}"
            while hasattr(gm, name):
                name += "_"
            gm.register_buffer(name, value, persistent=False)
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            constant[attr] = value
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return before - len(graph.nodes)


# ------------------------------------------------------------------------------ backends
def _script(gm, example_inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(gm, tuple(example_inputs), check_trace=False, strict=False)


def _inductor(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decomposed = make_fx(gm, decomposition_table=select_decomp_table(),
                             tracing_mode="fake", _allow_non_fake_inputs=True)(*example_inputs)
        compiled = compile_fx_inner(decomposed, list(example_inputs))

    def run(*tensors):
        return tuple(compiled(list(tensors)))

    return run


class CapturedGraph:
    """A captured function: call it with the same tensors (same shapes, dtypes, devices) as
    the example inputs; returns a tuple of tensors.

    Attributes:
        graph_module: the recorded ``torch.fx.GraphModule`` (aten operations).
        backend: what executes it: ``"script"``, ``"fx"`` or ``"inductor"``.
        notes: what was tried and not used (e.g. a backend that failed), for logs.
        num_gathers: ``X[idx]`` gathers rewritten to ``index_select``.
    """

    __slots__ = ("_run", "backend", "graph_module", "notes", "num_gathers")

    def __init__(self, graph_module, run, backend: str, notes: list[str], num_gathers: int):
        self.graph_module = graph_module
        self._run = run
        self.backend = backend
        self.notes = notes
        self.num_gathers = num_gathers

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = self._run(*tensors)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def _same(a, b) -> bool:
    return all(x.shape == y.shape and torch.equal(x.nan_to_num(0.0, 1.0, -1.0),
                                                  y.nan_to_num(0.0, 1.0, -1.0))
               if x.is_floating_point() else torch.equal(x, y) for x, y in zip(a, b))


def trace_graph(
    fn: Callable[..., Sequence[torch.Tensor]],
    example_inputs: Sequence[torch.Tensor],
    *,
    gather_inputs: Sequence[int] = (),
):
    """Record ``fn(*example_inputs) -> tuple of tensors`` as an FX ``GraphModule`` of aten
    operations (checked, gathers rewritten; see :func:`capture`). Returns ``(graph_module,
    number of gathers rewritten)``. Raises :class:`CaptureError`."""
    gm = _trace(fn, example_inputs)
    _check_graph(gm)
    num_gathers = _rewrite_gathers(gm, gather_inputs)
    simplify(gm)  # folds e.g. a plate's arange: gathers by constants next
    mutating = any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        and n.target._schema.is_mutable for n in gm.graph.nodes)
    if not mutating:
        num_gathers += _rewrite_gathers(gm, ())
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm, num_gathers


def compile_graph(gm, example_inputs: Sequence[torch.Tensor], backend: str = "auto", *,
                  num_gathers: int = 0, exact: bool = False) -> CapturedGraph:
    """Make ``gm`` (from :func:`trace_graph` or :func:`unroll`) runnable by ``backend``
    (falling back from ``"inductor"`` to TorchScript to the FX graph's Python, noted in
    :attr:`CapturedGraph.notes`). ``exact=True``: TorchScript runs the recorded operations
    as recorded (``torch.jit.optimized_execution(False)``: no regrouping by its optimising
    executor, bit-identical to the FX graph, a few percent slower)."""
    if backend not in BACKENDS:
        raise ValueError(f"capture backend must be one of {BACKENDS}, got {backend!r}")
    notes: list[str] = []
    if backend == "fx":
        return CapturedGraph(gm, gm, "fx", notes, num_gathers)
    if backend == "inductor":
        try:
            return CapturedGraph(gm, _inductor(gm, example_inputs), "inductor", notes,
                                 num_gathers)
        except Exception as e:  # noqa: BLE001 - fall back to TorchScript, noted
            notes.append(f"inductor failed ({_first_line(e)})")
    try:
        scripted = _script(gm, example_inputs)
        with torch.no_grad():
            reference = gm(*example_inputs)
            got = scripted(*example_inputs)
        got = tuple(got) if isinstance(got, (list, tuple)) else (got,)
        reference = tuple(reference) if isinstance(reference, (list, tuple)) else (reference,)
        if not _same(got, reference):
            raise RuntimeError("TorchScript results differ from the FX graph's")
        return CapturedGraph(gm, _unoptimized(scripted) if exact else scripted, "script",
                             notes, num_gathers)
    except Exception as e:  # noqa: BLE001 - fall back to the FX graph's Python, noted
        notes.append(f"TorchScript failed ({_first_line(e)})")
    return CapturedGraph(gm, gm, "fx", notes, num_gathers)


def capture(
    fn: Callable[..., Sequence[torch.Tensor]],
    example_inputs: Sequence[torch.Tensor],
    *,
    backend: str = "auto",
    gather_inputs: Sequence[int] = (),
) -> CapturedGraph:
    """Record ``fn(*example_inputs) -> tuple of tensors`` once and compile it.

    Args:
        fn: a function of tensors returning a tuple (or list) of tensors. It is run once, with
            fake tensors, Pyro's validation off and :func:`is_tracing` true.
        example_inputs: tensors with the shapes/dtypes/devices of every later call.
        backend: one of :data:`BACKENDS`.
        gather_inputs: positions of inputs that hold valid non-negative row indices: gathers
            ``X[idx]`` by them become ``index_select``.

    Raises:
        CaptureError: capture is not possible; :attr:`CaptureError.reason` says why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"capture backend must be one of {BACKENDS}, got {backend!r}")
    gm, num_gathers = trace_graph(fn, example_inputs, gather_inputs=gather_inputs)
    return compile_graph(gm, example_inputs, backend, num_gathers=num_gathers)


def unroll(step_graphs: Sequence, num_carry: int):
    """Compose step graphs ``g_j(carry..., extra_j...) -> (carry'..., out_j...)``, ``j = 0, ...,
    k - 1``, into one graph (a scan, unrolled): inputs ``(carry..., extra_0..., extra_1...,
    ...)``, outputs ``(final carry..., stack_j(out_j)...)`` (each per-step output stacked on a
    new leading dim). The same graph module may appear several times; copying nodes is cheap
    next to tracing the step ``k`` times."""
    graph = torch.fx.Graph()
    root = torch.nn.Module()
    step_graphs[0]
    carry = [graph.placeholder(f"carry_{i}") for i in range(num_carry)]
    prefixes: dict[int, str] = {}
    outs_per_step = []
    for j, gm in enumerate(step_graphs):
        prefix = prefixes.setdefault(id(gm), f"step{len(prefixes)}_")
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        extra = [graph.placeholder(f"x{j}_{i}") for i in range(len(placeholders) - num_carry)]
        env = dict(zip(placeholders, carry + extra))
        outputs = None
        lookup = env.__getitem__
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                outputs = torch.fx.node.map_arg(node.args[0], lookup)
                continue
            new = graph.node_copy(node, lookup)
            if node.op == "get_attr":
                name = prefix + node.target.replace(".", "_")
                if not hasattr(root, name):
                    setattr(root, name, getattr(gm, node.target))
                new.target = name
            env[node] = new
        outputs = list(outputs)
        carry = outputs[:num_carry]
        outs_per_step.append(outputs[num_carry:])
    stacked = [graph.call_function(torch.ops.aten.stack.default, ([o[i] for o in outs_per_step],
                                                                  0))
               for i in range(len(outs_per_step[0]))]
    graph.output(tuple(carry + stacked))
    return torch.fx.GraphModule(root, graph)


def _unoptimized(scripted):
    def run(*tensors):
        with torch.jit.optimized_execution(False):
            return scripted(*tensors)

    return run


def compile_steps(step_graphs: Sequence, num_carry: int,
                  example_inputs: Sequence[torch.Tensor], backend: str = "auto", *,
                  unrolled: bool = True) -> CapturedGraph:
    """A runner of ``k`` steps with the calling convention of :func:`unroll`.

    ``unrolled=True`` (TorchScript / FX): the unrolled graph -- one call, no Python between
    steps; compiling it costs about a second for 16 steps of a small model. ``unrolled=False``,
    and always for Inductor (whose compile time grows with the graph: minutes for an unrolled
    block): each distinct step graph compiled once and called ``k`` times from a short Python
    loop (compile cost of one step; some Python per step). TorchScript runs them ``exact``
    (see :func:`compile_graph`): a block's draws are then bit-identical to single steps', so
    ``block_size="auto"``, which decides by timing, cannot change a run's numbers."""
    if backend != "inductor" and unrolled:
        return compile_graph(unroll(step_graphs, num_carry), example_inputs, backend,
                             exact=True)
    carry_examples = list(example_inputs[:num_carry])
    runners, spans, compiled, notes = [], [], {}, []
    offset = num_carry
    for gm in step_graphs:
        n_extra = sum(1 for n in gm.graph.nodes if n.op == "placeholder") - num_carry
        extra = list(example_inputs[offset:offset + n_extra])
        if id(gm) not in compiled:
            compiled[id(gm)] = compile_graph(gm, carry_examples + extra, backend, exact=True)
            notes += compiled[id(gm)].notes
        runners.append(compiled[id(gm)])
        spans.append((offset, offset + n_extra))
        offset += n_extra

    def run(*inputs):
        carry = inputs[:num_carry]
        outs = []
        for fn, (a, b) in zip(runners, spans):
            out = fn(*carry, *inputs[a:b])
            carry = out[:num_carry]
            outs.append(out[num_carry:])
        return (*carry, *(torch.stack([o[i] for o in outs]) for i in range(len(outs[0]))))

    return CapturedGraph(None, run, runners[0].backend, notes, 0)
