"""The one SVI loop behind every VI method of the CLI: Adam, a plateau schedule, a stopping rule.

**Optimiser.** ``pyro.optim.Adam`` at learning rate ``lr``, without gradient clipping: Pyro's
``ClippedAdam`` clamps every gradient coordinate to +-10, and since ``E[clip(g)] != clip(E[g])``
for noisy gradients the clamped iteration has its own, wrong, fixed points (on ``gamma_poisson``
the Gamma(a, b) guide sat at a = 1.8, b = 0.49 instead of 64, 21).

**Schedule.** At a constant learning rate stochastic optimisation does not converge to the
optimum but jitters around it, by an amount that grows with the rate (Adam at 0.1 leaves the
guide's mean up to a posterior sd away on ``gamma_poisson``). So the rate starts high (fast
progress) and is divided by ``decay`` each time the smoothed objective stops improving; after
``num_decays`` such plateaus the fit has settled and stops.

**Stopping rule.** Every ``window`` steps the training losses (the objective's Monte-Carlo
estimates, already computed) are smoothed over two blocks of ``h = max(min_block, t / 4)``
steps since the last change of rate (``t`` steps ago): the previous block and the latest. The
objective has *stopped improving* (never before ``min_steps`` steps: objectives whose guide
gradients are weak, e.g. importance-weighted bounds, get a longer first phase) when the latest block is not lower than the previous one by
more than ``max(z * se, tol)``, with ``se`` the standard error of the difference of the two block
means (the per-step noise estimated from successive differences of the latest block, which a
trend does not inflate) and ``tol = rtol * (1 + |progress|)`` (``progress``: how far the smoothed loss has come
since the start). Blocks that grow with ``t`` detect ever slower progress while the noise of
their means shrinks. The ``num_steps`` cap stops the fit otherwise, and the result then carries a
warning naming the model and method.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from .base import FitConfig, FitResult, chains_result, latent_names

__all__ = ["DEFAULT_MAX_STEPS", "StoppingRule", "guide_draws", "run_svi"]

DEFAULT_MAX_STEPS = 5000


@dataclass
class StoppingRule:
    """Plateau detection on the smoothed training loss (see the module docstring).

    ``update(losses)`` is called every ``window`` steps with every loss so far and returns
    ``"continue"``, ``"decay"`` (divide the learning rate by ``decay``) or ``"stop"``.
    """

    window: int = 50
    min_block: int = 100
    min_steps: int = 200
    z: float = 2.0
    rtol: float = 1e-4
    num_decays: int = 2
    decay: float = 10.0

    def __post_init__(self):
        self.since = 0  # index of the first loss at the current learning rate
        self.decays = 0
        self.first: float | None = None
        self.smoothed = float("nan")

    def update(self, losses: list[float]) -> str:
        import statistics

        t = len(losses) - self.since
        h = max(self.min_block, t // 4)
        if self.first is None and len(losses) >= self.min_block:
            self.first = statistics.fmean(losses[: self.min_block])
        if t < 2 * h or len(losses) < self.min_steps:
            return "continue"
        recent, previous = losses[-h:], losses[-2 * h: -h]
        self.smoothed = statistics.fmean(recent)
        gain = statistics.fmean(previous) - self.smoothed
        # noise from successive differences of the latest block: a trend (or the start's
        # transient in the previous block) does not inflate it
        noise = statistics.fmean((b - a) ** 2 for a, b in itertools.pairwise(recent)) / 2
        se = (2 * noise / h) ** 0.5
        tol = self.rtol * (1.0 + abs(self.first - self.smoothed))
        if gain > max(self.z * se, tol):
            return "continue"
        if self.decays >= self.num_decays:
            return "stop"
        self.decays += 1
        self.since = len(losses)
        return "decay"


def _nonfinite_params() -> list[str]:
    import pyro
    import torch

    return [name for name, value in pyro.get_param_store().items()
            if not bool(torch.isfinite(value).all())]


def _set_lr(optim, lr: float) -> None:
    for opt in optim.optim_objs.values():
        for group in opt.param_groups:
            group["lr"] = lr


def guide_draws(spec, guide, num_samples: int, resample: int = 0) -> dict:
    """``{site: (num_samples, *shape)}`` joint draws of the reported sites from the fitted guide.

    With ``resample = K > 0``: sampling-importance-resampling, one of K guide draws kept with
    probability proportional to its importance weight ``p(x, z) / q(z)``. That is the
    distribution an importance-weighted bound with K samples is the ELBO of (Cremer, Morris and
    Duvenaud 2017, "Reinterpreting importance-weighted autoencoders"), so it is what those
    objectives fit; their guide alone is typically too wide.
    """
    import torch
    from pyro.infer import Predictive
    from pyro.infer.importance import vectorized_importance_weights

    sites = latent_names(spec)
    with torch.no_grad():
        if not resample:
            return Predictive(guide, num_samples=num_samples, return_sites=sites,
                              parallel=True)(*spec.args, **spec.kwargs)
        total = num_samples * resample
        log_w, model_trace, _ = vectorized_importance_weights(
            spec.model, guide, *spec.args, num_samples=total,
            max_plate_nesting=spec.max_plate_nesting, **spec.kwargs)
        pick = torch.distributions.Categorical(logits=log_w.reshape(num_samples, resample)).sample()
        index = torch.arange(num_samples, device=pick.device) * resample + pick
        out = {}
        for name in sites:
            value = model_trace.nodes[name]["value"]
            out[name] = value.reshape((total,) + tuple(spec.latent_sites[name]))[index]
        return out


def run_svi(spec, config: FitConfig, loss, name: str, *, lr: float,
            rule: StoppingRule | None = None, resample: int = 0) -> FitResult:
    """Fit ``spec.make_guide()`` with ``pyro.infer.SVI(loss=loss)``, then draw from it.

    Runs until the stopping rule says the objective has settled, at most ``config.num_steps``
    steps (default :data:`DEFAULT_MAX_STEPS`), then draws ``config.num_samples`` joint samples
    of the reported sites (one chain of iid draws) with :func:`guide_draws` (``resample``: the
    K of importance-weighted objectives, 0 for plain guide draws).
    """
    import math

    import pyro
    from pyro.infer import SVI
    from tqdm.auto import tqdm

    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    guide = spec.make_guide()
    max_steps = config.num_steps or DEFAULT_MAX_STEPS
    rule = rule or StoppingRule()
    optim = pyro.optim.Adam({"lr": lr})
    svi = SVI(spec.model, guide, optim, loss=loss)
    losses: list[float] = []
    start = time.perf_counter()
    current_lr, stop, steps = lr, None, 0
    bar = tqdm(total=max_steps, desc=f"{name} {spec.name}", disable=not config.progress)
    try:
        for steps in range(1, max_steps + 1):
            try:
                value = svi.step(*spec.args, **spec.kwargs)
            except ValueError as exc:  # e.g. a distribution rejecting a NaN parameter
                bad = _nonfinite_params()
                if not bad:
                    raise
                raise FloatingPointError(
                    f"{name} on {spec.name}: the guide's parameters {', '.join(bad)} became "
                    f"non-finite by step {steps} (lr {current_lr:g}); try a smaller "
                    "--option lr=...") from exc
            bar.update()
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{name} on {spec.name}: the loss became {value} at step {steps} (lr "
                    f"{current_lr:g}); try a smaller --option lr=...")
            losses.append(value)
            if steps % rule.window == 0:
                action = rule.update(losses)
                bar.set_postfix(loss=f"{rule.smoothed:.4g}", lr=f"{current_lr:.2g}",
                                refresh=False)
                if action == "decay":
                    current_lr /= rule.decay
                    _set_lr(optim, current_lr)
                elif action == "stop":
                    stop = "settled"
                    break
    finally:
        bar.close()
    warnings = []
    if stop is None:
        stop = "cap"
        warnings.append(
            f"{name} on {spec.name}: hit the cap of {max_steps} steps before the objective "
            f"stopped improving (smoothed loss {rule.smoothed:.4g}, lr {current_lr:.2g}); the "
            "fit may not have converged: raise --num-steps or change --option lr=...")
    draws = guide_draws(spec, guide, config.num_samples, resample)
    wall = time.perf_counter() - start
    info = {"num_steps": steps, "stop": stop, "final_loss": rule.smoothed, "lr": lr,
            "final_lr": current_lr, "guide": type(guide).__name__, "resample": resample}
    return chains_result(name, spec, {k: v[None] for k, v in draws.items()}, wall, info=info,
                         warnings=warnings)
