"""Tests of the shared potential layer ``mcmc.potential``."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import init_to_value

from mcmc.potential import Potential, check_finite, draw_rows


def regression_model(x, y, subsample_size=None):
    zero = x.new_zeros(())
    beta = pyro.sample("beta", dist.Normal(zero, 1.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(zero, 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        mean = (x[idx] * beta).sum(-1)
        pyro.sample("y", dist.Normal(mean, sigma), obs=y[idx])


def simplex_model(counts):
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3, dtype=counts.dtype)))
    pyro.sample("obs", dist.Multinomial(int(counts.sum()), w), obs=counts)


def _data(n=50, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    y = x @ torch.tensor([1.0, -1.0], dtype=dtype) + 0.5 * torch.randn(n, generator=g, dtype=dtype)
    return x, y


def _manual_potential(x, y, beta, sigma):
    """-log p(y, beta, sigma) - log|d sigma / d log sigma| for one chain."""
    lj = (
        dist.Normal(0.0, 1.0).log_prob(beta).sum()
        + dist.LogNormal(0.0, 1.0).log_prob(sigma)
        + dist.Normal(x @ beta, sigma).log_prob(y).sum()
        + torch.log(sigma)  # log|det J| of exp
    )
    return -lj


def test_value_matches_manual_log_joint():
    x, y = _data()
    pot = Potential(regression_model, (x, y))
    assert pot.dim == 3 and pot.max_plate_nesting == 1
    assert pot.site_slices == {"beta": slice(0, 2), "sigma": slice(2, 3)}
    z = pot.initial_params(6)
    assert z.shape == (6, 3) and z.dtype == torch.float64
    vals = pot.unpack(z)
    expected = torch.stack(
        [_manual_potential(x, y, vals["beta"][c], vals["sigma"][c]) for c in range(6)]
    )
    torch.testing.assert_close(pot(z), expected)
    torch.testing.assert_close(pot.pack(vals), z)
    # different chains start at different points
    assert torch.unique(z[:, 0]).numel() == 6


def test_gradient_matches_finite_differences():
    x, y = _data()
    pot = Potential(regression_model, (x, y))
    z = pot.initial_params(3)
    _, g = pot.value_and_grad(z)
    eps = 1e-6
    fd = torch.zeros_like(z)
    for d in range(pot.dim):
        e = torch.zeros_like(z)
        e[:, d] = eps
        fd[:, d] = (pot(z + e) - pot(z - e)) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-6)


def test_vectorised_equals_looped():
    x, y = _data()
    pot = Potential(regression_model, (x, y))
    z = pot.initial_params(5)
    u, g = pot.value_and_grad(z)
    for c in range(5):
        uc, gc = pot.value_and_grad(z[c : c + 1])
        torch.testing.assert_close(u[c : c + 1], uc)
        torch.testing.assert_close(g[c : c + 1], gc)


def test_minibatch_gradient_unbiased():
    """Pyro's N / B plate scaling makes U_B and its gradient unbiased, for every row-drawing
    mode (own rows per chain without/with replacement, one minibatch shared by all chains)."""
    x, y = _data(n=60)
    pot = Potential(regression_model, (x, y), subsample_size=7)
    z = pot.initial_params(1)
    u_full, g_full = pot.value_and_grad(z)
    gen = torch.Generator().manual_seed(3)
    K = 2000
    zs = z.expand(K, -1)  # K copies of one point: each copy gets its own minibatch
    for with_replacement, shared in [(False, False), (True, False), (False, True)]:
        if shared:  # one minibatch per call: loop over calls
            draws = [pot.value_and_grad(z, pot.draw_indices(1, gen, shared=True))
                     for _ in range(300)]
            us = torch.cat([d[0] for d in draws])
            gs = torch.cat([d[1] for d in draws])
        else:
            idx = pot.draw_indices(K, gen, with_replacement=with_replacement)
            us, gs = pot.value_and_grad(zs, idx)
        se_g = gs.std(0) / len(gs) ** 0.5
        se_u = us.std(0) / len(us) ** 0.5
        print(f"replacement={with_replacement} shared={shared}: mean grad", gs.mean(0))
        print("  full grad", g_full[0], "SE", se_g, "variance", gs.var(0))
        assert (se_g > 0).all()
        assert ((gs.mean(0) - g_full[0]).abs() <= 4 * se_g).all()
        assert ((us.mean(0) - u_full[0]).abs() <= 4 * se_u).all()


def test_per_chain_minibatches_equal_separate_evaluations():
    x, y = _data(n=40)
    pot = Potential(regression_model, (x, y), subsample_size=6)
    z = pot.initial_params(5)
    gen = torch.Generator().manual_seed(0)
    for with_replacement in (False, True):
        idx = pot.draw_indices(5, gen, with_replacement=with_replacement)
        assert idx["data"].shape == (5, 6)
        assert not (idx["data"] == idx["data"][:1]).all()  # chains get their own rows
        u, g = pot.value_and_grad(z, idx)
        for c in range(5):
            one = {"data": idx["data"][c : c + 1]}
            uc, gc = pot.value_and_grad(z[c : c + 1], one)
            torch.testing.assert_close(u[c : c + 1], uc)
            torch.testing.assert_close(g[c : c + 1], gc)
            # and equals the hand-computed N / B scaled minibatch potential
            rows = idx["data"][c]
            v = pot.unpack(z[c : c + 1])
            b, s = v["beta"][0], v["sigma"][0]
            lik = dist.Normal(x[rows] @ b, s).log_prob(y[rows]).sum() * 40 / 6
            prior = dist.Normal(0.0, 1.0).log_prob(b).sum() + dist.LogNormal(0.0, 1.0).log_prob(s)
            torch.testing.assert_close(uc[0], -(lik + prior + torch.log(s)))


def test_draw_rows_without_replacement_is_uniform_over_subsets():
    """Rows within a minibatch are distinct, every row is equally likely (marginal B / N), and
    pairs are as likely as under uniform subsets (B(B-1) / (N(N-1)))."""
    N, B, R = 12, 5, 20000
    gen = torch.Generator().manual_seed(0)
    for dense in (False, True):
        n = N if not dense else 6  # 4 B > N: the sort-based branch
        b = B if not dense else 4
        idx = draw_rows(n, b, R, generator=gen)
        assert idx.shape == (R, b)
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct within each row
        counts = torch.zeros(n).index_add_(0, idx.flatten(), torch.ones(idx.numel()))
        p = b / n
        se = (R * p * (1 - p)) ** 0.5
        print("inclusion counts", counts.tolist(), "expected", R * p, "SE", se)
        assert ((counts - R * p).abs() < 4.5 * se).all()
        pair = ((idx == 0).any(-1) & (idx == 1).any(-1)).double().mean()
        p2 = b * (b - 1) / (n * (n - 1))
        assert abs(float(pair) - p2) < 4.5 * (p2 * (1 - p2) / R) ** 0.5
    wr = draw_rows(N, B, 7, generator=gen, with_replacement=True)
    assert wr.shape == (7, B) and wr.min() >= 0 and wr.max() < N


def test_constrained_simplex_site_round_trip():
    counts = torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64)
    pot = Potential(simplex_model, (counts,))
    assert pot.dim == 2  # stick-breaking: K - 1 unconstrained coordinates
    z = pot.initial_params(4)
    w = pot.unpack(z)["w"]
    assert w.shape == (4, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(pot.pack({"w": w}), z)
    # U = -log Dir(w) - log Mult(counts | w) - log|det J|
    t = torch.distributions.biject_to(dist.Dirichlet(torch.ones(3)).support)
    u = pot.unpack_unconstrained(z)["w"]
    expected = -(
        dist.Dirichlet(torch.ones(3, dtype=torch.float64)).log_prob(w)
        + dist.Multinomial(10, w).log_prob(counts)
        + t.log_abs_det_jacobian(u, w)
    )
    torch.testing.assert_close(pot(z), expected)


def test_log_density_at_constrained_values_has_no_jacobian():
    """``log_density`` (used by CoinMSVGD) is the log joint at constrained values: ``-U`` plus
    the log|det J| of the unconstrained transform, and it is differentiable in the values."""
    counts = torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64)
    pot = Potential(simplex_model, (counts,))
    z = pot.initial_params(4)
    w = pot.unpack(z)["w"].requires_grad_(True)
    t = torch.distributions.biject_to(dist.Dirichlet(torch.ones(3)).support)
    ladj = t.log_abs_det_jacobian(pot.unpack_unconstrained(z)["w"], w.detach())
    lp = pot.log_density({"w": w})
    torch.testing.assert_close(lp.detach(), -pot(z) - ladj)
    (g,) = torch.autograd.grad(lp.sum(), w)
    # d/dw of the Multinomial log-likelihood (flat Dirichlet); torch normalises the probs,
    # log(w_k / sum w), hence the -n / sum(w) = -10 term
    expected = counts / w.detach() - counts.sum()
    torch.testing.assert_close(g, expected)
    with pytest.raises(ValueError, match="log_density: site 'w' has shape"):
        pot.log_density({"w": w.detach()[:, :2]})


def test_exclude_sites_drops_the_prior_term():
    x, y = _data()
    pot = Potential(regression_model, (x, y))
    pot_ex = Potential(regression_model, (x, y), exclude_sites=("beta",))
    z = pot.initial_params(3)
    beta = pot.unpack(z)["beta"]
    torch.testing.assert_close(pot_ex(z) - pot(z), dist.Normal(0.0, 1.0).log_prob(beta).sum(-1))


def test_check_finite_names_iteration_and_site():
    x, y = _data()
    pot = Potential(regression_model, (x, y))
    g = torch.zeros(4, 3)
    check_finite("gradient", g, 3, site_names=pot.site_slices)  # no error
    g[2, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"iteration 17.*chain\(s\) \[2\].*sigma"):
        check_finite("gradient", g, 17, site_names=pot.site_slices)
    g[2, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="inf"):
        check_finite("gradient", g, 1, site_names=["a", "b", "c"])


def test_bad_input():
    x, y = _data()
    pot = Potential(regression_model, (x, y))
    z = pot.initial_params(2)
    with pytest.raises(ValueError, match=r"subsample_size=51\) is larger than the 50 rows of plate "
                       "'data'"):
        Potential(regression_model, (x, y), subsample_size=51)
    with pytest.raises(ValueError, match=r"subsample_size=\.\.\.\) must be a positive int or "
                       r"\{plate: positive int\}, got 0 for plate 'data'"):
        Potential(regression_model, (x, y), subsample_size={"data": 0})
    with pytest.raises(ValueError, match="the model has no plate 'rows'"):
        Potential(regression_model, (x, y), subsample_size={"rows": 5})
    with pytest.raises(ValueError, match=r"z must be a \(num_chains, 3\) tensor"):
        pot(z[0])
    with pytest.raises(ValueError, match="exclude_sites names unknown"):
        Potential(regression_model, (x, y), exclude_sites=("nope",))
    with pytest.raises(ValueError, match=r"indices must name the subsampled plates \[\]"):
        pot(z, {"data": torch.zeros(2, 3, dtype=torch.long)})

    def discrete_model():
        pyro.sample("k", dist.Bernoulli(0.3), infer={"enumerate": None})
        pyro.sample("m", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'k' is discrete"):
        Potential(discrete_model)

    def ignores_the_indices(x, y):  # minibatches need obs=y[idx]: a clear error says so
        beta = pyro.sample("beta", dist.Normal(x.new_zeros(()), 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ beta, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"Potential\(\.\.\., subsample_size=\{'data': 5\}\): "
                       r"evaluating model 'ignores_the_indices' on a minibatch failed.*must index "
                       r"its data with the plate's indices"):
        Potential(ignores_the_indices, (x, y), subsample_size=5)

    def local_latents(x, y):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]) as idx:
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(u, 1.0), obs=y[idx])

    with pytest.raises(ValueError, match="model 'local_latents' has no data plate"):
        Potential(local_latents, (x, y), subsample_size=5)
    with pytest.raises(ValueError, match="latent site 'u' lies inside the subsampled plate 'data'"):
        Potential(local_latents, (x, y), subsample_size={"data": 5})

    def two_data_plates(x, y):
        beta = pyro.sample("beta", dist.Normal(x.new_zeros(()), 1.0).expand([2]).to_event(1))
        with pyro.plate("a", x.shape[0]) as i:
            pyro.sample("ya", dist.Normal(x[i] @ beta, 1.0), obs=y[i])
        with pyro.plate("b", 10) as j:
            pyro.sample("yb", dist.Normal(x[j] @ beta, 1.0), obs=y[j])

    with pytest.raises(ValueError, match=r"ambiguous: the model has several data plates "
                       r"\['a', 'b'\]; pass subsample_size=\{plate: size\}"):
        Potential(two_data_plates, (x, y), subsample_size=5)
    pot2 = Potential(two_data_plates, (x, y), subsample_size={"a": 5})
    assert list(pot2.minibatch_plates) == ["a"]

    def no_keyword(x, y):
        regression_model(x, y)

    # a subsample_size model argument for a model without that keyword: say what to do instead
    with pytest.raises(TypeError, match=r"does not take a subsample_size keyword.*ask the "
                       r"sampler for minibatches instead: Potential\(model, subsample_size=B\)"):
        Potential(no_keyword, (x, y), {"subsample_size": 5})


def test_plate_declared_in_the_model_and_the_zoo_keyword():
    """A model whose plate fixes subsample_size (Pyro's SVI style): the potential draws that
    plate's rows; without indices it is the full-data potential (minibatch-sized chunks covering
    every row once). The zoo's `subsample_size` keyword passed as a model kwarg is the same."""
    x, y = _data(n=50)

    def declared(x, y):
        beta = pyro.sample("beta", dist.Normal(x.new_zeros(()), 1.0).expand([2]).to_event(1))
        sigma = pyro.sample("sigma", dist.LogNormal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0], subsample_size=8) as idx:  # 50 = 6 * 8 + 2
            pyro.sample("y", dist.Normal(x[idx] @ beta, sigma), obs=y[idx])

    full = Potential(regression_model, (x, y))
    for pot in (Potential(declared, (x, y)),
                Potential(regression_model, (x, y), {"subsample_size": 8})):
        assert pot.minibatch_plates["data"].subsample_size == 8
        assert pot.minibatch_plates["data"].declared
        z = full.initial_params(3)
        u, g = pot.value_and_grad(z)
        uf, gf = full.value_and_grad(z)
        torch.testing.assert_close(u, uf)
        torch.testing.assert_close(g, gf)
        gen = torch.Generator().manual_seed(0)
        idx = pot.draw_indices(4000, gen)
        us, gs = pot.value_and_grad(z[:1].expand(4000, -1), idx)
        se = gs.std(0) / 4000**0.5
        assert ((gs.mean(0) - gf[0]).abs() < 4 * se).all()
        assert abs(float(us.mean() - uf[0])) < 4 * float(us.std() / 4000**0.5)
    with pytest.raises(ValueError, match=r"declares subsample_size=8 in the model, but "
                       r"Potential\(\.\.\., subsample_size=5\)"):
        Potential(declared, (x, y), subsample_size=5)


def test_single_chain_runs_the_model_as_nuts_does():
    """One chain: no chain plate, latents at their own shape -- models written with `X @ w`
    (which do not broadcast over an extra batch dim) work; the potential equals the manual log
    joint and Pyro's own NUTS potential."""
    x, y = _data()

    def matmul_model(x, y):
        th = pyro.sample("th", dist.Normal(x.new_zeros(()), 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ th, 1.0), obs=y)

    pot = Potential(matmul_model, (x, y))
    z = pot.initial_params(1)
    th = pot.unpack(z)["th"][0]
    expected = -(dist.Normal(0.0, 1.0).log_prob(th).sum() + dist.Normal(x @ th, 1.0).log_prob(y).sum())
    torch.testing.assert_close(pot(z)[0], expected)
    _, pe_fn, _, _ = pyro.infer.mcmc.util.initialize_model(matmul_model, (x, y))
    torch.testing.assert_close(pot(z)[0], pe_fn({"th": th}))


@pytest.mark.parametrize("mode", ["plate", "vmap", "loop"])
def test_vectorisation_paths_agree(mode):
    """The chain plate, torch.func.vmap and the loop give the same potential and gradient, on
    the full data and on per-chain or shared minibatches."""
    x, y = _data()
    ref = Potential(regression_model, (x, y), subsample_size=9, vectorize="loop")
    pot = Potential(regression_model, (x, y), subsample_size=9, vectorize=mode)
    z = ref.initial_params(6)
    gen = torch.Generator().manual_seed(0)
    for idx in (None, ref.draw_indices(6, gen), ref.draw_indices(6, gen, shared=True)):
        u0, g0 = ref.value_and_grad(z, idx)
        u1, g1 = pot.value_and_grad(z, idx)
        torch.testing.assert_close(u1, u0)
        torch.testing.assert_close(g1, g0)


def test_the_vectorisation_is_chosen_by_checking_and_logged(caplog):
    """A model that broadcasts runs under the chain plate; `X @ w` falls back to vmap; Python
    control flow on tensor values falls back to a loop (with a warning) -- each logged once
    with the reason."""
    import logging

    x, y = _data()

    def matmul_model(x, y):
        th = pyro.sample("th", dist.Normal(x.new_zeros(()), 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ th, 1.0), obs=y)

    def branching_model(x, y):
        th = pyro.sample("th", dist.Normal(x.new_zeros(()), 1.0).expand([2]).to_event(1))
        scale = 1.0 if float(th.abs().sum()) < 100 else 2.0  # data-dependent Python control flow
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ th, scale), obs=y)

    with caplog.at_level(logging.INFO, logger="mcmc.potential"):
        modes = {}
        for model in (regression_model, matmul_model, branching_model):
            pot = Potential(model, (x, y))
            z = pot.initial_params(4)
            u, g = pot.value_and_grad(z)
            pot.value_and_grad(z)
            modes[model.__name__] = pot.vectorization()
            for c in range(4):  # whatever the path, the chains are evaluated correctly
                uc, gc = pot.value_and_grad(z[c : c + 1])
                torch.testing.assert_close(u[c : c + 1], uc)
                torch.testing.assert_close(g[c : c + 1], gc)
    assert modes == {"regression_model": "plate", "matmul_model": "vmap",
                     "branching_model": "loop"}
    msgs = [r.getMessage() for r in caplog.records if r.name == "mcmc.potential"]
    print("\n".join(msgs))
    assert sum("'matmul_model'" in m for m in msgs) == 1
    assert any("'matmul_model': chains are evaluated with 'vmap': the model does not broadcast"
               in m for m in msgs)
    loop = [r for r in caplog.records
            if "'branching_model': chains are evaluated" in r.getMessage()]
    assert len(loop) == 1 and loop[0].levelname == "WARNING" and "vmap failed too" in \
        loop[0].getMessage()
    # forcing a path the model cannot take is a clear error, not a wrong answer
    pot = Potential(matmul_model, (x, y), vectorize="plate")
    with pytest.raises(ValueError, match=r"vectorize='plate'\): model 'matmul_model' cannot be "
                       r"evaluated that way.*use vectorize='auto'"):
        pot(pot.initial_params(1).expand(3, -1))


def test_flat_improper_prior_with_init_to_value():
    """ImproperUniform (Stan-style flat) priors: the first trace takes its values from the init
    strategy, as NUTS does; without one, the error says what to pass."""
    x, y = _data()

    def flat(x, y):
        beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), (2,)))
        sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ beta, sigma), obs=y)

    with pytest.raises(ValueError, match=r"cannot be sampled.*init_strategy=init_to_value"):
        Potential(flat, (x, y))
    init = init_to_value(values={"beta": torch.zeros(2, dtype=x.dtype),
                                 "sigma": torch.tensor(1.0, dtype=x.dtype)})
    pot = Potential(flat, (x, y), init_strategy=init)
    z = pot.initial_params(3)
    v = pot.unpack(z[:1])
    b, s = v["beta"][0], v["sigma"][0]
    torch.testing.assert_close(pot(z[:1])[0], -(dist.Normal(x @ b, s).log_prob(y).sum()
                                                + torch.log(s)))


def test_nan_in_the_data_names_the_site():
    x, y = _data()
    y = y.clone()
    y[7] = float("nan")
    with pytest.raises(ValueError, match=r"could not find finite initial parameters.*site\(s\) "
                       r"\['y'\] is NaN/inf.*observed values"):
        Potential(regression_model, (x, y)).initial_params(3)


def test_zero_gradient_when_the_potential_ignores_a_site():
    """Every term excluded (a prior handled elsewhere, no likelihood): U is constant, and its
    gradient is zero instead of an autograd error."""

    def prior_only():
        pyro.sample("b", dist.Laplace(torch.zeros(3), 1.0).to_event(1))

    pot = Potential(prior_only, exclude_sites=("b",))
    z = pot.initial_params(2)
    u, g = pot.value_and_grad(z)
    assert (u == 0).all() and (g == 0).all() and g.shape == (2, 3)


def test_device_and_dtype_follow_the_data():
    x, y = _data(dtype=torch.float32)
    pot = Potential(regression_model, (x, y))
    z = pot.initial_params(2)
    assert z.dtype == torch.float32 and z.device == x.device
    pot = Potential(regression_model, (x, y), subsample_size=10)
    u, g = pot.value_and_grad(z, pot.draw_indices(2))
    assert u.dtype == g.dtype == torch.float32


@pytest.mark.cuda
def test_cuda():
    x, y = (t.cuda() for t in _data())
    pot = Potential(regression_model, (x, y), subsample_size=10)
    z = pot.initial_params(3)
    u, g = pot.value_and_grad(z, pot.draw_indices(3, torch.Generator(device="cuda")))
    assert z.is_cuda and u.is_cuda and g.is_cuda
