"""Sliced Wasserstein with control variates (Nguyen & Ho 2024): exactness, unbiasedness, variance."""

import math

import pytest
import scipy.stats
import torch

from vi_estimators.sliced import sliced_wasserstein, wasserstein_1d


def _clouds(n=40, m=40, d=2, shift=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 0.6 * torch.randn(m, d, generator=g, dtype=torch.float64) + shift
    return x, y


def test_wasserstein_1d_matches_scipy_equal_and_unequal_sizes():
    g = torch.Generator().manual_seed(1)
    for n, m in [(9, 9), (7, 12)]:
        u = torch.randn(n, generator=g, dtype=torch.float64)
        v = torch.randn(m, generator=g, dtype=torch.float64) + 0.7
        ours = wasserstein_1d(u, v, p=1).item()
        assert ours == pytest.approx(scipy.stats.wasserstein_distance(u, v), rel=1e-10)
    # p = 2 on equal sizes: mean squared difference of order statistics
    u, v = torch.randn(10, generator=g), torch.randn(10, generator=g)
    expected = ((u.sort().values - v.sort().values) ** 2).mean()
    assert wasserstein_1d(u, v, p=2).item() == pytest.approx(expected.item(), rel=1e-6)


def _quadrature_sw2(x, y, num_angles=20000):
    """SW_2^2 in 2-D by the midpoint rule over directions (uniform on the half circle)."""
    phi = (torch.arange(num_angles, dtype=x.dtype) + 0.5) * math.pi / num_angles
    theta = torch.stack([phi.cos(), phi.sin()], -1)
    return wasserstein_1d(theta @ x.T, theta @ y.T, p=2).mean()


@pytest.mark.parametrize("cv", [None, "lower", "upper"])
def test_every_control_variate_keeps_the_mean(cv):
    x, y = _clouds(n=30, m=25, d=2, shift=2.0)
    exact = _quadrature_sw2(x, y, num_angles=4000)  # unequal sizes: quantile matching
    R = 10000
    est = sliced_wasserstein(x.expand(R, -1, -1), y, num_projections=4, control_variate=cv)
    mean, se = est.mean().item(), est.std().item() / R**0.5
    print(f"cv={cv}: mean {mean:.6f} exact {exact.item():.6f} se {se:.2e} var {est.var():.3e}")
    assert abs(mean - exact.item()) < 4 * se


def test_control_variate_gradient_unbiased():
    x, y = _clouds(n=20, m=20, d=2, shift=2.0)
    xr = x.clone().requires_grad_(True)
    (g_exact,) = torch.autograd.grad(_quadrature_sw2(xr, y, 4000), xr)
    R = 10000
    xb = x.expand(R, -1, -1).clone().requires_grad_(True)
    est = sliced_wasserstein(xb, y, num_projections=4, control_variate="lower")
    (g,) = torch.autograd.grad(est.sum(), xb)
    g = g.reshape(R, -1)
    z = (g.mean(0) - g_exact.reshape(-1)) / (g.std(0) / R**0.5)
    print("max |z| of gradient coordinates:", z.abs().max().item())
    assert z.abs().max() < 4


def test_cv_reduces_variance_when_clouds_far_apart():
    x, y = _clouds(n=64, m=64, d=10, shift=5.0)
    R = 4000
    var = {}
    for cv in [None, "lower", "upper"]:
        est = sliced_wasserstein(x.expand(R, -1, -1), y, num_projections=10, control_variate=cv)
        var[cv] = est.var().item()
    ratios = {k: var[None] / v for k, v in var.items() if k}
    print("variance reduction factors (far apart):", ratios)
    assert ratios["lower"] >= 5 and ratios["upper"] >= 5


def test_bad_input():
    x, y = _clouds()
    with pytest.raises(ValueError, match="num_projections must be >= 1"):
        sliced_wasserstein(x, y, 0)
    with pytest.raises(ValueError, match="num_projections must be >= 2 with a control variate"):
        sliced_wasserstein(x, y, 1, control_variate="lower")
    with pytest.raises(ValueError, match="control_variate must be one of"):
        sliced_wasserstein(x, y, 5, control_variate="middle")
    with pytest.raises(TypeError, match="num_projections must be an int"):
        sliced_wasserstein(x, y, 2.5)
    with pytest.raises(ValueError, match="same d"):
        sliced_wasserstein(x, torch.randn(5, 3, dtype=x.dtype), 5)


@pytest.mark.cuda
def test_runs_on_cuda():
    x, y = _clouds()
    est = sliced_wasserstein(x.cuda(), y.cuda(), 8, control_variate="upper")
    assert est.device.type == "cuda"
