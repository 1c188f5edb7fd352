"""The pyroforge model zoo (embedded data, reference posteriors) and the ``pyroforge`` CLI.

>>> import models
>>> models.names()                                     # doctest: +SKIP
>>> spec = models.get("gamma_poisson", device="cpu")   # a ModelSpec
"""

from .device import resolve_device
from .registry import get, names, register
from .spec import ModelSpec, Reference

__all__ = ["ModelSpec", "Reference", "get", "names", "register", "resolve_device"]
