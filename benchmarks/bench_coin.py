"""Coin sampling benchmarks: per-step cost vs Pyro's SVGD, and scaling to many particles."""

from __future__ import annotations

import resource

import pyro
import torch
from pyro.infer import SVGD, RBFSteinKernel

import models
from mcmc.coin import CoinBetting, FunctionPotential
from mcmc.coin_svgd import CoinSVGD
from models.device import resolve_device

from . import peers
from .harness import Target, benchmark


@benchmark(
    "coin_svgd_step_logistic",
    targets=[
        Target("pyroforge_coin_svgd", "pyro_svgd_adam", "<=", 1.1),
        Target("pyroforge_coin_svgd", "numpyro_steinvi_svgd", "<=", 1.5),
    ],
)
def coin_svgd_step(quick: bool):
    """One step of 100-particle SVGD on logistic_regression (31 weights, 455 rows).

    ``pyroforge_coin_svgd``: :class:`mcmc.coin_svgd.CoinSVGD` with its defaults (RBF median
    kernel, coin betting, Laplace-whitened particles, particle-major packing; the model
    broadcasts, so the particles are evaluated in one model run under a particle plate; the
    potential's value and gradient run as a captured TorchScript graph, ``capture="auto"``,
    under the whitening map). ``pyroforge_coin_svgd_eager``: the same with ``capture="off"``
    (the Pyro model run every step). ``pyroforge_coin_svgd_inductor``: ``capture="inductor"``
    (opt-in; its compilation is the first call). ``pyroforge_coin_svgd_vmap`` /
    ``pyroforge_coin_svgd_loop``: ``vectorize="vmap"`` / ``"loop"``, the fallback paths taken
    for models that do not broadcast (their cost, for comparison; captured too).
    ``pyro_svgd_adam``: ``pyro.infer.SVGD`` with ``RBFSteinKernel`` and Adam.
    ``pyro_svgd_coinbetting``: Pyro's SVGD with ``PyroOptim(CoinBetting, {})`` (isolates the
    optimizer's cost: Adam vs coin betting inside the same Pyro step). ``numpyro_steinvi_svgd``: NumPyro's ``contrib.einstein.SVGD`` (``RBFKernel``,
    median bandwidth; Adam), one jitted ``update`` per call, on the CPU whatever the torch
    device."""
    device = resolve_device("auto")
    spec = models.get("logistic_regression", device=device, with_reference=False)
    n = 100
    pyro.set_rng_seed(0)
    coin = CoinSVGD(spec.model, num_particles=n, max_plate_nesting=spec.max_plate_nesting)
    coin.step(*spec.args, **spec.kwargs)
    fallback = {}
    for name, opts in (("vmap", {"vectorize": "vmap"}), ("loop", {"vectorize": "loop"}),
                       ("eager", {"capture": "off"}), ("inductor", {"capture": "inductor"})):
        pyro.set_rng_seed(0)
        fallback[name] = CoinSVGD(spec.model, num_particles=n,
                                  max_plate_nesting=spec.max_plate_nesting, **opts)
        fallback[name].step(*spec.args, **spec.kwargs)

    def pyro_svgd(optim):
        pyro.clear_param_store()
        svgd = SVGD(spec.model, RBFSteinKernel(), optim, n, spec.max_plate_nesting)
        svgd.step(*spec.args, **spec.kwargs)
        # Keep this instance's particles: Pyro's SVGD reads them from the global param store.
        state = pyro.get_param_store().get_state()
        return svgd, state

    adam, adam_state = pyro_svgd(pyro.optim.Adam({"lr": 0.01}))
    cb, cb_state = pyro_svgd(pyro.optim.PyroOptim(CoinBetting, {}))

    def run_pyro(svgd, state):
        def call():
            pyro.get_param_store().set_state(state)
            svgd.step(*spec.args, **spec.kwargs)

        return call

    impls = {
        "pyroforge_coin_svgd": lambda: coin.step(*spec.args, **spec.kwargs),
        "pyroforge_coin_svgd_eager": lambda: fallback["eager"].step(*spec.args, **spec.kwargs),
        "pyroforge_coin_svgd_inductor":
            lambda: fallback["inductor"].step(*spec.args, **spec.kwargs),
        "pyroforge_coin_svgd_vmap": lambda: fallback["vmap"].step(*spec.args, **spec.kwargs),
        "pyroforge_coin_svgd_loop": lambda: fallback["loop"].step(*spec.args, **spec.kwargs),
        "pyro_svgd_adam": run_pyro(adam, adam_state),
        "pyro_svgd_coinbetting": run_pyro(cb, cb_state),
    }
    X, y = spec.args
    impls.update(peers.numpyro_svgd(X, y, spec.kwargs["prior_scale"], num_particles=n, lr=0.01))
    return impls


@benchmark("coin_svgd_scaling", repeats=3, warmup=1)
def coin_svgd_scaling(quick: bool):
    """One Coin SVGD step with many particles on a standard normal target in d dims.

    Full: 10^4 particles x d = 100 (the chunked kernel never forms the (n, n, d) tensor, which
    would be 1e10 floats here). Quick: 2000 x 20. ``extra``: particles, dim, peak memory (CUDA:
    ``max_memory_allocated``; CPU: the process's peak RSS, an upper bound, next to the RSS
    before the sampler existed, ``baseline_rss_mb``)."""
    device = resolve_device("auto")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n, d = (2000, 20) if quick else (10_000, 100)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = (torch.randn(n, d, generator=gen) + 3.0).to(device)
    pot = FunctionPotential(lambda x: -0.5 * x.pow(2).sum(-1), d)
    sampler = CoinSVGD(pot, num_particles=n, initial_particles=x0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        sampler.step()
        if device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"particles": n, "dim": d, "peak_mem_mb": mem, "baseline_rss_mb": baseline,
                "device": str(device)}

    return {"pyroforge_coin_svgd": step}
