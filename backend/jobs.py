"""Typed job parameters and results: what ``jobs.params`` and ``jobs.result`` hold, one frozen class per kind.

The JSON shape is the one rows have always been stored with (same keys), and ``from_json`` fills keys that
older rows lack with the defaults they were run with, so rows written before these classes existed still load.
Unknown keys are ignored: a newer writer never breaks an older reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend.db.models import JobKind
from gan.blending import BlendSpec
from gan.styles import DEFAULT_BLEND

__all__ = [
    "DEFAULT_BLEND",
    "MODES",
    "PROJECTION_MODES",
    "DistillParams",
    "DistillResult",
    "EditParams",
    "FinetuneParams",
    "FinetuneResult",
    "PreviewParams",
    "SweepParams",
    "SweepResult",
    "ToonParams",
    "ToonResult",
    "blend_key",
    "params_from_json",
    "queue_of",
]

PROJECTION_MODES = ("fast", "balanced", "quality")  # projection recipes (gan.pipeline)
MODES = ("instant", *PROJECTION_MODES)  # instant: the style's distilled student network, no projection
LONG_KINDS = (JobKind.FINETUNE, JobKind.DISTILL)  # training: minutes to hours, on their own queue


def blend_key(spec: BlendSpec) -> str:
    """The canonical JSON of a blend: ``students.blend_key`` (one student per style and blend); torch-free."""
    return spec.key()


def queue_of(kind: JobKind) -> str:
    """The queue role (a key of ``backend.keys.QUEUE_NAMES``) that runs jobs of ``kind``."""
    return "finetune" if kind in LONG_KINDS else "toon"


def _spec(value: dict[str, Any] | None) -> BlendSpec | None:
    return BlendSpec.from_json(value) if value else None


ANIMATION_MEDIA_TYPES = {"gif": "image/gif", "webp": "image/webp"}  # /sweep's formats
Edits = tuple[tuple[str, float], ...]  # (named direction, strength), in the order they were asked for


def _edits(value: Any) -> Edits:
    return tuple((str(name), float(strength)) for name, strength in value or ())


def merge_edits(before: Edits, name: str, strength: float) -> Edits:
    """``before`` with ``name`` set to ``strength`` (a later /edit of the same direction replaces it; 0 removes it)."""
    kept = tuple((n, s) for n, s in before if n != name)
    return kept if strength == 0 else (*kept, (name, float(strength)))


@dataclass(frozen=True)
class ToonParams:
    """A toon or re-blend job. ``spec`` None: the style's default blend, resolved when the job runs."""

    style_id: int
    style: str
    spec: BlendSpec | None = None
    mode: str = "balanced"
    all_faces: bool = True
    reblend_of: str | None = None  # the job whose photo (and cached latents) a re-blend reuses

    def blend(self, style_default: dict[str, Any] | None = None) -> BlendSpec:
        """The blend to render: the job's own, else the style row's default, else DEFAULT_BLEND."""
        return self.spec or _spec(style_default) or DEFAULT_BLEND

    def identity(self) -> dict[str, Any]:
        """What makes two requests the same work (a re-blend and a toon with the same options are)."""
        d = self.to_json()
        d.pop("reblend_of", None)
        return d

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "style_id": self.style_id,
            "style": self.style,
            "spec": self.spec.to_json() if self.spec else None,
            "mode": self.mode,
            "all_faces": self.all_faces,
        }
        if self.reblend_of is not None:
            d["reblend_of"] = self.reblend_of
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ToonParams:
        return cls(
            style_id=int(d["style_id"]),
            style=str(d.get("style", "")),
            spec=_spec(d.get("spec")),
            mode=str(d.get("mode", "balanced")),
            all_faces=bool(d.get("all_faces", True)),
            reblend_of=d.get("reblend_of"),
        )


@dataclass(frozen=True)
class PreviewParams:
    """A poll's grid: the style rendered at each candidate blend on fixed probe faces."""

    poll_id: int
    style_id: int
    style: str
    specs: tuple[BlendSpec, ...]
    # A snapshot poll: row i renders checkpoints[i] (a fine-tune snapshot) at specs[i]; empty: the style's model
    checkpoints: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "poll_id": self.poll_id,
            "style_id": self.style_id,
            "style": self.style,
            "specs": [s.to_json() for s in self.specs],
        }
        if self.checkpoints:
            d["checkpoints"] = list(self.checkpoints)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PreviewParams:
        return cls(
            poll_id=int(d["poll_id"]),
            style_id=int(d["style_id"]),
            style=str(d.get("style", "")),
            specs=tuple(BlendSpec.from_json(s) for s in d.get("specs", [])),
            checkpoints=tuple(str(c) for c in d.get("checkpoints", ())),
        )


@dataclass(frozen=True)
class FinetuneParams:
    """A fine-tune of the base model on a dataset into a draft style; steps count batches."""

    style_id: int
    dataset_id: int
    style: str
    steps: int = 400
    snapshot_every: int = 50

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "style_id": self.style_id,
            "dataset_id": self.dataset_id,
            "steps": self.steps,
            "style": self.style,
        }
        if self.snapshot_every != 50:  # rows so far never carried it: keep their shape for the default
            d["snapshot_every"] = self.snapshot_every
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FinetuneParams:
        return cls(
            style_id=int(d["style_id"]),
            dataset_id=int(d["dataset_id"]),
            style=str(d.get("style", "")),
            steps=int(d.get("steps", 400)),
            snapshot_every=int(d.get("snapshot_every", 50)),
        )


@dataclass(frozen=True)
class DistillParams:
    """Train the instant (student) network of a style for one blend; ``reason``: who asked (admin, publish, poll)."""

    style_id: int
    style: str
    spec: BlendSpec
    kimg: float
    reason: str = "admin"

    def to_json(self) -> dict[str, Any]:
        return {
            "style_id": self.style_id,
            "style": self.style,
            "spec": self.spec.to_json(),
            "kimg": self.kimg,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DistillParams:
        return cls(
            style_id=int(d["style_id"]),
            style=str(d.get("style", "")),
            spec=BlendSpec.from_json(d["spec"]),
            kimg=float(d["kimg"]),
            reason=str(d.get("reason", "admin")),
        )


@dataclass(frozen=True)
class EditParams:
    """``/edit``: the photo of an earlier toon (``source_job``) re-rendered at its style and blend from its latents
    moved along the style's named directions. ``mode`` is the projection whose cached latents are used (made
    first when there are none: ``source_mode`` instant keeps no latents)."""

    style_id: int
    style: str
    spec: BlendSpec
    edits: Edits
    source_job: str
    source_mode: str = "balanced"
    mode: str = "balanced"
    all_faces: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "style_id": self.style_id,
            "style": self.style,
            "spec": self.spec.to_json(),
            "edits": [list(e) for e in self.edits],
            "source_job": self.source_job,
            "source_mode": self.source_mode,
            "mode": self.mode,
            "all_faces": self.all_faces,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EditParams:
        return cls(
            style_id=int(d["style_id"]),
            style=str(d.get("style", "")),
            spec=BlendSpec.from_json(d["spec"]),
            edits=_edits(d.get("edits")),
            source_job=str(d.get("source_job", "")),
            source_mode=str(d.get("source_mode", "balanced")),
            mode=str(d.get("mode", "balanced")),
            all_faces=bool(d.get("all_faces", True)),
        )


@dataclass(frozen=True)
class SweepParams:
    """``/sweep``: an animation over the swap levels from 4 px up to full resolution, of an earlier toon's faces
    (``source_job``, with the edits it had) or, with no ``source_job``, of the fixed probe faces."""

    style_id: int
    style: str
    structure_from: str = "toon"
    source_job: str | None = None
    source_mode: str = ""
    mode: str = "balanced"
    edits: Edits = ()
    all_faces: bool = True
    fmt: str = "gif"

    def to_json(self) -> dict[str, Any]:
        return {
            "style_id": self.style_id,
            "style": self.style,
            "structure_from": self.structure_from,
            "source_job": self.source_job,
            "source_mode": self.source_mode,
            "mode": self.mode,
            "edits": [list(e) for e in self.edits],
            "all_faces": self.all_faces,
            "fmt": self.fmt,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SweepParams:
        return cls(
            style_id=int(d["style_id"]),
            style=str(d.get("style", "")),
            structure_from=str(d.get("structure_from", "toon")),
            source_job=d.get("source_job"),
            source_mode=str(d.get("source_mode", "")),
            mode=str(d.get("mode", "balanced")),
            edits=_edits(d.get("edits")),
            all_faces=bool(d.get("all_faces", True)),
            fmt=str(d.get("fmt", "gif")),
        )


JobParams = ToonParams | PreviewParams | FinetuneParams | DistillParams | EditParams | SweepParams


def params_from_json(kind: JobKind, d: dict[str, Any]) -> JobParams:
    """The typed parameters of a job row of ``kind``."""
    if kind == JobKind.FINETUNE:
        return FinetuneParams.from_json(d)
    if kind == JobKind.DISTILL:
        return DistillParams.from_json(d)
    if kind == JobKind.PREVIEW:
        return PreviewParams.from_json(d)
    if kind == JobKind.EDIT:
        return EditParams.from_json(d)
    if kind == JobKind.SWEEP:
        return SweepParams.from_json(d)
    return ToonParams.from_json(d)


@dataclass(frozen=True)
class ToonResult:
    """A toon, re-blend or preview: blob hashes of the composite and the crops (a preview: grid and rows)."""

    composite: str
    crops: tuple[str, ...]
    faces: int
    too_small: int = 0
    style: str = ""
    spec: BlendSpec | None = None  # None for a preview (many blends)
    image_sha256: str | None = None  # the photo (toon and re-blend)
    poll_id: int | None = None  # the poll (preview)
    mode: str = ""  # how the toon was made (instant, fast, balanced, quality); "" for a preview and older rows
    edits: Edits = ()  # an /edit: the named directions and strengths applied

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "composite": self.composite,
            "crops": list(self.crops),
            "faces": self.faces,
            "too_small": self.too_small,
            "style": self.style,
            "spec": self.spec.to_json() if self.spec else {},
        }
        if self.mode:
            d["mode"] = self.mode
        if self.edits:
            d["edits"] = [list(e) for e in self.edits]
        if self.image_sha256 is not None:
            d["image_sha256"] = self.image_sha256
        if self.poll_id is not None:
            d["poll_id"] = self.poll_id
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ToonResult:
        crops = tuple(d.get("crops", ()))
        return cls(
            composite=d["composite"],
            crops=crops,
            faces=int(d.get("faces", len(crops))),
            too_small=int(d.get("too_small", 0)),
            style=str(d.get("style", "")),
            spec=_spec(d.get("spec")),
            image_sha256=d.get("image_sha256"),
            poll_id=d.get("poll_id"),
            mode=str(d.get("mode", "")),
            edits=_edits(d.get("edits")),
        )


@dataclass(frozen=True)
class SweepResult:
    """A finished ``/sweep``: the animation's blob and what it shows (one frame per swap level)."""

    animation: str
    fmt: str
    style: str
    levels: tuple[int, ...]
    faces: int
    source: str  # "toon": the faces of the user's last toon; "probe": the fixed probe faces
    image_sha256: str | None = None
    edits: Edits = ()

    @property
    def filename(self) -> str:
        return f"sweep.{self.fmt}"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "animation": self.animation,
            "format": self.fmt,
            "style": self.style,
            "levels": list(self.levels),
            "faces": self.faces,
            "source": self.source,
        }
        if self.image_sha256 is not None:
            d["image_sha256"] = self.image_sha256
        if self.edits:
            d["edits"] = [list(e) for e in self.edits]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SweepResult:
        return cls(
            animation=str(d["animation"]),
            fmt=str(d.get("format", "gif")),
            style=str(d.get("style", "")),
            levels=tuple(int(x) for x in d.get("levels", ())),
            faces=int(d.get("faces", 0)),
            source=str(d.get("source", "toon")),
            image_sha256=d.get("image_sha256"),
            edits=_edits(d.get("edits")),
        )


@dataclass(frozen=True)
class FinetuneResult:
    """A finished fine-tune: the draft style's checkpoint and how it went."""

    style: str
    checkpoint: str
    images: int
    steps: int
    metrics: dict[str, Any] | None = None  # the last snapshot's metrics row
    dataset: dict[str, Any] = field(default_factory=dict)  # ingestion counts (kept, refused, duplicates…)
    report: str | None = None  # path of the run's report.json
    summary: str | None = None  # the last snapshot's metrics in one line (KID, identity), as chats show it

    def to_json(self) -> dict[str, Any]:
        d = {
            "style": self.style,
            "checkpoint": self.checkpoint,
            "images": self.images,
            "steps": self.steps,
            "metrics": self.metrics,
            "dataset": self.dataset,
            "report": self.report,
        }
        if self.summary is not None:
            d["summary"] = self.summary
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FinetuneResult:
        return cls(
            style=str(d.get("style", "")),
            checkpoint=str(d["checkpoint"]),
            images=int(d.get("images", 0)),
            steps=int(d.get("steps", 0)),
            metrics=d.get("metrics"),
            dataset=dict(d.get("dataset") or {}),
            report=d.get("report"),
            summary=d.get("summary"),
        )


@dataclass(frozen=True)
class DistillResult:
    """A finished distillation: the student file (``student``) and the style and blend it was trained for."""

    style: str
    blend: BlendSpec
    student: str  # the file's path
    kimg: float
    content_hash: str | None = None
    base_hash: str = ""
    toon_hash: str = ""
    reason: str = "admin"

    def to_json(self) -> dict[str, Any]:
        return {
            "style": self.style,
            "blend": self.blend.to_json(),
            "student": self.student,
            "kimg": self.kimg,
            "content_hash": self.content_hash,
            "base_hash": self.base_hash,
            "toon_hash": self.toon_hash,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DistillResult:
        return cls(
            style=str(d.get("style", "")),
            blend=BlendSpec.from_json(d["blend"]),
            student=str(d["student"]),
            kimg=float(d.get("kimg", 0.0)),
            content_hash=d.get("content_hash"),
            base_hash=str(d.get("base_hash", "")),
            toon_hash=str(d.get("toon_hash", "")),
            reason=str(d.get("reason", "admin")),
        )
