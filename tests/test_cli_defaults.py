"""Issue 14's check: the CLI's every applicable method, with its defaults, on gamma_poisson,
gaussian_conjugate and logistic_regression, against the reference posterior.

* VI methods whose objective is the (possibly importance-weighted) ELBO: every coordinate's
  posterior mean within 0.3 reference sd (their spread is not checked: mean-field guides are
  too narrow on correlated posteriors by design);
* mass-covering objectives (RWS's inclusive-KL wake-phi, CUBO's chi^2 bound) are stated
  separately: the same 0.3 sd, expected to fail where marked;
* samplers: RMS posterior-mean error within 0.2 reference sd and the sd ratios within 25%
  (RMS of the log ratios <= log 1.25).

``num_samples`` is 500 draws per chain (``pyroforge compare``'s default); every other setting is
the method's default. Each (model, method) pair is its own test so that xdist spreads them.
NUTS on logistic_regression is left out: that model's reference *is* NUTS draws. Misses that
are a sampler's own limits or mass-covering objectives are strict xfails,
each with its measured reason, so that a fix flips them.
"""

import math

import pytest
import torch

import models
from models.methods import FitConfig, get_method
from models.metrics import diagnose

MODELS = ("gamma_poisson", "gaussian_conjugate", "logistic_regression")
ELBO_LIKE = ("svi", "elbo", "elbo_stl", "iwelbo", "iwelbo_dreg", "renyi")
MASS_COVERING = ("rws", "cubo")
SAMPLERS = ("nuts", "sgld", "psgld", "cvsgld", "coin_svgd", "coin_ksdd", "svgd")

KNOWN = {
    ("gamma_poisson", "cubo"): "mass-covering: CUBO_2's K=8 guide is 2x too wide, mean 0.8 sd off",
    ("gaussian_conjugate", "cubo"): "mass-covering: CUBO_2's guide mean 0.35 sd off",
    ("logistic_regression", "cubo"): "mass-covering: CUBO_2's guide mean 0.65 sd off",
    ("logistic_regression", "rws"): "mass-covering: RWS wake-phi (inclusive KL), mean 0.5 sd off",
    ("logistic_regression", "coin_ksdd"): ("sampler side: KSD descent's fixed point with 50 "
                                           "particles in 31 dims (Laplace-whitened): RMS mean "
                                           "error 0.44 sd, sd ratios 0.86-2.1"),
}
"""(model, method) -> reason, for fits expected to miss the target (strict xfail)."""
SKIP = {("logistic_regression", "nuts"): "the reference itself is Pyro NUTS draws (120 s here)"}


def errors(spec, draws):
    """Per-coordinate (mean error in reference sd, sd ratio) over the reference's sites."""
    errs, ratios = [], []
    mean, var = spec.reference.mean(), spec.reference.variance()
    for site in spec.reference.draws:
        x = draws[site].double().reshape((-1,) + tuple(mean[site].shape))
        sd = var[site].double().sqrt()
        errs.append(((x.mean(0) - mean[site].double()) / sd).reshape(-1))
        ratios.append((x.std(0) / sd).reshape(-1))
    return torch.cat(errs), torch.cat(ratios)


def fit(model, method_name):
    spec = models.get(model)
    method = get_method(method_name)
    assert method.applies_to(spec) is None
    result = method.fit(spec, FitConfig(num_samples=500, seed=0, progress=False,
                                        options=method.parse_options({})))
    return spec, result


def cases(names):
    out = []
    for model in MODELS:
        for name in names:
            if (model, name) in SKIP:
                continue
            marks = []
            if (model, name) in KNOWN:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[(model, name)]))
            out.append(pytest.param(model, name, marks=marks, id=f"{model}-{name}"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model, method", cases(ELBO_LIKE + MASS_COVERING))
def test_vi_defaults_find_the_posterior_mean(model, method):
    spec, result = fit(model, method)
    err, ratio = errors(spec, result.draws)
    print(f"{model} {method}: max |mean error| {float(err.abs().max()):.3f} sd, sd ratios "
          f"[{float(ratio.min()):.2f}, {float(ratio.max()):.2f}], {result.info['num_steps']} "
          f"steps ({result.info['stop']})")
    assert not result.warnings, result.warnings
    assert float(err.abs().max()) <= 0.3


@pytest.mark.slow
@pytest.mark.parametrize("model, method", cases(SAMPLERS))
def test_sampler_defaults_match_the_posterior(model, method):
    spec, result = fit(model, method)
    err, ratio = errors(spec, result.draws)
    rms_err = float(err.pow(2).mean().sqrt())
    rms_log_ratio = float(ratio.log().pow(2).mean().sqrt())
    print(f"{model} {method}: RMS mean error {rms_err:.3f} sd (max {float(err.abs().max()):.3f})"
          f", sd ratios [{float(ratio.min()):.2f}, {float(ratio.max()):.2f}] (RMS log "
          f"{rms_log_ratio:.3f}), {result.wall_time:.1f} s")
    assert rms_err <= 0.2
    assert rms_log_ratio <= math.log(1.25)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bmumla", "myula"])
def test_proximal_sampler_defaults_match_the_posterior(method):
    """MYULA and BMUMLA (hypentropy mirror) with the CLI's defaults on the zoo's model with a
    nonsmooth term (sparse_logistic: its Laplace prior is the L1 term), against the NUTS
    reference, and their chains pass the CLI's convergence check."""
    spec, result = fit("sparse_logistic", method)
    err, ratio = errors(spec, result.draws)
    rms_err = float(err.pow(2).mean().sqrt())
    rms_log_ratio = float(ratio.log().pow(2).mean().sqrt())
    summary, messages = diagnose(result)
    print(f"sparse_logistic {method}: RMS mean error {rms_err:.3f} sd, RMS log sd ratio "
          f"{rms_log_ratio:.3f}, {result.wall_time:.1f} s; {summary}")
    assert not messages, messages
    assert rms_err <= 0.2
    assert rms_log_ratio <= math.log(1.25)
