"""Gradient-based samplers for any Pyro model that NUTS runs on, and their shared pieces.

* potential layer: :class:`Potential` (one chain as NUTS runs it; chains vectorised by a chain
  plate, ``torch.func.vmap`` or a loop; minibatches the Pyro way);
* one chain driver: :class:`ChainDriver` / :class:`LangevinKernel` (warm-up, thinning,
  progress bar, NaN checks, checkpoints);
* mode, curvature, Laplace approximation and default step sizes: :mod:`mcmc.laplace`;
* samplers: SGLD family, federated SGLD, Bregman proximal Langevin, coin sampling;
* their building blocks: step functions, schedules, proximal terms, mirror maps, Stein kernels.

Vocabulary used everywhere: ``step_size``, ``thinning``, ``num_chains``, ``num_samples``,
``warmup_steps``, ``subsample_size``, ``seed``.
"""

from mcmc.bregman import (
    BregmanProximalLangevin,
    bmumla_step,
    bregman_proximal_gradient_step,
    envelope_grad,
    myula_step,
)
from mcmc.chains import ChainDriver, LangevinKernel
from mcmc.coin import CoinBetting, FunctionPotential
from mcmc.coin_ksdd import CoinKSDD
from mcmc.coin_msvgd import CoinMSVGD
from mcmc.coin_svgd import CoinSVGD
from mcmc.federated import FederatedSGLD, ShardApproximation, fit_shard_approximation
from mcmc.kernels import IMQKernel, RBFKernel, kernel_stein_discrepancy, ksd
from mcmc.laplace import (
    Laplace,
    default_step_size,
    find_mode,
    gradient_noise,
    hessian,
    hessian_diagonal,
    hessian_vector_product,
    laplace_approximation,
    largest_eigenvalue,
    minibatch_gradients,
)
from mcmc.mirror import (
    BoltzmannShannon,
    Burg,
    Euclidean,
    FermiDirac,
    Hypentropy,
    MirrorMap,
    SimplexEntropy,
)
from mcmc.potential import Potential, check_finite
from mcmc.prox import (
    L1,
    L2,
    TV1D,
    Box,
    GroupL1,
    NonNegative,
    NonsmoothTerm,
    Simplex,
    supported_pairs,
)
from mcmc.schedules import ConstantSchedule, CyclicalSchedule, PolynomialSchedule
from mcmc.sgld import CVSGLD, SGLD, cv_gradient, pSGLD, psgld_step, sgld_step

__all__ = [
    "CVSGLD",
    "L1",
    "L2",
    "SGLD",
    "TV1D",
    "BoltzmannShannon",
    "Box",
    "BregmanProximalLangevin",
    "Burg",
    "ChainDriver",
    "CoinBetting",
    "CoinKSDD",
    "CoinMSVGD",
    "CoinSVGD",
    "ConstantSchedule",
    "CyclicalSchedule",
    "Euclidean",
    "FederatedSGLD",
    "FermiDirac",
    "FunctionPotential",
    "GroupL1",
    "Hypentropy",
    "IMQKernel",
    "LangevinKernel",
    "Laplace",
    "MirrorMap",
    "NonNegative",
    "NonsmoothTerm",
    "PolynomialSchedule",
    "Potential",
    "RBFKernel",
    "ShardApproximation",
    "Simplex",
    "SimplexEntropy",
    "bmumla_step",
    "bregman_proximal_gradient_step",
    "check_finite",
    "cv_gradient",
    "default_step_size",
    "envelope_grad",
    "find_mode",
    "fit_shard_approximation",
    "gradient_noise",
    "hessian",
    "hessian_diagonal",
    "hessian_vector_product",
    "kernel_stein_discrepancy",
    "ksd",
    "laplace_approximation",
    "largest_eigenvalue",
    "minibatch_gradients",
    "myula_step",
    "pSGLD",
    "psgld_step",
    "sgld_step",
    "supported_pairs",
]
