"""Instant toons: a photo→toon student network distilled from a style's base and blended generators.

"StyleGAN distillation", as the Toonify authors served their website: the base generator renders a face and
the blended generator renders the same latent (same noise) as its toon. Those pairs, made on the fly, teach
an image-to-image network the whole align→project→render path, so a toon costs one forward pass instead of
40 projection steps.

The student is a U-Net with residual blocks (see docs/ARCHITECTURE.md for why not pix2pixHD): strided
convolutions down to 8 px, residual blocks there for the shape change, and skip connections back up so the
texture a layer-swapped blend keeps from the base (and the person's identity) passes straight through. It
predicts the toon as the input plus a correction (the head starts at zero: an untrained student is the
identity). GroupNorm keeps each face independent of the others in a batch, so batch 1 and batch 32 agree.

The input side is augmented to look like an aligned real photo (colour jitter, blur, JPEG, noise, background
cut-outs; small affine moves applied to input and target alike), so a student trained only on generated
faces works on selfies. Losses: L1 plus a perceptual loss (LPIPS where local weights exist, else the
discriminator's features; the caller builds it) and an optional conditional patch-adversarial term.

A student file records its lineage: the content hashes of the base and toon generators and the blend it was
made for. :func:`load_student` refuses a student made for anything else.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from gan.blending import BlendSpec, blend
from gan.checkpoints.common import CheckpointError, content_hash
from gan.checkpoints.native import read_tensors_and_metadata, write_tensors_and_metadata
from gan.encoder import generator_hash, sample_training_ws
from gan.networks import Generator
from gan.training import load_optimizer_tensors, optimizer_tensors

META_KEY, FORMAT_VERSION = "toonify_student", 1
SNAPSHOT_KEY = "toonify_student_snapshot"


class StudentMismatchError(ValueError):
    """The student was made for another base model, toon model or blend."""


class DistillCancelledError(Exception):
    """The caller's cancellation check returned True between two steps (a snapshot was written first)."""


@dataclass(frozen=True)
class StudentLineage:
    """What a student imitates: the base and toon generators (content hashes) and the blend between them."""

    base_hash: str
    toon_hash: str
    blend: dict

    @property
    def spec(self) -> BlendSpec:
        return BlendSpec.from_json(self.blend)

    def describe(self) -> str:
        return f"base {self.base_hash[:12]}…, toon {self.toon_hash[:12]}…, blend {self.spec.describe()}"

    def mismatch(self, other: StudentLineage) -> str | None:
        """Why ``other`` is not this lineage (None when it is)."""
        if self.base_hash != other.base_hash:
            return f"base model {self.base_hash[:12]}…, not {other.base_hash[:12]}…"
        if self.toon_hash != other.toon_hash:
            return f"toon model {self.toon_hash[:12]}…, not {other.toon_hash[:12]}…"
        if self.spec.key() != other.spec.key():
            return f"blend {self.spec.describe()}, not {other.spec.describe()}"
        return None


def student_lineage(base: Generator, toon: Generator, spec: BlendSpec) -> StudentLineage:
    return StudentLineage(generator_hash(base), generator_hash(toon), spec.to_json())


# ---------------------------------------------------------------------------------------------- network


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResidualBlock(nn.Module):
    """conv-norm-act-conv-norm plus the input: the bottleneck's capacity for changing shape."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), _norm(channels), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 3, padding=1), _norm(channels),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class DownBlock(nn.Module):
    """Halve the resolution (strided conv), then one residual block."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(in_channels, out_channels, 4, 2, 1), _norm(out_channels), nn.LeakyReLU(0.2))
        self.res = ResidualBlock(channels=out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.res(self.down(x))


class UpBlock(nn.Module):
    """Double the resolution (bilinear + conv), join the encoder's skip at that resolution, mix them."""

    def __init__(self, *, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        c = out_channels
        self.up = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1), _norm(c), nn.LeakyReLU(0.2))
        self.mix = nn.Sequential(nn.Conv2d(c + skip_channels, c, 3, padding=1), _norm(c), nn.LeakyReLU(0.2))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        if x.shape[-2:] != skip.shape[-2:]:
            raise ValueError(f"skip is {list(skip.shape[-2:])}, upsampled features {list(x.shape[-2:])}")
        return self.mix(torch.cat([x, skip], dim=1))


class Student(nn.Module):
    """Aligned photo crops [N, 3, R, R] in [-1, 1] -> toon crops [N, 3, R, R] (input plus a learned change)."""

    def __init__(
        self,
        *,
        resolution: int = 64,
        channels: int = 16,
        max_channels: int = 128,
        depth: int | None = None,
        res_blocks: int = 4,
    ) -> None:
        super().__init__()
        if resolution < 16 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 16, got {resolution}")
        depth = depth if depth is not None else int(math.log2(resolution)) - 3  # down to 8 px
        if not 1 <= depth <= int(math.log2(resolution)) - 2:
            raise ValueError(f"depth {depth} does not fit resolution {resolution} (the bottleneck must be >= 4 px)")
        self.kwargs = dict(resolution=resolution, channels=channels, max_channels=max_channels, depth=depth,
                           res_blocks=res_blocks)  # fmt: skip
        self.resolution = resolution
        chans = [min(channels * 2**i, max_channels) for i in range(depth + 1)]
        self.stem = nn.Sequential(nn.Conv2d(3, chans[0], 3, padding=1), nn.LeakyReLU(0.2))
        self.downs = nn.ModuleList(DownBlock(in_channels=chans[i], out_channels=chans[i + 1]) for i in range(depth))
        self.middle = nn.Sequential(*(ResidualBlock(channels=chans[-1]) for _ in range(res_blocks)))
        self.ups = nn.ModuleList(
            UpBlock(in_channels=chans[i + 1], skip_channels=chans[i], out_channels=chans[i])
            for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(chans[0], 3, 1)
        nn.init.zeros_(self.head.weight)  # an untrained student returns its input
        nn.init.zeros_(self.head.bias)
        self.lineage: StudentLineage | None = None
        self.meta: dict = {}

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1:] != (3, self.resolution, self.resolution):
            raise ValueError(f"images must be [N, 3, {self.resolution}, {self.resolution}], got {list(images.shape)}")
        x = self.stem(images)
        skips = [x]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = self.middle(skips.pop())
        for up in self.ups:
            x = up(x, skips.pop())
        return images + self.head(x)


class PatchDiscriminator(nn.Module):
    """Conditional patch critic (pix2pix): scores each ~30 px patch of (photo, toon) pairs."""

    def __init__(self, *, channels: int = 32, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(6, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, min(c * 2, 256), 4, 2, 1), _norm(min(c * 2, 256)), nn.LeakyReLU(0.2)]
            c = min(c * 2, 256)
        mods.append(nn.Conv2d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, photo: Tensor, toon: Tensor) -> Tensor:
        return self.net(torch.cat([photo, toon], dim=1))


@torch.no_grad()
def run_student(student: Student, crops: Tensor, batch_size: int = 32) -> Tensor:
    """Toon crops for aligned crops [N, 3, H, W] in [-1, 1], at the crops' size, on the crops' device."""
    dev = next(student.parameters()).device
    size, r = crops.shape[-2:], student.resolution
    out = []
    for i in range(0, len(crops), batch_size):
        x = crops[i : i + batch_size].to(dev, torch.float32)
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="area" if x.shape[-1] > r else "bilinear")
        y = student(x).clamp(-1, 1)
        if y.shape[-2:] != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        out.append(y.to(crops.device))
    return torch.cat(out) if out else crops.new_zeros(0, 3, *size)


# ---------------------------------------------------------------------------------------------- training pairs


def make_pairs(
    base: Generator, teacher: Generator, n: int, g: torch.Generator, *, truncation: tuple[float, float], mixing: float
) -> tuple[Tensor, Tensor]:
    """(photo, toon) [n, 3, R, R]: the same W+ and the same per-sample noise through base and teacher."""
    with torch.no_grad():
        ws = sample_training_ws(base, n, truncation, g, mixing=mixing)
        noise = base.make_noise(n, generator=g)
        return base.synthesis(ws, noise=noise), teacher.synthesis(ws, noise=noise)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return torch.empty(n).uniform_(lo, hi, generator=g)


def _chance(n: int, p: float, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g) < p


def affine_pair(photo: Tensor, toon: Tensor, g: torch.Generator, p: float = 0.5) -> tuple[Tensor, Tensor]:
    """The same mirror and small rotation/scale/shift on input and target: alignment of a real photo is never exact."""
    n = photo.shape[0]
    flip = _chance(n, 0.5, g).to(photo.device).view(n, 1, 1, 1)
    photo, toon = torch.where(flip, photo.flip(3), photo), torch.where(flip, toon.flip(3), toon)
    angle = torch.deg2rad(_uniform(n, -4, 4, g)) * _chance(n, p, g)
    scale = 1 + _uniform(n, -0.05, 0.05, g) * (angle != 0)
    shift = _uniform(2 * n, -0.04, 0.04, g).view(n, 2) * (angle != 0)[:, None]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(photo), list(photo.shape), align_corners=False)
    both = F.grid_sample(torch.cat([photo, toon], 1), grid, padding_mode="reflection", align_corners=False)
    return both[:, :3], both[:, 3:]


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-sample Gaussian blur (sigma [N] in pixels; 0 leaves a sample as it is)."""
    radius = max(1, math.ceil(2 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(x).clamp_min(1e-3)[:, None] ** 2))
    k = torch.where(sigma.to(x.device)[:, None] > 0, k, (t == 0).to(x)[None].expand_as(k))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [N*3, taps]
    n, c, h, w = x.shape
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return F.conv2d(y, k[:, None, :, None], groups=n * c).view(n, c, h, w)


def _jpeg(x: Tensor, quality: int) -> Tensor:
    arr = ((x.detach().float().cpu().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return (torch.from_numpy(back.copy()).permute(2, 0, 1).to(x) / 127.5) - 1


def augment_photo(x: Tensor, g: torch.Generator, p: float = 1.0) -> Tensor:
    """Make generated faces look like aligned real photos: colour, blur, sensor noise, JPEG, cluttered backgrounds.

    Each sample is touched with probability ``p`` (the rest stay clean, so the student still learns the exact
    mapping)."""
    n, _, h, w = x.shape
    dev = x.device
    keep, original = ~_chance(n, p, g), x.clone()
    # colour: brightness, contrast, saturation per sample
    bright = (_uniform(n, -0.12, 0.12, g) * _chance(n, 0.8, g)).to(dev).view(n, 1, 1, 1)
    contrast = (1 + _uniform(n, -0.2, 0.2, g) * _chance(n, 0.8, g)).to(dev).view(n, 1, 1, 1)
    sat = (1 + _uniform(n, -0.3, 0.3, g) * _chance(n, 0.8, g)).to(dev).view(n, 1, 1, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + bright
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * sat
    # background cut-outs: a box touching one border, outside most of the face
    for i in torch.nonzero(_chance(n, 0.3, g)).flatten().tolist():
        side = int(torch.randint(4, (1,), generator=g))
        bw, bh = int(w * float(_uniform(1, 0.08, 0.2, g))), int(h * float(_uniform(1, 0.3, 0.7, g)))
        y0 = int(torch.randint(0, h - bh + 1, (1,), generator=g))
        fill = _uniform(3, -1, 1, g).to(x).view(3, 1, 1)
        if side < 2:  # left / right edge
            xs = slice(0, bw) if side == 0 else slice(w - bw, w)
            x[i, :, y0 : y0 + bh, xs] = fill
        else:  # top corners (below is the neck and shoulders)
            xs = slice(0, bh // 2) if side == 2 else slice(w - bh // 2, w)
            x[i, :, 0:bw, xs] = fill
    # blur, then sensor noise
    sigma = _uniform(n, 0.3, 1.2, g) * (h / 64) * _chance(n, 0.3, g)
    if bool((sigma > 0).any()):
        x = _blur(x, sigma)
    grain = (_uniform(n, 0, 0.03, g) * _chance(n, 0.3, g)).to(dev).view(n, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=g).to(x) * grain
    x = x.clamp(-1, 1)
    # JPEG at a random quality
    for i in torch.nonzero(_chance(n, 0.3, g)).flatten().tolist():
        x[i] = _jpeg(x[i], int(torch.randint(30, 91, (1,), generator=g)))
    return torch.where(keep.to(dev).view(n, 1, 1, 1), original, x)


# ---------------------------------------------------------------------------------------------- training


@dataclass
class DistillConfig:
    kimg: float = 60.0  # training length in thousands of pairs
    batch_size: int = 16
    lr: float = 5e-3
    seed: int = 0
    truncation: tuple[float, float] = (0.5, 1.0)
    mixing: float = 0.5  # share of pairs with style mixing
    augment: bool = True
    augment_p: float = 0.5  # share of inputs made photo-like; the rest stay clean
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    adv_weight: float = 0.0  # >0: a conditional patch discriminator joins in
    ema_kimg: float = 0.5  # half-life of the EMA weights, in thousands of pairs
    snapshot_kimg: float = 4.0
    channels: int = 16  # measured on the demo: 16 learns faster per step than 32, at a third of the cost
    max_channels: int = 128
    res_blocks: int = 4
    depth: int | None = None
    bf16: bool = True  # on CUDA only

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.kimg * 1000 / self.batch_size))

    def student_kwargs(self, resolution: int) -> dict:
        return dict(resolution=resolution, channels=self.channels, max_channels=self.max_channels, depth=self.depth,
                    res_blocks=self.res_blocks)  # fmt: skip

    def to_json(self) -> dict:
        d = asdict(self)
        d["truncation"] = list(self.truncation)
        return d

    @classmethod
    def from_json(cls, d: dict) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "truncation" in d:
            d["truncation"] = tuple(d["truncation"])
        return cls(**d)


@dataclass
class _State:
    """Everything a snapshot holds, so a resumed run continues exactly where it stopped."""

    student: Student
    ema: Student
    opt: torch.optim.Optimizer
    g: torch.Generator
    step: int = 0
    critic: PatchDiscriminator | None = None
    opt_d: torch.optim.Optimizer | None = None
    losses: dict = field(default_factory=dict)


def _save_snapshot(path: Path, st: _State, config: DistillConfig, lineage: StudentLineage) -> None:
    tensors = {f"student.{k}": v for k, v in st.student.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in st.ema.state_dict().items()}
    tensors |= optimizer_tensors("opt", st.opt)
    if st.critic is not None and st.opt_d is not None:
        tensors |= {f"critic.{k}": v for k, v in st.critic.state_dict().items()}
        tensors |= optimizer_tensors("opt_d", st.opt_d)
    tensors["rng"] = st.g.get_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"step": st.step, "config": config.to_json(), "lineage": asdict(lineage), "losses": st.losses}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors_and_metadata(tensors, path, meta, SNAPSHOT_KEY)


def _load_snapshot(path: Path, st: _State, config: DistillConfig, lineage: StudentLineage) -> None:
    tensors, raw = read_tensors_and_metadata(path, SNAPSHOT_KEY)
    if raw is None:
        raise CheckpointError(f"{path}: not a distillation snapshot")
    meta = json.loads(raw)
    why = StudentLineage(**meta["lineage"]).mismatch(lineage)
    if why:
        raise StudentMismatchError(f"{path} is a snapshot of a student for {why}; delete it or pick another path")
    saved = DistillConfig.from_json(meta["config"])
    for name in ("batch_size", "channels", "max_channels", "res_blocks", "depth", "seed", "adv_weight"):
        if getattr(saved, name) != getattr(config, name):
            raise ValueError(f"{path} was made with {name}={getattr(saved, name)}, not {getattr(config, name)}")

    def sub(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    st.student.load_state_dict(sub("student"))
    st.ema.load_state_dict(sub("ema"))
    load_optimizer_tensors("opt", st.opt, tensors)
    if st.critic is not None and st.opt_d is not None:
        st.critic.load_state_dict(sub("critic"))
        load_optimizer_tensors("opt_d", st.opt_d, tensors)
    st.g.set_state(tensors["rng"])
    st.step, st.losses = int(meta["step"]), meta.get("losses", {})


def train_student(
    base: Generator,
    toon: Generator,
    spec: BlendSpec,
    config: DistillConfig | None = None,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    snapshot_path: str | Path | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Student:
    """Distil base+toon blended at ``spec`` into a :class:`Student`; returns the EMA weights (eval mode).

    Seeded and deterministic on CPU. With ``snapshot_path``, state is written every ``snapshot_kimg`` and on
    cancellation, and a run whose snapshot file exists continues from it (same result as an unbroken run)."""
    config = config or DistillConfig()
    dev = base.device
    lineage = student_lineage(base, toon, spec)
    teacher = blend(base, toon, spec).to(dev).eval().requires_grad_(False)
    flags = [p.requires_grad for p in base.parameters()]
    base.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(config.seed)
        student = Student(**config.student_kwargs(base.resolution)).to(dev)
        critic = PatchDiscriminator().to(dev) if config.adv_weight > 0 else None
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    fused = True if dev.type == "cuda" else None
    st = _State(
        student=student,
        ema=ema,
        opt=torch.optim.Adam(student.parameters(), lr=config.lr, betas=(0.9, 0.99), fused=fused),
        g=torch.Generator().manual_seed(config.seed),
        critic=critic,
        opt_d=None if critic is None else torch.optim.Adam(critic.parameters(), lr=config.lr, betas=(0.5, 0.99)),
    )
    snap = Path(snapshot_path) if snapshot_path is not None else None
    if snap is not None and snap.exists():
        _load_snapshot(snap, st, config, lineage)
    total, every = config.steps, max(1, math.ceil(config.snapshot_kimg * 1000 / config.batch_size))
    beta = 0.5 ** (config.batch_size / max(config.ema_kimg * 1000, 1e-8))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.bf16 and dev.type == "cuda")

    def lr_at(step: int) -> float:  # cosine decay to a tenth
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))

    try:
        student.train()
        while st.step < total:
            if should_cancel is not None and should_cancel():
                if snap is not None:
                    _save_snapshot(snap, st, config, lineage)
                raise DistillCancelledError(f"cancelled at step {st.step}/{total}")
            photo, target = make_pairs(base, teacher, config.batch_size, st.g, truncation=config.truncation,
                                       mixing=config.mixing)  # fmt: skip
            photo, target = affine_pair(photo, target, st.g)
            if config.augment:
                photo = augment_photo(photo, st.g, config.augment_p)
            for group in st.opt.param_groups:
                group["lr"] = lr_at(st.step)
            with autocast:
                pred = student(photo)
                l1 = (pred - target).abs().mean()
                loss = config.l1_weight * l1
                parts = {"l1": l1.item()}
                if loss_fn is not None and config.perceptual_weight:
                    perc = loss_fn(pred.float(), target).mean()
                    loss = loss + config.perceptual_weight * perc
                    parts["perceptual"] = perc.item()
                if critic is not None:
                    adv = F.softplus(-critic(photo, pred)).mean()
                    loss = loss + config.adv_weight * adv
                    parts["adv"] = adv.item()
            st.opt.zero_grad(set_to_none=True)
            loss.backward()
            st.opt.step()
            if critic is not None and st.opt_d is not None:
                with autocast:
                    d_loss = (F.softplus(-critic(photo, target)) + F.softplus(critic(photo, pred.detach()))).mean()
                st.opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                st.opt_d.step()
                parts["critic"] = d_loss.item()
            with torch.no_grad():
                for pe, ps in zip(ema.parameters(), student.parameters(), strict=True):
                    pe.lerp_(ps, 1 - beta)
                for be, bs in zip(ema.buffers(), student.buffers(), strict=True):
                    be.copy_(bs)
            st.step += 1
            st.losses = parts | {"loss": loss.item()}
            if snap is not None and (st.step % every == 0 or st.step == total):
                _save_snapshot(snap, st, config, lineage)
            if progress is not None:
                progress(st.step, total, st.losses)
    finally:
        for p, flag in zip(base.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    ema.lineage = lineage
    ema.meta = {"training": config.to_json(), "final_losses": st.losses,
                "loss": getattr(loss_fn, "name", type(loss_fn).__name__) if loss_fn else "l1"}  # fmt: skip
    return ema.eval()


# ---------------------------------------------------------------------------------------------- files


def save_student(student: Student, path: str | Path) -> Path:
    """Write the student as .safetensors with its lineage and settings in the metadata (atomic)."""
    if student.lineage is None:
        raise ValueError("this student has no lineage (which base, toon and blend it imitates); train it first")
    tensors = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    meta = {k: v for k, v in student.meta.items() if k != "content_hash"}
    meta |= {"format_version": FORMAT_VERSION, "student": student.kwargs, "lineage": asdict(student.lineage),
             "content_hash": content_hash(tensors)}  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors_and_metadata(tensors, path, meta, META_KEY)
    student.meta = {**student.meta, "content_hash": meta["content_hash"]}
    return path


def _student_meta(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    tensors, raw = read_tensors_and_metadata(path, META_KEY)
    if raw is None:
        raise CheckpointError(f"{path}: not a student checkpoint (no {META_KEY!r} metadata)")
    try:
        return tensors, json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable student metadata ({e})") from e


def read_student_lineage(path: str | Path) -> StudentLineage:
    _, meta = _student_meta(path)
    try:
        return StudentLineage(**meta["lineage"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: the student's lineage is missing or malformed ({e})") from e


def load_student(
    path: str | Path, *, lineage: StudentLineage | None = None, device: str | torch.device = "cpu"
) -> Student:
    """Load a student; with ``lineage``, refuse (StudentMismatchError) one made for other models or another blend."""
    tensors, meta = _student_meta(path)
    try:
        found = StudentLineage(**meta["lineage"])
        student = Student(**meta["student"])
        student.load_state_dict(tensors, strict=True)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: student metadata and weights do not fit ({e})") from e
    if meta.get("content_hash") != content_hash(tensors):
        raise CheckpointError(f"{path}: tensors do not match the recorded content hash (corrupted file?)")
    if lineage is not None and (why := found.mismatch(lineage)):
        raise StudentMismatchError(
            f"{path} was distilled for {why}; make one for this style and blend with `toonify distill`"
        )
    student.lineage, student.meta = found, meta
    return student.eval().requires_grad_(False).to(device)


# ---------------------------------------------------------------------------------------------- command line


def cmd_distill(args: argparse.Namespace) -> int:
    from gan.checkpoints import load_discriminator, load_generator
    from gan.perceptual import build_perceptual_loss
    from gan.styles import StudentEntry, add_student_to_manifest, read_manifest

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest = read_manifest(Path(args.models_dir) if args.models_dir else None)
    style = manifest.style(args.style)
    spec = style.blend if args.blend is None else BlendSpec(mode="swap", resolution=args.blend, structure_from="toon")
    base, toon = load_generator(style.base, device), load_generator(style.toon, device)
    try:
        disc = load_discriminator(style.toon, device)  # the toon model's critic knows what toons look like
    except CheckpointError:
        disc = None
    loss = build_perceptual_loss(args.vgg, args.lpips, discriminator=disc).to(device)
    defaults = DistillConfig()
    config = DistillConfig(
        kimg=args.kimg if args.kimg is not None else defaults.kimg,
        batch_size=args.batch or defaults.batch_size,
        seed=args.seed,
        adv_weight=args.adv_weight,
        snapshot_kimg=args.snapshot_kimg or defaults.snapshot_kimg,
    )
    out = Path(args.out)
    snap = out.with_name(out.name + ".snapshot")
    if snap.exists() and not args.resume:
        snap.unlink()  # a fresh run unless --resume asks to continue
    every = max(1, config.steps // 50)

    def progress(step: int, total: int, losses: dict) -> None:
        if step % every == 0 or step == total:
            parts = "  ".join(f"{k} {v:.4f}" for k, v in losses.items())
            print(f"  step {step}/{total}  {parts}", file=sys.stderr)

    print(f"distilling style {style.name!r} at {spec.describe()} ({config.steps} steps, {loss.name})", file=sys.stderr)
    student = train_student(base, toon, spec, config, loss_fn=loss, snapshot_path=snap, progress=progress)
    student.meta["command"] = ["toonify", "distill", style.name, "--kimg", f"{config.kimg:g}", "--seed", str(args.seed)]
    if args.blend is not None:
        student.meta["command"] += ["--blend", str(args.blend)]
    save_student(student, out)
    snap.unlink(missing_ok=True)
    print(f"wrote {out}", file=sys.stderr)
    if args.register:
        entry = StudentEntry.for_student(out, student, manifest.directory)
        add_student_to_manifest(manifest.directory, style.name, entry)
        print(f"listed it in {manifest.directory / 'manifest.json'} for style {style.name!r}", file=sys.stderr)
    return 0


def add_distill_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("distill", help="train an instant photo→toon network for a style and blend")
    s.add_argument("style", help="a style of the model manifest")
    s.add_argument("--blend", type=int, help="swap resolution (default: the style's blend)")
    s.add_argument("--out", required=True, help="student file to write (*.safetensors)")
    s.add_argument("--kimg", type=float, help=f"training length in thousands of pairs (default {DistillConfig.kimg})")
    s.add_argument("--batch", type=int, help=f"batch size (default {DistillConfig.batch_size})")
    s.add_argument("--snapshot-kimg", type=float, help="write a resumable snapshot every this many kimg (4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--adv-weight", type=float, default=0.0, help="weight of the patch-adversarial term (0: off)")
    s.add_argument("--resume", action="store_true", help="continue from OUT.snapshot when it exists")
    s.add_argument("--register", action="store_true", help="list the student in the style's manifest")
    s.add_argument("--models-dir", help="folder with manifest.json (default: $TOONIFY_MODELS_DIR or the demo)")
    s.add_argument("--vgg", help="VGG16 weights for LPIPS (or TOONIFY_VGG16_PATH)")
    s.add_argument("--lpips", help="LPIPS linear weights (or TOONIFY_LPIPS_PATH)")
    s.add_argument("--device")
    s.set_defaults(func=cmd_distill)
    return s
