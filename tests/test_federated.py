"""Tests of DSGLD / FSGLD (in-process execution) on the zoo's non-iid ``federated_blobs``."""

import math

import pytest
import torch

import models
from mcmc.federated import FederatedSGLD, fit_shard_approximation
from mcmc.potential import Potential


@pytest.fixture(scope="module")
def blobs():
    return models.get("federated_blobs", dtype=torch.float64)


H = 1e-3


def _ula_variance(spec):
    """1-D stationary variance of full-gradient Langevin: 2h / (hP (2 - hP)), V = 0."""
    o = spec.options
    P = 1 / o["prior_scale"] ** 2 + spec.data_size / o["obs_scale"] ** 2
    return 2 * H / (H * P * (2 - H * P)), 1 / P


@pytest.mark.parametrize("tau", [1, 20, 200])
def test_fsgld_spread_matches_the_stationary_formula(blobs, tau):
    """FSGLD with within-shard minibatches (B = 10): the q_s are exact here, so the only
    gradient noise is the minibatch noise of the shard being visited, V_s (known in closed
    form). The time-averaged stationary variance is the 1-D formula with V averaged over the
    realised visit schedule: (2h + h^2 V) / (hP (2 - hP)), for any tau."""
    o, N, B = blobs.options, blobs.data_size, 10
    P = 1 / o["prior_scale"] ** 2 + N / o["obs_scale"] ** 2
    C, steps, burn = 100, 1000, 200
    algo = FederatedSGLD(
        blobs.model, blobs.shards, method="fsgld", step_size=H, tau=tau, seed=0, subsample_size=B,
        scale_likelihood=False,  # the zoo's shard models scale their likelihood (num_total)
    )
    draws = algo.sample_chains(steps, num_chains=C, unconstrained=True)["_z"]
    assert algo.driver.t == steps and draws.shape == (C, steps, 2)
    # per-step minibatch-noise variance of (N / B) * sum over B rows of shard s (w/o replacement)
    V_s = []
    for (x,), _ in blobs.shards:
        n = x.shape[0]
        S2 = x.double().var(0, unbiased=False)
        V_s.append(N**2 * S2 * (n - B) / (B * (n - 1)) / o["obs_scale"] ** 4)
    shard_of_step = [algo.shard_for_round(t // tau) for t in range(steps)]
    V = torch.stack([V_s[s] for s in shard_of_step[burn:]]).mean(0)
    target = (2 * H + H**2 * V) / (H * P * (2 - H * P))
    ula = 2 * H / (H * P * (2 - H * P))
    d = draws[:, burn:]
    mean_exact = blobs.reference.mean()["theta"]
    per_chain_var = ((d - mean_exact) ** 2).mean(1)  # chains are independent: SE across chains
    var, var_se = per_chain_var.mean(0), per_chain_var.std(0) / math.sqrt(C)
    per_chain_mean = d.mean(1)
    mean, mean_se = per_chain_mean.mean(0), per_chain_mean.std(0) / math.sqrt(C)
    print(f"tau={tau}: FSGLD var {var}, formula {target}, SE {var_se}; full-gradient ULA {ula:.5f}")
    assert ((var - target).abs() <= 4 * var_se).all()
    assert ((mean - mean_exact).abs() <= 4 * mean_se).all()
    assert ((var - ula).abs() > 10 * var_se).all()  # the h^2 V term is resolved


def test_dsgld_spread_blows_up_with_long_local_trajectories(blobs):
    target, _ = _ula_variance(blobs)
    C, steps, burn, tau = 50, 1000, 200, 200
    algo = FederatedSGLD(blobs.model, blobs.shards, method="dsgld", step_size=H, tau=tau, seed=0,
                         scale_likelihood=False)
    draws = algo.sample_chains(steps, num_chains=C, unconstrained=True)["_z"]
    d = draws[:, burn:]
    var = ((d - blobs.reference.mean()["theta"]) ** 2).mean((0, 1))
    print("DSGLD tau=200 variance / stationary formula", var / target)
    assert (var > 10 * target).all()


def test_shard_approximation_is_exact_for_gaussian_likelihoods(blobs):
    args, kwargs = blobs.shards[1]
    pot = Potential(blobs.model, args, kwargs)
    prior = Potential(blobs.model, args, kwargs, exclude_sites=["x"])
    N, n = blobs.data_size, blobs.options["shard_sizes"][1]
    q = fit_shard_approximation(pot, prior, n / N)
    x = args[0].double()
    sigma2 = blobs.options["obs_scale"] ** 2
    # shard log-likelihood: precision n / sigma^2 I, mean = shard average
    torch.testing.assert_close(q.precision, torch.eye(2, dtype=torch.float64) * n / sigma2)
    torch.testing.assert_close(q.mean(), x.mean(0), rtol=1e-6, atol=1e-6)


def test_resume_from_checkpoint_is_bit_identical(blobs):
    kw = {"method": "fsgld", "step_size": H, "tau": 5, "seed": 4, "subsample_size": 10,
          "scale_likelihood": False}
    full = FederatedSGLD(blobs.model, blobs.shards, **kw).sample_chains(
        40, num_chains=3, unconstrained=True)["_z"]
    algo = FederatedSGLD(blobs.model, blobs.shards, **kw)
    d1 = algo.sample_chains(13, num_chains=3, unconstrained=True)["_z"]  # mid-round
    sd = algo.state_dict()  # the checkpoint: chains, generator, step counter, q_s parameters
    algo2 = FederatedSGLD(blobs.model, blobs.shards, **{**kw, "seed": 99})
    algo2.load_state_dict(sd)
    d2 = algo2.sample_chains(27, num_chains=3, unconstrained=True)["_z"]
    assert torch.equal(torch.cat([d1, d2], 1), full)
    with pytest.raises(ValueError, match=r"holds 3 chain\(s\)"):
        algo2.sample_chains(2, num_chains=4)
    # the round-by-round execution of the distributed runner gives the same draws
    algo3 = FederatedSGLD(blobs.model, blobs.shards, **kw)
    packet = algo3.initial_packet(3)
    rounds = []
    for _ in range(8):
        packet, d = algo3.run_round(packet)
        rounds.append(d)
    assert torch.equal(torch.cat(rounds, 1), full)


def test_bad_input(blobs):
    shards = blobs.shards
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        FederatedSGLD(blobs.model, shards, step_size=0.0)
    with pytest.raises(ValueError, match="tau must be an int >= 1"):
        FederatedSGLD(blobs.model, shards, tau=0)
    with pytest.raises(ValueError, match="method must be"):
        FederatedSGLD(blobs.model, shards, method="sgld")
    with pytest.raises(ValueError, match=r"shard 0: FederatedSGLD\(\.\.\., subsample_size=51\) is "
                       r"larger than the 50 rows of plate 'data'"):
        FederatedSGLD(blobs.model, shards, subsample_size=51)
    (x0,), kw0 = shards[0]
    empty = [((x0[:0],), kw0)] + list(shards[1:])
    with pytest.raises(ValueError, match="shard 0 is empty"):
        FederatedSGLD(blobs.model, empty)
    wide = list(shards[:-1]) + [((torch.zeros(5, 3, dtype=x0.dtype),), kw0)]
    with pytest.raises(ValueError, match="shards 0 and 3 have different"):
        FederatedSGLD(blobs.model, wide)
    with pytest.raises(ValueError, match=r"shard_probs=\[0.5, 0.5, 0.5, -0.5\]\): must be 4 positive"):
        FederatedSGLD(blobs.model, shards, shard_probs=[0.5, 0.5, 0.5, -0.5])
    with pytest.raises(ValueError, match="need at least one shard"):
        FederatedSGLD(blobs.model, [])


def test_nonfinite_names_iteration_shard_and_site(blobs):
    algo = FederatedSGLD(blobs.model, blobs.shards, method="dsgld", step_size=10.0, tau=5,
                         scale_likelihood=False)
    with pytest.raises(FloatingPointError, match=r"on shard \d at iteration \d+: .*'theta'"):
        algo.sample_chains(250, num_chains=2)
