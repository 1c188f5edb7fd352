"""vi_estimators core: an ELBO step on the VAE and on a logistic regression with AutoNormal, and
an IWELBO step with score-function gradients, side by side with Pyro (``Trace_ELBO`` and its
``JitTrace_ELBO`` fast path), NumPyro and a hand-written torch loss."""

from __future__ import annotations

import pyro
import torch
from pyro.infer.autoguide import AutoNormal

import models
import vi_estimators as vi

from . import peers
from .harness import Target, benchmark


def _vae_parts(device="cpu"):
    spec = models.get("vae_digits", device=device)
    return spec, spec.make_guide()


@benchmark(
    "vi_elbo_vae_step",
    targets=[
        Target("pyroforge", "pyro_trace_elbo", "<=", 0.8),
        Target("pyroforge", "torch_loop", "<=", 1.0),
    ],
    repeats=30,
    warmup=5,
)
def elbo_vae_step(quick: bool):
    """One ELBO step (loss, gradients, torch Adam) on vae_digits, batch 256 of 1438:
    vi_estimators.ELBO(capture=True).loss_and_grads (the captured objective) vs Pyro's Trace_ELBO and JitTrace_ELBO .loss_and_grads vs
    the same loss written by hand in torch (full mode also times both through pyro.infer.SVI +
    pyro.optim)."""
    batch = 256
    spec, guide = _vae_parts()
    x = spec.args[0]
    decoder = spec.kwargs["decoder"]
    guide(x, decoder)  # build/registration

    def svi_step(loss):
        svi = pyro.infer.SVI(spec.model, guide, pyro.optim.Adam({"lr": 1e-3}), loss)

        def step():
            return svi.step(x, decoder=decoder, subsample_size=batch)

        return step

    enc = guide.net
    params = list(enc.parameters()) + list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    n = x.shape[0]
    latent = guide.latent_dim

    def torch_step():
        idx = torch.randperm(n)[:batch]
        xb = x[idx]
        loc, raw = enc(xb).split(latent, -1)
        scale = torch.nn.functional.softplus(raw) + 1e-4
        q = torch.distributions.Normal(loc, scale)
        z = q.rsample()
        log_q = q.log_prob(z).sum(-1)
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            decoder(z), xb, reduction="none").sum(-1)
        loss = -(n / batch) * (log_prior + log_lik - log_q).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def objective_step(loss):
        # the objective's loss_and_grads + the same torch optimiser as the hand-written loop
        adam = torch.optim.Adam(params, lr=1e-3)

        def step():
            adam.zero_grad()
            out = loss.loss_and_grads(spec.model, guide, x, decoder=decoder,
                                      subsample_size=batch)
            adam.step()
            return out

        return step

    impls = {
        "pyroforge": objective_step(vi.ELBO(max_plate_nesting=1, capture=True)),  # captured
        "pyro_trace_elbo": objective_step(pyro.infer.Trace_ELBO(max_plate_nesting=1)),
        "pyro_jit_trace_elbo": objective_step(pyro.infer.JitTrace_ELBO(
            max_plate_nesting=1, ignore_jit_warnings=True)),
        "torch_loop": torch_step,
    }
    if not quick:  # for information: the same through pyro.infer.SVI + pyro.optim
        impls["pyroforge_svi"] = svi_step(vi.ELBO(max_plate_nesting=1))
        impls["pyro_svi"] = svi_step(pyro.infer.Trace_ELBO(max_plate_nesting=1))
        impls.update(pyroforge_vae_extra_rows(spec, guide, x, decoder, batch, objective_step))
    return impls


@benchmark(
    "vi_elbo_logistic_step",
    targets=[Target("pyroforge", "numpyro_svi", "<=", 3.0)],
    repeats=30,
    warmup=5,
)
def elbo_logistic_step(quick: bool):
    """One SVI step (one-particle ELBO, gradients, Adam lr 0.01) with an AutoNormal guide on
    logistic_regression (breast cancer, 455 rows, 31 weights), every call a user's ``svi.step``:
    ``pyroforge`` is ``vi_estimators.CapturedSVI`` with ``ELBO(capture=True)`` (captured objective
    and fused Adam update), ``pyroforge_pyro_svi`` the same objective in ``pyro.infer.SVI``,
    ``pyroforge_eager`` the uncaptured objective in ``pyro.infer.SVI``; then Pyro's
    ``Trace_ELBO`` and ``JitTrace_ELBO``; ``torch_loop`` is the mean-field Gaussian ELBO
    written by hand (torch Adam); ``numpyro_svi`` is NumPyro's SVI with its AutoNormal and a
    jitted ``svi.update``. The Pyro implementations share one guide (one set of parameters)."""
    spec = models.get("logistic_regression", with_reference=False)
    X, y = spec.args
    prior_scale = spec.kwargs["prior_scale"]
    lr = 0.01
    pyro.clear_param_store()
    guide = AutoNormal(spec.model)
    guide(*spec.args, **spec.kwargs)  # create the parameters once

    def svi_step(loss):
        svi = pyro.infer.SVI(spec.model, guide, pyro.optim.Adam({"lr": lr}), loss)
        return lambda: svi.step(*spec.args, **spec.kwargs)

    d = X.shape[1]
    loc = torch.zeros(d, requires_grad=True)
    log_scale = torch.full((d,), -2.3, requires_grad=True)  # scale 0.1, as AutoNormal's init
    opt = torch.optim.Adam([loc, log_scale], lr=lr)
    prior = torch.distributions.Normal(torch.zeros(d), prior_scale)

    def torch_step():
        opt.zero_grad()
        q = torch.distributions.Normal(loc, log_scale.exp())
        w = q.rsample()
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y, reduction="sum")
        loss = -(prior.log_prob(w).sum() + log_lik - q.log_prob(w).sum())
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    impls = pyroforge_svi_rows(spec.model, guide, lr,
                               lambda capture: vi.ELBO(max_plate_nesting=1, capture=capture),
                               *spec.args, **spec.kwargs)
    impls.update({
        "pyro_trace_elbo": svi_step(pyro.infer.Trace_ELBO(max_plate_nesting=1)),
        "pyro_jit_trace_elbo": svi_step(pyro.infer.JitTrace_ELBO(max_plate_nesting=1,
                                                                 ignore_jit_warnings=True)),
        "torch_loop": torch_step,
    })
    impls.update(peers.numpyro_svi_autonormal(X, y, prior_scale, lr=lr))
    return impls


@benchmark(
    "vi_iwelbo_logistic_step",
    targets=[Target("pyroforge", "numpyro_renyi", "<=", 3.0)],
    repeats=30,
    warmup=5,
)
def iwelbo_logistic_step(quick: bool):
    """One SVI step of the IWELBO, K = 8 vectorised particles, all sites reparameterised: the
    AutoNormal guide on logistic_regression (as ``vi_elbo_logistic_step``, Adam lr 0.01).
    ``pyroforge`` is ``vi_estimators.CapturedSVI`` with ``IWELBO(num_particles=8, capture=True)``
    (``pyroforge_pyro_svi``: in ``pyro.infer.SVI``; ``pyroforge_eager``: uncaptured); ``pyro_renyi``
    Pyro's ``RenyiELBO(alpha=0, num_particles=8, vectorize_particles=True)``; ``numpyro_renyi``
    NumPyro's SVI with ``RenyiELBO(alpha=0, num_particles=8)``, jitted. The same work in all
    three (unlike ``vi_iwelbo_reinforce_mixture``, where NumPyro skips the score-function
    term)."""
    spec = models.get("logistic_regression", with_reference=False)
    X, y = spec.args
    k, lr = 8, 0.01
    pyro.clear_param_store()
    guide = AutoNormal(spec.model)
    guide(*spec.args, **spec.kwargs)

    def svi_step(loss):
        svi = pyro.infer.SVI(spec.model, guide, pyro.optim.Adam({"lr": lr}), loss)
        return lambda: svi.step(*spec.args, **spec.kwargs)

    impls = pyroforge_svi_rows(
        spec.model, guide, lr,
        lambda capture: vi.IWELBO(num_particles=k, max_plate_nesting=1, capture=capture),
        *spec.args, **spec.kwargs)
    impls["pyro_renyi"] = svi_step(pyro.infer.RenyiELBO(alpha=0, num_particles=k,
                                                        vectorize_particles=True,
                                                        max_plate_nesting=1))
    impls.update(peers.numpyro_svi_iwelbo(X, y, spec.kwargs["prior_scale"], num_particles=k,
                                          lr=lr))
    return impls


@benchmark(
    "vi_iwelbo_reinforce_mixture",
    targets=[
        Target("pyroforge", "pyro_renyi", "<=", 0.2),
        Target("pyroforge", "pyro_tracegraph", "<=", 0.2),
        Target("pyroforge", "numpyro_renyi", "<=", 3.0),
    ],
    repeats=30,
    warmup=3,
)
def iwelbo_mixture(quick: bool):
    """Gradient of IWELBO, K = 8, on discrete_mixture (N = 50 points) with score-function
    gradients + leave-one-out (VIMCO) baselines at the discrete assignments: vi_estimators.IWELBO
    with ``capture=True`` (``pyroforge``; ``pyroforge_eager`` without capture) vs Pyro's
    RenyiELBO(alpha=0) and TraceGraph_ELBO with their defaults (K particles looped),
    and, for information, the same two with ``vectorize_particles=True``. ``numpyro_renyi``:
    NumPyro's RenyiELBO(alpha=0), K = 8, jitted value-and-gradient for the same model and guide;
    it differentiates the log-weights only (no score-function term for ``z``), so it does less
    work than the others and its ``z_probs`` gradient is biased."""
    spec = models.get("discrete_mixture", with_reference=False)
    guide = spec.make_guide()
    k = 8

    def grads(loss):
        def step():
            # params persist across calls: clear their grads like an optimiser would
            for p in pyro.get_param_store().values():
                p.unconstrained().grad = None
            return loss.loss_and_grads(spec.model, guide, *spec.args, **spec.kwargs)

        return step

    def fresh(cls, **kw):
        return cls(num_particles=k, max_plate_nesting=1, **kw)

    impls = {
        "pyroforge": grads(vi.IWELBO(num_particles=k, max_plate_nesting=1, capture=True)),
        "pyroforge_eager": grads(vi.IWELBO(num_particles=k, max_plate_nesting=1)),
        "pyro_renyi": grads(fresh(pyro.infer.RenyiELBO, alpha=0)),
        "pyro_tracegraph": grads(fresh(pyro.infer.TraceGraph_ELBO)),
    }
    if not quick:
        impls["pyro_renyi_vectorized"] = grads(fresh(pyro.infer.RenyiELBO, alpha=0,
                                                     vectorize_particles=True))
        impls["pyro_tracegraph_vectorized"] = grads(fresh(pyro.infer.TraceGraph_ELBO,
                                                          vectorize_particles=True))
    impls.update(peers.numpyro_renyi_mixture(*spec.args, **spec.kwargs, num_particles=k))
    return impls


# ---------------------------------------------------------------------------------------------
# pyroforge side of the ELBO-step benchmarks (issue 12, item 3: captured objectives and
# vi_estimators.CapturedSVI). An SVI-step benchmark takes its pyroforge rows with
# ``impls.update(pyroforge_svi_rows(model, guide, lr, make_loss, *args, **kwargs))``.
# ---------------------------------------------------------------------------------------------


def pyroforge_svi_rows(model, guide, lr: float, make_loss, *args, **kwargs) -> dict:
    """One user ``svi.step`` per call, three ways (Adam with learning rate ``lr``):
    ``pyroforge`` -- ``vi.CapturedSVI`` with ``make_loss(capture=True)`` (the objective's
    captured graph, then the fused Adam update, captured too); ``pyroforge_pyro_svi`` --
    ``pyro.infer.SVI`` with the same captured objective (Pyro's per-parameter Adam);
    ``pyroforge_eager`` -- ``pyro.infer.SVI`` with ``make_loss(capture=False)``."""

    def pyro_svi(loss):
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss)
        return lambda: svi.step(*args, **kwargs)

    captured = vi.CapturedSVI(model, guide, pyro.optim.Adam({"lr": lr}), make_loss(capture=True))
    return {
        "pyroforge": lambda: captured.step(*args, **kwargs),
        "pyroforge_pyro_svi": pyro_svi(make_loss(capture=True)),
        "pyroforge_eager": pyro_svi(make_loss(capture=False)),
    }


def pyroforge_vae_extra_rows(spec, guide, x, decoder, batch: int, objective_step) -> dict:
    """For information in ``vi_elbo_vae_step`` (whose ``pyroforge`` row is the captured
    ``loss_and_grads`` + the benchmark's torch Adam): the eager objective the same way, and
    ``vi.CapturedSVI`` (fused Adam, update captured)."""
    svi = vi.CapturedSVI(spec.model, guide, pyro.optim.Adam({"lr": 1e-3}),
                         vi.ELBO(max_plate_nesting=1, capture=True))
    return {
        "pyroforge_eager": objective_step(vi.ELBO(max_plate_nesting=1)),
        "pyroforge_captured_svi": lambda: svi.step(x, decoder=decoder, subsample_size=batch),
    }


__all__ = ["elbo_logistic_step", "elbo_vae_step", "iwelbo_logistic_step", "iwelbo_mixture",
           "pyroforge_svi_rows", "pyroforge_vae_extra_rows"]
