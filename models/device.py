"""Device resolution: the one place that turns ``"auto" | "cpu" | "cuda"`` into a ``torch.device``.

Algorithms in :mod:`vi_estimators` and :mod:`mcmc` never pick a device themselves: they follow the
tensors they are given. Only user-facing entry points (model specs, the CLI, benchmarks) resolve a
device name, and they all do it here.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return the ``torch.device`` named by ``device``.

    ``"auto"`` (or ``None``) picks CUDA when available and CPU otherwise; ``"cuda"`` or
    ``"cuda:N"`` without a usable CUDA device raises a ``RuntimeError`` that says so.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a device; choose one of {', '.join(DEVICE_CHOICES)}"
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={device!r} was requested but CUDA is not available "
                "(torch.cuda.is_available() is False); use --device cpu or --device auto"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif resolved.type != "cpu":
        raise ValueError(f"device={device!r} is not supported; choose one of {DEVICE_CHOICES}")
    return resolved
