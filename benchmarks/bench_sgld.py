"""SGLD: per-step time vs a hand-written torch SGLD loop and BlackJAX, and accuracy-gated ESS
per CPU-second vs NumPyro NUTS and Pyro NUTS, on the zoo's ``logistic_regression_synthetic``
(GPU when available)."""

from __future__ import annotations

import json
import math
import os
import time

import pyro
import torch
from pyro.ops.stats import autocovariance

import models
from mcmc.sgld import CVSGLD, SGLD
from models.device import resolve_device
from models.metrics import mean_error

from . import peers
from .harness import AccuracyGate, Target, benchmark

REFERENCE_DIR = os.environ.get(
    "PYROFORGE_BENCH_REFERENCES",
    os.path.join(os.path.dirname(__file__), "results", "references"),
)


@benchmark(
    "sgld_step_time",
    targets=[
        Target("pyroforge_sgld", "torch_loop_sgld", "<=", 0.9, metric="time"),
        Target("pyroforge_sgld_block", "blackjax_sgld_scan", "<=", 1.5, metric="time"),
        Target("pyroforge_sgld_block_inductor", "blackjax_sgld_scan", "<=", 1.5, metric="time"),
    ],
    repeats=10,
    warmup=2,
)
def sgld_step_time(quick: bool):
    """10^6 rows (quick: 10^5), d = 10, minibatch 1000 drawn with replacement, one chain, step
    size 1/N (given, as to the peers: no preconditioner); each call runs 20 steps.
    ``pyroforge_sgld`` is :class:`mcmc.sgld.SGLD` stepped one step at a time (the potential --
    one Pyro model run plus autograd -- captured once and replayed as a TorchScript graph,
    ``capture="auto"``);
    ``pyroforge_sgld_eager``: the same with ``capture="off"`` (the model run every step);
    ``pyroforge_sgld_block``: ``block_size=20``, the 20 steps (noise and rows pre-drawn from the
    sampler's generator) as one captured TorchScript graph per call (same draws as single
    steps); ``pyroforge_sgld_block_inductor``: ``capture="inductor"``, each step compiled by
    TorchInductor and called 20 times (opt-in: its first call compiles for seconds, and it
    matches the other rows only to float rounding). ``torch_loop_sgld`` is the same update
    written by hand on the tensors (autograd on an inline log-joint, ``X[idx]`` gathers);
    ``blackjax_sgld_step`` is BlackJAX ``sgld`` with one jitted step per call (20 calls),
    ``blackjax_sgld_scan`` the 20 steps in one jitted ``lax.scan`` (the target for block
    steps)."""
    device = resolve_device("auto")
    n = 10**5 if quick else 10**6
    spec = models.get("logistic_regression_synthetic", num_rows=n, dim=10, device=device)
    X, y = spec.args[0], spec.args[1]
    prior_scale = spec.kwargs["prior_scale"]
    B, h, steps = 1000, 1.0 / n, 20

    def make(**options):
        kernel = SGLD(spec.model, step_size=h, subsample_size=B, with_replacement=True, seed=0,
                      **options)
        kernel.setup_potential(spec.args, spec.kwargs)
        kernel.init_state(1, torch.zeros(1, X.shape[1], device=device))
        return kernel

    kernel, eager = make(block_size=1), make(capture="off")
    block, block_inductor = make(block_size=steps), make(block_size=steps, capture="inductor")
    gen = torch.Generator(device=device).manual_seed(0)
    w0 = torch.zeros(X.shape[1], device=device)
    state = {"w": w0}

    def single_steps(k):
        def run():
            for _ in range(steps):
                k.driver.step()

        return run

    def blocks(k):
        def run():
            k.driver.run(0, warmup_steps=steps, progress=False)
            info = k.driver.capture_info
            return {"block_graphs": info["block_graphs"], "backend": info["backend"]}

        return run

    pyroforge_sgld = single_steps(kernel)

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

    impls = {"pyroforge_sgld": pyroforge_sgld, "pyroforge_sgld_eager": single_steps(eager),
             "pyroforge_sgld_block": blocks(block),
             "pyroforge_sgld_block_inductor": blocks(block_inductor),
             "torch_loop_sgld": torch_loop_sgld}
    impls.update(peers.blackjax_sgld(X, y, prior_scale, batch_size=B, step_size=h,
                                     num_steps=steps))
    return impls


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


GATE = AccuracyGate(max_mean_error_sd=0.2, var_ratio_range=(0.9, 1.1))


def effective_sample_size_fast(x: torch.Tensor) -> torch.Tensor:
    """Pyro's :func:`pyro.ops.stats.effective_sample_size` of draws ``x (C, S, d)`` (chains,
    samples), the same formulas (Geyer's initial monotone sequence), in ``O(S log S)``: Pyro's
    version takes the running minimum with an ``(S/2, S/2, d)`` tensor -- 1.9 s and 1 GB for
    10^4 draws of 10 coordinates, which would be timed with the run that made them."""
    C, N = x.shape[:2]
    gamma = autocovariance(x, dim=1)  # (C, N, d)
    chain_var, chain_mean = torch.var_mean(x, dim=1)  # (C, d), unbiased
    var_within = chain_var.mean(0)
    var_estimator = (N - 1) / N * var_within
    if C > 1:
        var_estimator = var_estimator + chain_mean.var(0)
    else:
        var_within = var_estimator
    rho = (var_estimator - var_within + gamma.mean(0)) / var_estimator  # (N, d)
    rho[0] = 1
    rho = rho if N % 2 == 0 else rho[:-1]
    pairs = rho.reshape((N // 2, 2) + rho.shape[1:]).sum(1)
    tau = -1 + 2 * pairs[0]
    if pairs.shape[0] > 1:
        tau = tau + 2 * torch.cummin(pairs[1:].clamp(min=0), dim=0).values.sum(0)
    return C * N / tau


def _min_ess(w: torch.Tensor) -> float:
    """Minimum over coordinates of Pyro's ESS of one chain's draws ``(S, d)``."""
    return float(effective_sample_size_fast(w.unsqueeze(0)).min())


def _long_nuts(spec, num_warmup: int, num_samples: int) -> tuple[torch.Tensor, str]:
    """Draws of ``w`` from one long NUTS chain: NumPyro when installed (faster), else Pyro NUTS
    with ``jit_compile=True``."""
    X, y = spec.args
    if peers.unavailable("jax", "numpyro") is None:
        run = peers.numpyro_nuts_runner(X, y, spec.kwargs["prior_scale"], num_warmup=num_warmup,
                                        num_samples=num_samples, seed=1)
        return run(), "numpyro NUTS"
    run = _pyro_nuts_runner(spec, num_warmup=num_warmup, num_samples=num_samples,
                            jit_compile=True, seed=1)
    return run()["w"], "pyro NUTS jit_compile=True"


def _laplace(spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode and diagonal of the inverse Hessian (float64 Newton iterations on the full data): a
    cross-check of the NUTS reference (the posterior is close to Gaussian at these N)."""
    X, y = (t.double().cpu() for t in spec.args)
    prec0 = spec.kwargs["prior_scale"].double().cpu().pow(-2)
    w = torch.zeros(X.shape[1], dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(X @ w)
        grad = X.T @ (y - p) - prec0 * w
        hess = X.T @ (X * (p * (1 - p)).unsqueeze(-1)) + torch.diag(prec0)
        step = torch.linalg.solve(hess, grad)
        w = w + step
        if float(step.abs().max()) < 1e-10:
            break
    return w, torch.linalg.inv(hess).diagonal()


def logistic_reference(spec, quick: bool) -> dict:
    """A long-NUTS reference (mean, variance of ``w``) for ``spec``, cached on disk under
    ``REFERENCE_DIR`` (set ``PYROFORGE_BENCH_REFERENCES`` to move it); checked against the
    Laplace approximation."""
    n, d = spec.options["num_rows"], spec.options["dim"]
    num_warmup, num_samples = (300, 1000) if quick else (500, 3000)
    key = f"logistic_synthetic_n{n}_d{d}_seed{spec.options['seed']}_{num_warmup}+{num_samples}"
    path = os.path.join(REFERENCE_DIR, key + ".pt")
    if os.path.exists(path):
        return torch.load(path)
    t0 = time.perf_counter()
    draws, engine = _long_nuts(spec, num_warmup, num_samples)
    draws = draws.double().cpu()
    mode, lap_var = _laplace(spec)
    ref = {"mean": draws.mean(0), "var": draws.var(0), "engine": engine,
           "num_warmup": num_warmup, "num_samples": num_samples, "ess": _min_ess(draws),
           "seconds": time.perf_counter() - t0,
           "laplace_mean_error_sd": float(((draws.mean(0) - mode) / draws.std(0)).pow(2)
                                          .mean().sqrt()),
           "laplace_var_ratio": float((draws.var(0) / lap_var).mean())}
    os.makedirs(REFERENCE_DIR, exist_ok=True)
    torch.save(ref, path)
    with open(os.path.join(REFERENCE_DIR, key + ".json"), "w") as fh:
        json.dump({k: v for k, v in ref.items() if not torch.is_tensor(v)}, fh, indent=2)
    return ref


def _pyro_nuts_runner(spec, *, num_warmup: int, num_samples: int, jit_compile: bool,
                      seed: int = 0):
    """``run() -> {site: draws}``: one whole Pyro NUTS run on one chain.

    The potential is built once (``initialize_model``) and reused by every run, so that with
    ``jit_compile=True`` the ``torch.jit`` trace happens in the first run only (the harness's
    warm-up), like NumPyro's compilation."""
    from pyro.infer.mcmc.util import initialize_model

    pyro.set_rng_seed(seed)
    init, potential_fn, transforms, _ = initialize_model(
        spec.model, spec.args, spec.kwargs, jit_compile=jit_compile, skip_jit_warnings=True,
        max_plate_nesting=spec.max_plate_nesting)

    def run() -> dict:
        kernel = pyro.infer.NUTS(potential_fn=potential_fn, jit_compile=jit_compile,
                                 ignore_jit_warnings=True)
        mcmc = pyro.infer.MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup,
                               initial_params=init, transforms=transforms,
                               disable_progbar=True)
        mcmc.run()
        return mcmc.get_samples()

    return run


def _gated_ess(n: int, quick: bool):
    device = resolve_device("auto")
    spec = models.get("logistic_regression_synthetic", num_rows=n, dim=10, device=device)
    ref = logistic_reference(spec, quick)
    print(f"  reference for N={n}: {ref['engine']}, {ref['num_warmup']}+{ref['num_samples']} "
          f"draws, min ESS {ref['ess']:.0f}; vs Laplace: mean error "
          f"{ref['laplace_mean_error_sd']:.3f} sd, variance ratio {ref['laplace_var_ratio']:.3f}",
          flush=True)
    ref_mean = {"w": ref["mean"].to(device)}
    ref_sd = {"w": ref["var"].sqrt().to(device)}
    sgld_warmup, sgld_samples = (100, 10000) if quick else (100, 20000)
    nuts_warmup, nuts_samples = (100, 200) if quick else (200, 400)

    def summarise(w: torch.Tensor) -> dict:  # w: (S, d) draws of one chain
        w = w.to(device)
        return {
            "ess": _min_ess(w.double()),
            "mean_error_sd": mean_error({"w": w}, ref_mean, ref_sd),
            "var_ratio": float((w.double().var(0) / ref["var"].to(device)).mean()),
        }

    def run_sgld(cls, **options):
        kernel = cls(spec.model, subsample_size=SGLD_BATCH, seed=0, **options)
        draws = kernel.sample_chains(
            sgld_samples,
            warmup_steps=sgld_warmup,
            model_args=spec.args,
            model_kwargs=spec.kwargs,
            progress=False,
        )["w"][0]
        return {**summarise(draws), "step_size": kernel.schedule(0),
                "preconditioner": kernel.scale_tril is not None}

    def pyro_nuts(jit_compile: bool):
        run = _pyro_nuts_runner(spec, num_warmup=nuts_warmup, num_samples=nuts_samples,
                                jit_compile=jit_compile)
        return lambda: summarise(run()["w"])

    impls = {
        "pyroforge_cvsgld": lambda: run_sgld(CVSGLD),
        "pyroforge_cvsgld_with_replacement": lambda: run_sgld(CVSGLD, with_replacement=True),
        "pyroforge_sgld": lambda: run_sgld(SGLD),
        "pyro_nuts_jit": pyro_nuts(True),
        "pyro_nuts": pyro_nuts(False),
    }
    impls.update(peers.numpyro_nuts(*spec.args, spec.kwargs["prior_scale"],
                                    num_warmup=nuts_warmup, num_samples=nuts_samples,
                                    summarise=summarise))
    return impls


_ESS_DOC = """Accuracy-gated ESS per CPU-second on logistic_regression_synthetic, N = {n} (quick:
    {nq}), d = 10. Each call is one complete run on one chain, timed whole (set-up included).
    CV-SGLD as a user would run it: ``CVSGLD(model, subsample_size=1000, seed=0)`` with every
    other option at its default -- the L-BFGS mode search (the control variates' anchor), the
    Laplace preconditioner, the step size chosen from the model (``step_size=None``: 0.1 in
    whitened units here, where the control-variate gradient noise vanishes at the anchor),
    chains started at Laplace draws, minibatches drawn without replacement, the potential
    captured and ``block_size="auto"`` -- then 100 warm-up + 20000 kept steps (quick
    100 + 10000): the gate's variance ratio is itself an estimate and needs an ESS of several
    hundred to tell 1.05 (the discretisation's inflation at h = 0.1, 1 / (1 - h / 2)) from 1.1.
    ``pyroforge_cvsgld_with_replacement``: the same with ``with_replacement=True`` (the
    minibatch rows drawn independently: exact distinct rows cost a sort and usually a redraw
    per step). Plain SGLD: ``SGLD(model, subsample_size=1000, seed=0)``, the same run (its default step
    size accounts for the minibatch gradient noise, so it is small at large N). NUTS (200
    warm-up + 400 draws; quick 100 + 200): Pyro NUTS with ``jit_compile=True`` and without,
    NumPyro NUTS. ``ess`` is the minimum over coordinates of Pyro's ESS of the kept draws;
    ``mean_error_sd`` and ``var_ratio`` compare the draws with a long NUTS reference (500
    warm-up + 3000 draws, cached; cross-checked against the Laplace approximation)."""

#: minibatch rows of the gated ESS benchmarks' SGLD runs
SGLD_BATCH = 1000


def _doc(text: str):
    def set_doc(fn):
        fn.__doc__ = text
        return fn

    return set_doc


@benchmark(
    "sgld_ess_gated_n1e5",
    targets=[Target("pyroforge_cvsgld", "pyro_nuts_jit", ">=", 2.0, metric="ess_per_cpu_s")],
    repeats=2,
    warmup=1,
    gate=GATE,
)
@_doc(_ESS_DOC.format(n="10^5", nq="10^4"))
def sgld_ess_gated_n1e5(quick: bool):
    return _gated_ess(10**4 if quick else 10**5, quick)


@benchmark(
    "sgld_ess_gated_n1e6",
    targets=[Target("pyroforge_cvsgld", "pyro_nuts_jit", ">=", 5.0, metric="ess_per_cpu_s")],
    repeats=2,
    warmup=1,
    gate=GATE,
)
@_doc(_ESS_DOC.format(n="10^6", nq="10^5"))
def sgld_ess_gated_n1e6(quick: bool):
    return _gated_ess(10**5 if quick else 10**6, quick)

