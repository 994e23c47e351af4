"""The latent space in chat: ``/edit`` (the last toon moved along a style's named directions) and ``/sweep`` (an
animation over the blend levels), plus reading a fine-tune snapshot's preview grid.

Both reuse the photo of the user's last toon (no new upload) and its cached latents; the worker projects the
photo first where there are none (a toon made in instant mode keeps no latents). A style's named directions are
a file made for its toon generator (:mod:`gan.editing`): for a bundled style the one the model manifest lists
(``styles.<name>.directions``, else ``<models_dir>/<name>.directions.safetensors``), for a community's fine-tuned
style the one beside its checkpoint (``<checkpoint without .safetensors>.directions.safetensors``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from backend import ledger
from backend.db.models import Blob, Community, Job, JobKind, JobStatus, StyleModel, User
from backend.errors import BadInputError, ConflictError, NotFoundError
from backend.jobs import (
    PROJECTION_MODES,
    EditParams,
    Edits,
    JobParams,
    SweepParams,
    SweepResult,
    ToonParams,
    merge_edits,
)
from backend.ledger import NewJob
from backend.quotas import QuotaExceededError
from backend.service.base import Concern, get_community, get_user, names_redis
from backend.service.students import stored_path
from backend.service.styles import default_spec, resolve_style
from backend.service.types import Actor, JobTicket, Place, QuotaError
from gan.blending import BlendSpec

MAX_STRENGTH = 10.0  # σ of sampled W: beyond a few the faces fall apart; beyond this it is surely a typo
TOON_KINDS = (JobKind.TOON, JobKind.REBLEND, JobKind.EDIT)  # what "your last toon" may be


@dataclass(frozen=True)
class DirectionsInfo:
    """A style's named directions (what ``/edit NAME`` accepts)."""

    style: str
    names: list[str]


@dataclass(frozen=True)
class SweepOutput:
    job_id: str
    animation: bytes
    filename: str  # sweep.gif or sweep.webp
    style: str
    levels: list[int]
    faces: int
    source: str  # "toon": the user's last toon; "probe": the fixed probe faces


@dataclass(frozen=True)
class LastToon:
    """What an edit or a sweep of the user's latest toon starts from."""

    job_id: str
    style_id: int
    style: str
    spec: BlendSpec | None  # None: the style's default where it is used
    mode: str  # how it was made (instant, fast, balanced, quality)
    edits: Edits
    all_faces: bool
    blob_id: int
    sha256: str


def directions_path(models_dir: Path, data_dir: Path, style: StyleModel) -> Path:
    """Where ``style``'s named directions live (the file may not exist)."""
    from gan.editing import DIRECTIONS_SUFFIX, style_directions_path

    if style.community_id is None:  # a bundled style: the manifest's entry, else the default beside the models
        try:
            return style_directions_path(style.name, models_dir)
        except (FileNotFoundError, ValueError):
            pass
    checkpoint = stored_path(data_dir, style.checkpoint_path)
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + DIRECTIONS_SUFFIX)


def read_directions(models_dir: Path, data_dir: Path, style: StyleModel):
    """The style's DirectionSet (gan.editing), or BadInputError saying it has none or the file is unreadable."""
    from gan.editing import DirectionsError, load_directions

    path = directions_path(models_dir, data_dir, style)
    if not path.is_file():
        raise BadInputError(
            f"the style {style.name!r} has no named directions yet; an admin makes them with "
            f"`toonify directions {style.name} --register` and names one after looking at it"
        )
    try:
        return load_directions(path)
    except DirectionsError as e:
        raise BadInputError(f"the named directions of style {style.name!r} cannot be read: {e}") from e


def check_direction(directions, style: str, key: str) -> str:
    """``key`` as an edit of ``directions``: a named direction, or a component index; else BadInputError listing
    the style's names."""
    if key in directions.named or (key.isdigit() and int(key) < len(directions)):
        return key
    names = ", ".join(sorted(directions.named)) or "none yet"
    raise BadInputError(f"the style {style!r} has no direction called {key!r}; its named directions: {names}")


async def last_toon(s: AsyncSession, user: User) -> LastToon | None:
    """The user's latest toon, re-blend or edit that has a photo (its row, not necessarily finished)."""
    job = await s.scalar(
        sa.select(Job)
        .where(Job.user_id == user.id, Job.kind.in_(TOON_KINDS), Job.input_blob_id.is_not(None))
        .order_by(Job.created_at.desc())
        .limit(1)
    )
    if job is None:
        return None
    blob = await s.get(Blob, job.input_blob_id)
    if blob is None:
        return None
    if job.kind == JobKind.EDIT:
        e = EditParams.from_json(job.params)  # an edit is a projected toon: its latents are kept in ``mode``
        spec, mode, edits, all_faces, style_id, style = e.spec, e.mode, e.edits, e.all_faces, e.style_id, e.style
    else:
        t = ToonParams.from_json(job.params)
        spec, mode, edits, all_faces, style_id, style = t.spec, t.mode, (), t.all_faces, t.style_id, t.style
    return LastToon(job.id, style_id, style, spec, mode, edits, all_faces, job.input_blob_id, blob.sha256)


def _job_key(user_id: int, subject: str, op: str, params: JobParams) -> str:
    """The same photo (or subject), operation and options from the same person is one job."""
    ident = {k: v for k, v in params.to_json().items() if k not in ("source_job", "source_mode")}
    return hashlib.sha256(json.dumps([user_id, subject, op, ident], sort_keys=True).encode()).hexdigest()


class ExploreCommands(Concern):
    async def directions(self, actor: Actor, place: Place | None, style: str | None = None) -> DirectionsInfo:
        """The named directions of ``style`` (default: the style of the actor's last toon, else the default)."""
        await self.styles_fresh()  # a style added or removed since the last request
        async with self.rt.sessions() as s:
            user = await get_user(s, actor)
            comm = await get_community(s, place, user, actor)
            last = None if style else await last_toon(s, user)
            st = await self._style(s, actor, user, comm, style or (last.style if last else None))
            await s.commit()
        try:
            found = await asyncio.to_thread(read_directions, self.rt.models_dir, self.rt.settings.data_dir, st)
        except BadInputError:
            return DirectionsInfo(st.name, [])
        return DirectionsInfo(st.name, sorted(found.named))

    async def _style(
        self, s: AsyncSession, actor: Actor, user: User, comm: Community | None, name: str | None
    ) -> StyleModel:
        preferred = (user.preferences or {}).get("style")
        try:
            return await resolve_style(s, self.rt.models_dir, name or preferred, comm, drafts=actor.is_admin)
        except NotFoundError:
            if name:
                raise
            return await resolve_style(s, self.rt.models_dir, None, comm)

    @names_redis
    async def edit_last(self, actor: Actor, place: Place | None, direction: str, strength: float) -> JobTicket:
        """``/edit NAME STRENGTH``: the actor's last toon re-rendered (same photo, style and blend) from its latents
        moved ``strength`` σ along the style's direction ``NAME``. Edits add up over a series of ``/edit`` s (the
        same direction again replaces its strength; 0 takes it out). No new upload; where the last toon kept no
        latents (instant mode), the worker projects the photo first (balanced) and keeps them."""
        await self.styles_fresh()  # a style added or removed since the last request
        direction = (direction or "").strip()
        if not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
            raise BadInputError(
                f"the strength is a number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}, like 2 or -1.5"
            )
        async with self.rt.sessions() as s:
            user = await get_user(s, actor)
            comm = await get_community(s, place, user, actor)
            last = await last_toon(s, user)
            if last is None:
                raise NotFoundError("there is no earlier toon of yours to edit; send a photo with /toon first")
            st = await s.get(StyleModel, last.style_id)
            if st is None:
                raise NotFoundError(f"the style of your last toon ({last.style}) is gone; make a new toon with /toon")
            spec = last.spec or await default_spec(s, st, comm)
            await s.commit()
            user_id, comm_id = user.id, comm.id if comm else None
        found = await asyncio.to_thread(read_directions, self.rt.models_dir, self.rt.settings.data_dir, st)
        key = check_direction(found, st.name, direction)
        if not self.rt.blobs.exists(last.sha256):
            raise NotFoundError("your last photo has expired; send it again with /toon")
        params = EditParams(
            style_id=st.id,
            style=st.name,
            spec=spec,
            edits=merge_edits(last.edits, key, float(strength)),
            source_job=last.job_id,
            source_mode=last.mode,
            mode=last.mode if last.mode in PROJECTION_MODES else "balanced",
            all_faces=last.all_faces,
        )
        key = _job_key(user_id, last.sha256, "edit", params)
        return await self._create(NewJob(key, JobKind.EDIT, user_id, comm_id, params, input_blob_id=last.blob_id))

    @names_redis
    async def sweep(self, actor: Actor, place: Place | None, *, style: str | None = None) -> JobTicket:
        """``/sweep [STYLE]``: an animated GIF of the actor's last toon (with its edits) over the swap levels from 4
        px up to full resolution, in its style or ``style``; with no earlier toon, of the fixed probe faces."""
        await self.styles_fresh()  # a style added or removed since the last request
        async with self.rt.sessions() as s:
            user = await get_user(s, actor)
            comm = await get_community(s, place, user, actor)
            last = await last_toon(s, user)
            st = await self._style(s, actor, user, comm, style or (last.style if last else None))
            structure = (await default_spec(s, st, comm)).structure_from
            await s.commit()
            user_id, comm_id = user.id, comm.id if comm else None
        if last is not None and not self.rt.blobs.exists(last.sha256):
            last = None  # the photo expired: the probe faces still show what the levels do
        if last is None:
            params = SweepParams(style_id=st.id, style=st.name, structure_from=structure)
            new = NewJob(_job_key(user_id, "probe", "sweep", params), JobKind.SWEEP, user_id, comm_id, params)
            return await self._create(new)
        params = SweepParams(
            style_id=st.id,
            style=st.name,
            structure_from=structure,
            source_job=last.job_id,
            source_mode=last.mode,
            mode=last.mode if last.mode in PROJECTION_MODES else "balanced",
            edits=last.edits if last.style_id == st.id else (),  # directions belong to their style
            all_faces=last.all_faces,
        )
        key = _job_key(user_id, last.sha256, "sweep", params)
        return await self._create(NewJob(key, JobKind.SWEEP, user_id, comm_id, params, input_blob_id=last.blob_id))

    async def _create(self, new: NewJob) -> JobTicket:
        try:
            created = await ledger.create_job(self.rt, new, count_quota=True)
        except QuotaExceededError as e:
            raise QuotaError(str(e), e.retry_after_s) from e
        return JobTicket(created.job_id, created.status.value, duplicate=created.duplicate)

    async def sweep_result(self, job_id: str) -> SweepOutput:
        """A finished ``/sweep``: the animation and what it shows."""
        async with self.rt.sessions() as s:
            job = await s.get(Job, job_id)
        if job is None or job.kind != JobKind.SWEEP:
            raise NotFoundError("no such sweep")
        if job.status != JobStatus.DONE or not job.result:
            raise ConflictError(f"that sweep is {job.status.value}" + (f": {job.error}" if job.error else ""))
        r = SweepResult.from_json(job.result)
        try:
            data = await asyncio.to_thread(self.rt.blobs.read, r.animation)
        except FileNotFoundError as e:
            raise NotFoundError("this sweep has expired or was deleted") from e
        return SweepOutput(job.id, data, r.filename, r.style, list(r.levels), r.faces, r.source)

    async def read_preview(self, sha256: str) -> bytes:
        """A preview image a job published (a fine-tune snapshot's grid), by its blob hash."""
        try:
            return await asyncio.to_thread(self.rt.blobs.read, sha256)
        except (FileNotFoundError, ValueError) as e:
            raise NotFoundError("this preview has expired or was deleted") from e
