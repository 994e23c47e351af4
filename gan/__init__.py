"""Toonify's ML library: StyleGAN2 networks, checkpoint formats, blending, editing.

Imports nothing from ``backend`` or ``bots``.
"""

from gan.blending import BlendSpec, blend
from gan.checkpoints import CheckpointError, load_discriminator, load_generator, save_generator
from gan.networks import Discriminator, Generator, GeneratorConfig

__all__ = [
    "BlendSpec",
    "CheckpointError",
    "Discriminator",
    "Generator",
    "GeneratorConfig",
    "blend",
    "load_discriminator",
    "load_generator",
    "save_generator",
]
