"""FID: the Inception network loads a pytorch-fid-layout state dict strictly and safely, gives 2048-d features,
and the Fréchet distance agrees with closed forms on known Gaussians."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gan.inception import (
    FEATURE_DIM,
    FIDInception,
    InceptionFeatures,
    InceptionWeightsError,
    configured_inception_path,
    feature_statistics,
    frechet_distance,
    load_inception,
)

# torchvision's inception_v3 has 27 161 264 parameters; without the auxiliary classifier (3 326 696) and with
# the TensorFlow graph's 1008 classes (+8 · 2049) it is pytorch-fid's network.
FID_INCEPTION_PARAMETERS = 27_161_264 - 3_326_696 + 8 * 2049


def random_state_dict(seed: int = 0, *, with_counters: bool = True) -> dict[str, torch.Tensor]:
    """Random weights with the file's names and shapes (variances positive, as trained ones are)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in FIDInception().state_dict().items():
        if name.endswith("num_batches_tracked"):
            if with_counters:
                out[name] = torch.tensor(1000)
        elif name.endswith(("running_var", "bn.weight")):
            out[name] = torch.rand(t.shape, generator=g) + 0.5
        else:
            fan_in = t[0].numel() if t.ndim > 1 else 1
            out[name] = torch.randn(t.shape, generator=g) / math.sqrt(fan_in)
    return out


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_state_dict(), path)
    return path


def test_the_network_has_pytorch_fids_layout():
    net = FIDInception()
    assert sum(p.numel() for p in net.parameters()) == FID_INCEPTION_PARAMETERS
    sd = net.state_dict()
    assert tuple(sd["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["Mixed_5b.branch_pool.conv.weight"].shape) == (32, 192, 1, 1)
    assert tuple(sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape) == (192, 192, 1, 7)
    assert tuple(sd["Mixed_7a.branch7x7x3_4.conv.weight"].shape) == (192, 192, 3, 3)
    assert tuple(sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape) == (384, 384, 3, 1)
    assert tuple(sd["fc.weight"].shape) == (1008, 2048)
    assert not any(k.startswith("AuxLogits") or k.endswith(".conv.bias") for k in sd)


def test_a_file_of_the_right_names_and_shapes_loads_strictly_and_gives_2048_features(weights_file):
    net = load_inception(weights_file)
    saved = torch.load(weights_file, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    features = InceptionFeatures(net, batch=2, source=weights_file.name)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    f = features(images)
    assert f.shape == (3, FEATURE_DIM) and f.dtype == np.float64 and np.isfinite(f).all()
    assert (f >= 0).all() and f.std(0).max() > 0  # a mean of ReLU outputs, and not constant
    assert not np.allclose(f[0], f[1])
    again = features(images)  # eval mode: batch norm uses the stored statistics, nothing changes
    assert np.array_equal(f, again)
    alone = features(images[:1])
    np.testing.assert_allclose(alone[0], f[0], rtol=1e-4, atol=1e-6)  # independent of batch mates
    assert weights_file.name in features.description


def test_files_without_batch_norm_counters_load(tmp_path):
    path = tmp_path / "old.pth"
    torch.save(random_state_dict(2, with_counters=False), path)
    assert load_inception(path).Mixed_7c.branch_pool.bn.running_var.min() >= 0.5


def test_wrong_layouts_and_pickled_code_are_refused(tmp_path):
    sd = random_state_dict(3)
    cases = {
        "wrong shape": {**sd, "fc.weight": torch.zeros(1000, 2048)},
        "missing": {k: v for k, v in sd.items() if not k.startswith("Mixed_7c.")},
        "unexpected": {**sd, "AuxLogits.fc.weight": torch.zeros(1008, 768)},
    }
    for why, bad in cases.items():
        path = tmp_path / f"{why.replace(' ', '_')}.pth"
        torch.save(bad, path)
        with pytest.raises(InceptionWeightsError, match=why):
            load_inception(path)

    class Sneaky:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "sneaky.pth"
    torch.save({"x": Sneaky()}, path)
    with pytest.raises(InceptionWeightsError, match="weights_only"):
        load_inception(path)
    with pytest.raises(FileNotFoundError, match="TOONIFY_INCEPTION_PATH"):
        load_inception(tmp_path / "absent.pth")


def test_the_configured_path_comes_from_the_argument_or_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TOONIFY_INCEPTION_PATH", raising=False)
    assert configured_inception_path() is None
    monkeypatch.setenv("TOONIFY_INCEPTION_PATH", str(tmp_path / "i.pth"))
    assert configured_inception_path() == tmp_path / "i.pth"
    assert configured_inception_path("other.pth").name == "other.pth"


# ----------------------------------------------------------------------------------------------------------
# The Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_rotated_and_one_dimensional_gaussians():
    # Rotating both Gaussians changes nothing; in one dimension it is (m1 - m2)² + (s1 - s2)².
    rng = np.random.default_rng(1)
    d = 16
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    plain = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    rotated = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rotated == pytest.approx(plain, rel=1e-8)
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # A full covariance against itself (a general one, not diagonal in any fixed basis) is ~0.
    a = rng.normal(size=(d, d))
    sigma = a @ a.T
    assert abs(frechet_distance(mu1, sigma, mu1, sigma)) < 1e-8 * np.trace(sigma)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu1, sigma, mu2[:3], sigma)


def test_fid_of_samples_is_near_zero_for_one_distribution_and_singular_covariances_stay_finite():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8))
    same = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    shifted = frechet_distance(*feature_statistics(a), *feature_statistics(b + 1.0))
    assert 0 <= same < 0.05 and shifted == pytest.approx(8.0, rel=0.05)
    few = rng.normal(size=(10, 50))  # fewer samples than dimensions: a singular covariance, as small runs have
    value = frechet_distance(*feature_statistics(few), *feature_statistics(few + 0.1))
    assert math.isfinite(value) and value == pytest.approx(50 * 0.01, abs=1e-4)
    with pytest.raises(ValueError):
        feature_statistics(few[:1])
