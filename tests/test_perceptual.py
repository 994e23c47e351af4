"""Perceptual losses: weights in the real file formats (torchvision VGG16, LPIPS v0.1 lin) made here, loaded
through the real loader; the discriminator-feature and pixel fallbacks; the choice between them."""

from __future__ import annotations

import os
import shlex

import pytest
import torch
import torch.nn.functional as F

from gan.perceptual import (
    LPIPS,
    LPIPS_ENV,
    VGG_ENV,
    DiscriminatorFeatureLoss,
    PerceptualWeightsError,
    PerceptualWeightsMissing,
    build_perceptual_loss,
    lpips_from_config,
)
from tests.conftest import make_tiny_discriminator

# torchvision vgg16().features, written out independently of gan.perceptual: conv index → out channels
CONVS = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256, 17: 512, 19: 512, 21: 512, 24: 512, 26: 512, 28: 512}
POOL_BEFORE = {5, 10, 17, 24}  # features.4/9/16/23 are max pools
TAP_CONVS = (2, 7, 14, 21, 28)  # relu1_2 … relu5_3 are features.3/8/15/22/29
LIN_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
SIZE = 32  # tiny inputs keep the VGG passes fast on CPU


def torchvision_vgg16_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g, sd, cin = torch.Generator().manual_seed(seed), {}, 3
    for i, c in CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(c, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(c, generator=g) * 0.01
        cin = c
    for i in (0, 3, 6):  # the real classifier is [4096, 25088] …; small stand-ins prove the keys are ignored
        sd[f"classifier.{i}.weight"], sd[f"classifier.{i}.bias"] = torch.randn(8, 16), torch.randn(8)
    return sd


def lpips_lin_state_dict(seed: int = 1, factor: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"lin{k}.model.1.weight": (torch.rand(1, c, 1, 1, generator=g) * 0.5 + 0.01) * factor
        for k, c in enumerate(LIN_CHANNELS)
    }


def reference_lpips(vgg: dict, lin: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS computed functionally from the raw state dicts (no code from gan.perceptual)."""

    def taps(x):
        x, out = (x - SHIFT) / SCALE, []
        for i in CONVS:
            x = F.max_pool2d(x, 2) if i in POOL_BEFORE else x
            x = F.relu(F.conv2d(x, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            if i in TAP_CONVS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    return sum(
        F.conv2d((fa - fb) ** 2, lin[f"lin{k}.model.1.weight"]).mean((1, 2, 3))
        for k, (fa, fb) in enumerate(zip(taps(a), taps(b), strict=True))
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    sds = {"vgg": torchvision_vgg16_state_dict(), "lin": lpips_lin_state_dict()}
    sds["lin2"] = {k: 2 * v for k, v in sds["lin"].items()}
    paths = {name: d / f"{name}.pth" for name in sds}
    for name, sd in sds.items():
        torch.save(sd, paths[name])
    return paths, sds


@pytest.fixture(scope="module")
def lp(files):
    paths, _ = files
    return lpips_from_config(paths["vgg"], paths["lin"], size=SIZE)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(VGG_ENV, raising=False)
    monkeypatch.delenv(LPIPS_ENV, raising=False)


def test_loads_strictly_frozen_and_matches_reference(lp, files, images):
    _, sds = files
    assert lp.name == "lpips-vgg16"
    state = lp.state_dict()
    for k, v in sds["vgg"].items():
        if k.startswith("features."):
            assert torch.equal(state[f"vgg.{k}"], v)
    for k, v in sds["lin"].items():
        assert torch.equal(state[f"lin.{k}"], v)
    assert not any(p.requires_grad for p in lp.parameters()) and not lp.training
    lp.train()
    assert not lp.training
    a, b = images
    d = lp(a, b)
    assert d.shape == (3,)
    torch.testing.assert_close(d, reference_lpips(sds["vgg"], sds["lin"], a, b), rtol=1e-4, atol=1e-6)


def test_identity_symmetry_positivity_and_batch_independence(lp, images):
    a, b = images
    ea, eb = lp.embed(a), lp.embed(b)
    d_ab, d_ba, d_aa = lp.compare(ea, eb), lp.compare(eb, ea), lp.compare(ea, ea)
    assert torch.equal(d_aa, torch.zeros(3))
    torch.testing.assert_close(d_ab, d_ba)
    assert (d_ab > 0).all()
    one_by_one = torch.cat([lp(a[i : i + 1], b[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(d_ab, one_by_one, rtol=1e-5, atol=1e-7)


def test_gradients_reach_both_inputs(lp, images):
    a, b = (t[:1].clone().requires_grad_() for t in images)
    lp(a, b).sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert all(p.grad is None for p in lp.parameters())


def test_lin_weights_matter_and_baseline(files, lp, images):
    paths, _ = files
    a, b = (t[:1] for t in images)
    doubled = LPIPS(paths["vgg"], paths["lin2"], size=SIZE)
    torch.testing.assert_close(doubled(a, b), 2 * lp(a, b), rtol=1e-5, atol=1e-7)
    baseline = build_perceptual_loss(paths["vgg"], None)  # VGG file only: the unweighted LPIPS baseline
    assert baseline.name == "vgg16-features"
    ones = {k: torch.ones_like(v) for k, v in lpips_lin_state_dict().items()}
    torch.testing.assert_close(baseline(a, b), reference_lpips(files[1]["vgg"], ones, a, b), rtol=1e-4, atol=1e-6)


def test_larger_inputs_are_area_downsampled(lp, images):
    a, b = (t[:1] for t in images)
    big_a, big_b = (F.interpolate(t, scale_factor=2, mode="nearest") for t in (a, b))  # area-down gives t back
    torch.testing.assert_close(lp(big_a, big_b), lp(a, b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("which", ["vgg", "lin"])
def test_state_dict_mismatch_is_refused(files, tmp_path, which):
    paths, sds = files
    key = next(iter(sds[which]))
    path = tmp_path / "bad.pth"
    torch.save({key: sds[which][key][:, :-1]}, path)  # one tensor of the wrong shape, the others absent
    with pytest.raises(PerceptualWeightsError) as err:
        LPIPS(*((path, paths["lin"]) if which == "vgg" else (paths["vgg"], path)))
    assert "Missing key" in str(err.value) and "size mismatch" in str(err.value) and "bad.pth" in str(err.value)


def test_extra_keys_and_negative_lin_weights_are_refused(files, tmp_path):
    paths, sds = files
    torch.save({**sds["lin"], "lin9.model.1.weight": torch.ones(1)}, tmp_path / "extra.pth")
    with pytest.raises(PerceptualWeightsError, match="Unexpected"):
        LPIPS(paths["vgg"], tmp_path / "extra.pth")
    torch.save({k: -v for k, v in sds["lin"].items()}, tmp_path / "neg.pth")
    with pytest.raises(PerceptualWeightsError, match="negative"):
        LPIPS(paths["vgg"], tmp_path / "neg.pth")


def test_missing_files_name_the_file_and_env(files, tmp_path, no_env, monkeypatch):
    paths, _ = files
    with pytest.raises(PerceptualWeightsMissing) as err:
        lpips_from_config(tmp_path / "vgg16-nope.pth", paths["lin"])
    assert isinstance(err.value, FileNotFoundError)
    assert "vgg16-nope.pth" in str(err.value) and VGG_ENV in str(err.value)
    assert "download.pytorch.org" in str(err.value) and "PerceptualSimilarity" in str(err.value)
    with pytest.raises(PerceptualWeightsMissing, match=f"not configured \\({LPIPS_ENV}\\)"):
        lpips_from_config(paths["vgg"])
    monkeypatch.setenv(VGG_ENV, str(paths["vgg"]))
    monkeypatch.setenv(LPIPS_ENV, str(paths["lin"]))
    assert lpips_from_config(size=SIZE).name == "lpips-vgg16"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("which", ["vgg", "lin"])
def test_malicious_pickle_is_refused_and_never_run(files, tmp_path, which):
    paths, _ = files
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"features.0.weight": _Evil(marker)}, evil)
    args = (evil, paths["lin"]) if which == "vgg" else (paths["vgg"], evil)
    with pytest.raises(PerceptualWeightsError, match="weights_only") as err:
        LPIPS(*args)
    assert "evil.pth" in str(err.value) and "system" in str(err.value)
    assert not marker.exists()
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(PerceptualWeightsError, match=r"junk\.pth"):
        LPIPS(tmp_path / "junk.pth", paths["lin"])


def test_discriminator_feature_fallback():
    D = make_tiny_discriminator(0)
    loss = DiscriminatorFeatureLoss(D)
    features_only = DiscriminatorFeatureLoss(D, pixel_weight=0, multiscale_weight=0)
    assert loss.name == "d-features" and not any(p.requires_grad for p in loss.parameters())
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1  # resized to D's 32 for the feature term
    noise = torch.randn(x.shape, generator=g)
    ex = loss.embed(x)
    assert torch.equal(loss.compare(ex, ex), torch.zeros(2))
    noisy = [loss.embed(x + s * noise) for s in (0.05, 0.1, 0.2, 0.4)]
    for fn in (loss, features_only):
        d = torch.stack([fn.compare(ex, ey) for ey in noisy])
        assert (d > 0).all() and (d[1:] > d[:-1]).all(), d
    y = (x + 0.3 * noise).requires_grad_()
    d = loss(x, y)
    torch.testing.assert_close(d, torch.cat([loss(x[i : i + 1], y[i : i + 1]) for i in range(2)]))
    d.sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in D.parameters())


def test_pixel_fallback_warns():
    with pytest.warns(UserWarning, match="pixel losses only"):
        loss = DiscriminatorFeatureLoss(None, pixel="l2")
    x = torch.zeros(2, 3, 16, 16)
    y = x.clone()
    y[1] += 0.5
    d = loss(x, y)
    assert loss.name == "pixel" and d[0] == 0
    torch.testing.assert_close(d[1], torch.tensor(0.25 + 0.25))  # l2 + multi-scale MSE of a constant shift


def test_build_picks_the_best_available(files, tmp_path, no_env, monkeypatch):
    paths, _ = files
    assert build_perceptual_loss(paths["vgg"], paths["lin"], make_tiny_discriminator(0), size=SIZE).name == (
        "lpips-vgg16"
    )
    assert build_perceptual_loss(discriminator=make_tiny_discriminator(0)).name == "d-features"
    with pytest.warns(UserWarning):
        assert build_perceptual_loss().name == "pixel"
    with pytest.raises(PerceptualWeightsMissing, match=VGG_ENV):  # configured but absent: no silent fallback
        build_perceptual_loss(discriminator=make_tiny_discriminator(0), lpips_path=paths["lin"])
    monkeypatch.setenv(VGG_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(PerceptualWeightsMissing, match=r"gone\.pth"):
        build_perceptual_loss(discriminator=make_tiny_discriminator(0))
    monkeypatch.setenv(LPIPS_ENV, str(paths["lin"]))
    monkeypatch.setenv(VGG_ENV, str(paths["vgg"]))
    assert build_perceptual_loss(size=SIZE).name == "lpips-vgg16"


def test_d_feature_loss_runs_large_discriminators_at_max_size():
    """Above max_size the feature term sees max_size-px images through D's first blocks, down to 4 px."""

    D = make_tiny_discriminator(3, resolution=64)
    capped = DiscriminatorFeatureLoss(D, max_size=16)
    full = DiscriminatorFeatureLoss(D)
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    k = len(capped.scales) + 1  # pixel + pyramid entries come first
    feats = capped.embed(a)[k:]
    assert [f.shape[-1] for f in feats] == [16, 8, 4]  # fromRGB at 16 px, then two blocks: 16 -> 8 -> 4
    assert [f.shape[-1] for f in full.embed(a)[k:]] == [64, 32, 16, 8, 4]
    d = capped(a, b)
    assert d.shape == (2,) and torch.isfinite(d).all() and not torch.equal(d, full(a, b))
    assert torch.equal(capped(a, a), torch.zeros(2))
