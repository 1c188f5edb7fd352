"""Side-by-side benchmark harness.

A benchmark is a function ``fn(quick: bool) -> {implementation: zero-arg callable}`` registered with
:func:`benchmark`. The harness warms every implementation up, then times them *interleaved* (one
call of each per round, in rotating order) in this one process, so that slow drifts of the machine
(thermal, other load) hit all of them alike. It reports median seconds per call, the ratios named
by the benchmark's :class:`Target` s (met or not) and writes JSON.

An implementation may return a dict; the last call's dict is kept as ``extra``. If it has an
``"ess"`` entry the harness derives ``ess_per_s = ess / median seconds`` and ``ess_per_cpu_s =
ess / median CPU seconds`` (metrics for targets). A benchmark with an :class:`AccuracyGate`
counts that ESS only when the same dict shows the draws are accurate (``mean_error_sd`` and
``var_ratio`` against a reference); otherwise both rates are 0 and the ungated values are kept
for information.

An implementation that cannot run here (an optional peer library that is not installed) is
given as :class:`Skipped` with the reason: it is recorded, not timed, and a target that needs it
reads "not measured" with that reason.

Besides the wall-clock seconds the harness records the process CPU seconds of every call (all
threads; ``cpu/wall`` near 1 shows one busy core) and the seconds of the first warm-up call
(``first_call_s``: includes JIT compilation or tracing, which the median excludes).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

_REGISTRY: dict[str, Benchmark] = {}

METRICS = ("time", "ess_per_s", "ess_per_cpu_s")
_METRIC_KEY = {"time": "median_s", "ess_per_s": "ess_per_s", "ess_per_cpu_s": "ess_per_cpu_s"}


@dataclass(frozen=True)
class Skipped:
    """An implementation that is not run here, with the reason (e.g. a peer not installed)."""

    reason: str


@dataclass(frozen=True)
class AccuracyGate:
    """ESS counts only for accurate draws.

    An implementation's result dict must report ``mean_error_sd`` (root-mean-square over
    coordinates of the posterior-mean error, in reference posterior sds, as
    :func:`mcmc.diagnostics.mean_error`) and ``var_ratio`` (mean over coordinates of the draws'
    variance over the reference variance). The draws pass when ``mean_error_sd <=
    max_mean_error_sd`` and ``var_ratio`` lies in ``var_ratio_range``.
    """

    max_mean_error_sd: float = 0.2
    var_ratio_range: tuple[float, float] = (0.9, 1.1)

    def __post_init__(self) -> None:
        lo, hi = self.var_ratio_range
        if not (self.max_mean_error_sd > 0 and 0 < lo <= 1 <= hi):
            raise ValueError(f"AccuracyGate needs max_mean_error_sd > 0 and var_ratio_range "
                             f"(lo, hi) with 0 < lo <= 1 <= hi, got {self}")

    def check(self, info: dict) -> tuple[bool, str]:
        """``(passed, why)`` for one implementation's result dict."""
        missing = [k for k in ("mean_error_sd", "var_ratio") if k not in info]
        if missing:
            return False, f"reports no {' / '.join(missing)}"
        err, ratio = float(info["mean_error_sd"]), float(info["var_ratio"])
        lo, hi = self.var_ratio_range
        problems = []
        if not err <= self.max_mean_error_sd:  # also catches NaN
            problems.append(f"mean error {err:.3g} sd > {self.max_mean_error_sd:g}")
        if not lo <= ratio <= hi:
            problems.append(f"variance ratio {ratio:.3g} outside [{lo:g}, {hi:g}]")
        if problems:
            return False, "; ".join(problems)
        return True, f"mean error {err:.3g} sd, variance ratio {ratio:.3g}"

    def describe(self) -> str:
        lo, hi = self.var_ratio_range
        return (f"mean error <= {self.max_mean_error_sd:g} sd and variance ratio in "
                f"[{lo:g}, {hi:g}]")


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
        if self.metric not in METRICS:
            raise ValueError(f"Target metric must be one of {METRICS}, got {self.metric!r}")

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
    gate: AccuracyGate | None = None


def benchmark(
    name: str,
    targets: list[Target] | tuple[Target, ...] = (),
    *,
    repeats: int = 20,
    warmup: int = 3,
    gate: AccuracyGate | None = None,
) -> Callable:
    """Register ``fn(quick) -> {impl: callable or Skipped}`` as benchmark ``name``; with
    ``gate`` its ESS metrics count only for draws that pass the :class:`AccuracyGate`."""

    def decorate(fn):
        if name in _REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        _REGISTRY[name] = Benchmark(
            name, fn, tuple(targets), repeats, warmup, (fn.__doc__ or "").strip(), gate
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
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        import pyro

        info["pyro"] = pyro.__version__
    except ImportError:  # pragma: no cover - pyro is a dependency
        pass
    for peer in ("jax", "jaxlib", "numpyro", "blackjax"):  # only those a benchmark imported
        module = sys.modules.get(peer)
        if module is not None:
            info[peer] = getattr(module, "__version__", "?")
    if "jax" in sys.modules:
        info["jax_backend"] = sys.modules["jax"].default_backend()
    return info


class SideBySide(NamedTuple):
    """Per implementation: wall seconds and process CPU seconds of each timed call, the result
    of the last call, and the wall seconds of the first warm-up call."""

    times: dict[str, list[float]]
    cpu_times: dict[str, list[float]]
    extra: dict[str, object]
    first_call_s: dict[str, float]


def time_side_by_side(
    impls: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> SideBySide:
    """Seconds per call of each implementation, measured in interleaved rounds."""
    if not impls:
        raise ValueError("a benchmark must return at least one implementation")
    names = list(impls)
    extra: dict[str, object] = {}
    first: dict[str, float] = {}
    for name in names:
        for i in range(warmup):
            _sync()
            start = time.perf_counter()
            extra[name] = impls[name]()
            _sync()
            if i == 0:
                first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            _sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            extra[name] = impls[name]()
            _sync()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return SideBySide(times, cpu, extra, first)


def _jsonable(v):
    if isinstance(v, bool):
        return v
    return float(v) if isinstance(v, (int, float)) else str(v)


def _evaluate_target(t: Target, results: dict) -> dict:
    key = _METRIC_KEY[t.metric]
    note = ""
    for role, impl in (("numerator", t.numerator), ("denominator", t.denominator)):
        r = results.get(impl)
        if r is None:
            note = f"{impl} was not run"
        elif "skipped" in r:
            note = f"{impl} skipped: {r['skipped']}"
        elif key not in r:
            note = f"{impl} reports no {t.metric}"
        elif role == "denominator" and r[key] == 0:
            why = r.get("gate", {}).get("reason", "")
            note = f"{impl} has {t.metric} 0" + (f" (failed the accuracy gate: {why})" if why
                                                  else "")
        if note:
            break
    if note:
        return {**dataclasses.asdict(t), "target": t.describe(), "ratio": None, "met": None,
                "note": note}
    num, den = results[t.numerator], results[t.denominator]
    ratio = num[key] / den[key]
    met = ratio <= t.value if t.op == "<=" else ratio >= t.value
    gate = num.get("gate")
    if gate is not None and not gate["passed"]:
        note = f"{t.numerator} failed the accuracy gate: {gate['reason']}"
    # For time targets, the same ratio of CPU seconds: on a loaded machine a process waits for
    # its core and the wall-clock ratio drifts, the CPU ratio much less.
    cpu_ratio = (num["median_cpu_s"] / den["median_cpu_s"]
                 if t.metric == "time" and den.get("median_cpu_s") else None)
    return {**dataclasses.asdict(t), "target": t.describe(), "ratio": ratio, "met": met,
            "cpu_ratio": cpu_ratio, "note": note}


def baseline_of(results: dict) -> str | None:
    """The implementation the per-benchmark ratio column divides: the first timed one whose
    name starts with ``pyroforge``, else the first timed one."""
    timed = [k for k, r in results.items() if "median_s" in r]
    return next((k for k in timed if k.startswith("pyroforge")), timed[0] if timed else None)


def _process_warm_up() -> None:
    """Pay once per process the lazy imports that would land in whichever implementation's
    first call comes first: torch's first optimizer imports ``torch._dynamo`` (seconds)."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def run(name: str, quick: bool = False, out_dir: str | None = None) -> dict:
    """Run benchmark ``name`` and return (and optionally write) its JSON-able result."""
    _process_warm_up()
    registry = discover()
    if name not in registry:
        raise KeyError(f"unknown benchmark {name!r}; available: {', '.join(sorted(registry))}")
    bench = registry[name]
    built = bench.fn(quick)
    impls = {k: v for k, v in built.items() if not isinstance(v, Skipped)}
    repeats = min(bench.repeats, max(3, bench.repeats // 4)) if quick else bench.repeats
    measured = time_side_by_side(impls, repeats, 1 if quick else bench.warmup)
    results = {}
    for impl, value in built.items():
        if isinstance(value, Skipped):
            results[impl] = {"skipped": value.reason}
            continue
        ts, cpu = measured.times[impl], measured.cpu_times[impl]
        entry = {"median_s": statistics.median(ts), "min_s": min(ts), "repeats": len(ts),
                 "median_cpu_s": statistics.median(cpu),
                 "first_call_s": measured.first_call_s.get(impl)}
        info = measured.extra.get(impl)
        if isinstance(info, dict):
            entry["extra"] = {k: _jsonable(v) for k, v in info.items()}
            if "ess" in info:
                rates = {"ess_per_s": float(info["ess"]) / entry["median_s"],
                         "ess_per_cpu_s": float(info["ess"]) / max(entry["median_cpu_s"], 1e-9)}
                entry.update(rates)
                if bench.gate is not None:
                    passed, why = bench.gate.check(info)
                    entry["gate"] = {"passed": passed, "reason": why}
                    if not passed:  # inaccurate draws: their ESS does not count
                        entry.update({f"{k}_ungated": v for k, v in rates.items()})
                        entry.update({k: 0.0 for k in rates})
        results[impl] = entry
    targets = [_evaluate_target(t, results) for t in bench.targets]
    record = {
        "benchmark": name,
        "description": bench.description,
        "quick": quick,
        "gate": None if bench.gate is None else bench.gate.describe(),
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


def _status(t: dict, markdown: bool = False) -> str:
    if t["met"] is None:
        return f"not measured ({t['note']})" if t.get("note") else "not measured"
    text = "met" if t["met"] else ("**not met**" if markdown else "NOT met")
    return f"{text} ({t['note']})" if t.get("note") else text


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def format_record(record: dict) -> str:
    """A short human-readable table of one benchmark record."""
    lines = [f"== {record['benchmark']}{' (quick)' if record['quick'] else ''}"]
    for impl, r in record["results"].items():
        if "skipped" in r:
            lines.append(f"  {impl:<28} skipped: {r['skipped']}")
            continue
        extra = ""
        if "ess_per_cpu_s" in r:
            extra = f"  ess/cpu-s={r['ess_per_cpu_s']:.3g}"
            if "gate" in r:
                extra += "  gate " + ("passed" if r["gate"]["passed"] else
                                      f"FAILED ({r['gate']['reason']}; ungated "
                                      f"{r['ess_per_cpu_s_ungated']:.3g})")
        lines.append(f"  {impl:<28} median {r['median_s'] * 1e3:10.3f} ms{extra}")
    for t in record["targets"]:
        cpu = "" if t.get("cpu_ratio") is None else f" (CPU time {_ratio(t['cpu_ratio'])})"
        lines.append(f"  target {t['target']}: measured {_ratio(t['ratio'])}{cpu} -> "
                     f"{_status(t)}")
    return "\n".join(lines)


def markdown_targets(records: list[dict]) -> list[str]:
    """The targets of ``records`` as one Markdown table (lines)."""
    lines = ["| benchmark | target | measured | CPU-time ratio | status |",
             "| --- | --- | --- | --- | --- |"]
    for rec in records:
        for t in rec["targets"]:
            cpu = "" if t.get("cpu_ratio") is None else _ratio(t["cpu_ratio"])
            lines.append(f"| {rec['benchmark']} | {t['target']} | {_ratio(t['ratio'])} | {cpu} | "
                         f"{_status(t, markdown=True)} |")
    return lines


def _fmt_extra(extra: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in extra.items())


def markdown_timings(rec: dict) -> list[str]:
    """One benchmark's implementations as a Markdown table (lines), with the ratio of the
    baseline (the pyroforge implementation) to each implementation's median time."""
    results = rec["results"]
    base = baseline_of(results)
    lines = [f"### {rec['benchmark']}{' (quick sizes)' if rec['quick'] else ''}", ""]
    if rec["description"]:
        lines += [rec["description"], ""]
    if rec.get("gate"):
        lines += [(f"Accuracy gate on ESS: {rec['gate']}; draws that fail it count 0 ESS "
                  "(the ungated rate is shown in brackets)."), ""]
    ess_based = base is not None and "ess_per_cpu_s" in results[base]
    column = f"{base} ESS/cpu-s / this" if ess_based else f"{base} time / this"
    lines += [
        (f"| implementation | median ms | min ms | cpu/wall | first call ms | {column} "
         "| ESS/s | ESS/cpu-s | extra |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for impl, r in results.items():
        if "skipped" in r:
            lines.append(f"| {impl} | skipped: {r['skipped']} |  |  |  |  |  |  |  |")
            continue
        ess = cpu_ess = ""
        if "ess_per_s" in r:
            ess, cpu_ess = f"{r['ess_per_s']:.4g}", f"{r['ess_per_cpu_s']:.4g}"
            if "ess_per_s_ungated" in r:
                ess += f" ({r['ess_per_s_ungated']:.4g})"
                cpu_ess += f" ({r['ess_per_cpu_s_ungated']:.4g})"
        extra = _fmt_extra(r.get("extra", {}))
        if "gate" in r:
            gate = "passed" if r["gate"]["passed"] else f"FAILED: {r['gate']['reason']}"
            extra = f"gate {gate}; {extra}"
        first = r.get("first_call_s")
        first = "" if first is None else f"{first * 1e3:.4g}"
        if not base:
            ratio = ""
        elif ess_based:  # ESS per CPU-second: higher is better, so baseline / this
            ratio = _ratio(results[base]["ess_per_cpu_s"] / r["ess_per_cpu_s"]
                           if r.get("ess_per_cpu_s") else None)
        else:
            ratio = _ratio(results[base]["median_s"] / r["median_s"])
        cpu_wall = f"{r['median_cpu_s'] / r['median_s']:.2f}" if "median_cpu_s" in r else ""
        lines.append(f"| {impl} | {r['median_s'] * 1e3:.4g} | {r['min_s'] * 1e3:.4g} | "
                     f"{cpu_wall} | {first} | {ratio} | {ess} | {cpu_ess} | {extra} |")
    lines.append("")
    return lines


def markdown_report(records: list[dict], command: str) -> str:
    """RESULTS.md: every benchmark's medians and target ratios, with machine and versions."""
    machine = {}  # later records add the peers' versions (JAX is imported on first use)
    for rec in records or [{"machine": machine_info()}]:
        machine.update(rec["machine"])
    lines = [
        "# Benchmark results",
        "",
        (f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
         "do not edit by hand."),
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()),
        "",
        "Each benchmark times its implementations side by side in one process (interleaved rounds,",
        "one core: see benchmarks/README.md); medians per call. A ratio is numerator / denominator",
        "of the named metric; `<baseline> time / this` is the pyroforge implementation's median",
        "time over each implementation's (12 = pyroforge takes 12x as long; for ESS benchmarks",
        "the same with ESS per CPU-second, higher = pyroforge better). `first call` is the first",
        "warm-up call (JIT compilation / tracing included); `cpu/wall` is process CPU seconds per",
        "wall second; a target's `CPU-time ratio` is its time ratio in CPU seconds (steadier than",
        "wall time when other processes share the core). Peers not installed are listed as skipped.",
        "",
        "## Targets",
        "",
        *markdown_targets(records),
        "",
        "## Timings",
        "",
    ]
    for rec in records:
        lines += markdown_timings(rec)
    return "\n".join(lines)
