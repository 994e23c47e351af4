"""rosinality/stylegan2-pytorch ``.pt`` files (also pSp/e4e ``decoder.*`` and JoJoGAN ``{"g": ...}``).

Variants: a bare generator state dict; ``{g_ema, latent_avg}`` from ``convert_weight.py``; full training
checkpoints ``{g, d, g_ema, g_optim, d_optim, args, ada_aug_p}``. Loaded with ``weights_only=True`` so no
pickled code runs; ``argparse.Namespace`` (the training ``args``) is the one extra class allowed, and it
only ever receives plain attribute values.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import torch

from gan.checkpoints.common import CheckpointData, CheckpointError, check_declared_bytes
from gan.networks import discriminator_channels_from_state_dict, generator_config_from_state_dict

META_KEY = "toonify"


def _load_weights_only(path: str | Path) -> object:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the file references code that is not allowed in a checkpoint ({e})"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated PyTorch file ({e})") from e


def _tensors(d: object) -> dict[str, torch.Tensor] | None:
    if isinstance(d, dict) and d and all(isinstance(k, str) and torch.is_tensor(v) for k, v in d.items()):
        return dict(d)
    return None


def read_rosinality(path: str | Path) -> CheckpointData:
    obj = _load_weights_only(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
    w_avg = obj.get("latent_avg") if torch.is_tensor(obj.get("latent_avg")) else None
    g_state = None
    for key in ("g_ema", "g"):
        g_state = _tensors(obj.get(key))
        if g_state is not None:
            break
    if g_state is None and isinstance(obj.get("state_dict"), dict):  # pSp / e4e: the decoder is our generator
        g_state = _tensors({k[8:]: v for k, v in obj["state_dict"].items() if str(k).startswith("decoder.")})
    if g_state is None:
        g_state = _tensors(obj)
    if g_state is None or "style.1.weight" not in g_state:
        raise CheckpointError(f"{path}: no StyleGAN2 generator weights found (keys: {sorted(obj)[:8]})")
    d_state = _tensors(obj.get("d"))
    # torch.load keeps views as views: a stride-0 tensor costs a few bytes here and its full size in the first
    # copy, so every tensor used must be backed by data in the file before anything is copied or built.
    used = [*g_state.items(), *(d_state or {}).items(), *([("latent_avg", w_avg)] if w_avg is not None else [])]
    check_declared_bytes(used, Path(path).stat().st_size, str(path))
    try:
        config = generator_config_from_state_dict(g_state)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    d_cfg = None
    if d_state is not None:
        try:
            d_cfg = discriminator_channels_from_state_dict(d_state)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    meta: dict = {}
    if isinstance(obj.get(META_KEY), str):
        try:
            meta = json.loads(obj[META_KEY])
        except ValueError:
            meta = {}
    meta["source_format"] = meta.get("source_format", "rosinality")
    return CheckpointData(
        generator_state=g_state,
        generator_config=config,
        w_avg=None if w_avg is None else w_avg.reshape(-1).float(),
        discriminator_state=d_state,
        discriminator_config=d_cfg,
        meta=meta,
        source_format="rosinality",
    )


def write_rosinality(data: CheckpointData, path: str | Path) -> None:
    """``{g_ema, latent_avg[, d]}`` as rosinality's tools expect, plus our metadata as a JSON string."""
    obj: dict = {"g_ema": data.generator_state}
    if data.w_avg is not None:
        obj["latent_avg"] = data.w_avg.reshape(-1)
    if data.discriminator_state is not None:
        obj["d"] = data.discriminator_state
    meta = dict(data.meta)
    meta["generator"] = data.generator_config.to_json()
    obj[META_KEY] = json.dumps(meta, sort_keys=True)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, str(tmp))
    tmp.replace(path)
