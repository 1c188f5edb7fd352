# Copyright (c) 2017-2019 Uber Technologies, Inc.
# Copyright Contributors to the Pyro project.
# SPDX-License-Identifier: Apache-2.0
#
# The assertion helpers below are adapted from pyro-ppl 1.9.1 ``tests/common.py`` (Apache-2.0).
"""Support for the vendored Pyro inference tests (``test_pyro_valid_models.py``,
``test_pyro_gradient.py``): every case runs twice, with Pyro's ELBO and with ours in its place.

``Trace_ELBO`` and ``TraceGraph_ELBO`` in those files are :class:`DropIn` proxies: the
``implementation`` fixture of each module (parameters ``pyro`` and ``ours``) makes them build
``pyro.infer.Trace_ELBO`` / ``TraceGraph_ELBO`` or ``vi_estimators.ELBO()`` /
``vi_estimators.ELBO(rao_blackwellize="graph")``. Nothing is fetched at test time.
"""

from __future__ import annotations

import contextlib
import numbers

import numpy as np
import pyro.infer
import pytest
import torch
from pytest import approx

import vi_estimators as vi

# Pyro's setup.cfg: warnings are errors in its test suite (its ELBOs *warn* on some invalid
# models, and the tests expect an exception), except these.
PYRO_FILTERWARNINGS = pytest.mark.filterwarnings(
    "error",
    "ignore:numpy.ufunc size changed:RuntimeWarning",
    "ignore:numpy.dtype size changed:RuntimeWarning",
    "ignore:Mixed memory format inputs detected:UserWarning",
    "ignore:Setting attributes on ParameterDict:UserWarning",
    "ignore::DeprecationWarning",
    "ignore:CUDA initialization:UserWarning",
)


class DropIn:
    """Stands for a Pyro ELBO class in the vendored tests; builds Pyro's or ours."""

    def __init__(self, name: str, pyro_cls, ours):
        self.__name__ = name
        self.pyro_cls, self.ours = pyro_cls, ours
        self.use_ours = False

    def __call__(self, *args, **kwargs):
        return (self.ours if self.use_ours else self.pyro_cls)(*args, **kwargs)

    def __repr__(self) -> str:
        return self.__name__


Trace_ELBO = DropIn("Trace_ELBO", pyro.infer.Trace_ELBO, vi.ELBO)
TraceGraph_ELBO = DropIn("TraceGraph_ELBO", pyro.infer.TraceGraph_ELBO,
                         lambda **kw: vi.ELBO(rao_blackwellize="graph", **kw))


#: Cases that Pyro's own ELBOs fail at this suite's seed (0; ``tests/conftest.py``). In
#: ``test_subsample_gradient`` every non-reparameterised case checks a 50 000-particle
#: score-function gradient against a tolerance of 0.06: over seeds 0..11 the ``scale`` gradient of
#: Pyro's ``Trace_ELBO`` (no baseline) has sd 0.063 (3 of 12 seeds miss, seed 0 among them: 2.095
#: vs 2.0), ours 0.040 (leave-one-out baselines; 2 of 12 miss, seed 0 passes). Pyro's cases are
#: marked xfail (not strict); ours must pass.
KNOWN_PYRO_FAILURES = {
    "test_subsample_gradient": ("nonreparam", "reparam-False"),
}


def mark_known_pyro_failure(request) -> None:
    """Mark the Pyro run of a case listed in :data:`KNOWN_PYRO_FAILURES` as an expected failure."""
    if request.param != "pyro":
        return
    cases = KNOWN_PYRO_FAILURES.get(request.node.originalname, ())
    if any(f"-{c}-" in request.node.name for c in cases):
        request.applymarker(pytest.mark.xfail(
            reason="Pyro's own estimator misses this statistical test's tolerance at seed 0",
            strict=False))


@contextlib.contextmanager
def implementation(which: str):
    """Run the drop-in proxies as ``which`` ("pyro" or "ours") in float64 (Pyro's test dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    for proxy in (Trace_ELBO, TraceGraph_ELBO):
        proxy.use_ours = which == "ours"
    try:
        yield which
    finally:
        for proxy in (Trace_ELBO, TraceGraph_ELBO):
            proxy.use_ours = False
        torch.set_default_dtype(old)


def xfail_param(*args, **kwargs):
    kwargs.setdefault("reason", "unknown")
    return pytest.param(*args, marks=[pytest.mark.xfail(**kwargs)])


@contextlib.contextmanager
def xfail_if_not_implemented(msg="Not implemented"):
    try:
        yield
    except NotImplementedError as e:
        pytest.xfail(reason=f"{msg}: {e}")


def assert_close(actual, expected, atol=1e-7, rtol=0, msg=""):
    if not msg:
        msg = f"{actual} vs {expected}"
    if isinstance(actual, numbers.Number) and isinstance(expected, numbers.Number):
        assert actual == approx(expected, abs=atol, rel=rtol), msg
    elif type(actual) is not type(expected):
        raise AssertionError(f"cannot compare {type(actual)} and {type(expected)}")
    elif torch.is_tensor(actual):
        assert actual.shape == expected.shape, msg
        prec = atol + rtol * expected.abs() if rtol > 0 else atol
        diff = (actual - expected.type_as(actual)).abs()
        assert (diff <= prec).all(), msg
    elif isinstance(actual, np.ndarray):
        np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True,
                                   err_msg=msg)
    elif isinstance(actual, dict):
        assert set(actual.keys()) == set(expected.keys())
        for key, x_val in actual.items():
            assert_close(x_val, expected[key], atol=atol, rtol=rtol,
                         msg=f"At key {key!r}: {x_val} vs {expected[key]}")
    else:
        assert actual == expected, msg


def assert_equal(actual, expected, prec=1e-5, msg=""):
    assert prec > 0.0, "the vendored tests compare with a tolerance"
    return assert_close(actual, expected, atol=prec, msg=msg)
