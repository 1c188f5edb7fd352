"""A corpus of Pyro models written the way Pyro's tutorials and examples write them -- none of
them written to suit pyroforge's samplers -- with seeded data and NUTS reference posteriors.

Every sampler in :mod:`mcmc` must run on these models and match Pyro's NUTS on them
(``tests/test_user_models.py``). The styles covered: ``X @ w`` regression, ``PyroModule[nn.Linear]``
Bayesian regression (tutorial "Bayesian Regression"), a ``PyroSample`` two-layer net (tutorial
"Bayesian Neural Networks"), an ``unsqueeze``-broadcasting GLM, eight schools (centred and
non-centred, the latter with ``pyro.deterministic``), a likelihood written with ``pyro.factor``,
positive and simplex sites, nested plates, a plate with ``subsample_size`` in the model (SVI
tutorial style), a model that indexes its data with the plate's indices, ``.expand`` priors, a
flat ``ImproperUniform`` prior (Stan style, needs ``init_to_value`` as in NUTS) and a Laplace
(lasso) prior for the proximal samplers.

NUTS references: ``tests/user_model_references.npz`` holds, for every model, 4 chains x 500 NUTS
draws (300 warm-up steps each, seeds 0-3; the net: 2 x 1000 after 300) of its comparison
quantities (:meth:`UserModel.quantities_of`). Regenerate with::

    python tests/user_models.py            # all models (about 30 minutes on one busy core)
    python tests/user_models.py NAME ...   # some of them
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.infer.autoguide import init_to_value
from pyro.nn import PyroModule, PyroSample
from torch import nn

REFERENCE_FILE = Path(__file__).with_name("user_model_references.npz")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ models
def linreg_matmul(X, y=None):
    """Linear regression written with a matrix product (the first example people write)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, sigma), obs=y)


class BayesianRegression(PyroModule):
    """Pyro's "Bayesian Regression" tutorial model: PyroModule[nn.Linear] with PyroSample
    weights and a Uniform(0, 10) noise scale."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(
            dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


class BNN(PyroModule):
    """Pyro's "Bayesian Neural Networks" tutorial style: a two-layer tanh net with PyroSample
    weights (here 2 hidden units, so that NUTS references stay affordable) and a learned noise
    scale."""

    def __init__(self, in_dim=1, out_dim=1, hid_dim=2, prior_scale=1.0):
        super().__init__()
        self.activation = nn.Tanh()
        self.layer1 = PyroModule[nn.Linear](in_dim, hid_dim)
        self.layer2 = PyroModule[nn.Linear](hid_dim, out_dim)
        self.layer1.weight = PyroSample(
            dist.Normal(0.0, prior_scale).expand([hid_dim, in_dim]).to_event(2))
        self.layer1.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([hid_dim]).to_event(1))
        self.layer2.weight = PyroSample(
            dist.Normal(0.0, prior_scale).expand([out_dim, hid_dim]).to_event(2))
        self.layer2.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([out_dim]).to_event(1))

    def forward(self, x, y=None):
        x = x.reshape(-1, 1)
        mu = self.layer2(self.activation(self.layer1(x))).squeeze(-1)
        sigma = pyro.sample("sigma", dist.LogNormal(-1.0, 0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, sigma), obs=y)
        return mu


def poisson_glm(X, y=None):
    """Poisson GLM broadcasting with unsqueeze (a common way to write batched predictors)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    rate = ((X * w.unsqueeze(-2)).sum(-1) + b.unsqueeze(-1)).exp()
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Poisson(rate), obs=y)


def eight_schools_centered(sigma, y=None):
    """Eight schools, centred (the Pyro/Stan example)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(sigma, y=None):
    """Eight schools, non-centred, with the school effects as a pyro.deterministic site."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[0]):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def logistic_factor(X, y):
    """Logistic regression whose likelihood is a pyro.factor (Stan's `target +=` style)."""
    beta = pyro.sample("beta", dist.Normal(0.0, 2.0).expand([X.shape[1]]).to_event(1))
    pyro.factor("loglik", -F.binary_cross_entropy_with_logits(X @ beta, y, reduction="sum"))


def simplex_and_rate(counts, waits):
    """Category probabilities on the simplex (Dirichlet) and a positive rate (Gamma)."""
    p = pyro.sample("p", dist.Dirichlet(torch.ones(counts.shape[-1])))
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    pyro.sample("counts", dist.Multinomial(int(counts.sum()), p), obs=counts)
    with pyro.plate("waits", waits.shape[0]):
        pyro.sample("wait", dist.Exponential(rate), obs=waits)


def nested_plates(y):
    """Random intercepts: groups (dim -1) with observations nested in them (dim -2)."""
    num_obs, num_groups = y.shape
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("groups", num_groups, dim=-1):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))
        with pyro.plate("obs", num_obs, dim=-2):
            pyro.sample("y", dist.Normal(alpha, 1.0), obs=y)


def logistic_svi_style(X, y):
    """Logistic regression subsampled the way Pyro's SVI tutorials write it: the plate declares
    subsample_size and the model indexes its data with the plate's indices."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", X.shape[0], subsample_size=50) as ind:
        logits = X[ind] @ w + b
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[ind])


def logistic_full_data(X, y):
    """:func:`logistic_svi_style` without subsampling: the same posterior, for NUTS (which
    refuses subsample sites)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)


def linreg_indexed(X, y):
    """Regression that indexes its data with the plate's indices (no subsample_size: the
    sampler decides, e.g. SGLD(model, subsample_size=B))."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("y", dist.Normal(X[idx] @ w + b, sigma), obs=y[idx])


def robust_expand(X, y):
    """Robust (Student-t) regression with .expand priors on several sites."""
    beta = pyro.sample("beta", dist.Normal(0.0, 2.0).expand([X.shape[1]]).to_event(1))
    scale = pyro.sample("scale", dist.LogNormal(torch.zeros(1), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]) as i:
        pyro.sample("y", dist.StudentT(4.0, X[i] @ beta, scale), obs=y[i])


def flat_prior(X, y):
    """Regression with flat (improper) priors, as translated from a Stan program."""
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), (X.shape[1],)))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)


def bayesian_lasso(X, y):
    """Sparse regression with a Laplace prior (the nonsmooth site of the proximal samplers)."""
    beta = pyro.sample("beta", dist.Laplace(0.0, 0.5).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("y", dist.Normal(X[idx] @ beta, 1.0), obs=y[idx])


# ------------------------------------------------------------------------------------ data
def _regression_data(n, w, noise, seed, intercept=0.0):
    g = _gen(seed)
    X = torch.randn(n, len(w), generator=g)
    y = X @ torch.tensor(w) + intercept + noise * torch.randn(n, generator=g)
    return X, y


def collinear_regression_data():
    """Near-collinear, badly scaled columns (float64): Hessian condition number ~8e3 at the mode
    of a flat-prior linear regression; the ill-conditioned case of the defaults tests."""
    g = _gen(1)
    f64 = torch.float64
    x1 = torch.randn(100, generator=g, dtype=f64)
    x2 = x1 + 0.042 * torch.randn(100, generator=g, dtype=f64)
    x3 = 0.2 * torch.randn(100, generator=g, dtype=f64)
    x4 = 3.0 * torch.randn(100, generator=g, dtype=f64)
    X = torch.stack([x1, x2, x3, x4], -1)
    y = X @ torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=f64) + 0.5 \
        + 0.5 * torch.randn(100, generator=g, dtype=f64)
    return X, y


def _bnn_data():
    g = _gen(3)
    x = torch.linspace(-2.0, 2.0, 20)
    y = torch.sin(1.5 * x) + 0.5 * torch.randn(20, generator=g)
    return x, y


def _poisson_data():
    g = _gen(4)
    X = 0.5 * torch.randn(150, 3, generator=g)
    rate = (X @ torch.tensor([0.8, -0.5, 0.3]) + 1.0).exp()
    return X, torch.poisson(rate, generator=g)


def _schools():
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    return sigma, y


def _logistic_data(n, w, seed, intercept=0.0):
    g = _gen(seed)
    X = torch.randn(n, len(w), generator=g)
    p = torch.sigmoid(X @ torch.tensor(w) + intercept)
    return X, torch.bernoulli(p, generator=g)


def _simplex_data():
    g = _gen(6)
    counts = torch.tensor([12.0, 30.0, 8.0, 20.0])
    waits = -torch.log(torch.rand(40, generator=g)) / 1.7  # Exponential(1.7) draws
    return counts, waits


def _nested_data():
    g = _gen(7)
    alpha = torch.tensor([-1.0, 0.5, 1.0, 2.0, 0.0])
    return alpha + torch.randn(6, 5, generator=g)


def _robust_data():
    g = _gen(8)
    X = torch.randn(120, 3, generator=g)
    # Student-t(3) noise: a normal over the square root of a scaled chi-square(3)
    chi2 = (torch.randn(120, 3, generator=g) ** 2).sum(-1)
    noise = 0.5 * torch.randn(120, generator=g) / (chi2 / 3).sqrt()
    return X, X @ torch.tensor([1.0, 0.0, -1.0]) + noise


def _lasso_data():
    g = _gen(9)
    X = torch.randn(80, 6, generator=g)
    return X, X @ torch.tensor([1.5, 0.0, 0.0, -1.0, 0.0, 0.5]) + torch.randn(80, generator=g)


# ------------------------------------------------------------------------------------ corpus
@dataclass
class UserModel:
    """A corpus entry.

    ``quantities(draws)`` maps constrained draws ``{site: (S, *shape)}`` to the ``{name: (S, k)}``
    compared with NUTS (default: every latent site, flattened). ``minibatch``: how the model
    takes minibatches -- ``"declared"`` (its plate fixes ``subsample_size``), an int ``B`` to pass
    as ``subsample_size=B`` (it indexes its data with the plate's indices), or ``None``.
    ``nonsmooth``: ``{site: L1 weight}`` for the proximal samplers. ``reference_model``: a model
    with the same posterior whose NUTS run is the reference (for a funnel NUTS cannot sample
    well in this parametrisation).
    """

    name: str
    model: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)
    init_strategy: Callable | None = None
    minibatch: str | int | None = None
    nonsmooth: dict | None = None
    quantities: Callable | None = None
    reference_model: Callable | None = None
    reference_transform: Callable | None = None
    shards: list | None = None
    nuts_options: dict = field(default_factory=dict)
    description: str = ""

    def quantities_of(self, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.quantities is not None:
            return {k: v.reshape(v.shape[0], -1) for k, v in self.quantities(draws).items()}
        return {k: v.reshape(v.shape[0], -1) for k, v in draws.items()}


def _bnn_quantities(bnn, x_star):
    def quantities(draws):
        f = []
        for s in range(draws["sigma"].shape[0]):
            w1 = draws["layer1.weight"][s]
            b1 = draws["layer1.bias"][s]
            w2 = draws["layer2.weight"][s]
            b2 = draws["layer2.bias"][s]
            f.append((torch.tanh(x_star[:, None] @ w1.T + b1) @ w2.T + b2).squeeze(-1))
        return {"f": torch.stack(f), "sigma": draws["sigma"]}

    return quantities


def _centered_from_noncentered(draws):
    return {"mu": draws["mu"], "tau": draws["tau"],
            "theta": draws["mu"][:, None] + draws["tau"][:, None] * draws["eta"]}


def build_corpus() -> dict[str, UserModel]:
    """Every corpus model with its data (seeded: the same every call)."""
    corpus = {}

    def add(m: UserModel):
        corpus[m.name] = m

    X, y = _regression_data(100, [1.0, -2.0, 0.5], 0.5, 1)
    add(UserModel("linreg_matmul", linreg_matmul, (X, y),
                  shards=[((X[i::4], y[i::4]), {}) for i in range(4)],
                  description="X @ w regression (does not broadcast over a chain dim)"))
    X, y = _regression_data(60, [2.0, -1.0], 1.0, 2, intercept=1.0)
    torch.manual_seed(0)
    add(UserModel("pyromodule_regression", BayesianRegression(2, 1), (X, y),
                  description="PyroModule[nn.Linear] with PyroSample weights (tutorial)"))
    x, y = _bnn_data()
    bnn = BNN()
    add(UserModel("pyrosample_bnn", bnn, (x, y),
                  quantities=_bnn_quantities(bnn, torch.tensor([-1.5, 0.0, 1.5])),
                  nuts_options={"num_chains": 2, "num_samples": 1000, "warmup_steps": 300},
                  description="two-layer PyroSample tanh net; compared on the predictive mean "
                              "at x* = -1.5, 0, 1.5 and the noise scale (the weights are "
                              "identified only up to the net's symmetries)"))
    X, y = _poisson_data()
    add(UserModel("poisson_glm_unsqueeze", poisson_glm, (X, y),
                  description="w.unsqueeze(-2) / b.unsqueeze(-1) broadcasting"))
    sigma, y = _schools()
    add(UserModel("eight_schools_centered", eight_schools_centered, (sigma, y),
                  reference_model=eight_schools_noncentered,
                  reference_transform=_centered_from_noncentered,
                  description="centred eight schools; reference: NUTS on the non-centred model "
                              "(the same posterior), mapped to (mu, tau, theta)"))
    add(UserModel("eight_schools_noncentered", eight_schools_noncentered, (sigma, y),
                  description="non-centred eight schools with pyro.deterministic"))
    X, y = _logistic_data(100, [1.0, -1.0, 0.5], 10)
    add(UserModel("logistic_factor", logistic_factor, (X, y),
                  description="likelihood as a pyro.factor"))
    counts, waits = _simplex_data()
    add(UserModel("simplex_and_rate", simplex_and_rate, (counts, waits),
                  description="Dirichlet (simplex) and Gamma (positive) sites"))
    add(UserModel("nested_plates", nested_plates, (_nested_data(),),
                  description="random intercepts, plates at dims -1 and -2"))
    X, y = _logistic_data(500, [1.0, -0.5, 0.25], 11, intercept=-0.5)
    add(UserModel("logistic_svi_style", logistic_svi_style, (X, y), minibatch="declared",
                  reference_model=logistic_full_data,
                  description="plate(..., subsample_size=50) in the model (SVI tutorial style); "
                              "reference: NUTS on the same model without subsampling"))
    X, y = _regression_data(200, [0.5, -1.0, 2.0], 1.0, 12, intercept=1.0)
    add(UserModel("linreg_indexed", linreg_indexed, (X, y), minibatch=40,
                  description="indexes its data with the plate's indices"))
    X, y = _robust_data()
    add(UserModel("robust_expand", robust_expand, (X, y), minibatch=40,
                  description="Student-t regression with .expand priors"))
    X, y = _regression_data(80, [1.0, 2.0], 1.0, 13)
    add(UserModel("flat_prior", flat_prior, (X, y),
                  init_strategy=init_to_value(values={"beta": torch.zeros(2),
                                                      "sigma": torch.tensor(1.0)}),
                  nuts_options={"max_plate_nesting": 1},  # NUTS needs it (it cannot sample)
                  description="ImproperUniform priors (Stan style) with init_to_value"))
    X, y = _lasso_data()
    add(UserModel("bayesian_lasso", bayesian_lasso, (X, y), minibatch=40,
                  nonsmooth={"beta": 2.0},
                  description="Laplace(0, 0.5) prior: L1(2) for MYULA / BMUMLA"))
    return corpus


# ------------------------------------------------------------------------------------ references
def nuts_draws(model, args, kwargs=None, *, init_strategy=None, num_chains=4, num_samples=500,
               warmup_steps=300, seed=0, max_plate_nesting=None) -> dict[str, torch.Tensor]:
    """``{site: (num_chains * num_samples, *shape)}`` NUTS draws (chains run one after another)."""
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide import init_to_median

    out = []
    for c in range(num_chains):
        pyro.set_rng_seed(seed + c)
        kernel = NUTS(model, init_strategy=init_strategy or init_to_median,
                      target_accept_prob=0.9, max_plate_nesting=max_plate_nesting)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                    disable_progbar=True)
        mcmc.run(*args, **(kwargs or {}))
        out.append({k: v.detach() for k, v in mcmc.get_samples().items()})
    return {k: torch.cat([o[k] for o in out]) for k in out[0]}


def make_reference(m: UserModel) -> dict[str, torch.Tensor]:
    """The model's comparison quantities from NUTS draws, plus (as ``"sites/<site>"``) the raw
    latent draws when the quantities are functionals of them (starting points for chains)."""
    model = m.reference_model or m.model
    draws = nuts_draws(model, m.args, m.kwargs, init_strategy=m.init_strategy, **m.nuts_options)
    if m.reference_transform is not None:
        draws = m.reference_transform(draws)
    out = m.quantities_of(draws)
    if m.quantities is not None:
        out.update({f"sites/{k}": v for k, v in draws.items()})
    return out


def load_references() -> dict[str, dict[str, torch.Tensor]]:
    """``{model: {quantity: (S, k) NUTS draws}}`` from :data:`REFERENCE_FILE` (a missing file is
    an error: regenerate it with ``python tests/user_models.py``). Raw latent draws of models
    compared on functionals sit under ``"sites/<site>"`` with their own shapes."""
    import numpy as np

    if not REFERENCE_FILE.exists():
        raise FileNotFoundError(f"{REFERENCE_FILE} is missing; run `python tests/user_models.py`")
    refs: dict[str, dict[str, torch.Tensor]] = {}
    with np.load(REFERENCE_FILE) as f:
        for key in f.files:
            model, q = key.split("/", 1)
            refs.setdefault(model, {})[q] = torch.from_numpy(f[key])
    return refs


def main(names: list[str]) -> None:
    import time

    import numpy as np

    torch.set_num_threads(1)
    corpus = build_corpus()
    arrays = {}
    if REFERENCE_FILE.exists():
        with np.load(REFERENCE_FILE) as f:
            arrays = {k: f[k] for k in f.files}
    for name in names or list(corpus):
        t0 = time.time()
        ref = make_reference(corpus[name])
        arrays = {k: v for k, v in arrays.items() if not k.startswith(name + "/")}
        for q, v in ref.items():
            arrays[f"{name}/{q}"] = v.numpy().astype("float32")
        summary = {q: (v.mean(0).flatten()[:3].tolist(), v.std(0).flatten()[:3].tolist())
                   for q, v in ref.items() if not q.startswith("sites/")}
        print(f"{name}: {time.time() - t0:.0f} s; mean/sd (first 3): {summary}", flush=True)
        np.savez_compressed(REFERENCE_FILE, **arrays)  # after every model: partial runs count
    print(f"wrote {REFERENCE_FILE}")


if __name__ == "__main__":
    main(sys.argv[1:])

