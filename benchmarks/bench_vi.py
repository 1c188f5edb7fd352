"""vi_estimators core: an ELBO step on the VAE and an IWELBO step with score-function gradients,
side by side with Pyro and a hand-written torch loss."""

from __future__ import annotations

import pyro
import torch

import models
import vi_estimators as vi

from .harness import Target, benchmark


def _vae_parts(device="cpu"):
    spec = models.get("vae_digits", device=device)
    return spec, spec.make_guide()


@benchmark(
    "vi_elbo_vae_step",
    targets=[
        Target("pyroforge", "pyro_trace_elbo", "<=", 0.8),
        Target("pyroforge", "torch_loop", "<=", 1.2),
    ],
    repeats=30,
    warmup=5,
)
def elbo_vae_step(quick: bool):
    """One ELBO step (loss, gradients, torch Adam) on vae_digits, batch 256 of 1438:
    vi_estimators.ELBO.loss_and_grads vs Pyro's Trace_ELBO.loss_and_grads vs the same loss written
    by hand in torch (full mode also times both through pyro.infer.SVI + pyro.optim)."""
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
        "torch_loop": torch_step,
    }
    if not quick:  # for information: the same through pyro.infer.SVI + pyro.optim
        impls["pyroforge_svi"] = svi_step(vi.ELBO(max_plate_nesting=1))
        impls["pyro_svi"] = svi_step(pyro.infer.Trace_ELBO(max_plate_nesting=1))
        impls.update(pyroforge_vae_extra_rows(spec, guide, x, decoder, batch, objective_step))
    return impls


@benchmark(
    "vi_iwelbo_reinforce_mixture",
    targets=[
        Target("pyroforge", "pyro_renyi", "<=", 0.2),
        Target("pyroforge", "pyro_tracegraph", "<=", 0.2),
    ],
    repeats=30,
    warmup=3,
)
def iwelbo_mixture(quick: bool):
    """Gradient of IWELBO, K = 8, on discrete_mixture (N = 50 points) with score-function
    gradients + leave-one-out (VIMCO) baselines at the discrete assignments: vi_estimators.IWELBO
    vs Pyro's RenyiELBO(alpha=0) and TraceGraph_ELBO with their defaults (K particles looped),
    and, for information, the same two with ``vectorize_particles=True``."""
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
        "pyroforge": grads(vi.IWELBO(num_particles=k, max_plate_nesting=1)),
        "pyro_renyi": grads(fresh(pyro.infer.RenyiELBO, alpha=0)),
        "pyro_tracegraph": grads(fresh(pyro.infer.TraceGraph_ELBO)),
    }
    if not quick:
        impls["pyro_renyi_vectorized"] = grads(fresh(pyro.infer.RenyiELBO, alpha=0,
                                                     vectorize_particles=True))
        impls["pyro_tracegraph_vectorized"] = grads(fresh(pyro.infer.TraceGraph_ELBO,
                                                          vectorize_particles=True))
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


__all__ = ["elbo_vae_step", "iwelbo_mixture", "pyroforge_svi_rows", "pyroforge_vae_extra_rows"]
