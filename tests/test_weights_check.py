"""`toonify weights check` through the real CLI entry: weight files written here in the real files' key names
(random values, so never a published hash), damaged and malicious files, the environment, and the loss choice
it reports agreeing with the one build_perceptual_loss makes. No downloaded weights are needed."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from gan import weights
from gan.checkpoints import save_generator
from gan.cli import main
from gan.perceptual import (
    LPIPS_ENV,
    VGG16,
    VGG_ENV,
    PerceptualWeightsError,
    _LinLayers,
    build_perceptual_loss,
    configured_paths,
    load_tensors,
    perceptual_choice,
)
from gan.styles import MODELS_ENV
from tests.conftest import make_tiny_discriminator, make_tiny_generator


def vgg_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's vgg16() state dict: perceptual.VGG16 uses its ``features.{i}`` names as they are; the
    real file also holds ``classifier.*`` (small stand-ins here), which LPIPS ignores."""
    torch.manual_seed(0)
    sd = dict(VGG16().state_dict())
    for i in (0, 3, 6):
        sd[f"classifier.{i}.weight"], sd[f"classifier.{i}.bias"] = torch.randn(8, 16), torch.randn(8)
    return sd


def lin_state_dict() -> dict[str, torch.Tensor]:
    """The LPIPS v0.1 file's ``lin{k}.model.1.weight`` [1, C, 1, 1]: perceptual._LinLayers' own names."""
    torch.manual_seed(1)
    return {k: v.abs() + 0.01 for k, v in _LinLayers().state_dict().items()}  # LPIPS refuses negative weights


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("weights")
    paths = {"vgg": d / "vgg16.pth", "lin": d / "vgg.pth"}
    torch.save(vgg_state_dict(), paths["vgg"])
    torch.save(lin_state_dict(), paths["lin"])
    return paths


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    for env in (VGG_ENV, LPIPS_ENV, MODELS_ENV):
        monkeypatch.delenv(env, raising=False)


def check(capsys, *args: str) -> tuple[int, str]:
    rc = main(["weights", "check", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def check_json(capsys, *args: str) -> tuple[int, dict]:
    rc = main(["weights", "check", "--json", *map(str, args)])
    return rc, json.loads(capsys.readouterr().out)


def test_both_files_usable_unknown_hashes_and_lpips_chosen(files, capsys):
    rc, out = check(capsys, "--vgg", files["vgg"], "--lpips", files["lin"])
    assert rc == 0, out
    assert f"VGG16: warning: {files['vgg']} (from --vgg): shapes match torchvision VGG16 features" in out
    assert f"LPIPS: warning: {files['lin']} (from --lpips): shapes match LPIPS v0.1" in out
    assert out.count("is not the published file's") == 2
    assert "projection and distillation: lpips-vgg16: LPIPS (VGG16 trunk" in out

    rc, report = check_json(capsys, "--vgg", files["vgg"], "--lpips", files["lin"])
    assert rc == 0 and report["ok"] is True
    for key, path in (("vgg", files["vgg"]), ("lpips", files["lin"])):
        entry = report["files"][key]
        assert entry["status"] == "warning" and entry["known_release"] is None
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["bytes"] == path.stat().st_size
    assert report["files"]["vgg"]["tensors"] == 26  # 13 convs; classifier.* not counted
    assert report["projection"]["loss"] == report["distillation"]["loss"] == "lpips-vgg16"


def test_published_hashes_are_recognised(files, capsys, monkeypatch):
    """The known-release branch, with the fixture's own hashes standing in for the published ones."""
    vgg_sha = hashlib.sha256(files["vgg"].read_bytes()).hexdigest()
    monkeypatch.setattr(weights, "VGG16_SHA256_PREFIX", vgg_sha[:8])
    monkeypatch.setattr(weights, "LPIPS_V01_VGG_SHA256", hashlib.sha256(files["lin"].read_bytes()).hexdigest())
    rc, report = check_json(capsys, "--vgg", files["vgg"], "--lpips", files["lin"])
    assert rc == 0
    assert report["files"]["vgg"]["status"] == report["files"]["lpips"]["status"] == "ok"
    assert report["files"]["vgg"]["known_release"] == f"torchvision vgg16-{vgg_sha[:8]}.pth"
    assert report["files"]["lpips"]["known_release"] == "LPIPS v0.1 vgg.pth"


def test_vgg_only_gives_vgg16_features(files, capsys):
    rc, out = check(capsys, "--vgg", files["vgg"])
    assert rc == 0, out
    assert "LPIPS: not configured: set --lpips or TOONIFY_LPIPS_PATH" in out
    assert "projection and distillation: vgg16-features: VGG16 features" in out


def test_nothing_configured_uses_the_demo_models_discriminators(capsys):
    rc, report = check_json(capsys)
    assert rc == 0 and report["ok"] is True and report["style"] == "demo"
    for task, name in (("projection", "base.safetensors"), ("distillation", "toon.safetensors")):
        assert report[task]["loss"] == "d-features"
        assert report[task]["discriminator"]["available"] is True
        assert Path(report[task]["discriminator"]["checkpoint"]).name == name
    rc, out = check(capsys)
    assert rc == 0 and "projection: d-features: discriminator features" in out
    assert "base.safetensors holds a discriminator" in out and "vgg16-397923af.pth" in out  # where to get them


def test_a_base_without_discriminator_projects_with_pixel_terms(tmp_path, capsys):
    save_generator(make_tiny_generator(0), tmp_path / "base.safetensors")  # no D
    save_generator(make_tiny_generator(1), tmp_path / "toon.safetensors", D=make_tiny_discriminator(1))
    manifest = {"base": "base.safetensors", "default_style": "s", "styles": {"s": {"toon": "toon.safetensors"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    rc, report = check_json(capsys, "--models-dir", tmp_path)
    assert rc == 0 and report["style"] == "s"
    assert report["projection"]["loss"] == "pixel"
    assert "holds no usable discriminator" in report["projection"]["discriminator"]["reason"]
    assert report["distillation"]["loss"] == "d-features"  # distillation uses the toon's critic


@pytest.mark.parametrize(
    ("which", "edit", "expected"),
    [
        ("vgg", {"features.28.weight": torch.zeros(512, 512, 3, 1)},
         "features.28.weight has shape [512, 512, 3, 1], expected [512, 512, 3, 3]"),
        ("lin", {"lin3.model.1.weight": None}, "missing lin3.model.1.weight (expected shape [1, 512, 1, 1])"),
        ("vgg", {"features.31.weight": torch.zeros(1)}, "unexpected key features.31.weight"),
    ],
)  # fmt: skip
def test_a_misshaped_file_fails_naming_the_key(files, tmp_path, capsys, which, edit, expected):
    sd = vgg_state_dict() if which == "vgg" else lin_state_dict()
    for key, value in edit.items():
        sd.pop(key) if value is None else sd.__setitem__(key, value)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    args = ("--vgg", bad, "--lpips", files["lin"]) if which == "vgg" else ("--vgg", files["vgg"], "--lpips", bad)
    rc, out = check(capsys, *args)
    assert rc == 1
    line = next(ln for ln in out.splitlines() if str(bad) in ln)
    assert ": error: " in line and expected in line, out
    assert "projection and distillation: none: build_perceptual_loss refuses" in out


def test_swapped_files_are_pointed_out(files, capsys):
    rc, out = check(capsys, "--vgg", files["lin"], "--lpips", files["vgg"])
    assert rc == 1 and "swapped?" in out


@pytest.mark.parametrize("legacy", [False, True])  # the published LPIPS vgg.pth is a legacy-format (non-zip) file
def test_a_truncated_file_fails_with_one_line(files, tmp_path, capsys, legacy):
    full = tmp_path / "full.pth"
    torch.save(lin_state_dict(), full, _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    cut = tmp_path / "cut.pth"
    for size in (len(data) // 3, len(data) - 5):
        cut.write_bytes(data[:size])
        rc, report = check_json(capsys, "--vgg", files["vgg"], "--lpips", cut)
        entry = report["files"]["lpips"]
        assert rc == 1 and entry["status"] == "error" and "\n" not in entry["message"]
        assert entry["sha256"] == hashlib.sha256(data[:size]).hexdigest()


def test_every_cut_of_a_legacy_file_is_a_refusal_not_a_crash(tmp_path):
    """load_tensors turns whatever torch.load raises on a cut legacy file (IndexError, struct.error…) into
    PerceptualWeightsError, so build_perceptual_loss and this check report it rather than crash."""
    full = tmp_path / "full.pth"
    torch.save(lin_state_dict(), full, _use_new_zipfile_serialization=False)
    data, cut = full.read_bytes(), tmp_path / "cut.pth"
    for size in range(0, len(data), 17):
        cut.write_bytes(data[:size])
        with pytest.raises(PerceptualWeightsError, match=r"cut\.pth"):
            load_tensors(cut, "LPIPS lin", LPIPS_ENV)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("which", ["vgg", "lin"])
def test_a_malicious_pickle_is_refused_and_never_run(files, tmp_path, capsys, which):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"lin0.model.1.weight": _Evil(marker)}, evil)
    args = ("--vgg", evil, "--lpips", files["lin"]) if which == "vgg" else ("--vgg", files["vgg"], "--lpips", evil)
    rc, out = check(capsys, *args)
    assert rc == 1
    line = next(ln for ln in out.splitlines() if ln.startswith(("VGG16:", "LPIPS:")) and str(evil) in ln)
    assert ": error: " in line and "weights_only" in line and "system" in line, out
    assert not marker.exists()


def test_negative_lin_weights_fail_where_the_loader_refuses_them(files, tmp_path, capsys):
    sd = lin_state_dict()
    sd["lin2.model.1.weight"][0, 0] = -1.0
    bad = tmp_path / "negative.pth"
    torch.save(sd, bad)
    rc, report = check_json(capsys, "--vgg", files["vgg"], "--lpips", bad)
    assert rc == 1 and report["ok"] is False and report["projection"]["loss"] is None
    assert "negative weights" in report["projection"]["description"]
    assert report["files"]["lpips"]["status"] == "error" and "negative weights" in report["files"]["lpips"]["message"]


def test_environment_variables_are_honoured_and_flags_override_them(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(VGG_ENV, str(files["vgg"]))
    monkeypatch.setenv(LPIPS_ENV, str(files["lin"]))
    rc, report = check_json(capsys)
    assert rc == 0 and report["projection"]["loss"] == "lpips-vgg16"
    assert report["files"]["vgg"]["source"] == VGG_ENV and report["files"]["lpips"]["source"] == LPIPS_ENV

    monkeypatch.setenv(VGG_ENV, str(tmp_path / "gone.pth"))
    rc, out = check(capsys)
    assert rc == 1 and f"VGG16: error: {tmp_path / 'gone.pth'} (from {VGG_ENV}): does not exist" in out
    rc, report = check_json(capsys, "--vgg", files["vgg"])
    assert rc == 0 and report["files"]["vgg"]["source"] == "--vgg"


def test_lpips_without_vgg_is_an_error(files, capsys):
    rc, out = check(capsys, "--lpips", files["lin"])
    assert rc == 1 and "VGG16: error: not configured, but the LPIPS file needs it" in out


@pytest.mark.parametrize("configured", ["both", "vgg", "none"])
@pytest.mark.parametrize("with_d", [True, False])
def test_the_reported_choice_is_the_loss_build_perceptual_loss_builds(files, configured, with_d):
    vgg = files["vgg"] if configured in ("both", "vgg") else None
    lin = files["lin"] if configured == "both" else None
    D = make_tiny_discriminator(0) if with_d else None
    with pytest.warns(UserWarning) if configured == "none" and not with_d else nullcontext():
        built = build_perceptual_loss(vgg, lin, D)
    assert perceptual_choice(*configured_paths(vgg, lin), discriminator_available=with_d) == built.name
