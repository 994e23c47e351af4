"""StyleGAN2 training core: from scratch (demo models) and transfer learning (community fine-tunes).

The recipe follows the StyleGAN2 papers and their reference code: non-saturating logistic loss, R1 on reals
applied lazily (every ``r1_every`` D steps, as its own optimiser step, with Adam's lr and betas adjusted by
``every / (every + 1)``), optional path-length regularisation, style mixing, an EMA generator whose half-life
is given in kimg (ramped up from the start when training from scratch), Adam betas (0, 0.99). Transfer
learning adds FreezeD (the first discriminator blocks fixed), FreezeG (only the top generator resolutions
trained), DiffAugment (colour, translation, cutout on real and fake images alike before D) and ADA's adaptive
augmentation probability: each augmentation is applied to a sample with probability ``p``, and every
``ada_interval`` steps ``p`` moves by ``sign(E[sign(D(real))] - ada_target) · batch · interval / (ada_kimg · 1000)``
(Karras et al. 2020), so augmentation grows only as D starts to overfit the small dataset. Mixed precision
(bfloat16 autocast) is used on CUDA when asked: bfloat16 has float32's range, so no loss scaling is needed
around the lazy R1 double backward; the regularisation passes themselves run in float32.

Every random draw comes from the trainer's own seeded generators, so a run is reproducible and a resumed
snapshot continues exactly where the interrupted run was (on the same device and thread count). On CPU one
generator serves everything; on CUDA the per-sample draws (latents, noise, augmentations, flips) come from a
generator on the device, so no step copies random numbers from the host, while the data order and style-mixing
decisions stay on a CPU generator. A dataset given as an array is held on the device as uint8, converted to
float per batch. No step waits for the device (no ``.item()``) unless asked for statistics
(``step(stats=True)``, every ``stats_every`` steps in :meth:`Trainer.train`) or ADA adjusts its probability
(every ``ada_interval`` steps).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gan.checkpoints import content_hash, save_generator
from gan.images import from_uint8
from gan.networks import Discriminator, Generator, GeneratorConfig

SNAPSHOT_VERSION = 2  # 2 adds the augmentation state; version 1 snapshots still load
AUGMENTS = ("color", "translation", "cutout")


@dataclass
class TrainConfig:
    batch: int = 16  # a multiple of the discriminator's minibatch-stddev group (4)
    g_lr: float = 0.002
    d_lr: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)
    r1_gamma: float = 10.0
    r1_every: int = 16  # lazy R1: one regularisation step every this many D steps
    pl_weight: float = 0.0  # path-length regularisation (2.0 in the papers); off: costly and optional
    pl_every: int = 4
    ema_kimg: float = 10.0  # half-life of the EMA generator, in thousands of images
    ema_rampup: float | None = 0.05  # half-life <= rampup * images seen; None for fine-tuning
    style_mixing: float = 0.9
    xflip: bool = False  # mirror reals at random
    diffaugment: str = ""  # comma-separated subset of AUGMENTS
    aug_p: float | None = None  # per-sample probability of each augmentation; None: 1, or 0 when ADA adapts it
    ada_target: float | None = None  # adapt aug_p to keep E[sign(D(real))] here (0.6 in the ADA paper)
    ada_interval: int = 4  # steps between adjustments
    ada_kimg: float = 100.0  # images (thousands) for p to move by 1; ADA's 500 is for runs 100x longer than ours
    mixed_precision: bool = False  # bfloat16 autocast on CUDA; ignored on CPU
    freeze_d: int = 0  # first k D blocks (from the image side; block 1 includes fromRGB) frozen
    freeze_g: int | None = None  # train only the top N synthesis resolutions; mapping frozen when set
    seed: int = 0
    mkldnn: bool | None = None  # oneDNN on/off inside the loop; None keeps torch's setting (on: fastest measured)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if self.batch < 1 or (self.batch > 4 and self.batch % 4):
            raise ValueError(f"batch must be 1..4 or a multiple of 4, got {self.batch}")
        bad = [p for p in self.policies if p not in AUGMENTS]
        if bad:
            raise ValueError(f"unknown DiffAugment policies {bad}; choose from {AUGMENTS}")
        if self.ada_target is not None and not self.policies:
            raise ValueError("ada_target adapts the augmentation probability: give diffaugment policies too")
        if self.aug_p is not None and not 0.0 <= self.aug_p <= 1.0:
            raise ValueError(f"aug_p must be in [0, 1], got {self.aug_p}")
        if self.ada_interval < 1 or self.ada_kimg <= 0:
            raise ValueError("ada_interval must be >= 1 and ada_kimg > 0")

    @property
    def initial_aug_p(self) -> float:
        """Fixed DiffAugment always augments; ADA starts from no augmentation and earns it (as NVIDIA's)."""
        if self.aug_p is not None:
            return float(self.aug_p)
        return 0.0 if self.ada_target is not None else 1.0

    @property
    def policies(self) -> list[str]:
        return [p.strip() for p in self.diffaugment.split(",") if p.strip()]

    def to_json(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# ----------------------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020): differentiable, applied identically in kind to reals and fakes


def diff_augment(
    x: Tensor, policy: str | list[str], generator: torch.Generator | None = None, p: float = 1.0
) -> Tensor:
    """Random brightness/saturation/contrast, integer translation by up to 1/8 of the size (zero fill) and a
    cutout of half the size; each sample draws its own parameters. With ``p < 1`` each augmentation touches a
    sample with probability ``p`` (ADA); ``p == 1`` draws nothing extra, so fixed DiffAugment runs are unchanged.
    An empty policy (or ``p == 0``) returns ``x`` itself."""
    policies = [q.strip() for q in policy.split(",") if q.strip()] if isinstance(policy, str) else list(policy)
    bad = [q for q in policies if q not in _AUGMENT_FNS]
    if bad:
        raise ValueError(f"unknown DiffAugment policy {bad[0]!r}")
    if p <= 0.0:
        return x
    n = x.shape[0]

    where = None if generator is None else generator.device  # a CUDA generator draws on the device

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=where).to(x.device, x.dtype)

    for q in policies:
        augmented = _AUGMENT_FNS[q](x, rand)
        if p < 1.0:
            keep = (torch.rand(n, generator=generator, device=where) >= p).to(x.device).view(n, 1, 1, 1)
            augmented = torch.where(keep, x, augmented)
        x = augmented
    return x


def _colour(x: Tensor, rand: Callable[..., Tensor]) -> Tensor:
    n = x.shape[0]
    x = x + (rand(n, 1, 1, 1) - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (rand(n, 1, 1, 1) * 2) + mean
    mean = x.mean([1, 2, 3], keepdim=True)
    return (x - mean) * (rand(n, 1, 1, 1) + 0.5) + mean


def _translation(x: Tensor, rand: Callable[..., Tensor]) -> Tensor:
    n, _, h, w = x.shape
    r = max(1, round(h / 8))
    shift = (rand(n, 2) * (2 * r + 1)).floor().long().clamp_max(2 * r)  # padded-frame offsets 0..2r
    padded = F.pad(x, [r, r, r, r]).permute(0, 2, 3, 1)
    ys = torch.arange(h, device=x.device).view(1, h, 1) + shift[:, 0].view(n, 1, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w) + shift[:, 1].view(n, 1, 1)
    return padded[torch.arange(n, device=x.device).view(n, 1, 1), ys, xs].permute(0, 3, 1, 2)


def _cutout(x: Tensor, rand: Callable[..., Tensor]) -> Tensor:
    n, _, h, w = x.shape
    ch, cw = h // 2, w // 2
    cy = (rand(n, 1, 1) * (h + 1 - ch % 2)).floor() - ch // 2
    cx = (rand(n, 1, 1) * (w + 1 - cw % 2)).floor() - cw // 2
    gy = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    gx = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    inside = (gy >= cy) & (gy < cy + ch) & (gx >= cx) & (gx < cx + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_AUGMENT_FNS = {"color": _colour, "translation": _translation, "cutout": _cutout}


# ----------------------------------------------------------------------------------------------------------
# Data


def images_to_tensor(images: np.ndarray | Tensor) -> Tensor:
    """uint8 [N, H, W, 3] (or float [N, 3, H, W] in [-1, 1]) -> float [N, 3, H, W] in [-1, 1]."""
    t = torch.as_tensor(images)
    return from_uint8(t) if t.dtype == torch.uint8 else t.float()


def _check_images(images: np.ndarray | Tensor, resolution: int) -> Tensor:
    t = torch.as_tensor(images)
    shape = (resolution, resolution, 3) if t.dtype == torch.uint8 else (3, resolution, resolution)
    if t.ndim != 4 or tuple(t.shape[1:]) != shape or len(t) == 0:
        raise ValueError(f"images must be [N, {', '.join(map(str, shape))}] ({t.dtype}), got {list(t.shape)}")
    return t


def _generator_blocks(G: Generator) -> dict[int, list[torch.nn.Module]]:
    """Synthesis modules per output resolution."""
    blocks = {4: [G.input, G.conv1, G.to_rgb1]}
    for k, to_rgb in enumerate(G.to_rgbs):
        blocks[8 * 2**k] = [G.convs[2 * k], G.convs[2 * k + 1], to_rgb]
    return blocks


def trainable_generator_params(G: Generator, freeze_g: int | None) -> list[torch.nn.Parameter]:
    if freeze_g is None:
        return list(G.parameters())
    top = sorted(_generator_blocks(G))[-freeze_g:] if freeze_g > 0 else []
    return [p for r in top for m in _generator_blocks(G)[r] for p in m.parameters()]


def trainable_discriminator_params(D: Discriminator, freeze_d: int) -> list[torch.nn.Parameter]:
    if not 0 <= freeze_d < len(D.convs):
        raise ValueError(f"freeze_d must be in 0..{len(D.convs) - 1}, got {freeze_d}")
    frozen = {id(p) for block in list(D.convs)[: freeze_d + 1 if freeze_d else 0] for p in block.parameters()}
    return [p for p in D.parameters() if id(p) not in frozen]


@contextlib.contextmanager
def _mkldnn(enabled: bool | None) -> Iterator[None]:
    """oneDNN on/off for a block (None: leave as is); restores the previous setting."""
    old = torch.backends.mkldnn.enabled
    if enabled is not None:
        torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = old


# ----------------------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """Trains ``G`` and ``D`` in place; ``G_ema`` (a copy of ``G`` unless given) is the model to ship."""

    def __init__(
        self,
        G: Generator,
        D: Discriminator,
        data: np.ndarray | Tensor | Iterable[Tensor],
        config: TrainConfig | None = None,
        G_ema: Generator | None = None,
        meta: dict | None = None,
    ) -> None:
        self.cfg = cfg = config or TrainConfig()
        self.G, self.D = G.train(), D.train()
        self.G_ema = (G_ema if G_ema is not None else copy.deepcopy(G)).eval().requires_grad_(False)
        self.device = G.device
        self.meta = dict(meta or {})  # lineage and dataset description, written into exported checkpoints
        self.rng = torch.Generator().manual_seed(cfg.seed)  # data order, mixing decisions (and all draws on CPU)
        # Per-sample draws: the same generator on CPU (runs reproduce as before), one on the device on CUDA.
        on_cuda = self.device.type == "cuda"
        self.device_rng = torch.Generator(self.device).manual_seed(cfg.seed) if on_cuda else self.rng
        self.step_count, self.nimg = 0, 0
        self.pl_mean = torch.zeros([], device=self.device)
        self.aug_p = cfg.initial_aug_p
        # sum of sign(D(real)) (kept on the device: read only when p is adjusted) and count since the last one
        self._ada_sum, self._ada_count = torch.zeros([], device=self.device), 0
        self._iter: Iterator[Tensor] | None = None
        if isinstance(data, np.ndarray | Tensor):
            self.data = _check_images(data, D.resolution).to(self.device)  # uint8 stays uint8 until sampled
            self._set_perm(torch.randperm(len(self.data), generator=self.rng), 0)
        else:
            self.data, self._iter = None, iter(data)
        self.g_params = trainable_generator_params(G, cfg.freeze_g)
        self.d_params = trainable_discriminator_params(D, cfg.freeze_d)
        G.requires_grad_(False)
        D.requires_grad_(False)
        self.g_opt = self._adam(self.g_params, cfg.g_lr, cfg.pl_every if cfg.pl_weight > 0 else 0)
        self.d_opt = self._adam(self.d_params, cfg.d_lr, cfg.r1_every if cfg.r1_gamma > 0 else 0)
        self._mkldnn = cfg.mkldnn
        self._layout = torch.channels_last if G.input.channels_last else torch.contiguous_format
        self.amp = cfg.mixed_precision and self.device.type in self.AMP_DEVICE_TYPES

    AMP_DEVICE_TYPES = ("cuda",)  # where mixed_precision applies (tests widen it to run the path on CPU)

    @property
    def _ada_signs(self) -> list:
        """[sum of sign(D(real)), count] since the last ADA adjustment (reads the device)."""
        return [float(self._ada_sum), self._ada_count]

    @_ada_signs.setter
    def _ada_signs(self, value: list) -> None:
        self._ada_sum = torch.tensor(float(value[0]), device=self.device)
        self._ada_count = int(value[1])

    def _set_perm(self, perm: Tensor, pos: int) -> None:
        """The data order (drawn on CPU) and its copy on the device, so sampling a batch reads no host index."""
        self._perm, self._pos = perm, pos
        self._perm_device = perm.to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _adam(self, params: list[Tensor], lr: float, reg_every: int) -> torch.optim.Adam:
        ratio = reg_every / (reg_every + 1) if reg_every > 0 else 1.0  # lazy regularisation correction
        betas = tuple(b**ratio for b in self.cfg.betas)
        fused = bool(params) and all(p.is_cuda for p in params)  # one kernel for all tensors on CUDA
        return torch.optim.Adam(
            params or [torch.zeros(0)], lr=lr * ratio, betas=betas, eps=1e-8, fused=True if fused else None
        )

    # -- sampling ------------------------------------------------------------------------------------------

    def _reals(self) -> Tensor:
        n = self.cfg.batch
        if self.data is None:
            x = images_to_tensor(next(self._iter)).to(self.device)
        else:
            takes, count = [], 0
            while count < n:
                if self._pos >= len(self._perm):
                    self._set_perm(torch.randperm(len(self.data), generator=self.rng), 0)
                take = self._perm_device[self._pos : self._pos + n - count]
                takes.append(take)
                count += len(take)
                self._pos += len(take)
            x = images_to_tensor(self.data[torch.cat(takes)])
        if self.cfg.xflip:
            flip = torch.rand(n, generator=self.device_rng, device=self.device_rng.device) < 0.5
            flip = flip.to(self.device).view(n, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        return x.contiguous(memory_format=self._layout)  # the layout of G's output, so D sees one layout

    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.device_rng, device=self.device_rng.device).to(self.device)

    def _ws(self, n: int) -> Tensor:
        G = self.G
        w = G.mapping(self._randn(n, G.z_dim))
        ws = w.unsqueeze(1).expand(-1, G.num_ws, -1)
        if self.cfg.style_mixing > 0:
            mix, cutoff = torch.rand([], generator=self.rng).item(), torch.randint(1, G.num_ws, [], generator=self.rng)
            w2 = G.mapping(self._randn(n, G.z_dim))
            if mix < self.cfg.style_mixing:
                later = (torch.arange(G.num_ws, device=self.device) >= cutoff.item()).view(1, -1, 1)
                ws = torch.where(later, w2.unsqueeze(1), ws)
        return ws

    def _fakes(self, n: int, ws: Tensor | None = None) -> Tensor:
        ws = self._ws(n) if ws is None else ws
        noise = [self._randn(n, 1, *b.shape[2:]) for b in self.G.noise_buffers()]
        return self.G.synthesis(ws, noise=noise)

    def _d(self, x: Tensor) -> Tensor:
        """D's logits (float32 whatever the autocast) on augmented images."""
        if self.cfg.policies:
            x = diff_augment(x, self.cfg.policies, self.device_rng, p=self.aug_p)
        return self.D(x).float()

    def _ada_update(self, real_logits: Tensor) -> None:
        """ADA: accumulate sign(D(real)); every ``ada_interval`` steps nudge ``aug_p`` toward the target."""
        cfg = self.cfg
        if cfg.ada_target is None:
            return
        self._ada_sum = self._ada_sum + real_logits.detach().sign().sum()
        self._ada_count += real_logits.numel()
        if (self.step_count + 1) % cfg.ada_interval == 0:
            rt = float(self._ada_sum) / max(self._ada_count, 1)  # the one read of the device, per interval
            adjust = math.copysign(1.0, rt - cfg.ada_target) if rt != cfg.ada_target else 0.0
            adjust *= cfg.batch * cfg.ada_interval / (cfg.ada_kimg * 1000)
            self.aug_p = min(1.0, max(0.0, self.aug_p + adjust))
            self._ada_signs = [0.0, 0]

    # -- one iteration -------------------------------------------------------------------------------------

    def ema_beta(self) -> float:
        """EMA decay used by the next update: 0.5 per half-life of images (ramped with the images seen)."""
        ema_nimg = self.cfg.ema_kimg * 1000
        if self.cfg.ema_rampup is not None:
            ema_nimg = min(ema_nimg, self.nimg * self.cfg.ema_rampup)
        return 0.5 ** (self.cfg.batch / max(ema_nimg, 1e-8))

    def step(self, stats: bool = True) -> dict[str, float]:
        """One D update (plus lazy R1), one G update (plus lazy path length), one EMA update. The losses are
        returned as floats when ``stats`` (which waits for the device); otherwise only ``aug_p`` and
        ``ema_beta``, and the step never waits for the device except for ADA's periodic adjustment."""
        cfg, n, out = self.cfg, self.cfg.batch, {}
        values: dict[str, Tensor] = {}
        with _mkldnn(self._mkldnn):
            # D: push real logits up and fake logits down.
            for p in self.d_params:
                p.requires_grad_(True)
            reals = self._reals()
            with torch.no_grad(), self._autocast():
                fakes = self._fakes(n)
            with self._autocast():
                fake_logits, real_logits = self._d(fakes), self._d(reals)
            d_loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_opt.step()
            values.update(d_loss=d_loss, real_score=real_logits.mean(), fake_score=fake_logits.mean())
            self._ada_update(real_logits)
            out["aug_p"] = self.aug_p
            if cfg.r1_gamma > 0 and self.step_count % cfg.r1_every == 0:
                reals = reals.detach().requires_grad_(True)
                logits = self._d(reals)
                (grad,) = torch.autograd.grad(logits.sum(), reals, create_graph=True)
                r1 = grad.square().sum([1, 2, 3]).mean()
                self.d_opt.zero_grad(set_to_none=True)
                (r1 * (cfg.r1_gamma / 2) * cfg.r1_every).backward()
                self.d_opt.step()
                values["r1"] = r1
            for p in self.d_params:
                p.requires_grad_(False)

            # G: non-saturating loss, D held fixed.
            for p in self.g_params:
                p.requires_grad_(True)
            with self._autocast():
                g_logits = self._d(self._fakes(n))
            g_loss = F.softplus(-g_logits).mean()
            self.g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            self.g_opt.step()
            values["g_loss"] = g_loss
            if cfg.pl_weight > 0 and self.step_count % cfg.pl_every == 0:
                ws = self._ws(max(1, n // 2))
                ws = ws if ws.requires_grad else ws.detach().requires_grad_(True)  # mapping frozen (FreezeG)
                fakes = self._fakes(len(ws), ws)
                pl_noise = self._randn(*fakes.shape) / math.sqrt(fakes.shape[2] * fakes.shape[3])
                (grad,) = torch.autograd.grad((fakes * pl_noise).sum(), ws, create_graph=True)
                lengths = grad.square().sum(2).mean(1).sqrt()
                self.pl_mean = self.pl_mean.lerp(lengths.mean().detach(), 0.01)
                pl = (lengths - self.pl_mean).square().mean()
                self.g_opt.zero_grad(set_to_none=True)
                (pl * cfg.pl_weight * cfg.pl_every).backward()
                self.g_opt.step()
                values["pl"] = pl
            for p in self.g_params:
                p.requires_grad_(False)

        beta = self.ema_beta()
        with torch.no_grad():
            ema = dict(self.G_ema.named_parameters())
            for name, p in self.G.named_parameters():
                ema[name].copy_(p.lerp(ema[name], beta))
            for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
                b_ema.copy_(b)
        out["ema_beta"] = beta
        self.step_count += 1
        self.nimg += n
        if stats:
            out.update({k: float(v.detach()) for k, v in values.items()})
        return out

    def train(
        self,
        steps: int | None = None,
        kimg: float | None = None,
        progress: Callable[[int, int, dict], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        stats_every: int = 1,
    ) -> bool:
        """Train until ``step_count`` reaches ``steps`` (or ``kimg`` thousand images), both counted from the start
        of the run, so a resumed trainer given the same target ends where an uninterrupted one would. Returns
        False when ``should_cancel`` stopped it (checked before every step). ``progress`` gets the losses every
        ``stats_every`` steps and on the last (reading them waits for the device); other steps pass only
        ``aug_p`` and ``ema_beta``."""
        if (steps is None) == (kimg is None):
            raise ValueError("give exactly one of steps= or kimg=")
        total = steps if steps is not None else math.ceil(kimg * 1000 / self.cfg.batch)
        while self.step_count < total:
            if should_cancel is not None and should_cancel():
                return False
            stats = self.step(stats=(self.step_count + 1) % stats_every == 0 or self.step_count + 1 == total)
            if progress is not None:
                progress(self.step_count, total, stats)
        return True

    # -- snapshots -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resume needs; only tensors and plain containers (loadable with ``weights_only``)."""
        D = self.D
        return {
            "version": SNAPSHOT_VERSION,
            "config": self.cfg.to_json(),
            "meta": self.meta,
            "generator_config": self.G.config.to_json(),
            "discriminator": {"resolution": D.resolution, "channels": D.channels, "mbstd": D.stddev_group},
            "G": self.G.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "G_ema_w_avg": self.G_ema.w_avg.clone(),
            "D": D.state_dict(),
            "g_opt": self.g_opt.state_dict(),
            "d_opt": self.d_opt.state_dict(),
            "step": self.step_count,
            "nimg": self.nimg,
            "pl_mean": self.pl_mean.clone(),
            "rng": self.rng.get_state(),
            "device_rng": None if self.device_rng is self.rng else self.device_rng.get_state(),
            "data_order": None if self.data is None else (self._perm.clone(), self._pos),
            "augment": {"p": self.aug_p, "ada_signs": list(self._ada_signs)},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") not in (1, SNAPSHOT_VERSION):
            raise ValueError(f"unsupported snapshot version {state.get('version')!r}")
        self.G.load_state_dict(state["G"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.G_ema.w_avg.copy_(state["G_ema_w_avg"])
        self.D.load_state_dict(state["D"])
        self.g_opt.load_state_dict(state["g_opt"])
        self.d_opt.load_state_dict(state["d_opt"])
        self.step_count, self.nimg, self.meta = int(state["step"]), int(state["nimg"]), dict(state["meta"])
        self.pl_mean = state["pl_mean"].to(self.device)
        self.rng.set_state(state["rng"].cpu())
        if state.get("device_rng") is not None and self.device_rng is not self.rng:
            self.device_rng.set_state(state["device_rng"].cpu())
        if self.data is not None and state["data_order"] is not None:
            self._set_perm(state["data_order"][0].cpu().clone(), int(state["data_order"][1]))
        augment = state.get("augment")  # absent in version 1: fixed DiffAugment, nothing to restore
        if augment is not None:
            self.aug_p = float(augment["p"])
            self._ada_signs = [float(augment["ada_signs"][0]), int(augment["ada_signs"][1])]

    def save_snapshot(self, path: str | Path) -> Path:
        """Write the training state atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def resume(cls, path: str | Path, data, device: str | torch.device = "cpu") -> Trainer:
        """Rebuild a trainer from a snapshot (no code runs while loading: ``weights_only``)."""
        state = torch.load(path, map_location=device, weights_only=True)
        G = Generator(GeneratorConfig.from_json(state["generator_config"])).to(device)
        dc = state["discriminator"]
        D = Discriminator(resolution=dc["resolution"], channels=dc["channels"], mbstd_group=dc["mbstd"]).to(device)
        cfg = state["config"]
        trainer = cls(G, D, data, TrainConfig(**cfg), G_ema=copy.deepcopy(G))
        trainer.load_state_dict(state)
        return trainer

    # -- results -------------------------------------------------------------------------------------------

    def lineage_meta(self) -> dict:
        """Checkpoint metadata for ``G_ema``: ``ancestors`` and ``training`` (settings, length, dataset)."""
        extra = {k: v for k, v in self.meta.items() if k not in ("ancestors", "dataset")}
        training = {"config": self.cfg.to_json(), "steps": self.step_count, "kimg": self.nimg / 1000}
        if self.cfg.policies:
            training["aug_p"] = self.aug_p
        training["dataset"] = self.meta.get("dataset")
        return {**extra, "ancestors": list(self.meta.get("ancestors", [])), "training": training}

    def finished_generator(self) -> Generator:
        """``G_ema`` with a fresh average latent (for truncation) and its lineage in ``G_ema.meta``."""
        self.G_ema.compute_w_avg(n=4096, seed=self.cfg.seed)
        self.G_ema.meta = self.lineage_meta()
        return self.G_ema

    def export(self, path: str | Path, meta: dict | None = None) -> Path:
        """Save ``G_ema`` (and ``D``, for later fine-tunes) in our format with lineage metadata."""
        return save_generator(self.finished_generator(), path, meta=meta, D=self.D)


# ----------------------------------------------------------------------------------------------------------
# Helpers


def lineage_of(G: Generator) -> list[str]:
    """Ancestors of a model fine-tuned from ``G``: ``G``'s own ancestors plus ``G``'s content hash."""
    meta = getattr(G, "meta", None) or {}
    own = meta.get("content_hash") or content_hash(G.state_dict())
    return sorted(set(meta.get("ancestors") or ()) | {own})


def train_from_scratch(
    config_G: GeneratorConfig,
    images: np.ndarray,
    train_cfg: TrainConfig,
    steps: int,
    *,
    device: str | torch.device = "cpu",
    d_channels: dict[int, int] | None = None,
    dataset: dict | None = None,
    **train_kw,
) -> tuple[Generator, Discriminator]:
    """Seeded fresh G and D trained on ``images`` for ``steps``; returns (G_ema, D), lineage in ``G_ema.meta``.
    ``train_kw`` goes to :meth:`Trainer.train` (progress, should_cancel)."""
    torch.manual_seed(train_cfg.seed)
    G = Generator(config_G).to(device)
    D = Discriminator(resolution=config_G.resolution, channels=d_channels or config_G.channels).to(device)
    trainer = Trainer(G, D, images, train_cfg, meta={"ancestors": [], "dataset": dataset})
    trainer.train(steps=steps, **train_kw)
    return trainer.finished_generator(), trainer.D


def finetune(
    G_base: Generator,
    D_base: Discriminator,
    images: np.ndarray,
    train_cfg: TrainConfig,
    steps: int,
    *,
    dataset: dict | None = None,
    **train_kw,
) -> tuple[Generator, Discriminator]:
    """Copies of the base models trained on ``images``; returns (G_ema, D) with ``G_ema.meta['ancestors']`` =
    the base's ancestors plus its content hash. The base models are left untouched."""
    ancestors = lineage_of(G_base)
    G, D = copy.deepcopy(G_base), copy.deepcopy(D_base)
    trainer = Trainer(G, D, images, train_cfg, meta={"ancestors": ancestors, "dataset": dataset})
    trainer.train(steps=steps, **train_kw)
    return trainer.finished_generator(), trainer.D


# ---------------------------------------------------------------------------- optimiser state in snapshots


def optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """An optimiser's per-parameter state as flat named tensors (``prefix.<param index>.<name>``), for a
    safetensors snapshot; :func:`load_optimizer_tensors` puts them back."""
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return out


def load_optimizer_tensors(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            i, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)
