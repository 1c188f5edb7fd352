"""Fast path gradients for normalising flows (Vaitl et al., "Fast and Unified Path Gradient
Estimators for Normalizing Flows", ICLR 2024).

:func:`flow_sample_and_score` propagates ``(x, log q(x), d log q / dx)`` forward through a chain
of transforms, so the path gradient needs no inverse pass; :func:`fast_path_surrogate` (reverse
KL) and :func:`forward_kl_path_surrogate` (maximum likelihood) build scalar surrogates whose
``.backward()`` gives those gradients. :func:`fast_flow_site_log_prob` is the same rule for a flow
site of a guide trace right after sampling (the transforms' caches still hold the sampling pass);
:func:`vi_estimators.path.stopped_log_prob` uses it automatically (``USE_FAST_FLOW_PATH``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from pyro.distributions.util import scale_and_mask
from torch.distributions import transforms as T

from .stopping import with_stopped_params

__all__ = [
    "USE_FAST_FLOW_PATH",
    "FlowPathGradient",
    "dropin_stopped_log_prob",
    "fast_flow_site_log_prob",
    "fast_path_surrogate",
    "flow_sample_and_score",
    "forward_kl_path_surrogate",
    "stopped_flow_call",
    "supported_flow_transforms",
]


# ---------------------------------------------------------------------------------------------
# Fast path gradients for normalising flows (Vaitl et al., ICLR 2024)
# ---------------------------------------------------------------------------------------------
#
# For x_{l+1} = T_l(x_l) and log q_{l+1}(x_{l+1}) = log q_l(x_l) - log|det J_l(x_l)|, the score
# of the flow density follows the *forward* recursion (Vaitl et al. 2024, sec. 3, eq. 9)
#
#     s_{l+1} = J_l(x_l)^{-T} (s_l - grad_x log|det J_l(x_l)|),     s_0 = grad log q_0(x_0),
#
# computed alongside sampling, so the path gradient (s_L - grad log p(x_L))^T dx_L/dtheta needs no
# inverse pass. J^{-T} is cheap for the layers below: diagonal (elementwise), a permutation, or
# block-triangular with a diagonal block (coupling layers):
#     J = [[K, 0], [A, D]]  =>  w_b = u_b / D,  w_a = (u_a - A^T w_b) / K,
# where A^T w_b is one vector-Jacobian product through the conditioner network (w.r.t. its input
# only). Affine autoregressive layers solve the triangular system by Jacobi sweeps (exact after at
# most d sweeps of one VJP each). Scores carry no graph: they are stopped-parameter quantities.
#
# The forward-KL (maximum-likelihood) path gradient (Vaitl et al. 2024, sec. 4) is
#     grad KL(p || q_theta) = E_p[(grad_{x0} log p0(x0) - grad log q_0(x0))^T dx0/dtheta],
# with x0 = T^{-1}(x), p0 the target pulled back to the base space, and its score given by the
# backward recursion v_l = J_l^T v_{l+1} + grad log|det J_l(x_l)|, v_L = grad log p(x): VJPs only.


def _elementwise_types() -> tuple[type, ...]:
    types = [T.ExpTransform, T.AffineTransform, T.SigmoidTransform, T.TanhTransform,
             T.PowerTransform, T.SoftplusTransform]
    try:
        from pyro.distributions.transforms import SoftplusTransform as PyroSoftplus

        types.append(PyroSoftplus)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def supported_flow_transforms() -> tuple[str, ...]:
    """Names of the transform classes with a fast (inverse-free) path-gradient rule."""
    names = [t.__name__ for t in _elementwise_types()]
    names += ["AffineCoupling", "SplineCoupling", "AffineAutoregressive", "Permute",
              "ComposeTransform", "ComposeTransformModule", "IndependentTransform"]
    return tuple(dict.fromkeys(names))


def _flatten_transforms(transforms) -> list:
    out = []
    for t in transforms:
        if isinstance(t, T.ComposeTransform):  # includes ComposeTransformModule
            out.extend(_flatten_transforms(t.parts))
        elif isinstance(t, T.IndependentTransform):
            out.extend(_flatten_transforms([t.base_transform]))
        else:
            out.append(t)
    return out


def _layer_kind(t) -> str | None:
    from pyro.distributions.transforms import (
        AffineAutoregressive,
        AffineCoupling,
        Permute,
        SplineCoupling,
    )

    if isinstance(t, AffineCoupling):
        return "affine_coupling" if t.dim == -1 else None
    if isinstance(t, SplineCoupling):
        return "spline_coupling"
    if isinstance(t, AffineAutoregressive):
        return "affine_autoregressive"
    if isinstance(t, Permute):
        return "permute" if t.dim == -1 else None
    if isinstance(t, _elementwise_types()):
        return "elementwise"
    if isinstance(t, T._InverseTransform) and isinstance(t._inv, _elementwise_types()):
        return "elementwise"
    return None


def _vjp(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(output, x, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _score_step(t, kind: str, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One step of the forward score recursion: ``s_y = J^{-T} (s_x - grad_x log|det J|)``.

    ``x`` must require grad and ``y = t(x)`` must have been computed from it (its graph is reused).
    """
    if kind == "permute":
        return s.index_select(-1, t.permutation)
    if kind == "elementwise":
        ladj = t.log_abs_det_jacobian(x, y)
        dydx = _vjp(y.sum(), x)
        g_ladj = _vjp(ladj.sum(), x) if ladj.requires_grad else torch.zeros_like(x)
        return (s - g_ladj) / dydx
    if kind == "affine_coupling":
        k = t.split_dim
        log_scale = t._cached_log_scale
        w_b = s[..., k:] * torch.exp(-log_scale.detach())
        # d/dx_a [sum log_scale + y_b . w_b] = grad_a log|det J| + A^T w_b (one VJP)
        g = _vjp(log_scale.sum() + (y[..., k:] * w_b).sum(), x)
        return torch.cat([s[..., :k] - g[..., :k], w_b], dim=-1)
    if kind == "spline_coupling":
        k = t.split_dim
        ld = t._cache_log_detJ  # elementwise log-derivatives: [upper (x_b) | lower (x_a)]
        nb = y.size(-1) - k
        ld_b = ld[..., :nb]
        ld_a = ld[..., nb:] if not t.identity else None
        u = s - _vjp(ld.sum(), x)
        w_b = u[..., k:] * torch.exp(-ld_b.detach())
        at_w = _vjp((y[..., k:] * w_b).sum(), x)[..., :k]
        w_a = u[..., :k] - at_w
        if ld_a is not None:
            w_a = w_a * torch.exp(-ld_a.detach())
        return torch.cat([w_a, w_b], dim=-1)
    if kind == "affine_autoregressive":
        log_scale = t._cached_log_scale
        if log_scale is None:  # sigmoid-stable variant caches differently: recompute generically
            raise NotImplementedError
        inv_d = torch.exp(-log_scale.detach())
        u = s - _vjp(log_scale.sum(), x)
        # J = D + A (A strictly triangular in the autoregressive order): Jacobi sweeps
        # w <- w + D^{-1} (u - J^T w) converge exactly in at most d sweeps.
        w = u * inv_d
        for _ in range(x.size(-1)):
            jt_w = _vjp((y * w).sum(), x)
            w_new = w + (u - jt_w) * inv_d
            done = bool(((w_new - w).abs() <= 1e-12 * w_new.abs().clamp_min(1.0)).all())
            w = w_new
            if done:
                break
        return w
    raise NotImplementedError(kind)


_WARNED: set[str] = set()


def _warn_once(name: str) -> None:
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"fast path gradient: transform {name} has no inverse-free score rule; falling back "
            "to the drop-in (inverse-based) path gradient for flows containing it. Supported: "
            + ", ".join(supported_flow_transforms()),
            stacklevel=3,
        )


def _flow_parts(d: torch.distributions.Distribution):
    """(base, flat transforms, event reinterpretation of the base) of a TransformedDistribution."""
    if not isinstance(d, torch.distributions.TransformedDistribution):
        raise TypeError(
            f"expected a TransformedDistribution (a normalising flow), got {type(d).__name__}"
        )
    return d.base_dist, _flatten_transforms(d.transforms)


def _unsupported(transforms) -> list[str]:
    return [type(t).__name__ for t in transforms if _layer_kind(t) is None]


def _base_score(base, x0: torch.Tensor) -> torch.Tensor:
    """grad_x log q_0(x) (x only; base parameters do not matter for the score's value)."""
    with torch.enable_grad():
        x = x0.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(base.log_prob(x).sum(), x)
    return g


def _transform_modules(transforms) -> torch.nn.ModuleList:
    return torch.nn.ModuleList([t for t in transforms if isinstance(t, torch.nn.Module)])


def stopped_flow_call(d, fn):
    """Evaluate ``fn()`` with the parameters of every transform module of ``d`` detached."""
    mods = _transform_modules(_flatten_transforms(d.transforms))
    return with_stopped_params(mods, lambda _mods: fn(), pyro_params=True)


def dropin_stopped_log_prob(d, x: torch.Tensor) -> torch.Tensor:
    """The drop-in path-gradient ingredient: ``log q_{stop(theta)}(x)`` via the inverse pass.

    Gradient flows through ``x`` only (transform parameters detached; a fresh view of ``x``
    defeats the transforms' ``y -> x`` caches so the inverse is really recomputed).
    """
    return stopped_flow_call(d, lambda: d.log_prob(x.view_as(x)))


def flow_sample_and_score(
    d: torch.distributions.TransformedDistribution, sample_shape: tuple = ()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample a flow and compute ``grad_x log q_{stop(theta)}(x)`` by the forward recursion.

    Returns ``(x, log_q, score)``: ``x`` is the reparameterised sample (attached to the flow's
    parameters), ``log_q`` its log-density (attached, as from the forward log-det terms) and
    ``score`` the detached score at stopped parameters. Transforms without a fast rule trigger a
    one-time warning naming them and the score is computed by the drop-in inverse pass.
    """
    base, transforms = _flow_parts(d)
    x = base.rsample(sample_shape)
    bad = _unsupported(transforms)
    fast = not bad
    if bad:
        for name in bad:
            _warn_once(name)
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        log_q = base.log_prob(x)
        s = _base_score(base, x) if fast else None
        event_dim = len(d.event_shape)
        for t in transforms:
            y = t(x)
            ladj = t.log_abs_det_jacobian(x, y)
            extra = event_dim - t.codomain.event_dim
            if extra > 0 and ladj.dim() >= extra:
                ladj = ladj.sum(tuple(range(-extra, 0)))
            log_q = log_q - ladj
            if fast:
                try:
                    s = _score_step(t, _layer_kind(t), x, y, s)
                except NotImplementedError:
                    _warn_once(type(t).__name__)
                    fast = False
            x = y
    if not fast:
        with torch.enable_grad():
            xv = x.detach().requires_grad_(True)
            try:
                lq_stop = dropin_stopped_log_prob(d, xv)
            except (KeyError, NotImplementedError) as e:
                raise ValueError(
                    "path gradient: the flow's log-density cannot be evaluated at stopped "
                    f"parameters (no inverse for {', '.join(bad) or 'a transform'}: {e}); use a "
                    "standard reparameterised gradient for this guide"
                ) from e
            (s,) = torch.autograd.grad(lq_stop.sum(), xv)
    return x, log_q, s.detach()


def fast_path_surrogate(
    d: torch.distributions.TransformedDistribution,
    log_p: Callable[[torch.Tensor], torch.Tensor],
    sample_shape: tuple = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse-KL path-gradient surrogate for a flow ``q`` and target log-density ``log_p``.

    Returns ``(loss, x)``: ``loss`` has the value of the Monte-Carlo estimate of
    ``KL(q || p) = E_q[log q - log p]`` (batch mean) and its gradient is the path gradient
    ``E[(grad log q_{stop}(x) - grad log p(x))^T dx/dtheta]`` with the score from
    :func:`flow_sample_and_score` (no inverse pass).
    """
    x, log_q, score = flow_sample_and_score(d, sample_shape)
    lp = log_p(x)
    path = (score * x).sum(-1) if len(d.event_shape) else score * x
    kl = log_q.detach() - lp
    return (kl + path - path.detach()).mean(), x


def forward_kl_path_surrogate(
    d: torch.distributions.TransformedDistribution,
    x: torch.Tensor,
    target_score: torch.Tensor,
) -> torch.Tensor:
    """Forward-KL (maximum-likelihood) path-gradient surrogate from target samples and scores.

    Args:
        d: the flow ``q_theta`` (a TransformedDistribution of invertible transforms).
        x: ``(N, D)`` samples from the target ``p``.
        target_score: ``grad log p(x)`` at those samples.

    Returns:
        A scalar whose value is the negative log-likelihood ``-mean log q(x)`` (KL(p||q) up to
        the constant ``E_p log p``) and whose gradient is the path gradient of ``KL(p || q)``:
        ``E_p[(grad_{x0} log p0(x0) - grad log q_0(x0))^T dx0/dtheta]`` with ``x0 = T^{-1}(x)``
        (sec. 4 of Vaitl et al. 2024). The score ``grad log p0`` is propagated backwards by
        vector-Jacobian products only.
    """
    base, transforms = _flow_parts(d)
    event_dim = len(d.event_shape)
    with torch.enable_grad():
        y = x.detach().requires_grad_(True)
        xs, ladj_total = [], 0.0
        # inverse pass (attached to the parameters): x_L = x -> ... -> x_0
        for t in reversed(transforms):
            x_prev = t.inv(y)
            ladj = t.log_abs_det_jacobian(x_prev, y)
            extra = event_dim - t.codomain.event_dim
            if extra > 0 and ladj.dim() >= extra:
                ladj = ladj.sum(tuple(range(-extra, 0)))
            ladj_total = ladj_total + ladj
            xs.append(x_prev)
            y = x_prev
        x0 = y
        log_q = base.log_prob(x0) - ladj_total
        # backward score recursion v_l = J_l^T v_{l+1} + grad log|det J_l| at stopped params:
        v = target_score.detach()
        for t, x_l in zip(reversed(transforms), xs):
            v = _vjp_step(t, x_l, v)
        s0 = _base_score(base, x0)
    path = ((v - s0) * x0).sum(-1) if event_dim else (v - s0) * x0
    nll = -log_q.detach()
    return (nll + path - path.detach()).mean()


def _vjp_step(t, x_l: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J^T v + grad_x log|det J|`` at ``x_l`` (stopped parameters; one local forward + VJP)."""
    if _layer_kind(t) == "permute":
        inv = torch.argsort(t.permutation)
        return v.index_select(-1, inv)
    xd = x_l.detach().requires_grad_(True)
    yd = t(xd)
    ladj = t.log_abs_det_jacobian(xd, yd)
    (g,) = torch.autograd.grad((yd * v).sum() + ladj.sum(), xd)
    return g


class FlowPathGradient:
    """Callable bundle of the flow path-gradient estimators (for objectives and benchmarks).

    ``FlowPathGradient(fast=True)(d, log_p, sample_shape)`` returns the reverse-KL surrogate
    ``(loss, x)``: the fast forward-recursion estimator, or with ``fast=False`` the drop-in one
    (inverse pass at stopped parameters).
    """

    def __init__(self, fast: bool = True):
        self.fast = fast

    def __call__(self, d, log_p, sample_shape=()):
        if self.fast:
            return fast_path_surrogate(d, log_p, sample_shape)
        x = d.rsample(sample_shape)
        lq = dropin_stopped_log_prob(d, x)
        return (lq - log_p(x)).mean(), x


#: Use the fast (cache-based, inverse-free) path gradient for flow sites in
#: :func:`stopped_log_prob` when possible; set to False to force the drop-in inverse pass.
USE_FAST_FLOW_PATH = True


def _fast_supported_layer(t) -> bool:
    """Supported and *unconditional* (its parameters are its own, not an upstream latent's)."""
    from pyro.distributions.transforms import AffineAutoregressive, AffineCoupling, SplineCoupling

    kind = _layer_kind(t)
    if kind is None:
        return False
    if isinstance(t, AffineCoupling):
        return isinstance(t.nn, torch.nn.Module)
    if isinstance(t, AffineAutoregressive):
        return isinstance(t.arn, torch.nn.Module)
    if isinstance(t, SplineCoupling):
        return type(t) is SplineCoupling
    if kind == "elementwise":
        inner = t._inv if isinstance(t, T._InverseTransform) else t
        tensors = [v for v in vars(inner).values() if isinstance(v, torch.Tensor)]
        return not any(v.requires_grad for v in tensors)
    return True


def fast_flow_site_log_prob(site) -> torch.Tensor | None:
    """Scaled/masked log q of a flow site with the fast path gradient, or ``None`` (fallback).

    Applies when the site's value is the output of the sampling pass still held in the
    transforms' ``y -> x`` caches (so every layer's input is recovered without an inverse), the
    base distribution's parameters are constants and every layer is supported.
    """
    fn, value = site["fn"], site["value"]
    if not isinstance(fn, torch.distributions.TransformedDistribution) or site["args"] or \
            site["kwargs"] or not isinstance(value, torch.Tensor) or not value.requires_grad:
        return None
    base, transforms = fn.base_dist, _flatten_transforms(fn.transforms)
    if not transforms or not all(_fast_supported_layer(t) for t in transforms):
        return None
    base_params = [v for v in vars(base).values() if isinstance(v, torch.Tensor)]
    inner = getattr(base, "base_dist", None)
    if inner is not None:
        base_params += [v for v in vars(inner).values() if isinstance(v, torch.Tensor)]
    if any(v.requires_grad for v in base_params):
        return None
    # cache walk: value = y_L, x_l = cached input of layer l
    xs, y = [], value
    for t in reversed(transforms):
        cached = getattr(t, "_cached_x_y", None)
        if cached is None or cached[1] is not y:
            return None
        xs.append(cached[0])
        y = cached[0]
    xs.reverse()
    with torch.enable_grad():
        s = _base_score(base, xs[0])
        for i, t in enumerate(transforms):
            x = xs[i]
            y = xs[i + 1] if i + 1 < len(xs) else value
            if not x.requires_grad:  # a constant base draw: recompute this layer from a leaf
                x = x.detach().requires_grad_(True)
                y = t(x)
            try:
                s = _score_step(t, _layer_kind(t), x, y, s)
            except NotImplementedError:  # no cached quantities for this layer: drop-in path
                return None
        with torch.no_grad():
            lp = fn.log_prob(value)
    event_dims = tuple(range(-len(fn.event_shape), 0))
    path = s.detach() * (value - value.detach())
    path = path.sum(event_dims) if event_dims else path
    return scale_and_mask(lp + path, site["scale"], site["mask"])

