"""Bregman proximal Langevin: steps per second of the library's pure step functions vs a
hand-written torch MYULA loop, 10^4 parallel chains in d = 100 (GPU when available)."""

from __future__ import annotations

import math

import torch

from mcmc.bregman import bmumla_step, myula_step
from mcmc.mirror import Hypentropy
from mcmc.prox import L1
from models.device import resolve_device

from .harness import Target, benchmark


def _setup(quick: bool):
    device = resolve_device("auto")
    C, d = 10_000, 100
    num_steps = 10 if quick else 50
    w = torch.linspace(0.5, 5.0, d, device=device)
    x0 = torch.randn(C, d, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    return device, num_steps, w, x0, gen


def _grad_f(x):  # f = |x|^2 / 2
    return x


GAMMA = LAM = 1e-3


@benchmark("bregman_myula_steps",
           targets=[Target("pyroforge_myula", "torch_loop_myula", "<=", 1.1, metric="time")],
           repeats=10, warmup=2)
def bregman_myula_steps(quick: bool):
    """10^4 chains, d = 100, f = |x|^2/2 plus a weighted l1 term; each call runs ``num_steps``
    MYULA steps for all chains. ``pyroforge_myula`` uses :func:`mcmc.bregman.myula_step`,
    ``torch_loop_myula`` is the same update written inline."""
    device, num_steps, w, x0, gen = _setup(quick)
    g = L1(w)

    def pyroforge_myula():
        x = x0
        for _ in range(num_steps):
            x = myula_step(x, _grad_f, g, step_size=GAMMA, lam=LAM, generator=gen)

    def torch_loop_myula():
        x = x0
        s = math.sqrt(2 * GAMMA)
        t = LAM * w
        for _ in range(num_steps):
            prox = torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)
            x = x - GAMMA * (x + (x - prox) / LAM) + s * torch.randn(
                x.shape, generator=gen, device=device)

    return {"pyroforge_myula": pyroforge_myula, "torch_loop_myula": torch_loop_myula}


@benchmark("bregman_bmumla_steps", repeats=10, warmup=2)
def bregman_bmumla_steps(quick: bool):
    """Cost of the mirror step: hypentropy BMUMLA (left envelope) vs the library's MYULA, same
    sizes as ``bregman_myula_steps`` (kept separate so that its larger memory traffic does not
    disturb that benchmark's ratio). No target."""
    _, num_steps, w, x0, gen = _setup(quick)
    g = L1(w)
    mirror = Hypentropy(0.5)

    def pyroforge_myula():
        x = x0
        for _ in range(num_steps):
            x = myula_step(x, _grad_f, g, step_size=GAMMA, lam=LAM, generator=gen)

    def pyroforge_bmumla_hypentropy():
        x = x0
        for _ in range(num_steps):
            x = bmumla_step(x, _grad_f, g, mirror, step_size=GAMMA, lam=LAM, generator=gen)

    return {"pyroforge_myula": pyroforge_myula,
            "pyroforge_bmumla_hypentropy": pyroforge_bmumla_hypentropy}
