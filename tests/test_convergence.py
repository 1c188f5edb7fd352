"""Split R-hat, bulk ESS and the convergence report (mcmc.diagnostics), checked against ArviZ and
against the closed-form ESS of AR(1) chains."""

import warnings

import numpy as np
import pytest

from mcmc.diagnostics import (
    ConvergenceWarning,
    bulk_ess,
    check_convergence,
    split_rhat,
)


def ar1(phi, chains, draws, dim=1, seed=0, shift=None):
    """Stationary AR(1) chains ``x_t = phi x_{t-1} + e_t`` (unit innovations)."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((chains, draws, dim))
    x = np.empty_like(e)
    x[:, 0] = e[:, 0] / np.sqrt(1 - phi**2)
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    if shift is not None:
        x += np.asarray(shift, dtype=float)[:, None, None]
    return x


CASES = {
    "iid": lambda: np.random.default_rng(1).standard_normal((4, 500, 3)),
    "ar0.9": lambda: ar1(0.9, 4, 1000, 2),
    "ar0.99": lambda: ar1(0.99, 2, 300, 2),
    "shifted_chain": lambda: ar1(0.5, 3, 400, 2, shift=[0.0, 0.0, 1.5]),
    "odd_length": lambda: np.random.default_rng(2).standard_normal((2, 101, 2)),
    "cauchy": lambda: np.random.default_rng(3).standard_cauchy((4, 200, 2)),
    "ties": lambda: np.random.default_rng(4).integers(0, 3, (4, 100, 2)).astype(float),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rhat_and_ess_agree_with_arviz(case):
    az = pytest.importorskip("arviz")
    x = CASES[case]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = az.convert_to_dataset({"x": x})
        ref_rhat = np.asarray(az.rhat(ds)["x"])
        ref_ess = np.asarray(az.ess(ds, method="bulk")["x"])
    np.testing.assert_allclose(split_rhat(x), ref_rhat, rtol=1e-10)
    np.testing.assert_allclose(bulk_ess(x), ref_ess, rtol=1e-8)


def test_bulk_ess_of_ar1_matches_closed_form():
    # ESS = S (1 - phi) / (1 + phi) for AR(1); 8 chains x 4000 draws -> within ~10%
    phi = 0.8
    x = ar1(phi, 8, 4000, 3, seed=5)
    expected = x.shape[0] * x.shape[1] * (1 - phi) / (1 + phi)
    np.testing.assert_allclose(bulk_ess(x), expected, rtol=0.1)


def test_rhat_flags_disagreeing_chains_and_keeps_site_shape():
    good = ar1(0.5, 4, 400, 6, seed=6).reshape(4, 400, 2, 3)
    assert split_rhat(good).shape == (2, 3) and bulk_ess(good).shape == (2, 3)
    assert np.all(split_rhat(good) < 1.02)
    bad = ar1(0.5, 4, 400, 1, seed=7, shift=[0, 0, 0, 2.0])
    assert split_rhat(bad)[0] > 1.1
    # a single chain that drifts is caught by splitting it
    drift = np.linspace(0, 3, 400)[None, :, None] + ar1(0.2, 1, 400, 1, seed=8)
    assert split_rhat(drift)[0] > 1.1
    with pytest.raises(ValueError, match=">= 4 draws"):
        split_rhat(np.zeros((2, 3)))


def test_report_is_quiet_when_chains_agree():
    report = check_convergence({"a": ar1(0.3, 4, 500, 2), "b": ar1(0.3, 4, 500, 1, seed=9)},
                               name="toy")
    assert report.ok and report.warnings == ()
    assert report.num_chains == 4 and report.num_draws == 500
    assert report.max_rhat < 1.02 and report.min_ess > 400
    assert report.summary.startswith("toy: 4 chains x 500 draws; max R-hat")
    assert report.summary.endswith(": ok")


def test_report_warns_with_advice():
    report = check_convergence({"tau": ar1(0.98, 4, 300, 1, shift=[0, 0, 0, 3.0])}, name="m")
    assert len(report.warnings) == 2
    rhat, ess = report.warnings
    assert "chains disagree" in rhat and "tau" in rhat and "step_size" in rhat
    assert "effective sample size" in ess and "num_samples" in ess
    with pytest.warns(ConvergenceWarning) as record:
        report.warn()
    assert [str(w.message) for w in record] == list(report.warnings)


def test_single_chain_and_short_runs_say_what_is_missing():
    one = check_convergence({"x": ar1(0.3, 1, 500, 1)})
    assert one.rhat == {} and "R-hat needs >= 2 chains" in one.summary
    assert one.ess["x"] > 100 and one.ok
    short = check_convergence({"x": np.zeros((2, 1))})  # e.g. --num-samples 1
    assert short.rhat == {} and short.ess == {} and short.ok
    assert "R-hat and ESS need >= 4 draws per chain" in short.summary


def test_particle_report_uses_ksd_and_stuck_fraction():
    sets = np.random.default_rng(10).standard_normal((2, 100, 3))
    fine = check_convergence({"w": sets}, kind="particles", ksd=0.1, initial_ksd=5.0)
    assert fine.ok and fine.ess == {} and "2 sets x 100 particles" in fine.summary
    stalled = check_convergence({"w": sets}, kind="particles", ksd=4.0, initial_ksd=5.0,
                                stuck_fraction=0.13, name="coin")
    assert len(stalled.warnings) == 2
    assert "Stein discrepancy has not fallen" in stalled.warnings[0]
    assert "13% of the particles are stuck" in stalled.warnings[1]
    apart = check_convergence({"w": sets + np.array([0.0, 1.0])[:, None, None]},
                              kind="particles")
    assert "particle sets disagree" in apart.warnings[0]
    with pytest.raises(ValueError, match="kind"):
        check_convergence({"w": sets}, kind="chains")
    with pytest.raises(ValueError, match=r"x\[None\]"):
        check_convergence({"w": sets[0, :, 0]})


# ------------------------------------------------------------------ issue 14: after every run
def test_ksd_level_check_is_absolute():
    """With ``ksd_level`` (the KSD an exact sample of this size has), the check is absolute:
    warn above KSD_LEVEL_FACTOR times it, whatever the start."""
    from mcmc.diagnostics import KSD_LEVEL_FACTOR

    ok = check_convergence(kind="particles", ksd=0.5, initial_ksd=0.6, ksd_level=0.45)
    assert ok.ok and "1.11x an exact sample's" in ok.summary
    off = check_convergence(kind="particles", ksd=KSD_LEVEL_FACTOR * 0.45 * 1.01,
                            initial_ksd=1e4, ksd_level=0.45, name="CoinSVGD")
    assert not off.ok and "not (yet) a sample of the posterior" in off.warnings[0]


def test_whitened_ksd_of_exact_draws_is_at_its_level():
    """mcmc.kernels.whitened_ksd: exact draws from a correlated, badly scaled Gaussian sit at
    the level sqrt(2 d / n) (measured ratio 0.97-1.25 over posteriors; here a Gaussian), shifted
    or over-dispersed sets far above it -- in any units. Its blind spot: a set shrunk towards
    its centre (whitening by its own covariance hides the scale; its scores are then *smaller*
    than an exact sample's), e.g. 0.3x the posterior's spread gives only ~1.3x the level."""
    import torch

    from mcmc.kernels import whitened_ksd

    g = torch.Generator().manual_seed(0)
    d, n = 5, 100
    L = torch.randn(d, d, generator=g, dtype=torch.float64).tril() * 0.01
    L.diagonal().abs_().add_(0.001)
    prec = torch.cholesky_inverse(L)
    ratios = []
    for _ in range(20):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) @ L.T
        k, level = whitened_ksd(x, -x @ prec)
        ratios.append(k / level)
    print("exact draws: KSD / level", min(ratios), max(ratios))
    assert 0.8 < min(ratios) and max(ratios) < 1.3
    shifted = torch.randn(n, d, generator=g, dtype=torch.float64) @ L.T + 3 * L[:, 0]
    k, level = whitened_ksd(shifted, -shifted @ prec)
    assert k > 2 * level
    wide = 3 * torch.randn(n, d, generator=g, dtype=torch.float64) @ L.T
    k, level = whitened_ksd(wide, -wide @ prec)
    assert k > 2 * level
    shrunk = 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64) @ L.T
    k, level = whitened_ksd(shrunk, -shrunk @ prec)
    assert k < 2 * level  # the documented blind spot


def test_stuck_particles_and_check_chains():
    from mcmc.diagnostics import check_chains, stuck_particles

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3)) * [1.0, 1e-3, 1e3]
    assert not stuck_particles(x).any()
    x[5, 1] = 0.02  # 20 sds out in one coordinate
    x[7] = np.nan
    assert stuck_particles(x).nonzero()[0].tolist() == [5, 7]
    # flat (C, S, D) chains, per site; a large set is checked on a subset of its chains
    chains = ar1(0.5, 64, 200, 3, seed=1)
    report = check_chains(chains, {"a": slice(0, 2), "b": slice(2, 3)}, name="SGLD")
    assert set(report.rhat) == {"a", "b"} and report.ok
    small = check_chains(chains, max_size=10_000)
    assert small.num_chains == 16 and "16 of 64 chains (subset checked)" in small.summary


def test_announce_logs_the_summary_and_warns_once(caplog):
    import logging

    report = check_convergence({"tau": ar1(0.98, 4, 300, 1, shift=[0, 0, 0, 3.0])}, name="m")
    assert len(report.warnings) == 2
    with caplog.at_level(logging.INFO, logger="mcmc.diagnostics"), \
            pytest.warns(ConvergenceWarning) as record:
        report.announce()
    assert len(record) == 1
    assert report.warnings[0] in str(record[0].message)
    assert report.warnings[1] in str(record[0].message)
    assert any(r.getMessage() == report.summary for r in caplog.records)


def _model():
    import pyro
    import pyro.distributions as dist

    pyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1))


def test_every_langevin_run_is_checked():
    """sample_chains (SGLD family, Bregman), the Bregman step-function runner, FederatedSGLD and
    one Pyro MCMC chain of our kernels: a run that cannot have converged (a tiny step from
    dispersed starts) warns once, saying what to change; a good one does not; diagnostics=False
    (or a warnings filter) silences it."""
    import pyro
    import torch

    from mcmc import L1, SGLD, BregmanProximalLangevin
    from mcmc.bregman import sample_chains as bregman_chains

    bad = SGLD(_model, 1e-5, max_plate_nesting=0, seed=0)
    with pytest.warns(ConvergenceWarning, match="SGLD: the chains disagree.*smaller step_size"):
        bad.sample_chains(50, num_chains=4, progress=False)
    assert not bad.convergence.ok and bad.convergence.max_rhat > 1.05
    good = SGLD(_model, max_plate_nesting=0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        good.sample_chains(1000, num_chains=4, warmup_steps=100, progress=False)
        bad.reset()
        bad.sample_chains(50, num_chains=4, progress=False, diagnostics=False)
    assert good.convergence.ok

    prox = BregmanProximalLangevin(_model, {"x": L1(1.0)}, method="myula", step_size=1e-5,
                                   max_plate_nesting=0, seed=0)
    with pytest.warns(ConvergenceWarning, match="BregmanProximalLangevin"):
        prox.sample_chains(50, num_chains=4, progress=False)
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * 3
    with pytest.warns(ConvergenceWarning, match="myula"):
        bregman_chains(x0, lambda x: torch.zeros_like(x), L1(1.0), method="myula",
                       step_size=1e-5, num_samples=50, seed=0, progress=False)

    mcmc = pyro.infer.MCMC(SGLD(_model, 1e-5, max_plate_nesting=0), num_samples=50,
                           warmup_steps=5, disable_progbar=True)
    with pytest.warns(ConvergenceWarning, match="tiny effective sample size"):
        mcmc.run()


def test_federated_sampler_is_checked():
    import models
    from mcmc import FederatedSGLD

    blobs = models.get("federated_blobs")
    algo = FederatedSGLD(blobs.model, blobs.shards, method="dsgld", step_size=1e-6, tau=1, seed=0,
                         scale_likelihood=False)
    with pytest.warns(ConvergenceWarning, match="DSGLD"):
        algo.sample_chains(20, num_chains=4, progress=False)
    assert algo.convergence is not None and not algo.convergence.ok
