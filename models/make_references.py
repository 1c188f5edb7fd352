"""Regenerate the stored NUTS reference draws of zoo models.

Usage::

    OMP_NUM_THREADS=1 python -m models.make_references NAME [--num-samples S] [--num-warmup W]
        [--num-chains C] [--seed SEED] [--progress]

``NAME`` is a zoo model with a NUTS reference (``all`` regenerates every one). Chains run one after
another in this process (chain ``c`` is seeded with ``SEED + c``) on the model's default options;
the draws of all chains are concatenated, cast to float32 and written with metadata (the exact
command, kernel settings, R-hat and ESS) to ``models/references/NAME.npz``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS, config_enumerate
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from . import registry
from .zoo._common import save_reference

# Per-model NUTS settings. ``enumerate``: wrap the model in ``config_enumerate`` so Pyro's NUTS
# sums out the discrete sites; ``caveat``: recorded in the reference note.
SETTINGS: dict[str, dict] = {
    "discrete_mixture": {"num_warmup": 500, "num_samples": 500, "num_chains": 2,
                         "enumerate": True},
    "eight_schools": {"num_warmup": 1000, "num_samples": 1000, "num_chains": 2,
                      "target_accept_prob": 0.9},
    "logistic_regression": {"num_warmup": 500, "num_samples": 500, "num_chains": 2},
    "sparse_logistic": {"num_warmup": 500, "num_samples": 500, "num_chains": 2,
                        "target_accept_prob": 0.9, "jit_compile": True},
    "bnn_regression": {
        "num_warmup": 500, "num_samples": 1000, "num_chains": 1, "max_tree_depth": 8,
        "jit_compile": True,
        "caveat": (
            "Caveat: the BNN posterior is multimodal (hidden-unit permutations and sign flips, "
            "plus genuinely different local fits); one NUTS chain explores one mode, so these "
            "draws represent a single mode, not the full posterior. Compare predictive "
            "quantities (e.g. held-out log-likelihood), not weight moments."
        ),
    },
}


def _postprocess_discrete_mixture(spec, draws: dict[str, torch.Tensor], seed: int) -> None:
    """Add exact draws of ``z`` given each (weights, locs) draw (z is summed out by NUTS)."""
    from .zoo.discrete_mixture import assignment_posterior

    (x,) = spec.args
    probs = assignment_posterior(x, draws["weights"], draws["locs"], spec.kwargs["obs_scale"])
    gen = torch.Generator().manual_seed(seed)
    S, N, K = probs.shape
    z = torch.multinomial(probs.reshape(S * N, K), 1, generator=gen).reshape(S, N)
    draws["z"] = z


POSTPROCESS = {"discrete_mixture": _postprocess_discrete_mixture}


def generate(
    name: str,
    num_samples: int | None = None,
    num_warmup: int | None = None,
    num_chains: int | None = None,
    seed: int = 0,
    progress: bool = False,
    command: str | None = None,
) -> dict[str, np.ndarray]:
    """Run NUTS on the default spec of ``name`` and store the draws; returns them."""
    if name not in SETTINGS:
        raise KeyError(f"model {name!r} has no NUTS reference; choose from {sorted(SETTINGS)}")
    settings = dict(SETTINGS[name])
    num_samples = num_samples or settings.pop("num_samples")
    num_warmup = num_warmup if num_warmup is not None else settings.pop("num_warmup")
    num_chains = num_chains or settings.pop("num_chains")
    settings.pop("num_samples", None), settings.pop("num_warmup", None)
    settings.pop("num_chains", None)
    enumerate_ = settings.pop("enumerate", False)
    caveat = settings.pop("caveat", "")

    spec = registry.get(name, with_reference=False)
    model = config_enumerate(spec.model, "parallel") if enumerate_ else spec.model
    kernel_kwargs = {"target_accept_prob": 0.8, "max_tree_depth": 10, **settings}
    if kernel_kwargs.get("jit_compile"):
        kernel_kwargs["ignore_jit_warnings"] = True
    chains = []
    start = time.time()
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=".*torch.jit.trace.*deprecated")
    for c in range(num_chains):
        pyro.set_rng_seed(seed + c)
        pyro.clear_param_store()
        kernel = NUTS(model, max_plate_nesting=spec.max_plate_nesting, **kernel_kwargs)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup,
                    disable_progbar=not progress)
        mcmc.run(*spec.args, **spec.kwargs)
        chains.append({k: v.detach() for k, v in mcmc.get_samples().items()})
    elapsed = time.time() - start
    by_chain = {k: torch.stack([ch[k] for ch in chains]) for k in chains[0]}
    diagnostics = {}
    for k, v in by_chain.items():
        flat = v.reshape(v.shape[0], v.shape[1], -1).double()
        ess = effective_sample_size(flat, chain_dim=0, sample_dim=1)
        entry = {"min_ess": round(float(ess.min()), 1)}
        if num_chains > 1:
            entry["max_rhat"] = round(float(split_gelman_rubin(flat, 0, 1).max()), 4)
        diagnostics[k] = entry
    draws = {k: v.reshape(-1, *v.shape[2:]) for k, v in by_chain.items()}
    if name in POSTPROCESS:
        POSTPROCESS[name](spec, draws, seed)
    arrays = {
        k: (v.float().numpy() if v.is_floating_point() else v.numpy().astype(np.int16))
        for k, v in draws.items()
    }
    meta = {
        "model": name,
        "options": spec.options["reference_options"],
        "num_samples": num_samples,
        "num_warmup": num_warmup,
        "num_chains": num_chains,
        "seed": seed,
        "kernel": {**kernel_kwargs, "enumerate": enumerate_},
        "diagnostics": diagnostics,
        "seconds": round(elapsed, 1),
        "versions": {"pyro": pyro.__version__, "torch": torch.__version__},
        "command": command or f"python -m models.make_references {name}",
        "caveat": caveat,
    }
    path = save_reference(name, arrays, meta)
    print(f"{name}: wrote {path} in {elapsed:.1f}s; diagnostics {diagnostics}")
    return arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.make_references", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"one of {sorted(SETTINGS)} or 'all'")
    parser.add_argument("--num-samples", type=int, default=None, help="draws per chain")
    parser.add_argument("--num-warmup", type=int, default=None)
    parser.add_argument("--num-chains", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show NUTS progress bars")
    args = parser.parse_args(argv)
    names = sorted(SETTINGS) if args.name == "all" else [args.name]
    for name in names:
        if name not in SETTINGS:
            parser.error(f"model {name!r} has no NUTS reference; choose from {sorted(SETTINGS)}")
    raw = argv if argv is not None else sys.argv[1:]
    for name in names:
        cmd_args = [name if a == "all" else a for a in raw]
        command = "python -m models.make_references " + " ".join(shlex.quote(a) for a in cmd_args)
        generate(name, args.num_samples, args.num_warmup, args.num_chains, args.seed,
                 args.progress, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
