"""One-command GPU check: ``python -m benchmarks --gpu-check [--report PATH] [--out DIR]``.

Runs, on the first CUDA device, every test marked ``cuda`` (``pytest -m cuda tests``) and then
the benchmarks that exercise the GPU (:data:`GPU_BENCHMARKS`, full sizes, torch side only: the
JAX peers are CPU builds and are skipped), each in its own process with a deadline, so that the
whole check ends within :data:`BUDGET_S` seconds (8 minutes). It prints a Markdown section for
``benchmarks/RESULTS.md`` and writes it to ``--report`` (default ``<out>/GPU.md``). Exit status:
0 when every CUDA test passed, 1 when one failed or a benchmark failed or ran out of time, and
77 ("skipped", the automake convention) when there is no CUDA device; nothing is run then.

On a machine without network access where pyro-ppl / arviz are not installed, carry their
wheels (recipe in benchmarks/README.md: ``pip download --no-deps -d wheels`` of the packages
``pip install --dry-run --report`` lists beside an installed torch, then ``pip install
--no-index --find-links wheels pyro-ppl arviz pytest`` there). The check runs from the checkout
root without installing the project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import torch

from .harness import machine_info, markdown_targets, markdown_timings

BUDGET_S = 480
TEST_BUDGET_S = 240
GPU_BENCHMARKS = (
    "sgld_step_time",
    "bregman_myula_steps",
    "bregman_bmumla_steps",
    "coin_svgd_step_logistic",
    "coin_svgd_scaling",
)
NO_CUDA_STATUS = 77
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name(0)


def no_cuda_message() -> str:
    built = torch.version.cuda or "none (a CPU-only build)"
    return (f"--gpu-check needs a CUDA device, and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}, CUDA build: {built}). Nothing was run. Run it on a "
            f"machine with an NVIDIA GPU and a CUDA build of torch.")


def run_cuda_tests(timeout_s: float, pytest_args: tuple[str, ...] = ()) -> dict:
    """``pytest -m cuda tests`` in a subprocess; counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "cuda.xml")
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *pytest_args]
        if not pytest_args:
            cmd.append("tests")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"")
            out = out.decode() if isinstance(out, bytes) else out
            return {"status": "timeout", "seconds": time.perf_counter() - t0, "passed": 0,
                    "failed": 0, "skipped": 0, "failures": [], "tail": out[-2000:]}
        seconds = time.perf_counter() - t0
        counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
        if os.path.exists(xml):
            for case in ET.parse(xml).iter("testcase"):
                name = f"{case.get('classname')}::{case.get('name')}"
                if case.find("failure") is not None or case.find("error") is not None:
                    counts["failed"] += 1
                    counts["failures"].append(name)
                elif case.find("skipped") is not None:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
    # pytest exit 5: nothing collected (no test marked cuda matched)
    status = "ok" if proc.returncode in (0, 5) and not counts["failed"] else "failed"
    return {"status": status, "returncode": proc.returncode, "seconds": seconds, **counts,
            "tail": (proc.stdout + proc.stderr)[-2000:]}


def run_benchmark(name: str, out_dir: str, timeout_s: float) -> dict:
    """One benchmark in its own process (``--no-peers``), killed at ``timeout_s``."""
    cmd = [sys.executable, "-m", "benchmarks", name, "--no-peers", "--threads", "1",
           "--out", out_dir]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"benchmark": name, "error": f"killed after {timeout_s:.0f} s (time budget)"}
    path = os.path.join(out_dir, f"{name}.json")
    if proc.returncode != 0 or not os.path.exists(path):
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"benchmark": name, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    with open(path) as fh:
        record = json.load(fh)
    record["seconds"] = time.perf_counter() - t0
    return record


def markdown_section(tests: dict, records: list[dict], seconds: float) -> str:
    device = device_name()
    machine = machine_info()
    lines = [
        f"## GPU: {device}",
        "",
        (f"Generated by `python -m benchmarks --gpu-check` on "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {seconds:.0f} s; torch "
         f"{machine['torch']} (CUDA {torch.version.cuda}), pyro {machine.get('pyro')}. Peers "
         "(JAX, CPU builds) are not run here."),
        "",
        (f"CUDA tests (`pytest -m cuda tests`): {tests['passed']} passed, {tests['failed']} "
         f"failed, {tests['skipped']} skipped in {tests['seconds']:.0f} s ({tests['status']})."),
    ]
    for name in tests.get("failures", []):
        lines.append(f"- failed: `{name}`")
    timed = [r for r in records if "error" not in r]
    lines += ["", "### GPU targets", "", *markdown_targets(timed), "", "### GPU timings", ""]
    for rec in records:
        if "error" in rec:
            lines += [f"#### {rec['benchmark']}", "", f"not measured: {rec['error']}", ""]
        else:
            lines += ["#" + line if line.startswith("### ") else line
                      for line in markdown_timings(rec)]
    return "\n".join(lines)


def gpu_check(report: str | None = None, out_dir: str | None = None, *,
              benchmarks: tuple[str, ...] = GPU_BENCHMARKS, budget_s: float = BUDGET_S,
              test_budget_s: float = TEST_BUDGET_S, pytest_args: tuple[str, ...] = ()) -> int:
    """Run the GPU check; return the process exit status (see the module docstring)."""
    if not cuda_available():
        print(no_cuda_message(), file=sys.stderr)
        return NO_CUDA_STATUS
    t0 = time.perf_counter()
    out_dir = out_dir or os.path.join(ROOT, "benchmarks", "results")
    gpu_out = os.path.join(out_dir, "gpu")
    os.makedirs(gpu_out, exist_ok=True)
    print(f"GPU check on {device_name()}: CUDA tests ...", flush=True)
    tests = run_cuda_tests(min(test_budget_s, budget_s), pytest_args)
    print(f"  {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
          f"({tests['status']}, {tests['seconds']:.0f} s)", flush=True)
    if tests["status"] != "ok":
        print(tests["tail"], flush=True)
    records = []
    for name in benchmarks:
        left = budget_s - (time.perf_counter() - t0)
        if left < 10:
            records.append({"benchmark": name, "error": "not run: the 8-minute budget is spent"})
            continue
        print(f"benchmark {name} ({left:.0f} s left) ...", flush=True)
        records.append(run_benchmark(name, gpu_out, left))
        print("  " + records[-1].get("error", f"done in {records[-1].get('seconds', 0):.0f} s"),
              flush=True)
    text = markdown_section(tests, records, time.perf_counter() - t0)
    report = report or os.path.join(out_dir, "GPU.md")
    with open(report, "w") as fh:
        fh.write(text + "\n")
    print(text)
    print(f"wrote {report}")
    ok = tests["status"] == "ok" and all("error" not in r for r in records)
    return 0 if ok else 1
