"""The pyroforge model zoo (embedded data, reference posteriors) and the ``pyroforge`` CLI.

>>> import models
>>> models.names()                                     # doctest: +SKIP
>>> spec = models.get("gamma_poisson", device="cpu")   # a ModelSpec

The names below are imported on first use, so that ``pyroforge --help`` does not import torch.
"""

from importlib import import_module

__all__ = ["ModelSpec", "Reference", "get", "names", "register", "resolve_device"]

_HOME = {"ModelSpec": ".spec", "Reference": ".spec", "get": ".registry", "names": ".registry",
         "register": ".registry", "resolve_device": ".device"}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
