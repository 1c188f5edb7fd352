"""Potential energy of any Pyro model in unconstrained space, for one chain or many.

This is the one potential layer shared by every sampler in :mod:`mcmc` (SGLD family, federated
SGLD, proximal/Bregman Langevin, coin sampling). It accepts the models that
``pyro.infer.NUTS`` accepts: continuous latent sites (constrained or not, flat
``ImproperUniform`` priors given an ``init_strategy`` that supplies values), any plates,
``pyro.deterministic``, ``pyro.factor``, ``PyroModule``/``PyroSample`` nets, models that do not
broadcast over extra batch dims.

Definition
----------
Let ``x = (x_1, ..., x_K)`` be the model's continuous latent sites (constrained values),
``T_k = biject_to(support_k)`` the bijection from unconstrained reals to the support of site
``k`` (the transforms Pyro's MCMC uses) and ``z = (z_1, ..., z_K)``, ``x_k = T_k(z_k)``, flattened
and concatenated into one vector of length ``D = dim`` (:attr:`Potential.site_slices`). The
potential energy is

.. math::

    U(z) = -\\log p(\\mathcal{D}, x) - \\sum_k \\log |\\det J_{T_k}(z_k)|,

where ``log p(D, x)`` is the model's log joint density: the sum of ``log_prob`` of every sample
site (latent and observed, ``pyro.factor`` included) with Pyro's ``scale`` and ``mask``
applied. ``exp(-U)`` is proportional to the posterior density of ``z`` in unconstrained space.
Sites named in ``exclude_sites`` contribute no ``log_prob`` term (their Jacobian term stays), so
a proximal sampler can treat them separately.

Minibatches, the Pyro way
-------------------------
A plate is *subsampled* when

* the model declares it: ``with pyro.plate("data", N, subsample_size=B) as idx: ... y[idx]``
  (what Pyro's SVI tutorials write), or
* the sampler asks for it: ``Potential(..., subsample_size=B)`` (one data plate: the plate whose
  sites are all observed) or ``subsample_size={"data": B}``, on a model that indexes its data
  with the plate's indices (``with pyro.plate("data", N) as idx: ... obs=y[idx]``).

:meth:`Potential.draw_indices` draws each subsampled plate's row indices from a
``torch.Generator`` (the sampler's own, so runs are reproducible and checkpoints exact) and
:meth:`Potential.value_and_grad` ``(z, indices)`` hands them to the plate by conditioning its
subsample site. Pyro's plate then scales every log-likelihood term in it by ``N / B``, so
``U_B(z)`` and its gradient are unbiased estimators of ``U(z)`` and ``grad U(z)``
(Welling & Teh 2011, eq. 4). Rows are drawn with replacement (``O(B)``) or, by default, without
replacement within a minibatch by redrawing duplicates (expected ``O(B log B)`` for
``B << N``; the resulting set is uniform over ``B``-subsets because the procedure commutes with
any relabelling of the rows). Latent sites *inside* a subsampled plate (local latents) are
refused with an error naming the site.

Without indices (``indices=None``) the potential is the full-data one; for a plate whose
``subsample_size`` the model fixes it is evaluated as ``ceil(N / B)`` minibatches that cover the
rows once, each row weighted ``B / N`` (set-up, initialisation, mode finding and error reports
use the full data).

Chains
------
``z`` has shape ``(C, D)``: ``C`` chains on the leading dim. With ``C = 1`` the model runs
exactly as NUTS runs it: latents at their own shape, no extra plate. With ``C > 1`` the chains
are vectorised, chosen once (lazily, at the first batched call) by comparing a batched
evaluation with single ones at two points:

* ``"plate"``: the model runs once inside ``pyro.plate("_chains", C, dim=-(max_plate_nesting +
  1))`` with chain-batched latents -- if it broadcasts correctly over that dim;
* ``"vmap"``: :func:`torch.func.vmap` of the one-chain evaluation over the chain dim;
* ``"loop"``: one model run per chain (always works, slowest).

Per-chain minibatches (indices of shape ``(C, B)``) always use ``vmap`` (or the loop): every
chain evaluates its own ``B`` rows, ``C * B`` rows in all, fixed shapes. One log line
(logger ``mcmc.potential``; INFO, WARNING for the loop) says which path was taken and why.
Vectorisation is an optimisation, never a requirement.

Capture
-------
:meth:`Potential.value_and_grad` is Python-heavy: one Pyro model run under poutine handlers
(plus ``vmap`` or the chain plate), distribution objects and an autograd pass per call, while
the tensor work (for a minibatch of ``B`` rows) is small. With ``capture="auto"`` (the
default) the whole evaluation -- ``U`` and ``grad U`` for all ``C`` chains, on the path chosen
above -- is recorded once per *cache key* (number of chains, minibatch plates and sizes, the
data's shapes, dtype, device) with :func:`mcmc.capture.capture` (``make_fx``: the Pyro/poutine
Python runs once, the aten operations are kept) and replayed from then on as a flat graph
(TorchScript; ``capture="inductor"`` compiles it with TorchInductor instead, ``"fx"`` runs the
FX graph's Python, ``"off"`` never captures). Chain states, minibatch row indices and the
model's tensor arguments are graph inputs, so the minibatches drawn each step and new data of
the same shapes reuse the graph. A key is captured at its second use (one-off evaluations --
initialisation, error reports -- stay eager) and the graph is checked against the eager result
there. The row gathers ``X[idx]`` of the model by the plate's indices run as ``index_select``
in the graph.

With ``"fx"`` the captured values are bit-identical to eager evaluation, with ``"script"`` in
every test (see :mod:`mcmc.capture` for what TorchScript may regroup). Capture is
not possible -- and the potential stays eager, with **one** log line (logger ``mcmc.potential``)
saying why -- when the model reads tensor values in Python (``.item()``, ``float(t)``, Python
control flow on a tensor value), has data-dependent shapes (``x[mask]``, ``nonzero``), draws
random numbers itself, or has ``pyro.param`` sites (their values would be frozen into the
graph; they are not lifted to graph inputs). Captured graphs skip Pyro's per-call validation of
observed values (every key's first evaluation is eager and validated).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.poutine.util import site_is_subsample
from torch.utils import _pytree as pytree

from .capture import BACKENDS, CapturedGraph, CaptureError, is_tracing, no_sample_validation
from .capture import capture as capture_graph

__all__ = [
    "MinibatchPlate",
    "Potential",
    "capture_option",
    "check_finite",
    "draw_rows",
    "infer_max_plate_nesting",
]

logger = logging.getLogger(__name__)

_CHAIN_PLATE = "_chains"
_VECTORIZE = ("auto", "plate", "vmap", "loop")
#: full-data evaluations of a model-subsampled plate in more chunks than this are not captured
_MAX_CAPTURED_CHUNKS = 16


def capture_option(capture, owner: str = "Potential") -> str:
    """Normalise a ``capture=`` argument: ``True``/``"auto"`` -> ``"auto"``; ``False``/``None``/
    ``"off"`` -> ``"off"``; or a backend of :data:`mcmc.capture.BACKENDS`."""
    if capture is True:
        return "auto"
    if capture is False or capture is None or capture == "off":
        return "off"
    if isinstance(capture, str) and capture in BACKENDS:
        return capture
    raise ValueError(f"{owner}(..., capture={capture!r}): capture must be one of "
                     f"{('off',) + BACKENDS} (or True/False)")


def check_finite(
    name: str,
    tensor: torch.Tensor,
    iteration: int | None = None,
    site_names: Sequence[str] | dict[str, slice] | None = None,
) -> None:
    """Raise :class:`FloatingPointError` if ``tensor`` holds NaN or +-inf.

    Args:
        name: what the tensor is (e.g. ``"potential"``, ``"gradient"``, ``"state"``).
        tensor: the values to check; for a flat ``(C, D)`` state/gradient pass ``site_names`` so
            the message names the offending site(s).
        iteration: the sampler iteration (named in the message).
        site_names: a ``{site: slice}`` mapping into the last dim (e.g.
            :attr:`Potential.site_slices`), or a sequence of names, one per entry of the last dim.

    The message lists the iteration, which chains and which sites are non-finite.
    """
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = ~finite
    where = f" at iteration {iteration}" if iteration is not None else ""
    parts = []
    if tensor.dim() >= 1:
        chains = torch.nonzero(bad.reshape(tensor.shape[0], -1).any(-1)).flatten().tolist()
        parts.append(f"chain(s) {chains[:10]}{' ...' if len(chains) > 10 else ''}")
    if site_names is not None and tensor.dim() >= 1:
        col_bad = bad.reshape(-1, tensor.shape[-1]).any(0)
        if isinstance(site_names, dict):
            sites = [s for s, sl in site_names.items() if bool(col_bad[sl].any())]
        else:
            sites = [s for s, b in zip(site_names, col_bad.tolist()) if b]
        parts.append(f"site(s) {sites}")
    kinds = [k for k, f in (("NaN", torch.isnan), ("inf", torch.isinf)) if bool(f(tensor).any())]
    raise FloatingPointError(
        f"non-finite {name} ({'/'.join(kinds)}){where}: "
        + ", ".join(parts)
        + ". Try a smaller step size, or check the model's parameters/data."
    )


def infer_max_plate_nesting(trace) -> int:
    """Deepest plate dim used by any sample site of a Pyro ``trace`` (0 without plates)."""
    return max(
        [
            -f.dim
            for node in trace.nodes.values()
            if node["type"] == "sample"
            for f in node["cond_indep_stack"]
            if f.dim is not None and f.vectorized
        ]
        + [0]
    )


def draw_rows(
    size: int,
    subsample_size: int,
    rows: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    with_replacement: bool = False,
) -> torch.Tensor:
    """``(rows, subsample_size)`` uniform row indices into ``range(size)``, fixed shape.

    With replacement: independent uniform draws, ``O(B)``. Without: each row of the result holds
    ``B`` distinct indices in increasing order, a uniform ``B``-subset: ``B`` uniform draws are
    sorted and every repeat of a value is replaced by a fresh draw until none are left (the set
    of distinct values, and each fresh draw, is invariant under relabelling the rows, so the
    final set is a uniform ``B``-subset; expected ``O(B log B)`` work for ``B << N``, one pass
    when ``B^2 << N``). For ``4 B > N`` a random key per index is sorted instead,
    ``O(N) = O(B)`` there.
    """
    B = subsample_size
    if with_replacement or B == 1:
        return torch.randint(size, (rows, B), generator=generator, device=device)
    if 4 * B > size:
        keys = torch.rand(rows, size, generator=generator, device=device)
        return keys.argsort(-1)[:, :B]
    s = _sort_rows(torch.randint(size, (rows, B), generator=generator, device=device))
    while True:
        repeat = s[:, 1:] == s[:, :-1]
        if not bool(repeat.any()):
            return s
        fresh = torch.randint(size, (rows, B - 1), generator=generator, device=device)
        s = _sort_rows(torch.cat([s[:, :1], torch.where(repeat, fresh, s[:, 1:])], -1))


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` sorted along its last dim (NumPy's sort on the CPU: about half torch's time for
    a thousand random int64s)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    return x.sort(-1).values


class MinibatchPlate(NamedTuple):
    """A subsampled plate: its ``name``, full ``size`` ``N``, ``subsample_size`` ``B`` and
    whether the model itself ``declared`` ``subsample_size=B``."""

    name: str
    size: int
    subsample_size: int
    declared: bool


class _Site:
    """Bookkeeping for one latent site: shapes, transform and position in the flat vector."""

    __slots__ = ("batch_ndim", "name", "numel", "shape", "slice", "transform", "ushape")

    def __init__(self, name, shape, batch_ndim, ushape, transform, start):
        self.name = name
        self.shape = torch.Size(shape)  # constrained value shape (batch + event)
        self.batch_ndim = batch_ndim  # batch dims of the site's distribution
        self.ushape = torch.Size(ushape)  # unconstrained value shape
        self.transform = transform  # constrained -> unconstrained (Pyro's MCMC convention)
        self.numel = int(math.prod(self.ushape))
        self.slice = slice(start, start + self.numel)


def _model_name(model) -> str:
    return getattr(model, "__name__", None) or type(model).__name__


def _uniform_radius(strategy) -> float | None:
    """The radius of Pyro's ``init_to_uniform`` (bare or ``functools.partial``), else None."""
    if strategy is init_to_uniform:
        return 2.0
    if (isinstance(strategy, functools.partial) and strategy.func is init_to_uniform
            and not strategy.args and set(strategy.keywords) <= {"radius"}):
        return float(strategy.keywords.get("radius", 2.0))
    return None


def _grad_or_zero(u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``grad of u.sum()`` with respect to ``z``; zero where ``u`` does not depend on ``z``."""
    if not u.requires_grad:
        return torch.zeros_like(z)
    (g,) = torch.autograd.grad(u.sum(), z, allow_unused=True)
    return torch.zeros_like(z) if g is None else g


class _CapturedPotential:
    """A captured :meth:`Potential.value_and_grad`: ``(z, indices) -> (U, grad U)``."""

    __slots__ = ("graph", "names")

    def __init__(self, graph: CapturedGraph, names: list[str]):
        self.graph = graph
        self.names = names

    def __call__(self, z, indices, data):
        idx = [] if indices is None else [indices[k] for k in self.names]
        u, g = self.graph(z, *idx, *data)
        return u, g


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


class Potential:
    """Potential energy ``U(z)`` (see the module docstring) of a Pyro model, for ``C`` chains.

    Args:
        model: a Pyro model with continuous latent sites.
        model_args, model_kwargs: the model's data (the **full** data).
        max_plate_nesting: number of nested plates in the model (used only by the chain-plate
            vectorisation); guessed from a trace if omitted.
        exclude_sites: latent/observed sites whose ``log_prob`` is left out of ``U``.
        init_strategy: Pyro init strategy: gives the values of the first trace (so sites that
            cannot be sampled, e.g. ``ImproperUniform``, work with ``init_to_value``, as in
            NUTS) and the default for :meth:`initial_params`.
        subsample_size: minibatch rows: ``None`` (only the plates the model subsamples itself),
            an int ``B`` (the model's one data plate) or ``{plate: B}``.
        vectorize: ``"auto"`` (default: chain plate if the model broadcasts, else ``vmap``, else
            a loop), or force ``"plate"``, ``"vmap"`` or ``"loop"``.
        capture: ``"auto"`` (default: :meth:`value_and_grad` runs as a captured graph where
            possible, else eagerly with one log line saying why), ``"script"``, ``"fx"``,
            ``"inductor"`` (a backend, see :mod:`mcmc.capture`) or ``"off"``.
        owner: how the user spells the sampler that owns this potential (e.g. ``"SGLD"``), for
            error messages such as ``SGLD(..., subsample_size=...)``.

    Attributes:
        dim: length ``D`` of the flat unconstrained vector.
        site_slices: ``{site: slice}`` positions of each site in the flat vector.
        transforms: ``{site: transform}`` constrained -> unconstrained (Pyro's MCMC convention).
        site_shapes: ``{site: shape}`` of the constrained values (without the chain dim).
        supports: ``{site: constraint}`` of each latent site's distribution.
        observed_shapes: ``{site: event shape}`` of the observed sites (``pyro.factor`` and
            ``pyro.deterministic`` included).
        data_plates: ``{plate: N}`` of the plates whose sites are all observed.
        minibatch_plates: ``{plate: MinibatchPlate}`` of the subsampled plates.
        plate_sizes: ``{plate: N}`` of every plate of the model.
    """

    def __init__(
        self,
        model: Callable,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        *,
        max_plate_nesting: int | None = None,
        exclude_sites: Iterable[str] = (),
        init_strategy: Callable = init_to_uniform,
        subsample_size: int | Mapping[str, int] | None = None,
        vectorize: str = "auto",
        owner: str = "Potential",
        capture: str | bool = "auto",
    ) -> None:
        self.capture_mode = capture_option(capture, owner)
        if vectorize not in _VECTORIZE:
            raise ValueError(f"vectorize must be one of {_VECTORIZE}, got {vectorize!r}")
        if max_plate_nesting is not None and (
            isinstance(max_plate_nesting, bool)
            or not isinstance(max_plate_nesting, int)
            or max_plate_nesting < 0
        ):
            raise ValueError(
                f"max_plate_nesting must be a non-negative int or None, got {max_plate_nesting!r}"
            )
        self.model = model
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.exclude_sites = frozenset(exclude_sites)
        self.init_strategy = init_strategy
        self.vectorize = vectorize
        self.owner = owner
        self._modes: dict[bool, str] = {}
        self._mode_reasons: dict[bool, str] = {}

        proto = self._prototype_trace()
        self._check_discrete(proto)
        self.plate_sizes = {
            name: int(node["fn"].size)
            for name, node in proto.nodes.items()
            if site_is_subsample(node) and name != _CHAIN_PLATE
        }
        self._sites: OrderedDict[str, _Site] = OrderedDict()
        start = 0
        for name, node in proto.nodes.items():
            if node["type"] != "sample" or node["is_observed"] or site_is_subsample(node):
                continue
            value = node["value"].detach()
            transform = biject_to(node["fn"].support).inv
            uvalue = transform(value)
            site = _Site(name, value.shape, len(node["fn"].batch_shape), uvalue.shape, transform,
                         start)
            start += site.numel
            self._sites[name] = site
        if not self._sites:
            raise ValueError(f"model {_model_name(model)!r} has no continuous latent sites to "
                             "sample")
        unknown = self.exclude_sites - set(proto.nodes)
        if unknown:
            raise ValueError(f"exclude_sites names unknown site(s) {sorted(unknown)}")
        self.dim = start
        self.site_slices = {k: s.slice for k, s in self._sites.items()}
        self.site_shapes = {k: s.shape for k, s in self._sites.items()}
        self.transforms = {k: s.transform for k, s in self._sites.items()}
        self.supports = {k: proto.nodes[k]["fn"].support for k in self._sites}
        self.observed_shapes = {
            name: tuple(node["fn"].event_shape)
            for name, node in proto.nodes.items()
            if node["type"] == "sample" and node["is_observed"] and not site_is_subsample(node)
        }
        first = next(iter(self._sites))
        self.dtype = proto.nodes[first]["value"].dtype
        self.device = proto.nodes[first]["value"].device
        inferred = infer_max_plate_nesting(proto)
        self.max_plate_nesting = inferred if max_plate_nesting is None else int(max_plate_nesting)
        self._proto_nodes = proto.nodes
        self._z0 = self.pack({k: proto.nodes[k]["value"].detach() for k in self._sites})
        self.minibatch_plates = self._resolve_minibatch(proto, subsample_size)
        self._chunk_cache: list | None = None
        self._param_sites = [k for k, node in proto.nodes.items() if node["type"] == "param"]
        self._captures: dict = {}  # cache key -> _CapturedPotential, or the reason it failed
        self._capture_uses: dict = {}  # cache key -> evaluations so far (captured at 2nd use)
        self._capture_logged: set = set()
        self._data_cache = None
        if any(not p.declared for p in self.minibatch_plates.values()):
            self._check_requested_minibatch()

    # ------------------------------------------------------------------ set-up
    def _prototype_trace(self):
        def trace():
            return poutine.trace(InitMessenger(self.init_strategy)(self.model)).get_trace(
                *self.model_args, **self.model_kwargs
            )

        with torch.no_grad(), poutine.block():
            try:
                try:
                    return trace()
                except ValueError as first:
                    found = re.search(r"cannot handle discrete sample site '([^']+)'", str(first))
                    if found:
                        raise ValueError(
                            f"latent site {found.group(1)!r} is discrete; the samplers support "
                            "continuous latent sites only (marginalise it out of the model, or "
                            "observe it)"
                        ) from None
                    # The initial draw may violate a distribution's constraints (e.g. a NaN
                    # pyro.factor there): the structure is all this trace is for, so trace it
                    # again without validation; genuine errors fail here too (or later, at
                    # initialisation, with the sites named).
                    with pyro.validation_enabled(False):
                        try:
                            return trace()
                        except Exception:  # noqa: BLE001 - the first error is the useful one
                            raise first from None
            except TypeError as e:
                if "subsample_size" in str(e) and "subsample_size" in self.model_kwargs:
                    raise TypeError(
                        f"model {_model_name(self.model)!r} does not take a subsample_size "
                        f"keyword ({str(e).splitlines()[0]}); ask the sampler for minibatches "
                        f"instead: {self.owner}(model, subsample_size=B) (the model indexes its "
                        "data with the plate's indices: `with pyro.plate('data', N) as idx: "
                        "... obs=y[idx]`)"
                    ) from e
                raise
            except NotImplementedError as e:
                if "does not support sampling" in str(e):
                    raise ValueError(
                        f"model {_model_name(self.model)!r} has a latent site whose distribution "
                        f"cannot be sampled ({str(e).splitlines()[0]}); give its values with "
                        "init_strategy=init_to_value(values={site: value}) (as for NUTS)"
                    ) from e
                raise

    @staticmethod
    def _check_discrete(trace) -> None:
        for name, node in trace.nodes.items():
            if node["type"] != "sample" or node["is_observed"] or site_is_subsample(node):
                continue
            fn = node["fn"]
            if fn.has_enumerate_support or getattr(fn.support, "is_discrete", False):
                raise ValueError(
                    f"latent site {name!r} is discrete ({type(fn).__name__}); the samplers "
                    "support continuous latent sites only (marginalise it out of the model, or "
                    "observe it)"
                )

    def _resolve_minibatch(self, proto, subsample_size) -> dict[str, MinibatchPlate]:
        owner = self.owner
        plates: dict[str, MinibatchPlate] = {}
        for name, node in proto.nodes.items():
            if site_is_subsample(node) and name != _CHAIN_PLATE:
                fn = node["fn"]
                if fn.subsample_size is not None and fn.subsample_size < fn.size:
                    plates[name] = MinibatchPlate(name, int(fn.size), int(fn.subsample_size), True)
        latent_plates = {
            f.name
            for node in proto.nodes.values()
            if node["type"] == "sample" and not node["is_observed"] and not site_is_subsample(node)
            for f in node["cond_indep_stack"]
        }
        self.data_plates = {
            p: n for p, n in self.plate_sizes.items()
            if p not in latent_plates and any(
                node["type"] == "sample" and node["is_observed"]
                and any(f.name == p for f in node["cond_indep_stack"])
                for node in proto.nodes.values()
            )
        }
        if subsample_size is not None:
            if isinstance(subsample_size, Mapping):
                requested = dict(subsample_size)
            else:
                data_plates = sorted(self.data_plates)
                if not data_plates:
                    raise ValueError(
                        f"{owner}(..., subsample_size={subsample_size!r}): model "
                        f"{_model_name(self.model)!r} has no data plate to subsample (a "
                        "pyro.plate whose sites are all observed); declare one, e.g. "
                        "`with pyro.plate('data', N) as idx: ... obs=y[idx]`"
                        + (f" (plates with latent sites: {sorted(latent_plates)})"
                           if latent_plates else "")
                    )
                if len(data_plates) > 1:
                    raise ValueError(
                        f"{owner}(..., subsample_size={subsample_size!r}) is ambiguous: the "
                        f"model has several data plates {data_plates}; pass "
                        f"subsample_size={{plate: size}}, e.g. "
                        f"{{{data_plates[0]!r}: {subsample_size!r}}}"
                    )
                requested = {data_plates[0]: subsample_size}
            for name, B in requested.items():
                if isinstance(B, bool) or not isinstance(B, int) or B < 1:
                    raise ValueError(
                        f"{owner}(..., subsample_size=...) must be a positive int or "
                        f"{{plate: positive int}}, got {B!r} for plate {name!r}"
                    )
                if name not in self.plate_sizes:
                    raise ValueError(
                        f"{owner}(..., subsample_size={{{name!r}: {B}}}): the model has no "
                        f"plate {name!r} (its plates: {sorted(self.plate_sizes)})"
                    )
                N = self.plate_sizes[name]
                if B > N:
                    raise ValueError(
                        f"{owner}(..., subsample_size={B}) is larger than the {N} rows of "
                        f"plate {name!r}"
                    )
                if name in plates and plates[name].subsample_size != B:
                    raise ValueError(
                        f"plate {name!r} declares subsample_size={plates[name].subsample_size} "
                        f"in the model, but {owner}(..., subsample_size={B}) asks for {B} rows; "
                        "give one of them"
                    )
                if B < N and name not in plates:
                    plates[name] = MinibatchPlate(name, N, B, False)
        for name, node in proto.nodes.items():
            if name not in self._sites:
                continue
            for f in node["cond_indep_stack"]:
                if f.name in plates:
                    raise ValueError(
                        f"latent site {name!r} lies inside the subsampled plate {f.name!r} "
                        f"(subsample_size={plates[f.name].subsample_size}); minibatch gradients "
                        "support global latent sites only. Subsample a plate that holds only "
                        f"observed sites, or run {owner} without subsample_size"
                    )
        for name, node in proto.nodes.items():
            if node["type"] == "sample" and not site_is_subsample(node):
                inside = [f.name for f in node["cond_indep_stack"] if f.name in plates]
                if len(inside) > 1:
                    raise ValueError(
                        f"site {name!r} lies inside several subsampled plates {inside}; "
                        "subsample one of them"
                    )
        return plates

    def _check_requested_minibatch(self) -> None:
        """Run the model once on a minibatch: a model that ignores the plate's indices fails
        here, with a message saying what to change."""
        rows = {k: torch.arange(p.subsample_size, device=self.device)
                for k, p in self.minibatch_plates.items()}
        values, _ = self._constrain(self._z0)
        try:
            lp = self._one({k: v[0] for k, v in values.items()}, rows, None, True)
        except Exception as e:
            sizes = {k: p.subsample_size for k, p in self.minibatch_plates.items()}
            raise ValueError(
                f"{self.owner}(..., subsample_size={sizes}): evaluating model "
                f"{_model_name(self.model)!r} on a minibatch failed ({_first_line(e)}). The model "
                "must index its data with the plate's indices: `with pyro.plate('data', N) as "
                "idx: ... obs=y[idx]`"
            ) from e
        del lp

    # ------------------------------------------------------------------ packing
    def unpack_unconstrained(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(C, D)`` flat vector -> ``{site: unconstrained value (C, *ushape)}``."""
        C = z.shape[0]
        return {k: z[:, s.slice].reshape((C,) + s.ushape) for k, s in self._sites.items()}

    def pack_unconstrained(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{site: unconstrained value (C, *ushape)}`` -> ``(C, D)``."""
        self._check_keys(values)
        first = next(iter(self._sites))
        v0 = values[first]
        C = v0.shape[0] if v0.dim() > len(self._sites[first].ushape) else 1
        return torch.cat([values[k].reshape(C, s.numel) for k, s in self._sites.items()], dim=-1)

    def unpack(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(C, D)`` -> ``{site: constrained value (C, *shape)}``."""
        self._check_z(z)
        u = self.unpack_unconstrained(z)
        return {k: s.transform.inv(u[k]) for k, s in self._sites.items()}

    def pack(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{site: constrained value (C, *shape)}`` -> flat unconstrained ``(C, D)``.

        A value without the leading chain dim (exactly the site's shape) is treated as ``C = 1``.
        """
        self._check_keys(values)
        out = []
        C = None
        for k, s in self._sites.items():
            v = torch.as_tensor(values[k], dtype=self.dtype, device=self.device)
            if v.shape == s.shape:
                v = v.unsqueeze(0)
            if v.shape[1:] != s.shape:
                raise ValueError(
                    f"site {k!r}: expected values of shape (C, *{tuple(s.shape)}), "
                    f"got {tuple(v.shape)}"
                )
            if C is None:
                C = v.shape[0]
            elif v.shape[0] != C:
                raise ValueError(f"site {k!r} has {v.shape[0]} chains, expected {C}")
            out.append(s.transform(v).reshape(C, s.numel))
        return torch.cat(out, dim=-1)

    def _check_keys(self, values) -> None:
        missing = set(self._sites) - set(values)
        if missing:
            raise ValueError(f"missing latent site(s) {sorted(missing)}")
        extra = set(values) - set(self._sites)
        if extra:
            raise ValueError(
                f"unknown latent site(s) {sorted(extra)}; expected {list(self._sites)}"
            )

    def _check_z(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[-1] != self.dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a (num_chains, {self.dim}) tensor, got {shape}")

    def _constrain(self, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(C, D)`` -> ``({site: constrained (C, *shape)}, log|det J| (C,))``."""
        C = z.shape[0]
        values = {}
        log_det = z.new_zeros(C)
        for k, s in self._sites.items():
            u = z[:, s.slice].reshape((C,) + s.ushape)
            inv = s.transform.inv  # unconstrained -> constrained
            x = inv(u)
            log_det = log_det + inv.log_abs_det_jacobian(u, x).reshape(C, -1).sum(-1)
            values[k] = x
        return values, log_det

    # ------------------------------------------------------------------ minibatches
    @property
    def subsampled(self) -> bool:
        """Whether any plate is subsampled (minibatch gradients)."""
        return bool(self.minibatch_plates)

    def draw_indices(
        self,
        num_chains: int,
        generator: torch.Generator | None = None,
        *,
        shared: bool = False,
        with_replacement: bool = False,
    ) -> dict[str, torch.Tensor] | None:
        """Draw ``{plate: row indices}`` for every subsampled plate (``None`` if there is none).

        Shapes are ``(num_chains, B)`` (each chain its own minibatch) or ``(1, B)``
        (``shared=True``: every chain the same rows). See :func:`draw_rows`.
        """
        if not self.minibatch_plates:
            return None
        rows = 1 if shared else num_chains
        return {
            name: draw_rows(p.size, p.subsample_size, rows, generator=generator,
                            device=self.device, with_replacement=with_replacement)
            for name, p in self.minibatch_plates.items()
        }

    def _full_data_chunks(self) -> list:
        """Rows and weights that cover the model-declared subsampled plates once."""
        if self._chunk_cache is None:
            declared = [p for p in self.minibatch_plates.values() if p.declared]
            K = max(math.ceil(p.size / p.subsample_size) for p in declared)
            chunks = []
            for k in range(K):
                rows, weights = {}, {}
                for p in declared:
                    r = torch.arange(k * p.subsample_size, (k + 1) * p.subsample_size,
                                     device=self.device)
                    valid = r < p.size
                    rows[p.name] = torch.where(valid, r, torch.zeros_like(r))
                    weights[p.name] = valid.to(self.dtype) * (p.subsample_size / p.size)
                chunks.append((rows, weights))
            self._chunk_cache = chunks
        return self._chunk_cache

    # ------------------------------------------------------------------ one chain
    def _one(self, values, rows, weights, include_global: bool) -> torch.Tensor:
        """Log joint (no Jacobian) of one chain: latents at their own shape, no extra plate."""
        cond = dict(values)
        if rows is not None:
            cond.update(rows)
        with poutine.block(), pyro.validation_enabled(False):
            tr = poutine.trace(poutine.condition(self.model, data=cond)).get_trace(
                *self.model_args, **self.model_kwargs
            )
        total = 0.0
        for name, lp, frames in self._scored_sites(tr, weights, include_global):
            for f in frames:
                lp = lp * weights[f.name].reshape((-1,) + (1,) * (-f.dim - 1))
            total = total + lp.sum()
        if not isinstance(total, torch.Tensor):
            total = torch.zeros((), dtype=self.dtype, device=self.device)
        return total

    def _scored_sites(self, tr, weights, include_global: bool):
        """``(name, scaled and masked log_prob, weighted plate frames)`` of the trace's observed
        sites that count: minibatch-weighted sites, and the others when ``include_global``
        (excluded sites and subsample sites skipped; a new latent site is an error)."""
        for name, node in tr.nodes.items():
            if node["type"] != "sample" or site_is_subsample(node):
                continue
            if not node["is_observed"]:
                self._raise_new_latent(name)
            if name in self.exclude_sites:
                continue
            frames = [f for f in node["cond_indep_stack"] if weights and f.name in weights]
            if not include_global and not frames:
                continue
            lp = scale_and_mask(node["fn"].log_prob(node["value"]), node["scale"], node["mask"])
            yield name, lp, frames

    def _raise_new_latent(self, name: str):
        raise ValueError(
            f"the model samples a latent site {name!r} that was not in its first trace "
            "(dynamic model structure is not supported: every run must have the same latent "
            "sites)"
        )

    # ------------------------------------------------------------------ chain plate
    def _chained(self, C: int) -> Callable:
        model, dim = self.model, -(self.max_plate_nesting + 1)

        def chained(*args, **kwargs):
            with pyro.plate(_CHAIN_PLATE, C, dim=dim):
                return model(*args, **kwargs)

        return chained

    def _plate(self, values, rows, weights, include_global: bool) -> torch.Tensor:
        """Log joint (no Jacobian) of ``C`` chains in one model run under the chain plate."""
        C = next(iter(values.values())).shape[0]
        mpn = self.max_plate_nesting
        cond = {}
        for k, s in self._sites.items():
            if s.batch_ndim > mpn:
                raise ValueError(
                    f"site {k!r} has batch shape with more dims than max_plate_nesting={mpn}"
                )
            cond[k] = values[k].reshape((C,) + (1,) * (mpn - s.batch_ndim) + tuple(s.shape))
        if rows is not None:
            cond.update(rows)
        with poutine.block(), pyro.validation_enabled(False):
            tr = poutine.trace(poutine.condition(self._chained(C), data=cond)).get_trace(
                *self.model_args, **self.model_kwargs
            )
        total = next(iter(values.values())).new_zeros(C)
        for name, lp, frames in self._scored_sites(tr, weights, include_global):
            if not isinstance(lp, torch.Tensor):
                lp = torch.as_tensor(lp, dtype=total.dtype, device=total.device)
            if lp.dim() > mpn + 1:
                raise ValueError(
                    f"site {name!r} has log_prob shape {tuple(lp.shape)}: more batch dims than "
                    f"max_plate_nesting={mpn} allows under the chain plate"
                )
            for f in frames:
                shape = [1] * (mpn + 1)
                shape[mpn + 1 + f.dim] = -1
                lp = lp * weights[f.name].reshape(shape)
            if lp.dim() == mpn + 1:
                lp = lp.reshape(lp.shape[0], -1).sum(-1)
            else:
                lp = lp.sum()
            total = total + lp
        return total

    # ------------------------------------------------------------------ dispatch
    def _batched(self, values, rows, weights, include_global, per_chain) -> torch.Tensor:
        """``(C,)`` log joint (no Jacobian) by the chosen vectorisation."""
        C = next(iter(values.values())).shape[0]
        if C == 1:
            r = None if rows is None else {k: v[0] if per_chain else v for k, v in rows.items()}
            return self._one({k: v[0] for k, v in values.items()}, r, weights,
                             include_global).reshape(1)
        mode = self.vectorization(per_chain)
        if mode == "plate":
            return self._plate(values, rows, weights, include_global)
        if mode == "vmap":
            fn = self._vmapped(per_chain, rows is not None, weights is not None, include_global)
            return fn(values, rows, weights)
        out = []
        for c in range(C):
            r = None if rows is None else {k: v[c] if per_chain else v for k, v in rows.items()}
            out.append(self._one({k: v[c] for k, v in values.items()}, r, weights,
                                 include_global))
        return torch.stack(out)

    def _vmapped(self, per_chain, has_rows, has_weights, include_global):
        def one(values, rows, weights):
            # Python checks of values cannot run under vmap: Pyro's validation of samples
            # would fail there (e.g. at NaN states) instead of giving NaN log-densities
            with pyro.validation_enabled(False), no_sample_validation():
                return self._one(values, rows, weights, include_global)

        in_dims = (0, 0 if (per_chain and has_rows) else None, None)
        return torch.func.vmap(one, in_dims=in_dims)

    def _log_prob(self, values, indices) -> torch.Tensor:
        """``(C,)`` model log joint at constrained ``values`` (no Jacobian); ``indices``:
        ``{plate: (C or 1, B)}`` minibatch rows, or ``None`` for the full data."""
        if indices is None:
            if not any(p.declared for p in self.minibatch_plates.values()):
                return self._batched(values, None, None, True, False)
            total = 0.0
            for k, (rows, weights) in enumerate(self._full_data_chunks()):
                total = total + self._batched(values, rows, weights, k == 0, False)
            return total
        if set(indices) != set(self.minibatch_plates):
            raise ValueError(
                f"indices must name the subsampled plates {sorted(self.minibatch_plates)}, got "
                f"{sorted(indices)}"
            )
        C = next(iter(values.values())).shape[0]
        per_chain = False
        for name, idx in indices.items():
            B = self.minibatch_plates[name].subsample_size
            if idx.dim() != 2 or idx.shape[1] != B or idx.shape[0] not in (1, C):
                raise ValueError(
                    f"indices[{name!r}] must have shape ({C}, {B}) or (1, {B}), got "
                    f"{tuple(idx.shape)}"
                )
            per_chain = per_chain or (idx.shape[0] == C and C > 1)
        if per_chain:
            rows = {k: v.expand(C, -1) for k, v in indices.items()}
        else:
            rows = {k: v[0] for k, v in indices.items()}
        return self._batched(values, rows, None, True, per_chain)

    # ------------------------------------------------------------------ vectorisation choice
    def vectorization(self, per_chain: bool = False) -> str:
        """How ``C > 1`` chains are evaluated: ``"plate"``, ``"vmap"`` or ``"loop"`` (decided at
        the first call and logged; ``per_chain``: for per-chain minibatch rows)."""
        if per_chain in self._modes:
            return self._modes[per_chain]
        if self.vectorize != "auto":
            if per_chain and self.vectorize == "plate":
                mode, reason = "vmap", "per-chain minibatches need per-chain rows"
                if self._check_vmap(per_chain) is not None:
                    mode, reason = "loop", reason + " and vmap failed"
            else:
                mode, reason = self.vectorize, f"vectorize={self.vectorize!r}"
                err = {"plate": lambda: self._check_plate(),
                       "vmap": lambda: self._check_vmap(per_chain),
                       "loop": lambda: None}[mode]()
                if err is not None:
                    raise ValueError(
                        f"{self.owner}(..., vectorize={mode!r}): model "
                        f"{_model_name(self.model)!r} cannot be evaluated that way ({err}); use "
                        "vectorize='auto' (it picks a path that works)"
                    )
        else:
            plate_err = None if per_chain else self._check_plate()
            if not per_chain and plate_err is None:
                mode, reason = "plate", "the model broadcasts over a chain dim left of its plates"
            else:
                why = ("per-chain minibatches (each chain its own rows)" if per_chain
                       else f"the model does not broadcast over a chain plate ({plate_err})")
                vmap_err = self._check_vmap(per_chain)
                if vmap_err is None:
                    mode, reason = "vmap", why
                else:
                    mode, reason = "loop", f"{why}; torch.func.vmap failed too ({vmap_err})"
        self._modes[per_chain] = mode
        self._mode_reasons[per_chain] = reason
        msg = (f"model {_model_name(self.model)!r}: {'per-chain minibatch ' if per_chain else ''}"
               f"chains are evaluated with {mode!r}: {reason}")
        (logger.warning if mode == "loop" and self.vectorize == "auto" else logger.info)(
            msg + (" (one model run per chain: slow for many chains)" if mode == "loop" else "")
        )
        return mode

    def _test_points(self) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(12345)
        noise = torch.randn((2, self.dim), generator=gen, dtype=self.dtype).to(self.device)
        return self._z0 + 0.1 * noise

    def _test_rows(self, per_chain: bool):
        if not self.minibatch_plates:
            return None
        out = {}
        for name, p in self.minibatch_plates.items():
            base = torch.arange(p.subsample_size, device=self.device)
            out[name] = (torch.stack([base, (base + 1) % p.size]) if per_chain else base)
        return out

    def _reference_values(self, z, rows, per_chain):
        """Single-chain evaluations at the test points: ``(U, grad U)``, or the error."""
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            values, log_det = self._constrain(zz)
            us = []
            for c in range(z.shape[0]):
                r = None if rows is None else {k: v[c] if per_chain else v
                                               for k, v in rows.items()}
                us.append(self._one({k: v[c] for k, v in values.items()}, r, None, True))
            u = torch.stack(us) + log_det
            g = _grad_or_zero(u, zz)
        return u.detach(), g

    def _compare(self, fn, per_chain: bool) -> str | None:
        z = self._test_points()
        rows = self._test_rows(per_chain)
        try:
            ref_u, ref_g = self._reference_values(z, rows, per_chain)
        except Exception as e:  # noqa: BLE001 - the single-chain path is reported elsewhere
            return f"single-chain evaluation failed: {_first_line(e)}"
        try:
            with torch.enable_grad():
                zz = z.detach().requires_grad_(True)
                values, log_det = self._constrain(zz)
                u = fn(values, rows) + log_det
                g = _grad_or_zero(u, zz)
        except Exception as e:  # noqa: BLE001 - any failure means: use another path
            return _first_line(e)
        rtol = 1e-4 if self.dtype == torch.float64 else 2e-3
        for what, a, b in (("potential", u.detach(), ref_u), ("gradient", g, ref_g)):
            if a.shape != b.shape:
                return f"{what} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
            scale = b.abs().nan_to_num(0.0, 0.0, 0.0).max().clamp_min(1.0)
            if not torch.allclose(a, b, rtol=rtol, atol=rtol * float(scale), equal_nan=True):
                return (f"the batched {what} differs from single-chain evaluations (max abs "
                        f"difference {float((a - b).abs().nan_to_num().max()):.3g})")
        return None

    def _check_plate(self) -> str | None:
        if any(s.batch_ndim > self.max_plate_nesting for s in self._sites.values()):
            return (f"a latent site has more batch dims than max_plate_nesting="
                    f"{self.max_plate_nesting}")
        return self._compare(lambda values, rows: self._plate(values, rows, None, True), False)

    def _check_vmap(self, per_chain: bool) -> str | None:
        def fn(values, rows):
            return self._vmapped(per_chain, rows is not None, False, True)(values, rows, None)

        return self._compare(fn, per_chain)

    # ------------------------------------------------------------------ evaluation
    def __call__(
        self, z: torch.Tensor, indices: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``U(z)`` of shape ``(C,)``, differentiable through ``z``.

        Args:
            z: ``(C, D)`` unconstrained points.
            indices: minibatch rows ``{plate: (C, B) or (1, B)}`` from :meth:`draw_indices`
                (the estimate is unbiased for ``U``), or ``None`` for the full data.
        """
        self._check_z(z)
        values, log_det = self._constrain(z)
        return -(self._log_prob(values, indices) + log_det)

    def value_and_grad(
        self, z: torch.Tensor, indices: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U(z) (C,), grad U(z) (C, D))``, both detached; arguments as :meth:`__call__`.

        A potential that does not depend on ``z`` at all (e.g. every term excluded) has a zero
        gradient. With ``capture`` on (see the module docstring) the evaluation runs as a
        captured graph from the second call with the same shapes on.
        """
        self._check_z(z)
        if is_tracing():  # inside a capture (e.g. a block of sampler steps): record eager code
            if self._param_sites:
                raise CaptureError(self._param_reason())
            return self._value_and_grad_eager(z, indices)
        if self.capture_mode != "off":
            key = self._capture_key(z, indices)
            entry = self._captures.get(key)
            if entry is not None:
                if isinstance(entry, _CapturedPotential):
                    return entry(z, indices, self._data_inputs()[0])
            else:
                uses = self._capture_uses.get(key, 0) + 1
                self._capture_uses[key] = uses
                if uses >= 2:
                    reference = self._value_and_grad_eager(z, indices)
                    self._capture_key_now(key, z, indices, self.capture_mode, reference)
                    return reference
        return self._value_and_grad_eager(z, indices)

    def _value_and_grad_eager(self, z, indices):
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            u = self(zz, indices)
            g = _grad_or_zero(u, zz)
        return u.detach(), g.detach()

    # ------------------------------------------------------------------ capture
    def capture(
        self,
        z: torch.Tensor,
        indices: dict[str, torch.Tensor] | None = None,
        *,
        backend: str | None = None,
    ) -> Callable:
        """Capture :meth:`value_and_grad` now for the shapes of ``z (C, D)`` and ``indices``
        (see the module docstring) and return it: ``f(z, indices) -> (U, grad U)``, checked
        against eager evaluation at ``z``. :meth:`value_and_grad` uses it from now on for calls
        with these shapes.

        Args:
            backend: ``"auto"``, ``"script"``, ``"fx"`` or ``"inductor"`` (default: the
                potential's ``capture`` option, ``"auto"`` if that is ``"off"``).

        Raises:
            mcmc.capture.CaptureError: the model cannot be captured (the reason says why).
        """
        self._check_z(z)
        backend = self.capture_mode if backend is None else capture_option(backend)
        backend = "auto" if backend == "off" else backend
        key = self._capture_key(z, indices)
        reference = self._value_and_grad_eager(z, indices)  # validates z/indices, decides paths
        self._captures.pop(key, None)
        entry = self._capture_key_now(key, z, indices, backend, reference, log=False)
        if not isinstance(entry, _CapturedPotential):
            raise CaptureError(entry)

        def captured(z, indices=None):
            return entry(z, indices, self._data_inputs()[0])

        return captured

    def captured_graph(self, z: torch.Tensor, indices: dict[str, torch.Tensor] | None = None):
        """The :class:`mcmc.capture.CapturedGraph` serving calls shaped like ``(z, indices)``,
        or ``None`` (not captured, or not possible)."""
        entry = self._captures.get(self._capture_key(z, indices))
        return entry.graph if isinstance(entry, _CapturedPotential) else None

    def clear_captures(self) -> None:
        """Forget every captured graph. Graphs freeze the model's Python-level choices and
        constants (e.g. a ``poutine.scale`` factor): call this after changing them."""
        self._captures.clear()
        self._capture_uses.clear()

    @property
    def capture_info(self) -> dict[str, str]:
        """For each captured cache key (described in words): the backend running it, or
        ``"eager: <why capture was not possible>"``."""
        out = {}
        for key, entry in self._captures.items():
            desc = f"{key[0][0]} chain(s)" + (
                "" if key[3] is None else ", rows " + ", ".join(f"{n}: {tuple(s)}"
                                                                 for n, s, *_ in key[3]))
            out[desc] = (entry.graph.backend if isinstance(entry, _CapturedPotential)
                         else f"eager: {entry}")
        return out

    def _data_inputs(self):
        """The model's tensor arguments (graph inputs), how to rebuild the arguments from
        them, and the part of the cache key they determine; cached per argument objects."""
        cache = self._data_cache
        if cache is not None and cache[0] is self.model_args and cache[1] is self.model_kwargs:
            return cache[2]
        leaves, spec = pytree.tree_flatten((self.model_args, self.model_kwargs))
        positions = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        tensors = [leaves[i] for i in positions]
        others = []
        for i, v in enumerate(leaves):
            if i in positions:
                continue
            try:
                hash(v)
                others.append((type(v).__name__, v))
            except TypeError:
                others.append((type(v).__name__, id(v)))
        key = (str(spec), tuple(others),
               tuple((tuple(t.shape), t.dtype, t.device) for t in tensors))

        def rebuild(new_tensors):
            out = list(leaves)
            for i, t in zip(positions, new_tensors):
                out[i] = t
            return pytree.tree_unflatten(out, spec)

        info = (tensors, rebuild, key)
        self._data_cache = (self.model_args, self.model_kwargs, info)
        return info

    def _capture_key(self, z, indices):
        idx = None if indices is None else tuple(
            (name, tuple(v.shape), v.dtype, v.device) for name, v in sorted(indices.items()))
        # the vectorisation path is part of the graph; it is decided once per potential
        return (tuple(z.shape), z.dtype, z.device, idx, self._data_inputs()[2])

    def _capture_key_now(self, key, z, indices, backend, reference, log: bool = True):
        """Capture one cache key (or record why not, logging it once); returns the entry."""
        try:
            entry = self._capture_graph(z, indices, backend, reference)
        except CaptureError as e:
            entry = e.reason
            if log and entry not in self._capture_logged:
                self._capture_logged.add(entry)
                (logger.warning if backend != "auto" else logger.info)(
                    f"model {_model_name(self.model)!r}: the potential is evaluated eagerly "
                    f"(capture is not possible: {entry})"
                )
        else:
            logger.debug(f"model {_model_name(self.model)!r}: potential captured for "
                         f"{tuple(z.shape)} chains x rows "
                         f"{None if indices is None else {k: tuple(v.shape) for k, v in indices.items()}} "
                         f"({entry.graph.backend}; {entry.graph.num_gathers} row gather(s) as "
                         f"index_select{'; ' + '; '.join(entry.graph.notes) if entry.graph.notes else ''})")
        self._captures[key] = entry
        return entry

    def _param_reason(self) -> str:
        return (f"pyro.param site(s) {self._param_sites} are not lifted to graph inputs: their "
                "values would be frozen into the graph")

    def _capture_graph(self, z, indices, backend, reference):
        if self._param_sites:
            raise CaptureError(self._param_reason())
        if indices is None and any(p.declared for p in self.minibatch_plates.values()):
            chunks = self._full_data_chunks()
            if len(chunks) > _MAX_CAPTURED_CHUNKS:
                raise CaptureError(f"the full-data potential is evaluated in {len(chunks)} "
                                   "minibatch chunks (too large a graph)")
        names = [] if indices is None else sorted(indices)
        data, rebuild, _ = self._data_inputs()
        n_idx = len(names)

        def fn(zz, *rest):
            pot = copy.copy(self)
            pot.model_args, pot.model_kwargs = rebuild(rest[n_idx:])
            rows = None if indices is None else dict(zip(names, rest[:n_idx]))
            return pot._value_and_grad_eager(zz, rows)

        idx = [indices[k] for k in names]
        graph = capture_graph(fn, [z, *idx, *data], backend=backend,
                              gather_inputs=range(1, 1 + n_idx))
        entry = _CapturedPotential(graph, names)
        got = entry(z, indices, data)
        rtol = 1e-4 if z.dtype != torch.float64 else 1e-9
        for what, a, b in zip(("potential", "gradient"), got, reference):
            scale = b.abs().nan_to_num(0.0, 0.0, 0.0).max().clamp_min(1.0)
            if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=rtol * float(scale),
                                                        equal_nan=True):
                diff = float((a - b).abs().nan_to_num().max()) if a.shape == b.shape else "n/a"
                raise CaptureError(
                    f"the captured {what} differs from eager evaluation (max abs difference "
                    f"{diff}); does the model keep Python state between runs?"
                )
        return entry

    def log_density(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full-data log joint ``log p(D, x)`` at *constrained* latent values
        ``{site: (C, *shape)}``, shape ``(C,)``, differentiable in the values. No Jacobian term:
        for samplers that handle the constraint themselves (e.g. mirror maps,
        :class:`mcmc.coin_msvgd.CoinMSVGD`)."""
        self._check_keys(values)
        first = next(iter(self._sites))
        C = values[first].shape[0]
        for k, s in self._sites.items():
            v = values[k]
            if v.shape[1:] != s.shape or v.shape[0] != C:
                raise ValueError(
                    f"log_density: site {k!r} has shape {tuple(v.shape)}, expected "
                    f"({C}, *{tuple(s.shape)})"
                )
        return self._log_prob(dict(values), None)

    # ------------------------------------------------------------------ initialisation
    def initial_params(
        self,
        num_chains: int,
        init_strategy: Callable | None = None,
        max_tries: int = 100,
    ) -> torch.Tensor:
        """Initial points ``(num_chains, D)`` (unconstrained) drawn with a Pyro init strategy
        (default: the potential's ``init_strategy``), redrawn per chain until ``U`` and its
        full-data gradient are finite. Raises ``ValueError`` naming the model sites whose
        log-density is not finite otherwise.

        ``init_to_uniform`` (the default) is drawn directly in unconstrained space, so the points
        do not depend on the vectorisation; other strategies run the model once under the chain
        plate (or once per chain when the model does not broadcast)."""
        if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"num_chains must be a positive int, got {num_chains!r}")
        strategy = self.init_strategy if init_strategy is None else init_strategy
        z = self._draw_init(num_chains, strategy)
        ok = torch.zeros(num_chains, dtype=torch.bool, device=self.device)
        for attempt in range(max_tries):
            u, g = self.value_and_grad(z)
            ok = torch.isfinite(u) & torch.isfinite(g).all(-1)
            if bool(ok.all()):
                return z
            if attempt == 0 and self._data_is_nonfinite(z[~ok][:1]):
                break
            fresh = self._draw_init(num_chains, strategy)
            z = torch.where(ok.unsqueeze(-1), z, fresh)
        bad = torch.nonzero(~ok).flatten().tolist()
        sites = self.nonfinite_sites(z[bad[:1]])
        raise ValueError(
            f"could not find finite initial parameters for chain(s) {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''} of model {_model_name(self.model)!r}: the "
            f"log-density of site(s) {sites} is NaN/inf there. Check the model's data (NaN/inf "
            "in observed values?) and parameters, or use another init_strategy"
        )

    def _data_is_nonfinite(self, z: torch.Tensor) -> bool:
        """True if an observed site with a non-finite log-density also has a non-finite observed
        value (new initial points cannot fix that)."""
        sites = self.nonfinite_sites(z)
        for name in sites:
            node = self._proto_nodes.get(name)
            if node is not None and node["is_observed"]:
                v = node["value"]
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(
                    torch.isfinite(v).all()
                ):
                    return True
        return False

    def _draw_init(self, C: int, init_strategy: Callable) -> torch.Tensor:
        radius = _uniform_radius(init_strategy)
        if radius is not None:
            # init_to_uniform is uniform on (-radius, radius) in unconstrained space: draw it
            # directly, the same points whatever the vectorisation (and C model runs cheaper)
            u = torch.rand((C, self.dim), dtype=self.dtype, device=self.device)
            return (2 * u - 1) * radius
        if C > 1 and self.vectorization(False) == "plate":
            # The chain plate sits *inside* InitMessenger so that init strategies see the
            # chain-broadcast distributions and draw a different point per chain.
            with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
                tr = poutine.trace(InitMessenger(init_strategy)(self._chained(C))).get_trace(
                    *self.model_args, **self.model_kwargs
                )
            values = {}
            for k, s in self._sites.items():
                v = tr.nodes[k]["value"].detach()
                full = (C,) + (1,) * (self.max_plate_nesting - s.batch_ndim) + tuple(s.shape)
                v = v.expand(torch.broadcast_shapes(v.shape, full)) if v.dim() <= len(full) else v
                values[k] = v.reshape((C,) + tuple(s.shape))
            return self.pack(values)
        out = []
        for _ in range(C):
            with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
                tr = poutine.trace(InitMessenger(init_strategy)(self.model)).get_trace(
                    *self.model_args, **self.model_kwargs
                )
            out.append(self.pack({k: tr.nodes[k]["value"].detach() for k in self._sites}))
        return torch.cat(out)

    # ------------------------------------------------------------------ error reports
    def nonfinite_sites(self, z: torch.Tensor) -> list[str]:
        """Names of the model sites (and ``"log|det J| of <site>"`` terms) whose full-data
        log-density is NaN/inf for some chain of ``z`` -- for error messages."""
        self._check_z(z)
        bad: list[str] = []
        chunks = ([(None, None)] if not any(p.declared for p in self.minibatch_plates.values())
                  else self._full_data_chunks())
        with torch.no_grad():
            u = self.unpack_unconstrained(z)
            for k, s in self._sites.items():
                x = s.transform.inv(u[k])
                if not bool(torch.isfinite(s.transform.inv.log_abs_det_jacobian(u[k], x)).all()):
                    bad.append(f"log|det J| of {k}")
            values, _ = self._constrain(z)
            for c in range(z.shape[0]):
                for rows, _w in chunks:
                    cond = {k: v[c] for k, v in values.items()}
                    if rows is not None:
                        cond.update(rows)
                    with poutine.block(), pyro.validation_enabled(False):
                        tr = poutine.trace(poutine.condition(self.model, data=cond)).get_trace(
                            *self.model_args, **self.model_kwargs
                        )
                    for name, node in tr.nodes.items():
                        if (node["type"] != "sample" or site_is_subsample(node)
                                or name in self.exclude_sites or name in bad):
                            continue
                        lp = node["fn"].log_prob(node["value"])
                        if not bool(torch.isfinite(torch.as_tensor(lp)).all()):
                            bad.append(name)
        return bad

    def nonfinite_report(
        self, z: torch.Tensor, u: torch.Tensor, g: torch.Tensor
    ) -> tuple[list[int], list[str], list[str]]:
        """For error messages of samplers: ``(chains, latent_sites, model_sites)`` where the
        state ``z (C, D)``, potential ``u (C,)`` or gradient ``g (C, D)`` is NaN/inf --
        the chains affected, the latent sites whose state/gradient entries are non-finite and
        the model sites (:meth:`nonfinite_sites`) whose log-density is non-finite there."""
        bad = ~(torch.isfinite(u) & torch.isfinite(g).all(-1) & torch.isfinite(z).all(-1))
        chains = torch.nonzero(bad).flatten().tolist()
        zb, gb = z[bad], g[bad]
        latent = [
            k
            for k, sl in self.site_slices.items()
            if bool((~torch.isfinite(gb[:, sl])).any() | (~torch.isfinite(zb[:, sl])).any())
        ]
        model_sites = self.nonfinite_sites(torch.where(torch.isfinite(zb[:1]), zb[:1], 0.0))
        return chains, latent, model_sites
