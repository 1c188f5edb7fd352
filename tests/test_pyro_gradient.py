# Copyright (c) 2017-2019 Uber Technologies, Inc.
# SPDX-License-Identifier: Apache-2.0
#
# Vendored from pyro-ppl 1.9.1 ``tests/infer/test_gradient.py`` (Apache-2.0) for pyroforge:
# only the tests that use ``Trace_ELBO`` or ``TraceGraph_ELBO`` are kept, with the other ELBOs
# removed from their parametrizations; everything else is Pyro's code, unchanged but for
# ruff's automatic style fixes;
# ``test_subsample_gradient_sequential`` (looped particles, subsampling; 8 x 20-70 s) is replaced
# by the cheaper, 4-standard-error ``test_vi_dropin.py::test_looped_subsample_gradient``.
# ``Trace_ELBO`` / ``TraceGraph_ELBO`` are the proxies of ``tests/pyro_dropin.py``: each case runs
# with Pyro's class (``pyro``) and with ``vi_estimators.ELBO()`` /
# ``vi_estimators.ELBO(rao_blackwellize="graph")`` in its place (``ours``), in float64 with
# warnings as errors, as Pyro's own suite runs.


import logging

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.optim
from pyro import poutine
from pyro.distributions.testing import fakes
from pyro.infer import (
    SVI,
    TraceEnum_ELBO,
    config_enumerate,
)
from pyro.optim import Adam
from pyro_dropin import (
    PYRO_FILTERWARNINGS,
    Trace_ELBO,
    TraceGraph_ELBO,
    assert_equal,
    mark_known_pyro_failure,
    xfail_if_not_implemented,
)
from pyro_dropin import implementation as dropin_implementation

logger = logging.getLogger(__name__)


pytestmark = PYRO_FILTERWARNINGS


@pytest.fixture(autouse=True, params=["pyro", "ours"])
def implementation(request):
    mark_known_pyro_failure(request)
    with dropin_implementation(request.param) as which:
        yield which


def DiffTrace_ELBO(*args, **kwargs):
    return Trace_ELBO(*args, **kwargs).differentiable_loss


@pytest.mark.parametrize(
    "reparameterized,has_rsample",
    [(True, None), (True, False), (True, True), (False, None)],
    ids=["reparam", "reparam-False", "reparam-True", "nonreparam"],
)
@pytest.mark.parametrize(
    "Elbo",
    [Trace_ELBO],
)
def test_particle_gradient(Elbo, reparameterized, has_rsample):
    pyro.clear_param_store()
    data = torch.tensor([-0.5, 2.0])
    Normal = dist.Normal if reparameterized else fakes.NonreparameterizedNormal

    def model():
        with pyro.plate("data", len(data)) as ind:
            x = data[ind]
            z = pyro.sample("z", Normal(0, 1))
            pyro.sample("x", Normal(z, 1), obs=x)

    def guide():
        scale = pyro.param("scale", lambda: torch.tensor([1.0]))
        with pyro.plate("data", len(data)):
            loc = pyro.param("loc", lambda: torch.zeros(len(data)), event_dim=0)
            z_dist = Normal(loc, scale)
            if has_rsample is not None:
                z_dist.has_rsample_(has_rsample)
            pyro.sample("z", z_dist)

    elbo = Elbo(
        max_plate_nesting=1,  # set this to ensure rng agrees across runs
        num_particles=1,
        strict_enumeration_warning=False,
    )

    # Elbo gradient estimator
    pyro.set_rng_seed(0)
    elbo.loss_and_grads(model, guide)
    params = dict(pyro.get_param_store().named_parameters())
    actual_grads = {name: param.grad.detach().cpu() for name, param in params.items()}

    # capture sample values and log_probs
    pyro.set_rng_seed(0)
    guide_tr = poutine.trace(guide).get_trace()
    model_tr = poutine.trace(poutine.replay(model, guide_tr)).get_trace()
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    x = data
    z = guide_tr.nodes["z"]["value"].data
    loc = pyro.param("loc").data
    scale = pyro.param("scale").data

    # expected grads
    if reparameterized and has_rsample is not False:
        # pathwise gradient estimator
        expected_grads = {
            "scale": (
                -(-z * (z - loc) + (x - z) * (z - loc) + 1).sum(0, keepdim=True) / scale
            ),
            "loc": -(-z + (x - z)),
        }
    else:
        # score function gradient estimator
        elbo = (
            model_tr.nodes["x"]["log_prob"].data
            + model_tr.nodes["z"]["log_prob"].data
            - guide_tr.nodes["z"]["log_prob"].data
        )
        dlogq_dloc = (z - loc) / scale**2
        dlogq_dscale = (z - loc) ** 2 / scale**3 - 1 / scale
        if Elbo is TraceEnum_ELBO:
            expected_grads = {
                "scale": -(dlogq_dscale * elbo - dlogq_dscale).sum(0, keepdim=True),
                "loc": -(dlogq_dloc * elbo - dlogq_dloc),
            }
        elif Elbo is Trace_ELBO:
            # expected value of dlogq_dscale and dlogq_dloc is zero
            expected_grads = {
                "scale": -(dlogq_dscale * elbo).sum(0, keepdim=True),
                "loc": -(dlogq_dloc * elbo),
            }

    for name in sorted(params):
        logger.info(f"expected {name} = {expected_grads[name]}")
        logger.info(f"actual   {name} = {actual_grads[name]}")

    assert_equal(actual_grads, expected_grads, prec=1e-4)


@pytest.mark.parametrize("scale", [1.0, 2.0], ids=["unscaled", "scaled"])
@pytest.mark.parametrize(
    "reparameterized,has_rsample",
    [(True, None), (True, False), (True, True), (False, None)],
    ids=["reparam", "reparam-False", "reparam-True", "nonreparam"],
)
@pytest.mark.parametrize("subsample", [False, True], ids=["full", "subsample"])
@pytest.mark.parametrize(
    "Elbo,local_samples",
    [(Trace_ELBO, False), (DiffTrace_ELBO, False), (TraceGraph_ELBO, False)],
)
def test_subsample_gradient(
    Elbo, reparameterized, has_rsample, subsample, local_samples, scale
):
    pyro.clear_param_store()
    data = torch.tensor([-0.5, 2.0])
    subsample_size = 1 if subsample else len(data)
    precision = 0.06 * scale
    Normal = dist.Normal if reparameterized else fakes.NonreparameterizedNormal

    def model(subsample):
        with pyro.plate("data", len(data), subsample_size, subsample) as ind:
            x = data[ind]
            z = pyro.sample("z", Normal(0, 1))
            pyro.sample("x", Normal(z, 1), obs=x)

    def guide(subsample):
        scale = pyro.param("scale", lambda: torch.tensor([1.0]))
        with pyro.plate("data", len(data), subsample_size, subsample):
            loc = pyro.param("loc", lambda: torch.zeros(len(data)), event_dim=0)
            z_dist = Normal(loc, scale)
            if has_rsample is not None:
                z_dist.has_rsample_(has_rsample)
            pyro.sample("z", z_dist)

    if scale != 1.0:
        model = poutine.scale(model, scale=scale)
        guide = poutine.scale(guide, scale=scale)

    num_particles = 50000
    if local_samples:
        guide = config_enumerate(guide, num_samples=num_particles)
        num_particles = 1

    optim = Adam({"lr": 0.1})
    elbo = Elbo(
        max_plate_nesting=1,  # set this to ensure rng agrees across runs
        num_particles=num_particles,
        vectorize_particles=True,
        strict_enumeration_warning=False,
    )
    inference = SVI(model, guide, optim, loss=elbo)
    with xfail_if_not_implemented():
        if subsample_size == 1:
            inference.loss_and_grads(
                model, guide, subsample=torch.tensor([0], dtype=torch.long)
            )
            inference.loss_and_grads(
                model, guide, subsample=torch.tensor([1], dtype=torch.long)
            )
        else:
            inference.loss_and_grads(
                model, guide, subsample=torch.tensor([0, 1], dtype=torch.long)
            )
    params = dict(pyro.get_param_store().named_parameters())
    normalizer = 2 if subsample else 1
    actual_grads = {
        name: param.grad.detach().cpu().numpy() / normalizer
        for name, param in params.items()
    }

    expected_grads = {
        "loc": scale * np.array([0.5, -2.0]),
        "scale": scale * np.array([2.0]),
    }
    for name in sorted(params):
        logger.info(f"expected {name} = {expected_grads[name]}")
        logger.info(f"actual   {name} = {actual_grads[name]}")
    assert_equal(actual_grads, expected_grads, prec=precision)


@pytest.mark.parametrize(
    "reparameterized", [True, False], ids=["reparam", "nonreparam"]
)
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, DiffTrace_ELBO, TraceGraph_ELBO]
)
def test_plate(Elbo, reparameterized):
    pyro.clear_param_store()
    data = torch.tensor([-0.5, 2.0])
    num_particles = 200000
    precision = 0.06
    Normal = dist.Normal if reparameterized else fakes.NonreparameterizedNormal

    def model():
        particles_plate = pyro.plate("particles", num_particles, dim=-2)
        data_plate = pyro.plate("data", len(data), dim=-1)

        pyro.sample("nuisance_a", Normal(0, 1))
        with particles_plate, data_plate:
            z = pyro.sample("z", Normal(0, 1))
        pyro.sample("nuisance_b", Normal(2, 3))
        with data_plate, particles_plate:
            pyro.sample("x", Normal(z, 1), obs=data)
        pyro.sample("nuisance_c", Normal(4, 5))

    def guide():
        loc = pyro.param("loc", torch.zeros(len(data)))
        scale = pyro.param("scale", torch.tensor([1.0]))

        pyro.sample("nuisance_c", Normal(4, 5))
        with (
            pyro.plate("particles", num_particles, dim=-2),
            pyro.plate("data", len(data), dim=-1),
        ):
            pyro.sample("z", Normal(loc, scale))
        pyro.sample("nuisance_b", Normal(2, 3))
        pyro.sample("nuisance_a", Normal(0, 1))

    optim = Adam({"lr": 0.1})
    elbo = Elbo(strict_enumeration_warning=False)
    inference = SVI(model, guide, optim, loss=elbo)
    inference.loss_and_grads(model, guide)
    params = dict(pyro.get_param_store().named_parameters())
    actual_grads = {
        name: param.grad.detach().cpu().numpy() / num_particles
        for name, param in params.items()
    }

    expected_grads = {"loc": np.array([0.5, -2.0]), "scale": np.array([2.0])}
    for name in sorted(params):
        logger.info(f"expected {name} = {expected_grads[name]}")
        logger.info(f"actual   {name} = {actual_grads[name]}")
    assert_equal(actual_grads, expected_grads, prec=precision)


@pytest.mark.parametrize(
    "reparameterized", [True, False], ids=["reparam", "nonreparam"]
)
@pytest.mark.parametrize(
    "Elbo", [Trace_ELBO, DiffTrace_ELBO, TraceGraph_ELBO]
)
def test_plate_elbo_vectorized_particles(Elbo, reparameterized):
    pyro.clear_param_store()
    data = torch.tensor([-0.5, 2.0])
    num_particles = 200000
    precision = 0.06
    Normal = dist.Normal if reparameterized else fakes.NonreparameterizedNormal

    def model():
        data_plate = pyro.plate("data", len(data))

        pyro.sample("nuisance_a", Normal(0, 1))
        with data_plate:
            z = pyro.sample("z", Normal(0, 1))
        pyro.sample("nuisance_b", Normal(2, 3))
        with data_plate:
            pyro.sample("x", Normal(z, 1), obs=data)
        pyro.sample("nuisance_c", Normal(4, 5))

    def guide():
        loc = pyro.param("loc", torch.zeros(len(data)))
        scale = pyro.param("scale", torch.tensor([1.0]))

        pyro.sample("nuisance_c", Normal(4, 5))
        with pyro.plate("data", len(data)):
            pyro.sample("z", Normal(loc, scale))
        pyro.sample("nuisance_b", Normal(2, 3))
        pyro.sample("nuisance_a", Normal(0, 1))

    optim = Adam({"lr": 0.1})
    loss = Elbo(
        num_particles=num_particles,
        vectorize_particles=True,
        strict_enumeration_warning=False,
    )
    inference = SVI(model, guide, optim, loss=loss)
    inference.loss_and_grads(model, guide)
    params = dict(pyro.get_param_store().named_parameters())
    actual_grads = {
        name: param.grad.detach().cpu().numpy() for name, param in params.items()
    }

    expected_grads = {"loc": np.array([0.5, -2.0]), "scale": np.array([2.0])}
    for name in sorted(params):
        logger.info(f"expected {name} = {expected_grads[name]}")
        logger.info(f"actual   {name} = {actual_grads[name]}")
    assert_equal(actual_grads, expected_grads, prec=precision)


