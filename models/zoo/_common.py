"""Helpers shared by the zoo modules: data files, stored NUTS references, batching, splits.

Batching convention
-------------------
Zoo models follow Pyro's broadcasting layout. A global latent site with event shape ``S`` has
value shape ``S`` when the model runs plainly, and ``(*B, 1, ..., 1, *S)`` (``max_plate_nesting``
singleton plate dims) when it runs under extra left batch plates, as under
``Trace_ELBO(vectorize_particles=True)``, :class:`pyro.infer.Predictive` or a chain-vectorised
potential (``mcmc.potential.Potential``). :func:`strip_plate_dims` turns such a value into
``(*B, *S)`` so matrix products against the data broadcast cleanly.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..spec import Reference

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
REFERENCE_DIR = Path(__file__).resolve().parent.parent / "references"

__all__ = [
    "DATA_DIR",
    "REFERENCE_DIR",
    "DataFileError",
    "load_npz",
    "load_reference",
    "save_reference",
    "split_indices",
    "standardise",
    "strip_plate_dims",
]


class DataFileError(RuntimeError):
    """A data or reference file shipped with the zoo is missing or unreadable."""


def load_npz(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Load every array of the ``.npz`` file ``path`` (relative paths are under ``models/data``).

    Raises :class:`DataFileError` naming the file if it is missing, is not a valid ``.npz``
    archive, or lacks one of ``keys``.
    """
    path = Path(path)
    if not path.is_absolute():
        path = DATA_DIR / path
    if not path.is_file():
        raise DataFileError(f"data file {str(path)!r} is missing (the package install is broken)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataFileError(f"data file {str(path)!r} is corrupt or unreadable: {exc}") from exc
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataFileError(f"data file {str(path)!r} lacks the array(s) {missing}")
    return arrays


def load_table(
    filename: str, shape: tuple[int, int], heldout_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An embedded ``(X, y)`` table split into train/held-out rows, as float64 tensors.

    Checks the stored shapes (``X`` is ``shape``, ``y`` has ``shape[0]`` rows) and raises a
    ``ValueError`` naming the file otherwise. Returns ``(X_train, y_train, X_heldout, y_heldout)``.
    """
    arrays = load_npz(filename, keys=("X", "y"))
    X = torch.as_tensor(arrays["X"], dtype=torch.float64)
    y = torch.as_tensor(arrays["y"], dtype=torch.float64)
    if tuple(X.shape) != tuple(shape) or tuple(y.shape) != (shape[0],):
        raise ValueError(f"{filename} has unexpected shapes X {tuple(X.shape)}, "
                         f"y {tuple(y.shape)}; expected {tuple(shape)} and ({shape[0]},)")
    train, test = split_indices(X.shape[0], heldout_fraction, seed)
    return X[train], y[train], X[test], y[test]


def split_indices(n: int, heldout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random (train, heldout) split of ``range(n)``, reproducible across platforms."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    num_heldout = round(heldout_fraction * n)
    return perm[num_heldout:].sort().values, perm[:num_heldout].sort().values


def standardise(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Centre and scale columns with the *training* mean and standard deviation (no leakage)."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((t - mean) / std for t in (train, *others))


def strip_plate_dims(value: torch.Tensor, event_dim: int, num_plate_dims: int = 1) -> torch.Tensor:
    """Drop the singleton plate dims a global site carries under a batch plate.

    ``value`` has shape ``S`` (plain run, ``len(S) == event_dim``) or ``(*B, 1, ..., 1, *S)``
    (Pyro's layout under vectorised particles/chains); the result is ``S`` or ``(*B, *S)``.
    """
    for _ in range(num_plate_dims):
        pos = value.dim() - event_dim - 1
        if pos >= 0 and value.shape[pos] == 1:
            value = value.squeeze(pos)
    return value


# ----------------------------------------------------------------------------- references


def reference_path(name: str) -> Path:
    return REFERENCE_DIR / f"{name}.npz"


def save_reference(name: str, draws: dict[str, np.ndarray], meta: dict) -> Path:
    """Write draws + metadata to ``models/references/NAME.npz`` atomically (temp + rename)."""
    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    path = reference_path(name)
    tmp = path.with_suffix(".tmp.npz")
    arrays = {f"draws/{k}": v for k, v in draws.items()}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def load_reference(
    name: str, options: dict | None = None, *, enabled: bool = True
) -> tuple[Reference | None, str]:
    """Load the stored NUTS reference of model ``name`` as ``(Reference, note)``.

    ``enabled=False`` (a builder's ``with_reference=False``) skips the file: ``(None, reason)``.

    The stored draws were produced for the options recorded in the file; if ``options`` (the
    spec's options that change the posterior) differ from them, the reference does not apply
    and ``(None, reason)`` is returned. A missing or corrupt file raises :class:`DataFileError`.
    """
    if not enabled:
        return None, "not loaded (with_reference=False)"
    arrays = load_npz(reference_path(name), keys=("meta",))
    meta = json.loads(str(arrays["meta"]))
    if options is not None:
        stored = meta.get("options", {})
        differ = {k: v for k, v in options.items() if stored.get(k) != v}
        if differ:
            return None, (
                f"the stored NUTS reference of {name!r} was made with options {stored}; "
                f"this spec uses {differ}, so no reference applies (regenerate with "
                f"`python -m models.make_references {name}` after changing the defaults)"
            )
    draws = {
        k.split("/", 1)[1]: torch.as_tensor(v) for k, v in arrays.items() if k.startswith("draws/")
    }
    draws = {k: v.float() if v.is_floating_point() else v.long() for k, v in draws.items()}
    note = (
        f"Pyro NUTS draws: {meta['num_chains']} chain(s) x {meta['num_samples']} draws after "
        f"{meta['num_warmup']} warmup steps, seed {meta['seed']}, "
        f"settings {meta.get('kernel', {})}; regenerate with `{meta['command']}`. "
        f"Diagnostics at generation: {meta.get('diagnostics', {})}. {meta.get('caveat', '')}"
    ).strip()
    return Reference(kind="nuts", draws=draws, note=note), note


def analytic_reference(
    analytic: dict[str, torch.distributions.Distribution], note: str, num_draws: int = 4000,
    seed: int = 0,
) -> Reference:
    """A :class:`Reference` with exact posteriors and ``num_draws`` seeded draws from them.

    The draws come from a forked RNG, so building a spec never disturbs the global seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draws = {k: d.sample((num_draws,)).float() for k, d in analytic.items()}
    analytic = {k: _cast_distribution(d) for k, d in analytic.items()}
    return Reference(kind="analytic", draws=draws, analytic=analytic, note=note)


def _cast_distribution(d: torch.distributions.Distribution) -> torch.distributions.Distribution:
    # Posteriors are computed in float64 for accuracy and stored as float32 like the data
    # (``models.get(..., dtype=torch.float64)`` casts them back).
    from ..spec import _move_distribution

    return _move_distribution(d, torch.device("cpu"), torch.float32)


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
