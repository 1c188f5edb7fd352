"""Tests of the model zoo: every model builds, runs, broadcasts, casts and has a consistent
reference posterior.

Reference checks used here:

* analytic references: ``log p(data, theta) - log post(theta)`` must be the same number (the log
  evidence) at every ``theta`` -- an exact check of the closed form; the stored draws must match
  the analytic moments; a short NUTS run must match the analytic mean and variance within
  Monte-Carlo error (small models).
* NUTS references: Stein identities of the posterior in unconstrained space,
  ``E[d/du_j log p(u | data)] = 0`` and ``E[(u_j - E u_j) d/du_j log p(u | data)] = -1``, evaluated
  on the stored draws (one vectorised model evaluation) within 4.5 Monte-Carlo standard errors
  (SE from the ESS of each statistic's series; 4.5 because ~100 coordinates are tested at once).
  These hold for the exact posterior and fail for draws that are shifted or too narrow/wide.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, Trace_ELBO, config_enumerate
from pyro.ops.stats import effective_sample_size
from pyro.poutine.util import site_is_subsample

import models
from models.zoo import _common

ALL = [
    "bnn_regression",
    "dirichlet_multinomial",
    "discrete_mixture",
    "eight_schools",
    "federated_blobs",
    "gamma_poisson",
    "gaussian_conjugate",
    "linear_regression",
    "logistic_regression",
    "logistic_regression_synthetic",
    "sparse_logistic",
    "vae_digits",
]
ANALYTIC = [
    "dirichlet_multinomial", "federated_blobs", "gamma_poisson", "gaussian_conjugate",
    "linear_regression",
]
NUTS_REFERENCE = [
    "bnn_regression", "discrete_mixture", "eight_schools", "logistic_regression", "sparse_logistic",
]
# Small settings keep the generic tests fast.
SMALL = {"linear_regression": {"num_rows": 200}, "logistic_regression_synthetic": {"num_rows": 200}}


def small(name: str, **kw) -> models.ModelSpec:
    return models.get(name, **{**SMALL.get(name, {}), **kw})


def latent_trace(spec: models.ModelSpec, model=None, **kwargs) -> poutine.Trace:
    return poutine.trace(model or spec.model).get_trace(*spec.args, **{**spec.kwargs, **kwargs})


def latents(trace: poutine.Trace) -> dict:
    return {
        name: site for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def batched_log_joint(spec: models.ModelSpec, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log joint of the model at ``S`` points at once, ``values[site]`` of shape ``(S, *shape)``.

    Runs the model once under a batch plate at ``dim = -(max_plate_nesting + 1)`` with the values
    in Pyro's layout (``(S, 1, ..., *shape)``), which is how vectorised particles and chains
    call the zoo models; returns ``(S,)``.
    """
    mpn = spec.max_plate_nesting
    plain = latents(latent_trace(spec))
    S = next(iter(values.values())).shape[0]
    data = {}
    for name, v in values.items():
        batch_ndim = len(plain[name]["fn"].batch_shape)
        data[name] = v.reshape(S, *(1,) * (mpn - batch_ndim), *v.shape[1:])
    with pyro.plate("_batch", S, dim=-(mpn + 1)):
        tr = poutine.trace(poutine.condition(spec.model, data)).get_trace(
            *spec.args, **spec.kwargs
        )
    tr.compute_log_prob()
    total = torch.zeros(S, dtype=torch.float64)
    for site in tr.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            lp = site["log_prob"]
            lp = lp.expand((S,) + lp.shape[1:]) if lp.dim() > mpn else lp.expand(S, *lp.shape)
            total = total + lp.reshape(S, -1).sum(-1).double()
    return total


# ----------------------------------------------------------------------------- registry


def test_names_lists_every_model():
    assert models.names() == sorted(ALL)


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError, match="valid models: .*gamma_poisson.*linear_regression"):
        models.get("gamma_poison")
    with pytest.raises(KeyError, match="did you mean 'gamma_poisson'"):
        models.get("gamma_poison")


@pytest.mark.parametrize("name,options", [
    ("gaussian_conjugate", {"dim": 0}),
    ("gamma_poisson", {"true_rate": -1.0}),
    ("linear_regression", {"num_rows": 0}),
    ("federated_blobs", {"shard_sizes": [10, 20]}),
    ("dirichlet_multinomial", {"num_categories": 1}),
    ("discrete_mixture", {"num_components": 1}),
    ("logistic_regression", {"prior_scale": 0.0}),
    ("logistic_regression_synthetic", {"dim": 0}),
    ("sparse_logistic", {"laplace_scale": -1.0}),
    ("bnn_regression", {"num_hidden": 0}),
    ("vae_digits", {"latent_dim": 0}),
])
def test_bad_options_raise(name, options):
    key = next(iter(options))
    with pytest.raises(ValueError, match=f"{name}: .*{key}"):
        models.get(name, **options)


def test_unknown_option_raises():
    with pytest.raises(TypeError, match="num_rowz"):
        models.get("linear_regression", num_rowz=3)


# ----------------------------------------------------------------------------- data files


def test_missing_data_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "DATA_DIR", tmp_path)
    with pytest.raises(_common.DataFileError, match=r"breast_cancer\.npz.*missing"):
        models.get("logistic_regression")


@pytest.mark.parametrize("name,file", [
    ("sparse_logistic", "breast_cancer.npz"),
    ("bnn_regression", "diabetes.npz"),
    ("vae_digits", "digits.npz"),
])
def test_corrupt_data_file_names_the_file(tmp_path, monkeypatch, name, file):
    (tmp_path / file).write_bytes(b"PK\x03\x04 not really a zip archive")
    monkeypatch.setattr(_common, "DATA_DIR", tmp_path)
    with pytest.raises(_common.DataFileError, match=rf"{file}.*corrupt"):
        models.get(name)


def test_data_file_without_expected_arrays_names_the_file(tmp_path, monkeypatch):
    np.savez_compressed(tmp_path / "diabetes.npz", X=np.zeros((442, 10)))
    monkeypatch.setattr(_common, "DATA_DIR", tmp_path)
    with pytest.raises(_common.DataFileError, match=r"diabetes\.npz.*lacks.*'y'"):
        models.get("bnn_regression")


def test_missing_reference_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "REFERENCE_DIR", tmp_path)
    with pytest.raises(_common.DataFileError, match=r"eight_schools\.npz.*missing"):
        models.get("eight_schools")
    assert models.get("eight_schools", with_reference=False).reference is None


def test_embedded_data_is_small():
    total = sum(p.stat().st_size for p in _common.DATA_DIR.iterdir())
    total += sum(p.stat().st_size for p in _common.REFERENCE_DIR.iterdir())
    assert total < 2 * 2**20


# ----------------------------------------------------------------------------- generic contract


@pytest.mark.parametrize("name", ALL)
def test_model_runs_and_latent_sites_match(name):
    spec = small(name)
    assert spec.name == name and spec.description
    sites = latents(latent_trace(spec))
    assert {k: tuple(s["value"].shape) for k, s in sites.items()} == spec.latent_sites
    for k, s in sites.items():
        assert s["fn"].support.is_discrete == (k in spec.discrete_sites)
    for k, v in spec.observed.items():
        assert latent_trace(spec).nodes[k]["is_observed"]
        assert torch.equal(latent_trace(spec).nodes[k]["value"], v)
    if spec.data_size is not None and spec.supports_subsampling:
        assert latent_trace(spec).nodes["data"]["fn"].size == spec.data_size
    if spec.heldout is not None:
        args, kwargs = spec.heldout
        tr = poutine.trace(spec.model).get_trace(*args, **kwargs)
        assert all(torch.isfinite(s["fn"].log_prob(s["value"])).all()
                   for s in tr.nodes.values() if s["type"] == "sample" and s["is_observed"])


@pytest.mark.parametrize("name", ALL)
def test_reference_draws_match_latent_shapes(name):
    spec = small(name)
    if spec.reference is None:
        assert spec.reference_note, "a missing reference needs a reason"
        return
    ref = spec.reference
    assert ref.kind == ("analytic" if name in ANALYTIC else "nuts")
    assert ref.note and spec.reference_note
    assert set(ref.draws) <= set(spec.latent_sites)
    for k, v in ref.draws.items():
        assert v.shape[1:] == spec.latent_sites[k] and v.shape[0] >= 500
        assert torch.isfinite(v.float()).all()
    if name != "discrete_mixture":
        assert set(ref.draws) == set(spec.latent_sites)
    else:  # z is summed out by NUTS, then drawn exactly from p(z | weights, locs, x)
        assert set(ref.draws) == {"weights", "locs", "z"}
        assert ((ref.draws["z"] >= 0) & (ref.draws["z"] < 2)).all()


@pytest.mark.parametrize("name", ALL)
def test_vectorised_particles_and_subsampling(name):
    spec = small(name)
    elbo = Trace_ELBO(vectorize_particles=True, num_particles=3,
                      max_plate_nesting=spec.max_plate_nesting)
    guide = spec.make_guide()
    loss = elbo.loss(spec.model, guide, *spec.args, **spec.kwargs)
    assert math.isfinite(loss)
    if spec.supports_subsampling:
        B = min(5, spec.data_size)
        loss = elbo.loss(spec.model, guide, *spec.args, **spec.kwargs, subsample_size=B)
        assert math.isfinite(loss)
        tr = latent_trace(spec, subsample_size=B)
        idx = tr.nodes["data"]["value"]
        assert idx.shape == (B,)
        for k, v in spec.observed.items():
            assert torch.equal(tr.nodes[k]["value"], v[idx])
            assert tr.nodes[k]["scale"] == pytest.approx(spec.data_size / B)


@pytest.mark.parametrize("name", ALL)
def test_batched_log_joint_equals_unbatched(name):
    """The model broadcasts over a left batch dim: log p at 3 points in one run == 3 runs."""
    spec = small(name)
    traces = [latent_trace(spec) for _ in range(3)]
    values = {k: torch.stack([tr.nodes[k]["value"] for tr in traces]) for k in spec.latent_sites}
    batched = batched_log_joint(spec, values)
    plain = []
    for tr in traces:
        tr.compute_log_prob()
        plain.append(sum(s["log_prob_sum"].double() for s in tr.nodes.values()
                         if s["type"] == "sample" and not site_is_subsample(s)))
    torch.testing.assert_close(batched, torch.stack(plain).detach(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", ALL)
def test_to_float64_casts_everything(name):
    spec = small(name).to("cpu", torch.float64)

    def floats(x):
        if isinstance(x, torch.Tensor):
            return [x] if x.is_floating_point() else []
        if isinstance(x, torch.nn.Module):
            return list(x.parameters())
        if isinstance(x, dict):
            return [t for v in x.values() for t in floats(v)]
        if isinstance(x, (list, tuple)):
            return [t for v in x for t in floats(v)]
        return []

    tensors = floats(spec.args) + floats(spec.kwargs) + floats(spec.heldout) + floats(spec.shards)
    if spec.reference is not None:
        tensors += floats(spec.reference.draws)
        if spec.reference.analytic is not None:
            tensors += [d.mean for d in spec.reference.analytic.values()]
    assert tensors and all(t.dtype == torch.float64 for t in tensors)
    assert all(s["value"].dtype == torch.float64 for s in latents(latent_trace(spec)).values()
               if s["value"].is_floating_point())


@pytest.mark.parametrize("name", ALL)
def test_a_few_nuts_steps(name):
    spec = small(name)
    model = config_enumerate(spec.model, "parallel") if spec.discrete_sites else spec.model
    # The VAE's 5752 local latents only need to show that NUTS runs: keep its trees tiny.
    depth = 2 if name == "vae_digits" else 10
    mcmc = MCMC(NUTS(model, max_plate_nesting=spec.max_plate_nesting, max_tree_depth=depth),
                num_samples=5, warmup_steps=5, disable_progbar=True)
    mcmc.run(*spec.args, **spec.kwargs)
    samples = mcmc.get_samples()
    continuous = {k: s for k, s in spec.latent_sites.items() if k not in spec.discrete_sites}
    assert set(samples) == set(continuous)
    for k, v in samples.items():
        assert v.shape == (5, *continuous[k]) and torch.isfinite(v).all()


def test_specs_pickle():
    import pickle

    for name in ALL:
        spec = small(name)
        clone = pickle.loads(pickle.dumps(spec))
        assert clone.latent_sites == spec.latent_sites


@pytest.mark.cuda
@pytest.mark.parametrize("name", ALL)
def test_cuda_puts_everything_on_cuda(name):
    spec = small(name, device="cuda")
    assert spec.device.type == "cuda"
    for s in latent_trace(spec).nodes.values():
        if s["type"] == "sample" and not site_is_subsample(s):
            assert s["value"].device.type == "cuda"
    if spec.reference is not None:
        assert all(v.device.type == "cuda" for v in spec.reference.draws.values())
    loss = Trace_ELBO(vectorize_particles=True, num_particles=2,
                      max_plate_nesting=spec.max_plate_nesting).loss(
        spec.model, spec.make_guide(), *spec.args, **spec.kwargs)
    assert math.isfinite(loss)


# ----------------------------------------------------------------------------- analytic references


@pytest.mark.parametrize("name", ANALYTIC)
def test_analytic_posterior_is_exact(name):
    """log p(data, theta) - log post(theta) = log p(data) must not depend on theta."""
    spec = small(name).to("cpu", torch.float64)
    (site, post), = spec.reference.analytic.items()
    # Points spread well beyond the posterior: posterior draws and prior draws.
    thetas = torch.cat([post.sample((20,)), torch.stack(
        [latent_trace(spec).nodes[site]["value"] for _ in range(20)])])
    log_post = post.log_prob(thetas)
    log_evidence = batched_log_joint(spec, {site: thetas}) - log_post
    spread = (log_evidence.max() - log_evidence.min()).item()
    # The posterior's parameters are stored in float32 (relative rounding ~6e-8), so log post is
    # exact up to a few 1e-7 of its magnitude; any error in the formula shows up at O(1) or more.
    tol = 1e-6 * (1.0 + log_post.abs().max().item())
    print(f"{name}: log evidence {log_evidence.mean():.4f}, spread over 40 points {spread:.2e} "
          f"(tolerance {tol:.1e})")
    assert spread < tol


@pytest.mark.parametrize("name", ANALYTIC)
def test_analytic_draws_match_moments(name):
    ref = small(name).reference
    (site, post), = ref.analytic.items()
    draws = ref.draws[site].double()
    S = draws.shape[0]
    se_mean = (post.variance.double() / S).sqrt()
    z = (draws.mean(0) - post.mean.double()) / se_mean
    assert z.abs().max() < 4, z
    # Var of the sample variance ~ (m4 - sigma^4) / S; use the draws' fourth central moment.
    centred = draws - post.mean.double()
    se_var = ((centred**4).mean(0) - post.variance.double() ** 2).clamp_min(0).sqrt() / S**0.5
    zv = (draws.var(0) - post.variance.double()) / se_var
    assert zv.abs().max() < 4, zv


def test_federated_shards_partition_the_likelihood():
    spec = models.get("federated_blobs").to("cpu", torch.float64)
    theta = latent_trace(spec).nodes["theta"]["value"]
    N = spec.data_size
    assert sum(spec.options["shard_sizes"]) == N == spec.args[0].shape[0]
    assert len(spec.shards) == spec.options["num_shards"] == 4
    assert len(set(spec.options["shard_sizes"])) > 1  # unequal shard sizes

    def loglik(args, kwargs):
        tr = poutine.trace(poutine.condition(spec.model, {"theta": theta})).get_trace(
            *args, **kwargs)
        tr.compute_log_prob()
        return tr.nodes["x"]["log_prob_sum"], tr.nodes["theta"]["log_prob_sum"]

    full, prior = loglik(spec.args, spec.kwargs)
    shard_only = []
    for (args, kwargs), n in zip(spec.shards, spec.options["shard_sizes"]):
        assert kwargs["num_total"] == N and args[0].shape[0] == n
        scaled, shard_prior = loglik(args, kwargs)
        plain, _ = loglik(args, {**kwargs, "num_total": None})
        torch.testing.assert_close(scaled, plain * N / n)
        torch.testing.assert_close(shard_prior, prior)
        shard_only.append(plain)
    torch.testing.assert_close(torch.stack(shard_only).sum(), full)
    # Non-iid: the shard means are far apart relative to the posterior sd.
    means = torch.stack([args[0].mean(0) for args, _ in spec.shards])
    post_sd = spec.reference.analytic["theta"].stddev
    assert torch.cdist(means, means).max() > 20 * post_sd.max()


def test_gamma_poisson_guide_elbo_gradient_closed_form():
    """The default guide's params are 'a', 'b' and its ELBO gradient is the documented one."""
    spec = models.get("gamma_poisson").to("cpu", torch.float64)
    guide = spec.make_guide()
    x = spec.args[0]
    a0, b0 = torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    pyro.param("a", a0, constraint=dist.constraints.positive)
    pyro.param("b", b0, constraint=dist.constraints.positive)
    guide(x)
    a, b = pyro.param("a"), pyro.param("b")
    A, B = x.sum(), x.shape[0] + 1.0
    # ELBO = E_q[(A + 1 - 1) log r - B r] - log Z_q-terms, in closed form:
    elbo = (A * (torch.digamma(a) - b.log()) - B * a / b - sum(torch.lgamma(x + 1))
            + a - b.log() + torch.lgamma(a) + (1 - a) * torch.digamma(a))
    da, db = torch.autograd.grad(elbo, [a, b])
    torch.testing.assert_close(da, (A + 1 - a) * torch.polygamma(1, a) - B / b + 1)
    torch.testing.assert_close(db, -A / b + B * a / b**2 - 1 / b)
    # ... and it is the expectation of log p(x, r) - log q(r) under the guide (model density).
    q = dist.Gamma(a.detach(), b.detach())
    r = q.sample((20000,))
    f = batched_log_joint(spec, {"rate": r}) - q.log_prob(r)
    se = f.std() / f.shape[0] ** 0.5
    print(f"MC ELBO {f.mean():.3f} +- {se:.3f}, closed form {elbo.item():.3f}")
    assert (f.mean() - elbo).abs() < 4 * se


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["gamma_poisson", "gaussian_conjugate"])
def test_short_nuts_matches_analytic_moments(name):
    spec = models.get(name)
    (site, post), = spec.reference.analytic.items()
    kernel = NUTS(spec.model, max_plate_nesting=1, jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, num_samples=300, warmup_steps=150, disable_progbar=True)
    mcmc.run(*spec.args, **spec.kwargs)
    draws = mcmc.get_samples()[site].double().reshape(300, -1)
    ess = effective_sample_size(draws.unsqueeze(0), chain_dim=0, sample_dim=1)
    mean, var = post.mean.double().reshape(-1), post.variance.double().reshape(-1)
    z_mean = (draws.mean(0) - mean) / (var / ess).sqrt()
    # SE of a variance estimate: var * sqrt(2 / ESS) (Gaussian-like posteriors: the Gamma here
    # has shape 64); widened by 1.5 for the uncertainty of a 300-draw ESS estimate.
    z_var = (draws.var(0) - var) / (1.5 * var * (2 / ess).sqrt())
    print(f"{name}: ESS {ess.min():.0f}..{ess.max():.0f}, mean z {z_mean.tolist()}, "
          f"var z {z_var.tolist()}")
    assert z_mean.abs().max() < 4 and z_var.abs().max() < 4


# ----------------------------------------------------------------------------- NUTS references


def _reference_meta(name: str) -> dict:
    arrays = _common.load_npz(_common.reference_path(name), keys=("meta",))
    return json.loads(str(arrays["meta"]))


def _unconstrained_score(spec, draws: dict[str, torch.Tensor]):
    """Flattened unconstrained draws u (S, D) and grad_u log p(u | data) (S, D)."""
    from torch.distributions import biject_to

    plain = latents(latent_trace(spec))
    us, xs, logdet = {}, {}, 0.0
    for k, v in draws.items():
        if k in spec.discrete_sites:
            xs[k] = v
            continue
        t = biject_to(plain[k]["fn"].support)
        u = t.inv(v.double()).detach().requires_grad_()
        x = t(u)
        ld = t.log_abs_det_jacobian(u, x)
        logdet = logdet + ld.reshape(ld.shape[0], -1).sum(-1)
        us[k], xs[k] = u, x
    logp = batched_log_joint(spec, xs) + logdet
    grads = torch.autograd.grad(logp.sum(), list(us.values()))
    S = logp.shape[0]
    u = torch.cat([v.detach().reshape(S, -1) for v in us.values()], -1)
    g = torch.cat([gr.reshape(S, -1) for gr in grads], -1)
    return u, g


@pytest.mark.parametrize("name", NUTS_REFERENCE)
def test_nuts_reference_satisfies_stein_identities(name):
    spec = models.get(name).to("cpu", torch.float64)
    meta = _reference_meta(name)
    C = meta["num_chains"]
    u, g = _unconstrained_score(spec, spec.reference.draws)
    S, D = u.shape

    def z_scores(stat):  # stat (S, D): per-coordinate mean / MC standard error
        by_chain = stat.reshape(C, S // C, D)
        ess = effective_sample_size(by_chain, chain_dim=0, sample_dim=1).clamp_min(10.0)
        return stat.mean(0) / (stat.std(0) / ess.sqrt()), ess

    z1, ess1 = z_scores(g)
    z2, _ = z_scores((u - u.mean(0)) * g + 1.0)
    print(f"{name}: D={D}, ESS {ess1.min():.0f}..{ess1.max():.0f}, max |z| first order "
          f"{z1.abs().max():.2f}, second order {z2.abs().max():.2f}")
    assert z1.abs().max() < 4.5
    assert z2.abs().max() < 4.5


def test_stein_check_detects_a_wrong_reference():
    """The Stein test has power: draws shifted by 0.2 sd, or 20% too narrow / 50% too wide,
    fail it clearly (measured max |z|: ~90, ~15, ~13 against the 4.5 acceptance bound)."""
    spec = models.get("logistic_regression").to("cpu", torch.float64)
    draws = spec.reference.draws["w"]
    mean, sd = draws.mean(0), draws.std(0)
    for bad in (draws + 0.2 * sd, mean + 0.8 * (draws - mean), mean + 1.5 * (draws - mean)):
        u, g = _unconstrained_score(spec, {"w": bad})
        n = g.shape[0] ** 0.5
        z1 = g.mean(0) / (g.std(0) / n)
        second = (u - u.mean(0)) * g + 1
        z2 = second.mean(0) / (second.std(0) / n)
        assert max(z1.abs().max(), z2.abs().max()) > 6


def test_logistic_reference_predicts_heldout():
    spec = models.get("logistic_regression")
    (X, y), _ = spec.heldout
    w = spec.reference.draws["w"]
    p = torch.sigmoid(X @ w.T).mean(-1)
    accuracy = ((p > 0.5).float() == y).float().mean()
    print(f"held-out accuracy of the reference posterior predictive: {accuracy:.3f}")
    assert accuracy > 0.9


def test_sparse_logistic_nonsmooth_marking():
    spec = models.get("sparse_logistic")
    term = spec.nonsmooth["beta"]
    assert term["penalty"] == "l1"
    b = spec.kwargs["laplace_scale"]
    torch.testing.assert_close(term["weight"], 1 / b)
    # The Laplace log-density is -weight * |beta| + const: the marked term is its nonsmooth part.
    beta = torch.randn(2, b.shape[0])
    lp = dist.Laplace(0.0, b).log_prob(beta).sum(-1)
    torch.testing.assert_close(lp[0] - lp[1], -(term["weight"] * (beta[0].abs() - beta[1].abs()))
                               .sum())
    # The Laplace(0, 0.25) prior shrinks: the posterior-mean l1 norm is about half that of the
    # N(0, 1)-prior logistic regression on the same data (measured 10.8 vs 21.4).
    dense = models.get("logistic_regression").reference.draws["w"][:, 1:]
    l1_sparse = spec.reference.draws["beta"].mean(0).abs().sum()
    assert l1_sparse < 0.75 * dense.mean(0).abs().sum()


def test_bnn_reference_predicts_heldout():
    spec = models.get("bnn_regression")
    (X, y), _ = spec.heldout
    from models.zoo.bnn import bnn_forward

    d = spec.reference.draws
    mean = bnn_forward(X, d["w1"], d["b1"], d["w2"], d["b2"]).mean(0)
    rmse = (mean - y).pow(2).mean().sqrt()
    print(f"BNN held-out RMSE (standardised target): {rmse:.3f}")
    assert rmse < 0.85  # predicting the training mean gives ~1


def test_discrete_mixture_reference_recovers_assignments():
    spec = models.get("discrete_mixture")
    z = spec.reference.draws["z"].float().mean(0).round()
    agree = (z == torch.tensor(spec.options["true_z"]).float()).float().mean()
    assert agree > 0.9
    locs = spec.reference.draws["locs"]
    assert (locs[:, 1] > locs[:, 0]).all()  # ordered support


def test_reference_options_mismatch_drops_reference():
    spec = models.get("bnn_regression", num_hidden=3)
    assert spec.reference is None and "num_hidden" in spec.reference_note


def test_vae_guide_is_amortised_and_follows_dtype():
    spec = models.get("vae_digits", dtype=torch.float64)
    guide = spec.make_guide()
    loss = Trace_ELBO().loss(spec.model, guide, *spec.args, **spec.kwargs, subsample_size=32)
    assert math.isfinite(loss)
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    assert {"encoder$$$net.0.weight", "decoder$$$net.0.weight"} <= set(
        pyro.get_param_store().keys())
    # Amortised: q(z | x) depends on the pixels only, not on a per-row parameter.
    assert not any(p.shape[0] == spec.data_size for p in guide.parameters())


def test_discrete_mixture_guide_supports_enumeration_and_reinforce():
    from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO

    spec = models.get("discrete_mixture")
    guide = spec.make_guide()
    enum = TraceEnum_ELBO(max_plate_nesting=1).loss(
        spec.model, config_enumerate(guide, "parallel"), *spec.args, **spec.kwargs)
    score = TraceGraph_ELBO().loss(spec.model, guide, *spec.args, **spec.kwargs)
    assert math.isfinite(enum) and math.isfinite(score)
    assert pyro.param("z_probs").shape == (spec.data_size, 2)


def test_make_references_rejects_models_without_nuts_reference(capsys):
    from models import make_references

    with pytest.raises(KeyError, match="no NUTS reference; choose from .*eight_schools"):
        make_references.generate("gamma_poisson")
    with pytest.raises(SystemExit):
        make_references.main(["no_such_model"])
    assert "no NUTS reference" in capsys.readouterr().err
    # Every NUTS-reference model in the zoo has generator settings, and vice versa.
    assert set(make_references.SETTINGS) == set(NUTS_REFERENCE)
