"""Batched latent projection: find W or W+ latents (and noise maps) that make G reproduce photos.

The recipe follows NVIDIA's and rosinality's projectors: Adam on the latent (start at the average latent or
an encoder's guess), learning rate ramped up linearly over the first 5 % and down with a cosine over the last
25 %, Gaussian noise added to the latent with a std decaying quadratically to zero at 75 % of the run, and
the per-layer noise maps optimised too, held near white noise by a multi-scale autocorrelation penalty and
renormalised every step.

Batching: N photos are optimised in one pass, each with its own latent, noise maps, latent-noise draws and
loss term. Adam works element-wise and the loss is a sum of per-photo terms, so photo i gets exactly the
updates it would get alone (up to float rounding): one GPU serves many users at once. A loss with
``embed``/``compare`` (every :class:`gan.perceptual.PerceptualLoss`) gets the targets' features once per pass,
not once per step. How many faces fit in one pass on a GPU: :func:`faces_per_pass`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gan.networks import Generator, GeneratorConfig

ProgressFn = Callable[[int, int, Tensor], None]  # (step, total, per-photo loss [N])


class ProjectionCancelledError(Exception):
    """The caller's cancellation check returned True between two steps."""


class ProjectionMemoryError(RuntimeError):
    """Not even one face fits in the device memory that is free."""


# ----------------------------------------------------------------------------------------------------------
# Memory per face. What a projection step keeps alive per face is what autograd saves for the backward pass:
# per synthesis level (resolution r, c channels) the conv inputs, outputs, the demodulated and activated maps,
# and for upsampling levels the transposed-conv and blur outputs: a multiple of c·r² floats. Measured on CPU
# with torch.autograd.graph.saved_tensors_hooks (tests/test_projection.py checks the bound), the generator
# saves at most 10x Σ c·r² floats per face in either modulated-convolution form, the loss network (at most
# LOSS_MAX_RESOLUTION px) at most 8.6x its Σ c·r². The estimate rounds these up (12x, 10x, with the
# generator's own channel table standing in for the loss network's, which is smaller for LPIPS-VGG16 and for
# the D-feature loss at 256 px), adds the optimised noise maps (value, gradient, two Adam moments) and keeps
# MEMORY_HEADROOM of the free memory for the allocator's fragmentation and convolution workspaces.

G_SAVED_FACTOR, LOSS_SAVED_FACTOR = 12, 10
LOSS_MAX_RESOLUTION = 256  # the perceptual / D-feature networks see at most this size (NVIDIA's projector: 256)
MEMORY_HEADROOM = 0.85


def activation_elements(config: GeneratorConfig, resolution: int | None = None) -> int:
    """Σ c·r² over the synthesis levels up to ``resolution`` (default: the generator's): one float per
    activation of one face at each level."""
    top = config.resolution if resolution is None else resolution
    return sum(c * r * r for r, c in config.channels.items() if r <= top)


def projection_bytes_per_face(config: GeneratorConfig, *, steps: int = 1, bytes_per_element: int = 4) -> int:
    """Estimated device bytes one face adds to a projection pass (see the formula above). ``steps == 0``
    (fast mode: the encoder only, no graph kept) counts two live activation maps per level."""
    g = activation_elements(config)
    if steps == 0:
        return 2 * g * bytes_per_element
    loss = activation_elements(config, min(config.resolution, LOSS_MAX_RESOLUTION))
    noise = 2 * sum(r * r for r in config.channels if r >= 8) + 16  # two noise maps per level above 4 px
    return bytes_per_element * (G_SAVED_FACTOR * g + LOSS_SAVED_FACTOR * loss + 4 * noise)


def faces_per_pass(
    free_bytes: int, config: GeneratorConfig, *, steps: int = 1, max_faces: int = 16, headroom: float = MEMORY_HEADROOM
) -> int:
    """How many faces one projection pass may take with ``free_bytes`` of device memory free: at most
    ``max_faces``, at least 1; raises :class:`ProjectionMemoryError` when not even one face fits."""
    per_face = projection_bytes_per_face(config, steps=steps)
    fit = int(free_bytes * headroom) // per_face
    if fit < 1:
        raise ProjectionMemoryError(
            f"one face at {config.resolution} px needs about {per_face / 2**30:.2f} GiB for projection "
            f"(/{headroom:.2f} headroom), only {free_bytes / 2**30:.2f} GiB of device memory is free"
        )
    return max(1, min(fit, max_faces))


@dataclass(frozen=True)
class ProjectionConfig:
    steps: int = 200
    space: Literal["w", "w+"] = "w+"
    lr: float = 0.1
    lr_rampup: float = 0.05
    lr_rampdown: float = 0.25
    latent_noise: float = 0.05  # initial latent noise, in units of the latent std
    latent_noise_ramp: float = 0.75
    optimize_noise: bool = True
    noise_regularize: float = 1e5
    mse_weight: float = 0.0  # extra pixel MSE on top of the perceptual loss


@dataclass
class ProjectionResult:
    ws: Tensor  # [N, num_ws, w_dim]
    noise: list[Tensor]  # per layer [N, 1, r, r]
    losses: Tensor  # [steps, N] perceptual(+mse) loss per step and photo
    images: Tensor = field(repr=False)  # [N, 3, R, R] renders of the final latents


def latent_stats(G: Generator, n: int = 10_000, seed: int = 0) -> tuple[Tensor, float]:
    """Average latent and the scalar std of W (as NVIDIA's projector computes them), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = G.style(torch.randn(n, G.z_dim, generator=g).to(G.device))
    mean = w.mean(0)
    return mean, float(((w - mean).square().sum() / n).sqrt())


def learning_rate(t: float, cfg: ProjectionConfig) -> float:
    """Linear warm-up then cosine ramp-down, as a factor of ``cfg.lr``; t in [0, 1]."""
    ramp = min(1.0, (1.0 - t) / cfg.lr_rampdown) if cfg.lr_rampdown > 0 else 1.0
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    if cfg.lr_rampup > 0:
        ramp = ramp * min(1.0, t / cfg.lr_rampup)
    return cfg.lr * ramp


def noise_regularization(noise: list[Tensor]) -> Tensor:
    """Per-photo penalty on spatial autocorrelation of each noise map at several scales -> [N]."""
    reg = noise[0].new_zeros(noise[0].shape[0])
    for n in noise:
        while True:
            reg = reg + (n * torch.roll(n, 1, dims=3)).mean(dim=(1, 2, 3)).square()
            reg = reg + (n * torch.roll(n, 1, dims=2)).mean(dim=(1, 2, 3)).square()
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return reg


def _normalize_noise_(noise: list[Tensor]) -> None:
    with torch.no_grad():
        for n in noise:
            mean = n.mean(dim=(1, 2, 3), keepdim=True)
            std = n.std(dim=(1, 2, 3), keepdim=True)
            n.sub_(mean).div_(std)


def project_batch(
    G: Generator,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    config: ProjectionConfig = ProjectionConfig(),
    *,
    init_ws: Tensor | None = None,
    seeds: list[int] | None = None,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> ProjectionResult:
    """Project ``targets`` ([N, 3, R, R] in [-1, 1], R = G.resolution) into G's latent space.

    ``loss_fn(images, targets) -> [N]`` (e.g. a :class:`gan.perceptual.PerceptualLoss`). ``init_ws``
    ([N, num_ws, w_dim], e.g. from an encoder) replaces the average-latent start. ``seeds`` (one per photo)
    make each photo's random draws its own, so a photo projects the same alone or in any batch."""
    n = targets.shape[0]
    if targets.shape[1:] != (3, G.resolution, G.resolution):
        raise ValueError(f"targets must be [N, 3, {G.resolution}, {G.resolution}], got {list(targets.shape)}")
    seeds = list(range(n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"need one seed per target ({n}), got {len(seeds)}")
    device = targets.device
    w_avg, w_std = latent_stats(G)
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    if init_ws is None:
        start = w_avg.expand(n, 1 if config.space == "w" else G.num_ws, -1)
    elif config.space == "w":
        start = init_ws.mean(1, keepdim=True)
    else:
        start = init_ws
    latent = start.detach().clone().to(device).requires_grad_(True)
    noise = [
        torch.cat([torch.randn(1, 1, *b.shape[2:], generator=g) for g in gens]).to(device).requires_grad_(True)
        for b in G.noise_buffers()
    ]
    params = [latent] + (noise if config.optimize_noise else [])
    opt = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), fused=device.type == "cuda" or None)
    G.requires_grad_(False)
    embed, compare = getattr(loss_fn, "embed", None), getattr(loss_fn, "compare", None)
    target_features = None
    if embed is not None and compare is not None:  # the targets' features once per pass, not once per step
        with torch.no_grad():
            target_features = embed(targets)
    history = []
    for step in range(config.steps):
        if should_cancel is not None and should_cancel():
            raise ProjectionCancelledError(f"cancelled at step {step}/{config.steps}")
        t = step / config.steps
        for group in opt.param_groups:
            group["lr"] = learning_rate(t, config)
        strength = w_std * config.latent_noise * max(0.0, 1.0 - t / config.latent_noise_ramp) ** 2
        ws = latent
        if strength > 0:  # zero noise adds nothing: skip the draw and its copy to the device (a host sync)
            jitter = torch.cat([torch.randn(1, *latent.shape[1:], generator=g) for g in gens]).to(device)
            ws = latent + jitter * strength
        ws = ws.expand(-1, G.num_ws, -1)
        images = G.synthesis(ws, noise=noise)
        per_photo = loss_fn(images, targets) if target_features is None else compare(embed(images), target_features)
        if config.mse_weight:
            per_photo = per_photo + config.mse_weight * (images - targets).square().mean(dim=(1, 2, 3))
        total = per_photo.sum()
        if config.optimize_noise and config.noise_regularize:
            total = total + config.noise_regularize * noise_regularization(noise).sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if config.optimize_noise:
            _normalize_noise_(noise)
        history.append(per_photo.detach())  # stays on the device: no host synchronisation per step
        if progress is not None:
            progress(step + 1, config.steps, history[-1])

    ws = latent.detach().expand(-1, G.num_ws, -1).clone()
    final_noise = [x.detach() for x in noise]
    with torch.no_grad():
        images = G.synthesis(ws, noise=final_noise)
    losses = torch.stack(history).cpu() if history else torch.zeros(0, n)
    return ProjectionResult(ws=ws, noise=final_noise, losses=losses, images=images)
