"""The pyroforge command line, run as a user would (subprocesses), and its option handling."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import models
from mcmc.diagnostics import group_names, load_inference_data
from models.cli import compare_figure, resolve_options
from models.methods import OptionError, get_method, method_names

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pyroforge(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "models.cli", *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600, check=False)


def expected_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "pyroforge")
    assert os.path.exists(script), "the pyroforge console script is not installed next to python"
    proc = subprocess.run([script, "--version"], capture_output=True, text=True, env=ENV,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("pyroforge 0.")


def test_help_version_and_list_do_not_import_torch():
    """``--help``, ``--version`` and ``list`` answer without importing torch (~0.2 s, not ~10)."""
    code = (
        "import sys, contextlib, io\n"
        "from models.cli import main\n"
        "for argv in (['--help'], ['--version'], ['run', '--help'], ['compare', '--help'],\n"
        "             ['run', 'gamma_poisson', '--method', 'sgld', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (argv, e.code)\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['list']); main(['list', '--method', 'psgld'])\n"
        "print(sorted(m for m in ('torch', 'pyro', 'arviz', 'mcmc') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_help_lists_choices_and_method_options():
    proc = pyroforge("run", "--help")
    assert proc.returncode == 0
    flat = " ".join(proc.stdout.split())
    for name in ("gaussian_conjugate", "eight_schools", "nuts", "coin_svgd", "--threads",
                 "--warmup-steps"):
        assert name in flat
    proc = pyroforge("run", "gamma_poisson", "--method", "sgld", "--help")
    assert ("step_size (float > 0; default min(0.1 / lambda_max, 0.5 / (lambda_max + V)) at the "
            "mode" in proc.stdout)
    assert "precondition (one of auto, laplace, none; default 'auto')" in proc.stdout
    assert "num_chains (integer >= 1; default 4)" in proc.stdout
    proc = pyroforge("list", "--method", "elbo")
    assert proc.returncode == 0
    assert "estimator (one of reparam, reinforce, mvd, enumerate" in proc.stdout
    assert "reads: --num-samples, --num-steps" in proc.stdout


def test_list_describes_every_model_and_method_in_one_sentence():
    import models
    from models.catalog import MODELS

    assert sorted(MODELS) == models.names()  # the torch-free catalog matches the registry
    proc = pyroforge("list")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()
             if line.startswith("  ")}
    for name in [*MODELS, *method_names()]:
        text = lines[name][2:].split(None, 1)[1]
        assert len(text) > 15, name
    for name, text in MODELS.items():
        assert text.endswith(".") and len(text) <= 80, name


@pytest.mark.parametrize("args, message", [
    (["run", "gaussian_conjugate", "--method", "svi", "--num-steps", "0"],
     "--num-steps: must be >= 1, got 0"),
    (["run", "gaussian_conjugate", "--method", "svi", "--num-steps", "-5"],
     "--num-steps: must be >= 1, got -5"),
    (["run", "gaussian_conjugate", "--method", "nuts", "--num-samples", "0"],
     "--num-samples: must be >= 1, got 0"),
    (["compare", "--methods", ","], "no method names in ','; give a comma-separated list of: nuts"),
    (["compare", "--methods", "nuts,nut"], "unknown method 'nut' (did you mean 'nuts'?)"),
    (["run", "gaussian_conjugate", "--method", "nuts", "--device", "gpu"],
     "unknown device 'gpu'; choose auto, cpu, cuda or cuda:N"),
    (["run", "gausian_conjugate", "--method", "nuts"],
     "unknown model 'gausian_conjugate' (did you mean 'gaussian_conjugate'?); valid models:"),
    (["run", "gaussian_conjugate", "--method", "no_such"], "valid methods: nuts, svi"),
    (["run", "gaussian_conjugate", "--method", "coin_svgd", "--num-samples", "50"],
     ("--num-samples does not apply to coin_svgd (its particle count is --option "
      "num_particles=N)")),
    (["run", "gaussian_conjugate", "--method", "nuts", "--num-steps", "50"],
     "--num-steps does not apply to nuts"),
    (["run", "gaussian_conjugate", "--method", "nuts", "--option", "lr=0.1"],
     ("no method run here has an option 'lr'; their options are: max_tree_depth, num_chains, "
      "target_accept_prob")),
    (["run", "gaussian_conjugate", "--method", "svi", "--option", "lr=abc"],
     "svi: option lr='abc' is not a number; expected float > 0"),
    (["run", "gaussian_conjugate", "--method", "svi", "--option", "lr=-1"],
     "svi: option lr='-1' is out of range; expected float > 0"),
    (["run", "gaussian_conjugate", "--method", "svi", "--option", "num_particles=2.5"],
     "svi: option num_particles='2.5' is not an integer; expected integer >= 1"),
    (["run", "gaussian_conjugate", "--method", "svi", "--option", "lr"],
     "expected KEY=VALUE (or METHOD.KEY=VALUE), got 'lr'"),
    (["compare", "--methods", "nuts,svi", "--option", "svi.foo=1"],
     "svi: unknown option 'foo'; valid options: lr, num_particles"),
    (["compare", "--methods", "nuts,svi", "--option", "elbo.lr=1"],
     "'elbo' is not among the methods run (nuts, svi)"),
    (["compare", "--methods", "nuts", "--option", "lr=0.01"], "no method run here has an option"),
])
def test_bad_input_fails_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    proc = pyroforge(*args, "--out", str(out))
    assert proc.returncode == 2 if "argument" in proc.stderr else proc.returncode == 1
    assert message in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # failed before creating the output folder


def test_out_must_be_a_writable_folder(tmp_path):
    existing = tmp_path / "a_file"
    existing.write_text("")
    proc = pyroforge("run", "gaussian_conjugate", "--method", "nuts", "--out", str(existing))
    assert proc.returncode == 1 and "is a file, not a folder" in proc.stderr
    proc = pyroforge("run", "gaussian_conjugate", "--method", "nuts", "--out",
                     str(existing / "sub"))
    assert proc.returncode == 1 and "not writable" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda(tmp_path):
    proc = pyroforge("run", "gaussian_conjugate", "--method", "nuts", "--device", "cuda",
                     "--out", str(tmp_path))
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.nc"))


@pytest.mark.parametrize("method", ["nuts", "svi"])
def test_run_writes_readable_inference_data(tmp_path, method):
    extra = ["--num-steps", "300"] if method == "svi" else ["--warmup-steps", "60"]
    proc = pyroforge("run", "gaussian_conjugate", "--method", method, "--num-samples", "60",
                     *extra, "--device", "cpu", "--out", str(tmp_path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    stem = tmp_path / f"gaussian_conjugate-{method}"
    idata = load_inference_data(f"{stem}.nc")
    chains = 2 if method == "nuts" else 1
    assert idata.posterior["mu"].shape == (chains, 60, 3)
    assert "observed_data" in group_names(idata)
    for suffix in (".nc", "-summary.csv", "-metrics.json", ".png"):
        path = f"{stem}{suffix}"
        assert os.path.getsize(path) > 0
        assert os.stat(path).st_mode & 0o777 == expected_mode()  # not mkstemp's 0o600
    assert "mean_error_sd" in proc.stdout and "energy_distance" in proc.stdout
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    # one diagnostics line; no ArviZ shape warnings, no all-NaN R-hat column
    assert proc.stdout.startswith(f"diagnostics: {method} on gaussian_conjugate:")
    assert "Shape validation failed" not in proc.stdout + proc.stderr
    with open(f"{stem}-summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["site"] for r in rows] == ["mu[0]", "mu[1]", "mu[2]"]
    if method == "nuts":
        assert all(1.0 - 0.05 < float(r["r_hat"]) < 1.2 for r in rows)
        assert json.loads((tmp_path / "gaussian_conjugate-nuts-metrics.json").read_text())[
            "min_ess"] > 10
    else:  # one chain of iid guide draws: no R-hat or ESS columns at all
        assert set(rows[0]) == {"site", "mean", "sd", "q5", "q95"}
        assert "hit the cap of 300 steps" in proc.stderr  # 300 < what the stopping rule wants


def test_nuts_with_one_sample_runs_and_says_what_is_missing(tmp_path):
    proc = pyroforge("run", "gamma_poisson", "--method", "nuts", "--num-samples", "1",
                     "--warmup-steps", "20", "--out", str(tmp_path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert ("diagnostics: nuts on gamma_poisson: 2 chains x 1 draws; R-hat and ESS need >= 4 "
            "draws per chain: ok") in proc.stdout
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr


@pytest.mark.parametrize("flag, expected", [((), 1), (("--threads", "3"), 3)])
def test_threads_flag_sets_torch_threads(tmp_path, flag, expected):
    """Default 1 intra-op thread (whatever OMP_NUM_THREADS says), ``--threads N`` otherwise."""
    argv = ["compare", "discrete_mixture", "--methods", "svi", *flag, "--out", str(tmp_path)]
    code = (f"import torch; from models.cli import main; main({argv!r}); "
            "print('threads', torch.get_num_threads())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**ENV, "OMP_NUM_THREADS": "2"}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"threads {expected}" in proc.stdout


def test_compare_table_and_csv(tmp_path):
    proc = pyroforge("compare", "gaussian_conjugate", "--methods", "nuts,svi,vimco",
                     "--num-samples", "60", "--warmup-steps", "60", "--num-steps", "500",
                     "--device", "cpu", "--out", str(tmp_path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "compare-gaussian_conjugate.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["nuts", "svi", "vimco"]
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped"]
    assert all(float(r["wall_s"]) > 0 for r in rows[:2])
    assert float(rows[0]["ess_per_s"]) > 0  # defined for MCMC
    assert rows[1]["ess_per_s"] == ""  # not for draws from a guide
    assert all(float(r["mean_error_sd"]) < 0.5 for r in rows[:2])
    assert "discrete" in rows[2]["note"]
    assert (tmp_path / "compare-gaussian_conjugate.png").stat().st_size > 0
    # the settings that do not apply to a method are named, once, before the work
    assert "note: --num-steps does not apply to nuts" in proc.stdout
    assert proc.stdout.count("diagnostics: ") == 2


def test_compare_options_apply_only_where_declared():
    typed = resolve_options(["nuts", "svi", "elbo"], [("lr", "0.2"), ("elbo.lr", "0.3"),
                                                      ("nuts.max_tree_depth", "6")])
    assert "lr" not in typed["nuts"] and typed["nuts"]["max_tree_depth"] == 6
    assert typed["svi"]["lr"] == 0.2 and typed["elbo"]["lr"] == 0.3
    assert typed["svi"]["num_particles"] == 8  # defaults filled in
    with pytest.raises(OptionError, match="target_accept_prob='1.5' is out of range"):
        resolve_options(["nuts"], [("target_accept_prob", "1.5")])
    assert get_method("nuts").parse_options({"num_chains": 3}) == {
        "num_chains": 3, "target_accept_prob": 0.8, "max_tree_depth": 10}


def test_compare_figure_is_linear_lists_skipped_methods_and_has_ess_panel():
    rows = [
        {"method": "nuts", "status": "ok", "wall_s": 9.8, "ess_per_s": 37.7,
         "mean_error_sd": 0.046, "energy_distance": 0.011},
        {"method": "svi", "status": "ok", "wall_s": 3.9, "mean_error_sd": 0.055,
         "energy_distance": 0.018},
        {"method": "vimco", "status": "skipped", "note": "discrete only"},
        {"method": "sgld", "status": "failed", "note": "boom"},
    ]
    fig = compare_figure("gaussian_conjugate", rows)
    titles = [ax.get_title() for ax in fig.axes]
    assert any("ESS / s" in t for t in titles) and len(titles) == 4
    assert all(ax.get_xscale() == "linear" for ax in fig.axes)
    ticks = fig.axes[0].get_yticks()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    top_down = [label for _, label in sorted(zip(ticks, labels), reverse=True)]
    assert top_down == ["nuts", "svi", "vimco (skipped)", "sgld (failed)"]
    error = next(ax for ax in fig.axes if "mean error" in ax.get_title())
    widths = sorted(p.get_width() for p in error.patches if p.get_width() > 0)
    assert widths == pytest.approx([0.046, 0.055])  # bars in proportion: 0.046 vs 0.055


def test_skipped_methods_give_a_reason():
    from models.cli import compare

    rows = compare("discrete_mixture", ["svi"], num_samples=10, seed=0, device="cpu",
                   progress=False, out=None)
    assert rows[0]["status"] == "skipped" and "discrete" in rows[0]["note"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gaussian_conjugate", "logistic_regression", "sparse_logistic"])
def test_compare_runs_every_applicable_method(model):
    """Integration: every method either runs (tiny budget) or says why it can't."""
    from models.cli import compare

    rows = compare(model, method_names(), num_samples=20, seed=0, device="cpu", progress=False,
                   out=None, num_steps=20, warmup_steps=20)
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
                   num_samples=20, seed=0, device="cuda", progress=False, out=None, num_steps=20,
                   warmup_steps=20)
    assert [r["status"] for r in rows] == ["ok"] * 5, rows
    assert all("heldout_lpd" in r for r in rows)


def test_benchmarks_take_a_threads_flag():
    run = [sys.executable, "-m", "benchmarks", "--list"]
    proc = subprocess.run([*run, "--threads", "0"], capture_output=True, text=True, env=ENV,
                          check=False)
    assert proc.returncode == 2 and "--threads must be >= 1" in proc.stderr
    proc = subprocess.run([*run, "--threads", "2"], capture_output=True, text=True, env=ENV,
                          check=False)
    assert proc.returncode == 0 and proc.stdout


def test_dsgld_says_it_is_biased_on_non_iid_shards():
    """The CLI's dsgld is FSGLD's biased baseline (on federated_blobs its posterior mean is
    several sds off while its chains pass R-hat): every fit says so; fsgld's does not."""
    from models.methods import FitConfig
    from models.metrics import diagnose

    spec = models.get("federated_blobs")
    messages = {}
    for name in ("dsgld", "fsgld"):
        method = get_method(name)
        config = FitConfig(num_samples=20, seed=0, progress=False,
                           options=method.parse_options({}))
        messages[name] = diagnose(method.fit(spec, config))[1]
    assert any("biased" in m and "use fsgld" in m for m in messages["dsgld"]), messages
    assert not any("biased" in m for m in messages["fsgld"]), messages
