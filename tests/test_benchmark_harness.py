"""The side-by-side harness: interleaved timing, ratios vs targets, JSON output."""

import json
import os
import subprocess
import sys
import time

import pyro
import pytest
import torch

from benchmarks import harness, peers
from benchmarks.harness import Target, benchmark


@pytest.fixture(autouse=True)
def _restore_cli_state():
    """``benchmarks.__main__.main`` sets torch's thread count and may disable the peers."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    peers.enable()


@benchmark("_test_sleep", targets=[Target("slow", "fast", ">=", 1.5), Target("fast", "slow", ">=", 2.0),
                                   Target("fast", "slow", ">=", 1.0, metric="ess_per_s")], repeats=6)
def _sleepers(quick):
    return {
        "fast": lambda: time.sleep(0.002) or {"ess": 100.0},
        "slow": lambda: time.sleep(0.006) or {"ess": 100.0},
    }


def test_ratios_targets_and_json(tmp_path):
    record = harness.run("_test_sleep", out_dir=str(tmp_path))
    fast, slow = record["results"]["fast"], record["results"]["slow"]
    assert fast["repeats"] == slow["repeats"] == 6
    assert slow["median_s"] > fast["median_s"]
    t_slow_fast, t_fast_slow, t_ess = record["targets"]
    assert t_slow_fast["ratio"] == pytest.approx(slow["median_s"] / fast["median_s"])
    assert t_slow_fast["met"] is True  # ~3x slower
    assert t_fast_slow["met"] is False  # fast/slow ~ 0.33 < 2
    assert t_ess["met"] is True and fast["ess_per_s"] > slow["ess_per_s"]
    saved = json.loads((tmp_path / "_test_sleep.json").read_text())
    assert saved["machine"]["torch"] and saved["targets"][0]["target"].startswith("time(slow)")
    assert "met" in harness.format_record(record)


def test_unknown_benchmark_lists_available():
    with pytest.raises(KeyError, match="available"):
        harness.run("no_such_benchmark")


def test_target_validation():
    with pytest.raises(ValueError, match="op"):
        Target("a", "b", "<", 1.0)
    with pytest.raises(ValueError, match="metric"):
        Target("a", "b", "<=", 1.0, metric="memory")


def test_markdown_report(tmp_path):
    from benchmarks.__main__ import main

    report = tmp_path / "RESULTS.md"
    assert main(["_test_sleep", "--out", str(tmp_path), "--report", str(report)]) == 0
    text = report.read_text()
    assert "| _test_sleep | time(slow) / time(fast) >= 1.5 |" in text and "do not edit by hand" in text
    assert "| benchmark | target | measured | CPU-time ratio | status |" in text


# ----------------------------------------------------------------------------- peers and gates


@benchmark("_test_peer_skipped", targets=[Target("pyroforge_x", "peer_y", "<=", 2.0),
                                          Target("pyroforge_x", "torch_z", "<=", 100.0)],
           repeats=3, warmup=1)
def _with_skipped_peer(quick):
    return {
        "pyroforge_x": lambda: time.sleep(0.001),
        "peer_y": harness.Skipped("peerlib not installed (pip install -e \".[peers]\")"),
        "torch_z": lambda: time.sleep(0.001),
    }


def test_skipped_peer_is_recorded_not_timed(tmp_path):
    record = harness.run("_test_peer_skipped", out_dir=str(tmp_path))
    reason = 'peerlib not installed (pip install -e ".[peers]")'
    assert record["results"]["peer_y"] == {"skipped": reason}
    assert record["results"]["pyroforge_x"]["repeats"] == 3
    skipped_target, measured_target = record["targets"]
    assert skipped_target["met"] is None and skipped_target["ratio"] is None
    assert "peer_y skipped: peerlib not installed" in skipped_target["note"]
    assert measured_target["met"] is True
    cpu = record["results"]["pyroforge_x"]["median_cpu_s"] / record["results"]["torch_z"][
        "median_cpu_s"]
    assert measured_target["cpu_ratio"] == pytest.approx(cpu)
    text = harness.markdown_report([record], "test")
    assert "| peer_y | skipped: peerlib not installed" in text
    assert "not measured (peer_y skipped" in text
    assert "skipped: peerlib" in harness.format_record(record)


def test_peer_builders_skip_when_the_library_is_missing(monkeypatch):
    real = peers.importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "blackjax" else real(name, *a))
    out = peers.blackjax_sgld(torch.zeros(3, 2), torch.zeros(3), torch.ones(2), batch_size=2,
                              step_size=0.1, num_steps=2)
    assert set(out) == {"blackjax_sgld_step", "blackjax_sgld_scan"}
    for value in out.values():
        assert isinstance(value, harness.Skipped)
        assert "blackjax not installed" in value.reason and ".[peers]" in value.reason
    peers.disable("peers disabled (--no-peers)")
    out = peers.numpyro_svi_autonormal(torch.zeros(3, 2), torch.zeros(3), torch.ones(2), lr=0.1)
    assert out == {"numpyro_svi": harness.Skipped("peers disabled (--no-peers)")}


def test_cli_no_peers_and_threads(tmp_path):
    from benchmarks.__main__ import main

    report = tmp_path / "RESULTS.md"
    assert main(["_test_peer_skipped", "--no-peers", "--threads", "1", "--out", str(tmp_path),
                 "--report", str(report)]) == 0
    assert torch.get_num_threads() == 1
    assert "| peer_y | skipped: peerlib not installed" in report.read_text()
    with pytest.raises(SystemExit):
        main(["_test_peer_skipped", "--threads", "0"])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_configure_cpus_pins_the_process():
    """One core each: the affinity mask (which also sizes XLA's thread pool) and JAX on CPU."""
    code = ("import os; from benchmarks import peers; done = peers.configure_cpus(1); "
            "print(len(os.sched_getaffinity(0)), os.environ['JAX_PLATFORMS'], done['cpus'])")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split()[:2] == ["1", "cpu"]


def test_accuracy_gate_check():
    gate = harness.AccuracyGate(max_mean_error_sd=0.2, var_ratio_range=(0.9, 1.1))
    assert gate.check({"mean_error_sd": 0.1, "var_ratio": 1.05})[0] is True
    passed, why = gate.check({"mean_error_sd": 0.3, "var_ratio": 1.0})
    assert not passed and "mean error 0.3 sd > 0.2" in why
    passed, why = gate.check({"mean_error_sd": 0.1, "var_ratio": 8.9})
    assert not passed and "variance ratio 8.9 outside [0.9, 1.1]" in why
    assert gate.check({"mean_error_sd": float("nan"), "var_ratio": 1.0})[0] is False
    passed, why = gate.check({"ess": 10.0})
    assert not passed and "mean_error_sd" in why and "var_ratio" in why
    with pytest.raises(ValueError, match="var_ratio_range"):
        harness.AccuracyGate(var_ratio_range=(1.1, 1.2))


def _busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@benchmark("_test_gated", targets=[
    Target("pyroforge_good", "nuts", ">=", 1.0, metric="ess_per_cpu_s"),
    Target("pyroforge_bad", "nuts", ">=", 1.0, metric="ess_per_cpu_s"),
    Target("nuts", "pyroforge_bad", ">=", 1.0, metric="ess_per_s"),
], repeats=3, warmup=1, gate=harness.AccuracyGate())
def _gated(quick):
    def impl(ess, err, ratio):
        def call():
            _busy(0.003)
            return {"ess": ess, "mean_error_sd": err, "var_ratio": ratio}

        return call

    return {"pyroforge_good": impl(100.0, 0.05, 1.02), "pyroforge_bad": impl(1000.0, 0.05, 9.0),
            "nuts": impl(50.0, 0.03, 0.98)}


def test_gate_counts_ess_only_for_accurate_draws():
    record = harness.run("_test_gated")
    res = record["results"]
    good, bad, nuts = res["pyroforge_good"], res["pyroforge_bad"], res["nuts"]
    assert good["gate"]["passed"] and nuts["gate"]["passed"] and not bad["gate"]["passed"]
    assert good["ess_per_cpu_s"] == pytest.approx(100.0 / good["median_cpu_s"])
    assert bad["ess_per_s"] == bad["ess_per_cpu_s"] == 0.0
    assert bad["ess_per_s_ungated"] == pytest.approx(1000.0 / bad["median_s"])
    good_vs_nuts, bad_vs_nuts, nuts_vs_bad = record["targets"]
    assert good_vs_nuts["met"] is True
    assert bad_vs_nuts["met"] is False and bad_vs_nuts["ratio"] == 0.0
    assert "failed the accuracy gate" in bad_vs_nuts["note"]
    assert nuts_vs_bad["met"] is None and "variance ratio 9 outside" in nuts_vs_bad["note"]
    text = harness.markdown_report([record], "test")
    assert "Accuracy gate on ESS: mean error <= 0.2 sd and variance ratio in [0.9, 1.1]" in text
    assert "gate FAILED: variance ratio 9 outside [0.9, 1.1]" in text


@benchmark("_test_first_call", repeats=3, warmup=2)
def _compiles_once(quick):
    state = {"compiled": False}

    def jitted():
        if not state["compiled"]:
            time.sleep(0.05)  # "compilation" on the first call only
            state["compiled"] = True
        _busy(0.002)

    return {"pyroforge_jit": jitted}


def test_first_call_and_cpu_time_are_recorded():
    r = harness.run("_test_first_call")["results"]["pyroforge_jit"]
    assert r["first_call_s"] >= 0.05 > r["median_s"]
    assert 0 < r["median_cpu_s"] <= r["median_s"] * 1.5


# ----------------------------------------------------------------------------- GPU check


def test_gpu_check_without_cuda_exits_cleanly(monkeypatch, capsys, tmp_path):
    from benchmarks import gpu_check
    from benchmarks.__main__ import main

    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run_cuda_tests", lambda *a, **k: pytest.fail("ran tests"))
    assert main(["--gpu-check", "--out", str(tmp_path)]) == gpu_check.NO_CUDA_STATUS == 77
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "Nothing was run" in err
    assert not list(tmp_path.iterdir())


def test_gpu_check_table_with_a_fake_device(monkeypatch, tmp_path):
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "cuda_available", lambda: True)
    monkeypatch.setattr(gpu_check, "device_name", lambda: "Fake GPU 80GB")
    monkeypatch.setattr(gpu_check, "run_cuda_tests", lambda *a, **k: {
        "status": "ok", "seconds": 3.0, "passed": 12, "failed": 0, "skipped": 1,
        "failures": [], "tail": ""})

    def fake_run(name, out_dir, timeout_s):
        if name == "broken":
            return {"benchmark": name, "error": "exit 1: boom"}
        return harness.run("_test_sleep", out_dir=out_dir)

    monkeypatch.setattr(gpu_check, "run_benchmark", fake_run)
    report = tmp_path / "GPU.md"
    status = gpu_check.gpu_check(str(report), str(tmp_path), benchmarks=("_test_sleep",))
    text = report.read_text()
    assert status == 0
    assert text.startswith("## GPU: Fake GPU 80GB")
    assert "12 passed, 0 failed, 1 skipped" in text
    assert "| _test_sleep | time(slow) / time(fast) >= 1.5 |" in text and "#### _test_sleep" in text
    status = gpu_check.gpu_check(str(report), str(tmp_path), benchmarks=("broken",))
    assert status == 1 and "not measured: exit 1: boom" in report.read_text()


def test_cuda_test_runner_counts_from_junit():
    from benchmarks import gpu_check

    out = gpu_check.run_cuda_tests(120, ("tests/test_device.py",))
    assert out["status"] == "ok" and out["failed"] == 0
    if torch.cuda.is_available():
        assert out["passed"] >= 1
    else:  # the cuda-marked tests are collected and skipped
        assert out["skipped"] >= 1 and out["passed"] == 0


# ----------------------------------------------------------------------------- JAX peers


def test_numpyro_logistic_model_matches_the_zoo():
    """The peers' NumPyro model has the zoo model's log joint (same data, float32)."""
    pytest.importorskip("numpyro")
    import jax
    from numpyro.infer.util import log_density

    import models
    from benchmarks import peers

    spec = models.get("logistic_regression_synthetic", num_rows=500, dim=4)
    X, y = spec.args
    s = spec.kwargs["prior_scale"]
    w = torch.tensor([0.3, -0.2, 0.1, 0.5])
    trace = pyro.poutine.trace(pyro.poutine.condition(spec.model, {"w": w})).get_trace(X, y, s)
    expected = float(trace.log_prob_sum())
    data = (peers.to_jax(X), peers.to_jax(y), peers.to_jax(s))
    got, _ = log_density(peers.numpyro_logistic_model, data, {}, {"w": jax.numpy.asarray(w)})
    assert float(got) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_jax_peer_builders_run():
    pytest.importorskip("numpyro")
    pytest.importorskip("blackjax")
    import models
    from benchmarks import peers

    spec = models.get("logistic_regression_synthetic", num_rows=200, dim=3)
    X, y = spec.args
    s = spec.kwargs["prior_scale"]
    impls = {}
    impls.update(peers.blackjax_sgld(X, y, s, batch_size=20, step_size=1e-3, num_steps=3))
    impls.update(peers.numpyro_svi_autonormal(X, y, s, lr=0.01))
    impls.update(peers.numpyro_svgd(X, y, s, num_particles=5, lr=0.01))
    mix = models.get("discrete_mixture", with_reference=False)
    impls.update(peers.numpyro_renyi_mixture(*mix.args, **mix.kwargs, num_particles=4))
    for name, call in impls.items():
        assert callable(call), name
        call()
    draws = peers.numpyro_nuts_runner(X, y, s, num_warmup=50, num_samples=50)()
    assert draws.shape == (50, 3) and torch.isfinite(draws).all()


def test_gpu_check_benchmark_subprocess_reports_errors(tmp_path):
    from benchmarks import gpu_check

    out = gpu_check.run_benchmark("no_such_benchmark", str(tmp_path), 120)
    assert out["benchmark"] == "no_such_benchmark"
    assert out["error"].startswith("exit 2: unknown benchmark(s): no_such_benchmark")


@pytest.mark.parametrize("chains,draws", [(1, 2000), (1, 2001), (3, 1500)])
def test_fast_ess_equals_pyros(chains, draws):
    """The gated-ESS benchmarks' O(S log S) ESS computes Pyro's effective_sample_size."""
    from pyro.ops.stats import effective_sample_size

    from benchmarks.bench_sgld import effective_sample_size_fast

    g = torch.Generator().manual_seed(0)
    x = torch.randn(chains, draws, 4, generator=g, dtype=torch.float64)
    x = x + 0.03 * torch.cumsum(x, 1)  # autocorrelated, ESS from a few to ~10^3
    torch.testing.assert_close(effective_sample_size_fast(x), effective_sample_size(x, 0, 1))
