"""Side-by-side benchmark harness.

A benchmark is a function ``fn(quick: bool) -> {implementation: zero-arg callable}`` registered with
:func:`benchmark`. The harness warms every implementation up, then times them *interleaved* (one
call of each per round, in rotating order) in this one process, so that slow drifts of the machine
(thermal, other load) hit all of them alike. It reports median seconds per call, the ratios named
by the benchmark's :class:`Target` s (met or not) and writes JSON.

An implementation may return a dict; the last call's dict is kept as ``extra``. If it has an
``"ess"`` entry the harness derives ``ess_per_s = ess / median seconds`` (a metric for targets).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_REGISTRY: dict[str, Benchmark] = {}


@dataclass(frozen=True)
class Target:
    """``metric(numerator) / metric(denominator) <op> value``, e.g. time ratio <= 1.1."""

    numerator: str
    denominator: str
    op: str
    value: float
    metric: str = "time"

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"Target op must be '<=' or '>=', got {self.op!r}")
        if self.metric not in ("time", "ess_per_s"):
            raise ValueError(f"Target metric must be 'time' or 'ess_per_s', got {self.metric!r}")

    def describe(self) -> str:
        return f"{self.metric}({self.numerator}) / {self.metric}({self.denominator}) {self.op} {self.value:g}"


@dataclass
class Benchmark:
    name: str
    fn: Callable[[bool], dict[str, Callable[[], object]]]
    targets: tuple[Target, ...] = ()
    repeats: int = 20
    warmup: int = 3
    description: str = ""


def benchmark(
    name: str,
    targets: list[Target] | tuple[Target, ...] = (),
    *,
    repeats: int = 20,
    warmup: int = 3,
) -> Callable:
    """Register ``fn(quick) -> {impl: callable}`` as benchmark ``name``."""

    def decorate(fn):
        if name in _REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        _REGISTRY[name] = Benchmark(
            name, fn, tuple(targets), repeats, warmup, (fn.__doc__ or "").strip()
        )
        return fn

    return decorate


def discover() -> dict[str, Benchmark]:
    """Import every ``benchmarks/bench_*.py`` module and return the registry."""
    import benchmarks

    for info in pkgutil.iter_modules(benchmarks.__path__):
        if info.name.startswith("bench_"):
            importlib.import_module(f"benchmarks.{info.name}")
    return dict(_REGISTRY)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import pyro

        info["pyro"] = pyro.__version__
    except ImportError:  # pragma: no cover - pyro is a dependency
        pass
    return info


def time_side_by_side(
    impls: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds per call of each implementation, measured in interleaved rounds."""
    if not impls:
        raise ValueError("a benchmark must return at least one implementation")
    names = list(impls)
    extra: dict[str, object] = {}
    for name in names:
        for _ in range(warmup):
            extra[name] = impls[name]()
        _sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            _sync()
            start = time.perf_counter()
            extra[name] = impls[name]()
            _sync()
            times[name].append(time.perf_counter() - start)
    return times, extra


def run(name: str, quick: bool = False, out_dir: str | None = None) -> dict:
    """Run benchmark ``name`` and return (and optionally write) its JSON-able result."""
    registry = discover()
    if name not in registry:
        raise KeyError(f"unknown benchmark {name!r}; available: {', '.join(sorted(registry))}")
    bench = registry[name]
    impls = bench.fn(quick)
    repeats = max(3, bench.repeats // 4) if quick else bench.repeats
    times, extra = time_side_by_side(impls, repeats, 1 if quick else bench.warmup)
    results = {}
    for impl, ts in times.items():
        entry = {"median_s": statistics.median(ts), "min_s": min(ts), "repeats": len(ts)}
        info = extra.get(impl)
        if isinstance(info, dict):
            entry["extra"] = {k: float(v) if isinstance(v, (int, float)) else str(v) for k, v in info.items()}
            if "ess" in info:
                entry["ess_per_s"] = float(info["ess"]) / entry["median_s"]
        results[impl] = entry
    targets = []
    for t in bench.targets:
        key = "median_s" if t.metric == "time" else "ess_per_s"
        num, den = results.get(t.numerator, {}).get(key), results.get(t.denominator, {}).get(key)
        ratio = None if num is None or den is None or den == 0 else num / den
        met = None if ratio is None else (ratio <= t.value if t.op == "<=" else ratio >= t.value)
        targets.append({**dataclasses.asdict(t), "target": t.describe(), "ratio": ratio, "met": met})
    record = {
        "benchmark": name,
        "description": bench.description,
        "quick": quick,
        "results": results,
        "targets": targets,
        "machine": machine_info(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
            json.dump(record, fh, indent=2)
    return record


def format_record(record: dict) -> str:
    """A short human-readable table of one benchmark record."""
    lines = [f"== {record['benchmark']}{' (quick)' if record['quick'] else ''}"]
    for impl, r in record["results"].items():
        extra = f"  ess/s={r['ess_per_s']:.3g}" if "ess_per_s" in r else ""
        lines.append(f"  {impl:<28} median {r['median_s'] * 1e3:10.3f} ms{extra}")
    for t in record["targets"]:
        ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.3f}"
        status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"  target {t['target']}: measured {ratio} -> {status}")
    return "\n".join(lines)


def markdown_report(records: list[dict], command: str) -> str:
    """RESULTS.md: every benchmark's medians and target ratios, with machine and versions."""
    machine = records[0]["machine"] if records else machine_info()
    lines = [
        "# Benchmark results",
        "",
        (f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
         "do not edit by hand."),
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()),
        "",
        "Each benchmark times its implementations side by side in one process (interleaved rounds);",
        "medians per call. A ratio is numerator / denominator of the named metric.",
        "",
        "## Targets",
        "",
        "| benchmark | target | measured | status |",
        "| --- | --- | --- | --- |",
    ]
    for rec in records:
        for t in rec["targets"]:
            ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.3f}"
            status = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
            lines.append(f"| {rec['benchmark']} | {t['target']} | {ratio} | {status} |")
    lines += ["", "## Timings", ""]
    for rec in records:
        lines += [f"### {rec['benchmark']}{' (quick sizes)' if rec['quick'] else ''}", ""]
        if rec["description"]:
            lines += [rec["description"], ""]
        lines += ["| implementation | median ms | min ms | ESS/s | extra |", "| --- | --- | --- | --- | --- |"]
        for impl, r in rec["results"].items():
            ess = f"{r['ess_per_s']:.4g}" if "ess_per_s" in r else ""
            extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in r.get("extra", {}).items())
            lines.append(f"| {impl} | {r['median_s'] * 1e3:.3f} | {r['min_s'] * 1e3:.3f} | {ess} | {extra} |")
        lines.append("")
    return "\n".join(lines)
