# Copyright (c) 2017-2019 Uber Technologies, Inc.
# SPDX-License-Identifier: Apache-2.0
#
# Vendored from pyro-ppl 1.9.1 ``tests/infer/test_valid_models.py`` (Apache-2.0) for pyroforge:
# only the tests that use ``Trace_ELBO`` or ``TraceGraph_ELBO`` are kept, with the other ELBOs
# removed from their parametrizations; everything else is Pyro's code, unchanged but for
# ruff's automatic style fixes.
# ``Trace_ELBO`` / ``TraceGraph_ELBO`` are the proxies of ``tests/pyro_dropin.py``: each case runs
# with Pyro's class (``pyro``) and with ``vi_estimators.ELBO()`` /
# ``vi_estimators.ELBO(rao_blackwellize="graph")`` in its place (``ours``), in float64 with
# warnings as errors, as Pyro's own suite runs.


import logging
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import (
    SVI,
    EnergyDistance,
    TraceEnum_ELBO,
    config_enumerate,
)
from pyro.infer.reparam import LatentStableReparam
from pyro.infer.tracetmc_elbo import TraceTMC_ELBO
from pyro.infer.util import torch_item
from pyro.optim import Adam
from pyro.poutine.plate_messenger import block_plate
from pyro_dropin import (
    PYRO_FILTERWARNINGS,
    Trace_ELBO,
    TraceGraph_ELBO,
    assert_close,
    mark_known_pyro_failure,
)
from pyro_dropin import implementation as dropin_implementation
from torch.distributions import constraints

logger = logging.getLogger(__name__)


pytestmark = PYRO_FILTERWARNINGS


@pytest.fixture(autouse=True, params=["pyro", "ours"])
def implementation(request):
    mark_known_pyro_failure(request)
    with dropin_implementation(request.param) as which:
        yield which

# This file tests a variety of model,guide pairs with valid and invalid structure.


def EnergyDistance_prior(**kwargs):
    kwargs["prior_scale"] = 0.0
    kwargs.pop("strict_enumeration_warning", None)
    return EnergyDistance(**kwargs)


def EnergyDistance_noprior(**kwargs):
    kwargs["prior_scale"] = 1.0
    kwargs.pop("strict_enumeration_warning", None)
    return EnergyDistance(**kwargs)


def assert_ok(model, guide, elbo, **kwargs):
    """
    Assert that inference works without warnings or errors.
    """
    pyro.clear_param_store()
    inference = SVI(model, guide, Adam({"lr": 1e-6}), elbo)
    inference.step(**kwargs)
    try:
        pyro.set_rng_seed(0)
        loss = elbo.loss(model, guide, **kwargs)
        if hasattr(elbo, "differentiable_loss"):
            try:
                pyro.set_rng_seed(0)
                differentiable_loss = torch_item(
                    elbo.differentiable_loss(model, guide, **kwargs)
                )
            except ValueError:
                pass  # Ignore cases where elbo cannot be differentiated
            else:
                assert_close(differentiable_loss, loss, atol=0.01)
        if hasattr(elbo, "loss_and_grads"):
            pyro.set_rng_seed(0)
            loss_and_grads = elbo.loss_and_grads(model, guide, **kwargs)
            assert_close(loss_and_grads, loss, atol=0.01)
    except NotImplementedError:
        pass  # Ignore cases where loss isn't implemented, eg. TraceTailAdaptive_ELBO


def assert_error(model, guide, elbo, match=None):
    """
    Assert that inference fails with an error.
    """
    pyro.clear_param_store()
    inference = SVI(model, guide, Adam({"lr": 1e-6}), elbo)
    with pytest.raises(
        (NotImplementedError, UserWarning, KeyError, ValueError, RuntimeError),
        match=match,
    ):
        inference.step()


def assert_warning(model, guide, elbo):
    """
    Assert that inference works but with a warning.
    """
    pyro.clear_param_store()
    inference = SVI(model, guide, Adam({"lr": 1e-6}), elbo)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        inference.step()
        assert len(w), "No warnings were raised"
        for warning in w:
            logger.info(warning)


@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO, TraceGraph_ELBO],
)
@pytest.mark.parametrize("strict_enumeration_warning", [True, False])
def test_nonempty_model_empty_guide_ok(Elbo, strict_enumeration_warning):
    def model():
        loc = torch.tensor([0.0, 0.0])
        scale = torch.tensor([1.0, 1.0])
        pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=loc)

    def guide():
        pass

    elbo = Elbo(strict_enumeration_warning=strict_enumeration_warning)
    if strict_enumeration_warning and Elbo in (TraceEnum_ELBO, TraceTMC_ELBO):
        assert_warning(model, guide, elbo)
    else:
        assert_ok(model, guide, elbo)


@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO, TraceGraph_ELBO],
)
@pytest.mark.parametrize("strict_enumeration_warning", [True, False])
def test_nonempty_model_empty_guide_error(Elbo, strict_enumeration_warning):
    def model():
        pyro.sample("x", dist.Normal(0, 1))

    def guide():
        pass

    elbo = Elbo(strict_enumeration_warning=strict_enumeration_warning)
    assert_error(model, guide, elbo)


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
@pytest.mark.parametrize("strict_enumeration_warning", [True, False])
def test_empty_model_empty_guide_ok(Elbo, strict_enumeration_warning):
    def model():
        pass

    def guide():
        pass

    elbo = Elbo(strict_enumeration_warning=strict_enumeration_warning)
    if strict_enumeration_warning and Elbo in (TraceEnum_ELBO, TraceTMC_ELBO):
        assert_warning(model, guide, elbo)
    else:
        assert_ok(model, guide, elbo)


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_variable_clash_in_model_error(Elbo):
    def model():
        p = torch.tensor(0.5)
        pyro.sample("x", dist.Bernoulli(p))
        pyro.sample("x", dist.Bernoulli(p))  # Should error here.

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        pyro.sample("x", dist.Bernoulli(p))

    assert_error(model, guide, Elbo(), match="Multiple sample sites named")


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_model_guide_dim_mismatch_error(Elbo):
    def model():
        loc = torch.zeros(2)
        scale = torch.ones(2)
        pyro.sample("x", dist.Normal(loc, scale).to_event(1))

    def guide():
        loc = pyro.param("loc", torch.zeros(2, 1, requires_grad=True))
        scale = pyro.param("scale", torch.ones(2, 1, requires_grad=True))
        pyro.sample("x", dist.Normal(loc, scale).to_event(2))

    assert_error(
        model,
        guide,
        Elbo(strict_enumeration_warning=False),
        match="invalid log_prob shape|Model and guide event_dims disagree",
    )


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_model_guide_shape_mismatch_error(Elbo):
    def model():
        loc = torch.zeros(1, 2)
        scale = torch.ones(1, 2)
        pyro.sample("x", dist.Normal(loc, scale).to_event(2))

    def guide():
        loc = pyro.param("loc", torch.zeros(2, 1, requires_grad=True))
        scale = pyro.param("scale", torch.ones(2, 1, requires_grad=True))
        pyro.sample("x", dist.Normal(loc, scale).to_event(2))

    assert_error(
        model,
        guide,
        Elbo(strict_enumeration_warning=False),
        match="Model and guide shapes disagree",
    )


@pytest.mark.parametrize("Elbo", [Trace_ELBO, TraceGraph_ELBO])
def test_variable_clash_in_guide_error(Elbo):
    def model():
        p = torch.tensor(0.5)
        pyro.sample("x", dist.Bernoulli(p))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        pyro.sample("x", dist.Bernoulli(p))
        pyro.sample("x", dist.Bernoulli(p))  # Should error here.

    assert_error(model, guide, Elbo(), match="Multiple sample sites named")


@pytest.mark.parametrize("has_rsample", [False, True])
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_set_has_rsample_ok(has_rsample, Elbo):
    # This model has sparse gradients, so users may want to disable
    # reparametrized sampling to reduce variance of gradient estimates.
    # However both versions should be correct, i.e. with or without has_rsample.
    def model():
        z = pyro.sample("z", dist.Normal(0, 1))
        loc = (z * 100).clamp(min=0, max=1)  # sparse gradients
        pyro.sample("x", dist.Normal(loc, 1), obs=torch.tensor(0.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1).has_rsample_(has_rsample))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo(strict_enumeration_warning=False))


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_not_has_rsample_ok(Elbo):
    def model():
        z = pyro.sample("z", dist.Normal(0, 1))
        p = z.round().clamp(min=0.2, max=0.8)  # discontinuous
        pyro.sample("x", dist.Bernoulli(p), obs=torch.tensor(0.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1).has_rsample_(False))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo(strict_enumeration_warning=False))


@pytest.mark.parametrize("subsample_size", [None, 2], ids=["full", "subsample"])
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_iplate_ok(subsample_size, Elbo):
    def model():
        p = torch.tensor(0.5)
        for i in pyro.plate("plate", 4, subsample_size):
            pyro.sample(f"x_{i}", dist.Bernoulli(p))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        for i in pyro.plate("plate", 4, subsample_size):
            pyro.sample(f"x_{i}", dist.Bernoulli(p))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_iplate_variable_clash_error(Elbo):
    def model():
        p = torch.tensor(0.5)
        for i in pyro.plate("plate", 2):
            # Each loop iteration should give the sample site a different name.
            pyro.sample("x", dist.Bernoulli(p))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        for i in pyro.plate("plate", 2):
            # Each loop iteration should give the sample site a different name.
            pyro.sample("x", dist.Bernoulli(p))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_error(model, guide, Elbo(), match="Multiple sample sites named")


@pytest.mark.parametrize("subsample_size", [None, 5], ids=["full", "subsample"])
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_plate_ok(subsample_size, Elbo):
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 10, subsample_size) as ind:
            pyro.sample("x", dist.Bernoulli(p).expand_by([len(ind)]))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        with pyro.plate("plate", 10, subsample_size) as ind:
            pyro.sample("x", dist.Bernoulli(p).expand_by([len(ind)]))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize("subsample_size", [None, 5], ids=["full", "subsample"])
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_plate_subsample_param_ok(subsample_size, Elbo):
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 10, subsample_size):
            pyro.sample("x", dist.Bernoulli(p))

    def guide():
        with pyro.plate("plate", 10, subsample_size) as ind:
            p0 = pyro.param("p0", torch.tensor(0.0), event_dim=0)
            assert p0.shape == ()
            p = pyro.param("p", 0.5 * torch.ones(10), event_dim=0)
            assert len(p) == len(ind)
            pyro.sample("x", dist.Bernoulli(p))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize("subsample_size", [None, 5], ids=["full", "subsample"])
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_plate_subsample_primitive_ok(subsample_size, Elbo):
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 10, subsample_size):
            pyro.sample("x", dist.Bernoulli(p))

    def guide():
        with pyro.plate("plate", 10, subsample_size) as ind:
            p0 = torch.tensor(0.0)
            p0 = pyro.subsample(p0, event_dim=0)
            assert p0.shape == ()
            p = 0.5 * torch.ones(10)
            p = pyro.subsample(p, event_dim=0)
            assert len(p) == len(ind)
            pyro.sample("x", dist.Bernoulli(p))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize("subsample_size", [None, 5], ids=["full", "subsample"])
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
@pytest.mark.parametrize(
    "shape,ok",
    [
        ((), True),
        ((1,), True),
        ((10,), True),
        ((3, 1), True),
        ((3, 10), True),
        ((5), False),
        ((3, 5), False),
    ],
)
def test_plate_param_size_mismatch_error(subsample_size, Elbo, shape, ok):
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 10, subsample_size):
            pyro.sample("x", dist.Bernoulli(p))

    def guide():
        with pyro.plate("plate", 10, subsample_size):
            pyro.param("p0", torch.ones(shape), event_dim=0)
            p = pyro.param("p", torch.ones(10), event_dim=0)
            pyro.sample("x", dist.Bernoulli(p))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    if ok:
        assert_ok(model, guide, Elbo())
    else:
        assert_error(model, guide, Elbo(), match="invalid shape of pyro.param")


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_plate_no_size_ok(Elbo):
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate"):
            pyro.sample("x", dist.Bernoulli(p).expand_by([10]))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        with pyro.plate("plate"):
            pyro.sample("x", dist.Bernoulli(p).expand_by([10]))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, default="parallel", num_samples=2)

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize("max_plate_nesting", [0, float("inf")])
@pytest.mark.parametrize("subsample_size", [None, 2], ids=["full", "subsample"])
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_iplate_iplate_ok(subsample_size, Elbo, max_plate_nesting):
    def model():
        p = torch.tensor(0.5)
        outer_iplate = pyro.plate("plate_0", 3, subsample_size)
        inner_iplate = pyro.plate("plate_1", 3, subsample_size)
        for i in outer_iplate:
            for j in inner_iplate:
                pyro.sample(f"x_{i}_{j}", dist.Bernoulli(p))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        outer_iplate = pyro.plate("plate_0", 3, subsample_size)
        inner_iplate = pyro.plate("plate_1", 3, subsample_size)
        for i in outer_iplate:
            for j in inner_iplate:
                pyro.sample(f"x_{i}_{j}", dist.Bernoulli(p))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide, "parallel")
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo(max_plate_nesting=max_plate_nesting))


@pytest.mark.parametrize("max_plate_nesting", [0, float("inf")])
@pytest.mark.parametrize("subsample_size", [None, 2], ids=["full", "subsample"])
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_iplate_iplate_swap_ok(subsample_size, Elbo, max_plate_nesting):
    def model():
        p = torch.tensor(0.5)
        outer_iplate = pyro.plate("plate_0", 3, subsample_size)
        inner_iplate = pyro.plate("plate_1", 3, subsample_size)
        for i in outer_iplate:
            for j in inner_iplate:
                pyro.sample(f"x_{i}_{j}", dist.Bernoulli(p))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        outer_iplate = pyro.plate("plate_0", 3, subsample_size)
        inner_iplate = pyro.plate("plate_1", 3, subsample_size)
        for j in inner_iplate:
            for i in outer_iplate:
                pyro.sample(f"x_{i}_{j}", dist.Bernoulli(p))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide, "parallel")
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, default="parallel", num_samples=2)

    assert_ok(model, guide, Elbo(max_plate_nesting=max_plate_nesting))


@pytest.mark.parametrize("subsample_size", [None, 5], ids=["full", "subsample"])
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_iplate_in_model_not_guide_ok(subsample_size, Elbo):
    def model():
        p = torch.tensor(0.5)
        for i in pyro.plate("plate", 10, subsample_size):
            pass
        pyro.sample("x", dist.Bernoulli(p))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        pyro.sample("x", dist.Bernoulli(p))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize("subsample_size", [None, 5], ids=["full", "subsample"])
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
@pytest.mark.parametrize("is_validate", [True, False])
def test_iplate_in_guide_not_model_error(subsample_size, Elbo, is_validate):
    def model():
        p = torch.tensor(0.5)
        pyro.sample("x", dist.Bernoulli(p))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        for i in pyro.plate("plate", 10, subsample_size):
            pass
        pyro.sample("x", dist.Bernoulli(p))

    with pyro.validation_enabled(is_validate):
        if is_validate:
            assert_error(
                model,
                guide,
                Elbo(),
                match="Found plate statements in guide but not model",
            )
        else:
            assert_ok(model, guide, Elbo())


@pytest.mark.parametrize("Elbo", [Trace_ELBO, TraceGraph_ELBO])
def test_plate_broadcast_error(Elbo):
    def model():
        p = torch.tensor(0.5, requires_grad=True)
        with pyro.plate("plate", 10, 5):
            pyro.sample("x", dist.Bernoulli(p).expand_by([2]))

    assert_error(model, model, Elbo(), match="Shape mismatch inside plate")


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_plate_iplate_ok(Elbo):
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 3, 2) as ind:
            for i in pyro.plate("iplate", 3, 2):
                pyro.sample(f"x_{i}", dist.Bernoulli(p).expand_by([len(ind)]))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        with pyro.plate("plate", 3, 2) as ind:
            for i in pyro.plate("iplate", 3, 2):
                pyro.sample(f"x_{i}", dist.Bernoulli(p).expand_by([len(ind)]))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_iplate_plate_ok(Elbo):
    def model():
        p = torch.tensor(0.5)
        inner_plate = pyro.plate("plate", 3, 2)
        for i in pyro.plate("iplate", 3, 2):
            with inner_plate as ind:
                pyro.sample(f"x_{i}", dist.Bernoulli(p).expand_by([len(ind)]))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        inner_plate = pyro.plate("plate", 3, 2)
        for i in pyro.plate("iplate", 3, 2):
            with inner_plate as ind:
                pyro.sample(f"x_{i}", dist.Bernoulli(p).expand_by([len(ind)]))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
@pytest.mark.parametrize("sizes", [(3,), (3, 4), (3, 4, 5)])
def test_plate_stack_ok(Elbo, sizes):
    def model():
        p = torch.tensor(0.5)
        with pyro.plate_stack("plate_stack", sizes):
            pyro.sample("x", dist.Bernoulli(p))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        with pyro.plate_stack("plate_stack", sizes):
            pyro.sample("x", dist.Bernoulli(p))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
@pytest.mark.parametrize("sizes", [(3,), (3, 4), (3, 4, 5)])
def test_plate_stack_and_plate_ok(Elbo, sizes):
    def model():
        p = torch.tensor(0.5)
        with pyro.plate_stack("plate_stack", sizes), pyro.plate("plate", 7):
            pyro.sample("x", dist.Bernoulli(p))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        with pyro.plate_stack("plate_stack", sizes), pyro.plate("plate", 7):
            pyro.sample("x", dist.Bernoulli(p))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(guide, num_samples=2)

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_nested_plate_plate_ok(Elbo):
    def model():
        p = torch.tensor(0.5, requires_grad=True)
        with pyro.plate("plate_outer", 10, 5) as ind_outer:
            pyro.sample("x", dist.Bernoulli(p).expand_by([len(ind_outer)]))
            with pyro.plate("plate_inner", 11, 6) as ind_inner:
                pyro.sample(
                    "y", dist.Bernoulli(p).expand_by([len(ind_inner), len(ind_outer)])
                )

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(model)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(model, num_samples=2)
    else:
        guide = model

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_plate_reuse_ok(Elbo):
    def model():
        p = torch.tensor(0.5, requires_grad=True)
        plate_outer = pyro.plate("plate_outer", 10, 5, dim=-1)
        plate_inner = pyro.plate("plate_inner", 11, 6, dim=-2)
        with plate_outer as ind_outer:
            pyro.sample("x", dist.Bernoulli(p).expand_by([len(ind_outer)]))
        with plate_inner as ind_inner:
            pyro.sample("y", dist.Bernoulli(p).expand_by([len(ind_inner), 1]))
        with plate_outer as ind_outer, plate_inner as ind_inner:
            pyro.sample(
                "z", dist.Bernoulli(p).expand_by([len(ind_inner), len(ind_outer)])
            )

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(model)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(model, num_samples=2)
    else:
        guide = model

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, TraceGraph_ELBO]
)
def test_nested_plate_plate_dim_error_1(Elbo):
    def model():
        p = torch.tensor([0.5], requires_grad=True)
        with pyro.plate("plate_outer", 10, 5) as ind_outer:
            pyro.sample(
                "x", dist.Bernoulli(p).expand_by([len(ind_outer)])
            )  # error here
            with pyro.plate("plate_inner", 11, 6) as ind_inner:
                pyro.sample("y", dist.Bernoulli(p).expand_by([len(ind_inner)]))
                pyro.sample(
                    "z", dist.Bernoulli(p).expand_by([len(ind_outer), len(ind_inner)])
                )

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(model)
    elif Elbo is TraceTMC_ELBO:
        guide = config_enumerate(model, num_samples=2)
    else:
        guide = model

    assert_error(model, guide, Elbo(), match="invalid log_prob shape")


@pytest.mark.parametrize("Elbo", [Trace_ELBO, TraceGraph_ELBO])
def test_nested_plate_plate_dim_error_2(Elbo):
    def model():
        p = torch.tensor([0.5], requires_grad=True)
        with pyro.plate("plate_outer", 10, 5) as ind_outer:
            pyro.sample("x", dist.Bernoulli(p).expand_by([len(ind_outer), 1]))
            with pyro.plate("plate_inner", 11, 6) as ind_inner:
                pyro.sample(
                    "y", dist.Bernoulli(p).expand_by([len(ind_outer)])
                )  # error here
                pyro.sample(
                    "z", dist.Bernoulli(p).expand_by([len(ind_outer), len(ind_inner)])
                )

    guide = config_enumerate(model) if Elbo is TraceEnum_ELBO else model
    assert_error(model, guide, Elbo(), match="Shape mismatch inside plate")


@pytest.mark.parametrize("Elbo", [Trace_ELBO, TraceGraph_ELBO])
def test_nested_plate_plate_dim_error_3(Elbo):
    def model():
        p = torch.tensor([0.5], requires_grad=True)
        with pyro.plate("plate_outer", 10, 5) as ind_outer:
            pyro.sample("x", dist.Bernoulli(p).expand_by([len(ind_outer), 1]))
            with pyro.plate("plate_inner", 11, 6) as ind_inner:
                pyro.sample("y", dist.Bernoulli(p).expand_by([len(ind_inner)]))
                pyro.sample(
                    "z", dist.Bernoulli(p).expand_by([len(ind_inner), 1])
                )  # error here

    guide = config_enumerate(model) if Elbo is TraceEnum_ELBO else model
    assert_error(model, guide, Elbo(), match="invalid log_prob shape|shape mismatch")


@pytest.mark.parametrize("Elbo", [Trace_ELBO, TraceGraph_ELBO])
def test_nested_plate_plate_dim_error_4(Elbo):
    def model():
        p = torch.tensor([0.5], requires_grad=True)
        with pyro.plate("plate_outer", 10, 5) as ind_outer:
            pyro.sample("x", dist.Bernoulli(p).expand_by([len(ind_outer), 1]))
            with pyro.plate("plate_inner", 11, 6) as ind_inner:
                pyro.sample("y", dist.Bernoulli(p).expand_by([len(ind_inner)]))
                pyro.sample(
                    "z", dist.Bernoulli(p).expand_by([len(ind_outer), len(ind_outer)])
                )  # error here

    guide = config_enumerate(model) if Elbo is TraceEnum_ELBO else model
    assert_error(model, guide, Elbo(), match="hape mismatch inside plate")


@pytest.mark.parametrize("Elbo", [Trace_ELBO, TraceGraph_ELBO])
def test_nested_plate_plate_subsample_param_ok(Elbo):
    def model():
        with pyro.plate("plate_outer", 10, 5):
            pyro.sample("x", dist.Bernoulli(0.2))
            with pyro.plate("plate_inner", 11, 6):
                pyro.sample("y", dist.Bernoulli(0.2))

    def guide():
        p0 = pyro.param("p0", 0.5 * torch.ones(4, 5), event_dim=2)
        assert p0.shape == (4, 5)
        with pyro.plate("plate_outer", 10, 5):
            p1 = pyro.param("p1", 0.5 * torch.ones(10, 3), event_dim=1)
            assert p1.shape == (5, 3)
            px = pyro.param("px", 0.5 * torch.ones(10), event_dim=0)
            assert px.shape == (5,)
            pyro.sample("x", dist.Bernoulli(px))
            with pyro.plate("plate_inner", 11, 6):
                py = pyro.param("py", 0.5 * torch.ones(11, 10), event_dim=0)
                assert py.shape == (6, 5)
                pyro.sample("y", dist.Bernoulli(py))

    if Elbo is TraceEnum_ELBO:
        guide = config_enumerate(guide)
    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize("Elbo", [Trace_ELBO, TraceGraph_ELBO])
def test_nonnested_plate_plate_ok(Elbo):
    def model():
        p = torch.tensor(0.5, requires_grad=True)
        with pyro.plate("plate_0", 10, 5) as ind1:
            pyro.sample("x0", dist.Bernoulli(p).expand_by([len(ind1)]))
        with pyro.plate("plate_1", 11, 6) as ind2:
            pyro.sample("x1", dist.Bernoulli(p).expand_by([len(ind2)]))

    guide = config_enumerate(model) if Elbo is TraceEnum_ELBO else model
    assert_ok(model, guide, Elbo())


def test_three_indep_plate_at_different_depths_ok():
    r"""
      /\
     /\ ia
    ia ia
    """

    def model():
        p = torch.tensor(0.5)
        inner_plate = pyro.plate("plate2", 10, 5)
        for i in pyro.plate("plate0", 2):
            pyro.sample(f"x_{i}", dist.Bernoulli(p))
            if i == 0:
                for j in pyro.plate("plate1", 2):
                    with inner_plate as ind:
                        pyro.sample(f"y_{j}", dist.Bernoulli(p).expand_by([len(ind)]))
            elif i == 1:
                with inner_plate as ind:
                    pyro.sample("z", dist.Bernoulli(p).expand_by([len(ind)]))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        inner_plate = pyro.plate("plate2", 10, 5)
        for i in pyro.plate("plate0", 2):
            pyro.sample(f"x_{i}", dist.Bernoulli(p))
            if i == 0:
                for j in pyro.plate("plate1", 2):
                    with inner_plate as ind:
                        pyro.sample(f"y_{j}", dist.Bernoulli(p).expand_by([len(ind)]))
            elif i == 1:
                with inner_plate as ind:
                    pyro.sample("z", dist.Bernoulli(p).expand_by([len(ind)]))

    assert_ok(model, guide, TraceGraph_ELBO())


def test_plate_wrong_size_error():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 10, 5) as ind:
            pyro.sample("x", dist.Bernoulli(p).expand_by([1 + len(ind)]))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        with pyro.plate("plate", 10, 5) as ind:
            pyro.sample("x", dist.Bernoulli(p).expand_by([1 + len(ind)]))

    assert_error(model, guide, TraceGraph_ELBO(), match="Shape mismatch inside plate")


def test_block_plate_name_ok():
    def model():
        a = pyro.sample("a", dist.Normal(0, 1))
        assert a.shape == ()
        with pyro.plate("plate", 2):
            b = pyro.sample("b", dist.Normal(0, 1))
            assert b.shape == (2,)
            with block_plate("plate"):
                c = pyro.sample("c", dist.Normal(0, 1))
                assert c.shape == ()

    def guide():
        c = pyro.sample("c", dist.Normal(0, 1))
        assert c.shape == ()
        with pyro.plate("plate", 2):
            b = pyro.sample("b", dist.Normal(0, 1))
            assert b.shape == (2,)
            with block_plate("plate"):
                a = pyro.sample("a", dist.Normal(0, 1))
                assert a.shape == ()

    assert_ok(model, guide, Trace_ELBO())


def test_block_plate_dim_ok():
    def model():
        a = pyro.sample("a", dist.Normal(0, 1))
        assert a.shape == ()
        with pyro.plate("plate", 2):
            b = pyro.sample("b", dist.Normal(0, 1))
            assert b.shape == (2,)
            with block_plate(dim=-1):
                c = pyro.sample("c", dist.Normal(0, 1))
                assert c.shape == ()

    def guide():
        c = pyro.sample("c", dist.Normal(0, 1))
        assert c.shape == ()
        with pyro.plate("plate", 2):
            b = pyro.sample("b", dist.Normal(0, 1))
            assert b.shape == (2,)
            with block_plate(dim=-1):
                a = pyro.sample("a", dist.Normal(0, 1))
                assert a.shape == ()

    assert_ok(model, guide, Trace_ELBO())


def test_block_plate_missing_error():
    def model():
        with block_plate("plate"):
            pyro.sample("a", dist.Normal(0, 1))

    def guide():
        pyro.sample("a", dist.Normal(0, 1))

    assert_error(model, guide, Trace_ELBO(), match="block_plate matched 0 messengers")


@pytest.mark.parametrize("enumerate_", [None, "sequential", "parallel"])
@pytest.mark.parametrize("Elbo", [Trace_ELBO, TraceGraph_ELBO])
def test_enum_discrete_misuse_warning(Elbo, enumerate_):
    def model():
        p = torch.tensor(0.5)
        pyro.sample("x", dist.Bernoulli(p))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, requires_grad=True))
        pyro.sample("x", dist.Bernoulli(p), infer={"enumerate": enumerate_})

    if (enumerate_ is None) == (Elbo is TraceEnum_ELBO):
        assert_warning(model, guide, Elbo(max_plate_nesting=0))
    else:
        assert_ok(model, guide, Elbo(max_plate_nesting=0))


def test_plate_shape_broadcasting():
    data = torch.ones(1000, 2)

    def model():
        with pyro.plate("num_particles", 10, dim=-3):
            with pyro.plate("components", 2, dim=-1):
                p = pyro.sample("p", dist.Beta(torch.tensor(1.1), torch.tensor(1.1)))
                assert p.shape == torch.Size((10, 1, 2))
            with pyro.plate("data", data.shape[0], dim=-2):
                pyro.sample("obs", dist.Bernoulli(p), obs=data)

    def guide():
        with pyro.plate("num_particles", 10, dim=-3), pyro.plate("components", 2, dim=-1):
            pyro.sample("p", dist.Beta(torch.tensor(1.1), torch.tensor(1.1)))

    assert_ok(model, guide, Trace_ELBO())


@pytest.mark.parametrize(
    "Elbo,expand",
    [(Trace_ELBO, False), (TraceGraph_ELBO, False)],
)
def test_dim_allocation_ok(Elbo, expand):
    enumerate_ = Elbo is TraceEnum_ELBO

    def model():
        p = torch.tensor(0.5, requires_grad=True)
        with pyro.plate("plate_outer", 10, 5, dim=-3):
            x = pyro.sample("x", dist.Bernoulli(p))
            with pyro.plate("plate_inner_1", 11, 6):
                y = pyro.sample("y", dist.Bernoulli(p))
                # allocated dim is rightmost available, i.e. -1
                with pyro.plate("plate_inner_2", 12, 7):
                    z = pyro.sample("z", dist.Bernoulli(p))
                    # allocated dim is next rightmost available, i.e. -2
                    # since dim -3 is already allocated, use dim=-4
                    with pyro.plate("plate_inner_3", 13, 8):
                        q = pyro.sample("q", dist.Bernoulli(p))

        # check shapes
        if enumerate_ and not expand:
            assert x.shape == (1, 1, 1)
            assert y.shape == (1, 1, 1)
            assert z.shape == (1, 1, 1)
            assert q.shape == (1, 1, 1, 1)
        else:
            assert x.shape == (5, 1, 1)
            assert y.shape == (5, 1, 6)
            assert z.shape == (5, 7, 6)
            assert q.shape == (8, 5, 7, 6)

    guide = (
        config_enumerate(model, "sequential", expand=expand) if enumerate_ else model
    )
    assert_ok(model, guide, Elbo(max_plate_nesting=4))


@pytest.mark.parametrize(
    "Elbo,expand",
    [(Trace_ELBO, False), (TraceGraph_ELBO, False)],
)
def test_dim_allocation_error(Elbo, expand):
    enumerate_ = Elbo is TraceEnum_ELBO

    def model():
        p = torch.tensor(0.5, requires_grad=True)
        with pyro.plate("plate_outer", 10, 5, dim=-2):
            x = pyro.sample("x", dist.Bernoulli(p))
            # allocated dim is rightmost available, i.e. -1
            with pyro.plate("plate_inner_1", 11, 6):
                y = pyro.sample("y", dist.Bernoulli(p))
                # throws an error as dim=-1 is already occupied
                with pyro.plate("plate_inner_2", 12, 7, dim=-1):
                    pyro.sample("z", dist.Bernoulli(p))

        # check shapes
        if enumerate_ and not expand:
            assert x.shape == (1, 1)
            assert y.shape == (1, 1)
        else:
            assert x.shape == (5, 1)
            assert y.shape == (5, 6)

    guide = config_enumerate(model, expand=expand) if Elbo is TraceEnum_ELBO else model
    assert_error(model, guide, Elbo(), match="collide at dim=")


@pytest.mark.parametrize("Elbo", [Trace_ELBO, TraceGraph_ELBO])
def test_vectorized_num_particles(Elbo):
    data = torch.ones(1000, 2)

    def model():
        with pyro.plate("components", 2):
            p = pyro.sample("p", dist.Beta(torch.tensor(1.1), torch.tensor(1.1)))
            assert p.shape == torch.Size((10, 1, 2))
            with pyro.plate("data", data.shape[0]):
                pyro.sample("obs", dist.Bernoulli(p), obs=data)

    def guide():
        with pyro.plate("components", 2):
            pyro.sample("p", dist.Beta(torch.tensor(1.1), torch.tensor(1.1)))

    pyro.clear_param_store()
    guide = config_enumerate(guide) if Elbo is TraceEnum_ELBO else guide
    assert_ok(
        model,
        guide,
        Elbo(
            num_particles=10,
            vectorize_particles=True,
            max_plate_nesting=2,
            strict_enumeration_warning=False,
        ),
    )


@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO, TraceGraph_ELBO],
)
def test_factor_in_model_ok(Elbo):
    def model():
        pyro.factor("f", torch.tensor(0.0))

    def guide():
        pass

    elbo = Elbo(strict_enumeration_warning=False)
    assert_ok(model, guide, elbo)


@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO, TraceGraph_ELBO],
)
def test_factor_in_guide_error(Elbo):
    def model():
        pass

    def guide():
        pyro.factor("f", torch.tensor(0.0))

    elbo = Elbo(strict_enumeration_warning=False)
    assert_error(model, guide, elbo, match=".*missing specification of has_rsample.*")


@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO, TraceGraph_ELBO],
)
@pytest.mark.parametrize("has_rsample", [False, True])
def test_factor_in_guide_ok(Elbo, has_rsample):
    def model():
        pass

    def guide():
        pyro.factor("f", torch.tensor(0.0), has_rsample=has_rsample)

    elbo = Elbo(strict_enumeration_warning=False)
    assert_ok(model, guide, elbo)


@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO],
)
def test_reparam_ok(Elbo):
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(0.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("x", dist.Normal(loc, 1.0))

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize("mask", [True, False, torch.tensor(True), torch.tensor(False)])
@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO],
)
def test_reparam_mask_ok(Elbo, mask):
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(0.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("x", dist.Normal(loc, 1.0))

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize(
    "mask",
    [
        True,
        False,
        torch.tensor(True),
        torch.tensor(False),
        torch.tensor([False, True]),
    ],
)
@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO],
)
def test_reparam_mask_plate_ok(Elbo, mask):
    data = torch.randn(2, 3).exp()
    data /= data.sum(-1, keepdim=True)

    def model():
        c = pyro.sample("c", dist.LogNormal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", len(data)), poutine.mask(mask=mask):
            pyro.sample("obs", dist.Dirichlet(c), obs=data)

    def guide():
        loc = pyro.param("loc", torch.zeros(3))
        scale = pyro.param("scale", torch.ones(3), constraint=constraints.positive)
        pyro.sample("c", dist.LogNormal(loc, scale).to_event(1))

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize("num_particles", [1, 2])
@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor(True),
        torch.tensor(False),
        torch.tensor([True]),
        torch.tensor([False]),
        torch.tensor([False, True, False]),
    ],
)
@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO, TraceGraph_ELBO],
)
def test_obs_mask_ok(Elbo, mask, num_particles):
    data = torch.tensor([7.0, 7.0, 7.0])

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with pyro.plate("plate", len(data)):
            y = pyro.sample("y", dist.Normal(x, 1.0), obs=data, obs_mask=mask)
            assert ((y == data) == mask).all()

    def guide():
        loc = pyro.param("loc", torch.zeros(()))
        scale = pyro.param("scale", torch.ones(()), constraint=constraints.positive)
        x = pyro.sample("x", dist.Normal(loc, scale))
        with pyro.plate("plate", len(data)), poutine.mask(mask=~mask):
            pyro.sample("y_unobserved", dist.Normal(x, 1.0))

    elbo = Elbo(
        num_particles=num_particles,
        vectorize_particles=True,
        strict_enumeration_warning=False,
    )
    assert_ok(model, guide, elbo)


@pytest.mark.parametrize("num_particles", [1, 2])
@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor(True),
        torch.tensor(False),
        torch.tensor([True]),
        torch.tensor([False]),
        torch.tensor([False, True, True, False]),
    ],
)
@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO, TraceGraph_ELBO],
)
def test_obs_mask_multivariate_ok(Elbo, mask, num_particles):
    data = torch.full((4, 3), 7.0)

    def model():
        x = pyro.sample("x", dist.MultivariateNormal(torch.zeros(3), torch.eye(3)))
        with pyro.plate("plate", len(data)):
            y = pyro.sample(
                "y", dist.MultivariateNormal(x, torch.eye(3)), obs=data, obs_mask=mask
            )
            assert ((y == data).all(-1) == mask).all()

    def guide():
        loc = pyro.param("loc", torch.zeros(3))
        cov = pyro.param("cov", torch.eye(3), constraint=constraints.positive_definite)
        x = pyro.sample("x", dist.MultivariateNormal(loc, cov))
        with pyro.plate("plate", len(data)), poutine.mask(mask=~mask):
            pyro.sample("y_unobserved", dist.MultivariateNormal(x, torch.eye(3)))

    elbo = Elbo(
        num_particles=num_particles,
        vectorize_particles=True,
        strict_enumeration_warning=False,
    )
    assert_ok(model, guide, elbo)


@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO, TraceGraph_ELBO],
)
def test_obs_mask_multivariate_error(Elbo):
    data = torch.full((3, 2), 7.0)
    # This mask is invalid because it includes event shape.
    mask = torch.tensor([[False, False], [False, True], [True, False]])

    def model():
        x = pyro.sample("x", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))
        with pyro.plate("plate", len(data)):
            pyro.sample(
                "y", dist.MultivariateNormal(x, torch.eye(2)), obs=data, obs_mask=mask
            )

    def guide():
        loc = pyro.param("loc", torch.zeros(2))
        x = pyro.sample("x", dist.MultivariateNormal(loc, torch.eye(2)))
        with pyro.plate("plate", len(data)), poutine.mask(mask=~mask):
            pyro.sample("y_unobserved", dist.MultivariateNormal(x, torch.eye(2)))

    elbo = Elbo(strict_enumeration_warning=False)
    assert_error(model, guide, elbo, match="Invalid obs_mask shape")


@pytest.mark.parametrize("scale", [1, 0.1, torch.tensor(0.5)])
@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO],
)
def test_reparam_scale_ok(Elbo, scale):
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with poutine.scale(scale=scale):
            pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(0.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("x", dist.Normal(loc, 1.0))

    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize(
    "scale",
    [
        1,
        0.1,
        torch.tensor(0.5),
        torch.tensor([0.1, 0.9]),
    ],
)
@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO],
)
def test_reparam_scale_plate_ok(Elbo, scale):
    data = torch.randn(2, 3).exp()
    data /= data.sum(-1, keepdim=True)

    def model():
        c = pyro.sample("c", dist.LogNormal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", len(data)), poutine.scale(scale=scale):
            pyro.sample("obs", dist.Dirichlet(c), obs=data)

    def guide():
        loc = pyro.param("loc", torch.zeros(3))
        scale = pyro.param("scale", torch.ones(3), constraint=constraints.positive)
        pyro.sample("c", dist.LogNormal(loc, scale).to_event(1))

    assert_ok(model, guide, Elbo())


def test_reparam_stable():
    @poutine.reparam(config={"z": LatentStableReparam()})
    def model():
        stability = pyro.sample("stability", dist.Uniform(0.0, 2.0))
        skew = pyro.sample("skew", dist.Uniform(-1.0, 1.0))
        y = pyro.sample("z", dist.Stable(stability, skew))
        pyro.sample("x", dist.Poisson(y.abs()), obs=torch.tensor(1.0))

    def guide():
        pyro.sample("stability", dist.Delta(torch.tensor(1.5)))
        pyro.sample("skew", dist.Delta(torch.tensor(0.0)))
        pyro.sample("z_uniform", dist.Delta(torch.tensor(0.1)))
        pyro.sample("z_exponential", dist.Delta(torch.tensor(1.0)))

    assert_ok(model, guide, Trace_ELBO())


def test_ordered_logistic_plate():
    N = 5  # num data points/batch size
    K = 4  # num categories
    data = (K * torch.rand(N)).long().float()

    def model():
        predictor = pyro.sample(
            "predictor", dist.Normal(0.0, 1.0).expand([N]).to_event(1)
        )
        cutpoints = pyro.sample(
            "cutpoints", dist.Normal(0.0, 1.0).expand([K - 1]).to_event(1)
        )
        # would have identifiability issues, but this isn't a real model...
        cutpoints = torch.sort(cutpoints, dim=-1).values
        with pyro.plate("obs_plate", N):
            pyro.sample("obs", dist.OrderedLogistic(predictor, cutpoints), obs=data)

    def guide():
        # parameters
        pred_mu = pyro.param("pred_mu", torch.zeros(N))
        pred_std = pyro.param("pred_std", torch.ones(N))
        cp_mu = pyro.param("cp_mu", torch.zeros(K - 1))
        cp_std = pyro.param("cp_std", torch.ones(K - 1))
        # sample
        pyro.sample("predictor", dist.Normal(pred_mu, pred_std).to_event(1))
        pyro.sample("cutpoints", dist.Normal(cp_mu, cp_std).to_event(1))

    assert_ok(model, guide, Trace_ELBO())
