"""How well a fit did: distances to the reference posterior, held-out fit, convergence, summaries.

:func:`evaluate` is the row of ``pyroforge compare`` for one method; :func:`diagnose` is the
one-line convergence summary and the warnings printed after every fit (split R-hat and bulk ESS
from :func:`mcmc.diagnostics.check_convergence`, the VI stopping rule, the particles' KSD);
:func:`summary_table` is the per-coordinate table ``pyroforge run`` prints and saves.
:func:`energy_distance` and :func:`mean_error` compare draws with reference draws.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .methods.base import FitResult
from .spec import ModelSpec

__all__ = ["diagnose", "energy_distance", "evaluate", "mean_error", "summary_table"]


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


def _flat_draws(result: FitResult, sites: list[str]) -> torch.Tensor:
    """``(chains*draws, D)`` concatenation of the given sites' draws."""
    parts = []
    for name in sites:
        v = result.draws[name].double()
        parts.append(v.reshape(v.shape[0] * v.shape[1], -1))
    return torch.cat(parts, dim=-1)


def _min_bulk_ess(result: FitResult) -> float:
    from mcmc.diagnostics import bulk_ess

    values = []
    for v in result.draws.values():
        if v.shape[1] >= 4 and v.is_floating_point():
            values += [float(e) for e in np.ravel(bulk_ess(v)) if math.isfinite(e)]
    return min(values) if values else float("nan")


def evaluate(spec: ModelSpec, result: FitResult) -> dict:
    """Metrics of one fit: wall time, ESS/s, distance to the reference, held-out log density."""
    from mcmc.diagnostics import log_likelihood

    metrics: dict = {"method": result.method, "model": spec.name, "wall_s": result.wall_time}
    if result.ess_defined:
        metrics["min_ess"] = _min_bulk_ess(result)
        metrics["ess_per_s"] = metrics["min_ess"] / result.wall_time
    ref = spec.reference
    if ref is not None:
        # distances are over the continuous latents (discrete ones are summarised elsewhere)
        sites = [s for s in ref.draws if s in result.draws and s not in spec.discrete_sites]
        if sites:
            mean = {k: v for k, v in ref.mean().items() if k in sites}
            sd = {k: v.sqrt() for k, v in ref.variance().items() if k in sites}
            flat_draws = {k: result.draws[k].reshape((-1,) + result.draws[k].shape[2:])
                          for k in sites}
            metrics["mean_error_sd"] = mean_error(flat_draws, mean, scale=sd)
            # Energy distance on coordinates standardised by the reference's sd (scale-free),
            # each side thinned to at most 1000 points to keep it O(10^6) distances.
            x = _flat_draws(result, sites)
            y = torch.cat([ref.draws[k].double().reshape(ref.draws[k].shape[0], -1)
                           for k in sites], -1)
            y = y.to(x.device)
            loc, scale = y.mean(0), y.std(0).clamp_min(1e-12)
            g = torch.Generator().manual_seed(0)
            xi = torch.randperm(x.shape[0], generator=g)[:1000]
            yi = torch.randperm(y.shape[0], generator=g)[:1000]
            metrics["energy_distance"] = float(
                energy_distance((x[xi] - loc) / scale, (y[yi] - loc) / scale)
            )
    if spec.heldout is not None and all(s in result.draws for s in spec.latent_sites):
        args, kwargs = spec.heldout
        try:
            ll = log_likelihood(spec.model, {k: result.draws[k] for k in spec.latent_sites},
                                args, kwargs, max_plate_nesting=spec.max_plate_nesting)
            total = 0.0
            for v in ll.values():
                v = torch.as_tensor(v).double()
                v = v.reshape(v.shape[0] * v.shape[1], -1)  # (S, N)
                total += float((torch.logsumexp(v, 0) - math.log(v.shape[0])).sum())
            metrics["heldout_lpd"] = total
        except Exception as exc:  # noqa: BLE001 - a metric must not sink the run
            metrics["heldout_lpd_error"] = f"{type(exc).__name__}: {exc}"
    return metrics


def diagnose(result: FitResult) -> tuple[str, list[str]]:
    """``(summary line, warnings)`` for one fit, each sentence naming the method and model.

    MCMC chains: split R-hat (>= 2 chains) and bulk ESS; particle sets: R-hat between the sets
    and the KSD before/after when the method reports it; VI: how the stopping rule ended. The
    method's own warnings (e.g. a VI fit that hit its step cap) come first.
    """
    from mcmc.diagnostics import check_convergence

    name = f"{result.method} on {result.model}"
    draws = {k: v for k, v in result.draws.items() if v.is_floating_point()}
    info = result.info
    messages = list(result.warnings)
    if result.kind == "particles":
        report = check_convergence(draws, kind="particles", name=name, ksd=info.get("ksd"),
                                   initial_ksd=info.get("initial_ksd"),
                                   ksd_level=info.get("ksd_level"),
                                   stuck_fraction=info.get("stuck_fraction"))
        summary = report.summary
    elif result.ess_defined:
        report = check_convergence(draws, name=name)
        summary = report.summary
    else:  # iid draws from a fitted guide: the stopping rule is the diagnostic
        report = None
        how = {"settled": "objective settled", "cap": "hit the step cap"}.get(info.get("stop"),
                                                                            "fitted")
        summary = f"{name}: {how} after {info.get('num_steps', '?')} steps"
        if "final_lr" in info:
            summary += f" (lr {info['lr']:g} -> {info['final_lr']:g})"
        summary += f"; {len(messages)} warning(s)" if messages else ": ok"
    if report is not None:
        messages += list(report.warnings)
        if result.warnings:
            summary += f" (+{len(result.warnings)} from the method)"
    return summary, messages


def summary_table(result: FitResult, max_rows: int = 40) -> list[dict]:
    """Per coordinate: mean, sd, 5% and 95% quantiles, and (where defined) bulk ESS and R-hat.

    ESS for MCMC chains (not for particles or iid guide draws); R-hat with >= 2 chains or
    particle sets and >= 4 draws each. Coordinates beyond ``max_rows`` are left out.
    """
    from mcmc.diagnostics import bulk_ess, split_rhat

    rows = []
    for name, v in result.draws.items():
        x = v.double().reshape(v.shape[0], v.shape[1], -1).numpy()
        flat = x.reshape(-1, x.shape[-1])
        with_ess = result.ess_defined and x.shape[1] >= 4
        with_rhat = x.shape[0] >= 2 and x.shape[1] >= 4
        ess = bulk_ess(x) if with_ess else None
        rhat = split_rhat(x) if with_rhat else None
        shape = tuple(v.shape[2:])
        for j in range(flat.shape[1]):
            if len(rows) >= max_rows:
                return rows
            label = name if not shape else f"{name}[{','.join(map(str, np.unravel_index(j, shape)))}]"
            row = {"site": label, "mean": flat[:, j].mean(), "sd": flat[:, j].std(ddof=1)
                   if flat.shape[0] > 1 else float("nan"),
                   "q5": np.quantile(flat[:, j], 0.05), "q95": np.quantile(flat[:, j], 0.95)}
            if ess is not None:
                row["ess_bulk"] = float(ess[j])
            if rhat is not None:
                row["r_hat"] = float(rhat[j])
            rows.append(row)
    return rows
