"""Mirror maps (Legendre functions) for mirror-Langevin samplers and mirrored SVGD.

A mirror map is a Legendre function ``phi`` (strictly convex, differentiable on the interior
of its domain, with a gradient that blows up at the boundary). ``grad_phi`` maps the (primal)
domain onto the dual space, ``grad_phi_conj = (grad phi)^{-1} = grad phi^*`` maps it back, so an
update carried out in the dual space lands inside the domain by construction.

Shapes: every method takes a point ``x`` of shape ``(..., d)`` (``d`` = last dimension) and
broadcasts over the leading batch dimensions (e.g. ``(C, d)`` for ``C`` chains/particles);
scalar-valued methods (``phi``, ``bregman_divergence``, ``logdet_hessian``) sum over the last
dimension and return shape ``(...)``. Parameters (``beta``, ``M``) are scalars or tensors of shape
``(d,)`` that broadcast against ``x``. Nothing is hard-coded to the CPU: outputs follow ``x``.

Stable API (shared by ``mcmc.bregman`` and ``mcmc.coin``)::

    m.phi(x)                   -> (...)      phi(x)
    m.grad_phi(x)              -> (..., d)   primal -> dual
    m.grad_phi_conj(y)         -> (..., d)   dual -> primal (inverse of grad_phi); NaN if y is
                                             outside the dual domain (only Burg has a bounded one)
    m.phi_conj(y)              -> (...)      convex conjugate phi^*(y)
    m.hessian_diag(x)          -> (..., d)   diagonal of Hess phi(x) (diagonal maps only)
    m.hessian(x)               -> (..., d, d) full Hessian (always available)
    m.hessian_sqrt(x)          -> (..., d) diagonal sqrt if ``m.diagonal_hessian`` else a
                                  (..., d, d) factor A with A A^T = Hess phi(x)
    m.hessian_sqrt_matvec(x, z)-> (..., d)   A z (O(d) for every map here; used for the noise)
    m.hessian_matvec(x, v)     -> (..., d)   Hess phi(x) v
    m.inverse_hessian_matvec(x, v) -> (..., d)  Hess phi(x)^{-1} v (= Hess phi^*(grad phi(x)) v)
    m.logdet_hessian(x)        -> (...)      log det Hess phi(x); the log-Jacobian of the dual
                                             change of variables is ``-logdet_hessian(x)``
    m.contains(x)              -> bool (...) x in the interior of dom phi
    m.dual_contains(y)         -> bool (...) y in the interior of dom phi^*
    m.bregman_divergence(x, y) -> (...)      D_phi(x, y) = phi(x) - phi(y) - <grad phi(y), x - y>
    m.check_domain(x, name)    raises ValueError naming ``name`` and ``m.domain`` if any point
                               of x is outside the domain
    m.name, m.domain (human-readable description of dom phi)

Maps: :class:`Euclidean` (1/2|x|^2 or 1/2|x|_M^2 with diagonal M), :class:`Hypentropy`
(scale beta, on R^d), :class:`BoltzmannShannon` (x log x - x on the positive orthant),
:class:`Burg` (-log x on the positive orthant), :class:`FermiDirac` (box entropy on an open
box), :class:`SimplexEntropy` (negative entropy on the probability simplex, parametrised by
its first d-1 coordinates).

Floating point: for the bounded-domain maps, ``grad_phi_conj`` keeps its result strictly inside
the domain (at least one float step / ``finfo.tiny`` from the boundary), because exp/sigmoid/
softmax round to boundary points where ``grad_phi`` is infinite. Samplers should still use
float64 near boundaries: the mirror-Langevin noise ``Hess^{1/2} xi`` grows like
``dist^{-1/2}`` there (see :mod:`mcmc.bregman`).
"""

from __future__ import annotations

import torch

Scalar = float | torch.Tensor

__all__ = [
    "BoltzmannShannon",
    "Burg",
    "Euclidean",
    "Hypentropy",
    "MirrorMap",
    "SimplexEntropy",
    "fast_asinh",
]


def _as_param(value: Scalar, name: str, positive: bool = True) -> float | torch.Tensor:
    """Validate a scalar or (d,) tensor parameter."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name} must be a scalar or a 1-D tensor of shape (d,), "
                             f"got shape {tuple(value.shape)}")
        if positive and not bool((value > 0).all()):
            raise ValueError(f"{name} must be > 0 elementwise")
        return value
    value = float(value)
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def fast_asinh(t: torch.Tensor) -> torch.Tensor:
    """arcsinh(t) = sign(t) log1p(|t| + |t| / (1/|t| + sqrt(1/|t|^2 + 1))).

    Exact rewrite of log(|t| + sqrt(t^2 + 1)) without cancellation for small |t| or overflow for
    large |t| (t = 0 gives 0). ``torch.asinh`` is several times slower on CPU and this sits in
    the inner loop of hypentropy samplers.
    """
    a = t.abs()
    r = 1.0 / a
    return torch.copysign(torch.log1p(a + a / (r + torch.sqrt(r * r + 1.0))), t)


def _p(param: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """Move a tensor parameter to x's device/dtype (device follows the tensors)."""
    if isinstance(param, torch.Tensor):
        return param.to(device=x.device, dtype=x.dtype)
    return param


class MirrorMap:
    """Base class of separable/diagonal-Hessian Legendre functions.

    Subclasses with a diagonal Hessian implement ``phi``, ``grad_phi``, ``grad_phi_conj``,
    ``phi_conj``, ``hessian_diag`` and ``contains``; everything else follows.
    """

    name: str = "mirror"
    domain: str = "R^d"
    diagonal_hessian: bool = True

    # --- to implement -------------------------------------------------------------------
    def phi(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad_phi(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad_phi_conj(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def phi_conj(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hessian_diag(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def contains(self, x: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(x).all(-1)

    def dual_contains(self, y: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(y).all(-1)

    # --- derived ------------------------------------------------------------------------
    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        return torch.diag_embed(self.hessian_diag(x))

    def hessian_sqrt(self, x: torch.Tensor) -> torch.Tensor:
        """Square root of Hess phi(x): the diagonal ``(..., d)`` for diagonal maps."""
        return self.hessian_diag(x).sqrt()

    def hessian_sqrt_matvec(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``A z`` with ``A A^T = Hess phi(x)``; with z ~ N(0, I), A z ~ N(0, Hess phi(x))."""
        return self.hessian_sqrt(x) * z

    def hessian_matvec(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.hessian_diag(x) * v

    def inverse_hessian_matvec(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v / self.hessian_diag(x)

    def logdet_hessian(self, x: torch.Tensor) -> torch.Tensor:
        return self.hessian_diag(x).log().sum(-1)

    def bregman_divergence(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """D_phi(x, y) = phi(x) - phi(y) - <grad phi(y), x - y>  (>= 0, = 0 iff x = y)."""
        return self.phi(x) - self.phi(y) - (self.grad_phi(y) * (x - y)).sum(-1)

    def check_domain(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise ``ValueError`` naming ``name`` and the domain if x leaves the domain."""
        inside = self.contains(x)
        if not bool(inside.all()):
            bad = int((~inside).sum())
            raise ValueError(
                f"{name}: {bad} point(s) lie outside the domain of the {self.name} mirror map, "
                f"which is {self.domain}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Euclidean(MirrorMap):
    """phi(x) = 1/2 <x, M x> with diagonal M (default M = I): mirror Langevin = ULA
    preconditioned by M^{-1}; with M = I every Bregman object reduces to its Euclidean one.

    Args:
        M: positive scalar or ``(d,)`` tensor, the diagonal of the metric.
    """

    name = "euclidean"
    domain = "R^d"

    def __init__(self, M: Scalar = 1.0) -> None:
        self.M = _as_param(M, "M")

    def phi(self, x):
        return 0.5 * (_p(self.M, x) * x * x).sum(-1)

    def grad_phi(self, x):
        return _p(self.M, x) * x

    def grad_phi_conj(self, y):
        return y / _p(self.M, y)

    def phi_conj(self, y):
        return 0.5 * (y * y / _p(self.M, y)).sum(-1)

    def hessian_diag(self, x):
        return torch.ones_like(x) * _p(self.M, x)

    def __repr__(self):
        return f"Euclidean(M={self.M})"


class Hypentropy(MirrorMap):
    """Hyperbolic entropy (Ghai, Hazan & Singer, 2020) on R^d, scale ``beta > 0``:

        phi(x) = sum_i x_i arcsinh(x_i / beta) - sqrt(x_i^2 + beta^2),
        grad phi(x) = arcsinh(x / beta),  grad phi^*(y) = beta sinh(y),
        Hess phi(x) = diag(1 / sqrt(x^2 + beta^2)),  phi^*(y) = beta sum_i cosh(y_i).

    Small ``beta`` makes the geometry entropy-like (multiplicative updates, good for sparse
    targets); large ``beta`` makes it Euclidean (Hess ~ I / beta).
    """

    name = "hypentropy"
    domain = "R^d"

    def __init__(self, beta: Scalar = 1.0) -> None:
        self.beta = _as_param(beta, "beta")

    def phi(self, x):
        b = _p(self.beta, x)
        return (x * fast_asinh(x / b) - torch.sqrt(x * x + b * b)).sum(-1)

    def grad_phi(self, x):
        return fast_asinh(x / _p(self.beta, x))

    def grad_phi_conj(self, y):
        return _p(self.beta, y) * torch.sinh(y)

    def phi_conj(self, y):
        return (_p(self.beta, y) * torch.cosh(y)).sum(-1)

    def hessian_diag(self, x):
        b = _p(self.beta, x)
        return torch.rsqrt(x * x + b * b)

    def __repr__(self):
        return f"Hypentropy(beta={self.beta})"


class BoltzmannShannon(MirrorMap):
    """Boltzmann-Shannon entropy on the positive orthant:

        phi(x) = sum_i x_i log x_i - x_i,  grad phi = log x,  grad phi^* = exp,
        Hess phi(x) = diag(1 / x),  phi^*(y) = sum_i exp(y_i).
    """

    name = "boltzmann_shannon"
    domain = "the positive orthant (0, inf)^d"

    def phi(self, x):
        return (torch.xlogy(x, x) - x).sum(-1)

    def grad_phi(self, x):
        return torch.log(x)

    def grad_phi_conj(self, y):
        # exp underflows to the boundary point 0 for y below about -745 (float64): keep the
        # state in the open domain (the mass this moves is below the float resolution)
        return torch.exp(y).clamp(min=torch.finfo(y.dtype).tiny)

    def phi_conj(self, y):
        return torch.exp(y).sum(-1)

    def hessian_diag(self, x):
        return 1.0 / x

    def contains(self, x):
        return (x > 0).all(-1) & torch.isfinite(x).all(-1)

    def __repr__(self):
        return "BoltzmannShannon()"


class Burg(MirrorMap):
    """Burg entropy on the positive orthant:

        phi(x) = -sum_i log x_i,  grad phi(x) = -1/x (values in (-inf, 0)^d),
        grad phi^*(y) = -1/y for y < 0 (NaN otherwise),  Hess phi(x) = diag(1 / x^2),
        phi^*(y) = -sum_i (1 + log(-y_i)).

    Its dual domain is the negative orthant: a mirror step whose dual iterate becomes >= 0
    has no primal image, so ``grad_phi_conj`` returns NaN there (samplers report it).
    """

    name = "burg"
    domain = "the positive orthant (0, inf)^d"

    def phi(self, x):
        return -torch.log(x).sum(-1)

    def grad_phi(self, x):
        return -1.0 / x

    def grad_phi_conj(self, y):
        x = (-1.0 / y).clamp(min=torch.finfo(y.dtype).tiny)
        return torch.where(y < 0, x, torch.full_like(y, float("nan")))

    def phi_conj(self, y):
        return -(1.0 + torch.log(-y)).sum(-1)

    def hessian_diag(self, x):
        return 1.0 / (x * x)

    def contains(self, x):
        return (x > 0).all(-1) & torch.isfinite(x).all(-1)

    def dual_contains(self, y):
        return (y < 0).all(-1)

    def __repr__(self):
        return "Burg()"


class FermiDirac(MirrorMap):
    """Fermi-Dirac (box) entropy on the open box (low, high)^d, a barrier for box constraints:

        phi(x) = sum_i (x_i - l_i) log(x_i - l_i) + (h_i - x_i) log(h_i - x_i),
        grad phi(x) = log((x - l)/(h - x)),  grad phi^*(y) = l + (h - l) sigmoid(y),
        Hess phi(x) = diag(1/(x - l) + 1/(h - x)),  phi^*(y) = sum_i l_i y_i + w_i softplus(y_i)
        - w_i log w_i with w = h - l.

    Args:
        low, high: scalars or ``(d,)`` tensors with ``low < high`` (finite).
    """

    name = "fermi_dirac"

    def __init__(self, low: Scalar = 0.0, high: Scalar = 1.0) -> None:
        lo = torch.as_tensor(low, dtype=torch.float64)
        hi = torch.as_tensor(high, dtype=torch.float64)
        if lo.dim() > 1 or hi.dim() > 1 or not bool((lo < hi).all()) or not bool(
                torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            raise ValueError("FermiDirac needs finite low < high (scalars or (d,) tensors)")
        self.low, self.high = low, high
        self.domain = f"the open box (low, high)^d with low={low}, high={high}"

    def _b(self, x):
        return (torch.as_tensor(self.low, dtype=x.dtype, device=x.device),
                torch.as_tensor(self.high, dtype=x.dtype, device=x.device))

    def phi(self, x):
        lo, hi = self._b(x)
        return (torch.xlogy(x - lo, x - lo) + torch.xlogy(hi - x, hi - x)).sum(-1)

    def grad_phi(self, x):
        lo, hi = self._b(x)
        return torch.log(x - lo) - torch.log(hi - x)

    def grad_phi_conj(self, y):
        lo, hi = self._b(y)
        w = hi - lo
        # measure from the nearer edge (no cancellation), then keep the result strictly inside
        # the box: sigmoid rounds to exactly 0/1 for large |y|, a boundary point where grad phi
        # is infinite
        x = torch.where(y < 0, lo + w * torch.sigmoid(y), hi - w * torch.sigmoid(-y))
        tiny = torch.finfo(y.dtype).tiny  # >= tiny from each edge keeps 1/(x - lo) finite
        inf = torch.full_like(lo, float("inf"))
        return torch.minimum(torch.maximum(x, torch.maximum(torch.nextafter(lo, hi), lo + tiny)),
                             torch.minimum(torch.nextafter(hi, -inf), hi - tiny))

    def phi_conj(self, y):
        lo, hi = self._b(y)
        w = hi - lo
        return (lo * y + w * torch.nn.functional.softplus(y) - torch.xlogy(w, w)).sum(-1)

    def hessian_diag(self, x):
        lo, hi = self._b(x)
        return 1.0 / (x - lo) + 1.0 / (hi - x)

    def contains(self, x):
        lo, hi = self._b(x)
        return ((x > lo) & (x < hi)).all(-1)

    def __repr__(self):
        return f"FermiDirac(low={self.low}, high={self.high})"


class SimplexEntropy(MirrorMap):
    """Negative entropy on the probability simplex, in the first d-1 coordinates.

    Parametrisation: a point p = (p_1, ..., p_K) of the K-simplex is stored as
    x = (p_1, ..., p_{K-1}) in the open set {x_i > 0, sum_i x_i < 1} (so ``d = K - 1``) and
    p_K = 1 - sum_i x_i is implicit. Use :meth:`to_simplex` / :meth:`from_simplex` to convert.

        phi(x) = sum_{i<K} x_i log x_i + p_K log p_K,
        grad phi(x)_i = log(x_i / p_K)                     (additive log-ratio),
        grad phi^*(y)_i = exp(y_i) / (1 + sum_j exp(y_j))    (softmax with a zero logit),
        phi^*(y) = log(1 + sum_j exp(y_j)),
        Hess phi(x) = diag(1/x) + (1/p_K) 1 1^T              (not diagonal).

    Noise factor: with D = diag(1/x) and u = sqrt(x / p_K), Hess = D^{1/2}(I + u u^T)D^{1/2}
    and A = D^{1/2}(I + c u u^T), c = sqrt(p_K) / (1 + sqrt(p_K)), satisfies A A^T = Hess
    (|u|^2 = (1 - p_K)/p_K), so ``hessian_sqrt_matvec`` is O(d).
    """

    name = "simplex_entropy"
    domain = ("the open probability simplex in its first d-1 coordinates "
              "{x : x_i > 0, sum_i x_i < 1}")
    diagonal_hessian = False

    @staticmethod
    def to_simplex(x: torch.Tensor) -> torch.Tensor:
        """(..., K-1) -> (..., K) by appending 1 - sum(x)."""
        return torch.cat([x, 1.0 - x.sum(-1, keepdim=True)], dim=-1)

    @staticmethod
    def from_simplex(p: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., K-1) by dropping the last coordinate."""
        return p[..., :-1]

    @staticmethod
    def _last(x: torch.Tensor) -> torch.Tensor:
        return 1.0 - x.sum(-1, keepdim=True)

    def phi(self, x):
        p = self.to_simplex(x)
        return torch.xlogy(p, p).sum(-1)

    def grad_phi(self, x):
        return torch.log(x) - torch.log(self._last(x))

    def grad_phi_conj(self, y):
        # softmax over (y, 0) without the last output: stable for large |y|
        z = torch.cat([y, torch.zeros_like(y[..., :1])], dim=-1)
        x = torch.softmax(z, dim=-1)[..., :-1].clamp(min=torch.finfo(y.dtype).tiny)
        # p_K = 1 - sum(x) is only resolved to about eps: keep it >= eps so the state stays in
        # the open simplex (softmax rounds tiny components to the boundary otherwise)
        eps = torch.finfo(y.dtype).eps
        total = x.sum(-1, keepdim=True)
        return torch.where(total > 1 - eps, x * ((1 - eps) / total), x)

    def phi_conj(self, y):
        z = torch.cat([y, torch.zeros_like(y[..., :1])], dim=-1)
        return torch.logsumexp(z, dim=-1)

    def hessian_diag(self, x):
        return 1.0 / x + 1.0 / self._last(x)

    def hessian(self, x):
        return torch.diag_embed(1.0 / x) + (1.0 / self._last(x)).unsqueeze(-1)

    def hessian_sqrt(self, x):
        """A (..., d, d) factor A with A A^T = Hess phi(x) (see the class docstring)."""
        last = self._last(x)
        u = torch.sqrt(x / last)
        sq = torch.sqrt(last)
        c = sq / (1.0 + sq)
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        return torch.rsqrt(x).unsqueeze(-1) * (eye + c.unsqueeze(-1) * u.unsqueeze(-1)
                                               * u.unsqueeze(-2))

    def hessian_sqrt_matvec(self, x, z):
        last = self._last(x)
        u = torch.sqrt(x / last)
        # c solves c^2 |u|^2 + 2c - 1 = 0 with |u|^2 = (1 - p_K)/p_K; this form has no 0/0
        sq = torch.sqrt(last)
        c = sq / (1.0 + sq)
        return torch.rsqrt(x) * (z + c * u * (u * z).sum(-1, keepdim=True))

    def hessian_matvec(self, x, v):
        return v / x + (v.sum(-1, keepdim=True) / self._last(x))

    def inverse_hessian_matvec(self, x, v):
        # Sherman-Morrison: (D + 1 1^T/p_K)^{-1} = diag(x) - x x^T (since sum_{i<K} x_i + p_K = 1)
        return x * v - x * (x * v).sum(-1, keepdim=True)

    def logdet_hessian(self, x):
        # det(D + 1 1^T / p_K) = det(D)(1 + sum_i x_i / p_K) = prod(1/x_i) / p_K
        return -torch.log(x).sum(-1) - torch.log(self._last(x)).squeeze(-1)

    def contains(self, x):
        return (x > 0).all(-1) & (x.sum(-1) < 1) & torch.isfinite(x).all(-1)

    def __repr__(self):
        return "SimplexEntropy()"
