"""FSGLD / DSGLD on ``torch.distributed``: one process per shard, the chains travel.

Rank ``s`` holds shard ``s`` (its data never leave the process). The algorithm is
:class:`mcmc.federated.FederatedSGLD` -- the same object and the same ``run_round`` as the
in-process mode, so the draws are bit-identical for the same seed. What crosses the wire:

* once: every shard's size (for ``p_s = N_s / N``) and, for FSGLD, the natural parameters
  ``(Lambda_s, eta_s)`` of its Gaussian surrogate ``q_s`` (``all_gather``);
* every round: the chains' packet -- states ``(C, D)``, step/round counters and the state of the
  chains' ``torch.Generator`` -- from the shard of round ``r`` to the shard of round ``r + 1``
  (point-to-point; the visit schedule is known to every rank, see
  :meth:`~mcmc.federated.FederatedSGLD.shard_for_round`);
* at the end: each rank's draws to rank 0 (the result).

Backend: gloo on CPU, NCCL when the shard data are CUDA tensors (``backend=None`` picks).

Faults: every wait on a peer polls a non-blocking receive/send with a deadline of ``timeout``
seconds. A worker that dies or hangs makes the rank waiting for it raise ``RuntimeError`` naming
the peer, the round and the timeout; the ranks waiting on that one fail in turn -- nothing
hangs forever.

Launch :func:`run_worker` in every process of an initialised process group -- with torchrun,
for the zoo's sharded models, through the models-side entry point (``mcmc`` never imports
``models``)::

    torchrun --standalone --nproc_per_node=4 -m models.federated_cli \\
        --model federated_blobs --method fsgld --tau 20 --rounds 100 --chains 8 \\
        --step-size 1e-3 --out draws.pt

(``pyroforge federated ...`` takes the same options.) Inside Python (e.g. tests)
:func:`spawn_local` starts the processes on the loopback interface.
"""

from __future__ import annotations

import datetime
import io
import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .federated import ChainPacket, FederatedSGLD, ShardApproximation

__all__ = ["free_port", "run_worker", "spawn_local"]

_GO, _STOP = 1, 0


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(work, deadline: float, what: str, timeout: float) -> None:
    """Wait for a send/recv with a deadline (gloo's P2P works only progress inside ``wait``)."""
    left = max(deadline - time.monotonic(), 0.001)
    try:
        ok = work.wait(datetime.timedelta(seconds=left))
    except RuntimeError as e:
        detail = str(e).splitlines()[0][:200]
        if "closed" in detail.lower() or "reset" in detail.lower():
            reason = "the peer closed the connection: its process died"
        else:
            reason = f"timed out after {timeout:g} s: the peer process may have died or hung"
        raise RuntimeError(
            f"rank {dist.get_rank()}: no progress on {what}; {reason} ({detail})"
        ) from None
    if ok is False:
        raise RuntimeError(
            f"rank {dist.get_rank()}: no progress on {what}; timed out after {timeout:g} s: "
            "the peer process may have died or hung"
        )


class _Wire:
    """Point-to-point transport of packets and tensors with deadlines."""

    def __init__(self, device: torch.device, timeout: float) -> None:
        self.device = device
        self.timeout = timeout

    def send(self, tensor: torch.Tensor, dst: int, what: str) -> None:
        work = dist.isend(tensor.to(self.device).contiguous(), dst)
        _wait(work, time.monotonic() + self.timeout, f"rank {dst} to take {what}", self.timeout)

    def recv(self, shape, dtype, src: int, what: str) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        work = dist.irecv(buf, src)
        _wait(work, time.monotonic() + self.timeout, f"{what} from rank {src}", self.timeout)
        return buf

    def send_packet(self, p: ChainPacket, dst: int) -> None:
        rng = p.rng_state
        header = torch.tensor([_GO, p.t, p.round, p.shard, *p.z.shape, rng.numel()])
        what = f"the chain state (round {p.round})"
        self.send(header, dst, what)
        self.send(p.z, dst, what)
        self.send(rng, dst, what)

    def recv_packet(self, src: int, round_: int, dtype: torch.dtype, z_device) -> ChainPacket:
        what = f"the chain state for round {round_}"
        header = self.recv((7,), torch.int64, src, what).cpu().tolist()
        _, t, r, shard, C, D, n = header
        z = self.recv((C, D), dtype, src, what).to(z_device)
        rng = self.recv((n,), torch.uint8, src, what).cpu()
        return ChainPacket(z, t, r, shard, rng)


def _all_gather(t: torch.Tensor, device) -> list[torch.Tensor]:
    t = t.to(device).contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def run_worker(
    model: Callable,
    shards: Sequence[tuple[tuple, dict]],
    *,
    num_rounds: int,
    num_chains: int = 1,
    method: str = "fsgld",
    step_size: float = 1e-3,
    tau: int = 1,
    subsample_size: int | None = None,
    shard_probs: Sequence[float] | None = None,
    seed: int = 0,
    scale_likelihood: bool = True,
    timeout: float = 60.0,
    initial_params: torch.Tensor | None = None,
    _fault: dict | None = None,
) -> tuple[torch.Tensor, ChainPacket] | None:
    """Run this rank's shard (``shards[rank]``) inside an initialised process group.

    ``world_size`` must equal ``len(shards)``. Only ``shards[rank]`` is used on each rank (the
    others may be ``None``). The sampler options are those of
    :class:`mcmc.federated.FederatedSGLD`. Returns ``(draws (C, num_rounds * tau, D), final
    packet)`` on rank 0 and ``None`` elsewhere (every step's draw: no warm-up or thinning).
    ``_fault`` (tests only): ``{"rank": r, "round": k, "kind": "die" | "hang"}`` makes rank
    ``r`` exit / sleep instead of running round ``k``.
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised (use torchrun or spawn_local)")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != len(shards):
        raise ValueError(
            f"world size {world} != number of shards {len(shards)}: run one process per shard"
        )
    nccl = dist.get_backend() == "nccl"
    local = [shards[rank] if s == rank else None for s in range(world)]
    algo = FederatedSGLD(
        model,
        local,
        method=method,
        step_size=step_size,
        tau=tau,
        subsample_size=subsample_size,
        shard_probs=shard_probs,
        scale_likelihood=scale_likelihood,
        seed=seed,
        shard_indices=[rank],
        shard_sizes=[1] * world,
    )
    comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    wire = _Wire(comm, timeout)
    sizes = _all_gather(torch.tensor([algo.workers[rank].size], device=comm), comm)
    algo.set_shard_sizes([int(n.item()) for n in sizes], shard_probs)
    dtype, zdev = algo.dtype, algo.device
    if method == "fsgld":
        q = algo.fit_local_approximations()[rank]
        precs = _all_gather(q.precision, comm)
        etas = _all_gather(q.eta, comm)
        modes = _all_gather(q.mode, comm)
        algo.set_approximations(
            {
                s: ShardApproximation(precs[s].to(zdev), etas[s].to(zdev), modes[s].to(zdev))
                for s in range(world)
            }
        )

    schedule = [algo.shard_for_round(r) for r in range(num_rounds)]
    my_rounds = [r for r in range(num_rounds) if schedule[r] == rank]
    my_draws = []
    packet = None
    if rank == 0:
        packet = algo.initial_packet(num_chains, initial_params)
        if schedule[0] != 0:
            wire.send_packet(packet, schedule[0])
    for r in my_rounds:
        if r > 0 and schedule[r - 1] != rank:
            packet = wire.recv_packet(schedule[r - 1], r, dtype, zdev)
        elif r == 0 and rank != 0:
            packet = wire.recv_packet(0, r, dtype, zdev)
        if _fault and _fault.get("rank") == rank and _fault.get("round") == r:
            if _fault["kind"] == "die":
                os._exit(3)
            time.sleep(10 * timeout + 60)  # "hang"
        packet, d = algo.run_round(packet)
        my_draws.append(d)
        if r + 1 < num_rounds and schedule[r + 1] != rank:
            wire.send_packet(packet, schedule[r + 1])
    # results to rank 0: draws in round order, and the final packet
    last = schedule[-1]
    if rank != 0:
        if my_rounds:
            wire.send(torch.cat(my_draws, dim=1), 0, "the draws")
        if last == rank:
            wire.send_packet(packet, 0)
        return None
    C, D, T = num_chains, algo.dim, tau
    per_rank = {0: torch.cat(my_draws, dim=1) if my_draws else None}
    for s in range(1, world):
        n = sum(1 for r in schedule if r == s)
        if n:
            per_rank[s] = wire.recv((C, n * T, D), dtype, s, "the draws").to(zdev)
    if last != 0:
        packet = wire.recv_packet(last, num_rounds, dtype, zdev)
    pos = {s: 0 for s in range(world)}
    out = []
    for r in range(num_rounds):
        s = schedule[r]
        out.append(per_rank[s][:, pos[s] * T : (pos[s] + 1) * T])
        pos[s] += 1
    return torch.cat(out, dim=1), packet


def _spawn_entry(rank, world, port, backend, timeout, fn, fn_kwargs, queue):
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
        result = fn(**fn_kwargs)
        # bytes, not tensors: torch's queue would share memory with a process about to exit
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which re-raises
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001, S110 - best effort while tearing down
                pass


def _load(status: str, payload):
    if status != "ok":
        return payload
    return torch.load(io.BytesIO(payload), weights_only=False)


def spawn_local(
    world_size: int,
    fn: Callable = run_worker,
    *,
    timeout: float = 60.0,
    backend: str = "gloo",
    **fn_kwargs,
) -> dict[int, tuple[str, object]]:
    """Run ``fn(**fn_kwargs)`` in ``world_size`` processes on 127.0.0.1 (a free port).

    Returns ``{rank: ("ok", result) | ("error", message) | ("lost", reason)}``. Processes still
    running ``2 * timeout + 30`` s after the start, or ``timeout + 5`` s after the first rank
    reported an error, are terminated (reported as "lost"), so a hung worker cannot hang the
    caller. ``fn_kwargs["timeout"]`` defaults to ``timeout``.
    """
    fn_kwargs.setdefault("timeout", timeout)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_spawn_entry,
            args=(rank, world_size, port, backend, timeout, fn, fn_kwargs, queue),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + 2 * timeout + 30
    while len(results) < world_size and time.monotonic() < deadline:
        while not queue.empty():
            rank, status, payload = queue.get()
            results[rank] = (status, _load(status, payload))
            if status != "ok":
                # once one rank failed, the others get one more timeout to report, then go
                deadline = min(deadline, time.monotonic() + timeout + 5)
        if all(not p.is_alive() for p in procs) and queue.empty():
            break
        time.sleep(0.02)
    while not queue.empty():
        rank, status, payload = queue.get()
        results[rank] = (status, _load(status, payload))
    for rank, p in enumerate(procs):
        if p.is_alive():
            p.terminate()
            p.join(5)
            results.setdefault(rank, ("lost", "terminated: still running after the deadline"))
        else:
            p.join()
            results.setdefault(rank, ("lost", f"exited with code {p.exitcode} without a result"))
    return results
