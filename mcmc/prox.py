"""Proximal operators (Euclidean and Bregman) of convex nonsmooth terms.

For a convex, lower semicontinuous ``g``, a step ``lam > 0`` and a mirror map ``phi``
(:mod:`mcmc.mirror`) with Bregman divergence ``D(x, y) = phi(x) - phi(y) - <grad phi(y), x - y>``:

* Euclidean prox:  ``prox_{lam g}(y) = argmin_x g(x) + |x - y|^2 / (2 lam)``.
* Left Bregman prox:  ``P^left_{lam g}(y) = argmin_x g(x) + D(x, y) / lam``. Optimality:
  ``grad phi(x) in grad phi(y) - lam dg(x)``, i.e. ``x = (grad phi + lam dg)^{-1}(grad phi(y))``.
* Right Bregman prox: ``P^right_{lam g}(y) = argmin_x g(x) + D(y, x) / lam``. Optimality:
  ``Hess phi(x)(y - x) in lam dg(x)``.

(Bauschke, Dao & Lindstrom, "Regularizing with Bregman-Moreau envelopes", SIAM J. Optim. 2018;
the closed forms below are derived from these optimality conditions in each docstring.)

Every term is an object with

* ``term(x)``: the value ``g(x)`` summed over the last dim (``inf`` outside for indicators);
* ``term.prox(x, lam)``: the Euclidean prox;
* ``term.left_prox(x, lam, mirror)`` / ``term.right_prox(x, lam, mirror)``: the Bregman proxes;
* ``term.supports(mirror, side)`` and ``term.check_supported(mirror, side)`` (raises
  ``ValueError`` listing every supported (term, mirror, side) — see :func:`supported_pairs`).

``x`` has shape ``(..., d)`` (leading dims = chains); weights are scalars or ``(d,)`` tensors.
For :class:`~mcmc.mirror.Euclidean` with a diagonal metric ``M``, ``D(x, y) = |x - y|_M^2 / 2``
is symmetric, so left = right = the M-weighted prox.
"""

from __future__ import annotations

from collections import deque
from typing import ClassVar

import numpy as np
import torch

from mcmc.mirror import (
    BoltzmannShannon,
    Burg,
    Euclidean,
    FermiDirac,
    Hypentropy,
    MirrorMap,
    SimplexEntropy,
    fast_asinh,
)

__all__ = [
    "L1",
    "L2",
    "TV1D",
    "Box",
    "GroupL1",
    "NonNegative",
    "NonsmoothTerm",
    "Simplex",
    "project_simplex",
    "prox_tv1d",
    "soft_threshold",
    "supported_pairs",
]


def _param(value, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (d,) parameter as a tensor on x's device/dtype."""
    return torch.as_tensor(value, dtype=x.dtype, device=x.device)


def _check_lam(lam) -> None:
    if isinstance(lam, torch.Tensor):
        if not bool((lam > 0).all()):
            raise ValueError("lam (the envelope/prox parameter) must be > 0")
    elif not lam > 0:
        raise ValueError(f"lam (the envelope/prox parameter) must be > 0, got {lam}")


def soft_threshold(x: torch.Tensor, t) -> torch.Tensor:
    """sign(x) max(|x| - t, 0): the prox of t |.| (t >= 0, broadcasting)."""
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)


class NonsmoothTerm:
    """Base class: a convex nonsmooth term g with Euclidean and Bregman proxes.

    Subclasses fill ``_left`` / ``_right``: dicts mapping a mirror class to a method name
    ``f(self, x, lam, mirror)``. ``Euclidean`` is handled generically through :meth:`_prox_m`
    (the M-weighted prox) when the subclass implements it.
    """

    name = "term"
    _left: ClassVar[dict] = {}
    _right: ClassVar[dict] = {}

    # --- to implement -------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prox(self, x: torch.Tensor, lam) -> torch.Tensor:
        """Euclidean prox of ``lam * g``."""
        raise NotImplementedError

    def _prox_m(self, x: torch.Tensor, lam, M) -> torch.Tensor | None:
        """Prox of ``lam * g`` in the metric |.|_M^2/2 (diagonal M); None if unsupported."""
        return None

    # --- dispatch -----------------------------------------------------------------------
    def supports(self, mirror: MirrorMap, side: str) -> bool:
        if isinstance(mirror, Euclidean):
            return self._euclidean_ok(mirror)
        table = self._left if side == "left" else self._right
        return type(mirror) in table

    def _euclidean_ok(self, mirror: Euclidean) -> bool:
        if not isinstance(mirror.M, torch.Tensor) or mirror.M.numel() == 1:
            return True
        return self._diag_m_ok

    _diag_m_ok = True  # subclasses whose _prox_m needs a scalar M set this to False

    def check_supported(self, mirror: MirrorMap, side: str) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if not self.supports(mirror, side):
            pairs = "; ".join(f"{t} with {m} ({s})" for t, m, s in supported_pairs())
            raise ValueError(
                f"no closed-form {side} Bregman prox of {self!r} for the mirror map {mirror!r}. "
                f"Supported (term, mirror, side) pairs: {pairs}")

    def left_prox(self, x: torch.Tensor, lam, mirror: MirrorMap) -> torch.Tensor:
        """Left Bregman prox argmin_u g(u) + D_phi(u, x)/lam."""
        return self._bregman(x, lam, mirror, "left")

    def right_prox(self, x: torch.Tensor, lam, mirror: MirrorMap) -> torch.Tensor:
        """Right Bregman prox argmin_u g(u) + D_phi(x, u)/lam."""
        return self._bregman(x, lam, mirror, "right")

    def _bregman(self, x, lam, mirror, side):
        _check_lam(lam)
        self.check_supported(mirror, side)
        if isinstance(mirror, Euclidean):
            M = mirror.M
            if not isinstance(M, torch.Tensor) or M.numel() == 1:
                return self.prox(x, lam / _param(M, x))
            return self._prox_m(x, lam, _param(M, x))
        table = self._left if side == "left" else self._right
        return getattr(self, table[type(mirror)])(x, lam, mirror)


def supported_pairs() -> list[tuple[str, str, str]]:
    """Every (term, mirror map, side) with a closed-form Bregman prox in this module."""
    out = []
    for term in (L1, GroupL1, L2, Box, NonNegative, Simplex, TV1D):
        eu = "Euclidean" if term._diag_m_ok else "Euclidean (scalar M only)"
        for side, table in (("left", term._left), ("right", term._right)):
            out.append((term.__name__, eu, side))
            out.extend((term.__name__, m.__name__, side) for m in table)
    return out


# ---------------------------------------------------------------------------------------
# l1
# ---------------------------------------------------------------------------------------


class L1(NonsmoothTerm):
    """Weighted l1 norm g(x) = sum_i w_i |x_i| (``weight`` >= 0, scalar or (d,)).

    Closed forms (c = lam * w, applied per coordinate):

    * Euclidean: soft threshold ``sign(x)(|x| - c)_+``; metric M: threshold ``c / M``.
    * Hypentropy, left: grad phi(0) = 0 and grad phi is odd and increasing, so
      ``u = beta sinh(soft(arcsinh(x/beta), c))`` — exactly 0 in the dead zone
      ``|arcsinh(x/beta)| <= c``.
    * Hypentropy, right: optimality ``(x - u)/sqrt(u^2 + beta^2) = c sign(u)`` for u != 0 and
      ``|x| <= c beta`` for u = 0. For ``|x| > c beta`` the unique root with ``x - u`` of the
      sign of x is ``u = sign(x)(x^2 - c^2 beta^2)/(|x| + c sqrt(x^2 + (1 - c^2) beta^2))``
      (the objective is decreasing then increasing in u, so the root is the global minimiser).
    * Boltzmann-Shannon (on x > 0, g = <w, x>): left ``x exp(-c)``, right ``x / (1 + c)``.
    * Burg (on x > 0): left ``x / (1 + c x)``; right solves ``c u^2 + u - x = 0``:
      ``u = 2x / (1 + sqrt(1 + 4 c x))``.
    * SimplexEntropy (first d-1 coordinates, g = <w, x> there): left
      ``grad phi^*(grad phi(x) - lam w)``. Right: no closed form.
    """

    name = "l1"
    _left: ClassVar[dict] = {Hypentropy: "_hyp_left", BoltzmannShannon: "_bs_left", Burg: "_burg_left",
             SimplexEntropy: "_simplex_left"}
    _right: ClassVar[dict] = {Hypentropy: "_hyp_right", BoltzmannShannon: "_bs_right", Burg: "_burg_right"}

    def __init__(self, weight=1.0) -> None:
        if isinstance(weight, torch.Tensor):
            if weight.dim() > 1 or not bool((weight >= 0).all()):
                raise ValueError("L1 weight must be a scalar or a (d,) tensor, all >= 0")
        elif not float(weight) >= 0:
            raise ValueError(f"L1 weight must be >= 0, got {weight}")
        self.weight = weight

    def __repr__(self):
        return f"L1(weight={self.weight})"

    def __call__(self, x):
        return (_param(self.weight, x) * x.abs()).sum(-1)

    def prox(self, x, lam):
        _check_lam(lam)
        return soft_threshold(x, lam * _param(self.weight, x))

    def _prox_m(self, x, lam, M):
        return soft_threshold(x, lam * _param(self.weight, x) / M)

    def _hyp_left(self, x, lam, mirror):
        c = lam * _param(self.weight, x)
        beta = _param(mirror.beta, x)
        return beta * torch.sinh(soft_threshold(fast_asinh(x / beta), c))

    def _hyp_right(self, x, lam, mirror):
        c = lam * _param(self.weight, x)
        beta = _param(mirror.beta, x)
        ax = x.abs()
        root = (ax * ax - (c * beta) ** 2) / (ax + c * torch.sqrt(
            torch.clamp(ax * ax + (1 - c * c) * beta * beta, min=0.0)))
        return torch.where(ax > c * beta, torch.sign(x) * root, torch.zeros_like(x))

    def _bs_left(self, x, lam, mirror):
        return x * torch.exp(-lam * _param(self.weight, x))

    def _bs_right(self, x, lam, mirror):
        return x / (1 + lam * _param(self.weight, x))

    def _burg_left(self, x, lam, mirror):
        return x / (1 + lam * _param(self.weight, x) * x)

    def _burg_right(self, x, lam, mirror):
        c = lam * _param(self.weight, x)
        return 2 * x / (1 + torch.sqrt(1 + 4 * c * x))

    def _simplex_left(self, x, lam, mirror):
        return mirror.grad_phi_conj(mirror.grad_phi(x) - lam * _param(self.weight, x))


# ---------------------------------------------------------------------------------------
# group l1 / l2
# ---------------------------------------------------------------------------------------


class GroupL1(NonsmoothTerm):
    """Group lasso g(x) = w sum_G |x_G|_2 over a partition of the last dim.

    Args:
        groups: a ``(d,)`` integer tensor of group labels ``0..G-1`` (None: one group, i.e.
            the l2 norm ``w |x|_2``).
        weight: ``w >= 0`` (scalar).

    Euclidean prox (block soft threshold): ``x_G (1 - lam w / |x_G|)_+``; with a scalar metric
    M the threshold is ``lam w / M``. Bregman proxes: none in closed form (a non-separable
    penalty with a non-quadratic phi has no closed form).
    """

    name = "group_l1"
    _diag_m_ok = False

    def __init__(self, groups: torch.Tensor | None = None, weight: float = 1.0) -> None:
        if not float(weight) >= 0:
            raise ValueError(f"GroupL1 weight must be >= 0, got {weight}")
        if groups is not None:
            groups = torch.as_tensor(groups)
            if groups.dim() != 1 or groups.dtype not in (torch.int64, torch.int32):
                raise ValueError("groups must be a (d,) integer tensor of labels 0..G-1")
            if groups.numel() and int(groups.min()) < 0:
                raise ValueError("groups labels must be >= 0")
            groups = groups.long()
        self.groups = groups
        self.weight = float(weight)

    def __repr__(self):
        return f"{type(self).__name__}(weight={self.weight})"

    def _group_norms(self, x):
        """Per-coordinate norm of the coordinate's group, shape (..., d)."""
        if self.groups is None:
            return x.norm(dim=-1, keepdim=True).expand_as(x)
        g = self.groups.to(x.device)
        ngroups = int(g.max()) + 1
        sq = torch.zeros(*x.shape[:-1], ngroups, dtype=x.dtype, device=x.device)
        sq = sq.index_add(-1, g, x * x)
        return sq.sqrt().index_select(-1, g)

    def __call__(self, x):
        if self.groups is None:
            return self.weight * x.norm(dim=-1)
        g = self.groups.to(x.device)
        sq = torch.zeros(*x.shape[:-1], int(g.max()) + 1, dtype=x.dtype, device=x.device)
        return self.weight * sq.index_add(-1, g, x * x).sqrt().sum(-1)

    def prox(self, x, lam):
        _check_lam(lam)
        norms = self._group_norms(x)
        t = lam * self.weight
        scale = torch.clamp(1 - t / torch.clamp(norms, min=torch.finfo(x.dtype).tiny), min=0.0)
        return x * scale


class L2(GroupL1):
    """The (unsquared) l2 norm g(x) = w |x|_2: :class:`GroupL1` with one group."""

    name = "l2"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(None, weight)


# ---------------------------------------------------------------------------------------
# indicators
# ---------------------------------------------------------------------------------------


def _indicator_value(inside: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Value of a set's indicator: 0 where ``inside``, +inf elsewhere (in ``x``'s dtype)."""
    return torch.where(inside, torch.zeros_like(inside, dtype=x.dtype),
                       torch.full_like(inside, float("inf"), dtype=x.dtype))


class Box(NonsmoothTerm):
    """Indicator of the box [low, high] (scalars or (d,) tensors; +-inf allowed).

    Euclidean prox: clamp. Bregman proxes for every *separable* mirror map (Euclidean with
    diagonal M, Hypentropy, Boltzmann-Shannon, Burg, FermiDirac): each coordinate's objective is convex
    (left: phi(u) - grad phi(x) u) or unimodal (right: d/du D(x, u) = phi''(u)(u - x)) with its
    unconstrained minimiser at u = x, so both proxes are ``clamp(x, low, high)``. With
    ``FermiDirac`` on the same box the term is 0 on the mirror domain and both are the identity.
    """

    name = "box"
    _left: ClassVar[dict] = {Hypentropy: "_clamp", BoltzmannShannon: "_clamp", Burg: "_clamp",
                             FermiDirac: "_clamp"}
    _right: ClassVar[dict] = {Hypentropy: "_clamp", BoltzmannShannon: "_clamp", Burg: "_clamp",
                              FermiDirac: "_clamp"}

    def __init__(self, low=-float("inf"), high=float("inf")) -> None:
        lo = torch.as_tensor(low, dtype=torch.float64)
        hi = torch.as_tensor(high, dtype=torch.float64)
        if lo.dim() > 1 or hi.dim() > 1 or not bool((lo < hi).all()):
            raise ValueError("Box needs low < high (scalars or (d,) tensors)")
        self.low, self.high = low, high

    def __repr__(self):
        return f"{type(self).__name__}(low={self.low}, high={self.high})"

    def _bounds(self, x):
        lo = torch.as_tensor(self.low, dtype=x.dtype, device=x.device)
        hi = torch.as_tensor(self.high, dtype=x.dtype, device=x.device)
        return lo, hi

    def contains(self, x):
        lo, hi = self._bounds(x)
        return ((x >= lo) & (x <= hi)).all(-1)

    def __call__(self, x):
        return _indicator_value(self.contains(x), x)

    def prox(self, x, lam):
        _check_lam(lam)
        return self._clamp(x, lam, None)

    def _prox_m(self, x, lam, M):
        return self._clamp(x, lam, None)

    def _clamp(self, x, lam, mirror):
        lo, hi = self._bounds(x)
        return torch.maximum(torch.minimum(x, hi), lo)


class NonNegative(Box):
    """Indicator of the nonnegative orthant (Box(0, inf)); for the positive-orthant mirror maps
    (Boltzmann-Shannon, Burg) it is 0 on their whole domain and both Bregman proxes are the
    identity."""

    name = "nonnegative"

    def __init__(self) -> None:
        super().__init__(0.0, float("inf"))

    def __repr__(self):
        return "NonNegative()"


def project_simplex(x: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Euclidean projection of each row of ``x (..., d)`` onto {u >= 0, sum u = radius}.

    Sort-based O(d log d) algorithm: with s the values sorted in decreasing order and
    k the largest index with s_k > (sum_{j<=k} s_j - radius)/k, the projection is
    (x - tau)_+ with tau = (sum_{j<=k} s_j - radius)/k.
    """
    s, _ = torch.sort(x, dim=-1, descending=True)
    css = s.cumsum(-1) - radius
    k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    cond = s - css / k > 0
    # number of active coordinates = last index where cond holds (cond is a prefix)
    kmax = cond.to(x.dtype).cumsum(-1).amax(-1, keepdim=True).clamp(min=1)
    tau = css.gather(-1, kmax.long() - 1) / kmax
    return torch.clamp(x - tau, min=0.0)


class Simplex(NonsmoothTerm):
    """Indicator of the simplex {x >= 0, sum_i x_i = radius} (all d coordinates).

    * Euclidean (scalar M): sort-based projection :func:`project_simplex`.
    * Boltzmann-Shannon, left: min_u <u, log u - 1 - log x> over the simplex gives
      u = radius x / sum(x) (KL projection); right: min_u sum_i u_i - x_i log u_i over the
      simplex gives the same normalisation.
    * SimplexEntropy: the mirror already lives on the (open) simplex in its first d-1
      coordinates and this term is read in that parametrisation, where it is 0 on the whole
      domain: both proxes are the identity.
    Hypentropy / Burg: no closed form (a 1-D root-find for the multiplier), not supported.
    """

    name = "simplex"
    _diag_m_ok = False
    _left: ClassVar[dict] = {BoltzmannShannon: "_normalise", SimplexEntropy: "_identity"}
    _right: ClassVar[dict] = {BoltzmannShannon: "_normalise", SimplexEntropy: "_identity"}

    def __init__(self, radius: float = 1.0) -> None:
        if not float(radius) > 0:
            raise ValueError(f"Simplex radius must be > 0, got {radius}")
        self.radius = float(radius)

    def __repr__(self):
        return f"Simplex(radius={self.radius})"

    def contains(self, x, atol: float = 1e-6):
        return (x >= 0).all(-1) & ((x.sum(-1) - self.radius).abs() <= atol * self.radius)

    def __call__(self, x):
        return _indicator_value(self.contains(x), x)

    def prox(self, x, lam):
        _check_lam(lam)
        return project_simplex(x, self.radius)

    def _normalise(self, x, lam, mirror):
        return self.radius * x / x.sum(-1, keepdim=True)

    def _identity(self, x, lam, mirror):
        return x


# ---------------------------------------------------------------------------------------
# 1-D total variation
# ---------------------------------------------------------------------------------------


def _tv1d_row(y: np.ndarray, w: float) -> np.ndarray:
    """Exact prox of w * sum_i |u_{i+1} - u_i| at y (1-D), by dynamic programming, O(n).

    Forward pass: F_1(b) = (b - y_1)^2/2, F_k(b) = (b - y_k)^2/2 + min_a F_{k-1}(a) + w|b - a|.
    If F' is increasing and piecewise linear, min_a F(a) + w|b - a| has derivative
    clamp(F'(b), -w, w) (F' truncated at its crossings t-_k, t+_k of -w and +w), and the inner
    argmin is clamp(b, t-_k, t+_k). So F_k' stays increasing piecewise linear; it is stored as
    a deque of knots with the (slope, intercept) jumps across them, plus the (slope, intercept)
    of its leftmost and rightmost pieces. Finding t-_k (t+_k) pops knots from the left (right);
    each knot is pushed once and popped at most once: O(n) overall (the idea of Johnson, 2013,
    "A dynamic programming algorithm for the fused lasso"). Backward pass:
    u_n = root of F_n', u_k = clamp(u_{k+1}, t-_k, t+_k).
    """
    n = y.shape[0]
    if n == 1 or w == 0:
        return y.copy()
    knots: deque = deque()  # entries (position, d_slope, d_intercept), sorted by position
    tm = np.empty(n - 1)
    tp = np.empty(n - 1)
    aL, bL = 1.0, -y[0]  # leftmost piece of F_k': aL * b + bL
    aR, bR = 1.0, -y[0]  # rightmost piece
    for k in range(n - 1):
        # t-: scan from the left while F'(knot) <= -w
        a, b = aL, bL
        while knots and a * knots[0][0] + b <= -w:
            _, da, db = knots.popleft()
            a, b = a + da, b + db
        lo = (-w - b) / a
        seg_lo = (a, b)
        # t+: scan from the right while F'(knot) >= w
        a, b = aR, bR
        while knots and a * knots[-1][0] + b >= w:
            _, da, db = knots.pop()
            a, b = a - da, b - db
        hi = (w - b) / a
        seg_hi = (a, b)
        tm[k], tp[k] = lo, hi
        # truncated derivative: -w left of lo, F' between, +w right of hi
        knots.appendleft((lo, seg_lo[0], seg_lo[1] + w))
        knots.append((hi, -seg_hi[0], w - seg_hi[1]))
        # F_{k+1}' = truncated + (b - y_{k+1})
        aL, bL = 1.0, -w - y[k + 1]
        aR, bR = 1.0, w - y[k + 1]
    # root of F_n'
    a, b = aL, bL
    for pos, da, db in knots:
        if a * pos + b >= 0:
            break
        a, b = a + da, b + db
    u = np.empty(n)
    u[-1] = -b / a
    for k in range(n - 2, -1, -1):
        u[k] = min(max(u[k + 1], tm[k]), tp[k])
    return u


def _tv1d_batched(y: torch.Tensor, w: float) -> torch.Tensor:
    """The dynamic programme of :func:`_tv1d_row` for all rows of ``y (B, n)`` at once.

    Each row's knot deque lives in a ``(B, 2n + 2)`` array with its own left/right pointers; the
    pops of one step run as masked updates until no row needs one, so the work per step is the
    largest number of pops of any row (amortised O(1) per row and step, as in the sequential
    version).
    """
    B, n = y.shape
    if n == 1 or w == 0:
        return y.clone()
    cap = 2 * n + 2
    pos = y.new_zeros(B, cap)
    dA = y.new_zeros(B, cap)
    dB = y.new_zeros(B, cap)
    # flat views + per-row offsets: index_select/index_put on 1-D storage is much cheaper than
    # 2-D advanced indexing inside the pop loops
    base = torch.arange(B, device=y.device) * cap
    pos_f, dA_f, dB_f = pos.view(-1), dA.view(-1), dB.view(-1)
    L = torch.full((B,), n, dtype=torch.long, device=y.device)  # empty deque: L = R + 1
    R = torch.full((B,), n - 1, dtype=torch.long, device=y.device)
    tm = y.new_empty(B, n - 1)
    tp = y.new_empty(B, n - 1)
    ones = torch.ones_like(y[:, 0])
    aL, bL, aR, bR = ones, -y[:, 0], ones, -y[:, 0]
    for k in range(n - 1):
        a, b = aL, bL
        while True:  # t-: pop from the left while F'(knot) <= -w
            pop = (L <= R) & (a * pos_f[base + L] + b <= -w)
            if not bool(pop.any()):
                break
            a = torch.where(pop, a + dA_f[base + L], a)
            b = torch.where(pop, b + dB_f[base + L], b)
            L = L + pop.long()
        lo, sa, sb = (-w - b) / a, a, b
        a, b = aR, bR
        while True:  # t+: pop from the right while F'(knot) >= w
            pop = (L <= R) & (a * pos_f[base + R] + b >= w)
            if not bool(pop.any()):
                break
            a = torch.where(pop, a - dA_f[base + R], a)
            b = torch.where(pop, b - dB_f[base + R], b)
            R = R - pop.long()
        hi = (w - b) / a
        tm[:, k], tp[:, k] = lo, hi
        L = L - 1
        iL = base + L
        pos_f[iL], dA_f[iL], dB_f[iL] = lo, sa, sb + w
        R = R + 1
        iR = base + R
        pos_f[iR], dA_f[iR], dB_f[iR] = hi, -a, w - b
        aL, bL, aR, bR = ones, -w - y[:, k + 1], ones, w - y[:, k + 1]
    a, b = aL, bL
    while True:  # root of F_n'
        go = (L <= R) & (a * pos_f[base + L] + b < 0)
        if not bool(go.any()):
            break
        a = torch.where(go, a + dA_f[base + L], a)
        b = torch.where(go, b + dB_f[base + L], b)
        L = L + go.long()
    u = torch.empty_like(y)
    u[:, -1] = -b / a
    for k in range(n - 2, -1, -1):
        u[:, k] = torch.minimum(torch.maximum(u[:, k + 1], tm[:, k]), tp[:, k])
    return u


_TV_ROWS_SEQUENTIAL = 16


def prox_tv1d(x: torch.Tensor, t: float) -> torch.Tensor:
    """Prox of ``t * sum_i |u_{i+1} - u_i|`` along the last dim, for every leading index.

    Exact O(n) dynamic programme (:func:`_tv1d_row`) in float64: row by row for a few CPU rows,
    otherwise for all rows at once (:func:`_tv1d_batched`, on x's device); result in x's dtype.
    """
    if t < 0:
        raise ValueError("TV weight * lam must be >= 0")
    if x.numel() == 0:
        return x.clone()
    rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    if rows.shape[0] <= _TV_ROWS_SEQUENTIAL and rows.device.type == "cpu":
        # few rows: the plain-Python deque is cheaper than the batched bookkeeping
        out = np.stack([_tv1d_row(r, float(t)) for r in rows.numpy()])
        return torch.as_tensor(out, dtype=x.dtype, device=x.device).reshape(x.shape)
    return _tv1d_batched(rows, float(t)).reshape(x.shape).to(x.dtype)


class TV1D(NonsmoothTerm):
    """1-D total variation g(x) = w sum_i |x_{i+1} - x_i| along the last dim (w >= 0).

    Euclidean prox (and scalar metric M) via :func:`prox_tv1d` (exact, O(n) per row, batched).
    Bregman proxes: none in closed form.
    """

    name = "tv1d"
    _diag_m_ok = False

    def __init__(self, weight: float = 1.0) -> None:
        if not float(weight) >= 0:
            raise ValueError(f"TV1D weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def __repr__(self):
        return f"TV1D(weight={self.weight})"

    def __call__(self, x):
        return self.weight * (x[..., 1:] - x[..., :-1]).abs().sum(-1)

    def prox(self, x, lam):
        _check_lam(lam)
        t = lam * self.weight
        if isinstance(t, torch.Tensor):
            t = float(t)
        return prox_tv1d(x, t)
