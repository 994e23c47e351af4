"""Named styles: a manifest maps a style name to its base, toon and encoder checkpoints and default blend.

The bundled demo models live in ``gan/demo_models/`` with a ``manifest.json``; ``TOONIFY_MODELS_DIR`` points
at another folder laid out the same way (real FFHQ-based models, say). Paths in a manifest are relative to
its folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from gan.blending import BlendSpec

DEMO_DIR = Path(__file__).parent / "demo_models"
MODELS_ENV = "TOONIFY_MODELS_DIR"


@dataclass(frozen=True)
class Style:
    name: str
    base: Path
    toon: Path
    encoder: Path | None
    blend: BlendSpec


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or DEMO_DIR)


def load_manifest(directory: Path | None = None) -> dict:
    directory = directory or models_dir()
    path = directory / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no model manifest at {path}; set {MODELS_ENV} to a folder with manifest.json, "
            "or pass --base and --toon checkpoints"
        )
    return json.loads(path.read_text())


def get_style(name: str | None = None, directory: Path | None = None) -> Style:
    """The named style (default: the manifest's ``default_style``)."""
    directory = directory or models_dir()
    manifest = load_manifest(directory)
    styles = manifest.get("styles", {})
    name = name or manifest.get("default_style") or next(iter(styles), None)
    if name not in styles:
        raise ValueError(f"unknown style {name!r}; available: {', '.join(sorted(styles)) or 'none'}")
    entry = styles[name]
    encoder = entry.get("encoder", manifest.get("encoder"))
    return Style(
        name=name,
        base=directory / entry.get("base", manifest.get("base", "")),
        toon=directory / entry["toon"],
        encoder=None if not encoder else directory / encoder,
        blend=BlendSpec.from_json(entry.get("blend", {"mode": "swap", "resolution": 32})),
    )
