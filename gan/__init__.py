"""Toonify's ML library: StyleGAN2 networks, checkpoint formats, blending, editing.

Imports nothing from ``backend`` or ``bots``.
"""

from importlib import import_module

# Loaded on first use (PEP 562), so `import gan.imageio` or `gan.blending.BlendSpec` works without torch:
# the bots import those and run on machines with no GPU stack.
_EXPORTS = {
    "BlendSpec": "gan.blending",
    "blend": "gan.blending",
    "CheckpointError": "gan.checkpoints",
    "load_discriminator": "gan.checkpoints",
    "load_generator": "gan.checkpoints",
    "save_generator": "gan.checkpoints",
    "Discriminator": "gan.networks",
    "Generator": "gan.networks",
    "GeneratorConfig": "gan.networks",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gan' has no attribute {name!r}")


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
