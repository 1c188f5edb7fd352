"""The CLI's SVI runner: stopping rule, plateau schedule, step cap, importance resampling."""

import math
import random

import pyro
import pyro.distributions as dist
import pytest
import torch

import models
from models.methods import FitConfig, get_method
from models.methods.svi_runner import StoppingRule, guide_draws, run_svi


def drive(rule, losses):
    """Feed ``losses`` to ``rule`` every ``window`` steps; return ``[(step, action)]``."""
    actions = []
    for t in range(rule.window, len(losses) + 1, rule.window):
        action = rule.update(losses[:t])
        if action != "continue":
            actions.append((t, action))
            if action == "stop":
                break
    return actions


def test_rule_waits_while_the_trend_is_significant_then_decays_and_stops():
    rng = random.Random(0)
    # a slow exponential approach (time constant 800 steps) under unit noise
    slow = [100 + 20 * math.exp(-t / 800) + rng.gauss(0, 1) for t in range(20000)]
    actions = drive(StoppingRule(), slow)
    assert [a for _, a in actions] == ["decay", "decay", "stop"]
    first_decay = actions[0][0]
    # the first plateau comes only once the remaining gain is lost in the noise
    assert first_decay > 2500, actions
    assert 20 * math.exp(-first_decay / 800) < 1.0


def test_rule_stops_quickly_on_pure_noise_but_not_before_min_steps():
    rng = random.Random(1)
    flat = [rng.gauss(0, 1) for _ in range(5000)]
    actions = drive(StoppingRule(), flat)
    assert [a for _, a in actions] == ["decay", "decay", "stop"]
    assert actions[0][0] == 200 and actions[-1][0] <= 1000  # a false "gain" may cost a check
    actions = drive(StoppingRule(min_steps=1000), flat)
    assert actions[0] == (1000, "decay")


def test_rule_ignores_the_start_transient_when_estimating_noise():
    # a huge initial drop, then a flat, quiet loss: the drop is progress (no plateau at step 200)
    # but must not be taken for noise either, which would hide the plateau that follows
    rng = random.Random(2)
    losses = [1e4 * math.exp(-t / 10) + 0.01 * rng.gauss(0, 1) for t in range(3000)]
    assert drive(StoppingRule(), losses)[0] == (300, "decay")


def test_gamma_poisson_converges_by_default():
    """The regression of issue 14: ClippedAdam's clamped gradients stalled the Gamma(a, b)
    guide at a = 1.8, b = 0.49 (posterior mean error 1.8 sd); the runner's defaults reach the
    exact posterior Gamma(1 + sum x, 1 + N)."""
    spec = models.get("gamma_poisson")
    method = get_method("svi")
    result = method.fit(spec, FitConfig(num_samples=4000, progress=False,
                                        options=method.parse_options({})))
    post = spec.reference.analytic["rate"]
    a, b = float(pyro.param("a").detach()), float(pyro.param("b").detach())
    assert result.info["stop"] == "settled" and not result.warnings
    assert abs(a / b - float(post.mean)) < 0.1 * float(post.stddev)
    assert abs(math.sqrt(a) / b / float(post.stddev) - 1) < 0.1
    draws = result.draws["rate"].reshape(-1)
    se = float(post.stddev) / math.sqrt(draws.numel())
    assert abs(float(draws.mean()) - a / b) < 4 * se * math.sqrt(a) / b / float(post.stddev)


def test_step_cap_warns_naming_model_and_method():
    spec = models.get("gaussian_conjugate")
    loss = pyro.infer.Trace_ELBO()
    result = run_svi(spec, FitConfig(num_samples=10, progress=False, num_steps=120), loss,
                     "svi", lr=0.1)
    assert result.info == {**result.info, "stop": "cap", "num_steps": 120}
    (message,) = result.warnings
    assert message.startswith("svi on gaussian_conjugate: hit the cap of 120 steps")
    assert "--num-steps" in message


def test_nan_loss_is_an_error_not_a_result():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(float("nan")))

    spec = models.ModelSpec(name="bad", model=model, latent_sites={"x": ()}, max_plate_nesting=0)
    with pyro.validation_enabled(False), \
            pytest.raises(FloatingPointError, match="on bad: the loss became nan at step 1"):
        run_svi(spec, FitConfig(num_samples=10, progress=False), pyro.infer.Trace_ELBO(), "svi",
                lr=0.1)


def test_importance_resampling_corrects_a_too_wide_guide():
    """SIR from a guide twice as wide as the exact posterior moves the draws' spread towards it
    (what an importance-weighted bound fits), plain draws keep the guide's spread."""
    spec = models.get("gaussian_conjugate")
    post = spec.reference.analytic["mu"]

    def wide_guide(*args, **kwargs):
        pyro.sample("mu", dist.MultivariateNormal(post.loc.float(),
                                                  scale_tril=2 * post.scale_tril.float()))

    sd = post.variance.sqrt()
    plain = guide_draws(spec, wide_guide, 4000)["mu"].double()
    resampled = guide_draws(spec, wide_guide, 4000, resample=32)["mu"].double()
    assert torch.allclose(plain.std(0) / sd, torch.full((3,), 2.0, dtype=torch.float64),
                          rtol=0.08)
    assert torch.all((resampled.std(0) / sd - 1).abs() < 0.25)
