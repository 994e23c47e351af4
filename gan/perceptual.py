"""Perceptual distances for projection: LPIPS-VGG16 from local weight files, with fallbacks.

Every loss maps two image batches in [-1, 1] ([N, 3, H, W] each) to N per-sample distances, so each image in a
batched projection keeps its own gradient. ``embed`` + ``compare`` let a caller compute a fixed target's
features once. Losses hold no trainable parameters and stay in eval mode.

- ``LPIPS``: a VGG16 trunk with torchvision's ``features.{i}`` state-dict keys (``vgg16-397923af.pth`` loads as
  is, ``classifier.*`` ignored) and the LPIPS v0.1 linear layers (``lin{k}.model.1.weight``, [1, C, 1, 1]).
  Without the lin file it is LPIPS's "baseline" (lpips=False: unweighted channel sum), name "vgg16-features".
- ``DiscriminatorFeatureLoss``: the fallback when those files are absent: the base checkpoint's own discriminator
  features, unit-normalised over channels like LPIPS, plus a pixel term and a multi-scale (1, 1/2, 1/4) term.
  Without a discriminator it is pixel + multi-scale only (name "pixel"), with a warning. Above ``max_size``
  (256) px the feature term sees the images area-downsampled to 256 px, as LPIPS does.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VGG_ENV, LPIPS_ENV = "TOONIFY_VGG16_PATH", "TOONIFY_LPIPS_PATH"
VGG_SOURCE = "torchvision's vgg16-397923af.pth (https://download.pytorch.org/models/vgg16-397923af.pth)"
LPIPS_SOURCE = (
    "LPIPS v0.1 vgg.pth (lpips/weights/v0.1/vgg.pth in https://github.com/richzhang/PerceptualSimilarity, "
    "also shipped inside the `lpips` pip package)"
)
VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
TAP_CHANNELS = (64, 128, 256, 512, 512)
VGG_IGNORED_PREFIX = "classifier."  # torchvision's fully connected layers: LPIPS uses the conv features only


class PerceptualWeightsMissing(FileNotFoundError):  # noqa: N818  (the name the API promises)
    """A weight file LPIPS needs is not configured or not on disk."""


class PerceptualWeightsError(ValueError):
    """A weight file exists but is not the expected plain tensor state dict."""


def _missing(lines: list[str]) -> PerceptualWeightsMissing:
    return PerceptualWeightsMissing(
        "LPIPS-VGG16 weights missing: " + "; ".join(lines) + f". Get {VGG_SOURCE} and {LPIPS_SOURCE}, then pass "
        f"their paths or set {VGG_ENV} and {LPIPS_ENV} (configure neither to use the discriminator-feature fallback)."
    )


def load_tensors(path: str | Path, what: str, env: str) -> dict[str, Tensor]:
    """Read a state dict with ``torch.load(weights_only=True)``: arbitrary pickles are refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise _missing([f"{what} file {path} does not exist ({env})"])
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # the LPIPS file was saved from CUDA
    # A damaged file fails in many ways inside torch.load (a cut legacy-format file, as LPIPS's vgg.pth is, gives
    # IndexError or struct.error; flipped bytes KeyError, TypeError or AssertionError): all are this refusal.
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, IndexError, KeyError, TypeError,
            AssertionError, struct.error) as e:  # fmt: skip
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0])
        raise PerceptualWeightsError(
            f"refusing {what} file {path}: not a plain tensor state dict (read with weights_only=True, "
            f"which never runs pickled code): {detail}"
        ) from e
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise PerceptualWeightsError(f"{what} file {path} is not a state dict of tensors")
    return dict(sd)


def _unit(x: Tensor) -> Tensor:
    """Unit-normalise over channels at each position (LPIPS's normalize_tensor)."""
    return x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _configured(path: str | Path | None, env: str) -> Path | None:
    value = path if path is not None else os.environ.get(env) or None
    return Path(value).expanduser() if value else None


def configured_paths(
    vgg_path: str | Path | None = None, lpips_path: str | Path | None = None
) -> tuple[Path | None, Path | None]:
    """The VGG16 and LPIPS lin paths given here, else in ``TOONIFY_VGG16_PATH``/``TOONIFY_LPIPS_PATH`` (or None)."""
    return _configured(vgg_path, VGG_ENV), _configured(lpips_path, LPIPS_ENV)


class PerceptualLoss(nn.Module):
    """Base: ``loss(a, b) -> [N]``; ``compare(embed(a), embed(b))`` gives the same with cacheable features."""

    name = "perceptual"

    def embed(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def compare(self, fa: Sequence[Tensor], fb: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.ndim != 4 or a.shape[1] != 3 or a.shape != b.shape:
            raise ValueError(f"expected two [N, 3, H, W] batches of one shape, got {list(a.shape)}, {list(b.shape)}")
        return self.compare(self.embed(a), self.embed(b))

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # a fixed metric: always eval


class VGG16(nn.Module):
    """torchvision's ``vgg16().features`` (same keys ``features.{i}.weight/bias``); returns the five LPIPS taps."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in VGG_CFG:
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
            c = c if v == "M" else int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features[: TAPS[-1] + 1]):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps


class _LinLayers(nn.Module):
    """LPIPS's per-tap 1×1 convs, named as in the LPIPS weights file (index 0 was dropout, here identity)."""

    def __init__(self) -> None:
        super().__init__()
        for k, c in enumerate(TAP_CHANNELS):
            holder = nn.Module()
            holder.model = nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, bias=False))
            setattr(self, f"lin{k}", holder)

    def layers(self) -> list[nn.Module]:
        return [getattr(self, f"lin{k}").model for k in range(len(TAP_CHANNELS))]


class LPIPS(PerceptualLoss):
    """LPIPS (v0.1, VGG16 trunk) from local files; ``lin_path=None`` gives the unweighted baseline.

    Inputs larger than ``size`` are area-downsampled to it first (NV's projector uses 256)."""

    def __init__(self, vgg_path: str | Path, lin_path: str | Path | None = None, *, size: int = 256) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.vgg, self.lin = VGG16(), _LinLayers()
        sd = load_tensors(vgg_path, "VGG16", VGG_ENV)
        self._load(self.vgg, {k: v for k, v in sd.items() if not k.startswith(VGG_IGNORED_PREFIX)}, vgg_path)
        if lin_path is None:
            self.name = "vgg16-features"
            for conv in self.lin.layers():
                nn.init.ones_(conv[1].weight)
        else:
            self.name = "lpips-vgg16"
            sd = load_tensors(lin_path, "LPIPS lin", LPIPS_ENV)
            if any(bool((v < 0).any()) for v in sd.values()):
                raise PerceptualWeightsError(f"LPIPS lin file {lin_path} has negative weights")
            self._load(self.lin, sd, lin_path)
        self.eval().requires_grad_(False)

    @staticmethod
    def _load(module: nn.Module, sd: dict[str, Tensor], path: str | Path) -> None:
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise PerceptualWeightsError(f"{path} does not match {type(module).__name__.lstrip('_')}: {e}") from e

    def embed(self, images: Tensor) -> list[Tensor]:
        h, w = images.shape[-2:]
        if max(h, w) > self.size:
            s = self.size / max(h, w)
            images = _resize(images, (max(1, round(h * s)), max(1, round(w * s))))
        return [_unit(f) for f in self.vgg((images - self.shift) / self.scale)]

    def compare(self, fa: Sequence[Tensor], fb: Sequence[Tensor]) -> Tensor:
        return sum(lin((a - b).square()).mean((1, 2, 3)) for a, b, lin in zip(fa, fb, self.lin.layers(), strict=True))


def lpips_from_config(
    vgg_path: str | Path | None = None, lpips_path: str | Path | None = None, *, size: int = 256
) -> LPIPS:
    """LPIPS from paths given here or in ``TOONIFY_VGG16_PATH`` / ``TOONIFY_LPIPS_PATH``; both are required."""
    vgg, lin = _configured(vgg_path, VGG_ENV), _configured(lpips_path, LPIPS_ENV)
    problems = [
        f"{what} {'file ' + str(p) + ' does not exist' if p else 'not configured'} ({env})"
        for what, p, env in (("VGG16", vgg, VGG_ENV), ("LPIPS lin", lin, LPIPS_ENV))
        if p is None or not p.is_file()
    ]
    if problems:
        raise _missing(problems)
    return LPIPS(vgg, lin, size=size)


class DiscriminatorFeatureLoss(PerceptualLoss):
    """Fallback: unit-normalised ``D.features`` distance (mean over blocks) + pixel (l1/l2) + multi-scale MSE.

    The discriminator is put in eval mode and frozen in place (pass a copy if you still train it); images are
    resized to its resolution for the feature term. A discriminator larger than ``max_size`` sees the images
    area-downsampled to ``max_size`` instead: its blocks are fully convolutional, so its first blocks run on
    them down to 4 px (as many blocks as a ``max_size`` discriminator has), and the feature term costs what it
    costs at ``max_size`` whatever the model's resolution. ``discriminator=None`` leaves the pixel terms only."""

    def __init__(
        self,
        discriminator: nn.Module | None,
        *,
        feature_weight: float = 1.0,
        pixel_weight: float = 1.0,
        multiscale_weight: float = 1.0,
        pixel: str = "l1",
        scales: Sequence[int] = (1, 2, 4),
        max_size: int = 256,
    ) -> None:
        super().__init__()
        self.max_size = int(max_size)
        if pixel not in ("l1", "l2"):
            raise ValueError(f"pixel must be 'l1' or 'l2', got {pixel!r}")
        self.D = None if discriminator is None else discriminator.eval().requires_grad_(False)
        self.name = "pixel" if discriminator is None else "d-features"
        self.weights = (float(feature_weight), float(pixel_weight), float(multiscale_weight))
        self.pixel, self.scales = pixel, tuple(int(s) for s in scales)
        if discriminator is None:
            warnings.warn("no perceptual weights and no discriminator: pixel losses only", stacklevel=2)

    def embed(self, images: Tensor) -> list[Tensor]:
        pyramid = [images if s == 1 else F.avg_pool2d(images, s) for s in self.scales]
        if self.D is None:
            return [images, *pyramid]
        return [images, *pyramid, *(_unit(f) for f in self._features(images))]

    def _features(self, images: Tensor) -> list[Tensor]:
        r = self.D.resolution
        if r <= self.max_size:
            return self.D.features(_resize(images, (r, r)))
        x, feats = _resize(images, (self.max_size, self.max_size)), []
        for block in list(self.D.convs)[: 1 + (self.max_size // 4).bit_length() - 1]:  # fromRGB, then to 4 px
            x = block(x)
            feats.append(x)
        return feats

    def compare(self, fa: Sequence[Tensor], fb: Sequence[Tensor]) -> Tensor:
        wf, wp, wm = self.weights
        k = len(self.scales) + 1
        diff = fa[0] - fb[0]
        d = wp * (diff.abs() if self.pixel == "l1" else diff.square()).mean((1, 2, 3))
        d = d + wm * sum((a - b).square().mean((1, 2, 3)) for a, b in zip(fa[1:k], fb[1:k], strict=True)) / (k - 1)
        if len(fa) > k:
            feats = [(a - b).square().sum(1).mean((1, 2)) for a, b in zip(fa[k:], fb[k:], strict=True)]
            d = d + wf * sum(feats) / len(feats)
        return d


def build_perceptual_loss(
    vgg_path: str | Path | None = None,
    lpips_path: str | Path | None = None,
    discriminator: nn.Module | None = None,
    *,
    size: int = 256,
    **fallback: float | str,
) -> PerceptualLoss:
    """The best loss available: LPIPS (VGG + lin files), VGG features (VGG file only), D features, pixel.

    Paths come from the arguments or the environment. A path that is configured but absent raises
    ``PerceptualWeightsMissing`` rather than silently degrading; nothing configured means the fallback."""
    vgg, lin = configured_paths(vgg_path, lpips_path)
    choice = perceptual_choice(vgg, lin, discriminator_available=discriminator is not None)
    if choice == "lpips-vgg16":
        return lpips_from_config(vgg, lin, size=size)
    if choice == "vgg16-features":
        return LPIPS(vgg, None, size=size)
    return DiscriminatorFeatureLoss(discriminator, **fallback)


def perceptual_choice(vgg: Path | None, lpips: Path | None, *, discriminator_available: bool) -> str:
    """The ``name`` of the loss :func:`build_perceptual_loss` builds for these configured paths
    (:func:`configured_paths`): "lpips-vgg16", "vgg16-features", "d-features" or "pixel". A configured file is
    never skipped: the two LPIPS choices still fail to build when a file they need is absent or damaged."""
    if lpips is not None:
        return "lpips-vgg16"  # needs the VGG file as well; lpips_from_config names whichever is missing
    if vgg is not None:
        return "vgg16-features"
    return "d-features" if discriminator_available else "pixel"
