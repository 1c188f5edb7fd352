"""Mirror maps: grad/inverse round trip, gradients and Hessians vs autograd, conjugates,
noise factor, Bregman divergences, domain checks."""

import pytest
import torch

from mcmc.mirror import (
    BoltzmannShannon,
    Burg,
    Euclidean,
    FermiDirac,
    Hypentropy,
    SimplexEntropy,
    fast_asinh,
)

D = 4


def _point(m, n=6):
    g = torch.Generator().manual_seed(1)
    if isinstance(m, SimplexEntropy):
        p = torch.distributions.Dirichlet(torch.ones(D + 1, dtype=torch.float64)).sample((n,))
        return p[:, :-1]
    if isinstance(m, FermiDirac):
        return torch.rand(n, D, generator=g, dtype=torch.float64) * 2.9 - 0.95
    if isinstance(m, (BoltzmannShannon, Burg)):
        return torch.rand(n, D, generator=g, dtype=torch.float64) * 3 + 0.05
    return torch.randn(n, D, generator=g, dtype=torch.float64) * 2


MAPS = [
    Euclidean(),
    Euclidean(torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)),
    Hypentropy(0.3),
    Hypentropy(torch.tensor([0.1, 1.0, 3.0, 10.0], dtype=torch.float64)),
    BoltzmannShannon(),
    Burg(),
    FermiDirac(-1.0, torch.tensor([2.0, 2.5, 3.0, 4.0], dtype=torch.float64)),
    SimplexEntropy(),
]


@pytest.mark.parametrize("m", MAPS, ids=repr)
def test_round_trip_and_derivatives(m):
    x = _point(m)
    assert bool(m.contains(x).all())
    y = m.grad_phi(x)
    assert bool(m.dual_contains(y).all())
    torch.testing.assert_close(m.grad_phi_conj(y), x, rtol=1e-10, atol=1e-12)
    # the other way round, from random dual points
    y2 = torch.randn(5, D, dtype=torch.float64)
    if isinstance(m, Burg):
        y2 = -y2.abs() - 0.1
    torch.testing.assert_close(m.grad_phi(m.grad_phi_conj(y2)), y2, rtol=1e-9, atol=1e-9)
    # grad phi = autograd of phi; Hessian = jacobian of grad phi
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.phi(xr).sum(), xr)
    torch.testing.assert_close(g, y)
    H = torch.stack([torch.autograd.functional.jacobian(m.grad_phi, xi) for xi in x])
    torch.testing.assert_close(m.hessian(x), H)
    # conjugate: phi^*(grad phi(x)) = <x, grad phi(x)> - phi(x) (Fenchel-Young equality)
    torch.testing.assert_close(m.phi_conj(y), (x * y).sum(-1) - m.phi(x))
    # noise factor A A^T = Hess, and its matvec
    A = m.hessian_sqrt(x)
    A = torch.diag_embed(A) if m.diagonal_hessian else A
    torch.testing.assert_close(A @ A.transpose(-1, -2), H)
    z = torch.randn_like(x)
    torch.testing.assert_close(m.hessian_sqrt_matvec(x, z), (A @ z.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(m.hessian_matvec(x, z), (H @ z.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(m.inverse_hessian_matvec(x, m.hessian_matvec(x, z)), z)
    torch.testing.assert_close(m.logdet_hessian(x), torch.logdet(H))


@pytest.mark.parametrize("m", MAPS, ids=repr)
def test_bregman_divergence(m):
    x = _point(m)
    x2 = x.flip(0)
    d = m.bregman_divergence(x, x2)
    assert bool((d > 0).all())
    torch.testing.assert_close(m.bregman_divergence(x, x), torch.zeros(len(x), dtype=x.dtype))
    expected = m.phi(x) - m.phi(x2) - (m.grad_phi(x2) * (x - x2)).sum(-1)
    torch.testing.assert_close(d, expected)


def test_known_divergences():
    x = torch.tensor([[0.2, 0.5, 1.5]], dtype=torch.float64)
    y = torch.tensor([[0.4, 0.1, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(Euclidean().bregman_divergence(x, y), 0.5 * ((x - y) ** 2).sum(-1))
    # generalised KL
    kl = (x * torch.log(x / y) - x + y).sum(-1)
    torch.testing.assert_close(BoltzmannShannon().bregman_divergence(x, y), kl)
    # Itakura-Saito
    its = (x / y - torch.log(x / y) - 1).sum(-1)
    torch.testing.assert_close(Burg().bregman_divergence(x, y), its)
    # simplex entropy: KL between the full probability vectors
    p = torch.tensor([[0.2, 0.3]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.1]], dtype=torch.float64)
    P, Q = SimplexEntropy.to_simplex(p), SimplexEntropy.to_simplex(q)
    torch.testing.assert_close(SimplexEntropy().bregman_divergence(p, q),
                               (P * torch.log(P / Q)).sum(-1))


def test_fast_asinh():
    t = torch.tensor([0.0, -0.0, 1e-30, -1e-8, 0.3, -2.0, 1e5, -1e30], dtype=torch.float64)
    torch.testing.assert_close(fast_asinh(t), torch.asinh(t), rtol=1e-14, atol=0)
    t32 = torch.tensor([1e-30, 3.0, 1e30], dtype=torch.float32)
    torch.testing.assert_close(fast_asinh(t32), torch.asinh(t32))


def test_domains_and_errors():
    with pytest.raises(ValueError, match="beta must be > 0"):
        Hypentropy(0.0)
    with pytest.raises(ValueError, match="M must be > 0"):
        Euclidean(torch.tensor([1.0, -1.0]))
    bad = torch.tensor([[0.5, -0.1]])
    with pytest.raises(ValueError, match=r"my_site.*positive orthant"):
        BoltzmannShannon().check_domain(bad, "my_site")
    with pytest.raises(ValueError, match=r"x0.*simplex"):
        SimplexEntropy().check_domain(torch.tensor([[0.7, 0.4]]), "x0")
    SimplexEntropy().check_domain(torch.tensor([[0.3, 0.4]]), "x0")
    # Burg: a dual point outside (-inf, 0)^d has no primal image -> NaN, flagged
    assert torch.isnan(Burg().grad_phi_conj(torch.tensor([[0.5, -1.0]])))[0, 0]
    assert not bool(Burg().dual_contains(torch.tensor([[0.5, -1.0]])).any())


def test_device_dtype_follow_input():
    m = Hypentropy(torch.tensor([1.0, 2.0]))  # float32 parameter, float64 input
    x = torch.randn(3, 2, dtype=torch.float64)
    assert m.grad_phi(x).dtype == torch.float64
    assert SimplexEntropy().hessian_sqrt(torch.tensor([[0.2, 0.3]])).shape == (1, 2, 2)
