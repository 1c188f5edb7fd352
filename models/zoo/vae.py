"""``vae_digits``: a small variational auto-encoder on the 8x8 digits set.

Data: 1797 handwritten digits, 8x8 grey levels 0..16 (UCI optical recognition of handwritten
digits, test part, via scikit-learn; see ``models/data/README.md``), scaled to [0, 1] and
binarised at 0.5, split 80/20 (fixed seed) into train/held-out.

Model: ``z_n ~ N(0, I_L)``, ``x_n ~ Bernoulli(logits = decoder(z_n))`` (64 pixels, independent),
with the decoder an MLP ``L -> hidden -> 64`` registered as ``pyro.module("decoder", ...)`` (its
weights are point-estimated by SVI). The default guide (:class:`DigitsEncoderGuide`) is amortised:
``q(z_n | x_n) = N(mu(x_n), diag sigma(x_n)^2)`` from an MLP ``64 -> hidden -> 2L``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..registry import register
from ..spec import ModelSpec
from ._common import load_npz, split_indices

HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, labels_train, x_heldout, labels_heldout)``; pixels binarised (float 0/1)."""
    arrays = load_npz("digits.npz", keys=("X", "y"))
    X = torch.as_tensor(arrays["X"].astype("float32")) / 16.0
    labels = torch.as_tensor(arrays["y"].astype("int64"))
    if X.shape != (1797, 64) or labels.shape != (1797,):
        raise ValueError(f"digits.npz has unexpected shapes X {tuple(X.shape)}, "
                         f"y {tuple(labels.shape)}; expected (1797, 64) and (1797,)")
    X = (X > 0.5).float()
    train, test = split_indices(X.shape[0], HELDOUT_FRACTION, SPLIT_SEED)
    return X[train], labels[train], X[test], labels[test]


class Decoder(nn.Module):
    """``z (..., L) -> logits (..., 64)`` through one tanh hidden layer."""

    def __init__(self, latent_dim: int, hidden_dim: int, data_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, data_dim)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class DigitsEncoderGuide(nn.Module):
    """Amortised guide ``q(z_n | x_n) = N(loc(x_n), diag scale(x_n)^2)``.

    Call it like the model: ``guide(x, decoder, subsample_size=None)``. The encoder is registered
    with ``pyro.module("encoder", ...)``; it follows the data's device and dtype on first use.
    """

    def __init__(self, latent_dim: int, hidden_dim: int, data_dim: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Linear(data_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 2 * latent_dim)
        )

    def forward(
        self, x: torch.Tensor, decoder: nn.Module | None = None, subsample_size: int | None = None
    ) -> None:
        first = next(self.parameters())
        if first.device != x.device or first.dtype != x.dtype:
            self.to(device=x.device, dtype=x.dtype)
        pyro.module("encoder", self)
        with pyro.plate(
            "data", x.shape[0], subsample_size=subsample_size, device=x.device
        ) as idx:
            loc, raw_scale = self.net(x[idx]).split(self.latent_dim, -1)
            scale = nn.functional.softplus(raw_scale) + 1e-4
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def vae_model(x: torch.Tensor, decoder: nn.Module, subsample_size: int | None = None) -> None:
    """``z_n ~ N(0, I)``, ``x_n ~ Bernoulli(logits=decoder(z_n))`` in the ``data`` plate."""
    pyro.module("decoder", decoder)
    latent_dim = decoder.net[0].in_features
    with pyro.plate(
        "data", x.shape[0], subsample_size=subsample_size, device=x.device
    ) as idx:
        z = pyro.sample(
            "z", dist.Normal(x.new_zeros(latent_dim), x.new_ones(latent_dim)).to_event(1)
        )
        pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x[idx])


class _EncoderFactory:
    """Picklable ``guide_factory``: a fresh encoder guide (seeded init) for each call."""

    def __init__(self, latent_dim: int, hidden_dim: int, seed: int):
        self.latent_dim, self.hidden_dim, self.seed = latent_dim, hidden_dim, seed

    def __call__(self, model) -> DigitsEncoderGuide:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            return DigitsEncoderGuide(self.latent_dim, self.hidden_dim)


@register("vae_digits")
def build_vae_digits(latent_dim: int = 4, hidden_dim: int = 64, seed: int = 0) -> ModelSpec:
    """VAE on binarised 8x8 digits (1438 train / 359 held-out images)."""
    if latent_dim < 1 or hidden_dim < 1:
        raise ValueError(f"vae_digits: latent_dim={latent_dim} and hidden_dim={hidden_dim} "
                         "must be >= 1")
    x, _, x_test, _ = digits()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = Decoder(latent_dim, hidden_dim)
    return ModelSpec(
        name="vae_digits",
        model=vae_model,
        args=(x,),
        kwargs={"decoder": decoder},
        guide_factory=_EncoderFactory(latent_dim, hidden_dim, seed),
        reference=None,
        reference_note=(
            "no reference: the decoder weights are learned (point estimates), so there is no "
            "fixed posterior to compare with; judge by the held-out ELBO / log-likelihood"
        ),
        latent_sites={"z": (x.shape[0], latent_dim)},
        max_plate_nesting=1,
        data_size=x.shape[0],
        supports_subsampling=True,
        heldout=((x_test,), {"decoder": decoder}),
        observed={"x": x},
        # Digit labels (for plotting the latent space): models.zoo.vae.digits().
        options={"latent_dim": latent_dim, "hidden_dim": hidden_dim, "seed": seed},
        description=(
            f"VAE on binarised 8x8 digits: z ~ N(0, I_{latent_dim}), x ~ Bernoulli(decoder(z)) "
            "(MLP decoder, pyro.module 'decoder'); default guide: amortised MLP encoder "
            "(pyro.module 'encoder'). No reference posterior."
        ),
    )
