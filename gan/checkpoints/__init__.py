"""Load and save generators in every supported format behind one call.

Every reader turns a file into a :class:`CheckpointData` (state dicts in rosinality names, configs, average
latent, metadata); :func:`load_generator` builds the :class:`~gan.networks.Generator` from it. No reader runs
code from the file: torch files go through ``weights_only`` loading, pickles through an allow-listing
unpickler (:mod:`gan.checkpoints.safe_pickle`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gan.checkpoints.common import (
    CheckpointData,
    CheckpointError,
    check_architecture,
    check_generator_config,
    check_state_fits,
    content_hash,
)
from gan.checkpoints.native import read_native, write_native
from gan.checkpoints.rosinality import read_rosinality, write_rosinality
from gan.networks import Discriminator, Generator

__all__ = [
    "CheckpointData",
    "CheckpointError",
    "content_hash",
    "detect_format",
    "generator_to_data",
    "load_discriminator",
    "load_generator",
    "read_checkpoint",
    "save_generator",
    "write_checkpoint",
]

_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def detect_format(path: str | Path) -> str:
    """'native' (safetensors), 'rosinality' (torch .pt, zip or legacy), 'pickle' (NVIDIA PyTorch or TF)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    if len(head) < 8:
        raise CheckpointError(f"{path} is empty or truncated ({len(head)} bytes)")
    if head[:4] == b"PK\x03\x04" or head.startswith(_TORCH_LEGACY_MAGIC):
        return "rosinality"
    header_len = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and 0 < header_len < 100_000_000:
        return "native"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    raise CheckpointError(
        f"{path} is not a known checkpoint format (expected .safetensors, a PyTorch .pt, or an NVIDIA StyleGAN2 .pkl)"
    )


def read_checkpoint(path: str | Path) -> CheckpointData:
    """Read any supported checkpoint file; raises :class:`CheckpointError` on anything else."""
    fmt = detect_format(path)
    if fmt == "native":
        data = read_native(path)
    elif fmt == "rosinality":
        data = read_rosinality(path)
    else:
        from gan.checkpoints.nvidia import read_nvidia_pickle  # imported lazily: only pickles need it

        data = read_nvidia_pickle(path)
    # Readers bound the bytes their tensors declare by the file's size; the architecture is bounded here,
    # before anything builds a network from it (the hash below only reads tensors already in memory).
    check_generator_config(data.generator_config, str(path))
    if data.discriminator_config is not None:
        check_architecture(f"{path} (discriminator)", *data.discriminator_config)
    # The identity of the weights, whatever container they came in: lineage checks compare these.
    data.meta["content_hash"] = content_hash(data.generator_state)
    return data


def write_checkpoint(data: CheckpointData, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``data`` as 'native' (.safetensors) or 'rosinality' (.pt); format from the suffix by default."""
    path = Path(path)
    fmt = fmt or ("rosinality" if path.suffix in (".pt", ".pth") else "native")
    if fmt == "native":
        write_native(data, path)
    elif fmt == "rosinality":
        write_rosinality(data, path)
    else:
        raise CheckpointError(f"cannot write format {fmt!r}; use 'native' or 'rosinality'")
    return path


def build_generator(data: CheckpointData, device: str | torch.device = "cpu") -> Generator:
    check_generator_config(data.generator_config, "checkpoint")
    with torch.device("meta"):  # names and shapes first: a mismatch is refused before the network is allocated
        check_state_fits(data.generator_state, Generator(data.generator_config), "generator")
    G = Generator(data.generator_config)
    try:
        G.load_state_dict(data.generator_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"generator weights do not fit the inferred architecture: {e}") from e
    if data.w_avg is not None:
        G.w_avg.copy_(data.w_avg.reshape(-1))
    else:
        G.compute_w_avg()
    G.meta = dict(data.meta)
    return G.eval().requires_grad_(False).to(device)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """The generator (``g_ema`` where there is a choice) of any supported checkpoint, in eval mode.

    ``G.meta`` holds the checkpoint's metadata (lineage, content hash, source format)."""
    return build_generator(read_checkpoint(path), device)


def load_discriminator(path: str | Path, device: str | torch.device = "cpu") -> Discriminator:
    data = read_checkpoint(path)
    if data.discriminator_state is None:
        why = data.meta.get("discriminator_unsupported")
        raise CheckpointError(f"{path} holds no usable discriminator" + (f": {why}" if why else ""))
    res, channels = data.discriminator_config
    with torch.device("meta"):
        check_state_fits(data.discriminator_state, Discriminator(resolution=res, channels=channels), "discriminator")
    D = Discriminator(resolution=res, channels=channels, mbstd_group=int(data.meta.get("mbstd_group_size") or 4))
    try:
        D.load_state_dict(data.discriminator_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"discriminator weights do not fit the inferred architecture: {e}") from e
    return D.eval().requires_grad_(False).to(device)


def generator_to_data(G: Generator, meta: dict | None = None, D: Discriminator | None = None) -> CheckpointData:
    sd = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    return CheckpointData(
        generator_state=sd,
        generator_config=G.config,
        w_avg=G.w_avg.detach().cpu().clone(),
        discriminator_state=None if D is None else {k: v.detach().cpu() for k, v in D.state_dict().items()},
        discriminator_config=None if D is None else (D.resolution, dict(D.channels)),
        meta={**getattr(G, "meta", {}), **(meta or {})},
        source_format="memory",
    )


def save_generator(G: Generator, path: str | Path, meta: dict | None = None, D: Discriminator | None = None) -> Path:
    """Save ``G`` (and optionally ``D``) as .safetensors with JSON metadata, or as rosinality .pt."""
    return write_checkpoint(generator_to_data(G, meta, D), path)
