"""Community fine-tunes: a folder or zip of images → a toon model fine-tuned from a base model, with a report.

Three parts, each usable alone:

* **Ingestion** (:func:`ingest`): untrusted archives and folders are read without extracting anything to disk.
  A zip that looks like a bomb (declared sizes, compression ratio, a member that inflates past its header)
  or names a path outside itself (``..``, absolute paths, links) is refused as a whole; single files that are
  not images are skipped and reported. Images are decoded by :func:`gan.imageio.decode_image` (pixel limit,
  truncation), de-duplicated by the hash of their decoded pixels, aligned FFHQ-style where dlib finds a face
  and centre-cropped otherwise (cartoon faces often defeat dlib), and resized to the model's resolution. The
  choice is recorded per image in an :class:`IngestReport`; too few usable images is a refusal. Kept images
  are uint8 at the training resolution; past ``IngestLimits.max_memory_bytes`` of them they go to an unnamed
  temporary file and the dataset is a memory map of it, so memory stays bounded whatever the file count.
* **Metrics** (:func:`kid`, :class:`DiscriminatorFeatures`, :class:`IdentityMeter`): KID on the *base*
  discriminator's features (Inception weights are not shipped, and the report says which features were
  used); FID and KID on Inception-v3 features as well where ``TOONIFY_INCEPTION_PATH`` names pytorch-fid's
  weight file (:mod:`gan.inception`); and for each candidate swap resolution how well the blended model keeps
  the base model's identity: the dlib face-descriptor distance between base and blended renders of the same
  latents.
* **Runs** (:class:`FinetuneRun`): :class:`gan.training.Trainer` with FreezeD/FreezeG, DiffAugment or ADA, a
  kimg budget and snapshots every ``snapshot_kimg`` (training state, preview grid, metrics row, and the EMA
  generator as a loadable checkpoint with lineage), resumable after a kill; the result is a toon checkpoint in
  our format with lineage, blend previews at every swap resolution and ``report.json`` with the metrics table.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import stat
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gan.blending import BlendSpec, LineageWarning, blend
from gan.checkpoints import CheckpointError, content_hash, load_discriminator, load_generator, save_generator
from gan.imageio import DEFAULT_MAX_PIXELS, BadImageError, decode_image
from gan.images import from_uint8, make_grid, save_grid, to_uint8, z_from_seeds
from gan.inception import InceptionFeatures, configured_inception_path, feature_statistics, frechet_distance
from gan.networks import Discriminator, Generator
from gan.training import TrainConfig, Trainer, lineage_of

__all__ = [
    "AUG_MODES",
    "INCEPTION_NOTE",
    "SNAPSHOT_DIR",
    "DatasetRefusedError",
    "DiscriminatorFeatures",
    "FinetuneDataset",
    "FinetuneResult",
    "FinetuneRun",
    "FinetuneSettings",
    "IdentityMeter",
    "ImageEntry",
    "IngestLimits",
    "IngestReport",
    "ingest",
    "kid",
    "metrics_table",
    "run_finetune",
    "steps_for",
]

AUG_MODES = ("ada", "diffaug", "none")
INCEPTION_NOTE = "not available: no local Inception weights configured (TOONIFY_INCEPTION_PATH)"
SNAPSHOT_DIR = "snapshots"  # the run's loadable generators, one per snapshot: kimg<kimg, 6.3 digits>.safetensors
IDENTITY_PSI = 0.7  # truncation of the identity and blend-preview renders
OVERVIEW = "blends/overview.png (rows: base, each swap resolution, toon; the base model's W at psi 0.7)"
SAME_PERSON = 0.6  # dlib's documented face-descriptor distance threshold for "the same person"
_DETECT_SIDE = 256  # small images are upscaled to this before dlib looks for a face


# ==========================================================================================================
# Ingestion


@dataclass(frozen=True)
class IngestLimits:
    """What an uploaded dataset may be. Images barely compress, so a high ratio means a zip bomb."""

    max_files: int = 5000
    max_file_bytes: int = 20 << 20
    max_total_bytes: int = 1 << 30
    max_ratio: float = 100.0  # uncompressed / compressed, checked for members above ratio_floor_bytes
    ratio_floor_bytes: int = 1 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Kept images held in memory (uint8 at the training resolution, 3 MiB each at 1024 px); past this they
    # are written to a temporary file and read back through a memory map (pages the kernel can drop).
    max_memory_bytes: int = 1 << 30


@dataclass
class ImageEntry:
    """One file of the source: kept (with how it was cropped) or skipped (with why)."""

    name: str
    status: str  # "kept" | "skipped"
    reason: str | None = None  # skipped: not_an_image, too_many_pixels, truncated, duplicate, too_large, …
    detail: str | None = None
    crop: str | None = None  # kept: "aligned" (dlib found a face) or "centre"
    sha256: str | None = None  # of the decoded pixels


@dataclass
class IngestReport:
    source: str
    resolution: int
    min_images: int
    aligner: str  # "dlib" | "off" | "unavailable: …"
    entries: list[ImageEntry] = field(default_factory=list)
    refused: str | None = None  # why the whole dataset was refused
    dataset_sha256: str | None = None

    @property
    def kept(self) -> list[ImageEntry]:
        return [e for e in self.entries if e.status == "kept"]

    @property
    def skipped(self) -> list[ImageEntry]:
        return [e for e in self.entries if e.status == "skipped"]

    def counts(self) -> dict[str, int]:
        kept = self.kept
        reasons: dict[str, int] = {}
        for e in self.skipped:
            reasons[e.reason or "?"] = reasons.get(e.reason or "?", 0) + 1
        return {
            "files": len(self.entries),
            "kept": len(kept),
            "aligned": sum(e.crop == "aligned" for e in kept),
            "centre_cropped": sum(e.crop == "centre" for e in kept),
            **{f"skipped_{k}": v for k, v in sorted(reasons.items())},
        }

    def summary(self) -> str:
        """A few lines an admin can read: the verdict, counts, and the skipped files with reasons."""
        c = self.counts()
        head = f"refused: {self.refused}" if self.refused else f"accepted {c['kept']} images"
        lines = [
            f"{head} ({c['files']} files read from {self.source}; {c['aligned']} aligned on a face, "
            f"{c['centre_cropped']} centre-cropped; face alignment: {self.aligner})"
        ]
        by_reason: dict[str, list[str]] = {}
        for e in self.skipped:
            by_reason.setdefault(e.reason or "?", []).append(e.name)
        for reason, names in sorted(by_reason.items()):
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            lines.append(f"skipped {len(names)} ({reason.replace('_', ' ')}): {shown}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "entries"}
        d["counts"] = self.counts()
        d["files"] = [{k: v for k, v in asdict(e).items() if v is not None} for e in self.entries]
        return d


class DatasetRefusedError(ValueError):
    """The dataset as a whole is not acceptable; ``report`` says what was read and why it was refused."""

    def __init__(self, report: IngestReport) -> None:
        super().__init__(report.summary())
        self.report = report


@dataclass
class FinetuneDataset:
    images: np.ndarray  # uint8 [N, R, R, 3]; a np.memmap of a temporary file when ingestion spilled to disk
    report: IngestReport

    @property
    def sha256(self) -> str:
        return self.report.dataset_sha256 or ""

    def describe(self) -> dict:
        """What the checkpoint's lineage records about the data."""
        return {"sha256": self.sha256, "source": self.report.source, **self.report.counts()}


@dataclass
class _File:
    name: str
    data: bytes | None = None
    reason: str | None = None  # set when the file is skipped before decoding
    detail: str | None = None


def _refuse(report: IngestReport, why: str) -> DatasetRefusedError:
    report.refused = why
    return DatasetRefusedError(report)


def _unsafe_member_name(name: str) -> bool:
    """Names that would land outside the archive's folder if extracted: absolute, drive, ``..`` parts."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        return True
    return any(part == ".." for part in PurePosixPath(posix).parts)


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name.replace("\\", "/")).parts)


def _zip_files(zf: zipfile.ZipFile, limits: IngestLimits, report: IngestReport) -> Iterator[_File]:
    """Members of an archive, checked from the central directory before anything is inflated."""
    members = [m for m in zf.infolist() if not m.is_dir()]
    if len(members) > limits.max_files:
        raise _refuse(report, f"the archive has {len(members)} files; at most {limits.max_files} are accepted")
    for m in members:
        if _unsafe_member_name(m.filename):
            raise _refuse(report, f"path traversal: the entry {m.filename!r} points outside the archive")
        if stat.S_ISLNK(m.external_attr >> 16):
            raise _refuse(report, f"the entry {m.filename!r} is a symbolic link; links are not accepted")
        ratio = m.file_size / max(m.compress_size, 1)
        if m.file_size >= limits.ratio_floor_bytes and ratio > limits.max_ratio:
            raise _refuse(report, f"zip bomb: {m.filename!r} inflates {ratio:.0f}x ({m.file_size} bytes)")
    declared = sum(m.file_size for m in members)
    if declared > limits.max_total_bytes:
        raise _refuse(report, f"zip bomb: the archive unpacks to {declared} bytes (limit {limits.max_total_bytes})")
    total = 0
    for m in sorted(members, key=lambda m: m.filename):
        if _hidden(m.filename):
            yield _File(m.filename, reason="hidden", detail="hidden or system file")
        elif m.flag_bits & 0x1:
            yield _File(m.filename, reason="encrypted", detail="encrypted entries cannot be read")
        elif m.file_size > limits.max_file_bytes:
            yield _File(m.filename, reason="too_large", detail=f"{m.file_size} bytes (limit {limits.max_file_bytes})")
        else:
            try:
                with zf.open(m) as f:  # zipfile stops at the declared size and checks the CRC
                    data = f.read(min(m.file_size, limits.max_file_bytes) + 1)
            except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError) as e:
                yield _File(m.filename, reason="damaged", detail=f"unreadable entry: {e}")
                continue
            if len(data) > m.file_size:  # never expected (see above); refuse rather than trust the header
                raise _refuse(report, f"zip bomb: {m.filename!r} unpacks to more than its header declares")
            total += len(data)
            if total > limits.max_total_bytes:
                raise _refuse(report, f"zip bomb: the archive unpacks to more than {limits.max_total_bytes} bytes")
            yield _File(m.filename, data)


def _folder_files(root: Path, limits: IngestLimits, report: IngestReport) -> Iterator[_File]:
    """Regular files under ``root`` in sorted order; links are never followed (they could point anywhere)."""
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        paths += [Path(dirpath) / f for f in sorted(filenames)]
        if len(paths) > limits.max_files:
            raise _refuse(report, f"the folder has more than {limits.max_files} files")
    total = 0
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):  # the order a zip of it would give
        name = path.relative_to(root).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            yield _File(name, reason="not_a_file", detail="links and special files are not followed")
        elif _hidden(name):
            yield _File(name, reason="hidden", detail="hidden or system file")
        elif st.st_size > limits.max_file_bytes:
            yield _File(name, reason="too_large", detail=f"{st.st_size} bytes (limit {limits.max_file_bytes})")
        else:
            total += st.st_size
            if total > limits.max_total_bytes:
                raise _refuse(report, f"the folder holds more than {limits.max_total_bytes} bytes of files")
            yield _File(name, path.read_bytes())


def _open_source(source: str | os.PathLike | bytes, limits: IngestLimits, report: IngestReport) -> Iterator[_File]:
    if isinstance(source, bytes | bytearray | memoryview):
        return _zip_source(io.BytesIO(bytes(source)), limits, report)
    path = Path(source)
    if path.is_dir():
        return _folder_files(path, limits, report)
    if not path.is_file():
        raise FileNotFoundError(f"no such dataset folder or zip: {path}")
    return _zip_source(path, limits, report)


def _zip_source(src: io.BytesIO | Path, limits: IngestLimits, report: IngestReport) -> Iterator[_File]:
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as e:
        raise _refuse(report, "the dataset is neither a folder nor a zip archive") from e

    def files() -> Iterator[_File]:
        with zf:
            yield from _zip_files(zf, limits, report)

    return files()


class _ImageStore:
    """Kept images (uint8 [R, R, 3] each) in memory up to ``memory_bytes``, then all of them in an unnamed
    temporary file under ``spill_dir``: written with ``write``, so the pages are the page cache's and never
    part of this process's resident set, and read back as a copy-on-write memory map."""

    def __init__(self, resolution: int, memory_bytes: int, spill_dir: str | os.PathLike | None) -> None:
        self.shape = (resolution, resolution, 3)
        self.memory_bytes, self.spill_dir = memory_bytes, spill_dir
        self.held: list[np.ndarray] = []
        self.file: Any = None  # the spill file, once the images outgrow memory_bytes
        self.count = 0

    def append(self, image: np.ndarray) -> None:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if image.shape != self.shape:
            raise ValueError(f"image of shape {image.shape}, expected {self.shape}")
        if self.file is None and (len(self.held) + 1) * image.nbytes > self.memory_bytes:
            self.file = tempfile.TemporaryFile(dir=self.spill_dir, prefix="toonify-ingest-")  # noqa: SIM115 (closed in close())
            for held in self.held:
                self.file.write(memoryview(held))
            self.held = []
        if self.file is None:
            self.held.append(image)
        else:
            self.file.write(memoryview(image))
        self.count += 1

    def finish(self) -> tuple[np.ndarray, str]:
        """All images as uint8 [N, R, R, 3] and their sha256 (over the shape, then the pixel bytes)."""
        h = hashlib.sha256(f"{[self.count, *self.shape]}".encode())
        if self.file is None:
            images = np.stack(self.held) if self.held else np.zeros((0, *self.shape), np.uint8)
            self.held = []
            h.update(memoryview(images))
            return images, h.hexdigest()
        self.file.flush()
        self.file.seek(0)
        while chunk := self.file.read(1 << 20):  # read, not mapped: hashing adds nothing resident either
            h.update(chunk)
        images = np.memmap(self.file, dtype=np.uint8, mode="c", shape=(self.count, *self.shape))
        self.close()  # the map keeps the (unnamed) file alive until the array is dropped
        return images, h.hexdigest()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.held = []


def _centre_crop(im: Image.Image, resolution: int) -> np.ndarray:
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return np.asarray(im.resize((resolution, resolution), Image.Resampling.LANCZOS).convert("RGB"))


def _align(aligner, im: Image.Image, resolution: int, min_face: int) -> tuple[np.ndarray | None, str]:
    """An FFHQ crop of the largest face, or None and why not. Small images are upscaled first: dlib's HOG
    detector misses faces below about 80 px."""
    scale = max(1.0, _DETECT_SIDE / max(im.size))
    big = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS) if scale > 1 else im
    faces = aligner.detect(big)
    if not faces:
        return None, "no face found"
    if faces[0].size < min_face * scale:
        return None, f"face smaller than {min_face} px"
    return np.asarray(aligner.align(big, faces[0], resolution).image.convert("RGB")), "face found"


class _LazyAligner:
    """dlib's models load on the first image, so a refused archive costs no model loading."""

    def __init__(self, align: bool | Any) -> None:
        self.given = None if align is True or align is False else align  # a FaceAligner given by the caller
        self.wanted = align is not False and align is not None
        self.how = "dlib" if self.wanted else "off"
        self._aligner = self.given

    def get(self) -> Any:
        if self._aligner is None and self.wanted:
            try:
                from gan.align import FaceAligner

                self._aligner = FaceAligner(min_face_size=1)
            except (ImportError, FileNotFoundError, RuntimeError) as e:
                self.wanted, self.how = False, f"unavailable: {e}"
        return self._aligner


def ingest(
    source: str | os.PathLike | bytes,
    resolution: int,
    *,
    align: bool | Any = True,
    min_images: int = 8,
    min_face_size: int = 32,
    limits: IngestLimits | None = None,
    name: str | None = None,
    spill_dir: str | os.PathLike | None = None,
) -> FinetuneDataset:
    """Read a folder, a zip file or zip bytes into uint8 [N, resolution, resolution, 3] images plus a report.

    ``align``: True (dlib, when installed), False (centre crops only) or a ``FaceAligner``. Faces smaller than
    ``min_face_size`` source pixels are centre-cropped instead. Raises :class:`DatasetRefusedError` (with the
    report) for unsafe archives and for fewer than ``min_images`` usable images. Images past
    ``limits.max_memory_bytes`` are kept in an unnamed temporary file in ``spill_dir`` (default: the system's
    temporary folder); the result is then a memory map of it, with the same pixels and hash."""
    limits = limits or IngestLimits()
    lazy = _LazyAligner(align)
    label = name or (f"zip ({len(source)} bytes)" if isinstance(source, bytes | bytearray) else str(source))
    report = IngestReport(source=label, resolution=resolution, min_images=min_images, aligner=lazy.how)
    store = _ImageStore(resolution, limits.max_memory_bytes, spill_dir)
    try:
        return _ingest_into(store, source, resolution, lazy, report, limits, min_images, min_face_size)
    finally:
        store.close()


def _ingest_into(
    store: _ImageStore,
    source: str | os.PathLike | bytes,
    resolution: int,
    lazy: _LazyAligner,
    report: IngestReport,
    limits: IngestLimits,
    min_images: int,
    min_face_size: int,
) -> FinetuneDataset:
    seen: dict[str, str] = {}
    for f in _open_source(source, limits, report):
        if f.data is None:
            report.entries.append(ImageEntry(f.name, "skipped", f.reason, f.detail))
            continue
        try:
            im = decode_image(f.data, max_pixels=limits.max_pixels, max_bytes=limits.max_file_bytes)
        except BadImageError as e:
            report.entries.append(ImageEntry(f.name, "skipped", e.reason, str(e)))
            continue
        digest = hashlib.sha256(f"{im.size}".encode() + im.tobytes()).hexdigest()
        if digest in seen:
            report.entries.append(ImageEntry(f.name, "skipped", "duplicate", f"same pixels as {seen[digest]}"))
            continue
        seen[digest] = f.name
        aligner = lazy.get()
        report.aligner = lazy.how
        arr, why = (None, "alignment off") if aligner is None else _align(aligner, im, resolution, min_face_size)
        crop = "aligned" if arr is not None else "centre"
        store.append(arr if arr is not None else _centre_crop(im, resolution))
        del im, arr  # the decoded photo can be tens of megabytes: not kept until the next one is decoded
        report.entries.append(ImageEntry(f.name, "kept", crop=crop, sha256=digest, detail=why))
    if store.count < min_images:
        raise _refuse(report, f"{store.count} usable images; at least {min_images} are needed")
    images, report.dataset_sha256 = store.finish()
    return FinetuneDataset(images=images, report=report)


# ==========================================================================================================
# Settings


def steps_for(kimg: float, batch: int) -> int:
    """Steps covering ``kimg`` thousand images (rounded first, so 3.2 kimg at batch 8 is 400, not 401)."""
    return max(1, math.ceil(round(kimg * 1000 / batch, 6)))


@dataclass
class FinetuneSettings:
    """A fine-tune recipe. ``None`` picks NVIDIA's 'auto' heuristics: R1 gamma 0.0002·R²/batch, EMA
    half-life batch·10/32 kimg."""

    kimg: float = 20.0
    snapshot_kimg: float = 4.0
    batch: int = 8
    freeze_d: int = 2
    freeze_g: int | None = None
    aug: str = "ada"  # "ada": DiffAugment with an adaptive probability; "diffaug": always; "none"
    policies: str = "color,translation,cutout"
    ada_target: float = 0.6
    ada_kimg: float = 100.0
    g_lr: float = 0.002
    d_lr: float = 0.002
    r1_gamma: float | None = None
    ema_kimg: float | None = None
    xflip: bool = True
    mixed_precision: bool = True  # CUDA only
    seed: int = 0
    metric_samples: int = 256  # generated images for KID (reals: the dataset, up to this many)
    identity_samples: int = 16
    preview_seeds: int = 16
    swap_resolutions: tuple[int, ...] | None = None  # None: every power of two from 8 below the resolution

    def __post_init__(self) -> None:
        if self.aug not in AUG_MODES:
            raise ValueError(f"aug must be one of {AUG_MODES}, got {self.aug!r}")
        if self.kimg <= 0 or self.snapshot_kimg <= 0:
            raise ValueError("kimg and snapshot_kimg must be positive")
        if self.swap_resolutions is not None:
            self.swap_resolutions = tuple(int(r) for r in self.swap_resolutions)

    def to_json(self) -> dict:
        d = asdict(self)
        d["swap_resolutions"] = None if self.swap_resolutions is None else list(self.swap_resolutions)
        return d

    @classmethod
    def from_json(cls, d: dict) -> FinetuneSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def swaps(self, resolution: int) -> list[int]:
        if self.swap_resolutions is not None:
            return [r for r in self.swap_resolutions if 4 <= r < resolution]
        return [2**k for k in range(3, int(math.log2(resolution)))]

    def train_config(self, resolution: int) -> TrainConfig:
        policies = "" if self.aug == "none" else self.policies
        return TrainConfig(
            batch=self.batch,
            g_lr=self.g_lr,
            d_lr=self.d_lr,
            r1_gamma=self.r1_gamma if self.r1_gamma is not None else 0.0002 * resolution**2 / self.batch,
            ema_kimg=self.ema_kimg if self.ema_kimg is not None else self.batch * 10 / 32,
            ema_rampup=None,  # the base is already a good generator: no ramp
            xflip=self.xflip,
            diffaugment=policies,
            ada_target=self.ada_target if self.aug == "ada" else None,
            ada_kimg=self.ada_kimg,
            freeze_d=self.freeze_d,
            freeze_g=self.freeze_g,
            mixed_precision=self.mixed_precision,
            seed=self.seed,
        )


# ==========================================================================================================
# Metrics


def kid(
    real: np.ndarray, fake: np.ndarray, *, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> float:
    """Kernel Inception Distance of two feature sets [N, D]: the unbiased MMD² with the cubic polynomial
    kernel (x·y/D + 1)³, averaged over random subsets (Bińkowski et al. 2018). Works on any features."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    n = real.shape[1]
    m = min(len(real), len(fake), max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least two samples of each kind")
    rng = np.random.default_rng(seed)
    t = 0.0
    for _ in range(num_subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


class DiscriminatorFeatures:
    """Features for KID from the *base* model's discriminator: its last 4x4 block, flattened. It was trained
    on the base domain, so the features are generic face features for that domain, and the same extractor
    scores every snapshot (the training D changes, this one never does)."""

    def __init__(self, D: Discriminator, batch: int = 32) -> None:
        self.D = copy.deepcopy(D).eval().requires_grad_(False)
        self.batch = batch
        c4 = self.D.channels[4]
        self.description = f"base discriminator, last 4x4 block flattened ({16 * c4} dims)"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> np.ndarray:
        """images [N, 3, R, R] in [-1, 1] → float64 [N, D]."""
        device = next(self.D.parameters()).device
        out = [
            self.D.features(images[i : i + self.batch].to(device).float())[-1].flatten(1).double().cpu()
            for i in range(0, len(images), self.batch)
        ]
        return torch.cat(out).numpy()


@torch.no_grad()
def render(
    G: Generator, z: Tensor, *, psi: float = 1.0, mapping_from: Generator | None = None, batch: int = 16
) -> Tensor:
    """Images [N, 3, R, R] on CPU for latents ``z`` with constant noise (comparable renders). ``mapping_from``
    maps z to w instead of ``G``: the base model's W is what the toon pipeline feeds a blended model."""
    mapper = mapping_from if mapping_from is not None else G
    out = []
    for i in range(0, len(z), batch):
        w = mapper.mapping(z[i : i + batch].to(mapper.device), truncation_psi=psi).to(G.device)
        out.append(G.synthesis(w.unsqueeze(1).expand(-1, G.num_ws, -1), noise_mode="const").float().cpu())
    return torch.cat(out)


class IdentityMeter:
    """dlib face descriptors (the ResNet of ``face-recognition-models``) of rendered faces. Renders are
    upscaled to 256 px before detection; faces dlib cannot find are counted, not guessed."""

    def __init__(self, predictor_path: str | Path | None = None, recognition_path: str | Path | None = None) -> None:
        import dlib

        from gan.align import default_model_path

        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(
            str(predictor_path or default_model_path("shape_predictor_5_face_landmarks.dat"))
        )
        rec = recognition_path or default_model_path("dlib_face_recognition_resnet_model_v1.dat")
        self._rec = dlib.face_recognition_model_v1(str(rec))

    @classmethod
    def maybe(cls) -> tuple[IdentityMeter | None, str]:
        """(meter, "") or (None, why it is unavailable)."""
        try:
            return cls(), ""
        except (ImportError, FileNotFoundError, RuntimeError) as e:
            return None, f"not available: {e}"

    def descriptors(self, images: np.ndarray) -> list[np.ndarray | None]:
        """One 128-d descriptor per uint8 [N, H, W, 3] image (its largest face), None where dlib finds none."""
        out: list[np.ndarray | None] = []
        for img in images:
            im = Image.fromarray(img)
            if max(im.size) < _DETECT_SIDE:
                s = _DETECT_SIDE / max(im.size)
                im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
            arr = np.ascontiguousarray(np.asarray(im))
            rects = self._detector(arr, 0)  # at 256 px faces are big: no upsampling (3.5x faster, same hits)
            if not rects:
                out.append(None)
                continue
            rect = max(rects, key=lambda r: r.width() * r.height())
            desc = self._rec.compute_face_descriptor(arr, self._shape(arr, rect))
            out.append(np.asarray(desc, dtype=np.float64))
        return out

    @staticmethod
    def compare(base: list[np.ndarray | None], other: list[np.ndarray | None]) -> dict[str, Any]:
        """Mean descriptor distance over the pairs where both faces were read (< 0.6: dlib's same person)."""
        d = [float(np.linalg.norm(a - b)) for a, b in zip(base, other, strict=True) if a is not None and b is not None]
        row: dict[str, Any] = {"readable": len(d), "of": len(base)}
        if not d:
            return {**row, "distance": None, "same_person": None, "note": "no readable faces"}
        return {**row, "distance": float(np.mean(d)), "same_person": float(np.mean([x < SAME_PERSON for x in d]))}


def metrics_table(rows: list[dict]) -> str:
    """The per-snapshot metrics as a fixed-width text table (identity: mean distance, lower keeps more)."""
    if not rows:
        return "(no metrics yet)"
    last = rows[-1].get("identity", {})
    swaps = sorted((k for k in last if k != "note"), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0))
    inception = any(r.get("fid") is not None for r in rows)
    head = ["kimg", "step", "aug_p", "KID(D)"] + (["FID", "KID(I)"] if inception else []) + [f"id@{k}" for k in swaps]
    lines = ["  ".join(f"{h:>8}" for h in head)]
    for r in rows:
        ident = r.get("identity", {})
        cells = [f"{r['kimg']:.3f}", str(r["step"]), f"{r.get('aug_p', 0.0):.3f}", _fmt(r.get("kid"))]
        if inception:
            cells += [_fmt(r.get("fid"), 2), _fmt(r.get("kid_inception"))]
        cells += [_fmt((ident.get(k) or {}).get("distance")) for k in swaps]
        lines.append("  ".join(f"{c:>8}" for c in cells))
    notes = {rows[-1].get("kid_features", ""), f"FID/KID on Inception: {rows[-1].get('inception', INCEPTION_NOTE)}"}
    if last.get("note"):
        notes.add(f"identity: {last['note']}")
    elif swaps:
        readable = ", ".join(f"{k}: {last[k]['readable']}/{last[k]['of']}" for k in swaps)
        notes.add(
            "id@R: mean dlib face-descriptor distance between base and swap-R blend renders of the same latents "
            f"(lower keeps more identity; < {SAME_PERSON} counts as the same person); faces read: {readable}"
        )
    return "\n".join(lines + sorted(n for n in notes if n))


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# ==========================================================================================================
# Runs


@dataclass
class FinetuneResult:
    status: str  # "done" | "cancelled"
    out_dir: Path
    checkpoint: Path | None
    steps: int
    kimg: float
    metrics: list[dict]
    report: dict  # what report.json holds


Progress = Callable[[str, int, int], None]


class FinetuneRun:
    """One fine-tune in its own folder ``out``:

    ``settings.json``, ``dataset.json`` (the ingest report), ``snapshot.pt`` (the latest training state,
    replaced atomically), ``previews/preview_<images seen>.png``, ``snapshots/kimg<kimg>.safetensors`` (the EMA
    generator of every snapshot, e.g. ``kimg000004.000.safetensors``: a checkpoint like any other, with the
    base model as its ancestor and ``meta["snapshot"]`` = kimg, step and the snapshot's metrics row),
    ``metrics.json`` (all rows so far), and when done ``toon.safetensors`` (the last snapshot's generator, with
    the discriminator for later fine-tunes), ``blends/swap<R>.png`` + ``blends/overview.png`` and
    ``report.json``.

    ``resume=True`` continues from ``snapshot.pt`` when there is one (the base and data must be the ones it
    started with); the run then ends exactly where an uninterrupted one would (same device and threads).

    ``inception``: FID features; True reads ``TOONIFY_INCEPTION_PATH`` when it is set (a path that is set but
    absent is an error), None or False: none."""

    def __init__(
        self,
        out: str | Path,
        base: str | Path,
        dataset: FinetuneDataset,
        settings: FinetuneSettings | None = None,
        *,
        device: str | torch.device = "cpu",
        resume: bool = False,
        identity: IdentityMeter | bool | None = True,
        inception: InceptionFeatures | bool | None = True,
    ) -> None:
        self.out, self.base_path, self.dataset = Path(out), Path(base), dataset
        self.device = torch.device(device)
        self.snapshot_path = self.out / "snapshot.pt"
        self.settings = self._settings(settings, resume)
        self.resume = resume and self.snapshot_path.is_file()
        self.G_base = load_generator(self.base_path, self.device)
        try:
            self.D_base = load_discriminator(self.base_path, self.device)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}. Fine-tuning needs the base model's discriminator: use our .safetensors from a training run, "
                "a rosinality .pt with 'd', or an NVIDIA training snapshot .pkl"
            ) from e
        if dataset.images.shape[1] != self.G_base.resolution:
            raise ValueError(
                f"the dataset is {dataset.images.shape[1]} px but the base model {self.G_base.resolution} px"
            )
        self.base_hash = self.G_base.meta.get("content_hash") or content_hash(self.G_base.state_dict())
        self.ancestors = lineage_of(self.G_base)
        self.swaps = self.settings.swaps(self.G_base.resolution)
        if identity is True:
            self.identity, self.identity_note = IdentityMeter.maybe()
        else:
            self.identity = identity or None
            self.identity_note = "" if self.identity else "not available: switched off"
        self.features = DiscriminatorFeatures(self.D_base)
        self._real_features: np.ndarray | None = None
        if inception is True:
            path = configured_inception_path()
            inception = None if path is None else InceptionFeatures.from_path(path, self.device)
        self.inception = inception or None
        self._real_inception: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # features, mean, cov
        self._base_descriptors: list | None = None
        self.trainer = self._trainer()

    # -- set-up ------------------------------------------------------------------------------------------

    def _settings(self, given: FinetuneSettings | None, resume: bool) -> FinetuneSettings:
        saved_path = self.out / "settings.json"
        if self.snapshot_path.is_file() and not resume:
            raise ValueError(f"{self.out} already holds a run; resume it (--resume) or choose another output folder")
        if not (resume and self.snapshot_path.is_file() and saved_path.is_file()):
            return given or FinetuneSettings()
        saved = FinetuneSettings.from_json(json.loads(saved_path.read_text()))
        if given is not None:
            differ = [
                f.name for f in fields(given) if f.name != "kimg" and getattr(given, f.name) != getattr(saved, f.name)
            ]
            if differ:
                raise ValueError(f"the run in {self.out} was started with other settings ({', '.join(differ)})")
            saved = replace(saved, kimg=given.kimg)  # a run may be extended (or shortened)
        return saved

    def _trainer(self) -> Trainer:
        cfg = self.settings.train_config(self.G_base.resolution)
        if self.resume:
            trainer = Trainer.resume(self.snapshot_path, self.dataset.images, device=self.device)
            base, data = trainer.meta.get("base", {}), trainer.meta.get("dataset", {})
            if base.get("content_hash") != self.base_hash:
                raise ValueError(f"{self.out} was fine-tuned from another base model ({base.get('content_hash')})")
            if data.get("sha256") != self.dataset.sha256:
                raise ValueError(f"{self.out} was trained on other data (dataset hash {data.get('sha256')})")
            return trainer
        meta = {
            "ancestors": self.ancestors,
            "dataset": self.dataset.describe(),
            "base": {"content_hash": self.base_hash, "file": self.base_path.name},
            "finetune": self.settings.to_json(),
            "metrics": [],
        }
        G, D = copy.deepcopy(self.G_base), copy.deepcopy(self.D_base)
        return Trainer(G, D, self.dataset.images, cfg, meta=meta)

    @property
    def total_steps(self) -> int:
        return steps_for(self.settings.kimg, self.settings.batch)

    @property
    def snapshot_steps(self) -> int:
        return steps_for(self.settings.snapshot_kimg, self.settings.batch)

    # -- metrics -----------------------------------------------------------------------------------------

    def _toon_view(self) -> Generator:
        G = self.trainer.G_ema
        G.meta = {"ancestors": self.ancestors}  # so blending sees the shared base (no lineage warning)
        return G

    def _kid_row(self, G: Generator) -> dict:
        s = self.settings
        if self._real_features is None:
            reals = from_uint8(self.dataset.images[: max(2, s.metric_samples)])
            self._real_features = self.features(reals)
        z = torch.randn(max(2, s.metric_samples), G.z_dim, generator=torch.Generator().manual_seed(s.seed + 7919))
        fakes = render(G, z)
        value = kid(self._real_features, self.features(fakes), seed=s.seed)
        row = {"kid": value, "kid_features": self.features.description, "fid": None, "inception": INCEPTION_NOTE}
        if self.inception is not None:
            row.update(self._inception_row(fakes))
        return row

    def _inception_row(self, fakes: Tensor) -> dict:
        """FID and KID on Inception features, against the same real images as KID(D)."""
        if self._real_inception is None:
            reals = self.inception(from_uint8(self.dataset.images[: max(2, self.settings.metric_samples)]))
            self._real_inception = (reals, *feature_statistics(reals))
        reals, mu_real, sigma_real = self._real_inception
        fake = self.inception(fakes)
        return {
            "fid": frechet_distance(mu_real, sigma_real, *feature_statistics(fake)),
            "kid_inception": kid(reals, fake, seed=self.settings.seed),
            "inception": self.inception.description,
        }

    def _identity_row(self, toon: Generator) -> dict:
        if self.identity is None:
            return {"note": self.identity_note}
        z = z_from_seeds(list(range(self.settings.identity_samples)), toon.z_dim)
        if self._base_descriptors is None:
            self._base_descriptors = self.identity.descriptors(to_uint8(self._pipeline_render(self.G_base, z)))
        if not any(d is not None for d in self._base_descriptors):
            return {"note": "no readable faces: dlib finds no face in the base model's renders"}
        rows = {}
        for r, G in [*((str(r), self._blend(toon, r)) for r in self.swaps), ("toon", toon)]:
            descriptors = self.identity.descriptors(to_uint8(self._pipeline_render(G, z)))
            rows[r] = self.identity.compare(self._base_descriptors, descriptors)
        return rows

    def _pipeline_render(self, G: Generator, z: Tensor) -> Tensor:
        """As the toon pipeline renders: the base model's W (typical faces: psi 0.7, as poll grids use)."""
        return render(G, z, psi=IDENTITY_PSI, mapping_from=self.G_base)

    def _blend(self, toon: Generator, resolution: int) -> Generator:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LineageWarning)
            return blend(self.G_base, toon, BlendSpec(mode="swap", resolution=resolution, structure_from="toon"))

    def metrics_row(self) -> dict:
        """KID and identity of the current ``G_ema``; draws nothing from the trainer's random generator."""
        t, toon = self.trainer, self._toon_view()
        row = {"kimg": t.nimg / 1000, "step": t.step_count, "aug_p": t.aug_p}
        row.update(self._kid_row(toon))
        row["identity"] = self._identity_row(toon)
        return row

    # -- the loop ----------------------------------------------------------------------------------------

    def _write_json(self, name: str, data: Any) -> None:
        path = self.out / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)

    def _preview(self) -> Path:
        z = z_from_seeds(list(range(self.settings.preview_seeds)), self.G_base.z_dim)
        path = self.out / "previews" / f"preview_{self.trainer.nimg:08d}.png"
        return save_grid(render(self.trainer.G_ema, z), path, columns=math.ceil(math.sqrt(len(z))))

    def generator_snapshot_path(self, nimg: int | None = None) -> Path:
        """Where the snapshot after ``nimg`` images (default: now) keeps its generator; the kimg has three
        decimals so small runs do not collide and the names sort in training order."""
        nimg = self.trainer.nimg if nimg is None else nimg
        return self.out / SNAPSHOT_DIR / f"kimg{nimg / 1000:010.3f}.safetensors"

    def _save_generator_snapshot(self, path: Path, row: dict) -> Path:
        """``G_ema`` as a loadable checkpoint: lineage as the final file has it, plus this snapshot's row."""
        t = self.trainer
        G = copy.deepcopy(t.G_ema)  # the live EMA trains on; only the copy gets an average latent
        G.compute_w_avg(n=4096, seed=t.cfg.seed)  # as Trainer.finished_generator: the last equals toon.safetensors
        G.meta = t.lineage_meta()
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_generator(G, path, meta={"snapshot": {"kimg": row["kimg"], "step": row["step"], "metrics": row}})

    def _record(self, on_snapshot: Callable[[dict], None] | None, *, save: bool) -> None:
        """Metrics row and preview grid of the current ``G_ema``, then (``save``, a training snapshot) its
        generator file and the training state: a run killed before the state is saved redoes this segment and
        writes the same files again."""
        row = self.metrics_row()
        row["preview"] = self._preview().relative_to(self.out).as_posix()
        generator = self.generator_snapshot_path() if save else None
        if generator is not None:
            row["generator"] = generator.relative_to(self.out).as_posix()
        self.trainer.meta["metrics"] = [*self.trainer.meta.get("metrics", []), row]
        if generator is not None:
            self._save_generator_snapshot(generator, row)
            self.trainer.save_snapshot(self.snapshot_path)
        self._write_json("metrics.json", self.trainer.meta["metrics"])
        if on_snapshot is not None:
            on_snapshot(row)

    def run(
        self,
        *,
        progress: Progress | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_snapshot: Callable[[dict], None] | None = None,
    ) -> FinetuneResult:
        """Train to the kimg budget with a snapshot every ``snapshot_kimg``; ``should_cancel`` is checked
        before every step (a cancelled run keeps a snapshot of where it stopped)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_json("settings.json", self.settings.to_json())
        self._write_json("dataset.json", self.dataset.report.to_json())
        t, total, every = self.trainer, self.total_steps, self.snapshot_steps
        if not t.meta.get("metrics"):  # the base model itself is the first row: where training starts from
            self._record(on_snapshot, save=False)

        def step_progress(step: int, steps: int, stats: dict) -> None:
            if progress is not None:
                progress("finetune", step, total)

        while t.step_count < total:
            target = min(total, (t.step_count // every + 1) * every)
            if not t.train(steps=target, progress=step_progress, should_cancel=should_cancel, stats_every=every):
                t.save_snapshot(self.snapshot_path)
                return self._result("cancelled", None)
            self._record(on_snapshot, save=True)
        return self._result("done", self._finish(progress))

    def _finish(self, progress: Progress | None) -> Path:
        if progress is not None:
            progress("export", 0, 1)
        t = self.trainer
        out = t.export(self.out / "toon.safetensors")
        toon = self._toon_view()
        z = z_from_seeds(list(range(min(8, self.settings.preview_seeds))), toon.z_dim)
        rows = [self._pipeline_render(self.G_base, z)]
        for r in self.swaps:
            images = self._pipeline_render(self._blend(toon, r), z)
            save_grid(images, self.out / "blends" / f"swap{r}.png", columns=len(z))
            rows.append(images)
        rows.append(self._pipeline_render(toon, z))
        make_grid(torch.cat(rows), columns=len(z)).save(self.out / "blends" / "overview.png")
        if progress is not None:
            progress("export", 1, 1)
        return out

    def _result(self, status: str, checkpoint: Path | None) -> FinetuneResult:
        t = self.trainer
        metrics = list(t.meta.get("metrics", []))
        report = {
            "status": status,
            "checkpoint": None if checkpoint is None else checkpoint.name,
            "base": t.meta.get("base"),
            "ancestors": self.ancestors,
            "dataset": t.meta.get("dataset"),
            "settings": self.settings.to_json(),
            "steps": t.step_count,
            "kimg": t.nimg / 1000,
            "metrics": metrics,
            "blend_previews": {str(r): f"blends/swap{r}.png" for r in self.swaps} if checkpoint else {},
            "overview": OVERVIEW if checkpoint else None,
            "table": metrics_table(metrics),
        }
        self._write_json("report.json", report)
        return FinetuneResult(status, self.out, checkpoint, t.step_count, t.nimg / 1000, metrics, report)


def run_finetune(
    base: str | Path,
    data: str | Path | bytes,
    out: str | Path,
    settings: FinetuneSettings | None = None,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    align: bool | Any = True,
    min_images: int = 8,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_snapshot: Callable[[dict], None] | None = None,
) -> FinetuneResult:
    """Ingest ``data`` at the base model's resolution, then fine-tune into ``out`` (see :class:`FinetuneRun`)."""
    from gan.checkpoints import read_checkpoint

    resolution = read_checkpoint(base).generator_config.resolution
    if progress is not None:
        progress("ingest", 0, 1)
    dataset = ingest(data, resolution, align=align, min_images=min_images)
    if progress is not None:
        progress("ingest", 1, 1)
    run = FinetuneRun(out, base, dataset, settings, device=device, resume=resume)
    return run.run(progress=progress, should_cancel=should_cancel, on_snapshot=on_snapshot)
