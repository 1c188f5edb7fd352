"""Proximal operators vs their definitions (numerical argmin with scipy), Moreau identities,
dead zones, and the unsupported-pair error."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, minimize_scalar

from mcmc.mirror import BoltzmannShannon, Burg, Euclidean, Hypentropy, SimplexEntropy
from mcmc.prox import (
    L1,
    L2,
    TV1D,
    Box,
    GroupL1,
    NonNegative,
    Simplex,
    project_simplex,
    supported_pairs,
)

DT = torch.float64


def _objective(term, mirror, side, x, lam):
    """u -> g(u) + D(u, x)/lam (left) or g(u) + D(x, u)/lam (right); Euclidean if mirror None."""
    xt = torch.as_tensor(x, dtype=DT)

    def obj(u):
        ut = torch.as_tensor(np.atleast_1d(u), dtype=DT)
        if mirror is None:
            div = 0.5 * ((ut - xt) ** 2).sum()
        elif side == "left":
            div = mirror.bregman_divergence(ut, xt)
        else:
            div = mirror.bregman_divergence(xt, ut)
        return float(term(ut) + div / lam)

    return obj


def _run(term, mirror, side, x, lam):
    xt = torch.as_tensor(x, dtype=DT).unsqueeze(0)
    if mirror is None:
        return term.prox(xt, lam)[0].numpy()
    fn = term.left_prox if side == "left" else term.right_prox
    return fn(xt, lam, mirror)[0].numpy()


def _separable_argmin(term, mirror, side, x, lam, lo, hi, feasible):
    """Per-coordinate bounded Brent minimisation (the terms here are separable, so the other
    coordinates can sit at any feasible point)."""
    out = np.empty_like(x)
    for i in range(len(x)):
        def obj1(t, i=i):
            u = feasible.copy()
            u[i] = t
            return _objective(term, mirror, side, x, lam)(u)
        out[i] = minimize_scalar(obj1, bounds=(lo[i], hi[i]), method="bounded",
                                 options={"xatol": 1e-11}).x
    return out


SEPARABLE_CASES = [
    # (term, mirror, side, positive-domain)
    (L1(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=DT)), None, "left", False),
    (L1(1.3), Euclidean(torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=DT)), "left", False),
    (L1(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=DT)), Hypentropy(0.7), "left", False),
    (L1(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=DT)), Hypentropy(0.7), "right", False),
    (L1(2.5), Hypentropy(torch.tensor([0.1, 0.5, 2.0, 5.0], dtype=DT)), "right", False),
    (L1(0.8), BoltzmannShannon(), "left", True),
    (L1(0.8), BoltzmannShannon(), "right", True),
    (L1(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=DT)), Burg(), "left", True),
    (L1(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=DT)), Burg(), "right", True),
    (Box(-0.5, torch.tensor([0.3, 1.0, 2.0, 0.1], dtype=DT)), None, "left", False),
    (Box(-0.5, 1.0), Hypentropy(0.5), "left", False),
    (Box(-0.5, 1.0), Hypentropy(0.5), "right", False),
    (Box(0.2, 1.0), BoltzmannShannon(), "left", True),
    (Box(0.2, 1.0), Burg(), "right", True),
    (NonNegative(), None, "left", False),
]


@pytest.mark.parametrize("case", SEPARABLE_CASES, ids=lambda c: f"{c[0]!r}-{c[1]!r}-{c[2]}")
def test_separable_prox_matches_numerical_argmin(case):
    term, mirror, side, positive = case
    rng = np.random.default_rng(0)
    for lam in (0.05, 0.7):
        for _ in range(4):
            if positive:
                x = rng.uniform(0.05, 3.0, size=4)
                lo, hi = np.full(4, 1e-9), np.full(4, 50.0)
            else:
                x = rng.normal(scale=2.0, size=4)
                lo, hi = np.full(4, -50.0), np.full(4, 50.0)
            if isinstance(term, Box):
                low, high = (torch.as_tensor(b, dtype=DT).expand(4).numpy()
                             for b in (term.low, term.high))
                lo, hi = np.maximum(lo, low), np.minimum(hi, high)
            ours = _run(term, mirror, side, x, lam)
            ref = _separable_argmin(term, mirror, side, x, lam, lo, hi, ours)
            obj = _objective(term, mirror, side, x, lam)
            assert obj(ours) <= obj(ref) + 1e-9
            np.testing.assert_allclose(ours, ref, atol=1e-6)


def _constrained_argmin(obj, x0, bounds=None, constraints=()):
    res = minimize(obj, x0, method="SLSQP", bounds=bounds, constraints=constraints,
                   options={"ftol": 1e-14, "maxiter": 1000})
    return res.x


@pytest.mark.parametrize("mirror,side", [(None, "left"), (BoltzmannShannon(), "left"),
                                         (BoltzmannShannon(), "right")])
def test_simplex_prox_matches_numerical_argmin(mirror, side):
    rng = np.random.default_rng(1)
    term = Simplex(1.5)
    for _ in range(5):
        x = rng.normal(size=5) if mirror is None else rng.uniform(0.05, 2.0, size=5)
        ours = _run(term, mirror, side, x, 0.3)
        assert abs(ours.sum() - 1.5) < 1e-10 and (ours >= 0).all()

        def smooth_obj(u, x=x):  # the indicator is enforced by the constraints
            ut = torch.as_tensor(u, dtype=DT)
            xt = torch.as_tensor(x, dtype=DT)
            if mirror is None:
                return float(0.5 * ((ut - xt) ** 2).sum())
            a, b = (ut, xt) if side == "left" else (xt, ut)
            return float(mirror.bregman_divergence(a, b))

        lb = 0.0 if mirror is None else 1e-9
        ref = _constrained_argmin(smooth_obj, np.full(5, 0.3), bounds=[(lb, None)] * 5,
                                  constraints=({"type": "eq", "fun": lambda u: u.sum() - 1.5},))
        assert smooth_obj(ours) <= smooth_obj(ref) + 1e-9
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_project_simplex_batched_and_radius():
    x = torch.randn(200, 7, dtype=DT) * 3
    p = project_simplex(x, 2.0)
    torch.testing.assert_close(p.sum(-1), torch.full((200,), 2.0, dtype=DT))
    assert bool((p >= 0).all())
    # projection property: <x - p, q - p> <= 0 for vertices q of the simplex
    for j in range(7):
        q = torch.zeros(7, dtype=DT)
        q[j] = 2.0
        assert bool((((x - p) * (q - p)).sum(-1) <= 1e-10).all())


def test_simplex_entropy_l1_left_prox():
    # non-separable mirror: compare with a numerical argmin inside the open simplex
    m = SimplexEntropy()
    w = torch.tensor([0.5, 2.0, 1.0], dtype=DT)
    term = L1(w)
    rng = np.random.default_rng(2)
    for lam in (0.1, 1.0):
        p = rng.dirichlet(np.ones(4))
        x = p[:3]
        ours = _run(term, m, "left", x, lam)
        obj = _objective(term, m, "left", x, lam)
        ref = _constrained_argmin(
            obj, x, bounds=[(1e-9, 1.0)] * 3,
            constraints=({"type": "ineq", "fun": lambda u: 1 - 1e-9 - u.sum()},))
        assert obj(ours) <= obj(ref) + 1e-9
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_group_l1_matches_numerical_argmin_and_moreau():
    rng = np.random.default_rng(3)
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    term = GroupL1(groups, weight=0.9)
    for lam in (0.2, 1.5):
        x = rng.normal(size=6)
        ours = _run(term, None, "left", x, lam)
        obj = _objective(term, None, "left", x, lam)
        ref = minimize(obj, x, method="Powell", options={"xtol": 1e-10, "ftol": 1e-14}).x
        assert obj(ours) <= obj(ref) + 1e-9
        np.testing.assert_allclose(ours, ref, atol=1e-4)
    # Moreau: x = prox_{lam g}(x) + lam * proj_{ball of radius w per group}(x / lam)
    x = torch.randn(50, 6, dtype=DT) * 2
    lam = 0.6
    v = x / lam
    norms = term._group_norms(v)
    proj = v * torch.clamp(0.9 / norms, max=1.0)
    torch.testing.assert_close(term.prox(x, lam) + lam * proj, x)
    # L2 = one group
    y = torch.randn(10, 4, dtype=DT)
    torch.testing.assert_close(L2(0.5).prox(y, 2.0), GroupL1(torch.zeros(4, dtype=torch.long),
                                                             0.5).prox(y, 2.0))


def test_l1_moreau_identity():
    w = torch.tensor([0.1, 1.0, 2.0], dtype=DT)
    x = torch.randn(100, 3, dtype=DT) * 3
    for lam in (0.3, 2.0):
        # g^* is the indicator of the box [-w, w]: prox_{g^*/lam}(x/lam) = clamp(x/lam, -w, w)
        dual = torch.maximum(torch.minimum(x / lam, w), -w)
        torch.testing.assert_close(L1(w).prox(x, lam) + lam * dual, x)


def test_l1_dead_zones_are_exactly_zero():
    # left hypentropy prox: 0 whenever |arcsinh(x/beta)| <= lam w (the public reference code
    # returned a divergence value here instead of 0)
    beta, lam, w = 0.5, 0.4, 2.0
    m = Hypentropy(beta)
    edge = beta * np.sinh(lam * w)
    x = torch.tensor([[-0.999 * edge, -0.3 * edge, 0.0, 0.5 * edge, 0.999 * edge]], dtype=DT)
    assert bool((L1(w).left_prox(x, lam, m) == 0).all())
    assert bool((L1(w).left_prox(1.01 * torch.tensor([[edge]], dtype=DT), lam, m) > 0).all())
    # right hypentropy prox: 0 whenever |x| <= lam w beta
    edge_r = lam * w * beta
    xr = torch.tensor([[-0.999 * edge_r, 0.2 * edge_r, 0.999 * edge_r]], dtype=DT)
    assert bool((L1(w).right_prox(xr, lam, m) == 0).all())
    # and the objective at 0 beats nearby points
    obj = _objective(L1(w), m, "left", np.array([0.5 * edge]), lam)
    assert obj(np.array([0.0])) < min(obj(np.array([1e-3])), obj(np.array([-1e-3])))


def _tv_reference(x, t):
    """SLSQP on the smooth reformulation min 1/2|u - x|^2 + t sum s, s >= |Du|."""
    n = len(x)

    def obj(z):
        u, s = z[:n], z[n:]
        return 0.5 * ((u - x) ** 2).sum() + t * s.sum()

    cons = ({"type": "ineq", "fun": lambda z: z[n:] - np.diff(z[:n])},
            {"type": "ineq", "fun": lambda z: z[n:] + np.diff(z[:n])})
    z0 = np.concatenate([x, np.abs(np.diff(x))])
    res = minimize(obj, z0, method="SLSQP", constraints=cons,
                   options={"ftol": 1e-15, "maxiter": 2000})
    return res.x[:n]


def test_tv1d_matches_numerical_argmin():
    rng = np.random.default_rng(4)
    term = TV1D(0.8)
    for n, lam in ((2, 0.3), (7, 0.5), (12, 1.3), (12, 0.05)):
        for _ in range(3):
            x = np.cumsum(rng.normal(size=n)) + rng.normal(size=n)
            ours = _run(term, None, "left", x, lam)
            obj = _objective(term, None, "left", x, lam)
            ref = _tv_reference(x, 0.8 * lam)
            assert obj(ours) <= obj(ref) + 1e-8
            np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_tv1d_batched_equals_sequential():
    from mcmc.prox import _tv1d_batched, _tv1d_row

    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 3, 9, 40):
        for w in (0.0, 0.05, 0.7, 5.0):
            y = torch.randn(64, n, generator=g, dtype=DT).cumsum(-1)
            ref = np.stack([_tv1d_row(r, w) for r in y.numpy()])
            np.testing.assert_allclose(_tv1d_batched(y, w).numpy(), ref, atol=1e-10)
    # and prox_tv1d dispatches to the batched path for many rows
    y = torch.randn(50, 12, generator=g, dtype=DT)
    rows = torch.stack([TV1D(0.3).prox(r.unsqueeze(0), 1.0)[0] for r in y])
    torch.testing.assert_close(TV1D(0.3).prox(y, 1.0), rows)


def test_tv1d_closed_forms_and_batch():
    # two points: fuse when |x1 - x2| <= 2t, else move each by t
    t = 0.5
    out = TV1D(1.0).prox(torch.tensor([[0.0, 0.8], [0.0, 3.0]], dtype=DT), t)
    torch.testing.assert_close(out, torch.tensor([[0.4, 0.4], [0.5, 2.5]], dtype=DT))
    # huge weight: the mean; zero weight: identity; batch of shape (2, 3, n)
    x = torch.randn(2, 3, 9, dtype=DT)
    big = TV1D(1e6).prox(x, 1.0)
    torch.testing.assert_close(big, x.mean(-1, keepdim=True).expand_as(x))
    torch.testing.assert_close(TV1D(0.0).prox(x, 1.0), x)
    rows = torch.stack([TV1D(0.3).prox(r, 1.0) for r in x.reshape(6, 9)]).reshape(2, 3, 9)
    torch.testing.assert_close(TV1D(0.3).prox(x, 1.0), rows)


def test_unsupported_pairs_and_bad_input():
    with pytest.raises(ValueError, match=r"Supported \(term, mirror, side\) pairs.*L1 with"):
        GroupL1(None, 1.0).left_prox(torch.zeros(1, 3), 0.1, Hypentropy(1.0))
    with pytest.raises(ValueError, match="no closed-form right Bregman prox"):
        L1(1.0).right_prox(torch.full((1, 2), 0.2), 0.1, SimplexEntropy())
    with pytest.raises(ValueError, match="scalar M only"):
        TV1D(1.0).left_prox(torch.zeros(1, 3), 0.1, Euclidean(torch.tensor([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="lam"):
        L1(1.0).prox(torch.zeros(1, 3), 0.0)
    with pytest.raises(ValueError, match="lam"):
        L1(1.0).left_prox(torch.zeros(1, 3), -1.0, Hypentropy(1.0))
    with pytest.raises(ValueError, match="weight"):
        L1(-1.0)
    with pytest.raises(ValueError, match="low < high"):
        Box(1.0, 0.0)
    pairs = supported_pairs()
    assert ("L1", "Hypentropy", "left") in pairs and ("L1", "Hypentropy", "right") in pairs
    assert ("GroupL1", "Hypentropy", "left") not in pairs
