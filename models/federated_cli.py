"""Federated SGLD with one process per shard of a zoo model: the torchrun entry point.

Run ``torchrun --standalone --nproc_per_node=S -m models.federated_cli --model NAME ...`` (or
``torchrun ... $(which pyroforge) federated --model NAME ...``), with ``S`` the model's number
of shards; every process runs :func:`mcmc.distributed.run_worker` on its own shard (gloo on CPU,
NCCL on CUDA). Rank 0 prints each site's posterior mean and variance and saves
``{site: (C, S, *shape)}`` draws with ``--out``.

This module lives on the models side because it reads zoo models; :mod:`mcmc` never imports
:mod:`models`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pyroforge federated",
        description="FSGLD/DSGLD on a zoo model's shards, one process per shard (run it under "
                    "torchrun --nproc_per_node=<number of shards>)",
    )
    ap.add_argument("--model", default="federated_blobs", help="a zoo model with shards")
    ap.add_argument("--method", default="fsgld", choices=["fsgld", "dsgld"])
    ap.add_argument("--tau", type=int, default=20, help="local steps per visit")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--chains", type=int, default=8, help="chains (vectorised)")
    ap.add_argument("--step-size", type=float, default=1e-3)
    ap.add_argument("--subsample-size", type=int, default=None, help="rows per local minibatch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a peer")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--out", default=None, help="rank 0 saves {site: (C, S, *shape)} here")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run this process's shard (see the module docstring)."""
    a = build_parser().parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit(
            "pyroforge federated: error: run it under torchrun, one process per shard, e.g. "
            "torchrun --standalone --nproc_per_node=4 -m models.federated_cli --model "
            "federated_blobs"
        )
    for name in ("tau", "rounds", "chains"):
        if getattr(a, name) < 1:
            raise SystemExit(f"pyroforge federated: error: --{name} must be >= 1")
    import torch
    import torch.distributed as dist

    import models
    from mcmc.distributed import run_worker
    from mcmc.federated import FederatedSGLD

    device = models.resolve_device(a.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=a.timeout))
    try:
        spec = models.get(a.model, device=device)
        if not spec.shards:
            raise SystemExit(f"pyroforge federated: error: model {a.model!r} has no shards")
        if len(spec.shards) != dist.get_world_size():
            raise SystemExit(
                f"pyroforge federated: error: model {a.model!r} has {len(spec.shards)} shards; "
                f"run {len(spec.shards)} processes (torchrun --nproc_per_node="
                f"{len(spec.shards)}), not {dist.get_world_size()}"
            )
        out = run_worker(
            spec.model, spec.shards, num_rounds=a.rounds, num_chains=a.chains, method=a.method,
            step_size=a.step_size, tau=a.tau, subsample_size=a.subsample_size, seed=a.seed,
            scale_likelihood=False,  # the zoo's shard models scale their likelihood themselves
            timeout=a.timeout,
        )
        if out is not None:
            draws, _ = out
            rank0 = FederatedSGLD(spec.model, spec.shards, method="dsgld",
                                  scale_likelihood=False, shard_indices=[0],
                                  shard_sizes=[1] * len(spec.shards))
            result = rank0.constrain(draws)
            for k, v in result.items():
                print(f"{k}: mean {v.mean((0, 1)).tolist()} var {v.var((0, 1)).tolist()}")
            if a.out:
                torch.save(result, a.out)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
