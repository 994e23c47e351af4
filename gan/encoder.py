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
image reconstruction (pixel MSE, plus a perceptual ``loss_fn`` when given).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from gan.checkpoints.common import CheckpointError, content_hash
from gan.checkpoints.native import read_tensors_and_metadata
from gan.networks import Generator

META_KEY, FORMAT_VERSION = "toonify_encoder", 1
ROW_SPLITS = (3, 7)  # ws[:3] from 4 px features, ws[3:7] from 8 px, the rest from 16 px (pSp's grouping)


class EncoderMismatchError(ValueError):
    """The encoder was trained for another generator."""


class EncoderTrainingCancelledError(Exception):
    """The caller's cancellation check returned True between two steps."""


def generator_hash(G: Generator) -> str:
    return getattr(G, "meta", {}).get("content_hash") or content_hash(G.state_dict())


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
        x = images.to(self.w_avg.dtype)
        if x.shape[-2:] != (self.input_size, self.input_size):
            mode = "area" if x.shape[-1] > self.input_size else "bilinear"
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=mode)
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
    for i in range(0, n, 64):
        ws = sample_training_ws(G, min(64, n - i), psi, g)
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
) -> Encoder:
    """Train an encoder for ``G`` on its own samples: seeded (deterministic on CPU), Adam, cosine decay."""
    dev, g = G.device, torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        enc = Encoder(G.resolution, G.num_ws, G.w_dim, channels, max_channels, input_size).to(dev)
    grad_flags = [p.requires_grad for p in G.parameters()]
    G.requires_grad_(False)
    try:
        with torch.no_grad():  # per-dimension W std: offsets are predicted (and penalised) in these units
            enc.w_avg.copy_(G.w_avg)
            enc.w_scale.copy_(G.style(torch.randn(4096, G.z_dim, generator=g).to(dev)).std(0).clamp_min(1e-3))
        if fit_samples:
            _fit_shortcut(enc, G, fit_samples, truncation, g)
        opt = torch.optim.Adam(enc.parameters(), lr=lr, betas=(0.9, 0.99), fused=True if dev.type == "cuda" else None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.55 + 0.45 * math.cos(math.pi * s / max(steps, 1)))
        enc.train()
        for step in range(steps):
            if should_cancel is not None and should_cancel():
                raise EncoderTrainingCancelledError(f"cancelled at step {step}/{steps}")
            with torch.no_grad():
                ws = sample_training_ws(G, batch_size, truncation, g)
                images = G.synthesis(ws, noise=G.make_noise(batch_size, generator=g))
            pred = enc(images)
            loss = latent_weight * ((pred - ws) / enc.w_scale).square().mean()
            if image_weight:  # const noise: at inference nobody knows the photo's noise either
                recon = G.synthesis(pred, noise_mode="const")
                img = (recon - images).square().mean()
                loss = loss + image_weight * (img if loss_fn is None else img + loss_fn(recon, images).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress(step + 1, steps, loss.item())
    finally:
        for p, flag in zip(G.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
    enc.generator_hash = generator_hash(G)
    enc.train_settings = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, latent_weight=latent_weight,
                              image_weight=image_weight, truncation=list(truncation), fit_samples=fit_samples,
                              loss=getattr(loss_fn, "name", type(loss_fn).__name__) if loss_fn else "mse")  # fmt: skip
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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    tmp.replace(path)  # atomic: a crash never leaves a half-written file under the real name
    return path


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


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from gan.checkpoints import load_generator

    G = load_generator(args.base, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    every = max(1, args.steps // 100)

    def progress(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            print(f"  step {step}/{total}  loss {loss:.4f}", file=sys.stderr)

    enc = train_encoder(G, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                        fit_samples=args.fit_samples, progress=progress)  # fmt: skip
    print(f"wrote {save_encoder(enc, args.out, G)}", file=sys.stderr)
    return 0


def add_train_encoder_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("train-encoder", help="train an image→W+ encoder on a base model's own samples")
    s.add_argument("base", help="base generator checkpoint")
    s.add_argument("--out", required=True, help="encoder file to write (*.safetensors)")
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fit-samples", type=int, default=2048, help="samples for the least-squares shortcut")
    s.add_argument("--device")
    s.set_defaults(func=cmd_train_encoder)
    return s
