"""The shipped demo models: present, consistent with their manifest, and usable end to end."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan import load_generator
from gan.encoder import load_encoder
from gan.styles import DEMO_DIR, get_style

FIXTURE = Path(__file__).parent / "fixtures" / "astronaut.png"
pytestmark = pytest.mark.skipif(not (DEMO_DIR / "manifest.json").is_file(), reason="demo models not built")


def test_manifest_files_and_lineage():
    manifest = json.loads((DEMO_DIR / "manifest.json").read_text())
    for name in ("base.safetensors", "toon.safetensors", "encoder.safetensors"):
        entry = manifest["files"][name]
        assert hashlib.sha256((DEMO_DIR / name).read_bytes()).hexdigest() == entry["sha256"]
    style = get_style("demo")
    base, toon = load_generator(style.base), load_generator(style.toon)
    assert base.meta["content_hash"] in toon.meta["ancestors"]
    assert base.config == toon.config
    load_encoder(style.encoder, base)  # refused if it belonged to another generator


def test_demo_style_toonifies_the_astronaut(tmp_path):
    from gan.cli import main as cli_main

    photo, out = FIXTURE, tmp_path / "toon.png"
    assert cli_main(["toon", str(photo), "--style", "demo", "--mode", "fast", "--out", str(out)]) == 0
    with Image.open(out) as im, Image.open(photo) as src:
        assert im.size == src.size
        changed = torch.from_numpy(np.asarray(im, dtype=np.int16)) - torch.from_numpy(np.asarray(src, dtype=np.int16))
        assert changed.abs().sum(-1).gt(0).float().mean() > 0.01  # a face-sized region was replaced
    resolution = load_generator(get_style("demo").base).resolution
    with Image.open(tmp_path / "toon_toon0.png") as crop:
        assert crop.size == (resolution, resolution)
