"""StyleGAN2 generator and discriminator in plain PyTorch (no compiled extensions).

Parameter and buffer names follow rosinality's ``model.py`` exactly, so a rosinality state dict loads with
``strict=True``. The architecture (resolution, channels per resolution, mapping depth, style size) is held
in a small config that :func:`generator_config_from_state_dict` can infer from any such state dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NoiseMode = Literal["const", "random", "none"]
BLUR_TAPS = (1, 3, 3, 1)
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
FP16_CLAMP = 256.0  # NVIDIA clamps activations of fp16 layers to this; we clamp only in half precision


def default_channels(resolution: int, multiplier: int = 2, channel_max: int = 512) -> dict[int, int]:
    """Channels per resolution as in config-f (multiplier 2) and NVIDIA's half-width configs (1)."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16, 2048: 8}
    return {r: min(c * (multiplier if r >= 64 else 1), channel_max) for r, c in base.items() if r <= resolution}


def _check_resolution(resolution: int) -> int:
    log = int(math.log2(resolution))
    if resolution < 8 or 2**log != resolution:
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
    return log


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything needed to rebuild a generator; serialises to JSON for checkpoint metadata."""

    resolution: int = 256
    w_dim: int = 512
    z_dim: int = 512
    n_mlp: int = 8
    lr_mlp: float = 0.01
    channels: dict[int, int] = field(default_factory=dict)  # resolution -> channels; empty = config-f

    def __post_init__(self) -> None:
        _check_resolution(self.resolution)
        chans = {int(k): int(v) for k, v in (self.channels or default_channels(self.resolution)).items()}
        missing = [4 * 2**i for i in range(_check_resolution(self.resolution) - 1) if 4 * 2**i not in chans]
        if missing:
            raise ValueError(f"channels missing for resolutions {missing}")
        object.__setattr__(self, "channels", {r: chans[r] for r in sorted(chans) if r <= self.resolution})

    @property
    def num_ws(self) -> int:
        return 2 * _check_resolution(self.resolution) - 2

    def to_json(self) -> dict:
        d = asdict(self)
        d["channels"] = {str(k): v for k, v in self.channels.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> GeneratorConfig:
        d = dict(d)
        d["channels"] = {int(k): int(v) for k, v in d.get("channels", {}).items()}
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Resampling and activation primitives


def make_kernel(taps: tuple[float, ...] | list[float], gain: float = 1.0) -> Tensor:
    k = torch.tensor(taps, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum() * gain


def upfirdn2d(x: Tensor, kernel: Tensor, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Zero-insert upsample by ``up``, pad (negative crops), convolve each channel with ``kernel``, keep every
    ``down``-th sample. Same semantics as the reference ``upfirdn2d`` with symmetric x/y settings."""
    c, h = x.shape[1], x.shape[2]
    kh, kw = kernel.shape
    k = kernel.to(dtype=x.dtype, device=x.device)
    pad0, pad1 = pad
    if up > 1:
        # A depthwise transposed conv is zero insertion followed by a full convolution with the unflipped
        # kernel; crop/pad the full result to the requested window instead of materialising the zeros.
        full = F.conv_transpose2d(x, k[None, None].expand(c, 1, kh, kw), stride=up, groups=c)
        start = kh - 1 - pad0
        length = h * up + pad0 + pad1 - kh + 1
        full_len = full.shape[-1]
        x = F.pad(full, [-start, start + length - full_len, -start, start + length - full_len])
        return x[:, :, ::down, ::down] if down > 1 else x
    x = F.pad(x, [pad0, pad1, pad0, pad1])
    return F.conv2d(x, k.flip([0, 1])[None, None].expand(c, 1, kh, kw), stride=down, groups=c)


def bias_lrelu(x: Tensor, bias: Tensor) -> Tensor:
    """Bias, leaky ReLU(0.2), gain sqrt(2): StyleGAN's 'fused_lrelu'."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.to(x.dtype).view(shape), LRELU_SLOPE) * LRELU_GAIN


class PixelNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int, *, bias: bool = True) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None:
            return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN
        return bias_lrelu(x, self.bias)


class Blur(nn.Module):
    """FIR low-pass filter with explicit padding (kernel stored as buffer ``kernel``)."""

    def __init__(self, *, taps: tuple[int, ...] = BLUR_TAPS, pad: tuple[int, int], gain: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("kernel", make_kernel(taps, gain))
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x upsampling of an RGB skip image (buffer ``kernel``)."""

    def __init__(self, *, taps: tuple[int, ...] = BLUR_TAPS) -> None:
        super().__init__()
        self.register_buffer("kernel", make_kernel(taps, gain=4.0))
        p = len(taps) - 2
        self.pad = ((p + 1) // 2 + 1, p // 2)

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=2, pad=self.pad)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (weights scaled at run time)."""

    def __init__(
        self, in_dim: int, out_dim: int, *, bias_init: float = 0.0, lr_mul: float = 1.0, activation: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"expected [..., {self.weight.shape[1]}], got {list(x.shape)}")
        w, b = (self.weight * self.scale).to(x.dtype), (self.bias * self.lr_mul).to(x.dtype)
        if self.activation:
            return bias_lrelu(F.linear(x, w), b)
        return F.linear(x, w, b)


class EqualConv2d(nn.Module):
    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, padding: int = 0, bias: bool = True
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        w = (self.weight * self.scale).to(x.dtype)
        return F.conv2d(x, w, bias, stride=self.stride, padding=self.padding)


# ----------------------------------------------------------------------------------------------------------
# Synthesis layers


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution; ``upsample`` = stride-2 transposed conv followed by a blur.

    Two equivalent execution paths: one grouped convolution with per-sample weights ("fused", groups = batch),
    or a shared weight with the styles applied to activations before and the demodulation after ("unfused").
    ``fused=None`` (the default) chooses by device: on CUDA the grouped form for every batch size (what the
    CUDA peers run), on CPU the grouped form for one sample and the shared form for batches (faster there).
    Both give the same result up to float rounding (tests/test_modconv_forms.py). Modulation and
    demodulation are computed in float32 so half precision cannot overflow.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        style_dim: int,
        *,
        demodulate: bool = True,
        upsample: bool = False,
        taps: tuple[int, ...] = BLUR_TAPS,
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.kernel_size = in_ch, out_ch, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.padding = kernel_size // 2
        self.fused: bool | None = None  # None: choose by batch size
        if upsample:
            p = (len(taps) - 2) - (kernel_size - 1)
            self.blur = Blur(taps=taps, pad=((p + 1) // 2 + 1, p // 2 + 1), gain=4.0)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        n, c, h, wd = x.shape
        if c != self.in_ch or w.shape[0] != n:
            raise ValueError(f"expected x [N, {self.in_ch}, H, W] and w [N, D], got {list(x.shape)}, {list(w.shape)}")
        styles = self.modulation(w.float())  # [N, I]
        weight = self.weight.float() * self.scale  # [1, O, I, k, k]
        demod = None
        if self.demodulate:
            demod = torch.rsqrt((weight * styles.view(n, 1, -1, 1, 1)).square().sum([2, 3, 4]) + 1e-8)  # [N, O]
        fused = self.fused if self.fused is not None else (n == 1 or x.is_cuda)
        if not fused:
            x = x * styles.to(x.dtype).view(n, -1, 1, 1)
            wt = weight[0].to(x.dtype)
            if self.upsample:
                x = self.blur(F.conv_transpose2d(x, wt.transpose(0, 1), stride=2))
            else:
                x = F.conv2d(x, wt, padding=self.padding)
            return x if demod is None else x * demod.to(x.dtype).view(n, -1, 1, 1)

        wn = weight * styles.view(n, 1, -1, 1, 1)
        if demod is not None:
            wn = wn * demod.view(n, -1, 1, 1, 1)
        k = self.kernel_size
        x = x.reshape(1, n * c, h, wd)
        if self.upsample:
            wn = wn.transpose(1, 2).reshape(n * c, self.out_ch, k, k).to(x.dtype)
            x = F.conv_transpose2d(x, wn, stride=2, groups=n)
            x = self.blur(x.reshape(n, self.out_ch, *x.shape[2:]))
            return x
        x = F.conv2d(x, wn.reshape(n * self.out_ch, c, k, k).to(x.dtype), padding=self.padding, groups=n)
        return x.reshape(n, self.out_ch, *x.shape[2:])


def set_modulated_conv_form(module: nn.Module, fused: bool | None) -> nn.Module:
    """Force every modulated convolution under ``module`` to the grouped (True) or shared-weight (False) form,
    or back to the per-device choice (None); returns ``module``."""
    for m in module.modules():
        if isinstance(m, ModulatedConv2d):
            m.fused = fused
    return module


class NoiseInjection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Tensor | None) -> Tensor:
        return x if noise is None else x + self.weight.to(x.dtype) * noise.to(x.dtype)


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))
        # channels_last makes the depthwise blurs and the convolutions markedly faster on CPU (and suits
        # tensor cores on GPU); every later op keeps the layout it is handed.
        self.channels_last = True

    def forward(self, batch: int) -> Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.input.expand(batch, -1, -1, -1).contiguous(memory_format=fmt)


class StyledConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, style_dim: int, *, upsample: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x: Tensor, w: Tensor, noise: Tensor | None) -> Tensor:
        x = self.activate(self.noise(self.conv(x, w), noise))
        if x.dtype == torch.float16:
            x = x.clamp(-FP16_CLAMP, FP16_CLAMP)
        return x


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, style_dim: int, *, upsample: bool = True) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, w: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.conv(x, w) + self.bias.to(x.dtype)
        return out if skip is None else out + self.upsample(skip)


# ----------------------------------------------------------------------------------------------------------
# Generator


class Generator(nn.Module):
    """StyleGAN2 generator (skip architecture). ``mapping`` z->w, ``synthesis`` ws->image in about [-1, 1]."""

    def __init__(self, config: GeneratorConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = config if config is not None else GeneratorConfig(**kwargs)
        cfg, ch = self.config, self.config.channels
        self.resolution, self.w_dim, self.z_dim, self.num_ws = cfg.resolution, cfg.w_dim, cfg.z_dim, cfg.num_ws
        self.log_size = _check_resolution(cfg.resolution)
        self.num_layers = 2 * self.log_size - 3

        layers: list[nn.Module] = [PixelNorm()]
        for i in range(cfg.n_mlp):
            in_dim = cfg.z_dim if i == 0 else cfg.w_dim
            layers.append(EqualLinear(in_dim, cfg.w_dim, lr_mul=cfg.lr_mlp, activation=True))
        self.style = nn.Sequential(*layers)

        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], cfg.w_dim)
        self.to_rgb1 = ToRGB(ch[4], cfg.w_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for j in range(self.num_layers):
            r = 2 ** ((j + 5) // 2)
            self.noises.register_buffer(f"noise_{j}", torch.randn(1, 1, r, r))
        in_ch = ch[4]
        for log_r in range(3, self.log_size + 1):
            out_ch = ch[2**log_r]
            self.convs.append(StyledConv(in_ch, out_ch, cfg.w_dim, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, cfg.w_dim))
            self.to_rgbs.append(ToRGB(out_ch, cfg.w_dim))
            in_ch = out_ch
        # The average latent used for truncation; kept out of the state dict so rosinality dicts load strictly.
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.input.input.device

    def mapping(self, z: Tensor, truncation_psi: float = 1.0) -> Tensor:
        """z [N, z_dim] -> w [N, w_dim]."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be [N, {self.z_dim}], got {list(z.shape)}")
        return self.truncate(self.style(z.to(self.input.input.dtype)), truncation_psi)

    def truncate(self, w: Tensor, psi: float) -> Tensor:
        """Pull w (any shape ending in w_dim) towards the stored average latent."""
        if psi == 1.0:
            return w
        return self.w_avg.to(w.dtype) + psi * (w - self.w_avg.to(w.dtype))

    @torch.no_grad()
    def compute_w_avg(self, n: int = 10_000, seed: int = 0) -> Tensor:
        """Estimate the average latent from ``n`` seeded samples and store it (for state dicts without one)."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.z_dim, generator=g).to(self.device)
        self.w_avg.copy_(self.style(z).mean(0))
        return self.w_avg

    def noise_buffers(self) -> list[Tensor]:
        return [getattr(self.noises, f"noise_{j}") for j in range(self.num_layers)]

    def make_noise(self, batch: int = 1, generator: torch.Generator | None = None) -> list[Tensor]:
        return [torch.randn(batch, 1, *b.shape[2:], generator=generator).to(self.device) for b in self.noise_buffers()]

    def synthesis(self, ws: Tensor, noise_mode: NoiseMode = "const", noise: list[Tensor] | None = None) -> Tensor:
        """ws [N, num_ws, w_dim] -> images [N, 3, R, R]. ``noise`` (per layer) overrides ``noise_mode``."""
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        n = ws.shape[0]
        if noise is None:
            if noise_mode == "const":
                noise = self.noise_buffers()
            elif noise_mode == "random":
                noise = self.make_noise(n)
            elif noise_mode == "none":
                noise = [None] * self.num_layers
            else:
                raise ValueError(f"unknown noise_mode {noise_mode!r}")
        dtype = self.input.input.dtype if ws.dtype == torch.float32 else ws.dtype
        x = self.input(n).to(dtype)
        x = self.conv1(x, ws[:, 0], noise[0])
        skip = self.to_rgb1(x, ws[:, 1])
        for k, to_rgb in enumerate(self.to_rgbs):
            i = 2 * k + 1  # block k uses ws[i] (upsampling conv), ws[i+1] (conv) and ws[i+2] (to_rgb)
            x = self.convs[2 * k](x, ws[:, i], noise[i])
            x = self.convs[2 * k + 1](x, ws[:, i + 1], noise[i + 1])
            skip = to_rgb(x, ws[:, i + 2], skip)
        return skip

    def forward(self, z: Tensor, truncation_psi: float = 1.0, noise_mode: NoiseMode = "const") -> Tensor:
        w = self.mapping(z, truncation_psi)
        return self.synthesis(w.unsqueeze(1).expand(-1, self.num_ws, -1), noise_mode=noise_mode)


def generator_config_from_state_dict(sd: dict[str, Tensor]) -> GeneratorConfig:
    """Infer resolution, channels, mapping depth and latent sizes from a rosinality-named state dict."""
    try:
        n_mlp = len({k.split(".")[1] for k in sd if k.startswith("style.") and k.endswith(".weight")})
        w_dim, z_dim = sd["style.1.weight"].shape
        n_to_rgbs = len({k.split(".")[1] for k in sd if k.startswith("to_rgbs.")})
        resolution = 4 * 2**n_to_rgbs
        channels = {4: int(sd["input.input"].shape[1])}
        for k in range(n_to_rgbs):
            channels[8 * 2**k] = int(sd[f"convs.{2 * k}.conv.weight"].shape[1])
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"not a StyleGAN2 generator state dict: {e}") from e
    return GeneratorConfig(resolution=resolution, w_dim=int(w_dim), z_dim=int(z_dim), n_mlp=n_mlp, channels=channels)


# ----------------------------------------------------------------------------------------------------------
# Discriminator


class ConvLayer(nn.Sequential):
    """[Blur] -> EqualConv2d -> [FusedLeakyReLU]; a Sequential so parameter names match the reference."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        *,
        downsample: bool = False,
        bias: bool = True,
        activate: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        if downsample:
            p = (len(BLUR_TAPS) - 2) + (kernel_size - 1)
            layers.append(Blur(pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(
            EqualConv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=bias and not activate)
        )
        if activate:
            layers.append(FusedLeakyReLU(out_ch, bias=bias))
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = ConvLayer(in_ch, in_ch, 3)
        self.conv2 = ConvLayer(in_ch, out_ch, 3, downsample=True)
        self.skip = ConvLayer(in_ch, out_ch, 1, downsample=True, activate=False, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator with minibatch-stddev; also exposes per-resolution features."""

    def __init__(self, *, resolution: int, channels: dict[int, int] | None = None, mbstd_group: int = 4) -> None:
        super().__init__()
        log = _check_resolution(resolution)
        ch = {int(k): int(v) for k, v in (channels or default_channels(resolution)).items()}
        self.resolution, self.channels = resolution, {r: ch[r] for r in sorted(ch) if r <= resolution}
        blocks: list[nn.Module] = [ConvLayer(3, ch[resolution], 1)]
        for log_r in range(log, 2, -1):
            blocks.append(ResBlock(ch[2**log_r], ch[2 ** (log_r - 1)]))
        self.convs = nn.Sequential(*blocks)
        self.stddev_group, self.stddev_feat = mbstd_group, 1
        self.final_conv = ConvLayer(ch[4] + 1, ch[4], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(ch[4] * 16, ch[4], activation=True),
            EqualLinear(ch[4], 1),
        )

    def features(self, images: Tensor) -> list[Tensor]:
        """Activations after each resolution block (for feature-matching losses)."""
        if images.ndim != 4 or images.shape[1:] != (3, self.resolution, self.resolution):
            raise ValueError(f"images must be [N, 3, {self.resolution}, {self.resolution}], got {list(images.shape)}")
        feats, x = [], images
        for block in self.convs:
            x = block(x)
            feats.append(x)
        return feats

    def forward(self, images: Tensor) -> Tensor:
        x = self.features(images)[-1]
        n, c, h, w = x.shape
        group = min(n, self.stddev_group)
        if n % group:
            raise ValueError(f"batch {n} must be divisible by the stddev group {group}")
        std = x.view(group, -1, self.stddev_feat, c // self.stddev_feat, h, w)
        std = torch.sqrt(std.var(0, unbiased=False) + 1e-8).mean([2, 3, 4], keepdim=True).squeeze(2)
        x = torch.cat([x, std.repeat(group, 1, h, w)], 1)
        return self.final_linear(self.final_conv(x).view(n, -1))


def discriminator_channels_from_state_dict(sd: dict[str, Tensor]) -> tuple[int, dict[int, int]]:
    """(resolution, channels) of a rosinality-named discriminator state dict."""
    try:
        n_blocks = len({k.split(".")[1] for k in sd if k.startswith("convs.") and k.split(".")[1] != "0"})
        resolution = 4 * 2**n_blocks
        channels = {resolution: int(sd["convs.0.0.weight"].shape[0])}
        for b in range(1, n_blocks + 1):
            channels[resolution // 2**b] = int(sd[f"convs.{b}.conv2.1.weight"].shape[0])
    except (KeyError, IndexError) as e:
        raise ValueError(f"not a StyleGAN2 discriminator state dict: {e}") from e
    return resolution, channels
