"""Feed-forward image → W+ encoder, trained self-supervised on the generator's own samples (no dataset).

Architecture (pSp-like, small): a residual CNN (GroupNorm: trains fast at batch 8) halves the image down to
4×4; a top-down FPN mixes the 4, 8 and 16 px levels; one "map2style" head per level predicts a group of W+
rows, coarse features the first rows (pose, shape), fine features the last (colour, texture), pSp's split.
Outputs are offsets from the generator's average latent in units of W's per-dimension std (both buffers), so
an untrained encoder answers w_avg and targets are unit-scaled for any generator. A linear shortcut from a
16×16 thumbnail to one shared code is fitted by ridge regression before training: a CNN needs thousands of
steps to learn what least squares gets in one solve, so it starts from there and learns the residual.

Training samples z → w (truncation with per-layer jitter, style mixing, so W+ codes like real-photo
projections are covered), renders them with random noise and asks the encoder for ws: loss = latent L2 +
image reconstruction (pixel MSE, plus a perceptual ``loss_fn`` when given). Optionally a share of each batch
is real aligned faces (:func:`load_real_faces`): they have no ground-truth W, so for them the loss is the
image reconstruction alone. Generators above 256 px are encoded from a 256 px view and their reconstructions
are compared at 256 px (see ``IMAGE_LOSS_SIZE``). Training is resumable from snapshots (encoder, optimiser,
scheduler, RNG, step): a stopped and resumed run ends bit-identical to an unbroken one on CPU.

:func:`encoder_report` measures an encoder: held-out generated faces (PSNR, discriminator-feature distance)
and real portraits aligned as the pipeline aligns them (PSNR, D-feature and dlib identity distance).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from gan.checkpoints.common import CheckpointError, content_hash
from gan.checkpoints.native import read_tensors_and_metadata, write_tensors_and_metadata
from gan.imageio import DEFAULT_MAX_PIXELS, BadImageError, load_image
from gan.images import from_uint8, psnr, to_uint8
from gan.networks import Generator
from gan.training import load_optimizer_tensors, optimizer_tensors

META_KEY, FORMAT_VERSION = "toonify_encoder", 1
SNAPSHOT_KEY = "toonify_encoder_snapshot"
ROW_SPLITS = (3, 7)  # ws[:3] from 4 px features, ws[3:7] from 8 px, the rest from 16 px (pSp's grouping)
# Reconstructions of bigger generators are compared at this size, both sides area-downsampled, as NVIDIA's
# projector does for its LPIPS term: the encoder sees a 256 px view (it cannot learn detail finer than that),
# a perceptual network at 1024 px costs 16x the activations and time of 256 px, and the pixel terms lose
# nothing the encoder could have predicted.
IMAGE_LOSS_SIZE = 256
# No-grad renders (shortcut fit, report) go in chunks of at most this many pixels: 64 images up to 256 px,
# 4 at 1024 px (64 config-f renders at 1024 px hold ~9 GB per activation).
RENDER_PIXELS = 64 * 256 * 256
HOLDOUT_SEED = 90_210  # the report's generated faces: a seed training (default 0) does not draw from
REAL_MAX_BYTES = 20 << 20  # per real-face file, checked before it is read
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"  # the repository's real portraits
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# Settings a resumed run must share with its snapshot (anything else changes what the steps compute).
RESUME_KEYS = ("steps", "batch_size", "lr", "seed", "latent_weight", "image_weight", "truncation", "channels",
               "max_channels", "input_size", "fit_samples", "loss", "real_faces_digest", "real_share")  # fmt: skip


class EncoderMismatchError(ValueError):
    """The encoder was trained for another generator."""


class EncoderTrainingCancelledError(Exception):
    """The caller's cancellation check returned True between two steps."""


def generator_hash(G: Generator) -> str:
    return getattr(G, "meta", {}).get("content_hash") or content_hash(G.state_dict())


def resize_square(images: Tensor, size: int) -> Tensor:
    """[N, C, H, W] -> [N, C, size, size]: area when shrinking, bilinear when enlarging, as is when equal."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="area" if images.shape[-1] > size else "bilinear")


def loss_view(images: Tensor) -> Tensor:
    """What the image loss compares: the images themselves, area-downsampled to IMAGE_LOSS_SIZE above it."""
    return resize_square(images, IMAGE_LOSS_SIZE) if images.shape[-1] > IMAGE_LOSS_SIZE else images


def render_chunk(resolution: int) -> int:
    """Images per no-grad render chunk at ``resolution`` (a bounded pixel count, at most 64)."""
    return max(1, min(64, RENDER_PIXELS // resolution**2))


def _conv(i: int, o: int, stride: int = 1, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(i, o, k, stride, padding=1 if k == 3 else 0)


class _DownBlock(nn.Module):
    """Residual block that halves the resolution (strided first conv: a quarter of the cost)."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(i, o, 2), nn.GroupNorm(math.gcd(8, o), o), nn.LeakyReLU(0.2),
                                  _conv(o, o), nn.GroupNorm(math.gcd(8, o), o), nn.LeakyReLU(0.2))  # fmt: skip
        self.skip = nn.Sequential(nn.AvgPool2d(2), _conv(i, o, k=1))

    def forward(self, x: Tensor) -> Tensor:
        return (self.body(x) + self.skip(x)) / math.sqrt(2)


class Encoder(nn.Module):
    """images [N, 3, H, W] in [-1, 1] -> ws [N, num_ws, w_dim]; other sizes are resized to ``input_size``."""

    def __init__(self, resolution: int, num_ws: int, w_dim: int, channels: int = 32, max_channels: int = 256,
                 input_size: int | None = None) -> None:  # fmt: skip
        super().__init__()
        size = input_size or min(resolution, 256)
        self.kwargs = dict(resolution=resolution, num_ws=num_ws, w_dim=w_dim, channels=channels,
                           max_channels=max_channels, input_size=size)  # fmt: skip
        n_down = int(math.log2(max(size, 1) // 4))
        if size < 8 or 4 * 2**n_down != size:
            raise ValueError(f"input_size must be a power of two >= 8, got {size}")
        self.input_size, self.num_ws, self.w_dim, self.thumb = size, num_ws, w_dim, min(16, size)
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.register_buffer("w_scale", torch.ones(w_dim))
        self.register_buffer("lin_weight", torch.zeros(w_dim, 3 * self.thumb**2))  # the ridge shortcut
        self.register_buffer("lin_bias", torch.zeros(w_dim))
        widths = [min(channels * 2**i, max_channels) for i in range(n_down + 1)]
        self.stem = nn.Sequential(_conv(3, widths[0]), nn.LeakyReLU(0.2))
        self.blocks = nn.ModuleList(_DownBlock(a, b) for a, b in itertools.pairwise(widths))
        top = widths[-1]
        # Levels 4, 8, 16 px (fewer for small inputs, the last level then takes every remaining row).
        bounds = [0, *(min(s, num_ws) for s in ROW_SPLITS), num_ws]
        self.groups = list(itertools.pairwise(bounds))[: min(3, n_down)]
        self.groups[-1] = (self.groups[-1][0], num_ws)
        self.lateral = nn.ModuleList(_conv(widths[n_down - lvl], top, k=1) for lvl in range(len(self.groups)))
        self.heads = nn.ModuleList()
        for lvl, (a, b) in enumerate(self.groups):
            # map2style: strided convs to 4×4, a 4×4 "flatten" conv, then a linear layer to the group's rows.
            convs = [m for _ in range(lvl) for m in (_conv(top, top, 2), nn.LeakyReLU(0.2))]
            final = nn.Linear(top, (b - a) * w_dim)
            nn.init.zeros_(final.bias)
            final.weight.data.mul_(0.1)  # start near w_avg: early steps do not fling renders off the manifold
            self.heads.append(nn.Sequential(*convs, _conv(top, top, k=4), nn.LeakyReLU(0.2), nn.Flatten(), final))

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
        x = resize_square(images.to(self.w_avg.dtype), self.input_size)
        feats = [self.stem(x)]
        for block in self.blocks:
            feats.append(block(feats[-1]))
        offsets, p = [], None
        for lvl, head in enumerate(self.heads):  # top-down: finer levels also see the global context
            lat = self.lateral[lvl](feats[-1 - lvl])
            p = lat if p is None else lat + F.interpolate(p, scale_factor=2.0, mode="nearest")
            offsets.append(head(p).view(x.shape[0], -1, self.w_dim))
        shared = F.adaptive_avg_pool2d(x, self.thumb).flatten(1) @ self.lin_weight.T + self.lin_bias
        return self.w_avg + self.w_scale * (torch.cat(offsets, dim=1) + shared[:, None])


def sample_training_ws(
    G: Generator, n: int, psi: tuple[float, float], g: torch.Generator, *, mixing: float = 0.5
) -> Tensor:
    """W and W+ training codes: per-sample truncation ψ, half with per-layer ψ jitter, ``mixing`` style-mixed.

    Shared by the encoder and the distilled student (gan.distill): both learn from codes that cover what real
    photos project to, not only the W of single z."""
    dev = G.device
    w = G.style(torch.randn(2 * n, G.z_dim, generator=g).to(dev)).view(2, n, 1, G.w_dim)
    cut = torch.randint(1, G.num_ws, (n, 1, 1), generator=g)
    mixed = (torch.rand(n, 1, 1, generator=g) < mixing) & (torch.arange(G.num_ws).view(1, -1, 1) >= cut)
    ws = torch.where(mixed.to(dev), w[1], w[0])
    p = torch.empty(n, 1, 1).uniform_(*psi, generator=g)
    jitter = torch.randn(n, G.num_ws, 1, generator=g) * 0.1 * (torch.rand(n, 1, 1, generator=g) < 0.5)
    return G.w_avg + (p + jitter).clamp(0, 1.2).to(dev) * (ws - G.w_avg)


@torch.no_grad()
def _fit_shortcut(enc: Encoder, G: Generator, n: int, psi: tuple[float, float], g: torch.Generator) -> None:
    """Ridge regression thumbnail -> mean W+ row (in w_scale units) on ``n`` fresh samples."""
    xs, ys = [], []
    chunk = render_chunk(G.resolution)
    for i in range(0, n, chunk):
        ws = sample_training_ws(G, min(chunk, n - i), psi, g)
        x = F.interpolate(G.synthesis(ws, noise=G.make_noise(len(ws), generator=g)), size=enc.input_size, mode="area")
        xs.append(F.adaptive_avg_pool2d(x, enc.thumb).flatten(1).double())
        ys.append(((ws.mean(1) - enc.w_avg) / enc.w_scale).double())
    x, y = torch.cat(xs), torch.cat(ys)
    xm, ym = x.mean(0), y.mean(0)
    gram = (x - xm).T @ (x - xm)
    ridge = 1e-2 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    weight = torch.linalg.solve(gram + ridge, (x - xm).T @ (y - ym))  # relative ridge: any image scale or n
    enc.lin_weight.copy_(weight.T)
    enc.lin_bias.copy_(ym - xm @ weight)


# ---------------------------------------------------------------------------------------------- real faces


@dataclass(frozen=True)
class RealFaces:
    """Real, already aligned face images for training: uint8 [N, S, S, 3], where they came from and what was
    skipped (reason -> count). ``digest`` identifies the pixels (a resumed run must see the same set)."""

    images: Tensor
    source: str
    digest: str
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        im = self.images
        if im.dtype != torch.uint8 or im.ndim != 4 or im.shape[-1] != 3 or im.shape[1] != im.shape[2]:
            raise ValueError(f"real faces must be uint8 [N, S, S, 3], got {im.dtype} {list(im.shape)}")
        if len(im) == 0:
            raise ValueError(f"no real faces in {self.source}")

    @classmethod
    def from_array(cls, images: np.ndarray | Tensor, source: str = "array", skipped: dict | None = None) -> RealFaces:
        images = torch.as_tensor(np.ascontiguousarray(images))
        h = hashlib.sha256(f"{list(images.shape)}".encode())
        h.update(images.numpy().tobytes())
        return cls(images=images, source=source, digest=h.hexdigest(), skipped=dict(skipped or {}))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def batch(self, index: Tensor, device: torch.device) -> Tensor:
        """The faces at ``index`` as float [n, 3, S, S] in [-1, 1] on ``device``."""
        return from_uint8(self.images[index]).to(device)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "count": len(self), "size": self.size, "digest": self.digest,
                "skipped": dict(self.skipped)}  # fmt: skip


def training_image_size(resolution: int, input_size: int | None = None) -> int:
    """The size real faces are kept at: what the image loss and the encoder see (never above ``resolution``)."""
    return min(resolution, max(min(resolution, IMAGE_LOSS_SIZE), input_size or 0))


def _square(im: Image.Image, size: int) -> np.ndarray:
    """Centre square (aligned faces already are), resized to ``size`` with Lanczos."""
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side)) if im.size != (side, side) else im
    return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS) if side != size else im, dtype=np.uint8)


def _candidate_files(root: Path) -> Iterator[tuple[Path, str | None]]:
    """(path, None) for each regular file under ``root`` in sorted order, or (path, why skipped); links are not
    followed (they could point anywhere), hidden files and folders are left out."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                yield path, "hidden"
                continue
            mode = path.lstat().st_mode
            yield path, None if stat.S_ISREG(mode) else "not_a_file"


def load_real_faces(
    folder: str | os.PathLike,
    size: int,
    *,
    max_images: int = 5000,
    max_bytes: int = REAL_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> RealFaces:
    """Up to ``max_images`` aligned faces from ``folder`` (sorted, sub-folders too) at ``size`` px.

    Files are decoded by :func:`gan.imageio.load_image` (size checked before reading, pixel limit, truncation);
    files that are not readable images are skipped and counted by reason. A folder without a single usable
    image is a ValueError. Memory is bounded: ``max_images`` × ``size``² × 3 bytes."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--real-faces: {root} is not a folder")
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    kept: list[np.ndarray] = []
    skipped: dict[str, int] = {}
    for path, why in _candidate_files(root):
        if len(kept) >= max_images:
            break
        if why is None:
            try:
                kept.append(_square(load_image(path, max_pixels=max_pixels, max_bytes=max_bytes), size))
                continue
            except BadImageError as e:
                why = e.reason
            except OSError:
                why = "unreadable"
        skipped[why] = skipped.get(why, 0) + 1
    if not kept:
        detail = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "the folder is empty"
        raise ValueError(f"no usable face images in {root} ({detail})")
    return RealFaces.from_array(np.stack(kept), source=str(root), skipped=skipped)


def real_count(step: int, batch_size: int, share: float) -> int:
    """Real faces in batch ``step``: over any run of steps the count follows ``share`` exactly (a batch of 2 at
    0.25 takes one every other step), and it depends on the step alone, so a resumed run draws the same."""
    per = share * batch_size
    return min(batch_size, math.floor((step + 1) * per) - math.floor(step * per))


# ---------------------------------------------------------------------------------------------- training


@dataclass
class _TrainState:
    """Everything a snapshot holds, so a resumed run continues exactly where it stopped."""

    enc: Encoder
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    g: torch.Generator
    step: int = 0
    loss: float | None = None


def _save_snapshot(path: Path, st: _TrainState, settings: dict, gen_hash: str) -> None:

    tensors = {f"encoder.{k}": v for k, v in st.enc.state_dict().items()} | optimizer_tensors("opt", st.opt)
    tensors["rng"] = st.g.get_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"step": st.step, "settings": settings, "generator_hash": gen_hash, "scheduler": st.sched.state_dict(),
            "loss": st.loss}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors_and_metadata(tensors, path, meta, SNAPSHOT_KEY)  # a kill mid-write leaves the previous one


def _load_snapshot(path: Path, st: _TrainState, settings: dict, gen_hash: str) -> None:

    tensors, raw = read_tensors_and_metadata(path, SNAPSHOT_KEY)
    if raw is None:
        raise CheckpointError(f"{path}: not an encoder training snapshot")
    meta = json.loads(raw)
    if meta.get("generator_hash") != gen_hash:
        raise EncoderMismatchError(f"{path} is a snapshot of an encoder for another generator; delete it")
    saved = meta.get("settings", {})
    for name in RESUME_KEYS:
        if saved.get(name) != settings.get(name):
            raise ValueError(
                f"{path} was made with {name}={saved.get(name)!r}, not {settings.get(name)!r}; "
                "run with the same settings, or without --resume to start over"
            )
    st.enc.load_state_dict({k[len("encoder.") :]: v for k, v in tensors.items() if k.startswith("encoder.")})
    load_optimizer_tensors("opt", st.opt, tensors)
    st.sched.load_state_dict(meta["scheduler"])
    for group, lr in zip(st.opt.param_groups, st.sched.get_last_lr(), strict=True):
        group["lr"] = lr  # the optimiser's own state dict was loaded without its param groups
    st.g.set_state(tensors["rng"])
    st.step, st.loss = int(meta["step"]), meta.get("loss")


def _step_loss(
    st: _TrainState,
    G: Generator,
    *,
    batch_size: int,
    n_real: int,
    real_faces: RealFaces | None,
    truncation: tuple[float, float],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    latent_weight: float,
    image_weight: float,
    autocast: torch.autocast,
) -> Tensor:
    """One batch: ``batch_size - n_real`` generated faces (latent + image loss), ``n_real`` real ones (image
    loss only: they have no ground-truth W)."""
    enc, dev, n_gen = st.enc, G.device, batch_size - n_real
    with torch.no_grad():
        inputs, targets, ws = [], [], None
        if n_gen:
            ws = sample_training_ws(G, n_gen, truncation, st.g)
            images = G.synthesis(ws, noise=G.make_noise(n_gen, generator=st.g))
            inputs.append(resize_square(images, enc.input_size))
            targets.append(loss_view(images))
        if n_real:
            real = real_faces.batch(torch.randint(len(real_faces), (n_real,), generator=st.g), dev)
            inputs.append(resize_square(real, enc.input_size))
            targets.append(resize_square(real, min(G.resolution, IMAGE_LOSS_SIZE)))
        inputs = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        target = targets[0] if len(targets) == 1 else torch.cat(targets)
    with autocast:
        pred = enc(inputs).float()
        loss = latent_weight * ((pred[:n_gen] - ws) / enc.w_scale).square().mean() if n_gen else pred.new_zeros(())
        if image_weight:  # const noise: at inference nobody knows the photo's noise either
            recon = loss_view(G.synthesis(pred, noise_mode="const").float())
            img = (recon - target).square().mean()
            loss = loss + image_weight * (img if loss_fn is None else img + loss_fn(recon, target).mean())
    return loss


def train_encoder(
    G: Generator,
    *,
    steps: int = 2000,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    latent_weight: float = 1.0,
    image_weight: float = 1.0,
    truncation: tuple[float, float] = (0.5, 1.0),
    channels: int = 32,
    max_channels: int = 256,
    input_size: int | None = None,
    fit_samples: int = 2048,
    progress: Callable[[int, int, float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    real_faces: RealFaces | None = None,
    real_share: float = 0.25,
    bf16: bool = True,
    snapshot_path: str | Path | None = None,
    resume: bool = False,
    snapshot_every: int = 500,
) -> Encoder:
    """Train an encoder for ``G`` on its own samples: seeded (deterministic on CPU), Adam, cosine decay.

    ``real_faces``: a ``real_share`` of each batch comes from them (image loss only). ``bf16``: autocast on CUDA
    (no effect on CPU). ``snapshot_path``: training state is written there every ``snapshot_every`` steps, at
    the end and on cancellation (EncoderTrainingCancelledError); with ``resume`` an existing snapshot is
    continued (the same result as an unbroken run), without it a stale one is deleted first."""
    if not 0 <= real_share <= 1:
        raise ValueError(f"real_share must be within [0, 1], got {real_share}")
    if real_faces is not None and real_share > 0 and not image_weight:
        raise ValueError("real faces train through the image loss alone: image_weight must be > 0")
    dev, g = G.device, torch.Generator().manual_seed(seed)
    gen_hash = generator_hash(G)
    share = real_share if real_faces is not None else 0.0
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, latent_weight=latent_weight,
                    image_weight=image_weight, truncation=list(truncation), fit_samples=fit_samples,
                    loss=getattr(loss_fn, "name", type(loss_fn).__name__) if loss_fn else "mse", channels=channels,
                    max_channels=max_channels, input_size=input_size,
                    real_faces=None if real_faces is None else real_faces.describe(), real_share=share,
                    real_faces_digest=None if real_faces is None else real_faces.digest,
                    bf16=bf16 and dev.type == "cuda")  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        enc = Encoder(G.resolution, G.num_ws, G.w_dim, channels, max_channels, input_size).to(dev)
    snap = Path(snapshot_path) if snapshot_path is not None else None
    if snap is not None and not resume:
        snap.unlink(missing_ok=True)  # a fresh run: a stale snapshot must not be continued later by mistake
    resuming = snap is not None and snap.exists()
    grad_flags = [p.requires_grad for p in G.parameters()]
    G.requires_grad_(False)
    try:
        if not resuming:  # a snapshot holds the fitted buffers and the RNG past these draws
            with torch.no_grad():  # per-dimension W std: offsets are predicted (and penalised) in these units
                enc.w_avg.copy_(G.w_avg)
                enc.w_scale.copy_(G.style(torch.randn(4096, G.z_dim, generator=g).to(dev)).std(0).clamp_min(1e-3))
            if fit_samples:
                _fit_shortcut(enc, G, fit_samples, truncation, g)
        opt = torch.optim.Adam(enc.parameters(), lr=lr, betas=(0.9, 0.99), fused=True if dev.type == "cuda" else None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.55 + 0.45 * math.cos(math.pi * s / max(steps, 1)))
        st = _TrainState(enc=enc, opt=opt, sched=sched, g=g)
        if resuming:
            _load_snapshot(snap, st, settings, gen_hash)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=settings["bf16"])
        every = max(1, snapshot_every)
        enc.train()
        while st.step < steps:
            if should_cancel is not None and should_cancel():
                if snap is not None:
                    _save_snapshot(snap, st, settings, gen_hash)
                raise EncoderTrainingCancelledError(f"cancelled at step {st.step}/{steps}")
            loss = _step_loss(st, G, batch_size=batch_size, n_real=real_count(st.step, batch_size, share),
                              real_faces=real_faces, truncation=truncation, loss_fn=loss_fn,
                              latent_weight=latent_weight, image_weight=image_weight, autocast=autocast)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            st.step, st.loss = st.step + 1, loss.item()
            if snap is not None and (st.step % every == 0 or st.step == steps):
                _save_snapshot(snap, st, settings, gen_hash)
            if progress is not None:
                progress(st.step, steps, st.loss)
    finally:
        for p, flag in zip(G.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
    enc.generator_hash = gen_hash
    enc.train_settings = settings | {"final_loss": st.loss}
    return enc.eval()


@torch.no_grad()
def encode(encoder: Encoder, images: Tensor, batch_size: int = 16) -> Tensor:
    """ws [N, num_ws, w_dim] for images [N, 3, H, W] in [-1, 1], returned on the images' device."""
    dev, was_training = encoder.w_avg.device, encoder.training
    encoder.eval()
    out = [encoder(images[i : i + batch_size].to(dev)).to(images.device) for i in range(0, len(images), batch_size)]
    encoder.train(was_training)
    return torch.cat(out) if out else images.new_zeros(0, encoder.num_ws, encoder.w_dim)


def save_encoder(encoder: Encoder, path: str | Path, G: Generator) -> Path:
    """Write ``encoder`` as .safetensors with JSON metadata tying it to ``G``'s weights (content hash)."""
    h = generator_hash(G)
    if getattr(encoder, "generator_hash", h) != h or (encoder.num_ws, encoder.w_dim) != (G.num_ws, G.w_dim):
        raise EncoderMismatchError("this encoder was trained for another generator; refusing to tie it to this one")
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "encoder": encoder.kwargs, "generator_hash": h,
            "generator": G.config.to_json(), "training": getattr(encoder, "train_settings", {}),
            "file_hash": content_hash(tensors)}  # fmt: skip
    return write_tensors_and_metadata(tensors, path, meta, META_KEY)


def load_encoder(path: str | Path, G: Generator | None = None, device: str | torch.device = "cpu") -> Encoder:
    """Load an encoder; with ``G``, refuse (EncoderMismatchError) one trained for other generator weights."""
    tensors, raw = read_tensors_and_metadata(path, META_KEY)
    if raw is None:
        raise CheckpointError(f"{path}: not an encoder checkpoint (no {META_KEY!r} metadata; a generator file?)")
    try:
        meta = json.loads(raw)
        enc = Encoder(**meta["encoder"])
        enc.load_state_dict(tensors, strict=True)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: encoder metadata and weights do not fit ({e})") from e
    if meta.get("file_hash") != content_hash(tensors):
        raise CheckpointError(f"{path}: tensors do not match the recorded content hash (corrupted file?)")
    if G is not None and meta.get("generator_hash") != generator_hash(G):
        raise EncoderMismatchError(
            f"{path} was trained for generator {str(meta.get('generator_hash'))[:12]}…, not this one "
            f"({generator_hash(G)[:12]}…); train one for it with `toonify train-encoder`"
        )
    enc.generator_hash, enc.train_settings, enc.meta = meta.get("generator_hash"), meta.get("training", {}), meta
    return enc.eval().to(device)


# ---------------------------------------------------------------------------------------------- quality report


def default_portraits() -> list[Path]:
    """Every image in the repository's tests/fixtures: real portraits (none where the package is installed)."""
    if not FIXTURES.is_dir():
        return []
    return sorted(p for p in FIXTURES.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def d_feature_metric(discriminator: nn.Module) -> nn.Module:
    """The feature term of gan.perceptual.DiscriminatorFeatureLoss alone (pixel and multi-scale weights 0): the
    D-feature distance bench/distill.py reports (unit-normalised features, squared distance summed over
    channels, averaged over positions and blocks). Freezes ``discriminator`` in place."""
    from gan.perceptual import DiscriminatorFeatureLoss

    return DiscriminatorFeatureLoss(discriminator, feature_weight=1.0, pixel_weight=0.0, multiscale_weight=0.0)


@torch.no_grad()
def render(G: Generator, ws: Tensor, noise_generator: torch.Generator | None = None) -> Tensor:
    """``G``'s images for ``ws`` in chunks of bounded memory: const noise, or random noise drawn from
    ``noise_generator`` (as training renders its samples)."""
    out = []
    for i in range(0, len(ws), render_chunk(G.resolution)):
        w = ws[i : i + render_chunk(G.resolution)].to(G.device)
        noise = None if noise_generator is None else G.make_noise(len(w), generator=noise_generator)
        out.append(G.synthesis(w, noise_mode="const", noise=noise))
    return torch.cat(out)


@torch.no_grad()
def _per_image(metric: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor, chunk: int) -> Tensor:
    return torch.cat([metric(a[i : i + chunk], b[i : i + chunk]).float().cpu() for i in range(0, len(a), chunk)])


def _stats(name: str, values: Tensor | None, worst: str) -> dict[str, float | None]:
    if values is None or not len(values):
        return {name: None, f"{name}_{worst}": None}
    pick = values.min() if worst == "min" else values.max()
    return {name: float(values.mean()), f"{name}_{worst}": float(pick)}


def _generated_section(encoder: Encoder, G: Generator, metric: Callable | None, holdout: int, seed: int) -> dict:
    """Held-out generated faces: W+ drawn as training draws them (its truncation range), from a seed training
    does not use, rendered with random noise; reconstructions at const noise."""
    settings = getattr(encoder, "train_settings", {}) or {}
    truncation = tuple(settings.get("truncation", (0.5, 1.0)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ws = sample_training_ws(G, holdout, truncation, g)
        targets = render(G, ws, noise_generator=g)
        pred = encode(encoder, targets).to(G.device)
        recon = render(G, pred)
        scale = encoder.w_scale.to(G.device)
        latent = ((pred - ws) / scale).square().mean((1, 2)).cpu()
    chunk = render_chunk(G.resolution)
    dfeat = None if metric is None else _per_image(metric, recon, targets, chunk)
    row = {"faces": holdout, "seed": seed, "same_as_training_seed": settings.get("seed") == seed}
    row |= _stats("psnr", psnr(recon, targets).cpu(), "min") | _stats("dfeat", dfeat, "max")
    return row | {"latent_mse": float(latent.mean())}


def _align_portraits(paths: Sequence[Path], resolution: int, aligner: Any) -> tuple[list[np.ndarray], list[dict]]:
    """FFHQ crops at ``resolution`` of each portrait's largest face, as the pipeline aligns them
    (``Toonifier.align``); a row per file (a note where it could not be read or had no usable face)."""
    crops, rows = [], []
    for path in paths:
        try:
            face = aligner.align_all(load_image(path), output_size=resolution, largest_only=True)[0]
        except (ValueError, OSError) as e:  # BadImageError, NoFaceError, FaceTooSmallError, unreadable file
            rows.append({"name": path.name, "note": str(e) or type(e).__name__})
            continue
        crops.append(np.asarray(face.image.convert("RGB")))
        rows.append({"name": path.name})
    return crops, rows


def _real_section(
    encoder: Encoder, G: Generator, metric: Callable | None, paths: Sequence[Path], aligner: Any, meter: Any
) -> dict:
    """Real portraits: aligned photo -> encoder -> G (const noise) vs the aligned photo: PSNR, D-feature and
    the dlib face-descriptor distance (``gan.finetune.IdentityMeter``: < 0.6 is dlib's "same person")."""
    section: dict[str, Any] = {"faces": len(paths), "aligned": 0, "images": []}
    if not paths:
        return section | {"note": "no portraits given"}
    if aligner is None:
        try:
            from gan.align import FaceAligner

            aligner = FaceAligner()
        except (ImportError, FileNotFoundError, RuntimeError) as e:
            return section | {"note": f"face alignment not available: {e}"}
    crops, rows = _align_portraits(paths, G.resolution, aligner)
    section["images"] = rows
    if not crops:
        return section | {"note": "no face found in any portrait"}
    photos = from_uint8(np.stack(crops)).to(G.device)
    recon = render(G, encode(encoder, photos).to(G.device))
    db = psnr(recon, photos).cpu()
    dfeat = None if metric is None else _per_image(metric, recon, photos, render_chunk(G.resolution))
    section |= {"aligned": len(crops)} | _stats("psnr", db, "min") | _stats("dfeat", dfeat, "max")
    ident = identity_scores(photos, recon, meter)
    per_image = ident.pop("per_image", [(None, None)] * len(crops))
    section |= ident
    for i, row in enumerate(r for r in rows if "note" not in r):
        row |= {"psnr": float(db[i]), "dfeat": None if dfeat is None else float(dfeat[i]), "identity": per_image[i][0],
                "identity_photo_box": per_image[i][1]}  # fmt: skip
    return section


DLIB_SIDE = 256  # faces are upscaled to this before dlib reads them, as gan.finetune.IdentityMeter does


def _dlib_view(image: np.ndarray) -> np.ndarray:
    im = Image.fromarray(image)
    if max(im.size) < DLIB_SIDE:
        s = DLIB_SIDE / max(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(im))


def photo_box_distances(meter: Any, photos: np.ndarray, others: np.ndarray) -> list[float | None]:
    """dlib descriptor distance per pair, both descriptors taken in the face box dlib finds in the photo (None
    where it finds none). A reconstruction is pixel-aligned to its aligned photo, so this reads its identity
    even where the detector would not call it a face (the demo models' renders of real photos); the photo's
    descriptor is the one ``meter.descriptors`` gives. Uses the meter's dlib models (a
    ``gan.finetune.IdentityMeter``: detector, 5-point landmarks, face ResNet)."""
    out: list[float | None] = []
    for photo, other in zip(photos, others, strict=True):
        a, b = _dlib_view(photo), _dlib_view(other)
        rects = meter._detector(a, 0)
        if not rects:
            out.append(None)
            continue
        rect = max(rects, key=lambda r: r.width() * r.height())
        da = np.asarray(meter._rec.compute_face_descriptor(a, meter._shape(a, rect)))
        db = np.asarray(meter._rec.compute_face_descriptor(b, meter._shape(b, rect)))
        out.append(float(np.linalg.norm(da - db)))
    return out


def identity_scores(photos: Tensor, recons: Tensor, meter: Any = None) -> dict[str, Any]:
    """How well ``recons`` keep the identity of the aligned ``photos`` ([N, 3, R, R] in [-1, 1] each), by dlib's
    face descriptors (< 0.6: dlib's "same person"): ``identity``, the mean distance over pairs where dlib
    detects a face in both (as bench/distill.py measures; ``readable`` of them), and ``identity_photo_box``,
    the mean with both descriptors taken in the photo's face box (:func:`photo_box_distances`). ``per_image``:
    (detected, photo box) per pair. Without dlib: an ``identity_note`` saying why."""
    if meter is None:
        from gan.finetune import IdentityMeter

        meter, why = IdentityMeter.maybe()
        if meter is None:
            return {"identity": None, "identity_photo_box": None, "identity_note": why}
    a, b = to_uint8(photos), to_uint8(recons)
    ref, back = meter.descriptors(a), meter.descriptors(b)
    compared = meter.compare(ref, back)
    pairs = zip(ref, back, strict=True)
    detected = [None if x is None or y is None else float(np.linalg.norm(x - y)) for x, y in pairs]
    boxed = photo_box_distances(meter, a, b)
    known = [d for d in boxed if d is not None]
    return {"identity": compared["distance"], "readable": compared["readable"], "inputs_readable":
            sum(d is not None for d in ref), "same_person": compared["same_person"],
            "identity_photo_box": float(np.mean(known)) if known else None,
            "per_image": list(zip(detected, boxed, strict=True))}  # fmt: skip


def encoder_report(
    encoder: Encoder,
    G: Generator,
    *,
    holdout: int = 32,
    seed: int = HOLDOUT_SEED,
    metric: Callable[[Tensor, Tensor], Tensor] | None = None,
    discriminator: nn.Module | None = None,
    aligner: Any = None,
    meter: Any = None,
    portraits: Sequence[str | Path] | None = None,
    quiet: bool = False,
    file: TextIO | None = None,
) -> dict[str, Any]:
    """How well ``encoder`` inverts ``G``: reconstruction (encoder -> G at const noise) of ``holdout`` held-out
    generated faces and of real ``portraits`` (default: every image in tests/fixtures) after FFHQ alignment at
    G's resolution. PSNR always; the D-feature distance with ``metric`` (per-image distances of two batches) or
    ``discriminator`` (its feature term, :func:`d_feature_metric`); the dlib identity distance for the portraits
    when dlib is installed (``meter``: a ``gan.finetune.IdentityMeter``). Printed (:func:`format_report`) to
    ``file`` (default: standard output) unless ``quiet``."""
    if holdout < 1:
        raise ValueError(f"holdout must be at least 1, got {holdout}")
    if metric is None and discriminator is not None:
        metric = d_feature_metric(discriminator).to(G.device)
    paths = default_portraits() if portraits is None else [Path(p) for p in portraits]
    was_training = encoder.training
    encoder.eval()
    try:
        report = {
            "generator": {"resolution": G.resolution, "hash": generator_hash(G)},
            "encoder": {"input_size": encoder.input_size, "training": getattr(encoder, "train_settings", {})},
            "metric": None if metric is None else getattr(metric, "name", type(metric).__name__),
            "generated": _generated_section(encoder, G, metric, holdout, seed),
            "real": _real_section(encoder, G, metric, paths, aligner, meter),
        }
    finally:
        encoder.train(was_training)
    if not quiet:
        print(format_report(report), file=file, flush=True)
    return report


def _num(v: float | None, spec: str = ".4g") -> str:
    return "n/a" if v is None else format(v, spec)


def format_report(report: dict[str, Any]) -> str:
    """The report as a few lines of text (what ``toonify encoder-report`` prints)."""
    gen, real = report["generated"], report["real"]
    lines = [
        f"encoder report: generator {report['generator']['resolution']} px ({report['generator']['hash'][:12]}…), "
        f"encoder input {report['encoder']['input_size']} px, D-feature metric: {report['metric'] or 'none'}",
        f"  generated ({gen['faces']} held out, seed {gen['seed']}): PSNR {_num(gen['psnr'], '.2f')} dB "
        f"(worst {_num(gen['psnr_min'], '.2f')}), D-feature {_num(gen['dfeat'])} (worst {_num(gen['dfeat_max'])}), "
        f"latent MSE {_num(gen['latent_mse'])} (W std units)",
    ]
    if real.get("aligned"):
        if "readable" in real:
            ident = (f"identity {_num(real['identity'])} (reconstructions dlib finds a face in: {real['readable']}/"
                     f"{real['aligned']}), in the photo's face box {_num(real['identity_photo_box'])} "
                     "(< 0.6: same person)")  # fmt: skip
        else:
            ident = f"identity: {real.get('identity_note', 'n/a')}"
        lines.append(
            f"  real portraits ({real['aligned']} of {real['faces']} aligned): PSNR {_num(real['psnr'], '.2f')} dB, "
            f"D-feature {_num(real['dfeat'])}, {ident}"
        )
    else:
        lines.append(f"  real portraits: {real.get('note', 'none')}")
    for row in real.get("images", []):
        if "note" in row:
            lines.append(f"    {row['name']}: {row['note']}")
        else:
            lines.append(f"    {row['name']}: PSNR {_num(row['psnr'], '.2f')} dB, D-feature {_num(row['dfeat'])}, "
                         f"identity {_num(row['identity'])}, in the photo's box "
                         f"{_num(row['identity_photo_box'])}")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line


@contextlib.contextmanager
def _cancel_on_interrupt() -> Iterator[Callable[[], bool]]:
    """Ctrl-C asks the training loop to stop before its next step (writing a snapshot); a second one aborts."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return

    def handler(signum: int, frame: object) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        print("stopping after this step (Ctrl-C again aborts without a snapshot)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _maybe_discriminator(path: str | Path, device: str) -> nn.Module | None:
    from gan.checkpoints import load_discriminator

    try:
        return load_discriminator(path, device)
    except CheckpointError:
        return None


def _write_report(path: str | Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return path


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from gan.checkpoints import load_generator
    from gan.perceptual import build_perceptual_loss

    device = _device(args.device)
    G = load_generator(args.base, device=device)
    D = _maybe_discriminator(args.base, device)
    real = None
    if args.real_faces:
        real = load_real_faces(args.real_faces, training_image_size(G.resolution), max_images=args.real_max)
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(real.skipped.items())) or "none"
        print(f"real faces: {len(real)} from {real.source} at {real.size} px (skipped: {skipped})", file=sys.stderr)
    perceptual = args.perceptual if args.perceptual is not None else real is not None
    loss = build_perceptual_loss(args.vgg, args.lpips, discriminator=D).to(device) if perceptual else None
    out = Path(args.out)
    snap = out.with_name(out.name + ".snapshot")
    every = max(1, args.steps // 100)

    def progress(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            print(f"  step {step}/{total}  loss {loss:.4f}", file=sys.stderr)

    with _cancel_on_interrupt() as interrupted:
        try:
            enc = train_encoder(G, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                                fit_samples=args.fit_samples, loss_fn=loss, real_faces=real, real_share=args.real_share,
                                bf16=args.bf16, snapshot_path=snap, resume=args.resume,
                                snapshot_every=args.snapshot_every, progress=progress,
                                should_cancel=interrupted)  # fmt: skip
        except EncoderTrainingCancelledError as e:
            print(f"{e}; the state is in {snap}: run again with --resume to continue", file=sys.stderr)
            return 130
    print(f"wrote {save_encoder(enc, out, G)}", file=sys.stderr)
    snap.unlink(missing_ok=True)
    if args.report:
        report = encoder_report(enc, G, discriminator=D, holdout=args.holdout)
        print(f"wrote {_write_report(args.report, report)}", file=sys.stderr)
    return 0


def cmd_encoder_report(args: argparse.Namespace) -> int:
    from gan.checkpoints import load_generator

    device = _device(args.device)
    G = load_generator(args.base, device=device)
    enc = load_encoder(args.encoder, G, device=device)
    D = _maybe_discriminator(args.base, device)
    report = encoder_report(enc, G, discriminator=D, holdout=args.holdout, seed=args.seed, portraits=args.portraits)
    if args.json:
        print(f"wrote {_write_report(args.json, report)}", file=sys.stderr)
    return 0


def add_train_encoder_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train-encoder`` (returned) and ``encoder-report`` on the CLI's subparsers."""
    s = subparsers.add_parser("train-encoder", help="train an image→W+ encoder on a base model's own samples")
    s.add_argument("base", help="base generator checkpoint")
    s.add_argument("--out", required=True, help="encoder file to write (*.safetensors)")
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fit-samples", type=int, default=2048, help="samples for the least-squares shortcut")
    s.add_argument("--real-faces", help="folder of real, already aligned face images to mix into the batches")
    s.add_argument("--real-max", type=int, default=5000, help="read at most this many real faces (5000)")
    s.add_argument("--real-share", type=float, default=0.25, help="share of each batch that is real faces (0.25)")
    s.add_argument("--perceptual", action=argparse.BooleanOptionalAction, default=None,
                   help="add the perceptual loss (LPIPS or the base's discriminator features) to the image loss; "
                        "default: on with --real-faces")  # fmt: skip
    s.add_argument("--vgg", help="VGG16 weights for LPIPS (or TOONIFY_VGG16_PATH)")
    s.add_argument("--lpips", help="LPIPS linear weights (or TOONIFY_LPIPS_PATH)")
    s.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    s.add_argument("--resume", action="store_true", help="continue from OUT.snapshot when it exists")
    s.add_argument("--snapshot-every", type=int, default=500, help="write OUT.snapshot every this many steps")
    s.add_argument("--report", help="write the quality report (encoder-report) to this JSON file at the end")
    s.add_argument("--holdout", type=int, default=32, help="held-out generated faces in the report")
    s.add_argument("--device")
    s.set_defaults(func=cmd_train_encoder)

    r = subparsers.add_parser("encoder-report", help="measure an encoder: generated and real-portrait reconstruction")
    r.add_argument("base", help="base generator checkpoint (its discriminator gives the D-feature distance)")
    r.add_argument("encoder", help="encoder checkpoint for that base")
    r.add_argument("--json", help="write the report here")
    r.add_argument("--holdout", type=int, default=32, help="held-out generated faces")
    r.add_argument("--seed", type=int, default=HOLDOUT_SEED, help="seed of the held-out faces")
    r.add_argument("--portraits", nargs="+", help="real photos to align and reconstruct (default: tests/fixtures)")
    r.add_argument("--device")
    r.set_defaults(func=cmd_encoder_report)
    return s
