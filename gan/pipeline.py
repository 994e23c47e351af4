"""The Toonifier: photo bytes -> faces -> aligned crops -> latents (batched) -> blended G -> toons pasted back.

Models stay loaded between calls; blended generators are cached per blend recipe, so a re-blend of the same
selfie at another swap resolution costs one synthesis (pass the returned ``latents`` back in).

Modes: ``fast`` = encoder only; ``balanced`` = encoder, then a short optimisation; ``quality`` = a longer
optimisation (from the encoder's guess when there is one). Without an encoder, ``balanced`` and ``quality``
start from the average latent and ``fast`` is refused with a clear message. ``instant`` skips the latent space:
a student network distilled for the blend (gan.distill) turns the aligned crop into the toon crop directly.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gan.align import AlignedFace, Alignment, Face, FaceAligner, paste_back
from gan.blending import BlendSpec, blend
from gan.imageio import decode_image
from gan.images import from_uint8, to_uint8
from gan.networks import Generator
from gan.projection import ProjectionConfig, project_batch

Mode = Literal["instant", "fast", "balanced", "quality"]
StageProgress = Callable[[str, int, int], None]  # (stage, step, total)
DEFAULT_SPEC = BlendSpec(mode="swap", resolution=32, structure_from="toon")


# Refining an encoder's guess is a different problem from searching from the average latent: the start is
# already close, so the reference recipe's warm-up, latent noise and high learning rate only throw it away
# (measured on the demo models: 30 steps reach 26.1 dB with the reference recipe, 27.8 dB with this one).
# Noise maps stay fixed (half the cost per step) and a pixel term pulls PSNR up alongside the perceptual loss;
# lr and pixel weight were picked on held-out samples (bench/toonify.py measures the result).
REFINE_RECIPE = ProjectionConfig(
    lr=0.02, lr_rampup=0.0, lr_rampdown=0.1, latent_noise=0.0, optimize_noise=False, mse_weight=10.0
)


@dataclass(frozen=True)
class ModeSettings:
    use_encoder: bool
    steps: int
    recipe: ProjectionConfig | None = None  # None: the reference recipe (gan.projection.ProjectionConfig)

    def projection_config(self) -> ProjectionConfig:
        return replace(self.recipe or ProjectionConfig(), steps=self.steps)


MODES: dict[str, ModeSettings] = {
    "fast": ModeSettings(use_encoder=True, steps=0),
    "balanced": ModeSettings(use_encoder=True, steps=40, recipe=REFINE_RECIPE),
    "quality": ModeSettings(use_encoder=True, steps=300),
}


@dataclass
class ToonResult:
    composite: Image.Image  # the photo with every toonified face pasted back
    crops: list[Image.Image]  # toon crops (aligned squares), largest face first
    aligned: list[AlignedFace]  # the aligned input crops and their transforms
    latents: Tensor | None  # [F, num_ws, w_dim] in the base model's W+ (reuse them to re-blend); None: instant
    too_small: list[Face] = field(default_factory=list)  # faces found but too small to use
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    losses: Tensor | None = None  # final projection loss per face (None in fast mode)


def to_tensor(images: list[Image.Image], device: str | torch.device = "cpu") -> Tensor:
    return from_uint8(np.stack([np.asarray(im.convert("RGB")) for im in images])).to(device)


def to_images(batch: Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(batch)]


class Toonifier:
    """Holds a base generator, a toon generator, optional encoder, perceptual loss and face aligner."""

    def __init__(
        self,
        base: Generator,
        toon: Generator,
        *,
        spec: BlendSpec = DEFAULT_SPEC,
        encoder: Callable[[Tensor], Tensor] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        aligner: FaceAligner | None = None,
        device: str | torch.device = "cpu",
        cache_size: int = 4,
        modes: dict[str, ModeSettings] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.base = base.to(self.device).eval().requires_grad_(False)
        self.toon = toon.to(self.device).eval().requires_grad_(False)
        self.encoder = encoder.to(self.device).eval() if isinstance(encoder, torch.nn.Module) else encoder
        self.loss_fn = loss_fn if loss_fn is not None else _pixel_loss
        self.aligner = aligner
        self.spec = spec
        self._blends: OrderedDict[str, Generator] = OrderedDict()
        self._cache_size = cache_size
        self.modes = {**MODES, **(modes or {})}
        self._students: dict[str, torch.nn.Module] = {}  # blend key -> distilled student for that blend

    @classmethod
    def from_files(
        cls,
        base_path: str | Path,
        toon_path: str | Path,
        *,
        encoder_path: str | Path | None = None,
        vgg_path: str | Path | None = None,
        lpips_path: str | Path | None = None,
        spec: BlendSpec = DEFAULT_SPEC,
        device: str | None = None,
        min_face_size: int = 64,
        modes: dict[str, ModeSettings] | None = None,
        students: list[str | Path] = (),
    ) -> Toonifier:
        from gan.checkpoints import CheckpointError, load_discriminator, load_generator
        from gan.distill import load_student
        from gan.perceptual import build_perceptual_loss

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base = load_generator(base_path, device)
        try:
            disc = load_discriminator(base_path, device)
        except CheckpointError:
            disc = None
        encoder = None
        if encoder_path is not None:
            from gan.encoder import load_encoder

            encoder = load_encoder(encoder_path, base, device=device)
        loss = build_perceptual_loss(vgg_path, lpips_path, discriminator=disc).to(device)
        tf = cls(
            base,
            load_generator(toon_path, device),
            spec=spec,
            encoder=encoder,
            loss_fn=loss,
            aligner=FaceAligner(min_face_size=min_face_size),
            device=device,
            modes=modes,
        )
        for path in students:
            tf.add_student(load_student(path, device=device))
        return tf

    # ------------------------------------------------------------------------------------------ stages

    def blended(self, spec: BlendSpec | None = None) -> Generator:
        """The blended generator for ``spec`` (default: this Toonifier's), cached by recipe."""
        spec = spec or self.spec
        key = spec.key()
        if key not in self._blends:
            self._blends[key] = blend(self.base, self.toon, spec)
            while len(self._blends) > self._cache_size:
                self._blends.popitem(last=False)
        self._blends.move_to_end(key)
        return self._blends[key]

    def add_student(self, student: torch.nn.Module) -> None:
        """Serve ``student`` (gan.distill.Student) in instant mode for the blend it was distilled for.

        Raises StudentMismatchError when it was made from another base or toon model than this Toonifier's."""
        from gan.distill import StudentMismatchError, student_lineage

        made_for = student.lineage
        if made_for is None:
            raise StudentMismatchError("this student records no lineage; it cannot be checked against the models")
        why = made_for.mismatch(student_lineage(self.base, self.toon, made_for.spec))
        if why:
            raise StudentMismatchError(f"this student was distilled for {why}")
        self._students[made_for.spec.key()] = student.to(self.device).eval()

    def student_for(self, spec: BlendSpec | None = None) -> torch.nn.Module | None:
        """The student serving ``spec`` (default: this Toonifier's blend), or None."""
        return self._students.get((spec or self.spec).key())

    def instant(self, crops: Tensor, spec: BlendSpec | None = None) -> list[Image.Image]:
        """Toon crops for aligned crops [N, 3, R, R] in [-1, 1] by the student for ``spec``: one forward pass."""
        from gan.distill import run_student

        student = self.student_for(spec)
        if student is None:
            have = ", ".join(BlendSpec.from_json(json.loads(k)).describe() for k in self._students) or "none"
            raise ValueError(
                f"no instant model for blend {(spec or self.spec).describe()} (instant models: {have}); "
                "make one with `toonify distill`, or use balanced mode"
            )
        return to_images(run_student(student, crops.to(self.device)))

    def project(
        self,
        crops: Tensor,
        mode: Mode = "balanced",
        *,
        progress: StageProgress | None = None,
        should_cancel: Callable[[], bool] | None = None,
        seeds: list[int] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Aligned crops [N, 3, R, R] in [-1, 1] -> (W+ latents [N, num_ws, w_dim], final loss per face)."""
        if mode == "instant":
            raise ValueError("instant mode has no latents: it maps photo to toon directly (Toonifier.instant)")
        if mode not in self.modes:
            raise ValueError(f"unknown mode {mode!r}; choose one of instant, {', '.join(self.modes)}")
        settings = self.modes[mode]
        init = None
        if settings.use_encoder and self.encoder is not None:
            with torch.no_grad():
                init = self.encoder(crops)
        elif mode == "fast":
            raise ValueError("fast mode needs an encoder checkpoint; use balanced or quality, or train one")
        if settings.steps == 0:
            return init, None
        config = settings.projection_config()
        if init is None:  # no encoder: the refine recipe has nothing to refine, search with the reference one
            config = replace(ProjectionConfig(), steps=settings.steps)
        result = project_batch(
            self.base,
            crops,
            self.loss_fn,
            config,
            init_ws=init,
            seeds=seeds,
            progress=None if progress is None else lambda s, t, _l: progress("project", s, t),
            should_cancel=should_cancel,
        )
        return result.ws, result.losses[-1]

    def render(self, latents: Tensor, spec: BlendSpec | None = None) -> list[Image.Image]:
        """Toon crops for W+ latents (no projection): the re-blend path."""
        G = self.blended(spec)
        with torch.no_grad():
            return to_images(G.synthesis(latents.to(self.device), noise_mode="const"))

    def align(self, image: Image.Image, *, all_faces: bool = True) -> Alignment:
        """Every usable face (or the largest) as aligned crops at the base model's resolution."""
        if self.aligner is None:
            self.aligner = FaceAligner()
        return self.aligner.align_all(image, output_size=self.base.resolution, largest_only=not all_faces)

    @staticmethod
    def composite(image: Image.Image, aligned: list[AlignedFace], toon_crops: list[Image.Image]) -> Image.Image:
        """A copy of ``image`` with each toon crop warped back onto its face (feathered)."""
        out = image.copy()
        for crop, face in zip(toon_crops, aligned, strict=True):
            out = paste_back(out, crop, face, in_place=True)
        return out

    # ------------------------------------------------------------------------------------------ whole photo

    def toonify(
        self,
        photo: bytes | Image.Image,
        *,
        mode: Mode = "balanced",
        all_faces: bool = True,
        spec: BlendSpec | None = None,
        latents: Tensor | None = None,
        progress: StageProgress | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> ToonResult:
        """Toonify every face (or the largest) of a photo; ``latents`` from an earlier result skip projection."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        image = decode_image(photo) if isinstance(photo, bytes | bytearray) else photo.convert("RGB")
        alignment = self.align(image, all_faces=all_faces)
        aligned = list(alignment)
        timings["align"] = time.perf_counter() - t0
        if progress:
            progress("align", 1, 1)

        t0 = time.perf_counter()
        losses = None
        if mode == "instant" and latents is None:  # the student maps crops to toon crops: no latents at all
            toon_crops = self.instant(to_tensor([a.image for a in aligned], self.device), spec)
            timings["instant"] = time.perf_counter() - t0
        else:
            if latents is None:
                crops = to_tensor([a.image for a in aligned], self.device)
                latents, losses = self.project(crops, mode, progress=progress, should_cancel=should_cancel)
            elif latents.shape[0] != len(aligned):
                raise ValueError(f"got latents for {latents.shape[0]} faces, the photo has {len(aligned)}")
            timings["project"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            toon_crops = self.render(latents, spec)
            timings["render"] = time.perf_counter() - t0
        if progress:
            progress("render", 1, 1)

        t0 = time.perf_counter()
        composite = self.composite(image, aligned, toon_crops)
        timings["paste"] = time.perf_counter() - t0
        if progress:
            progress("paste", 1, 1)
        return ToonResult(
            composite=composite,
            crops=toon_crops,
            aligned=aligned,
            latents=None if latents is None else latents.detach().cpu(),
            too_small=list(alignment.too_small),
            timings=timings,
            losses=None if losses is None else losses.cpu(),
        )


def _pixel_loss(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).square().mean(dim=(1, 2, 3))
