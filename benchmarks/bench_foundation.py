"""Day-one benchmark: Pyro NUTS vs Pyro SVI on the zoo's logistic regression (real data)."""

from __future__ import annotations

import pyro
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import models
from models.metrics import mean_error

from .harness import Target, benchmark


@benchmark("nuts_vs_svi_logistic", targets=[Target("pyro_svi", "pyro_nuts", "<=", 1.0)], repeats=3,
           warmup=1)
def nuts_vs_svi(quick: bool):
    """Pyro NUTS (draws) vs Pyro SVI (AutoNormal) to a posterior on logistic_regression.

    Each call is one whole fit; ``extra`` records the posterior-mean error in reference sds."""
    spec = models.get("logistic_regression", device="cpu")
    num_draws = 50 if quick else 300
    num_steps = 300 if quick else 2000
    ref_mean, ref_sd = spec.reference.mean(), {k: v.sqrt() for k, v in spec.reference.variance().items()}

    def nuts():
        mcmc = MCMC(NUTS(spec.model), num_samples=num_draws, warmup_steps=num_draws,
                    disable_progbar=True)
        mcmc.run(*spec.args, **spec.kwargs)
        draws = mcmc.get_samples()
        return {"mean_error_sd": mean_error(draws, ref_mean, ref_sd)}

    def svi():
        pyro.clear_param_store()
        guide = AutoNormal(spec.model)
        svi = SVI(spec.model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
        for _ in range(num_steps):
            svi.step(*spec.args, **spec.kwargs)
        draws = pyro.infer.Predictive(guide, num_samples=1000)(*spec.args, **spec.kwargs)
        return {"mean_error_sd": mean_error(draws, ref_mean, ref_sd)}

    return {"pyro_nuts": nuts, "pyro_svi": svi}
