"""Gradient-based samplers for Pyro models, and diagnostics shared by every sampler."""
from mcmc.bregman import (  # noqa: F401  (Bregman proximal Langevin: BMUMLA, MYULA)
    BregmanProximalLangevin,
    bmumla_step,
    bregman_proximal_gradient_step,
    envelope_grad,
    myula_step,
    sample_chains,
)
from mcmc.coin import CoinBetting, FunctionPotential  # noqa: F401  (coin sampling)
from mcmc.coin_ksdd import CoinKSDD  # noqa: F401
from mcmc.coin_msvgd import CoinMSVGD  # noqa: F401
from mcmc.coin_svgd import CoinSVGD  # noqa: F401
from mcmc.federated import (  # noqa: F401  (DSGLD / FSGLD)
    FederatedSGLD,
    ShardApproximation,
    fit_shard_approximation,
)
from mcmc.kernels import (  # noqa: F401  (Stein kernels, KSD)
    IMQKernel,
    RBFKernel,
    kernel_stein_discrepancy,
    ksd,
)
from mcmc.mirror import (  # noqa: F401  (mirror maps: Bregman samplers, Coin MSVGD)
    BoltzmannShannon,
    Burg,
    Euclidean,
    FermiDirac,
    Hypentropy,
    MirrorMap,
    SimplexEntropy,
)
from mcmc.potential import Potential, check_finite  # noqa: F401  (shared potential layer)
from mcmc.prox import (  # noqa: F401  (proximal operators, Euclidean and Bregman)
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
from mcmc.schedules import Constant, Cyclical, Polynomial  # noqa: F401  (step-size schedules)
from mcmc.sgld import (  # noqa: F401  (SGLD family: Pyro MCMCKernels + pure step functions)
    CVSGLD,
    SGLD,
    cv_gradient,
    find_mode,
    pSGLD,
    psgld_step,
    sgld_step,
)
