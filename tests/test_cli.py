"""The pyroforge command line, run as a user would (subprocesses)."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from mcmc.diagnostics import group_names, load_inference_data

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def pyroforge(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "models.cli", *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600, check=False)


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "pyroforge")
    assert os.path.exists(script), "the pyroforge console script is not installed next to python"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, env=ENV,
                          check=False)
    assert proc.returncode == 0 and "compare" in proc.stdout


def test_list_names_models_and_methods():
    proc = pyroforge("list")
    assert proc.returncode == 0, proc.stderr
    for name in ("gaussian_conjugate", "logistic_regression", "eight_schools", "nuts", "svi"):
        assert name in proc.stdout


@pytest.mark.parametrize("method", ["nuts", "svi"])
def test_run_writes_readable_inference_data(tmp_path, method):
    proc = pyroforge("run", "gaussian_conjugate", "--method", method, "--num-samples", "60",
                     "--num-steps", "300", "--device", "cpu", "--out", str(tmp_path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    stem = tmp_path / f"gaussian_conjugate-{method}"
    idata = load_inference_data(f"{stem}.nc")
    assert idata.posterior["mu"].shape[1] == 60
    assert "observed_data" in group_names(idata)
    for suffix in ("-summary.csv", "-metrics.json", ".png"):
        assert os.path.getsize(f"{stem}{suffix}") > 0
    assert "mean_error_sd" in proc.stdout and "energy_distance" in proc.stdout
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_compare_table_and_csv(tmp_path):
    proc = pyroforge("compare", "gaussian_conjugate", "--methods", "nuts,svi", "--num-samples", "60",
                     "--num-steps", "500", "--device", "cpu", "--out", str(tmp_path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "compare-gaussian_conjugate.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["nuts", "svi"]
    assert all(r["status"] == "ok" and float(r["wall_s"]) > 0 for r in rows)
    assert float(rows[0]["ess_per_s"]) > 0  # defined for MCMC
    assert rows[1]["ess_per_s"] == ""  # not for draws from a guide
    # both land near the analytic posterior
    assert all(float(r["mean_error_sd"]) < 0.5 for r in rows)
    assert (tmp_path / "compare-gaussian_conjugate.png").stat().st_size > 0


def test_bad_input_messages(tmp_path):
    proc = pyroforge("run", "no_such_model", "--method", "nuts", "--out", str(tmp_path))
    assert proc.returncode != 0 and "valid models" in proc.stderr and "eight_schools" in proc.stderr
    proc = pyroforge("run", "gaussian_conjugate", "--method", "no_such", "--out", str(tmp_path))
    assert proc.returncode != 0 and "valid methods" in proc.stderr and "nuts" in proc.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = pyroforge("run", "gaussian_conjugate", "--method", "nuts", "--out", str(blocker / "sub"))
    assert proc.returncode != 0 and "not writable" in proc.stderr
    proc = pyroforge("compare", "gaussian_conjugate", "--methods", "svi", "--num-samples", "0",
                     "--out", str(tmp_path))
    assert proc.returncode != 0 and "--num-samples" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda(tmp_path):
    proc = pyroforge("run", "gaussian_conjugate", "--method", "nuts", "--device", "cuda",
                     "--out", str(tmp_path))
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr
    assert not list(tmp_path.glob("*.nc"))


def test_skipped_methods_give_a_reason():
    from models.cli import compare

    rows = compare("discrete_mixture", ["svi"], num_samples=10, seed=0, device="cpu",
                   progress=False, out=None)
    assert rows[0]["status"] == "skipped" and "discrete" in rows[0]["note"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gaussian_conjugate", "logistic_regression", "sparse_logistic"])
def test_compare_runs_every_applicable_method(model):
    """Integration: every registered method either runs (tiny budget) or says why it can't."""
    from models.cli import compare
    from models.methods import get_method, method_names

    rows = compare(model, method_names(), num_samples=20, seed=0, device="cpu", progress=False,
                   out=None, num_steps=20)
    failed = [(r["method"], r["note"]) for r in rows if r["status"] == "failed"]
    assert not failed
    ran = {r["method"] for r in rows if r["status"] == "ok"}
    # the reference methods and at least one method of each family apply to these models
    assert {"nuts", "svi", "elbo", "coin_svgd", "sgld"} <= ran
    if model == "sparse_logistic":
        assert {"myula", "bmumla"} <= ran
    for r in rows:
        if r["status"] == "skipped":
            assert r["note"] and get_method(r["method"]).applies_to is not None


@pytest.mark.cuda
def test_compare_on_cuda():
    """Every family runs with the model's data on the GPU (the methods follow the tensors)."""
    from models.cli import compare

    rows = compare("logistic_regression", ["nuts", "svi", "elbo", "sgld", "coin_svgd"],
                   num_samples=20, seed=0, device="cuda", progress=False, out=None, num_steps=20)
    assert [r["status"] for r in rows] == ["ok"] * 5, rows
    assert all("heldout_lpd" in r for r in rows)
