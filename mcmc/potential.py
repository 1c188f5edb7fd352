"""Potential energy of a Pyro model in unconstrained space, vectorised over chains.

This is the one potential layer shared by every sampler in :mod:`mcmc` (SGLD family, federated
SGLD, proximal/Bregman Langevin, coin sampling).

Definition
----------
Let ``x = (x_1, ..., x_K)`` be the model's continuous latent sites (constrained values),
``T_k = biject_to(support_k)`` the bijection from unconstrained reals to the support of site
``k`` (the same transforms :func:`pyro.infer.mcmc.util.initialize_model` uses) and
``z = (z_1, ..., z_K)``, ``x_k = T_k(z_k)``, flattened and concatenated into one vector of length
``D = dim`` (the order and position of each site is given by :attr:`Potential.site_slices`).
The potential energy is

.. math::

    U(z) = -\\log p(\\mathcal{D}, x) - \\sum_k \\log |\\det J_{T_k}(z_k)|,

where ``log p(D, x)`` is the model's log joint density: the sum of ``log_prob`` of every sample
site (latent and observed) with Pyro's ``scale`` and ``mask`` applied. ``exp(-U)`` is therefore
proportional to the posterior density of ``z`` in unconstrained space, and gradient-based
samplers target it directly. Sites named in ``exclude_sites`` contribute no ``log_prob`` term
(their Jacobian term stays), so a proximal sampler can treat them separately.

Minibatches
-----------
``value_and_grad(z, subsample_size=B)`` evaluates the model with ``B`` rows of each subsampled
data plate. The row indices are drawn uniformly *without replacement* (like Pyro's own plate; or
with replacement, ``with_replacement=True``, which is cheaper for huge data) from a
``torch.Generator`` when one is given, and handed to the plate by conditioning its subsample site.
Pyro's plate then scales every log-likelihood term in it by ``N / B``, so ``U_B(z)`` and its
gradient are unbiased estimators of ``U(z)`` and ``grad U(z)``. The model must accept the keyword
``subsample_size`` and pass it to its data plate (the zoo convention); latent sites *inside* a
subsampled plate (local latents) are not supported with subsampling.

Chains
------
``z`` has shape ``(C, D)``: ``C`` chains on the leading dim. The model runs **once** per
evaluation, inside ``pyro.plate("_chains", C, dim=-(max_plate_nesting + 1))`` and conditioned on
the chain-batched latent values, so the model must broadcast over that extra left batch dim (zoo
models do). Chains are independent, so ``grad`` of ``U.sum()`` is the per-chain gradient.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.infer.mcmc.util import initialize_model
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

__all__ = ["Potential", "check_finite", "infer_max_plate_nesting"]

_CHAIN_PLATE = "_chains"


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
        chain_bad = bad.reshape(tensor.shape[0], -1).any(-1) if tensor.dim() >= 1 else bad
        chains = torch.nonzero(chain_bad).flatten().tolist()
        shown = chains[:10]
        parts.append(f"chain(s) {shown}{' ...' if len(chains) > 10 else ''}")
    if site_names is not None and tensor.dim() >= 1:
        col_bad = bad.reshape(-1, tensor.shape[-1]).any(0)
        if isinstance(site_names, dict):
            sites = [s for s, sl in site_names.items() if bool(col_bad[sl].any())]
        else:
            sites = [s for s, b in zip(site_names, col_bad.tolist()) if b]
        parts.append(f"site(s) {sites}")
    kinds = []
    if bool(torch.isnan(tensor).any()):
        kinds.append("NaN")
    if bool(torch.isinf(tensor).any()):
        kinds.append("inf")
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
            if f.dim is not None
        ]
        + [0]
    )


class _Site:
    """Bookkeeping for one latent site: shapes, transform and position in the flat vector."""

    __slots__ = ("batch_ndim", "name", "numel", "shape", "slice", "transform", "ushape")

    def __init__(self, name, shape, batch_ndim, ushape, transform, start):
        self.name = name
        self.shape = torch.Size(shape)  # constrained value shape (batch + event)
        self.batch_ndim = batch_ndim  # plate batch dims of the site's distribution
        self.ushape = torch.Size(ushape)  # unconstrained value shape
        self.transform = transform  # constrained -> unconstrained (as initialize_model gives)
        self.numel = int(math.prod(self.ushape))
        self.slice = slice(start, start + self.numel)


class Potential:
    """Potential energy ``U(z)`` (see the module docstring) of a Pyro model, for ``C`` chains.

    Args:
        model: a Pyro model with continuous latent sites.
        model_args, model_kwargs: the model's data (the **full** data: initialisation and
            transforms are computed from a full-data run).
        max_plate_nesting: number of nested plates in the model; guessed from a trace if omitted.
        exclude_sites: latent/observed sites whose ``log_prob`` is left out of ``U``.

    Attributes:
        dim: length ``D`` of the flat unconstrained vector.
        site_slices: ``{site: slice}`` positions of each site in the flat vector.
        transforms: ``{site: transform}`` constrained -> unconstrained (Pyro's MCMC convention).
        site_shapes: ``{site: shape}`` of the constrained values (without the chain dim).
    """

    def __init__(
        self,
        model: Callable,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        *,
        max_plate_nesting: int | None = None,
        exclude_sites: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        if "subsample_size" in self.model_kwargs:
            raise ValueError(
                "model_kwargs must describe the full data: pass subsample_size to "
                "value_and_grad(z, subsample_size=B), not in model_kwargs"
            )
        self.exclude_sites = frozenset(exclude_sites)

        # Discrete latents would be enumerated away by initialize_model, which this potential
        # does not do: refuse them first, with a clear message.
        with torch.no_grad(), poutine.block():
            pre = poutine.trace(model).get_trace(*self.model_args, **self.model_kwargs)
        for name, node in pre.nodes.items():
            if node["type"] != "sample" or node["is_observed"]:
                continue
            fn = node["fn"]
            if not isinstance(fn, _Subsample) and (
                fn.has_enumerate_support or getattr(fn.support, "is_discrete", False)
            ):
                raise ValueError(
                    f"latent site {name!r} is discrete ({type(fn).__name__}); Potential supports "
                    "continuous latent sites only (marginalise it out of the model, or observe it)"
                )
        # Full-data run: validates the model and gives Pyro's transforms (initialize_model
        # refuses subsampled plates, which is why minibatches are only used later, under the
        # chain plate).
        # Its search for valid initial points is skipped (we pass the prior draw of the first
        # trace): chains are initialised later, vectorised, by ``initial_params``.
        start_params = {
            name: biject_to(node["fn"].support).inv(node["value"].detach())
            for name, node in pre.nodes.items()
            if node["type"] == "sample"
            and not node["is_observed"]
            and not isinstance(node["fn"], _Subsample)
        }
        with poutine.block():
            _, _, transforms, proto = initialize_model(
                model,
                self.model_args,
                self.model_kwargs,
                max_plate_nesting=max_plate_nesting,
                initial_params=start_params,
            )
        if max_plate_nesting is None:
            max_plate_nesting = infer_max_plate_nesting(proto)
        self.max_plate_nesting = int(max_plate_nesting)
        self._sites: OrderedDict[str, _Site] = OrderedDict()
        start = 0
        for name, node in proto.nodes.items():
            if node["type"] != "sample" or node["is_observed"]:
                continue
            fn = node["fn"]
            if isinstance(fn, _Subsample):
                continue
            if fn.has_enumerate_support or getattr(fn.support, "is_discrete", False):
                raise ValueError(
                    f"latent site {name!r} is discrete ({type(fn).__name__}); Potential supports "
                    "continuous latent sites only (marginalise it out of the model, or observe it)"
                )
            value = node["value"].detach()
            batch_ndim = len(fn.batch_shape)
            if batch_ndim > self.max_plate_nesting:
                raise ValueError(
                    f"site {name!r} has batch shape {tuple(fn.batch_shape)} with more dims than "
                    f"max_plate_nesting={self.max_plate_nesting}; declare its batch dims with "
                    "pyro.plate or .to_event(), or pass a larger max_plate_nesting"
                )
            uvalue = transforms[name](value)
            site = _Site(name, value.shape, batch_ndim, uvalue.shape, transforms[name], start)
            start += site.numel
            self._sites[name] = site
        if not self._sites:
            raise ValueError("the model has no continuous latent sites to sample")
        unknown = self.exclude_sites - set(proto.nodes)
        if unknown:
            raise ValueError(f"exclude_sites names unknown site(s) {sorted(unknown)}")
        self.dim = start
        self._plate_sizes = {
            f.name: f.size
            for node in proto.nodes.values()
            if node["type"] == "sample"
            for f in node["cond_indep_stack"]
            if f.size is not None and f.size > 0
        }
        self.site_slices = {k: s.slice for k, s in self._sites.items()}
        self.site_shapes = {k: s.shape for k, s in self._sites.items()}
        self.transforms = {k: s.transform for k, s in self._sites.items()}
        self._proto_nodes = proto.nodes
        proto_value = next(iter(proto.nodes[k]["value"] for k in self._sites))
        self.dtype = proto_value.dtype
        self.device = proto_value.device
        self._subsample_plates: dict[int, dict[str, int]] = {}

    # ------------------------------------------------------------------ packing
    def unpack_unconstrained(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(C, D)`` flat vector -> ``{site: unconstrained value (C, *ushape)}``."""
        C = z.shape[0]
        return {k: z[:, s.slice].reshape((C,) + s.ushape) for k, s in self._sites.items()}

    def pack_unconstrained(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{site: unconstrained value (C, *ushape)}`` -> ``(C, D)``."""
        self._check_keys(values)
        first = values[next(iter(self._sites))]
        C = first.shape[0] if first.dim() > len(self._sites[next(iter(self._sites))].ushape) else 1
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
                    f"pack: site {k!r} has shape {tuple(v.shape)}, expected (C, *{tuple(s.shape)})"
                )
            C = v.shape[0] if C is None else C
            out.append(s.transform(v).reshape(v.shape[0], s.numel))
        return torch.cat(out, dim=-1)

    def _check_keys(self, values: dict) -> None:
        missing = set(self._sites) - set(values)
        if missing:
            raise ValueError(f"missing value(s) for latent site(s) {sorted(missing)}")

    def _check_z(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[-1] != self.dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a (num_chains, {self.dim}) tensor, got {shape}")

    def _chained(self, C: int) -> Callable:
        """The model run inside ``pyro.plate("_chains", C, dim=-(max_plate_nesting + 1))``."""
        model, dim = self.model, -(self.max_plate_nesting + 1)

        def chained(*args, **kwargs):
            with pyro.plate(_CHAIN_PLATE, C, dim=dim):
                return model(*args, **kwargs)

        return chained

    # ------------------------------------------------------------------ initialisation
    def initial_params(
        self,
        num_chains: int,
        init_strategy: Callable = init_to_uniform,
        *,
        max_tries: int = 100,
    ) -> torch.Tensor:
        """Initial points ``(num_chains, D)`` from a Pyro init strategy, vectorised over chains.

        The model runs under the chain plate with :class:`~pyro.infer.autoguide.initialization.
        InitMessenger`; chains whose potential or gradient is not finite are redrawn (up to
        ``max_tries`` rounds), as in :func:`pyro.infer.mcmc.util.initialize_model`.
        """
        if not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"num_chains must be a positive int, got {num_chains!r}")
        z = self._draw_init(num_chains, init_strategy)
        for _ in range(max_tries):
            u, g = self.value_and_grad(z)
            ok = torch.isfinite(u) & torch.isfinite(g).all(-1)
            if bool(ok.all()):
                return z
            fresh = self._draw_init(num_chains, init_strategy)
            z = torch.where(ok.unsqueeze(-1), z, fresh)
        raise ValueError(
            "could not find finite initial parameters for every chain in "
            f"{max_tries} tries; check the model or use another init_strategy"
        )

    def _draw_init(self, C: int, init_strategy: Callable) -> torch.Tensor:
        # The chain plate must sit *inside* InitMessenger so that init strategies see the
        # chain-broadcast distributions and draw a different point per chain.
        with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
            tr = poutine.trace(InitMessenger(init_strategy)(self._chained(C))).get_trace(
                *self.model_args, **self.model_kwargs
            )
        values = {}
        for k, s in self._sites.items():
            v = tr.nodes[k]["value"].detach()
            # Broadcast to (C, 1.., *shape) then drop the padding dims.
            full = (C,) + (1,) * (self.max_plate_nesting - s.batch_ndim) + tuple(s.shape)
            v = v.expand(torch.broadcast_shapes(v.shape, full)) if v.dim() <= len(full) else v
            values[k] = v.reshape((C,) + tuple(s.shape))
        return self.pack(values)

    # ------------------------------------------------------------------ evaluation
    def _subsample_info(self, subsample_size: int) -> dict[str, int]:
        """Names and full sizes of the plates that ``subsample_size`` subsamples (cached)."""
        if subsample_size in self._subsample_plates:
            return self._subsample_plates[subsample_size]
        if not isinstance(subsample_size, int) or subsample_size < 1:
            raise ValueError(f"subsample_size must be a positive int, got {subsample_size!r}")
        kwargs = dict(self.model_kwargs, subsample_size=subsample_size)
        try:
            with torch.no_grad(), poutine.block():
                tr = poutine.trace(self.model).get_trace(*self.model_args, **kwargs)
        except ValueError as e:
            if "subsample_size does not match" in str(e):
                raise ValueError(
                    f"subsample_size={subsample_size} is larger than the data plate(s) "
                    f"{self._plate_sizes} of the model"
                ) from e
            raise
        except TypeError as e:
            raise TypeError(
                "subsampling needs a model that takes a `subsample_size` keyword and passes it "
                f"to its data plate; calling it with subsample_size={subsample_size} failed: {e}"
            ) from e
        plates = {}
        for name, node in tr.nodes.items():
            if node["type"] == "sample" and isinstance(node["fn"], _Subsample):
                fn = node["fn"]
                if fn.subsample_size is not None and fn.subsample_size > fn.size:
                    raise ValueError(
                        f"subsample_size={fn.subsample_size} is larger than the {fn.size} rows "
                        f"of plate {name!r}"
                    )
                if fn.subsample_size is not None and fn.subsample_size < fn.size:
                    plates[name] = fn.size
        for name in self._sites:
            for f in tr.nodes[name]["cond_indep_stack"]:
                if f.name in plates:
                    raise ValueError(
                        f"latent site {name!r} lies inside the subsampled plate {f.name!r}; "
                        "minibatch potentials support global latent sites only"
                    )
        self._subsample_plates[subsample_size] = plates
        return plates

    def minibatch_indices(
        self,
        num_chains: int,
        subsample_size: int,
        *,
        generator: torch.Generator | None = None,
        with_replacement: bool = False,
        shared: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Draw ``{plate: (num_chains, subsample_size) row indices}`` for each subsampled plate.

        Each chain gets its own minibatch (``shared=False``) or all chains share one. Rows are
        uniform without replacement within a chain's minibatch (``with_replacement=False``) or
        independent uniform draws (``True``; O(B) instead of O(N) per chain).
        """
        plates = self._subsample_info(subsample_size)
        B, rows = subsample_size, 1 if shared else num_chains
        out = {}
        for name, size in plates.items():
            if with_replacement:
                idx = torch.randint(size, (rows, B), generator=generator, device=self.device)
            elif rows == 1:
                idx = torch.randperm(size, generator=generator, device=self.device)[:B][None]
            else:
                keys = torch.rand(rows, size, generator=generator, device=self.device)
                idx = keys.argsort(-1)[:, :B]
            out[name] = idx.expand(num_chains, B)
        return out

    def _log_joint(
        self,
        z: torch.Tensor,
        subsample_size: int | None,
        indices: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        C = z.shape[0]
        mpn = self.max_plate_nesting
        u = self.unpack_unconstrained(z)
        cond = {}
        log_det = z.new_zeros(C)
        for k, s in self._sites.items():
            inv = s.transform.inv  # unconstrained -> constrained
            x = inv(u[k])
            ladj = inv.log_abs_det_jacobian(u[k], x)
            log_det = log_det + ladj.reshape(C, -1).sum(-1)
            cond[k] = x.reshape((C,) + (1,) * (mpn - s.batch_ndim) + tuple(s.shape))
        kwargs = self.model_kwargs
        weights: dict[str, torch.Tensor] = {}
        if subsample_size is not None:
            plates = self._subsample_info(subsample_size)
            if indices is None:
                raise ValueError("indices are needed with subsample_size")
            size_in_model = None
            for name in plates:
                idx = indices[name]
                if idx.shape != (C, subsample_size):
                    raise ValueError(
                        f"indices[{name!r}] must have shape ({C}, {subsample_size}), "
                        f"got {tuple(idx.shape)}"
                    )
                if C == 1 or bool((idx == idx[:1]).all()):
                    cond[name] = idx[0]  # one minibatch for every chain: Pyro scales by N / B
                    used = subsample_size
                else:
                    # Independent minibatches per chain: evaluate the union U of the rows once
                    # and weight row j of chain c by count_c(j) * |U| / B; with the plate's own
                    # N / |U| scale this is chain c's N / B minibatch estimate.
                    union, inverse = torch.unique(idx, return_inverse=True)
                    counts = torch.zeros(C, union.numel(), dtype=z.dtype, device=z.device)
                    counts.scatter_add_(1, inverse, torch.ones_like(inverse, dtype=z.dtype))
                    cond[name] = union
                    used = union.numel()
                    weights[name] = counts * (used / subsample_size)
                if size_in_model is not None and used != size_in_model:
                    raise ValueError(
                        "several subsampled plates need per-chain minibatches of "
                        "one size; pass shared minibatches"
                    )
                size_in_model = used
            kwargs = dict(kwargs, subsample_size=size_in_model)
        model = poutine.condition(self._chained(C), data=cond)
        if weights:
            model = _RowWeights(weights, mpn)(model)
        # The model was validated on the full data at construction; here validation is off so
        # that a NaN/inf reaches U and its gradient (where samplers detect it and name the
        # site) instead of failing inside a distribution constructor -- and it is faster.
        with poutine.block(), pyro.validation_enabled(False):
            tr = poutine.trace(model).get_trace(*self.model_args, **kwargs)
            tr.compute_log_prob(site_filter=lambda name, site: name not in self.exclude_sites)
        return self._sum_log_prob(tr, log_det)

    def _sum_log_prob(self, tr, total: torch.Tensor) -> torch.Tensor:
        """``total (C,)`` plus every non-excluded sample site's ``log_prob`` in ``tr`` (a trace
        under the chain plate, ``compute_log_prob`` done), summed per chain."""
        C, mpn = total.shape[0], self.max_plate_nesting
        for name, node in tr.nodes.items():
            if node["type"] != "sample" or name in self.exclude_sites:
                continue
            if isinstance(node["fn"], _Subsample):
                continue
            lp = node["log_prob"]
            if not isinstance(lp, torch.Tensor):
                continue
            if lp.dim() > mpn + 1:
                raise ValueError(
                    f"site {name!r} has log_prob shape {tuple(lp.shape)}: more batch dims than "
                    f"max_plate_nesting={mpn} allows; does the model broadcast over a chain dim?"
                )
            if lp.dim() == mpn + 1:
                lp = lp.reshape(lp.shape[0], -1).sum(-1)  # (C,) or (1,)
            else:
                lp = lp.sum()
            total = total + lp
        return total.expand(C) if total.dim() == 0 else total

    def log_density(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log joint ``log p(D, x)`` at *constrained* latent values ``{site: (C, *shape)}``,
        shape ``(C,)``, differentiable in the values. No Jacobian term: for samplers that handle
        the constraint themselves (e.g. mirror maps, :class:`mcmc.coin_msvgd.CoinMSVGD`)."""
        self._check_keys(values)
        mpn = self.max_plate_nesting
        first = next(iter(self._sites))
        C = values[first].shape[0]
        cond = {}
        for k, s in self._sites.items():
            v = values[k]
            if v.shape[1:] != s.shape or v.shape[0] != C:
                raise ValueError(
                    f"log_density: site {k!r} has shape {tuple(v.shape)}, expected "
                    f"({C}, *{tuple(s.shape)})"
                )
            cond[k] = v.reshape((C,) + (1,) * (mpn - s.batch_ndim) + tuple(s.shape))
        model = poutine.condition(self._chained(C), data=cond)
        with poutine.block(), pyro.validation_enabled(False):
            tr = poutine.trace(model).get_trace(*self.model_args, **self.model_kwargs)
            tr.compute_log_prob(site_filter=lambda name, site: name not in self.exclude_sites)
        return self._sum_log_prob(tr, values[first].new_zeros(C))

    def nonfinite_sites(self, z: torch.Tensor) -> list[str]:
        """Names of the model sites (and ``"log|det J| of <site>"`` terms) whose full-data
        log-density is NaN/inf for some chain of ``z`` -- for error messages."""
        self._check_z(z)
        C, mpn = z.shape[0], self.max_plate_nesting
        bad = []
        with torch.no_grad():
            u = self.unpack_unconstrained(z)
            cond = {}
            for k, s in self._sites.items():
                x = s.transform.inv(u[k])
                if not bool(torch.isfinite(s.transform.inv.log_abs_det_jacobian(u[k], x)).all()):
                    bad.append(f"log|det J| of {k}")
                cond[k] = x.reshape((C,) + (1,) * (mpn - s.batch_ndim) + tuple(s.shape))
            with poutine.block(), pyro.validation_enabled(False):
                tr = poutine.trace(poutine.condition(self._chained(C), data=cond)).get_trace(
                    *self.model_args, **self.model_kwargs
                )
            for name, node in tr.nodes.items():
                if node["type"] != "sample" or isinstance(node["fn"], _Subsample):
                    continue
                if name in self.exclude_sites:
                    continue
                lp = node["fn"].log_prob(node["value"])
                if not bool(torch.isfinite(lp).all()):
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
        model_sites = self.nonfinite_sites(torch.where(torch.isfinite(zb), zb, 0.0))
        return chains, latent, model_sites

    def _resolve_indices(self, C, subsample_size, indices, generator, with_replacement, shared):
        if subsample_size is None or indices is not None:
            return indices
        return self.minibatch_indices(
            C,
            subsample_size,
            generator=generator,
            with_replacement=with_replacement,
            shared=shared,
        )

    def __call__(
        self,
        z: torch.Tensor,
        subsample_size: int | None = None,
        *,
        indices: dict[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        with_replacement: bool = False,
        shared_minibatch: bool = False,
    ) -> torch.Tensor:
        """``U(z)`` of shape ``(C,)`` (differentiable through ``z``); options as
        :meth:`value_and_grad`."""
        self._check_z(z)
        idx = self._resolve_indices(
            z.shape[0], subsample_size, indices, generator, with_replacement, shared_minibatch
        )
        return -self._log_joint(z, subsample_size, idx)

    def value_and_grad(
        self,
        z: torch.Tensor,
        subsample_size: int | None = None,
        *,
        indices: dict[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        with_replacement: bool = False,
        shared_minibatch: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U(z) (C,), grad U(z) (C, D))``, both detached.

        Args:
            z: ``(C, D)`` unconstrained points.
            subsample_size: rows per subsampled data plate (``None``: full data). The minibatch
                estimate is unbiased for ``U`` and its gradient (see the module docstring).
            indices: explicit minibatch rows ``{plate: (C, B)}`` (from :meth:`minibatch_indices`);
                drawn afresh when omitted.
            generator: source of the minibatch indices (default: torch's global RNG).
            with_replacement: draw the indices with replacement (cheap for huge data).
            shared_minibatch: give every chain the same minibatch (cheaper; the chains are then
                coupled through their common gradient noise). Default: one per chain.
        """
        self._check_z(z)
        idx = self._resolve_indices(
            z.shape[0], subsample_size, indices, generator, with_replacement, shared_minibatch
        )
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            u = -self._log_joint(zz, subsample_size, idx)
            (g,) = torch.autograd.grad(u.sum(), zz)
        return u.detach(), g.detach()


class _RowWeights(Messenger):
    """Multiply the scale of every site inside a subsampled plate by per-chain row weights."""

    def __init__(self, weights: dict[str, torch.Tensor], max_plate_nesting: int) -> None:
        super().__init__()
        self.weights = weights
        self.mpn = max_plate_nesting

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or isinstance(msg["fn"], _Subsample):
            return
        for f in msg["cond_indep_stack"]:
            w = self.weights.get(f.name)
            if w is None:
                continue
            shape = [w.shape[0]] + [1] * self.mpn
            shape[self.mpn + 1 + f.dim] = w.shape[1]
            msg["scale"] = w.reshape(shape) * msg["scale"]
