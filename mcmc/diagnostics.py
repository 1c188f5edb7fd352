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

import dataclasses
import logging
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
    "ConvergenceReport",
    "ConvergenceWarning",
    "atomic_write",
    "bulk_ess",
    "check_chains",
    "check_convergence",
    "flatten_draws",
    "group_names",
    "load_inference_data",
    "log_likelihood",
    "posterior_dataset",
    "save_inference_data",
    "split_rhat",
    "stuck_particles",
    "to_inference_data",
]

logger = logging.getLogger(__name__)


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


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> str:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``.

    Readers never see a half-written file. The file gets the permissions a plainly created file
    would (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_inference_data(idata: Any, path: str | os.PathLike) -> str:
    """Write ``idata`` to netCDF atomically (see :func:`atomic_write`)."""
    return atomic_write(path, idata.to_netcdf)


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


# --------------------------------------------------------------------------- convergence checks
# Split R-hat and bulk ESS follow Vehtari, Gelman, Simpson, Carpenter & Buerkner (2021),
# "Rank-normalization, folding, and localization: an improved R-hat for assessing convergence of
# MCMC", Bayesian Analysis 16(2). Computed here (numpy/scipy only) so that the numbers are the same
# under ArviZ 0.x and 1.x; tests compare them with ArviZ on known cases.

RHAT_THRESHOLD = 1.05
"""Split R-hat above this means the chains disagree (Vehtari et al. 2021 recommend 1.01 for final
results; 1.05 flags the clear failures that short default runs must not hide)."""

MIN_ESS = 100
"""Bulk ESS below this is "tiny": the Monte-Carlo error of a posterior mean, sd / sqrt(ESS), is
then more than a tenth of a posterior standard deviation."""

KSD_RATIO = 0.5
"""A particle method whose KSD fell by less than this factor from its start has not converged."""

KSD_LEVEL_FACTOR = 2.0
"""A particle set whose KSD in its own whitened coordinates exceeds this multiple of the level
an exact sample of its size has there (:func:`mcmc.kernels.whitened_ksd`) is not yet a sample of
the posterior (exact draws: 0.97-1.25 times the level)."""

STUCK_THRESHOLD = 8.0
"""A particle further than this many robust standard deviations (1.4826 x the median absolute
deviation) from the particles' coordinate-wise median, in some coordinate, is stuck."""


class ConvergenceWarning(UserWarning):
    """A sampler or fit finished but its diagnostics say the result should not be trusted."""


def _as_chains(value: Any) -> np.ndarray:
    """``(chains, draws, *shape)`` -> float64 ``(chains, draws, K)``."""
    a = np.asarray(_numpy(value), dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(f"draws must have shape (chains, draws, *site_shape), got {a.shape}")
    return a.reshape(a.shape[0], a.shape[1], -1)


def _split_halves(x: np.ndarray) -> np.ndarray:
    """Each chain cut into its first and second half (middle draw dropped when odd): ``(2M, N//2, K)``."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)


def _rank_normalise(x: np.ndarray) -> np.ndarray:
    """Pooled ranks (ties averaged) -> normal scores ``Phi^{-1}((r - 3/8) / (S + 1/4))`` (eq. 14)."""
    from scipy import stats

    m, n, k = x.shape
    flat = x.reshape(m * n, k)
    ranks = stats.rankdata(flat, method="average", axis=0)
    return stats.norm.ppf((ranks - 0.375) / (m * n + 0.25)).reshape(m, n, k)


def _basic_rhat(x: np.ndarray) -> np.ndarray:
    """Potential scale reduction ``sqrt(var+ / W)`` over the chains of ``x (M, N, K)`` (eqs. 3-4)."""
    n = x.shape[1]
    within = x.var(axis=1, ddof=1).mean(axis=0)
    between = n * x.mean(axis=1).var(axis=0, ddof=1)
    var_plus = (n - 1) / n * within + between / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(var_plus / within)


def split_rhat(draws: Any) -> np.ndarray:
    """Rank-normalised split R-hat of ``draws (chains, draws, *shape)``, one value per coordinate.

    The maximum of the bulk R-hat (on rank-normalised split chains) and the tail R-hat (on the
    rank-normalised distance from the median), Vehtari et al. (2021), section 4.2. Splitting each
    chain in half also catches a single chain that drifts. Coordinates that are constant give NaN.
    Needs at least 4 draws per chain.
    """
    x = _as_chains(draws)
    if x.shape[1] < 4:
        raise ValueError(f"split R-hat needs >= 4 draws per chain, got {x.shape[1]}")
    split = _split_halves(x)
    bulk = _basic_rhat(_rank_normalise(split))
    folded = np.abs(split - np.median(split.reshape(-1, split.shape[-1]), axis=0))
    tail = _basic_rhat(_rank_normalise(folded))
    out = np.fmax(bulk, tail)
    out[np.ptp(x.reshape(-1, x.shape[-1]), axis=0) == 0] = np.nan
    return out.reshape(np.shape(_numpy(draws))[2:])


def _ess(x: np.ndarray) -> np.ndarray:
    """Effective sample size of ``x (M, N, K)`` with Geyer's initial monotone sequence (eq. 10).

    Autocorrelations are combined over chains as ``rho_t = 1 - (W - mean_m acov_{m,t}) / var+``
    (``rho_0 = 1``);
    the sum runs over pairs ``P_k = rho_{2k} + rho_{2k+1}`` while they are positive, made
    non-increasing, and closed by the next even lag when positive (Stan's convention); the
    integrated autocorrelation time is floored at ``1 / log10(MN)``.
    """
    m, n, k = x.shape
    centred = x - x.mean(axis=1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    spec = np.fft.rfft(centred, n=size, axis=1)
    acov = np.fft.irfft(spec * np.conj(spec), n=size, axis=1)[:, :n] / n  # (M, N, K), biased
    within = acov[:, 0].mean(axis=0) * n / (n - 1)
    var_plus = within * (n - 1) / n
    if m > 1:
        var_plus = var_plus + x.mean(axis=1).var(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = 1.0 - (within - acov.mean(axis=0)) / var_plus  # (N, K)
    rho[0] = 1.0
    num_pairs = max((n - 1) // 2, 1)  # pairs (2j, 2j+1) with 2j < n - 2, plus j = 0
    ess = np.empty(k)
    for c in range(k):
        r = rho[:, c]
        if not np.all(np.isfinite(r)):
            ess[c] = np.nan
            continue
        pairs = r[0 : 2 * num_pairs : 2] + r[1 : 2 * num_pairs : 2]
        stop = np.nonzero(pairs[1:] <= 0)[0]
        last = stop[0] + 1 if stop.size else len(pairs) - 1
        monotone = np.minimum.accumulate(pairs[:last])
        tau = -1.0 + 2.0 * monotone.sum() + max(r[2 * last], 0.0)
        ess[c] = m * n / max(tau, 1.0 / np.log10(m * n))
    return ess


def bulk_ess(draws: Any) -> np.ndarray:
    """Bulk effective sample size of ``draws (chains, draws, *shape)``, one value per coordinate.

    The ESS of the rank-normalised split chains (Vehtari et al. 2021, section 4.3): how many
    independent draws would estimate the centre of the distribution as well. Constant coordinates
    count every draw. Needs at least 4 draws per chain.
    """
    x = _as_chains(draws)
    if x.shape[1] < 4:
        raise ValueError(f"bulk ESS needs >= 4 draws per chain, got {x.shape[1]}")
    out = _ess(_rank_normalise(_split_halves(x)))
    out[np.ptp(x.reshape(-1, x.shape[-1]), axis=0) == 0] = x.shape[0] * x.shape[1]
    return out.reshape(np.shape(_numpy(draws))[2:])


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


@dataclasses.dataclass(frozen=True)
class ConvergenceReport:
    """What :func:`check_convergence` found.

    Attributes:
        summary: one line for logs and the CLI.
        warnings: sentences saying what looks wrong and what to change (empty when all is well).
        rhat: ``{site: max split R-hat over its coordinates}`` (empty with fewer than 2 chains).
        ess: ``{site: min bulk ESS over its coordinates}`` (empty for particle sets).
        num_chains, num_draws: the shape of the draws checked.
        ksd, initial_ksd, ksd_level, stuck_fraction: the particle checks' numbers (or None).
    """

    summary: str
    warnings: tuple[str, ...] = ()
    rhat: dict[str, float] = dataclasses.field(default_factory=dict)
    ess: dict[str, float] = dataclasses.field(default_factory=dict)
    num_chains: int = 0
    num_draws: int = 0
    ksd: float | None = None
    initial_ksd: float | None = None
    ksd_level: float | None = None
    stuck_fraction: float | None = None

    @property
    def ok(self) -> bool:
        return not self.warnings

    @property
    def max_rhat(self) -> float:
        finite = [v for v in self.rhat.values() if np.isfinite(v)]
        return max(finite) if finite else float("nan")

    @property
    def min_ess(self) -> float:
        finite = [v for v in self.ess.values() if np.isfinite(v)]
        return min(finite) if finite else float("nan")

    def warn(self, stacklevel: int = 2) -> None:
        """Issue every warning as a :class:`ConvergenceWarning`."""
        for message in self.warnings:
            warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel + 1)

    def announce(self, stacklevel: int = 2) -> None:
        """What a sampler does at the end of a run: log :attr:`summary` at INFO (logger
        ``mcmc.diagnostics``) and, if anything looks wrong, issue ONE :class:`ConvergenceWarning`
        holding every warning (silence it with ``warnings.simplefilter("ignore",
        ConvergenceWarning)`` or the sampler's ``diagnostics=False``)."""
        logger.info(self.summary)
        if self.warnings:
            warnings.warn(" ".join(self.warnings), ConvergenceWarning, stacklevel=stacklevel + 1)


def check_convergence(
    draws: Mapping[str, Any] | None = None,
    *,
    kind: str = "draws",
    name: str = "",
    ksd: float | None = None,
    initial_ksd: float | None = None,
    stuck_fraction: float | None = None,
    rhat_threshold: float = RHAT_THRESHOLD,
    min_ess: float = MIN_ESS,
    ksd_level: float | None = None,
) -> ConvergenceReport:
    """Check a sampler's output and say, in words, what to change when it looks wrong.

    Args:
        draws: ``{site: (chains, draws, *shape)}``; for ``kind="particles"``
            ``{site: (sets, num_particles, *shape)}`` (one set: ``x[None]``). May be omitted when
            only ``ksd``/``stuck_fraction`` are checked.
        kind: ``"draws"`` (R-hat with >= 2 chains, bulk ESS) or ``"particles"`` (R-hat between
            independent particle sets when there are >= 2; ESS is not defined for particles).
        name: what produced the draws (e.g. ``"sgld on logistic_regression"``), used in messages.
        ksd, initial_ksd: kernel Stein discrepancy at the end and at the start (particle methods).
        ksd_level: the KSD an exact sample of this size has in the coordinates ``ksd`` was
            computed in (:func:`mcmc.kernels.whitened_ksd`). Given, the check is absolute: warn
            when ``ksd > KSD_LEVEL_FACTOR * ksd_level`` (whatever the start). Without it: warn
            when the KSD has not fallen below ``KSD_RATIO * initial_ksd``.
        stuck_fraction: fraction of particles the caller found stuck away from the rest
            (:func:`stuck_particles`).
        rhat_threshold, min_ess: when to warn (defaults :data:`RHAT_THRESHOLD`, :data:`MIN_ESS`).

    Returns:
        a :class:`ConvergenceReport`; call ``.warn()`` to emit its warnings.
    """
    if kind not in ("draws", "particles"):
        raise ValueError(f"kind must be 'draws' or 'particles', got {kind!r}")
    who = f"{name}: " if name else ""
    messages: list[str] = []
    parts: list[str] = []
    rhat: dict[str, float] = {}
    ess: dict[str, float] = {}
    chains = draws_per_chain = 0
    if draws:
        arrays = {k: np.asarray(_numpy(v), dtype=np.float64) for k, v in draws.items()}
        lead = {a.shape[:2] for a in arrays.values() if a.ndim >= 2}
        if len(lead) != 1 or any(a.ndim < 2 for a in arrays.values()):
            shapes = {k: a.shape for k, a in arrays.items()}
            raise ValueError(f"draws must be {{site: (chains, draws, *shape)}} with the same two "
                             f"leading dims (a single particle set: x[None]); got {shapes}")
        chains, draws_per_chain = lead.pop()
        units = ("sets", "particles") if kind == "particles" else ("chains", "draws")
        parts.append(f"{chains} {units[0]} x {draws_per_chain} {units[1]}")
        if draws_per_chain < 4:
            parts.append("R-hat and ESS need >= 4 draws per chain")
        else:
            if chains >= 2:
                for k, a in arrays.items():
                    values = split_rhat(a)
                    if np.isfinite(values).any():
                        rhat[k] = float(np.nanmax(values))
            if kind == "draws":
                ess = {k: float(np.nanmin(bulk_ess(a))) for k, a in arrays.items()}
    report_rhat = rhat
    if report_rhat:
        worst = max(report_rhat, key=report_rhat.get)
        parts.append(f"max R-hat {report_rhat[worst]:.3f} ({worst})")
        bad = sorted((k for k, v in report_rhat.items() if v > rhat_threshold),
                     key=lambda k: -report_rhat[k])
        if bad:
            what = "particle sets" if kind == "particles" else "chains"
            listing = ", ".join(f"{k} {report_rhat[k]:.2f}" for k in bad[:4])
            if kind == "particles":
                advice = "run more iterations or start the particles nearer the posterior"
            else:
                advice = ("run longer (more warmup_steps and num_samples), use a smaller "
                          "step_size, or start the chains nearer the posterior")
            messages.append(f"{who}the {what} disagree: split R-hat > {rhat_threshold} for "
                            f"{listing}; {advice}")
    elif draws and kind == "draws" and chains < 2:
        parts.append("R-hat needs >= 2 chains")
    if ess:
        worst = min(ess, key=ess.get)
        parts.append(f"min bulk ESS {ess[worst]:.0f} ({worst})")
        low = sorted((k for k, v in ess.items() if v < min_ess), key=ess.get)
        if low:
            listing = ", ".join(f"{k} {ess[k]:.0f}" for k in low[:4])
            messages.append(
                f"{who}tiny effective sample size: bulk ESS < {min_ess:g} for {listing} (the "
                f"Monte-Carlo error of a mean is then > {1 / np.sqrt(min_ess):.2g} posterior sd); "
                "draw more samples (num_samples), or mix faster (a larger step_size, thinning)")
    if ksd is not None:
        start = "" if initial_ksd is None else f"{_fmt(initial_ksd)} -> "
        if ksd_level is not None:
            parts.append(f"KSD {start}{_fmt(ksd)} ({_fmt(ksd / ksd_level)}x an exact sample's)")
            if not np.isfinite(ksd) or ksd > KSD_LEVEL_FACTOR * ksd_level:
                messages.append(
                    f"{who}the kernel Stein discrepancy ({start}{_fmt(ksd)}) is "
                    f"{_fmt(ksd / ksd_level)}x that of an exact sample of this size: the "
                    "particles are not (yet) a sample of the posterior; run more iterations, or "
                    "start the particles nearer the posterior (e.g. from a Laplace or ADVI fit)")
        elif initial_ksd is not None:
            parts.append(f"KSD {start}{_fmt(ksd)}")
            if not np.isfinite(ksd) or ksd > KSD_RATIO * initial_ksd:
                messages.append(
                    f"{who}the kernel Stein discrepancy has not fallen ({start}{_fmt(ksd)}); "
                    "run more iterations, or start the particles nearer the posterior (e.g. "
                    "from a Laplace or ADVI fit)")
        else:
            parts.append(f"KSD {_fmt(ksd)}")
    if stuck_fraction is not None:
        parts.append(f"{100 * stuck_fraction:.0f}% particles stuck")
        if stuck_fraction > 0:
            messages.append(
                f"{who}{100 * stuck_fraction:.2g}% of the particles are stuck away from the rest "
                f"(> {STUCK_THRESHOLD:g} robust sds from the median); start the particles nearer "
                "the posterior (the coin samplers' default precondition='laplace' does) or run "
                "more iterations, and do not trust the spread until none are")
    status = "ok" if not messages else f"{len(messages)} warning(s)"
    summary = f"{who}{'; '.join(parts) if parts else 'nothing to check'}: {status}"
    return ConvergenceReport(summary, tuple(messages), rhat, ess, chains, draws_per_chain, ksd,
                             initial_ksd, ksd_level, stuck_fraction)


def stuck_particles(particles: Any, threshold: float = STUCK_THRESHOLD) -> np.ndarray:
    """Which particles of a set ``(N, D)`` are stuck far outside the bulk: boolean ``(N,)``.

    Particle ``i`` is stuck when ``max_j |x_ij - med_j| / s_j > threshold``, with ``med_j`` the
    coordinate-wise median and ``s_j = 1.4826 MAD_j`` the robust standard deviation (both
    unaffected by up to half of the particles being stuck). For a Gaussian posterior a particle
    lies beyond 8 sds with probability ~1e-15, so a converged set has none; particles that a
    sampler left behind (e.g. coin betting with a stale scale, far from the posterior) are
    typically tens to thousands of sds away. Use unconstrained coordinates (heavy-tailed
    constrained sites such as a scale's upper tail would look stuck). A coordinate whose MAD is
    0 flags every particle that differs from the median there.
    """
    x = np.asarray(_numpy(particles), dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"particles must have shape (N, D), got {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)  # NaN/inf particles count as stuck
    if bad.all():
        return bad
    med = np.median(x[~bad], axis=0)
    dev = np.abs(x - med)
    scale = 1.4826 * np.median(dev[~bad], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(scale > 0, dev / scale, np.where(dev > 0, np.inf, 0.0))
    return bad | ~(z.max(axis=1) <= threshold)


def check_chains(
    draws: Any,
    site_slices: Mapping[str, slice] | None = None,
    *,
    name: str = "",
    max_size: int = 2_000_000,
) -> ConvergenceReport:
    """:func:`check_convergence` of flat chains ``(C, S, D)`` (unconstrained draws, as the chain
    drivers keep them), per site when ``site_slices`` (``{site: slice of D}``) is given.

    Split R-hat and bulk ESS are rank-based, so unconstrained and constrained draws give nearly
    the same answer. To bound the cost, at most ``max_size`` numbers are checked: with more,
    an evenly spaced subset of the chains (the summary says how many).
    """
    x = _numpy(draws)
    if x.ndim != 3:
        raise ValueError(f"draws must have shape (chains, draws, D), got {x.shape}")
    C, S, D = x.shape
    keep = C
    if C * S * D > max_size and C > 2:
        keep = max(2, min(C, max_size // max(S * D, 1)))
        x = x[np.linspace(0, C - 1, keep).round().astype(int)]
    slices = site_slices or {"z": slice(0, D)}
    report = check_convergence({k: x[:, :, sl] for k, sl in slices.items()}, name=name)
    if keep < C:
        report = dataclasses.replace(report, summary=report.summary.replace(
            f"{keep} chains", f"{keep} of {C} chains (subset checked)", 1))
    return report
