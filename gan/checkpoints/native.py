"""Our own format: safetensors with one JSON metadata entry (architecture, lineage, content hash).

Tensor names: ``g_ema.<rosinality name>``, ``d.<rosinality name>`` (optional), ``w_avg``.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gan.checkpoints.common import CheckpointData, CheckpointError, content_hash
from gan.networks import GeneratorConfig

FORMAT_VERSION = 1
META_KEY = "toonify"


def write_native(data: CheckpointData, path: str | Path) -> None:
    tensors = {f"g_ema.{k}": v.contiguous() for k, v in data.generator_state.items()}
    if data.w_avg is not None:
        tensors["w_avg"] = data.w_avg.reshape(-1).contiguous()
    if data.discriminator_state is not None:
        tensors.update({f"d.{k}": v.contiguous() for k, v in data.discriminator_state.items()})
    meta = dict(data.meta)
    meta["format_version"] = FORMAT_VERSION
    meta["generator"] = data.generator_config.to_json()
    meta["content_hash"] = content_hash(data.generator_state)
    meta["file_hash"] = content_hash(tensors)
    meta.setdefault("ancestors", [])
    if data.discriminator_config is not None:
        res, ch = data.discriminator_config
        meta["discriminator"] = {"resolution": res, "channels": {str(k): v for k, v in ch.items()}}
    write_tensors_and_metadata(tensors, path, meta)


def write_tensors_and_metadata(tensors: dict, path: str | Path, meta: dict, key: str = META_KEY) -> Path:
    """Write ``tensors`` as a safetensors file with ``meta`` as JSON in its metadata entry ``key``, through a
    temporary file and a rename: a crash never leaves a half-written file under the real name (readers see the
    old file or the new one). The twin of :func:`read_tensors_and_metadata`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={key: json.dumps(meta, sort_keys=True)})
    tmp.replace(path)
    return path


def read_tensors_and_metadata(path: str | Path, key: str = META_KEY) -> tuple[dict, str | None]:
    """All tensors of a safetensors file and its metadata entry ``key`` (None when absent)."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            return tensors, (f.metadata() or {}).get(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e


def read_native(path: str | Path) -> CheckpointData:
    tensors, raw = read_tensors_and_metadata(path)
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file without toonify metadata")
    try:
        meta = json.loads(raw)
        config = GeneratorConfig.from_json(meta["generator"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: bad metadata ({e})") from e
    g = {k[6:]: v for k, v in tensors.items() if k.startswith("g_ema.")}
    d = {k[2:]: v for k, v in tensors.items() if k.startswith("d.")} or None
    d_cfg = None
    if d is not None and "discriminator" in meta:
        dm = meta["discriminator"]
        d_cfg = (int(dm["resolution"]), {int(k): int(v) for k, v in dm["channels"].items()})
    if meta.get("file_hash") and meta["file_hash"] != content_hash(tensors):
        raise CheckpointError(f"{path}: tensors do not match the recorded content hash (corrupted file?)")
    return CheckpointData(
        generator_state=g,
        generator_config=config,
        w_avg=tensors.get("w_avg"),
        discriminator_state=d,
        discriminator_config=d_cfg,
        meta=meta,
        source_format="native",
    )


def native_metadata(path: str | Path) -> dict:
    """Only the metadata of a native checkpoint (cheap: reads the header)."""
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})[META_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: no readable toonify metadata ({e})") from e
