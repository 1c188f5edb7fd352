"""SGLD: per-step time vs a hand-written torch SGLD loop, and ESS/s vs Pyro NUTS, on the zoo's
``logistic_regression_synthetic`` (GPU when available)."""

from __future__ import annotations

import math
import time

import pyro
import torch
from pyro.ops.stats import effective_sample_size

import models
from mcmc.sgld import CVSGLD, SGLD
from models.device import resolve_device

from .harness import Target, benchmark


@benchmark(
    "sgld_step_time",
    targets=[Target("pyroforge_sgld", "torch_loop_sgld", "<=", 1.1, metric="time")],
    repeats=10,
    warmup=2,
)
def sgld_step_time(quick: bool):
    """10^6 rows (quick: 10^5), d = 10, minibatch 1000 drawn with replacement, one chain; each
    call runs 20 steps. ``pyroforge_sgld`` is :class:`mcmc.sgld.SGLD` (the Pyro model through
    the potential layer: one traced model run + autograd per step); ``torch_loop_sgld`` is the
    same update written by hand on the tensors (autograd on an inline log-joint)."""
    device = resolve_device("auto")
    n = 10**5 if quick else 10**6
    spec = models.get("logistic_regression_synthetic", num_rows=n, dim=10, device=device)
    X, y = spec.args[0], spec.args[1]
    prior_scale = spec.kwargs["prior_scale"]
    B, h, steps = 1000, 1.0 / n, 20
    kernel = SGLD(spec.model, step_size=h, subsample_size=B, with_replacement=True, seed=0)
    kernel.setup_potential(spec.args, spec.kwargs)
    kernel.init_state(1, torch.zeros(1, X.shape[1], device=device))
    gen = torch.Generator(device=device).manual_seed(0)
    w0 = torch.zeros(X.shape[1], device=device)
    state = {"w": w0}

    def pyroforge_sgld():
        for _ in range(steps):
            kernel.driver.step()

    def torch_loop_sgld():
        w = state["w"]
        for _ in range(steps):
            idx = torch.randint(n, (B,), generator=gen, device=device)
            w = w.detach().requires_grad_(True)
            logits = X[idx] @ w
            loglik = -torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y[idx], reduction="sum"
            )
            logp = (n / B) * loglik - 0.5 * ((w / prior_scale) ** 2).sum()
            (g,) = torch.autograd.grad(-logp, w)
            noise = torch.randn(w.shape, generator=gen, device=device)
            w = w.detach() - h * g + math.sqrt(2 * h) * noise
        state["w"] = w

    return {"pyroforge_sgld": pyroforge_sgld, "torch_loop_sgld": torch_loop_sgld}


@benchmark("sgld_chains_step", repeats=10, warmup=2)
def sgld_chains_step(quick: bool):
    """256 SGLD chains (quick: 64) on logistic_regression_synthetic with 1000 rows, d = 10; each
    call runs 5 steps of all chains. How the potential layer evaluates many chains
    (:mod:`mcmc.potential`): ``full_plate`` -- full data, one model run under a chain plate (the
    vectorised path for models that broadcast); ``full_vmap`` -- the same through
    ``torch.func.vmap`` (the fallback for models that do not broadcast); ``minibatch_per_chain``
    -- 100 rows per chain, each chain its own rows (vmap, ``C * B`` rows in all);
    ``minibatch_shared`` -- one 100-row minibatch for every chain (chain plate);
    ``minibatch_per_chain_loop`` -- per-chain minibatches with one model run per chain (the last
    resort for models that neither broadcast nor vmap)."""
    device = resolve_device("auto")
    C = 64 if quick else 256
    spec = models.get("logistic_regression_synthetic", num_rows=1000, dim=10, device=device)
    steps = 5

    def make(**kw):
        kernel = SGLD(spec.model, step_size=1e-4, seed=0, **kw)
        kernel.setup_potential(spec.args, spec.kwargs)
        kernel.init_state(C, torch.zeros(C, 10, device=device))

        def call():
            for _ in range(steps):
                kernel.driver.step()
            return {"chains": C, "path": kernel.potential.vectorization(
                per_chain=kw.get("subsample_size") is not None
                and not kw.get("shared_minibatch", False))}

        return call

    return {
        "full_plate": make(),
        "full_vmap": make(vectorize="vmap"),
        "minibatch_per_chain": make(subsample_size=100, with_replacement=True),
        "minibatch_shared": make(subsample_size=100, with_replacement=True,
                                 shared_minibatch=True),
        "minibatch_per_chain_loop": make(subsample_size=100, with_replacement=True,
                                         vectorize="loop"),
    }


@benchmark(
    "sgld_ess_vs_nuts",
    targets=[
        Target("pyroforge_sgld", "pyro_nuts", ">=", 10.0, metric="ess_per_s"),
        Target("pyroforge_cvsgld", "pyro_nuts", ">=", 10.0, metric="ess_per_s"),
    ],
    repeats=3,
    warmup=1,
)
def sgld_ess_vs_nuts(quick: bool):
    """10^5 rows (quick: 10^4), d = 10. Each call is one complete run, timed whole: SGLD /
    CV-SGLD (minibatch 1000, h = 1/N, one chain started at 0, 200 burn-in + 2000 kept steps;
    CV-SGLD includes its L-BFGS mode search) and Pyro NUTS (200 warm-up + 200 draws; quick:
    100 + 100). ``ess`` is the minimum over coordinates of Pyro's ESS of the kept draws;
    ``var_ratio`` (extra) is each sampler's mean marginal variance over NUTS's, showing the
    minibatch-noise inflation that ESS does not see."""
    device = resolve_device("auto")
    n = 10**4 if quick else 10**5
    spec = models.get("logistic_regression_synthetic", num_rows=n, dim=10, device=device)
    nuts_steps = 100 if quick else 200
    ref_var = {}

    def min_ess(w):  # w: (S, d) -> min ESS over coordinates
        return float(effective_sample_size(w.unsqueeze(0), 0, 1).min())

    def run_sgld(cls):
        kernel = cls(spec.model, step_size=1.0 / n, subsample_size=1000, seed=0)
        draws = kernel.sample_chains(
            2000,
            warmup_steps=200,
            model_args=spec.args,
            model_kwargs=spec.kwargs,
            initial_params=torch.zeros(1, spec.args[0].shape[1], device=device),
            progress=False,
        )["w"][0]
        out = {"ess": min_ess(draws)}
        if "v" in ref_var:
            out["var_ratio"] = float((draws.var(0) / ref_var["v"]).mean())
        return out

    def pyroforge_sgld():
        return run_sgld(SGLD)

    def pyroforge_cvsgld():
        return run_sgld(CVSGLD)

    def pyro_nuts():
        pyro.set_rng_seed(0)
        mcmc = pyro.infer.MCMC(
            pyro.infer.NUTS(spec.model, max_plate_nesting=1),
            num_samples=nuts_steps,
            warmup_steps=nuts_steps,
            disable_progbar=True,
        )
        t0 = time.perf_counter()
        mcmc.run(*spec.args, **spec.kwargs)
        w = mcmc.get_samples()["w"]
        ref_var["v"] = w.var(0)
        return {"ess": min_ess(w), "seconds": time.perf_counter() - t0}

    return {
        "pyro_nuts": pyro_nuts,
        "pyroforge_sgld": pyroforge_sgld,
        "pyroforge_cvsgld": pyroforge_cvsgld,
    }
