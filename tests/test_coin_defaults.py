"""Coin sampling with default settings on posteriors that strand prior-started coin samplers
(issue 14): a log-link Poisson GLM on 2000 rows, a near-collinear, badly scaled linear regression
(Hessian condition number ~8e3), an AR(5) model and non-centred eight schools -- written as a
user writes them (``X @ w``, a data plate indexed by its indices).

References: Pyro NUTS, 4 chains x (1000 warm-up + 2500), float64, full mass matrix (seeds
100..103; split R-hat <= 1.0005, ESS >= 4700), summarised as the mean and sd of every coordinate
of the *unconstrained* latent vector (:class:`mcmc.potential.Potential` order). The checks are
made there: the samplers work in that space, and eight schools' ``tau`` has a tail that even 100
exact draws put past 6 sds in constrained space about one time in seven.

The issue's check: posterior means within 0.2 NUTS sd, sds within 25 %, no particle further than
6 NUTS sd from the NUTS mean, with default settings. (Measured with the defaults, 100 particles
and 300 / 500 / 1500 steps x 3 seeds: all 36 runs pass; with ``precondition=None`` -- the
paper's setting, prior draws -- none does: particles up to ~1000 NUTS sd away, or a NaN gradient
when a prior draw of the Poisson intercept overflows ``exp``.)
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_median
from user_models import collinear_regression_data

from mcmc.coin_ksdd import CoinKSDD
from mcmc.coin_svgd import CoinSVGD
from mcmc.diagnostics import ConvergenceWarning, stuck_particles
from mcmc.laplace import laplace_approximation
from mcmc.potential import Potential

F64 = torch.float64


# ------------------------------------------------------------------ models, as a user writes them
def poisson_glm(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=X.dtype), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 5.0))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Poisson((X[idx] @ w + b).exp()), obs=y[idx])


def regression(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[-1], dtype=X.dtype), 10.0).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Normal(X @ w + b, sigma), obs=y)


def autoregression(lags, y):
    phi = pyro.sample("phi", dist.Normal(torch.zeros(lags.shape[-1], dtype=lags.dtype),
                                         0.5).to_event(1))
    c = pyro.sample("c", dist.Normal(torch.tensor(0.0, dtype=lags.dtype), 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=lags.dtype)))
    with pyro.plate("time", lags.shape[0]):
        pyro.sample("obs", dist.Normal(c + lags @ phi, sigma), obs=y)


def eight_schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=y.dtype)))
    with pyro.plate("schools", y.shape[-1]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(torch.tensor(0.0, dtype=y.dtype),
                                                             1.0))
        pyro.sample("obs", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


# ------------------------------------------------------------------ data (seeded)
def poisson_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 3, generator=g, dtype=F64)
    y = torch.poisson((X @ torch.tensor([0.5, -0.3, 0.2], dtype=F64) + 1.0).exp(), generator=g)
    return X, y


def ar5_data(T=300, p=5):
    g = torch.Generator().manual_seed(2)
    phi = torch.tensor([0.5, 0.2, -0.1, 0.15, 0.1], dtype=F64)
    x = torch.zeros(T + 200 + p, dtype=F64)
    eps = 0.5 * torch.randn(T + 200 + p, generator=g, dtype=F64)
    for t in range(p, x.numel()):
        x[t] = 0.3 + (phi * x[t - p : t].flip(0)).sum() + eps[t]
    x = x[200:]
    lags = torch.stack([x[p - k - 1 : p - k - 1 + T] for k in range(p)], -1)
    return lags, x[p : p + T]


def eight_schools_data():
    return (torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=F64),
            torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=F64))


# NUTS mean and sd of the unconstrained latent vector (see the module docstring).
PROBLEMS = {
    "poisson_glm": (poisson_glm, poisson_data,
                    [0.4615, -0.3155, 0.2053, 1.026],
                    [0.0122, 0.01266, 0.01253, 0.01433]),
    "illcond_regression": (regression, collinear_regression_data,
                           [-0.08703, 0.5646, 1.905, 0.2854, 0.4895, -0.6539],
                           [1.228, 1.228, 0.258, 0.01901, 0.05432, 0.07194]),
    "ar5": (autoregression, ar5_data,
            [0.5379, 0.2084, -0.05145, 0.1406, 0.1009, 0.1233, -0.6907],
            [0.05763, 0.06431, 0.06524, 0.06543, 0.05722, 0.06321, 0.04115]),
    "eight_schools": (eight_schools, eight_schools_data,
                      [4.413, 0.7934, 0.3157, 0.1127, -0.0807, 0.06221, -0.1641, -0.06496,
                       0.3559, 0.07094],
                      [3.335, 1.162, 0.9993, 0.9341, 0.9714, 0.9228, 0.9386, 0.9602, 0.9696,
                       0.9725]),
}


def nuts_check(name, z):
    """(max |mean error| in NUTS sds, sd ratios, farthest particle from the NUTS mean in NUTS
    sds)."""
    _, _, mean, sd = PROBLEMS[name]
    mean, sd = torch.tensor(mean, dtype=F64), torch.tensor(sd, dtype=F64)
    z = z.double()
    err = float(((z.mean(0) - mean).abs() / sd).max())
    ratio = z.std(0) / sd
    far = float(((z - mean).abs() / sd).max())
    return err, ratio, far


# ------------------------------------------------------------------ the check
# Particles and steps chosen so that each case runs in a second or two on one core; measured
# over seeds 0-3 the worst cases were: mean error 0.03 sd (0.17 on eight schools), sd ratios
# 0.91-1.03, farthest particle 4.5 sd.
CASES = {"poisson_glm": (50, 150), "illcond_regression": (50, 250), "ar5": (50, 250),
         "eight_schools": (100, 300)}


@pytest.mark.parametrize("name", list(CASES))
def test_coin_svgd_defaults_agree_with_nuts(name, recwarn):
    model, data, _, _ = PROBLEMS[name]
    num_particles, steps = CASES[name]
    args = data()
    pyro.set_rng_seed(0)
    svgd = CoinSVGD(model, num_particles=num_particles)
    svgd.run(steps, *args, progress=False)
    err, ratio, far = nuts_check(name, svgd.get_particles())
    print(f"{name}: |mean error| <= {err:.3f} sd, sd ratios {[round(float(r), 3) for r in ratio]},"
          f" farthest particle {far:.2f} sd; {svgd.convergence.summary}")
    assert err < 0.2
    assert (ratio - 1).abs().max() < 0.25
    assert far < 6
    # ... and the end-of-run check agrees: no warning, no stuck particle
    assert svgd.convergence.ok and svgd.convergence.stuck_fraction == 0
    assert not [w for w in recwarn if issubclass(w.category, ConvergenceWarning)]


@pytest.mark.parametrize("name", ["poisson_glm", "illcond_regression", "ar5"])
def test_coin_ksdd_defaults_agree_with_nuts(name):
    # Eight schools is left out: KSD descent's fixed points on this non-log-concave posterior
    # shrink log(tau)'s spread to ~0.5-0.8 of NUTS's from any start we tried (Laplace draws,
    # converged SVGD particles, NUTS draws), a known limit of KSD descent (Korba et al. 2021,
    # Sec. 5); its KSD is then no larger than an exact sample's, so no check catches it.
    model, data, _, _ = PROBLEMS[name]
    args = data()
    pyro.set_rng_seed(0)
    ksdd = CoinKSDD(model, num_particles=30)
    ksdd.run(150, *args, progress=False)
    err, ratio, far = nuts_check(name, ksdd.get_particles())
    print(f"{name}: |mean error| <= {err:.3f} sd, sd ratios {[round(float(r), 3) for r in ratio]},"
          f" farthest particle {far:.2f} sd")
    assert err < 0.2
    assert (ratio - 1).abs().max() < 0.25
    assert far < 6
    assert ksdd.convergence.ok


# ------------------------------------------------------------------ the cause, and the diagnostics
def test_prior_start_strands_particles_with_a_stale_betting_scale():
    """The cause, on the Poisson GLM from prior draws (the paper's setting,
    ``precondition=None``): the early coin outcomes are orders of magnitude larger than later
    ones; the bettor keeps the largest, ``L_t``. After 100 steps the particles are stranded
    hundreds of NUTS sds away although each one's score points back towards the posterior (the
    potential is convex): each bettor's outcome is ~1e-3 of its stale scale ``L_t``, so it moves
    a tiny fraction of the way per step. The end-of-run check says so (all particles stranded together: none is an
    outlier of the others, but their KSD is ~1e5 times an exact sample's)."""
    X, y = poisson_data()
    _, _, mean, sd = PROBLEMS["poisson_glm"]
    mean, sd = torch.tensor(mean, dtype=F64), torch.tensor(sd, dtype=F64)
    pyro.set_rng_seed(1)  # (seed 0: a prior draw's intercept overflows exp -> FloatingPointError)
    svgd = CoinSVGD(poisson_glm, num_particles=50, precondition=None)
    with pytest.warns(ConvergenceWarning, match="not \\(yet\\) a sample of the posterior"):
        svgd.run(100, X, y, progress=False)
    z = svgd.get_particles()
    dist_sd = ((z - mean).abs() / sd).max(-1).values
    stranded = dist_sd > 6
    phi = svgd.direction(svgd.potential, z)  # the outcome each bettor sees next
    towards = ((mean - z) * svgd.scores()).sum(-1) > 0
    stale = svgd.optimizer.state[svgd.particles]["max_abs"] / phi.abs().clamp_min(1e-300)
    before = z.clone()
    svgd.run(10, X, y, progress=False, diagnostics=False)
    moved = (svgd.get_particles() - before).norm(dim=-1) / (z - mean).norm(dim=-1)
    print(f"stranded {int(stranded.sum())}/50 (median {float(dist_sd.median()):.0f} NUTS sd), "
          f"score towards the posterior for {int(towards.sum())}, median L_t / |c_t| "
          f"{float(stale.median()):.3g}, median move over 10 steps {float(moved.median()):.2g} "
          f"of the distance; {svgd.convergence.summary}")
    assert stranded.float().mean() > 0.9
    assert towards[stranded].float().mean() > 0.9
    assert stale[stranded].median() > 100
    assert moved[stranded].median() < 0.02
    assert svgd.convergence.ksd > 100 * svgd.convergence.ksd_level


def test_stuck_particle_detector_on_a_stranded_minority():
    """The issue's picture -- most particles at the answer, ~13 % stranded far out (the Poisson
    GLM's intercept: 1.03 +- 0.014, stuck particles at -3.6 ... 2.6) -- is flagged particle by
    particle, and the end-of-run check of a sampler holding such a set warns once, saying what to
    change; an exact sample is not flagged."""
    g = torch.Generator().manual_seed(0)
    _, _, mean, sd = PROBLEMS["poisson_glm"]
    mean, sd = torch.tensor(mean, dtype=F64), torch.tensor(sd, dtype=F64)
    good = mean + sd * torch.randn(87, 4, generator=g, dtype=F64)
    bad = mean + sd * torch.randn(13, 4, generator=g, dtype=F64)
    bad[:, 3] = torch.cat([torch.linspace(-3.6, 0.4, 7, dtype=F64),
                           torch.linspace(1.6, 2.6, 6, dtype=F64)])
    z = torch.cat([good, bad])
    flags = torch.as_tensor(stuck_particles(z))
    assert flags[87:].all() and not flags[:87].any()
    exact = mean + sd * torch.randn(1000, 4, generator=g, dtype=F64)
    assert not stuck_particles(exact).any()

    X, y = poisson_data()
    # a sampler holding that set (an optimizer that does not move it: lr = 0)
    svgd = CoinSVGD(poisson_glm, num_particles=100, initial_particles=z, precondition=None,
                    optim=lambda p: torch.optim.SGD(p, lr=0.0))
    with pytest.warns(ConvergenceWarning) as record:
        svgd.run(1, X, y, progress=False)
    assert len(record) == 1  # one warning per run, however many checks fail
    message = str(record[0].message)
    assert "13% of the particles are stuck" in message and "precondition='laplace'" in message
    assert svgd.convergence.stuck_fraction == pytest.approx(0.13)
    with warnings_as_errors():
        svgd.run(1, X, y, progress=False, diagnostics=False)  # silenced


class warnings_as_errors:
    """Context manager: any warning raised inside is an error."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_whitening_scales_the_first_bet_to_the_posterior():
    """Coin betting's first step is +-1/2 in every coordinate it bets in. In the model's
    coordinates that is 35-40 posterior sds on the Poisson GLM (CoinKSDD, ``precondition=None``);
    with the default Laplace whitening it is about half a posterior sd per whitened coordinate,
    i.e. at most ~sqrt(D)/2 posterior sds in any model coordinate."""
    X, y = poisson_data()
    _, _, _, sd = PROBLEMS["poisson_glm"]
    sd = torch.tensor(sd, dtype=F64)
    pot = Potential(poisson_glm, (X, y))
    lap = laplace_approximation(pot, pot.initial_params(1, init_to_median))
    g = torch.Generator().manual_seed(0)
    z0 = lap.mode + torch.randn(20, 4, generator=g, dtype=F64) @ lap.scale_tril.T
    moves = {}
    for pre in (None, "laplace"):
        k = CoinKSDD(poisson_glm, num_particles=20, initial_particles=z0, precondition=pre)
        k.step(X, y)
        moves[pre] = ((k.get_particles() - z0).abs() / sd).max(0).values
    print({k: [round(float(x), 2) for x in v] for k, v in moves.items()})
    assert (moves[None] > 30).all()
    assert (moves["laplace"] < 0.5 * 4**0.5 + 0.1).all()
