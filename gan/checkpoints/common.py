"""The in-memory form every checkpoint reader produces."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from gan.networks import GeneratorConfig


class CheckpointError(Exception):
    """A file that is not a loadable checkpoint: unknown format, truncated, unsafe or inconsistent."""


@dataclass
class CheckpointData:
    generator_state: dict[str, torch.Tensor]  # rosinality names
    generator_config: GeneratorConfig
    w_avg: torch.Tensor | None = None
    discriminator_state: dict[str, torch.Tensor] | None = None  # rosinality names
    discriminator_config: tuple[int, dict[int, int]] | None = None  # (resolution, channels)
    meta: dict = field(default_factory=dict)
    source_format: str = ""


def content_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names, shapes, dtypes and bytes: identifies weights whatever file they came in."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
