"""The ``pyroforge`` command line: list the zoo, fit a model with a method, compare methods.

    pyroforge list
    pyroforge run MODEL --method METHOD [--num-samples N] [--device cpu|cuda|auto] [--seed S]
                  [--out DIR]
    pyroforge compare [MODEL] [--methods a,b,...] [--num-samples N] [--device ...] [--out DIR]

``run`` writes ``DIR/MODEL-METHOD.nc`` (ArviZ InferenceData), ``DIR/MODEL-METHOD-summary.csv``
(the ArviZ summary), ``DIR/MODEL-METHOD-metrics.json`` (distance to the reference posterior) and
``DIR/MODEL-METHOD.png`` (trace and marginal plots against the reference). ``compare`` prints one
table (wall time, ESS/s where defined, distance to the reference, held-out log predictive density)
and saves it as ``DIR/compare-MODEL.csv`` and ``.png``. Every file is written atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable

import torch

from . import registry
from .device import DEVICE_CHOICES, resolve_device
from .methods import FitConfig, FitResult, get_method, method_names
from .spec import ModelSpec

DEFAULT_COMPARE_MODEL = "gaussian_conjugate"


# --------------------------------------------------------------------------- output helpers
def _check_writable(folder: str) -> str:
    """Create ``folder`` if needed and prove we can write there, before any work is done."""
    folder = os.path.abspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pyroforge-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise SystemExit(f"pyroforge: error: --out {folder!r} is not writable ({exc.strerror})")
    return folder


def _atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` then rename onto ``path`` (no half-written results)."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    return _atomic_write(path, write)


# --------------------------------------------------------------------------- evaluation
def _flat_draws(result: FitResult, sites: list[str]) -> torch.Tensor:
    """``(chains*draws, D)`` concatenation of the given sites' draws."""
    parts = []
    for name in sites:
        v = result.draws[name].double()
        parts.append(v.reshape(v.shape[0] * v.shape[1], -1))
    return torch.cat(parts, dim=-1)


def evaluate(spec: ModelSpec, result: FitResult, idata=None) -> dict:
    """Metrics of one fit: wall time, ESS/s, distance to the reference, held-out log density."""
    from mcmc.diagnostics import energy_distance, log_likelihood, mean_error, posterior_dataset

    metrics: dict = {"method": result.method, "model": spec.name, "wall_s": result.wall_time}
    if result.ess_defined and idata is not None:
        import arviz as az

        ess = az.ess(posterior_dataset(idata))
        values = [float(v) for name in ess.data_vars for v in ess[name].values.reshape(-1)]
        finite = [v for v in values if math.isfinite(v)]
        metrics["min_ess"] = min(finite) if finite else float("nan")
        metrics["ess_per_s"] = metrics["min_ess"] / result.wall_time
    ref = spec.reference
    if ref is not None:
        # distances are over the continuous latents (discrete ones are summarised elsewhere)
        sites = [s for s in ref.draws if s in result.draws and s not in spec.discrete_sites]
        if sites:
            mean = {k: v for k, v in ref.mean().items() if k in sites}
            sd = {k: v.sqrt() for k, v in ref.variance().items() if k in sites}
            flat_draws = {k: result.draws[k].reshape((-1,) + result.draws[k].shape[2:]) for k in sites}
            metrics["mean_error_sd"] = mean_error(flat_draws, mean, scale=sd)
            # Energy distance on coordinates standardised by the reference's sd (scale-free),
            # each side thinned to at most 1000 points to keep it O(10^6) distances.
            x = _flat_draws(result, sites)
            y = torch.cat([ref.draws[k].double().reshape(ref.draws[k].shape[0], -1) for k in sites], -1)
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


def _inference_data(spec: ModelSpec, result: FitResult):
    from mcmc.diagnostics import to_inference_data

    big = [k for k, v in result.draws.items() if v[0, 0].numel() > 2000]
    draws = {k: v for k, v in result.draws.items() if k not in big}
    stats = {k: v for k, v in result.sample_stats.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_inference_data(draws, model=spec.model, model_args=spec.args,
                                 model_kwargs=spec.kwargs, sample_stats=stats or None)


def _plot(spec: ModelSpec, result: FitResult, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords = []
    for name, v in result.draws.items():
        flat = v.reshape(v.shape[0], v.shape[1], -1)
        for j in range(min(flat.shape[-1], 6 - len(coords))):
            ref = None
            if spec.reference is not None and name in spec.reference.draws:
                ref = spec.reference.draws[name].reshape(spec.reference.draws[name].shape[0], -1)[:, j]
            label = name if flat.shape[-1] == 1 else f"{name}[{j}]"
            coords.append((label, flat[..., j], ref))
        if len(coords) >= 6:
            break
    fig, axes = plt.subplots(len(coords), 2, figsize=(9, 1.8 * len(coords) + 0.5), squeeze=False)
    for (label, chains, ref), (ax_trace, ax_hist) in zip(coords, axes):
        for c in range(chains.shape[0]):
            ax_trace.plot(chains[c].numpy(), lw=0.5)
        ax_trace.set_ylabel(label)
        ax_hist.hist(chains.reshape(-1).numpy(), bins=40, density=True, alpha=0.6, label=result.method)
        if ref is not None:
            ax_hist.hist(ref.cpu().numpy(), bins=40, density=True, histtype="step", color="k",
                         label="reference")
    axes[0, 0].set_title("trace")
    axes[0, 1].set_title("marginal")
    axes[0, 1].legend(fontsize=7)
    fig.suptitle(f"{spec.name} — {result.method}")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- commands
def _fit(spec: ModelSpec, method_name: str, config: FitConfig) -> FitResult:
    method = get_method(method_name)
    reason = method.applies_to(spec)
    if reason is not None:
        raise SystemExit(f"pyroforge: error: method {method_name!r} does not apply to "
                         f"{spec.name!r}: {reason}")
    return method.fit(spec, config)


def cmd_list(args) -> int:
    print("models:")
    for name in registry.names():
        print(f"  {name:<32} {registry.description(name)}")
    print("methods:")
    for name in method_names():
        print(f"  {name:<32} {get_method(name).description}")
    return 0


def cmd_run(args) -> int:
    out = _check_writable(args.out)
    device = resolve_device(args.device)
    spec = registry.get(args.model, device=device)
    get_method(args.method)  # unknown names fail before any work
    config = FitConfig(num_samples=args.num_samples, seed=args.seed, progress=not args.no_progress,
                       num_steps=args.num_steps, options=args.options)
    result = _fit(spec, args.method, config)
    idata = _inference_data(spec, result)
    stem = os.path.join(out, f"{spec.name}-{result.method}")
    from mcmc.diagnostics import posterior_dataset, save_inference_data

    save_inference_data(idata, stem + ".nc")
    metrics = evaluate(spec, result, idata)
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = az.summary(posterior_dataset(idata))
    _write_text(stem + "-summary.csv", summary.to_csv())
    _write_text(stem + "-metrics.json", json.dumps(metrics, indent=2))
    _plot(spec, result, stem + ".png")
    print(summary.to_string())
    print()
    for key, value in metrics.items():
        print(f"{key:>16}: {value:.4g}" if isinstance(value, float) else f"{key:>16}: {value}")
    print(f"\nwrote {stem}.nc, -summary.csv, -metrics.json, .png")
    return 0


COMPARE_COLUMNS = ["method", "status", "wall_s", "ess_per_s", "mean_error_sd", "energy_distance",
                   "heldout_lpd", "note"]


def compare(model: str, method_list: list[str], *, num_samples: int, seed: int, device,
            progress: bool, out: str | None, num_steps: int | None = None,
            options: dict | None = None) -> list[dict]:
    """Run every method on ``model``; methods that don't apply are skipped with the reason."""
    spec = registry.get(model, device=device)
    rows = []
    for name in method_list:
        method = get_method(name)
        reason = method.applies_to(spec)
        if reason is not None:
            rows.append({"method": name, "status": "skipped", "note": reason})
            continue
        try:
            config = FitConfig(num_samples=num_samples, seed=seed, progress=progress,
                               num_steps=num_steps, options=dict(options or {}))
            result = method.fit(spec, config)
            idata = _inference_data(spec, result) if result.ess_defined else None
            rows.append({"status": "ok", **evaluate(spec, result, idata), "method": name})
        except Exception as exc:  # noqa: BLE001 - one failing method must not hide the others
            rows.append({"method": name, "status": "failed", "note": f"{type(exc).__name__}: {exc}"})
            if os.environ.get("PYROFORGE_DEBUG"):
                traceback.print_exc()
    if out is not None:
        stem = os.path.join(out, f"compare-{spec.name}")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COMPARE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        _write_text(stem + ".csv", buf.getvalue())
        _plot_compare(spec.name, rows, stem + ".png")
    return rows


def _plot_compare(model: str, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    metrics = [m for m in ("wall_s", "mean_error_sd", "energy_distance") if any(m in r for r in ok)]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4 * max(len(metrics), 1), 3.2),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        names = [r["method"] for r in ok if metric in r]
        values = [r[metric] for r in ok if metric in r]
        ax.barh(names, values)
        if metric != "wall_s" and values and min(values) > 0:  # errors span decades
            ax.set_xscale("log")
        ax.set_title(metric)
    fig.suptitle(f"pyroforge compare {model}")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cols = [c for c in COMPARE_COLUMNS if any(c in r for r in rows)]
    table = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    widths[-1] = len(cols[-1]) if cols[-1] == "note" else widths[-1]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


def cmd_compare(args) -> int:
    out = _check_writable(args.out)
    device = resolve_device(args.device)
    names = method_names() if args.methods is None else [m for m in args.methods.split(",") if m]
    for name in names:
        get_method(name)  # unknown names fail before any work
    rows = compare(args.model, names, num_samples=args.num_samples, seed=args.seed, device=device,
                   progress=not args.no_progress, out=out, num_steps=args.num_steps,
                   options=args.options)
    print(format_table(rows))
    print(f"\nwrote {os.path.join(out, f'compare-{args.model}')}.csv and .png")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyroforge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list zoo models and registered methods")
    sub.add_parser("federated", help="FSGLD/DSGLD, one process per shard (under torchrun); "
                   "see `pyroforge federated --help`")

    def common(p, num_samples):
        p.add_argument("--num-samples", type=int, default=num_samples, help="posterior draws")
        p.add_argument("--num-steps", type=int, default=None, help="optimisation steps (VI)")
        p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_CHOICES)}")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default="pyroforge-out", help="output folder")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="method option, e.g. estimator=reinforce, lr=0.01, step_size=1e-4 "
                            "(repeatable)")

    run = sub.add_parser("run", help="fit MODEL with METHOD and write InferenceData + plots")
    run.add_argument("model")
    run.add_argument("--method", required=True)
    common(run, 1000)
    cmp_ = sub.add_parser("compare", help="run several methods on MODEL and tabulate")
    cmp_.add_argument("model", nargs="?", default=DEFAULT_COMPARE_MODEL)
    cmp_.add_argument("--methods", default=None, help="comma-separated (default: all)")
    common(cmp_, 500)
    return parser


def parse_options(pairs: list[str]) -> dict:
    """``["lr=0.01", "estimator=mvd"]`` -> ``{"lr": 0.01, "estimator": "mvd"}`` (numbers parsed)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"pyroforge: error: --option expects KEY=VALUE, got {pair!r}")
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return options


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["federated"]:  # its own parser: models/federated_cli.py
        from .federated_cli import main as federated_main

        return federated_main(argv[1:])
    args = build_parser().parse_args(argv)
    if hasattr(args, "option"):
        args.options = parse_options(args.option)
    if getattr(args, "num_samples", 1) < 1:
        raise SystemExit("pyroforge: error: --num-samples must be >= 1")
    try:
        if args.command == "list":
            return cmd_list(args)
        if args.command == "run":
            return cmd_run(args)
        return cmd_compare(args)
    except KeyError as exc:  # unknown model or method: the message lists the valid names
        raise SystemExit(f"pyroforge: error: {exc.args[0]}")
    except RuntimeError as exc:
        if "CUDA" in str(exc):
            raise SystemExit(f"pyroforge: error: {exc}")
        raise


if __name__ == "__main__":
    sys.exit(main())
