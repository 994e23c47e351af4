"""The in-memory form every checkpoint reader produces."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from gan.networks import GeneratorConfig

# What a checkpoint may declare. Every StyleGAN2 config (e/f, stylegan2-ada's) up to 1024 px uses at most 512
# channels, w_dim/z_dim 512 and an 8-layer mapping; 2048-px community models fit as well. At these limits a
# generator holds under 1 GB, so a file declaring more is refused before anything is built.
MAX_RESOLUTION = 2048
MAX_CHANNELS = 1024
MAX_LATENT_DIM = 1024
MAX_MAPPING_LAYERS = 16


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


def _size(nbytes: int) -> str:
    if nbytes >= 1e8:
        return f"{nbytes / 1e9:.1f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes} bytes"


def check_declared_bytes(tensors: Iterable[tuple[str, torch.Tensor]], file_size: int, where: str) -> None:
    """Refuse tensors whose size is not backed by data in the file, before anything copies them: a tensor
    larger than its own storage (an expanded, stride-0 or overlapping view, which ``.contiguous()`` would
    blow up), or tensors that together declare more bytes than the file holds. Identical views of one
    storage count once."""
    total, seen = 0, set()
    for name, t in tensors:
        nbytes, stored = t.numel() * t.element_size(), t.untyped_storage().nbytes()
        if nbytes > stored:
            raise CheckpointError(
                f"{where}: tensor '{name}' {list(t.shape)} declares {_size(nbytes)} but its data holds "
                f"{_size(stored)} (an expanded or overlapping tensor); refused before allocating it"
            )
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if view not in seen:
            seen.add(view)
            total += nbytes
    if total > file_size:
        raise CheckpointError(
            f"{where}: its tensors declare {_size(total)}, more than the file's {_size(file_size)} can hold; "
            "refused before allocating them"
        )


def check_architecture(
    where: str, resolution: int, channels: Mapping[int, int], *, w_dim: int = 1, z_dim: int = 1, n_mlp: int = 1
) -> None:
    """Refuse a declared architecture beyond the module limits (``MAX_*``)."""
    limits = [
        ("resolution", resolution, 8, MAX_RESOLUTION),
        ("w_dim", w_dim, 1, MAX_LATENT_DIM),
        ("z_dim", z_dim, 1, MAX_LATENT_DIM),
        ("mapping layers", n_mlp, 1, MAX_MAPPING_LAYERS),
        *((f"channels at {r} px", c, 1, MAX_CHANNELS) for r, c in channels.items()),
    ]
    for what, value, low, high in limits:
        if not low <= value <= high:
            raise CheckpointError(
                f"{where}: declares {what} = {value}, outside the supported {low}..{high}; refused before "
                "building the network"
            )


def check_generator_config(config: GeneratorConfig, where: str) -> None:
    check_architecture(
        where, config.resolution, config.channels, w_dim=config.w_dim, z_dim=config.z_dim, n_mlp=config.n_mlp
    )


def check_state_fits(state: Mapping[str, torch.Tensor], module: torch.nn.Module, what: str) -> None:
    """Names and shapes of ``state`` against ``module`` (built on the meta device, so nothing is allocated)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {list(state[k].shape)}, want {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{what} weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {wrong[:5]}"
        )
