"""Fine-tune ingestion holds a bounded amount of memory: past ``IngestLimits.max_memory_bytes`` the kept
images go to an unnamed temporary file and come back as a memory map, with the same pixels, report and hash
as an ingestion held in memory. Resident memory is measured in a subprocess from /proc/self/status."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan.checkpoints import content_hash, load_generator, save_generator
from gan.finetune import DatasetRefusedError, FinetuneRun, FinetuneSettings, IngestLimits, ingest
from tests.conftest import make_tiny_discriminator, make_tiny_generator

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def smooth_images(n: int, side: int, seed: int) -> list[np.ndarray]:
    """Distinct, photo-like (smooth, so JPEG keeps them small) seeded RGB images."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        out.append(np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC)))
    return out


def write_zip(path: Path, images: list[np.ndarray], fmt: str = "JPEG") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i, arr in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            zf.writestr(f"img_{i:04d}.{fmt.lower()}", buf.getvalue())
    return path


def open_paths_under(folder: Path) -> list[str]:
    """Files under ``folder`` this process still has open or mapped (an unnamed temporary file shows as
    '<folder>/#<inode> (deleted)')."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    found += [
        line.split(maxsplit=5)[-1] for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line
    ]
    return found


def test_spilled_ingestion_equals_in_memory_and_leaves_nothing_behind(tmp_path):
    source = write_zip(tmp_path / "photos.zip", smooth_images(20, 80, seed=1), "PNG")
    spill = tmp_path / "spill"
    spill.mkdir()
    whole = ingest(source, 64, align=False)
    image_bytes = 64 * 64 * 3
    bounded = ingest(source, 64, align=False, limits=IngestLimits(max_memory_bytes=5 * image_bytes), spill_dir=spill)
    assert not isinstance(whole.images, np.memmap) and isinstance(bounded.images, np.memmap)
    assert bounded.images.dtype == np.uint8 and bounded.images.shape == whole.images.shape == (20, 64, 64, 3)
    assert np.array_equal(bounded.images, whole.images)
    assert bounded.sha256 == whole.sha256 and bounded.report.to_json() == whole.report.to_json()
    assert list(spill.iterdir()) == []  # unnamed: nothing to clean up, even after a crash
    assert open_paths_under(spill)  # ... but the images live there while the dataset does
    del bounded
    assert open_paths_under(spill) == []


def test_bound_exactly_at_the_images_keeps_them_in_memory(tmp_path):
    source = write_zip(tmp_path / "photos.zip", smooth_images(8, 40, seed=2), "PNG")
    at_bound = ingest(source, 32, align=False, limits=IngestLimits(max_memory_bytes=8 * 32 * 32 * 3))
    one_less = ingest(source, 32, align=False, limits=IngestLimits(max_memory_bytes=8 * 32 * 32 * 3 - 1))
    assert not isinstance(at_bound.images, np.memmap) and isinstance(one_less.images, np.memmap)
    assert np.array_equal(at_bound.images, one_less.images) and at_bound.sha256 == one_less.sha256


def test_a_refused_spilled_ingestion_leaves_nothing_open(tmp_path):
    source = write_zip(tmp_path / "photos.zip", smooth_images(6, 40, seed=3), "PNG")
    spill = tmp_path / "spill"
    spill.mkdir()
    with pytest.raises(DatasetRefusedError, match="6 usable images; at least 8"):
        ingest(source, 32, align=False, limits=IngestLimits(max_memory_bytes=1), spill_dir=spill)
    assert open_paths_under(spill) == [] and list(spill.iterdir()) == []


def test_a_finetune_on_a_spilled_dataset_gives_the_same_model(tmp_path):
    """FinetuneRun and the trainer take the memory map as they take an array: the same run, bit for bit."""
    res = 32
    base = save_generator(
        make_tiny_generator(11, res), tmp_path / "base.safetensors", D=make_tiny_discriminator(12, res)
    )
    source = write_zip(tmp_path / "photos.zip", smooth_images(12, 48, seed=4), "PNG")
    recipe = FinetuneSettings(kimg=0.032, snapshot_kimg=0.016, batch=8, freeze_d=1, metric_samples=8, preview_seeds=4)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hashes = []
        for name, limits in (("memory", IngestLimits()), ("spilled", IngestLimits(max_memory_bytes=1))):
            dataset = ingest(source, res, align=False, limits=limits)
            result = FinetuneRun(tmp_path / name, base, dataset, recipe, identity=False).run()
            assert result.status == "done" and result.steps == 4
            hashes.append(content_hash(load_generator(result.checkpoint).state_dict()))
    finally:
        torch.set_num_threads(old_threads)
    assert hashes[0] == hashes[1]


_MEASURE = r"""
import json, sys

def peak() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

import numpy as np
from gan.finetune import IngestLimits, ingest

source, warm_up, bound, spill = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ingest(warm_up, 512, align=False, min_images=1)  # imports and first-use allocations do not count
before = peak()
ds = ingest(source, 512, align=False, limits=IngestLimits(max_memory_bytes=bound), spill_dir=spill)
grew = peak() - before
print(json.dumps({"grew": grew, "n": len(ds.images), "sha256": ds.sha256, "spilled": isinstance(ds.images, np.memmap)}))
"""


def ingest_in_subprocess(source: Path, warm_up: Path, bound: int, spill: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(source), str(warm_up), str(bound), str(spill)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_resident_memory_stays_bounded_while_results_equal(tmp_path):
    n, side = 80, 512
    images_bytes = n * side * side * 3  # 60 MiB of kept images
    source = write_zip(tmp_path / "photos.zip", smooth_images(n, side, seed=5))
    warm_up = write_zip(tmp_path / "warm.zip", smooth_images(2, side, seed=6))
    spill = tmp_path / "spill"
    spill.mkdir()
    held = ingest_in_subprocess(source, warm_up, IngestLimits().max_memory_bytes, spill)
    bounded = ingest_in_subprocess(source, warm_up, 4 * MB, spill)
    assert held["n"] == bounded["n"] == n and held["sha256"] == bounded["sha256"]
    assert not held["spilled"] and bounded["spilled"]
    assert held["grew"] >= images_bytes, held  # the measurement sees the images when they are held
    assert bounded["grew"] < 4 * MB + 24 * MB, bounded  # the bound, plus one photo being decoded and cropped
