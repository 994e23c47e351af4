"""Inception-v3 features for FID, as pytorch-fid computes them, and the Fréchet distance.

The network is the one of TensorFlow's FID code (the 2015-12-05 Inception graph) in the layout of pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``: torchvision's ``Inception3`` names (``Conv2d_1a_3x3`` …
``Mixed_7c``, ``fc`` with 1008 classes, no auxiliary classifier), each convolution a bias-free conv + batch norm
(eps 0.001) + ReLU. It differs from torchvision's network where TensorFlow's graph does: the average pools of
the A, C and first E blocks leave the zero padding out of the mean, and the last E block (``Mixed_7c``) pools
with a max instead of an average. Written here so ``gan`` needs no torchvision; the weights are not shipped:
the operator points ``TOONIFY_INCEPTION_PATH`` at the file, which is read with ``torch.load(weights_only=True)``
(a pickle that would run code is refused) and must fit the network exactly.

Features are the 2048-d output of the final average pool, for images resized to 299x299 (bilinear) as
pytorch-fid does. :func:`frechet_distance` is FID's ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), computed through
symmetric eigendecompositions (numpy only).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FEATURE_DIM",
    "INCEPTION_ENV",
    "INCEPTION_SOURCE",
    "FIDInception",
    "InceptionFeatures",
    "InceptionWeightsError",
    "configured_inception_path",
    "feature_statistics",
    "frechet_distance",
    "load_inception",
]

INCEPTION_ENV = "TOONIFY_INCEPTION_PATH"
INCEPTION_SOURCE = (
    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (a release asset of https://github.com/mseitzer/pytorch-fid)"
)
FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TensorFlow graph's classifier; unused for FID but part of the file


class InceptionWeightsError(ValueError):
    """The Inception weight file is not a plain tensor state dict of this network's layout."""


class _ConvBN(nn.Module):
    """Bias-free convolution, batch norm (TensorFlow's eps 0.001), ReLU: torchvision's ``BasicConv2d`` names."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    # TensorFlow's SAME average pool divides by the pixels inside the image, not by 9.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled 1x1 branches (64 + 64 + 96 + pool_features channels)."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        five = self.branch5x5_2(self.branch5x5_1(x))
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), five, double, self.branch_pool(_tf_avg_pool(x))], 1)


class _BlockB(nn.Module):
    """35 → 17 reduction: strided 3x3, strided double 3x3 and a max pool (384 + 96 + cin channels)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (4 x 192 channels)."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of a 1x7 and a 7x1 convolution
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = _ConvBN(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = _ConvBN(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = _ConvBN(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = _ConvBN(c7, 192, row[0], padding=row[1])
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(_tf_avg_pool(x))], 1)


class _BlockD(nn.Module):
    """17 → 8 reduction: 3x3 and 7x7-then-3x3 strided branches and a max pool (320 + 192 + cin channels)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        three = self.branch3x3_2(self.branch3x3_1(x))
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([three, seven, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs (320 + 768 + 768 + 192 = 2048 channels). ``max_pool``: the pool
    branch of TensorFlow's last block (``Mixed_7c``) takes a max, the one before it an average."""

    def __init__(self, cin: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        three = self.branch3x3_1(x)
        three = torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], 1)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        double = torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), three, double, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Inception-v3 of TensorFlow's FID code: ``forward(images in [-1, 1]) -> [N, 2048]`` pool features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, c7=128)
        self.Mixed_6c = _BlockC(768, c7=160)
        self.Mixed_6d = _BlockC(768, c7=160)
        self.Mixed_6e = _BlockC(768, c7=192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # in the file; FID stops at the pool before it

    def forward(self, images: Tensor) -> Tensor:
        x = images
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean((2, 3))

    def train(self, mode: bool = True) -> FIDInception:
        return super().train(False)  # a fixed metric: batch norm always uses the stored statistics


def configured_inception_path(path: str | Path | None = None) -> Path | None:
    """``path``, else ``$TOONIFY_INCEPTION_PATH``, else None (no Inception metrics)."""
    value = path if path is not None else os.environ.get(INCEPTION_ENV) or None
    return Path(value).expanduser() if value else None


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInception:
    """The network with the file's weights, strictly: every name and shape must fit. The file is read with
    ``torch.load(weights_only=True)``, so a pickle that would run code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} do not exist ({INCEPTION_ENV}); get {INCEPTION_SOURCE}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise InceptionWeightsError(
            f"refusing Inception weights {path}: not a plain tensor state dict (read with weights_only=True): {first}"
        ) from e
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise InceptionWeightsError(f"Inception weights {path} are not a state dict of tensors")
    net = FIDInception()
    ours = net.state_dict()
    # Batch-norm step counters are optional (old files lack them); every other name and shape must fit.
    optional = {k for k in ours if k.endswith("num_batches_tracked")}
    missing = sorted(set(ours) - set(sd) - optional)
    unexpected = sorted(set(sd) - set(ours))
    wrong = sorted(k for k in set(sd) & set(ours) if tuple(sd[k].shape) != tuple(ours[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{name}: {keys[:3]}{' …' if len(keys) > 3 else ''}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]  # fmt: skip
        raise InceptionWeightsError(f"Inception weights {path} do not fit pytorch-fid's layout ({'; '.join(parts)})")
    net.load_state_dict({**{k: ours[k] for k in optional}, **sd}, strict=True)
    return net.eval().requires_grad_(False).to(device)


class InceptionFeatures:
    """2048-d FID features of generator-range images (float [N, 3, H, W] in [-1, 1]), in batches.

    Images are quantised to 8 bits first, as the PNG files FID is usually computed from are."""

    def __init__(self, net: FIDInception, batch: int = 32, source: str = "") -> None:
        self.net, self.batch = net, batch
        self.description = f"Inception-v3 pool (pytorch-fid layout, {FEATURE_DIM} dims)" + (
            f" from {source}" if source else ""
        )

    @classmethod
    def from_path(cls, path: str | Path, device: str | torch.device = "cpu", batch: int = 32) -> InceptionFeatures:
        return cls(load_inception(path, device), batch=batch, source=Path(path).name)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> np.ndarray:
        """images [N, 3, H, W] in [-1, 1] → float64 [N, 2048]."""
        device = next(self.net.parameters()).device
        out = []
        for i in range(0, len(images), self.batch):
            x = images[i : i + self.batch].to(device).float().clamp(-1, 1)
            x = torch.round((x + 1) * 127.5) / 127.5 - 1  # the 8-bit levels of a saved image, back in [-1, 1]
            out.append(self.net(x).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, as pytorch-fid) of features [N, D]."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"feature statistics need [N >= 2, D] features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (rounding's tiny negative eigenvalues → 0)."""
    values, vectors = np.linalg.eigh((a + a.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: ‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½.

    tr (Σ₁Σ₂)^½ is the sum of the square roots of the eigenvalues of Σ₁^½ Σ₂ Σ₁^½, a symmetric PSD matrix
    similar to Σ₁Σ₂: two symmetric eigendecompositions instead of a general matrix square root, so the
    result is real and finite even for singular covariances (fewer samples than dimensions)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * cross)
