"""torch.distributed execution of FSGLD/DSGLD: one process per shard on 127.0.0.1 (gloo)."""

import pytest
import torch

import models
from mcmc.distributed import run_worker, spawn_local
from mcmc.federated import FederatedSGLD

pytestmark = pytest.mark.distributed


def test_distributed_draws_identical_to_in_process():
    spec = models.get("federated_blobs", dtype=torch.float64)  # 4 shards -> 4 processes
    kw = {"method": "fsgld", "step_size": 1e-3, "tau": 5, "seed": 3, "subsample_size": 20,
          "scale_likelihood": False}
    algo = FederatedSGLD(spec.model, spec.shards, **kw)
    d_in = algo.sample_chains(50, num_chains=3, unconstrained=True)["_z"]
    res = spawn_local(
        4,
        run_worker,
        timeout=60,
        model=spec.model,
        shards=spec.shards,
        num_rounds=10,
        num_chains=3,
        **kw,
    )
    assert all(status == "ok" for status, _ in res.values()), res
    d_dist, packet_dist = res[0][1]
    assert all(res[r][1] is None for r in (1, 2, 3))
    assert torch.equal(d_in, d_dist)
    assert packet_dist.t == algo.driver.t == 50
    assert torch.equal(packet_dist.rng_state, algo.driver.generator.get_state())


@pytest.mark.parametrize("kind", ["die", "hang"])
def test_dead_or_hung_worker_fails_the_others_within_the_timeout(kind):
    spec = models.get("federated_blobs", num_shards=2, dtype=torch.float64)
    algo = FederatedSGLD(spec.model, spec.shards, method="dsgld", seed=1, scale_likelihood=False)
    # the first round that rank 1 runs (and that some other round leads into)
    r1 = next(r for r in range(1, 50) if algo.shard_for_round(r) == 1)
    res = spawn_local(
        2,
        run_worker,
        timeout=5,
        model=spec.model,
        shards=spec.shards,
        num_rounds=r1 + 3,
        num_chains=2,
        method="dsgld",
        seed=1,
        scale_likelihood=False,
        step_size=1e-3,
        _fault={"rank": 1, "round": r1, "kind": kind},
    )
    status0, msg0 = res[0]
    print(kind, res)
    assert status0 == "error"
    assert "from rank 1" in msg0
    expected = "its process died" if kind == "die" else "timed out after 5 s"
    assert expected in msg0
    assert res[1][0] == "lost"  # died (no result) or hung (terminated by spawn_local)


def test_federated_command_line_without_torchrun(monkeypatch, capsys):
    """`pyroforge federated` / `python -m models.federated_cli` (the torchrun entry point, which
    lives on the models side: mcmc never imports models) says how to launch it."""
    from models import cli, federated_cli

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match="run it under torchrun, one process per shard"):
        federated_cli.main(["--model", "federated_blobs", "--rounds", "2"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["federated", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--tau" in out and "torchrun" in out
