"""The ``pyroforge`` command line: list the zoo, fit a model with a method, compare methods.

    pyroforge list [--method METHOD]
    pyroforge run MODEL --method METHOD [--num-samples N] [--option KEY=VALUE ...] [--out DIR]
    pyroforge compare [MODEL] [--methods a,b,...] [--option [METHOD.]KEY=VALUE ...] [--out DIR]

``run`` writes ``DIR/MODEL-METHOD.nc`` (ArviZ InferenceData), ``DIR/MODEL-METHOD-summary.csv``
(per-coordinate mean, sd, quantiles, bulk ESS, split R-hat), ``DIR/MODEL-METHOD-metrics.json``
(distance to the reference posterior) and ``DIR/MODEL-METHOD.png`` (trace and marginal plots
against the reference). ``compare`` prints one table (wall time, ESS/s where defined, distance to
the reference, held-out log predictive density) and saves it as ``DIR/compare-MODEL.csv`` and
``.png``. Files are written atomically, with the permissions the umask gives new files.

After every fit a one-line diagnostic summary is printed (split R-hat and bulk ESS of MCMC chains,
KSD of particle sets, how a VI fit stopped), and warnings, on stderr, say what to change when a
result should not be trusted. Torch runs on ``--threads`` intra-op threads (default 1: the zoo's
models are small, and more threads only add synchronisation, badly so on a busy machine).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import os
import re
import sys
import traceback

from .catalog import MODELS
from .methods import SETTINGS, FitConfig, Method, OptionError, get_method, method_names, methods

DEFAULT_COMPARE_MODEL = "gaussian_conjugate"
DEFAULT_NUM_SAMPLES = {"run": 1000, "compare": 500}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyroforge")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown (not installed)"


def _error(message: str) -> SystemExit:
    return SystemExit(f"pyroforge: error: {message}")


def _warn(message: str) -> None:
    print(f"pyroforge: warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- argument types
def _one_of(kind: str, name: str, valid) -> str:
    """``name`` if it is in ``valid``, else an argparse error naming the closest valid one."""
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise argparse.ArgumentTypeError(
            f"unknown {kind} {name!r}{hint}; valid {kind}s: {', '.join(valid)}")
    return name


def _model_name(name: str) -> str:
    return _one_of("model", name, MODELS)


def _method_name(name: str) -> str:
    return _one_of("method", name, method_names())


def _method_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"no method names in {text!r}; give a comma-separated list of: "
            f"{', '.join(method_names())}")
    return [_method_name(m) for m in names]


def _device(text: str) -> str:
    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; choose auto, cpu, cuda or cuda:N")
    return text


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") \
                from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (or METHOD.KEY=VALUE), got {text!r}")
    return key.strip(), value.strip()


# --------------------------------------------------------------------------- options
def resolve_options(method_list: list[str], pairs: list[tuple[str, str]]) -> dict[str, dict]:
    """Typed options for each method from ``[(key, value)]``; raises :class:`OptionError`.

    ``key`` applies to every listed method that declares it; ``method.key`` to that method only.
    A key that no listed method declares, and any value a method does not allow, is an error
    that lists the valid options.
    """
    table = methods()
    raw: dict[str, dict] = {m: {} for m in method_list}
    specific = [(k, v) for k, v in pairs if "." in k]
    for key, value in [(k, v) for k, v in pairs if "." not in k]:
        takers = [m for m in method_list if table[m].option(key) is not None]
        if not takers:
            valid = sorted({o.name for m in method_list for o in table[m].options})
            raise OptionError(
                f"--option {key}={value}: no method run here has an option {key!r}; their "
                f"options are: {', '.join(valid) or 'none'} (see `pyroforge list --method M`)")
        for m in takers:
            raw[m][key] = value
    for key, value in specific:  # METHOD.KEY wins over KEY
        target, _, name = key.rpartition(".")
        if target not in raw:
            raise OptionError(f"--option {key}={value}: {target!r} is not among the methods run "
                              f"({', '.join(method_list)})")
        raw[target][name] = value  # an unknown name is reported with the valid options below
    return {m: table[m].parse_options(raw[m]) for m in method_list}


def _unused_settings(method: Method, given: dict) -> list[str]:
    return [s for s, v in given.items() if v is not None and s not in method.settings]


# --------------------------------------------------------------------------- output helpers
def _check_out(folder: str) -> str:
    """Create ``folder`` if needed and prove we can write there, before any work is done."""
    import tempfile

    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise _error(f"--out {folder!r} is a file, not a folder; give a folder to write into")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pyroforge-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise _error(f"--out {folder!r} is not writable ({exc.strerror})") from None
    return folder


def _write_text(path: str, text: str) -> str:
    from mcmc.diagnostics import atomic_write

    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    return atomic_write(path, write)


def _report(result) -> list[str]:
    """Print the diagnostic summary line (stdout) and the warnings (stderr); return them."""
    from .metrics import diagnose

    summary, messages = diagnose(result)
    print(f"diagnostics: {summary}", flush=True)
    for message in messages:
        _warn(message)
    return messages


def _inference_data(spec, result):
    import warnings

    from mcmc.diagnostics import to_inference_data

    big = [k for k, v in result.draws.items() if v[0, 0].numel() > 2000]
    draws = {k: v for k, v in result.draws.items() if k not in big}
    stats = dict(result.sample_stats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # ArviZ's shape heuristic (0.x: "More chains ...", 1.x: "Found chain dimension to be
        # longer ...") misfires on e.g. 2 chains x 1 draw, which is what was asked for
        warnings.filterwarnings("ignore", "(More chains|Found chain dimension)", UserWarning)
        return to_inference_data(draws, model=spec.model, model_args=spec.args,
                                 model_kwargs=spec.kwargs, sample_stats=stats or None)


def _plot(spec, result, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mcmc.diagnostics import atomic_write

    coords = []
    for name, v in result.draws.items():
        flat = v.reshape(v.shape[0], v.shape[1], -1)
        for j in range(min(flat.shape[-1], 6 - len(coords))):
            ref = None
            if spec.reference is not None and name in spec.reference.draws:
                draws = spec.reference.draws[name]
                ref = draws.reshape(draws.shape[0], -1)[:, j]
            label = name if flat.shape[-1] == 1 else f"{name}[{j}]"
            coords.append((label, flat[..., j], ref))
        if len(coords) >= 6:
            break
    fig, axes = plt.subplots(len(coords), 2, figsize=(9, 1.8 * len(coords) + 0.5), squeeze=False)
    for (label, chains, ref), (ax_trace, ax_hist) in zip(coords, axes):
        for c in range(chains.shape[0]):
            ax_trace.plot(chains[c].float().numpy(), lw=0.5)
        ax_trace.set_ylabel(label)
        ax_hist.hist(chains.reshape(-1).float().numpy(), bins=40, density=True, alpha=0.6,
                     label=result.method)
        if ref is not None:
            ax_hist.hist(ref.cpu().float().numpy(), bins=40, density=True, histtype="step",
                         color="k", label="reference")
    axes[0, 0].set_title("trace (particles: index)" if result.kind == "particles" else "trace")
    axes[0, 1].set_title("marginal")
    axes[0, 1].legend(fontsize=7)
    fig.suptitle(f"{spec.name} — {result.method}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_rows(rows: list[dict], columns: list[str], last_free: bool = True) -> str:
    """A plain-text table of ``rows`` over the ``columns`` any row has."""
    cols = [c for c in columns if any(c in r for r in rows)]
    table = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    if last_free:
        widths[-1] = len(cols[-1])
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


# --------------------------------------------------------------------------- commands
def _setup_torch(args) -> None:
    import torch

    torch.set_num_threads(args.threads)


def _resolve_device(name: str):
    from .device import resolve_device

    try:
        return resolve_device(name)
    except (RuntimeError, ValueError) as exc:
        raise _error(str(exc)) from None


def cmd_list(args) -> int:
    if args.method is not None:
        print(get_method(args.method).help_text())
        return 0
    print("models:")
    for name, text in MODELS.items():
        print(f"  {name:<31} {text}")
    print("methods:")
    for name, method in methods().items():
        print(f"  {name:<31} {method.description}")
    print("\n`pyroforge list --method METHOD` shows a method's options.")
    return 0


SUMMARY_COLUMNS = ["site", "mean", "sd", "q5", "q95", "ess_bulk", "r_hat"]


def cmd_run(args) -> int:
    method = get_method(args.method)
    given = {"num_samples": args.num_samples, "num_steps": args.num_steps,
             "warmup_steps": args.warmup_steps}
    unused = _unused_settings(method, given)
    if unused:
        flags = ", ".join(SETTINGS[s].split(" (")[0] for s in unused)
        hint = (" (its particle count is --option num_particles=N)"
                if method.family == "particles" and "num_samples" in unused else "")
        raise _error(f"{flags} does not apply to {method.name}{hint}; {method.name} reads "
                     f"{', '.join(SETTINGS[s].split(' (')[0] for s in method.settings)}")
    try:
        options = resolve_options([method.name], args.option)[method.name]
    except OptionError as exc:
        raise _error(str(exc)) from None
    out = _check_out(args.out)
    _setup_torch(args)
    device = _resolve_device(args.device)
    from . import registry

    spec = registry.get(args.model, device=device)
    reason = method.applies_to(spec)
    if reason is not None:
        raise _error(f"method {method.name!r} does not apply to {spec.name!r}: {reason}")
    config = FitConfig(num_samples=args.num_samples or DEFAULT_NUM_SAMPLES["run"], seed=args.seed,
                       progress=not args.no_progress, num_steps=args.num_steps,
                       warmup_steps=args.warmup_steps, options=options)
    result = method.fit(spec, config)
    _report(result)

    from mcmc.diagnostics import save_inference_data

    from .metrics import evaluate, summary_table

    stem = os.path.join(out, f"{spec.name}-{result.method}")
    save_inference_data(_inference_data(spec, result), stem + ".nc")
    metrics = evaluate(spec, result)
    summary = summary_table(result, max_rows=10**6)
    columns = [c for c in SUMMARY_COLUMNS if any(c in r for r in summary)]
    _write_text(stem + "-summary.csv", _csv(summary, columns))
    _write_text(stem + "-metrics.json", json.dumps(metrics, indent=2))
    _plot(spec, result, stem + ".png")
    print()
    print(format_rows(summary[:40], SUMMARY_COLUMNS, last_free=False))
    if len(summary) > 40:
        print(f"... ({len(summary) - 40} more rows in the summary CSV)")
    print()
    for key, value in metrics.items():
        print(f"{key:>16}: {value:.4g}" if isinstance(value, float) else f"{key:>16}: {value}")
    print(f"\nwrote {stem}.nc, -summary.csv, -metrics.json, .png")
    return 0


COMPARE_COLUMNS = ["method", "status", "wall_s", "ess_per_s", "mean_error_sd", "energy_distance",
                   "heldout_lpd", "note"]


def compare(model: str, method_list: list[str], *, num_samples: int, seed: int, device,
            progress: bool, out: str | None, num_steps: int | None = None,
            warmup_steps: int | None = None, options=None, report: bool = False) -> list[dict]:
    """Run every method on ``model``; methods that don't apply are skipped with the reason.

    ``options``: ``[(key, value)]`` pairs as on the command line (``key`` or ``method.key``;
    see :func:`resolve_options`) or ``{key: value}``; checked before any method runs.
    ``report``: print each fit's diagnostic summary and warnings as it finishes. Each row's
    ``warnings`` holds the fit's warnings.
    """
    from . import registry
    from .metrics import diagnose, evaluate

    pairs = list(options.items()) if isinstance(options, dict) else list(options or [])
    typed = resolve_options(method_list, pairs)
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
                               num_steps=num_steps, warmup_steps=warmup_steps,
                               options=typed[name])
            result = method.fit(spec, config)
            if report:
                messages = _report(result)
            else:
                messages = diagnose(result)[1]
            note = f"{len(messages)} warning(s)" if messages else None
            rows.append({"status": "ok", **evaluate(spec, result), "method": name,
                         "note": note, "warnings": messages})
        except Exception as exc:  # noqa: BLE001 - one failing method must not hide the others
            rows.append({"method": name, "status": "failed", "note": f"{type(exc).__name__}: {exc}"})
            if os.environ.get("PYROFORGE_DEBUG"):
                traceback.print_exc()
    if out is not None:
        stem = os.path.join(out, f"compare-{spec.name}")
        csv_rows = [{**r, "note": "; ".join(r["warnings"]) if r.get("warnings") else r.get("note")}
                    for r in rows]
        _write_text(stem + ".csv", _csv(csv_rows, COMPARE_COLUMNS))
        plot_compare(spec.name, rows, stem + ".png")
    return rows


def plot_compare(model: str, rows: list[dict], path: str) -> str:
    """Save :func:`compare_figure` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    from mcmc.diagnostics import atomic_write

    fig = compare_figure(model, rows)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path


def compare_figure(model: str, rows: list[dict]):
    """Bar charts of wall time, ESS/s, mean error and energy distance on linear axes, with the
    value written at each bar; every method is on every panel (skipped and failed ones
    labelled as such, without a bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("wall_s", "wall time (s)"), ("ess_per_s", "min bulk ESS / s (MCMC only)"),
              ("mean_error_sd", "posterior-mean error (posterior sd)"),
              ("energy_distance", "energy distance to the reference")]
    panels = [(m, t) for m, t in panels if any(m in r for r in rows)] or panels[:1]
    labels = []
    for r in rows:
        suffix = {"skipped": " (skipped)", "failed": " (failed)"}.get(r["status"], "")
        labels.append(r["method"] + suffix)
    height = 0.28 * len(rows) + 1.2
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.2, height),
                             sharey=True, squeeze=False)
    positions = list(range(len(rows)))[::-1]
    for ax, (metric, title) in zip(axes[0], panels):
        values = [r.get(metric) if r["status"] == "ok" else None for r in rows]
        bars = [v if isinstance(v, float) else 0.0 for v in values]
        ax.barh(positions, bars, color="tab:blue")
        top = max(bars) if any(bars) else 1.0
        for y, v, r in zip(positions, values, rows):
            text = f"{v:.3g}" if isinstance(v, float) else ("n/a" if r["status"] == "ok"
                                                              else r["status"])
            ax.text((v if isinstance(v, float) else 0.0) + 0.01 * top, y, text, va="center",
                    fontsize=7, color="black" if isinstance(v, float) else "gray")
        ax.set_xlim(0, top * 1.25)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes[0, 0].set_yticks(positions)
    axes[0, 0].set_yticklabels(labels, fontsize=8)
    fig.suptitle(f"pyroforge compare {model} (linear axes)", fontsize=10)
    fig.tight_layout()
    return fig


def format_table(rows: list[dict]) -> str:
    return format_rows(rows, COMPARE_COLUMNS)


def cmd_compare(args) -> int:
    names = args.methods or method_names()
    try:
        resolve_options(names, args.option)  # bad options fail before any work
    except OptionError as exc:
        raise _error(str(exc)) from None
    out = _check_out(args.out)
    _setup_torch(args)
    device = _resolve_device(args.device)
    given = {"num_samples": args.num_samples, "num_steps": args.num_steps,
             "warmup_steps": args.warmup_steps}
    for setting, value in given.items():
        if value is None:
            continue
        skip = [m for m in names if setting not in get_method(m).settings]
        if skip:
            print(f"note: {SETTINGS[setting].split(' (')[0]} does not apply to {', '.join(skip)}",
                  flush=True)
    rows = compare(args.model, names,
                   num_samples=args.num_samples or DEFAULT_NUM_SAMPLES["compare"], seed=args.seed,
                   device=device, progress=not args.no_progress, out=out,
                   num_steps=args.num_steps, warmup_steps=args.warmup_steps, options=args.option,
                   report=True)
    print()
    print(format_table(rows))
    print(f"\nwrote {os.path.join(out, f'compare-{args.model}')}.csv and .png")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


# --------------------------------------------------------------------------- parser
def build_parser(method_help: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyroforge",
        description="pyroforge: list the model zoo, fit a model with a method, compare methods.",
        epilog="`pyroforge COMMAND --help` for each command; `pyroforge list --method M` for a "
               "method's options.")
    parser.add_argument("--version", action="version", version=f"pyroforge {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lst = sub.add_parser("list", help="list zoo models and methods (or one method's options)")
    lst.add_argument("--method", type=_method_name, default=None, metavar="METHOD",
                     help="show this method's options and the settings it reads")
    sub.add_parser("federated", help="FSGLD/DSGLD, one process per shard (under torchrun); "
                   "see `pyroforge federated --help`")

    def common(p):
        p.add_argument("--num-samples", type=_int_at_least(1), default=None, metavar="N",
                       help=f"posterior draws per chain (default {DEFAULT_NUM_SAMPLES[p.prog.split()[-1]]}"
                            "; MCMC and VI methods)")
        p.add_argument("--num-steps", type=_int_at_least(1), default=None, metavar="N",
                       help="iterations: the cap of a VI fit's stopping rule (default 5000), a "
                            "particle method's number of iterations")
        p.add_argument("--warmup-steps", type=_int_at_least(0), default=None, metavar="N",
                       help="sampler warm-up steps per chain (default: the method's)")
        p.add_argument("--device", type=_device, default="auto",
                       help="auto (CUDA if available), cpu, cuda or cuda:N (default auto)")
        p.add_argument("--threads", type=_int_at_least(1), default=1, metavar="N",
                       help="torch intra-op threads (default 1: the zoo's models are small; "
                            "raise it for large models on an otherwise idle machine)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default="pyroforge-out", metavar="DIR",
                       help="output folder (default pyroforge-out)")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        p.add_argument("--option", type=_key_value, action="append", default=[],
                       metavar="KEY=VALUE",
                       help="a method option, e.g. lr=0.01 or step_size=1e-4 (repeatable); "
                            "`pyroforge list --method M` lists a method's options")

    formatter = argparse.RawDescriptionHelpFormatter
    run_epilog = method_help or ("methods: " + ", ".join(method_names()) + "\n"
                                 "`pyroforge run MODEL --method M --help` shows M's options.")
    run = sub.add_parser("run", help="fit MODEL with METHOD and write InferenceData + plots",
                         epilog=run_epilog, formatter_class=formatter)
    run.add_argument("model", type=_model_name, metavar="MODEL",
                     help="one of: " + ", ".join(MODELS))
    run.add_argument("--method", type=_method_name, required=True, metavar="METHOD",
                     help="one of: " + ", ".join(method_names()))
    common(run)
    cmp_ = sub.add_parser(
        "compare", help="run several methods on MODEL and tabulate", formatter_class=formatter,
        epilog="--option KEY=VALUE applies to the methods that declare KEY (an error if none "
               "does); --option METHOD.KEY=VALUE to METHOD only.")
    cmp_.add_argument("model", nargs="?", type=_model_name, default=DEFAULT_COMPARE_MODEL,
                      metavar="MODEL", help=f"default {DEFAULT_COMPARE_MODEL}; one of: "
                                            + ", ".join(MODELS))
    cmp_.add_argument("--methods", type=_method_list, default=None, metavar="M1,M2,...",
                      help="comma-separated (default: every method)")
    common(cmp_)
    return parser


def _method_in_argv(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["federated"]:  # its own parser: models/federated_cli.py
        from .federated_cli import main as federated_main

        return federated_main(argv[1:])
    method_help = None
    if argv[:1] == ["run"] and ("-h" in argv or "--help" in argv):
        name = _method_in_argv(argv)
        if name in method_names():
            method_help = get_method(name).help_text()
    args = build_parser(method_help).parse_args(argv)
    try:
        if args.command == "list":
            return cmd_list(args)
        if args.command == "run":
            return cmd_run(args)
        return cmd_compare(args)
    except KeyError as exc:  # unknown model or method: the message lists the valid names
        raise _error(exc.args[0]) from None


if __name__ == "__main__":
    sys.exit(main())
