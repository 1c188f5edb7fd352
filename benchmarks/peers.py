"""Peer implementations of the benchmarks' work in NumPyro and BlackJAX (JAX on CPU).

They are optional: ``pip install -e ".[peers]"`` installs the pinned versions. Each builder
returns ``{implementation name: zero-argument callable}``, or the same names mapped to
:class:`~benchmarks.harness.Skipped` (with the reason) when a library is missing or peers are
disabled (``python -m benchmarks --no-peers``, and always under ``--gpu-check``).

Rules every builder follows, so that a ratio against a peer compares the same work:

* the data are the benchmark's own tensors, converted once to JAX arrays (``float32``, like
  the torch side) outside the timed callable, and passed to jitted functions as arguments (not
  closed over, which would bake them into the compiled program as constants);
* every timed callable ends with ``block_until_ready()`` (JAX dispatches asynchronously);
* JIT compilation happens in the harness's warm-up calls, which the median excludes; the
  first call's time is reported separately (``first_call_s``).

One core each: :func:`configure_cpus` restricts the process to ``n`` CPUs *before* JAX starts.
With jaxlib 0.10 the XLA flags usually suggested for this
(``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``) still left a matrix
product spread over four threads on this machine; the CPU affinity mask is what XLA's CPU
client sizes its thread pool from, and it bounds torch as well.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import numpy as np
import torch

from .harness import Skipped

INSTALL_HINT = 'pip install -e ".[peers]"'
_disabled: str | None = None


def disable(reason: str) -> None:
    """Skip every peer from now on (recorded with ``reason``)."""
    global _disabled
    _disabled = reason


def enable() -> None:
    global _disabled
    _disabled = None


def unavailable(*modules: str) -> str | None:
    """Why the peers needing ``modules`` cannot run here, or ``None`` if they can."""
    if _disabled is not None:
        return _disabled
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        return f"{', '.join(absent)} not installed ({INSTALL_HINT})"
    return None


def configure_cpus(n: int) -> dict:
    """Restrict this process (torch, XLA and every other thread) to ``n`` CPUs and keep JAX on
    the CPU backend. Call before JAX is imported; returns what was set."""
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    done: dict = {}
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:n]
        os.sched_setaffinity(0, cpus)
        done["cpus"] = cpus
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if n == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    done["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return done


def _peer(names: tuple[str, ...], *modules: str) -> Callable:
    """Decorate a builder: map ``names`` to Skipped when ``modules`` are unavailable."""

    def decorate(build):
        def wrapper(*args, **kwargs):
            why = unavailable(*modules)
            if why is not None:
                return {name: Skipped(why) for name in names}
            out = build(*args, **kwargs)
            assert tuple(out) == names, (tuple(out), names)
            return out

        wrapper.__name__, wrapper.__doc__ = build.__name__, build.__doc__
        wrapper.peer_names = names
        return wrapper

    return decorate


def to_jax(t: torch.Tensor):
    """A torch tensor as a JAX array on the CPU (one copy, done at set-up)."""
    import jax.numpy as jnp

    return jnp.asarray(np.ascontiguousarray(t.detach().cpu().numpy()))


# --------------------------------------------------------------------------- logistic regression


def numpyro_logistic_model(X, y, prior_scale):
    """The zoo's ``logistic_model`` in NumPyro: ``w ~ N(0, diag(prior_scale^2))``,
    ``y_n ~ Bernoulli(sigmoid(X_n w))``."""
    import numpyro
    import numpyro.distributions as ndist

    w = numpyro.sample("w", ndist.Normal(0.0, prior_scale).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", ndist.Bernoulli(logits=X @ w), obs=y)


@_peer(("blackjax_sgld_step", "blackjax_sgld_scan"), "jax", "blackjax")
def blackjax_sgld(X, y, prior_scale, *, batch_size: int, step_size: float, num_steps: int,
                  seed: int = 0):
    """BlackJAX ``sgld`` on logistic regression; each call runs ``num_steps`` steps from the
    last position, minibatches of ``batch_size`` rows drawn with replacement.

    ``blackjax_sgld_step``: one jitted step per Python call (key split, row draw, gather,
    gradient estimate, update), ``num_steps`` calls. ``blackjax_sgld_scan``: the same steps in
    one jitted ``lax.scan`` (k steps per call)."""
    import blackjax
    import jax
    import jax.numpy as jnp

    Xj, yj, sj = to_jax(X), to_jax(y), to_jax(prior_scale)
    n = X.shape[0]

    def logprior(w):
        return jnp.sum(jax.scipy.stats.norm.logpdf(w, 0.0, sj))

    def loglik(w, row):  # one data point; blackjax vmaps over the minibatch
        x, t = row
        logit = x @ w
        return t * logit - jax.nn.softplus(logit)

    sgld = blackjax.sgld(blackjax.sgmcmc.gradients.grad_estimator(logprior, loglik, n))

    def one(key, w, X, y):
        key, k_idx, k_step = jax.random.split(key, 3)
        idx = jax.random.randint(k_idx, (batch_size,), 0, n)
        batch = (jnp.take(X, idx, axis=0), jnp.take(y, idx, axis=0))
        return key, sgld.step(k_step, w, batch, step_size)

    step = jax.jit(one)

    @jax.jit
    def scan(key, w, X, y):
        def body(carry, _):
            return one(*carry, X, y), None

        (key, w), _ = jax.lax.scan(body, (key, w), None, length=num_steps)
        return key, w

    state = {"step": (jax.random.key(seed), sgld.init(jnp.zeros(X.shape[1]))),
             "scan": (jax.random.key(seed), sgld.init(jnp.zeros(X.shape[1])))}

    def per_step():
        key, w = state["step"]
        for _ in range(num_steps):
            key, w = step(key, w, Xj, yj)
        w.block_until_ready()
        state["step"] = key, w

    def scanned():
        key, w = scan(*state["scan"], Xj, yj)
        w.block_until_ready()
        state["scan"] = key, w

    return {"blackjax_sgld_step": per_step, "blackjax_sgld_scan": scanned}


def _numpyro_svi_step(X, y, prior_scale, elbo, lr: float, seed: int):
    import jax
    from numpyro.infer import SVI
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.optim import Adam

    args = (to_jax(X), to_jax(y), to_jax(prior_scale))
    svi = SVI(numpyro_logistic_model, AutoNormal(numpyro_logistic_model), Adam(lr), elbo)
    update = jax.jit(svi.update)
    state = {"svi": svi.init(jax.random.key(seed), *args)}

    def step():
        new, loss = update(state["svi"], *args)
        loss.block_until_ready()
        state["svi"] = new

    return step


@_peer(("numpyro_svi",), "jax", "numpyro")
def numpyro_svi_autonormal(X, y, prior_scale, *, lr: float, seed: int = 0):
    """NumPyro ``SVI`` with ``AutoNormal``, ``Trace_ELBO`` (one particle) and Adam: one jitted
    ``svi.update`` per call."""
    from numpyro.infer import Trace_ELBO

    return {"numpyro_svi": _numpyro_svi_step(X, y, prior_scale, Trace_ELBO(), lr, seed)}


@_peer(("numpyro_renyi",), "jax", "numpyro")
def numpyro_svi_iwelbo(X, y, prior_scale, *, num_particles: int, lr: float, seed: int = 0):
    """As :func:`numpyro_svi_autonormal` with ``RenyiELBO(alpha=0, num_particles)`` (the
    IWELBO; particles vectorised)."""
    from numpyro.infer import RenyiELBO

    elbo = RenyiELBO(alpha=0.0, num_particles=num_particles)
    return {"numpyro_renyi": _numpyro_svi_step(X, y, prior_scale, elbo, lr, seed)}


@_peer(("numpyro_steinvi_svgd",), "jax", "numpyro")
def numpyro_svgd(X, y, prior_scale, *, num_particles: int, lr: float, seed: int = 0):
    """NumPyro ``contrib.einstein.SVGD`` (SteinVI with an ``AutoDelta`` guide per particle) with
    ``RBFKernel`` (median bandwidth) and Adam: one jitted ``update`` per call."""
    import jax
    from numpyro.contrib.einstein import SVGD, RBFKernel
    from numpyro.optim import Adam

    args = (to_jax(X), to_jax(y), to_jax(prior_scale))
    svgd = SVGD(numpyro_logistic_model, Adam(lr), RBFKernel(), num_stein_particles=num_particles)
    update = jax.jit(svgd.update)
    state = {"svgd": svgd.init(jax.random.key(seed), *args)}

    def step():
        new, loss = update(state["svgd"], *args)
        loss.block_until_ready()
        state["svgd"] = new

    return {"numpyro_steinvi_svgd": step}


def numpyro_nuts_runner(X, y, prior_scale, *, num_warmup: int, num_samples: int, seed: int = 0):
    """``run() -> draws of w (num_samples, d)`` as a torch tensor: one whole NumPyro NUTS run
    (one chain, dual-averaging step size and diagonal mass adaptation during ``num_warmup``).

    Built on NumPyro's functional ``hmc(potential_fn_gen=..., algo="NUTS")``: warm-up and
    sampling are two ``lax.scan`` s of its ``sample_kernel`` inside one jitted function that takes
    the data as arguments, so it compiles once. (``MCMC.run``, and ``numpyro.util.fori_collect``
    under it, recompile the sampling loop on every call: a fixed cost per run that the harness's
    warm-up could not exclude.) Every run starts from the same initial point (drawn once with
    ``init_to_uniform``) with a fresh key."""
    import jax
    from numpyro.infer.hmc import hmc
    from numpyro.infer.util import initialize_model

    args = (to_jax(X), to_jax(y), to_jax(prior_scale))
    key = jax.random.key(seed)
    key, init_key = jax.random.split(key)
    info = initialize_model(init_key, numpyro_logistic_model, model_args=args, dynamic_args=True)
    init_kernel, sample_kernel = hmc(potential_fn_gen=info.potential_fn, algo="NUTS")

    @jax.jit
    def chain(hmc_state, data):
        def step(s, _):
            s = sample_kernel(s, model_args=data)
            return s, s.z["w"]

        hmc_state, _ = jax.lax.scan(step, hmc_state, None, length=num_warmup)
        return jax.lax.scan(step, hmc_state, None, length=num_samples)[1]

    state = {"key": key}

    def run() -> torch.Tensor:
        state["key"], sub = jax.random.split(state["key"])
        hmc_state = init_kernel(info.param_info, num_warmup, model_args=args, rng_key=sub)
        w = chain(hmc_state, args)
        w.block_until_ready()
        return torch.from_numpy(np.asarray(w).copy())

    return run


@_peer(("numpyro_nuts",), "jax", "numpyro")
def numpyro_nuts(X, y, prior_scale, *, num_warmup: int, num_samples: int,
                 summarise: Callable[[torch.Tensor], dict], seed: int = 0):
    """One whole NumPyro NUTS run per call; ``summarise(draws)`` gives the result dict."""
    run = numpyro_nuts_runner(X, y, prior_scale, num_warmup=num_warmup,
                              num_samples=num_samples, seed=seed)
    return {"numpyro_nuts": lambda: summarise(run())}


# --------------------------------------------------------------------------- discrete mixture


@_peer(("numpyro_renyi",), "jax", "numpyro")
def numpyro_renyi_mixture(x, weight_concentration, loc_prior_loc, loc_prior_scale, obs_scale,
                          *, num_particles: int, seed: int = 0):
    """Gradient of NumPyro's ``RenyiELBO(alpha=0)`` (the IWELBO) with ``num_particles``
    particles on the zoo's ``discrete_mixture`` model and guide, with respect to the guide's
    unconstrained parameters (as Pyro's ``loss_and_grads``); one jitted call.

    NumPyro's ``RenyiELBO`` adds no score-function term for the discrete ``z`` site (it
    differentiates the log-weights only), so it does less work than pyroforge's IWELBO with
    VIMCO baselines, and its gradient for ``z_probs`` is not the IWELBO's gradient."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.distributions import constraints
    from numpyro.distributions.transforms import OrderedTransform, biject_to
    from numpyro.infer import RenyiELBO

    xj = to_jax(x)
    conc0, loc0, scale0, sigma = (to_jax(t) for t in (weight_concentration, loc_prior_loc,
                                                       loc_prior_scale, obs_scale))
    K = loc0.shape[-1]

    def ordered(loc, scale):
        return ndist.TransformedDistribution(ndist.Normal(loc, scale).to_event(1),
                                             OrderedTransform())

    def model(x):
        weights = numpyro.sample("weights", ndist.Dirichlet(conc0))
        locs = numpyro.sample("locs", ordered(loc0, scale0))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", ndist.Categorical(weights))
            numpyro.sample("x", ndist.Normal(locs[z], sigma), obs=x)

    support = {"weights_concentration": constraints.positive, "locs_loc": constraints.real,
               "locs_scale": constraints.positive, "z_probs": constraints.simplex}

    def guide(x):
        conc = numpyro.param("weights_concentration", conc0, constraint=support[
            "weights_concentration"])
        loc = numpyro.param("locs_loc", loc0)
        scale = numpyro.param("locs_scale", 0.5 * scale0, constraint=support["locs_scale"])
        z_probs = numpyro.param("z_probs", jnp.full((x.shape[0], K), 1.0 / K),
                                constraint=support["z_probs"])
        numpyro.sample("weights", ndist.Dirichlet(conc))
        numpyro.sample("locs", ordered(loc, scale))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", ndist.Categorical(z_probs))

    init = {"weights_concentration": conc0, "locs_loc": loc0, "locs_scale": 0.5 * scale0,
            "z_probs": jnp.full((x.shape[0], K), 1.0 / K)}
    unconstrained = {k: biject_to(support[k]).inv(v) for k, v in init.items()}
    elbo = RenyiELBO(alpha=0.0, num_particles=num_particles)

    def loss(params, key, x):
        constrained = {k: biject_to(support[k])(v) for k, v in params.items()}
        return elbo.loss(key, constrained, model, guide, x)

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    state = {"key": jax.random.key(seed)}

    def step():
        state["key"], sub = jax.random.split(state["key"])
        value, grads = value_and_grad(unconstrained, sub, xj)
        jax.block_until_ready(grads)
        return {"loss": float(value)}

    return {"numpyro_renyi": step}


__all__ = [
    "INSTALL_HINT",
    "blackjax_sgld",
    "configure_cpus",
    "disable",
    "enable",
    "numpyro_logistic_model",
    "numpyro_nuts",
    "numpyro_nuts_runner",
    "numpyro_renyi_mixture",
    "numpyro_svgd",
    "numpyro_svi_autonormal",
    "numpyro_svi_iwelbo",
    "to_jax",
    "unavailable",
]
