"""Tests of the shared potential layer ``mcmc.potential``."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from mcmc.potential import Potential, check_finite


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
    x, y = _data(n=60)
    pot = Potential(regression_model, (x, y))
    z = pot.initial_params(1)
    u_full, g_full = pot.value_and_grad(z)
    gen = torch.Generator().manual_seed(3)
    K = 2000
    zs = z.expand(K, -1)  # K copies of one point: each copy gets its own minibatch
    for with_replacement, shared in [(False, False), (True, False), (False, True)]:
        if shared:  # one minibatch per call: loop over calls
            draws = [
                pot.value_and_grad(z, subsample_size=7, generator=gen, shared_minibatch=True)
                for _ in range(300)
            ]
            us = torch.cat([d[0] for d in draws])
            gs = torch.cat([d[1] for d in draws])
        else:
            us, gs = pot.value_and_grad(
                zs, subsample_size=7, generator=gen, with_replacement=with_replacement
            )
        se_g = gs.std(0) / len(gs) ** 0.5
        se_u = us.std(0) / len(us) ** 0.5
        print(f"replacement={with_replacement} shared={shared}: mean grad", gs.mean(0))
        print("  full grad", g_full[0], "SE", se_g, "variance", gs.var(0))
        assert (se_g > 0).all()
        assert ((gs.mean(0) - g_full[0]).abs() <= 4 * se_g).all()
        assert ((us.mean(0) - u_full[0]).abs() <= 4 * se_u).all()


def test_per_chain_minibatches_equal_separate_evaluations():
    x, y = _data(n=40)
    pot = Potential(regression_model, (x, y))
    z = pot.initial_params(5)
    gen = torch.Generator().manual_seed(0)
    for with_replacement in (False, True):
        idx = pot.minibatch_indices(5, 6, generator=gen, with_replacement=with_replacement)
        assert idx["data"].shape == (5, 6)
        assert not (idx["data"] == idx["data"][:1]).all()  # chains get their own rows
        u, g = pot.value_and_grad(z, subsample_size=6, indices=idx)
        for c in range(5):
            one = {"data": idx["data"][c : c + 1]}
            uc, gc = pot.value_and_grad(z[c : c + 1], subsample_size=6, indices=one)
            torch.testing.assert_close(u[c : c + 1], uc)
            torch.testing.assert_close(g[c : c + 1], gc)
            # and equals the hand-computed N / B scaled minibatch potential
            rows = idx["data"][c]
            v = pot.unpack(z[c : c + 1])
            b, s = v["beta"][0], v["sigma"][0]
            lik = dist.Normal(x[rows] @ b, s).log_prob(y[rows]).sum() * 40 / 6
            prior = dist.Normal(0.0, 1.0).log_prob(b).sum() + dist.LogNormal(0.0, 1.0).log_prob(s)
            torch.testing.assert_close(uc[0], -(lik + prior + torch.log(s)))


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
    with pytest.raises(ValueError, match="larger than the data"):
        pot.value_and_grad(z, subsample_size=51)
    with pytest.raises(ValueError, match="subsample_size must be a positive int"):
        pot.value_and_grad(z, subsample_size=0)
    with pytest.raises(ValueError, match=r"z must be a \(num_chains, 3\) tensor"):
        pot(z[0])
    with pytest.raises(ValueError, match="model_kwargs must describe the full data"):
        Potential(regression_model, (x, y), {"subsample_size": 5})
    with pytest.raises(ValueError, match="exclude_sites names unknown"):
        Potential(regression_model, (x, y), exclude_sites=("nope",))

    def discrete_model():
        pyro.sample("k", dist.Bernoulli(0.3), infer={"enumerate": None})
        pyro.sample("m", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'k' is discrete"):
        Potential(discrete_model)

    def no_subsample_model(x, y):
        regression_model(x, y)

    pot2 = Potential(no_subsample_model, (x, y))
    with pytest.raises(TypeError, match="subsample_size"):
        pot2.value_and_grad(z, subsample_size=5)


def test_device_and_dtype_follow_the_data():
    x, y = _data(dtype=torch.float32)
    pot = Potential(regression_model, (x, y))
    z = pot.initial_params(2)
    assert z.dtype == torch.float32 and z.device == x.device
    u, g = pot.value_and_grad(z, subsample_size=10)
    assert u.dtype == g.dtype == torch.float32


@pytest.mark.cuda
def test_cuda():
    x, y = (t.cuda() for t in _data())
    pot = Potential(regression_model, (x, y))
    z = pot.initial_params(3)
    u, g = pot.value_and_grad(z, subsample_size=10)
    assert z.is_cuda and u.is_cuda and g.is_cuda
