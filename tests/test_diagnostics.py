"""ArviZ conversion round trips, log-likelihood and netCDF I/O (file modes included)."""

import os

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVGD, RBFSteinKernel, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from mcmc.diagnostics import (
    atomic_write,
    group_names,
    load_inference_data,
    log_likelihood,
    posterior_dataset,
    save_inference_data,
    to_inference_data,
)


def model(x):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, s.unsqueeze(-1)).to_event(1), obs=x)


X = torch.randn(15, 2)


def test_mcmc_round_trip_with_log_likelihood(tmp_path):
    mcmc = MCMC(NUTS(model), num_samples=12, warmup_steps=8, num_chains=1, disable_progbar=True)
    mcmc.run(X)
    idata = to_inference_data(mcmc, model=model, model_args=(X,), log_likelihood=True)
    assert idata.posterior["mu"].shape == (1, 12, 2)
    assert idata.posterior["s"].shape == (1, 12)
    assert idata.observed_data["x"].shape == (15, 2)
    assert idata.log_likelihood["x"].shape == (1, 12, 15)
    # pointwise log-likelihood equals a direct computation at one draw
    mu = mcmc.get_samples()["mu"][3]
    s = mcmc.get_samples()["s"][3]
    direct = dist.Normal(mu, s).to_event(1).log_prob(X).numpy()
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0, 3], direct, rtol=1e-5)
    assert set(group_names(idata)) == {"posterior", "log_likelihood", "observed_data"}
    path = save_inference_data(idata, tmp_path / "fit.nc")
    back = load_inference_data(path)
    assert set(group_names(back)) == set(group_names(idata))
    assert posterior_dataset(back)["mu"].shape == (1, 12, 2)
    np.testing.assert_allclose(back.posterior["mu"].values, idata.posterior["mu"].values)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_dict_of_draws_and_shape_errors():
    draws = {"mu": torch.randn(3, 7, 2), "s": torch.rand(3, 7)}
    idata = to_inference_data(draws)
    assert idata.posterior["mu"].shape == (3, 7, 2)
    assert idata.posterior.sizes["chain"] == 3
    with pytest.raises(ValueError, match="chains, draws"):
        to_inference_data({"mu": torch.randn(3, 7), "s": torch.rand(2, 7)})
    with pytest.raises(ValueError, match="kind"):
        to_inference_data(draws, kind="chains")
    with pytest.raises(TypeError, match="source must be"):
        to_inference_data(42)


def test_particles_are_one_chain():
    idata = to_inference_data({"mu": torch.randn(25, 2)}, kind="particles")
    assert idata.posterior["mu"].shape == (1, 25, 2)


def test_pyro_svgd_particles():
    svgd = SVGD(model, RBFSteinKernel(), pyro.optim.Adam({"lr": 0.05}), num_particles=6,
                max_plate_nesting=1)
    svgd.step(X)
    idata = to_inference_data(svgd)
    assert idata.posterior["mu"].shape == (1, 6, 2)


def test_guide_draws_match_guide_moments():
    guide = AutoNormal(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        svi.step(X)
    idata = to_inference_data(guide, model=model, model_args=(X,), num_samples=4000)
    assert idata.posterior["mu"].shape == (1, 4000, 2)
    loc = guide.locs.mu.detach().numpy()
    scale = guide.scales.mu.detach().numpy()
    got = idata.posterior["mu"].values[0]
    # sample mean within 4 standard errors of the guide's mean
    assert np.all(np.abs(got.mean(0) - loc) < 4 * scale / np.sqrt(4000))


def test_log_likelihood_loops_for_non_broadcasting_models():
    def scalar_model(x):
        m = pyro.sample("m", dist.Normal(0.0, 1.0))
        for i in range(x.shape[0]):  # no plate, scalar arithmetic: cannot broadcast over draws
            pyro.sample(f"x{i}", dist.Normal(float(m), 1.0), obs=x[i])

    draws = {"m": torch.randn(1, 4)}
    ll = log_likelihood(scalar_model, draws, (torch.zeros(3),))
    assert set(ll) == {"x0", "x1", "x2"} and ll["x0"].shape == (1, 4)
    np.testing.assert_allclose(ll["x1"][0], dist.Normal(draws["m"][0], 1.0).log_prob(torch.zeros(4)),
                               rtol=1e-6)


def _write_x(tmp):
    with open(tmp, "w") as fh:
        fh.write("x")


def test_atomic_write_gives_files_the_umask_mode(tmp_path):
    """Results are written like ordinary files (0o666 less the umask), not mkstemp's 0o600."""
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.txt", _write_x)
        assert os.stat(path).st_mode & 0o777 == 0o644
        os.umask(0o077)
        path = atomic_write(tmp_path / "b.txt", _write_x)
        assert os.stat(path).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]
