"""Captured potentials and block steps: the same draws as eager evaluation, one log line when
capture is not possible, NaN handling unchanged, row gathers as index_select."""

import copy
import logging

import pyro
import pyro.distributions as dist
import pytest
import torch

import models
from mcmc import L1, BregmanProximalLangevin, CoinSVGD, FederatedSGLD, Potential
from mcmc.capture import CaptureError, capture
from mcmc.schedules import PolynomialSchedule
from mcmc.sgld import CVSGLD, SGLD, pSGLD


# ------------------------------------------------------------------ models written as users do
def regression(X, y=None):
    """Pyro's SVI-tutorial style: the plate subsamples and the model indexes its data."""
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(torch.tensor(-0.5, dtype=X.dtype), 0.2))
    with pyro.plate("data", X.shape[0], subsample_size=20) as idx:
        pyro.sample("y", dist.Normal(X[idx] @ w, sigma), obs=y[idx])


def _regression_data(n=200, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5])[:d] + 0.5 * torch.randn(n, generator=g)
    return X, y


def _zoo():
    spec = models.get("logistic_regression_synthetic", num_rows=2000, dim=5)
    return spec.model, spec.args, spec.kwargs


def _draws(cls, model, args, kwargs=None, *, num_samples=6, warmup=10, thinning=3, chains=3,
           **options):
    kernel = cls(model, seed=3, **options)
    out = kernel.sample_chains(num_samples, num_chains=chains, warmup_steps=warmup,
                               thinning=thinning, model_args=args, model_kwargs=kwargs,
                               progress=False, unconstrained=True)["_z"]
    return out, kernel


# ------------------------------------------------------------------ same draws as eager
@pytest.mark.parametrize("which", ["user", "zoo"])
@pytest.mark.parametrize("cls", [SGLD, pSGLD, CVSGLD])
def test_captured_and_block_steps_give_the_eager_draws(which, cls):
    """Captured potential, block steps of 7 (not dividing the run: 10 warm-up + 6 x 3 steps,
    so blocks straddle the warm-up and the thinning; TorchScript and FX) and eager evaluation:
    bit-identical."""
    if which == "user":
        model, args, kwargs, opts = regression, _regression_data(), None, {}
    else:
        (model, args, kwargs), opts = _zoo(), {"subsample_size": 50}
    opts["step_size"] = 1e-4
    eager, _ = _draws(cls, model, args, kwargs, capture="off", **opts)
    captured, kernel = _draws(cls, model, args, kwargs, block_size=1, **opts)
    blocked, blocked_kernel = _draws(cls, model, args, kwargs, block_size=7, **opts)
    blocked_fx, _ = _draws(cls, model, args, kwargs, block_size=7, capture="fx", **opts)
    assert set(kernel.potential.capture_info.values()) == {"script"}, \
        kernel.potential.capture_info
    assert blocked_kernel.driver.capture_info["block_graphs"] > 0, "no block was captured"
    assert torch.equal(captured, eager)
    assert torch.equal(blocked_fx, eager)
    assert torch.equal(blocked, eager)


@pytest.mark.parametrize("cls", [SGLD, CVSGLD])
def test_model_derived_defaults_under_capture_and_block_steps(cls):
    """step_size=None and precondition='auto' (mode search, Laplace preconditioner, step size
    from the model, chains started at Laplace draws): the preconditioner enters the captured
    step graphs; captured single steps and blocks (TorchScript and FX) give the eager draws.
    (Before TorchScript blocks ran with its optimising executor off, they differed by 1-4 ulp
    at some seeds.)"""
    model, args, kwargs = _zoo()
    opts = {"subsample_size": 50}
    eager, eager_kernel = _draws(cls, model, args, kwargs, capture="off", **opts)
    captured, kernel = _draws(cls, model, args, kwargs, block_size=1, **opts)
    blocked, blocked_kernel = _draws(cls, model, args, kwargs, block_size=7, **opts)
    blocked_fx, _ = _draws(cls, model, args, kwargs, block_size=7, capture="fx", **opts)
    assert blocked_kernel.scale_tril is not None and blocked_kernel.auto_step_size
    assert blocked_kernel.schedule(0) == eager_kernel.schedule(0)
    assert set(kernel.potential.capture_info.values()) == {"script"}, \
        kernel.potential.capture_info
    assert blocked_kernel.driver.capture_info["block_graphs"] > 0, "no block was captured"
    assert torch.equal(captured, eager)
    assert torch.equal(blocked_fx, eager)
    assert torch.equal(blocked, eager)


def test_block_steps_with_a_schedule_and_step_halving_match_single_steps():
    """Step sizes from a schedule are graph inputs (float64 scalars round as Python floats);
    with on_nonfinite='halve' the per-chain step sizes are inputs too."""
    X, y = _regression_data()
    sched = PolynomialSchedule(2e-4, 1.0, 0.55)
    for opts in ({"step_size": sched}, {"step_size": sched, "on_nonfinite": "halve"}):
        single, _ = _draws(SGLD, regression, (X, y), block_size=1, warmup=12, **opts)
        blocked, _ = _draws(SGLD, regression, (X, y), block_size=4, warmup=12, **opts)
        assert torch.equal(blocked, single)


@pytest.mark.parametrize("step_size", [1e-3, None])
def test_checkpoint_between_blocks_resumes_bit_identically(tmp_path, step_size):
    """Also with the model-derived defaults (step_size=None: the checkpoint carries the mode,
    preconditioner and step size that the captured blocks use)."""
    X, y = _regression_data()
    opts = {"step_size": step_size, "seed": 5, "block_size": 5}
    full = SGLD(regression, **opts).sample_chains(
        24, num_chains=4, model_args=(X, y), progress=False, unconstrained=True)["_z"]
    first = SGLD(regression, **opts)
    d1 = first.sample_chains(11, num_chains=4, model_args=(X, y), progress=False,
                             unconstrained=True)["_z"]
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = SGLD(regression, **dict(opts, block_size=3, seed=99))
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    d2 = resumed.sample_chains(13, num_chains=4, model_args=(X, y), progress=False,
                               unconstrained=True)["_z"]
    assert torch.equal(torch.cat([d1, d2], 1), full)


def test_bregman_federated_and_coin_samplers_match_eager():
    X, y = _regression_data(n=120)

    def lasso(X, y):
        w = pyro.sample("w", dist.Laplace(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ w, 0.5), obs=y)

    def run_bregman(**kw):
        k = BregmanProximalLangevin(lasso, {"w": L1(1.0)}, method="myula", seed=1, **kw)
        return k.sample_chains(5, num_chains=3, warmup_steps=8, thinning=2, model_args=(X, y),
                               progress=False, unconstrained=True)["_z"], k

    for step_size in (1e-3, None):  # None: chosen from the model, chains start at the mode
        blocked, k = run_bregman(block_size=4, step_size=step_size)
        assert k.driver.capture_info["block_graphs"] > 0, k.driver.capture_info
        assert torch.equal(run_bregman(capture="off", step_size=step_size)[0], blocked)

    shards = [((X[i::3], y[i::3]), {}) for i in range(3)]

    def run_federated(**kw):
        f = FederatedSGLD(lasso, shards, method="fsgld", step_size=1e-3, tau=6, seed=2, **kw)
        return f.sample_chains(10, num_chains=3, warmup_steps=5, unconstrained=True,
                               progress=False)["_z"]

    assert torch.equal(run_federated(capture="off"), run_federated(block_size=4))

    def run_coin(**kw):
        pyro.set_rng_seed(0)
        coin = CoinSVGD(lasso, num_particles=10, **kw)
        coin.run(6, X, y, progress=False)
        return coin.get_particles(), coin

    eager, _ = run_coin(capture="off")
    captured, coin = run_coin()
    assert set(coin.potential.capture_info.values()) == {"script"}
    assert torch.equal(captured, eager)


def test_new_data_of_the_same_shape_reuse_the_graph_without_stale_values():
    """The model's tensors are graph inputs: a potential re-pointed at new data (as CoinSVGD
    does for new step arguments) reuses the captured graph with the new values."""
    X, y = _regression_data()
    pot = Potential(regression, (X, y))
    z = pot.initial_params(2)
    idx = pot.draw_indices(2, torch.Generator().manual_seed(0))
    pot.value_and_grad(z, idx)
    pot.value_and_grad(z, idx)  # second use: captured
    assert list(pot.capture_info.values()) == ["script"]
    other = copy.copy(pot)
    X2, y2 = _regression_data(seed=1)
    other.model_args = (X2, y2)
    got = other.value_and_grad(z, idx)
    ref = Potential(regression, (X2, y2), capture="off").value_and_grad(z, idx)
    assert len(pot.capture_info) == 1  # the same graph served the new data
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# ------------------------------------------------------------------ row gathers
def test_row_gathers_run_as_index_select():
    X, y = _regression_data()
    pot = Potential(regression, (X, y))
    z = pot.initial_params(3)
    idx = pot.draw_indices(3, torch.Generator().manual_seed(0))
    fn = pot.capture(z, idx)
    graph = pot.captured_graph(z, idx)
    ops = [str(n.target) for n in graph.graph_module.graph.nodes]
    assert graph.num_gathers == 2  # X[idx] and y[idx]
    assert "aten.index_select.default" in ops and "aten.index.Tensor" not in ops
    u, g = fn(z, idx)
    ref = Potential(regression, (X, y), capture="off").value_and_grad(z, idx)
    assert torch.equal(u, ref[0]) and torch.equal(g, ref[1])


def test_capture_utility_directly():
    """mcmc.capture on a plain function: gathers by trusted indices become index_select,
    values match, and a function that reads a tensor value is refused with the line."""
    X = torch.randn(50, 4)

    def f(w, idx):
        return ((X[idx] @ w).sigmoid().sum(),)

    w, idx = torch.randn(4), torch.randint(50, (7,))
    graph = capture(f, [w, idx], gather_inputs=[1])
    assert graph.num_gathers == 1
    assert torch.equal(graph(w, idx)[0], f(w, idx)[0])

    def f2(w, idx):  # vector @ matrix records an in-place squeeze_ of the (1, 7) product
        return ((w @ X[idx].T).sigmoid().sum(),)

    # the squeeze_ is rewritten as a view, so the graph is simplified (no in-place ops, detach
    # or alias left), and it still gives f2's values
    graph = capture(f2, [w, idx], gather_inputs=[1])
    assert torch.equal(graph(w, idx)[0], f2(w, idx)[0])
    targets = [n.target for n in graph.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.squeeze.dim in targets
    assert not any(t._schema.is_mutable or t in (torch.ops.aten.detach.default,
                                                 torch.ops.aten.alias.default) for t in targets)

    def g(w):
        return (w * w.sum().item(),)

    with pytest.raises(CaptureError,
                       match=r"\.item\(\).*test_mcmc_capture\.py:\d+ \(`return \(w \* "):
        capture(g, [w])


# ------------------------------------------------------------------ fallbacks, each logged once
def _item_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    scale = 1.0 + 0.0 * w.norm().item()
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, scale), obs=y)


def _branch_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    if w.sum() > 100:
        w = w.clamp(-10, 10)
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)


def _mask_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    keep = y > -100.0  # all rows, but a data-dependent number of them
    with pyro.plate("data", int(X.shape[0])):
        pyro.factor("lik", dist.Normal(X[keep] @ w, 1.0).log_prob(y[keep]).sum() / X.shape[0])


def _param_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, sigma), obs=y)


def _random_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    jitter = 1e-12 * torch.randn(())
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w + jitter, 1.0), obs=y)


@pytest.mark.parametrize("model, reason", [
    (_item_model, (r"\.item\(\) \(a tensor value read in Python\) at test_mcmc_capture\.py:\d+ "
                  r"\(`scale = 1\.0 \+ 0\.0 \* w\.norm\(\)\.item\(\)`\)")),
    (_branch_model, (r"Python control flow on a tensor value at test_mcmc_capture\.py:\d+ "
                    r"\(`if w\.sum\(\) > 100:`\)")),
    (_mask_model, (r"data-dependent shapes \(__getitem__\) at test_mcmc_capture\.py:\d+ "
                  r"\(`pyro\.factor\(")),
    (_param_model, r"pyro\.param site\(s\) \['sigma'\] are not lifted"),
    (_random_model, (r"random numbers drawn inside the function \(randn\) at "
                    r"test_mcmc_capture\.py:\d+")),
])
def test_capture_falls_back_to_eager_with_one_log_line(model, reason, caplog):
    X, y = _regression_data(n=40)
    pot = Potential(model, (X, y))
    ref = Potential(model, (X, y), capture="off")
    z = pot.initial_params(1)
    with caplog.at_level(logging.INFO, logger="mcmc.potential"):
        for _ in range(4):
            u, g = pot.value_and_grad(z)
            if model is not _random_model:
                u0, g0 = ref.value_and_grad(z)
                assert torch.equal(u, u0) and torch.equal(g, g0)
    lines = [r.getMessage() for r in caplog.records if "capture is not possible" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"model '{model.__name__}': the potential is evaluated eagerly")
    import re

    assert re.search(reason, lines[0]), lines[0]
    assert next(iter(pot.capture_info.values())).startswith("eager: ")
    # the sampler still runs (eagerly) and its block steps are off, logged once by the driver
    with caplog.at_level(logging.INFO, logger="mcmc.chains"):
        SGLD(model, step_size=1e-3, seed=0, block_size=4).sample_chains(
            8, num_chains=2, model_args=(X, y), progress=False)
    blocks = [r for r in caplog.records if r.name == "mcmc.chains"]
    assert len(blocks) == 1 and "block steps are off" in blocks[0].getMessage()


# ------------------------------------------------------------------ NaN handling under capture
def test_nonfinite_detection_is_unchanged_by_capture_and_blocks():
    """The same error (iteration, chains, sites) with or without capture and blocks; with
    step halving, blocks that hit NaN are replayed step by step and the draws match."""
    X, y = _regression_data()
    errors = []
    for opts in ({"capture": "off"}, {"block_size": 1}, {"block_size": 6}):
        with pytest.raises(FloatingPointError) as info:
            _draws(SGLD, regression, (X, y), step_size=3.0, **opts)
        errors.append(str(info.value))
    assert errors[0] == errors[1] == errors[2]
    assert "non-finite" in errors[0] and "iteration" in errors[0]
    halve = {"step_size": 0.02, "on_nonfinite": "halve"}
    eager, k0 = _draws(SGLD, regression, (X, y), capture="off", **halve)
    blocked, k1 = _draws(SGLD, regression, (X, y), block_size=6, **halve)
    assert k0.driver.num_halvings > 0
    assert k1.driver.num_halvings == k0.driver.num_halvings
    assert torch.equal(blocked, eager)


# ------------------------------------------------------------------ options
def test_bad_capture_and_block_size_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"SGLD\(\.\.\., capture='jit'\): capture must be one"):
        SGLD(regression, capture="jit")
    with pytest.raises(ValueError, match=r"SGLD\(\.\.\., block_size=0\): block_size must be"):
        SGLD(regression, block_size=0)
    with pytest.raises(ValueError, match=r"CoinSVGD\(\.\.\., capture=3\)"):
        CoinSVGD(regression, capture=3)


@pytest.mark.slow
def test_inductor_backend_matches_eager_to_rounding():
    """Opt-in TorchInductor (seconds of compilation): fused kernels round differently, so the
    potential matches eager to float rounding, not bit for bit."""
    X, y = _regression_data()
    pot = Potential(regression, (X, y), capture="inductor")
    z = pot.initial_params(2)
    idx = pot.draw_indices(2, torch.Generator().manual_seed(0))
    fn = pot.capture(z, idx)
    u, g = fn(z, idx)
    u0, g0 = Potential(regression, (X, y), capture="off").value_and_grad(z, idx)
    torch.testing.assert_close(u, u0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-4)
    graph = pot.captured_graph(z, idx)
    assert graph.backend == "inductor" or graph.notes
