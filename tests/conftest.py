"""Shared fixtures: tiny generators built in-process (no downloads)."""

from __future__ import annotations

import pytest
import torch

from gan.networks import Discriminator, Generator, GeneratorConfig

TINY_CHANNELS = {4: 32, 8: 32, 16: 16, 32: 16, 64: 8}


def tiny_config(resolution: int = 32, **kw) -> GeneratorConfig:
    chans = {r: c for r, c in TINY_CHANNELS.items() if r <= resolution}
    return GeneratorConfig(resolution=resolution, w_dim=32, z_dim=32, n_mlp=2, channels=chans, **kw)


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter and buffer with seeded noise, so zero-initialised biases and noise strengths
    take part in comparisons too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("kernel") or name == "w_avg":
                continue
            scale = 0.2 if t.ndim <= 1 else 1.0
            if name.startswith("style.") and name.endswith(".weight"):
                scale = 1.0 / module.config.lr_mlp  # equalised lr: stored weights are divided by lr_mul
            t.copy_(torch.randn(t.shape, generator=g) * scale)
    return module


def make_tiny_generator(seed: int = 0, resolution: int = 32) -> Generator:
    G = randomise(Generator(tiny_config(resolution)), seed).eval()
    G.compute_w_avg(n=256)
    return G


def make_tiny_discriminator(seed: int = 0, resolution: int = 32) -> Discriminator:
    chans = {r: c for r, c in TINY_CHANNELS.items() if r <= resolution}
    return randomise(Discriminator(resolution=resolution, channels=chans), seed).eval()


@pytest.fixture
def tiny_g() -> Generator:
    return make_tiny_generator(0)


@pytest.fixture
def tiny_d() -> Discriminator:
    return make_tiny_discriminator(0)
