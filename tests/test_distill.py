"""gan.distill: the instant student, its training (resumable, seeded), its files (lineage) and instant mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gan.blending import BlendSpec
from gan.checkpoints import CheckpointError, load_generator
from gan.distill import (
    DistillCancelledError,
    DistillConfig,
    Student,
    StudentMismatchError,
    affine_pair,
    augment_photo,
    load_student,
    make_pairs,
    read_student_lineage,
    run_student,
    save_student,
    student_lineage,
    train_student,
)
from gan.networks import Generator
from gan.styles import DEMO_DIR, StudentEntry, add_student_to_manifest, read_manifest

TINY = DistillConfig(
    kimg=0.048, batch_size=4, channels=8, max_channels=32, res_blocks=1, snapshot_kimg=0.008, ema_kimg=0.004
)


@pytest.fixture(scope="module")
def demo():
    style = read_manifest(DEMO_DIR).style("demo")
    return style, load_generator(style.base), load_generator(style.toon)


@pytest.fixture(scope="module")
def tiny_student(demo):
    style, base, toon = demo
    return train_student(base, toon, style.blend, TINY)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((10 * torch.log10(4 / (a - b).square().mean())).item())


def test_student_shapes_identity_start_and_batch_independence():
    torch.manual_seed(0)
    s = Student(resolution=32, channels=8, max_channels=16, res_blocks=1).eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    assert torch.equal(s(x), x)  # the head starts at zero: an untrained student returns its input
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        s(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="power of two"):
        Student(resolution=48)
    torch.nn.init.normal_(s.head.weight, std=0.1)
    alone = torch.cat([s(x[i : i + 1]) for i in range(5)])
    assert torch.allclose(alone, s(x), atol=1e-5)  # GroupNorm: a face does not depend on its batch-mates
    assert not torch.equal(s(x), x)
    big = run_student(s, torch.nn.functional.interpolate(x, size=64, mode="bilinear"))
    assert big.shape == (5, 3, 64, 64) and big.abs().max() <= 1  # resized to the student and back, clamped


def test_pairs_share_latents_and_augmentation_is_seeded(demo):
    style, base, toon = demo
    from gan.blending import blend

    teacher = blend(base, toon, style.blend).eval()
    g = torch.Generator().manual_seed(3)
    photo, target = make_pairs(base, teacher, 4, g, truncation=(0.5, 1.0), mixing=0.5)
    assert photo.shape == target.shape == (4, 3, 64, 64)
    g2 = torch.Generator().manual_seed(3)
    photo2, _ = make_pairs(base, base, 4, g2, truncation=(0.5, 1.0), mixing=0.5)
    assert torch.equal(photo, photo2)  # same seed, same latents and noise
    # affine moves are the same on both sides
    a, b = affine_pair(photo, photo.clone(), torch.Generator().manual_seed(1), p=1.0)
    assert torch.equal(a, b) and not torch.equal(a, photo)
    out1 = augment_photo(photo.clone(), torch.Generator().manual_seed(5))
    out2 = augment_photo(photo.clone(), torch.Generator().manual_seed(5))
    assert torch.equal(out1, out2) and out1.shape == photo.shape
    assert out1.abs().max() <= 1 and not torch.equal(out1, photo)


def test_training_moves_the_student_towards_the_teacher(demo, tiny_student):
    style, base, toon = demo
    from gan.blending import blend

    teacher = blend(base, toon, style.blend).eval()
    g = torch.Generator().manual_seed(999)  # held out: not the training seed's stream
    photo, target = make_pairs(base, teacher, 8, g, truncation=(0.5, 1.0), mixing=0.5)
    assert _psnr(run_student(tiny_student, photo), target) > _psnr(photo, target) + 0.5
    assert tiny_student.lineage == student_lineage(base, toon, style.blend)
    assert tiny_student.meta["training"]["kimg"] == TINY.kimg


def test_cancel_then_resume_gives_the_same_student_as_an_unbroken_run(demo, tmp_path):
    style, base, toon = demo
    unbroken = train_student(base, toon, style.blend, TINY)
    snap, calls = tmp_path / "run.snapshot", {"n": 0}

    def cancel_at_third_step() -> bool:
        calls["n"] += 1
        return calls["n"] == 3

    with pytest.raises(DistillCancelledError, match="step 2/12"):
        train_student(base, toon, style.blend, TINY, snapshot_path=snap, should_cancel=cancel_at_third_step)
    assert snap.exists()
    seen = []
    resumed = train_student(base, toon, style.blend, TINY, snapshot_path=snap, progress=lambda s, t, _: seen.append(s))
    assert seen == list(range(3, 13))  # continued, not restarted
    for (k, a), b in zip(unbroken.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # a snapshot for another blend is refused, not silently continued
    with pytest.raises(StudentMismatchError, match="blend"):
        train_student(base, toon, BlendSpec(mode="swap", resolution=8), TINY, snapshot_path=snap)


def test_files_carry_lineage_and_refuse_other_models(demo, tiny_student, tmp_path):
    style, base, toon = demo
    path = save_student(tiny_student, tmp_path / "s.safetensors")
    lineage = student_lineage(base, toon, style.blend)
    assert read_student_lineage(path) == lineage
    back = load_student(path, lineage=lineage)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(run_student(back, x), run_student(tiny_student, x))
    with pytest.raises(StudentMismatchError, match=r"blend swap at 16px.*not swap at 8px"):
        load_student(path, lineage=student_lineage(base, toon, BlendSpec(mode="swap", resolution=8)))
    with pytest.raises(StudentMismatchError, match="toon model"):
        load_student(path, lineage=student_lineage(base, base, style.blend))
    torch.manual_seed(7)
    other = Generator(base.config)
    with pytest.raises(StudentMismatchError, match="base model"):
        load_student(path, lineage=student_lineage(other, toon, style.blend))
    with pytest.raises(CheckpointError, match="not a student"):
        load_student(style.base)
    raw = bytearray(path.read_bytes())
    raw[-8:] = b"\x00" * 8  # flip the last tensor bytes
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="content hash"):
        load_student(bad)


def test_instant_mode_in_the_toonifier(demo, tiny_student, astronaut_bytes):
    from gan.pipeline import Toonifier, to_tensor

    style, base, toon = demo
    tf = Toonifier(base, toon, spec=style.blend)
    with pytest.raises(ValueError, match="toonify distill"):
        tf.toonify(astronaut_bytes, mode="instant")
    wrong = Toonifier(base, base, spec=style.blend)
    with pytest.raises(StudentMismatchError, match="toon model"):
        wrong.add_student(tiny_student)
    tf.add_student(tiny_student)
    assert tf.student_for() is tiny_student and tf.student_for(BlendSpec(mode="swap", resolution=8)) is None
    result = tf.toonify(astronaut_bytes, mode="instant")
    assert result.latents is None and len(result.crops) == len(result.aligned) >= 1
    expected = run_student(tiny_student, to_tensor([a.image for a in result.aligned]))
    got = to_tensor(result.crops)
    assert (got - expected).abs().max() <= 1 / 127.5 + 1e-6  # uint8 rounding only
    from gan.imageio import decode_image

    assert result.composite.size == decode_image(astronaut_bytes).size
    with pytest.raises(ValueError, match="no latents"):
        tf.project(got, "instant")


def test_manifest_lists_students_and_the_cli_makes_and_uses_one(tmp_path, astronaut_path, monkeypatch):
    from gan.cli import main as cli_main

    models = tmp_path / "models"
    shutil.copytree(DEMO_DIR, models, ignore=shutil.ignore_patterns("students", "previews"))
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["styles"]["demo"].pop("students", None)
    (models / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("TOONIFY_MODELS_DIR", str(models))
    out = tmp_path / "toon.png"
    assert cli_main(["toon", str(astronaut_path), "--mode", "instant", "--out", str(out)]) == 2  # none yet
    student = models / "students" / "demo.safetensors"
    argv = ["distill", "demo", "--kimg", "0.008", "--batch", "4", "--out", str(student), "--register"]
    assert cli_main(argv) == 0
    style = read_manifest(models).style("demo")
    entry = style.student_for()
    assert entry is not None and entry.file == student and entry.raw["file"] == "students/demo.safetensors"
    assert entry.raw["base_hash"] == read_student_lineage(student).base_hash and entry.raw["command"][:3] == [
        "toonify",
        "distill",
        "demo",
    ]
    assert cli_main(["toon", str(astronaut_path), "--out", str(out)]) == 0  # automatic: instant
    assert out.exists() and (tmp_path / "toon_toon0.png").exists()
    # registering again for the same blend replaces the entry; another blend adds one
    add_student_to_manifest(models, "demo", StudentEntry(student, style.blend, entry.raw))
    assert len(read_manifest(models).style("demo").students) == 1
    other = dict(entry.raw, blend=BlendSpec(mode="swap", resolution=8).to_json(), file="students/x.safetensors")
    add_student_to_manifest(models, "demo", StudentEntry(models / "x", BlendSpec(mode="swap", resolution=8), other))
    assert len(read_manifest(models).style("demo").students) == 2
    with pytest.raises(ValueError, match="no style"):
        add_student_to_manifest(models, "nope", entry)


@pytest.fixture
def astronaut_path() -> Path:
    return Path(__file__).parent / "fixtures" / "astronaut.png"


@pytest.fixture
def astronaut_bytes(astronaut_path) -> bytes:
    return astronaut_path.read_bytes()


def test_the_optional_patch_adversarial_term_trains_a_critic_and_resumes(demo, tmp_path):
    from dataclasses import replace

    style, base, toon = demo
    config = replace(TINY, kimg=0.016, adv_weight=0.1)  # 4 steps
    unbroken = train_student(base, toon, style.blend, config)
    assert {"adv", "critic"} <= set(unbroken.meta["final_losses"])
    snap, calls = tmp_path / "adv.snapshot", {"n": 0}

    def cancel_at_third_step() -> bool:
        calls["n"] += 1
        return calls["n"] == 3

    with pytest.raises(DistillCancelledError):
        train_student(base, toon, style.blend, config, snapshot_path=snap, should_cancel=cancel_at_third_step)
    resumed = train_student(base, toon, style.blend, config, snapshot_path=snap)  # the critic's state resumes too
    for a, b in zip(unbroken.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
