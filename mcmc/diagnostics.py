"""Diagnostics shared by every method: ArviZ conversion, sample-based distances, netCDF I/O.

This is the one place in pyroforge that talks to ArviZ. :func:`to_inference_data` turns any
result — a Pyro ``MCMC``, a dict of draws, SVGD-style particles, a Pyro ``SVGD`` object or a guide —
into ArviZ ``InferenceData`` (ArviZ 0.x) or the ``DataTree`` that ArviZ 1.x uses in its place.

ArviZ 0.23 (Python 3.11) and ArviZ 1.x (Python >= 3.12) differ: 1.x has no ``from_pyro`` and its
``from_dict`` takes one ``{group: {var: array}}`` mapping instead of one keyword per group. We
always build through ``from_dict`` and adapt the call to the installed major version.

Particles (SVGD, coin sampling) are stored as ONE chain whose draws are the particles: a particle
set is a single joint sample, so chain-based diagnostics (R-hat, ESS) are not meaningful for it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine

with warnings.catch_warnings():
    # ArviZ 0.23 announces its 1.0 refactor with a FutureWarning on import; we support both.
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

ARVIZ_MAJOR = int(az.__version__.split(".")[0])

__all__ = [
    "ARVIZ_MAJOR",
    "energy_distance",
    "flatten_draws",
    "group_names",
    "load_inference_data",
    "log_likelihood",
    "mean_error",
    "posterior_dataset",
    "save_inference_data",
    "to_inference_data",
]


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _from_groups(groups: Mapping[str, Mapping[str, np.ndarray]]):
    """Build InferenceData (ArviZ 0.x) or DataTree (ArviZ 1.x) from ``{group: {var: array}}``."""
    groups = {g: dict(v) for g, v in groups.items() if v}
    if ARVIZ_MAJOR >= 1:
        return az.from_dict(groups)
    return az.from_dict(**groups)


def _check_draws(draws: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    if not isinstance(draws, Mapping) or not draws:
        raise TypeError(f"{what} must be a non-empty dict of site name -> array")
    out = {name: _numpy(v) for name, v in draws.items()}
    shapes = {name: v.shape for name, v in out.items()}
    leading = {s[:2] for s in shapes.values() if len(s) >= 2}
    if any(len(s) < 2 for s in shapes.values()) or len(leading) != 1:
        raise ValueError(
            f"{what} must all have shape (chains, draws, *site_shape) with the same leading two "
            f"dims; got {shapes}"
        )
    return out


def _posterior_from_source(
    source: Any,
    *,
    kind: str,
    model: Callable | None,
    model_args: tuple,
    model_kwargs: dict,
    num_samples: int,
) -> dict[str, np.ndarray]:
    """Posterior draws shaped ``(chains, draws, *site_shape)`` from any supported source."""
    if kind not in ("draws", "particles"):
        raise ValueError(f"kind must be 'draws' or 'particles', got {kind!r}")
    if isinstance(source, pyro.infer.MCMC):
        return {k: _numpy(v) for k, v in source.get_samples(group_by_chain=True).items()}
    if isinstance(source, pyro.infer.SVGD):
        # Pyro keeps the plate dims of its particle plate: (N, 1, ..., 1, *event_shape).
        out = {}
        for name, v in source.get_named_particles().items():
            shape = tuple(v.shape[1:])
            for _ in range(source.max_plate_nesting):
                if shape[:1] == (1,):
                    shape = shape[1:]
            out[name] = _numpy(v.reshape((v.shape[0],) + shape))[None]
        return out
    if isinstance(source, Mapping):
        if kind == "particles":
            return _check_draws({k: _numpy(v)[None] for k, v in source.items()}, "particles")
        return _check_draws(source, "draws")
    if callable(source):
        return _draw_from_guide(source, model_args, model_kwargs, num_samples)
    raise TypeError(
        "source must be a pyro.infer.MCMC, a pyro.infer.SVGD, a dict of draws or particles, "
        f"or a guide callable; got {type(source).__name__}"
    )


def _draw_from_guide(guide: Callable, args: tuple, kwargs: dict, num_samples: int):
    """``num_samples`` joint draws of the guide's latent sites, as one chain."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    with torch.no_grad():
        tr = poutine.trace(guide).get_trace(*args, **kwargs)
        latent = [
            name
            for name, site in tr.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site["infer"].get("is_auxiliary")
        ]
        try:  # vectorised draws when the guide broadcasts (autoguides do)
            predictive = pyro.infer.Predictive(
                guide, num_samples=num_samples, return_sites=latent, parallel=True
            )
            samples = predictive(*args, **kwargs)
            bad = [k for k in latent if samples[k].shape[1:] != tr.nodes[k]["value"].shape]
            if bad:
                raise ValueError(bad)
        except Exception:  # noqa: BLE001 - fall back to one guide run per draw
            samples = pyro.infer.Predictive(
                guide, num_samples=num_samples, return_sites=latent, parallel=False
            )(*args, **kwargs)
    return {k: _numpy(samples[k])[None] for k in latent}


def _data_device(args: tuple, kwargs: dict) -> torch.device:
    """The device of the first tensor among a model's arguments (CPU if there is none)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def log_likelihood(
    model: Callable,
    draws: Mapping[str, Any],
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    max_plate_nesting: int | None = None,
) -> dict[str, np.ndarray]:
    """Pointwise log-likelihood of each observed site at each draw.

    ``draws`` maps latent sites to arrays ``(chains, draws, *site_shape)``. Returns
    ``{observed_site: array (chains, draws, *obs_batch_shape)}``. The model is evaluated once,
    vectorised over all draws on a plate left of its own plates (zoo models broadcast there);
    models that do not broadcast are evaluated draw by draw.
    """
    model_kwargs = model_kwargs or {}
    # the draws join the model's data on its device (e.g. CPU draws, CUDA data)
    device = _data_device(model_args, model_kwargs)
    draws = {k: torch.as_tensor(_numpy(v)).to(device) for k, v in draws.items()}
    chains, ndraws = next(iter(draws.values())).shape[:2]
    flat = {k: v.reshape((chains * ndraws,) + v.shape[2:]) for k, v in draws.items()}
    if max_plate_nesting is None:
        tr = poutine.trace(model).get_trace(*model_args, **model_kwargs)
        tr.compute_log_prob()
        max_plate_nesting = max(
            [-f.dim for s in tr.nodes.values() for f in s.get("cond_indep_stack", ())] + [0]
        )
    try:
        out = _vectorised_log_lik(model, flat, model_args, model_kwargs, max_plate_nesting)
    except Exception:  # noqa: BLE001 - model does not broadcast over draws: loop
        per_draw = []
        for i in range(chains * ndraws):
            cond = {k: v[i] for k, v in flat.items()}
            tr = poutine.trace(poutine.condition(model, cond)).get_trace(
                *model_args, **model_kwargs
            )
            per_draw.append(
                {
                    name: site["fn"].log_prob(site["value"]).detach()
                    for name, site in tr.nodes.items()
                    if site["type"] == "sample" and site["is_observed"] and name not in cond
                }
            )
        out = {k: torch.stack([d[k] for d in per_draw]) for k in per_draw[0]}
    return {k: _numpy(v).reshape((chains, ndraws) + tuple(v.shape[1:])) for k, v in out.items()}


# ``to_inference_data`` takes a ``log_likelihood`` flag (ArviZ's name), which shadows the function.
_pointwise_log_likelihood = log_likelihood


def _vectorised_log_lik(model, flat, args, kwargs, max_plate_nesting):
    num = next(iter(flat.values())).shape[0]
    dim = -(max_plate_nesting + 1)
    with torch.no_grad(), pyro.plate("_draws", num, dim=dim):
        tr = poutine.trace(poutine.condition(model, flat)).get_trace(*args, **kwargs)
    out = {}
    for name, site in tr.nodes.items():
        # conditioned latents are marked observed by poutine.condition: skip them
        if site["type"] != "sample" or not site["is_observed"] or name in flat:
            continue
        lp = site["fn"].log_prob(site["value"])
        lp = lp.expand(torch.broadcast_shapes(lp.shape, (num,) + (1,) * (-dim - 1)))
        out[name] = lp.reshape(num, *lp.shape[lp.dim() + dim + 1 :])
    return out


def to_inference_data(
    source: Any,
    *,
    model: Callable | None = None,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    num_samples: int = 1000,
    kind: str = "draws",
    observed: Mapping[str, Any] | None = None,
    log_likelihood: bool = False,
    sample_stats: Mapping[str, Any] | None = None,
    max_plate_nesting: int | None = None,
):
    """Convert an inference result to ArviZ InferenceData (a DataTree under ArviZ 1.x).

    Args:
        source: a ``pyro.infer.MCMC``; a ``pyro.infer.SVGD``; a dict of draws
            ``{site: (chains, draws, *shape)}``; with ``kind="particles"`` a dict of particles
            ``{site: (num_particles, *shape)}`` (stored as one chain); or a guide callable, drawn
            ``num_samples`` times with ``model_args``/``model_kwargs``.
        model, model_args, model_kwargs: the Pyro model and its data. When given, observed sites
            are recorded in ``observed_data`` (unless ``observed`` is given explicitly) and, with
            ``log_likelihood=True``, their pointwise log-likelihood in ``log_likelihood``.
        observed: ``{site: values}`` for the ``observed_data`` group.
        sample_stats: ``{stat: (chains, draws)}`` for the ``sample_stats`` group.
        max_plate_nesting: the model's plate nesting (inferred when omitted).
    """
    model_kwargs = dict(model_kwargs or {})
    posterior = _posterior_from_source(
        source,
        kind=kind,
        model=model,
        model_args=model_args,
        model_kwargs=model_kwargs,
        num_samples=num_samples,
    )
    groups: dict[str, dict[str, np.ndarray]] = {"posterior": posterior}
    if observed is None and model is not None:
        tr = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(
            *model_args, **model_kwargs
        )
        observed = {
            name: site["value"]
            for name, site in tr.nodes.items()
            if site["type"] == "sample" and site["is_observed"]
        }
    if observed:
        groups["observed_data"] = {k: _numpy(v) for k, v in observed.items()}
    if log_likelihood:
        if model is None:
            raise ValueError("log_likelihood=True needs the model (pass model=...)")
        groups["log_likelihood"] = _pointwise_log_likelihood(
            model, posterior, model_args, model_kwargs, max_plate_nesting=max_plate_nesting
        )
    if sample_stats:
        groups["sample_stats"] = {k: _numpy(v) for k, v in sample_stats.items()}
    return _from_groups(groups)


def save_inference_data(idata: Any, path: str | os.PathLike) -> str:
    """Write ``idata`` to netCDF atomically (temporary file in the same folder, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".nc.tmp", dir=folder)
    os.close(fd)
    try:
        idata.to_netcdf(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_inference_data(path: str | os.PathLike):
    """Read InferenceData (DataTree under ArviZ 1.x) written by :func:`save_inference_data`."""
    if hasattr(az, "from_netcdf"):
        return az.from_netcdf(os.fspath(path))
    import xarray as xr  # ArviZ 1.x reads DataTrees through xarray itself

    with xr.open_datatree(os.fspath(path)) as tree:
        return tree.load()


def group_names(idata: Any) -> list[str]:
    """Names of the groups (``posterior``, ``observed_data``, ...) under either ArviZ API."""
    if hasattr(idata, "children"):  # ArviZ 1.x DataTree
        return list(idata.children)
    return list(idata.groups())


def posterior_dataset(idata: Any):
    """The ``posterior`` group as an ``xarray.Dataset`` under either ArviZ API."""
    post = idata.posterior
    return post.to_dataset() if hasattr(post, "to_dataset") else post


def flatten_draws(draws: Mapping[str, Any], sites: list[str] | None = None) -> torch.Tensor:
    """Concatenate per-site draws ``{site: (S, *shape)}`` into one ``(S, D)`` float tensor."""
    sites = list(draws) if sites is None else sites
    parts = []
    for name in sites:
        v = torch.as_tensor(draws[name])
        parts.append(v.reshape(v.shape[0], -1).to(torch.get_default_dtype()))
    return torch.cat(parts, dim=-1)


def energy_distance(x: torch.Tensor, y: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` between samples ``x (n, d)``, ``y (m, d)``.

    Zero iff the two distributions agree (Szekely & Rizzo 2013). Computed in row chunks so that
    memory stays O(chunk_size * max(n, m)) rather than O(n m d). V-statistic form (includes the
    zero diagonal terms), so it is slightly positive between two samples of one distribution.
    """
    x = torch.as_tensor(x)
    y = torch.as_tensor(y).to(device=x.device, dtype=x.dtype)
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if y.dim() == 1:
        y = y.unsqueeze(-1)
    if x.dim() != 2 or y.dim() != 2 or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must be (n, d) and (m, d); got {tuple(x.shape)}, {tuple(y.shape)}")

    def mean_dist(a, b):
        total = a.new_zeros(())
        for i in range(0, a.shape[0], chunk_size):
            total = total + torch.cdist(a[i : i + chunk_size], b).sum()
        return total / (a.shape[0] * b.shape[0])

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def mean_error(
    draws: Mapping[str, Any], reference_mean: Mapping[str, Any], scale: Mapping[str, Any] | None = None
) -> float:
    """Root-mean-square error of posterior means over all coordinates of the reference's sites.

    ``draws[site]`` is ``(S, *shape)``; with ``scale`` (reference standard deviations) each
    coordinate's error is measured in posterior standard deviations.
    """
    errs = []
    for name, ref in reference_mean.items():
        est = torch.as_tensor(draws[name]).double().mean(0)
        diff = est - torch.as_tensor(ref).double().to(est.device)
        if scale is not None:
            diff = diff / torch.as_tensor(scale[name]).double().to(est.device)
        errs.append(diff.reshape(-1))
    return float(torch.cat(errs).pow(2).mean().sqrt())
