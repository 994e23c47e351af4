"""Procedural two-domain faces: determinism, shapes, shared identity, flat toons, pose and alignment."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image

from gan import synthetic as S


@pytest.fixture(scope="module")
def people() -> list[S.FaceParams]:
    return S.sample_faces(12, seed=7)


def _patch(img: np.ndarray, pt: tuple[float, float], r: int = 1) -> np.ndarray:
    x, y = round(pt[0]), round(pt[1])
    return img[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3).astype(np.float64).mean(0)


def _frontal(p: S.FaceParams, **kw) -> S.FaceParams:
    return dataclasses.replace(p, **{"yaw": 0.0, "roll": 0.0, "scale": 1.0, **kw})


@pytest.mark.parametrize("domain", S.DOMAINS)
def test_deterministic_in_seed_and_seeds_differ(domain):
    a = S.make_dataset(3, domain, 32, seed=3)
    assert np.array_equal(a, S.make_dataset(3, domain, 32, seed=3))
    assert not np.array_equal(a, S.make_dataset(3, domain, 32, seed=4))
    assert len({im.tobytes() for im in a}) == 3  # different people within a set too


@pytest.mark.parametrize("size", [32, 64, 128])
def test_shapes_and_dtypes(people, size):
    for render in (S.render_photo, S.render_toon):
        img = render(people[0], size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert img.std() > 20  # a picture, not a blank


def test_batch_equals_singles(people):
    for domain, render in (("photo", S.render_photo), ("toon", S.render_toon)):
        batch = S.render_batch(people[:4], domain, 48)
        assert batch.shape == (4, 48, 48, 3)
        for img, p in zip(batch, people[:4], strict=True):
            assert np.array_equal(img, render(p, 48))
    with pytest.raises(ValueError, match="domain"):
        S.render_batch(people[:1], "sketch", 32)


def test_save_dataset_writes_the_same_images(tmp_path):
    paths = S.save_dataset(tmp_path / "toons", 2, "toon", 32, seed=5)
    assert [p.name for p in paths] == ["toon_00000.png", "toon_00001.png"]
    saved = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    assert np.array_equal(saved, S.make_dataset(2, "toon", 32, seed=5))


def test_photo_and_toon_share_identity(people):
    """Hair and skin colours, read at the points the renderer reports, identify each person's toon among all
    the toons; a mismatched pair is much further apart than the true one."""

    def signature(img, pts):
        return np.concatenate(
            [_patch(img, pts["hair"]), (_patch(img, pts["cheek_left"]) + _patch(img, pts["cheek_right"])) / 2]
        )

    photos = [signature(S.render_photo(p, 128), S.feature_points(p, 128, "photo")) for p in people]
    toons = [signature(S.render_toon(p, 128), S.feature_points(p, 128, "toon")) for p in people]
    dist = np.array([[np.abs(ph - tn).mean() for tn in toons] for ph in photos])
    others = np.where(np.eye(len(people), dtype=bool), np.nan, dist)
    assert np.all(np.diag(dist) < np.nanpercentile(others, 25, axis=1))  # closer than most other people
    assert np.mean(dist.argmin(1) == np.arange(len(people))) >= 0.5  # look-alikes exist: 8 hair colours
    assert np.diag(dist).mean() < 0.4 * np.nanmean(others)
    for p, ph, tn in zip(people, photos, toons, strict=True):
        assert not np.array_equal(S.render_photo(p, 64), S.render_toon(p, 64))
        assert np.abs(ph[:3] - tn[:3]).mean() < 70, "hair colour kept"


def test_toon_is_flat_with_strong_edges(people):
    def stats(img):
        g = img.astype(np.float64).mean(-1)
        mag = np.hypot(np.diff(g, axis=0)[:, :-1], np.diff(g, axis=1)[:-1])
        return len(np.unique(img.reshape(-1, 3), axis=0)), (mag < 1).mean(), (mag > 40).mean()

    for p in people[:4]:
        (n_ph, flat_ph, edge_ph), (n_tn, flat_tn, edge_tn) = stats(S.render_photo(p, 128)), stats(S.render_toon(p, 128))
        assert n_tn < n_ph / 4  # few distinct colours: flat fills
        assert flat_tn > 0.6 and flat_tn > flat_ph + 0.3
        assert edge_tn > 1.4 * edge_ph  # ink outlines: more steep edges


@pytest.mark.parametrize("domain", S.DOMAINS)
def test_frontal_face_is_aligned_like_ffhq(people, domain):
    """The FFHQ recipe (eye-to-eye and eye-to-mouth vectors -> crop square) applied to a frontal synthetic face
    gives nearly the image itself: models trained on these crops see faces where aligned photos put them."""
    for p in people[:6]:
        pts = {k: np.array(v) for k, v in S.feature_points(_frontal(p), 128, domain).items()}
        assert pts["eye_left"][1] == pytest.approx(pts["eye_right"][1])  # level
        assert pts["eye_left"][1] / 128 == pytest.approx(S.EYE_ROW, abs=0.01)
        eye_avg = (pts["eye_left"] + pts["eye_right"]) / 2
        e2e, e2m = pts["eye_right"] - pts["eye_left"], pts["mouth"] - eye_avg
        side = 2 * max(2 * np.hypot(*e2e), 1.8 * np.hypot(*e2m))
        centre = eye_avg + 0.1 * e2m
        assert 0.9 < side / 128 < 1.2  # the toon head is drawn 6 % bigger
        np.testing.assert_allclose(centre, [63.5, 63.5], atol=0.03 * 128)


@pytest.mark.parametrize("domain", S.DOMAINS)
def test_pose_moves_features_and_the_pixels_follow(people, domain):
    render = S.render_toon if domain == "toon" else S.render_photo
    for roll in (-0.15, 0.15):
        p = dataclasses.replace(_frontal(people[1]), roll=roll)
        pts = S.feature_points(p, 128, domain)
        (xl, yl), (xr, yr) = pts["eye_left"], pts["eye_right"]
        assert math.atan2(yr - yl, xr - xl) == pytest.approx(roll, abs=1e-6)  # roll tilts the eye line
        img = render(p, 128)
        skin = _patch(img, pts["cheek_left"]).mean()
        for eye in ("eye_left", "eye_right"):  # the pupils are drawn where the points say
            assert _patch(img, pts[eye], 0).mean() < 0.5 * skin
    front = S.feature_points(_frontal(people[1]), 128, domain)
    turned = S.feature_points(_frontal(people[1], yaw=0.3), 128, domain)
    assert turned["nose"][0] > front["nose"][0] + 2  # yaw turns the face toward the image right
    assert abs(turned["eye_left"][0] + turned["eye_right"][0] - 127) < abs(turned["nose"][0] * 2 - 127)
    assert not np.array_equal(render(_frontal(people[1]), 64), render(_frontal(people[1], yaw=0.3), 64))
