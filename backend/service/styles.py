"""Styles: the bundled ones from the model manifest, community fine-tunes, and which one a request gets."""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from dataclasses import replace
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from backend import ledger
from backend.db.models import Blend, BlobKind, Community, Dataset, JobKind, Student, StyleModel, StyleStatus
from backend.errors import BadInputError, ConflictError, NotFoundError
from backend.jobs import FinetuneParams, blend_key
from backend.ledger import NewJob, store_blob
from backend.service.base import Concern, get_community, get_user, names_redis, require_admin
from backend.service.students import READY, auto_distill, queue_distill, stored_path
from backend.service.types import MAX_DATASET_BYTES, Actor, JobTicket, Place, StyleInfo, parse_blend
from gan.blending import BlendSpec
from gan.styles import DEFAULT_BLEND, read_manifest, serving_manifest

MIN_DATASET_FILES = 8
log = logging.getLogger("toonify.service")


def default_style_name(models_dir: Path) -> str | None:
    try:
        return read_manifest(models_dir).default_style
    except FileNotFoundError:
        return None


async def visible_styles(s: AsyncSession, comm: Community | None) -> list[StyleModel]:
    """Published styles usable here: the global ones and the community's own."""
    scope = StyleModel.community_id.is_(None)
    if comm is not None:
        scope = scope | (StyleModel.community_id == comm.id)
    q = sa.select(StyleModel).where(scope, StyleModel.status == StyleStatus.PUBLISHED).order_by(StyleModel.name)
    return list((await s.scalars(q)).all())


async def resolve_style(
    s: AsyncSession, models_dir: Path, name: str | None, comm: Community | None, *, drafts: bool = False
) -> StyleModel:
    """The style called ``name`` (None: the manifest's default) visible in ``comm``; the community's own wins."""
    name = (name or default_style_name(models_dir) or "").strip().lower()
    visible = [StyleStatus.PUBLISHED] + ([StyleStatus.DRAFT] if drafts else [])
    q = sa.select(StyleModel).where(StyleModel.name == name, StyleModel.status.in_(visible))
    scope = StyleModel.community_id.is_(None)
    if comm is not None:
        scope = scope | (StyleModel.community_id == comm.id)
    rows = (await s.scalars(q.where(scope))).all()
    if not rows:
        names = [st.name for st in await visible_styles(s, comm)]
        raise NotFoundError(f"there is no style called {name!r}; try one of: {', '.join(names) or 'none'}")
    return sorted(rows, key=lambda r: r.community_id is None)[0]


async def default_spec(s: AsyncSession, style: StyleModel, comm: Community | None) -> BlendSpec:
    """The blend a request without one gets: the community's chosen one, else the style's, else DEFAULT_BLEND."""
    if comm is not None:
        blend = await s.scalar(
            sa.select(Blend).where(Blend.style_id == style.id, Blend.community_id == comm.id, Blend.is_default)
        )
        if blend is not None:
            return BlendSpec.from_json(blend.spec)
    return BlendSpec.from_json(style.default_blend) if style.default_blend else DEFAULT_BLEND


def has_encoder(models_dir: Path, data_dir: Path, style: StyleModel) -> bool:
    """Whether the base ``style`` renders with has an encoder listed (fast mode needs one), per the manifest."""
    try:
        manifest = serving_manifest(models_dir)
    except (FileNotFoundError, ValueError):
        return True  # nothing to go by here: the worker says so if it has none
    path = stored_path(data_dir, style.checkpoint_path) if style.checkpoint_path else None
    return manifest.models_for(path, style.name)[1] is not None  # as the worker resolves it


def _info(st: StyleModel) -> StyleInfo:
    return StyleInfo(st.name, st.status.value, st.community_id is not None, st.default_blend)


async def _sync_students(s: AsyncSession, row: StyleModel, style) -> None:
    """The manifest's students of a bundled style as rows. A row a distillation job made for the same base and
    toon stays (it is newer work on the same models); anything else is replaced by the manifest's entry."""
    for entry in getattr(style, "students", ()):
        key, raw = blend_key(entry.blend), entry.raw
        hashes = {"base_hash": str(raw.get("base_hash", "")), "toon_hash": str(raw.get("toon_hash", ""))}
        have = await s.scalar(sa.select(Student).where(Student.style_id == row.id, Student.blend_key == key))
        if have is None:
            have = Student(style_id=row.id, blend_key=key)
            s.add(have)
        elif have.job_id is not None and (have.base_hash, have.toon_hash) == tuple(hashes.values()):
            continue
        have.blend, have.path, have.content_hash = entry.blend.to_json(), str(entry.file), raw.get("content_hash")
        have.base_hash, have.toon_hash, have.status, have.job_id = *hashes.values(), READY, None


class StyleCommands(Concern):
    async def sync_bundled_styles(self) -> None:
        """Make the styles of the model manifest (bundled demo or TOONIFY_MODELS_DIR) global published rows, and
        record the students it lists. A global style the manifest no longer lists (``toonify styles remove``) is
        archived; one listed again is published again."""
        try:
            manifest = serving_manifest(self.rt.models_dir)
        except FileNotFoundError:
            return
        async with self.rt.sessions() as s:
            for name, style in manifest.styles.items():
                row = await s.scalar(
                    sa.select(StyleModel).where(StyleModel.name == name, StyleModel.community_id.is_(None))
                )
                path, blend = str(style.toon), style.blend.to_json()
                if row is None:
                    row = StyleModel(
                        name=name,
                        community_id=None,
                        status=StyleStatus.PUBLISHED,
                        checkpoint_path=path,
                        default_blend=blend,
                    )
                    s.add(row)
                    await s.flush()
                else:
                    row.checkpoint_path, row.default_blend, row.status = path, blend, StyleStatus.PUBLISHED
                await _sync_students(s, row, style)
            gone = sa.select(StyleModel).where(
                StyleModel.community_id.is_(None),
                StyleModel.status == StyleStatus.PUBLISHED,
                StyleModel.name.not_in(list(manifest.styles)),
            )
            for row in (await s.scalars(gone)).all():
                row.status = StyleStatus.ARCHIVED
            try:
                await s.commit()
            except sa.exc.IntegrityError:  # another process synced at the same moment
                await s.rollback()
        self.rt.synced_manifest = manifest

    async def styles_fresh(self) -> None:
        """Sync again when the manifest changed since the last sync (``toonify styles add`` on a running bot):
        one stat of the file per request, the parse is cached. A broken file keeps the last good styles."""
        try:
            manifest = serving_manifest(self.rt.models_dir)
        except (FileNotFoundError, ValueError):
            return  # never parsed well here: the styles already in the database stay
        if self.rt.synced_manifest is not manifest:
            try:
                await self.sync_bundled_styles()
            except sa.exc.SQLAlchemyError as e:  # the request itself meets the database next and says so
                log.warning("could not sync the model manifest's styles: %s", e)

    async def require_admin(self, actor: Actor, place: Place | None) -> None:
        """Raise NotAllowedError unless ``actor`` administers ``place`` (front ends check before downloading)."""
        async with self.rt.sessions() as s:
            await require_admin(s, actor, place)
            await s.commit()

    async def list_styles(self, place: Place | None = None) -> list[StyleInfo]:
        await self.styles_fresh()
        async with self.rt.sessions() as s:
            comm = await get_community(s, place)
            rows = await visible_styles(s, comm)
            await s.commit()
        return [_info(r) for r in rows]

    async def set_style(self, actor: Actor, place: Place | None, name: str) -> StyleInfo:
        """``/style NAME``: the actor's default style from now on (it must be visible here)."""
        await self.styles_fresh()
        async with self.rt.sessions() as s:
            user = await get_user(s, actor)
            comm = await get_community(s, place, user, actor)
            st = await resolve_style(s, self.rt.models_dir, name, comm, drafts=actor.is_admin)
            user.preferences = {**(user.preferences or {}), "style": st.name}
            await s.commit()
            return _info(st)

    @names_redis
    async def start_finetune(
        self,
        actor: Actor,
        place: Place | None,
        name: str,
        dataset: bytes,
        *,
        steps: int | None = None,
        snapshot_every: int | None = None,
    ) -> JobTicket:
        """Admins: store a zip of images and queue a fine-tune of the base model into draft style ``name``:
        ``steps`` batches (default TOONIFY_FINETUNE_STEPS), a snapshot every ``snapshot_every`` (default
        TOONIFY_FINETUNE_SNAPSHOT_EVERY)."""
        steps = steps or self.rt.settings.finetune_steps
        snapshot_every = snapshot_every or self.rt.settings.finetune_snapshot_every
        await self.require_admin(actor, place)
        name = name.strip().lower()
        if not name or len(name) > 32 or not all(c.isalnum() or c in "-_" for c in name):
            raise BadInputError("a style name is 1 to 32 letters, digits, '-' or '_'")
        if len(dataset) > MAX_DATASET_BYTES:
            size, limit = len(dataset) / 2**20, MAX_DATASET_BYTES >> 20
            raise BadInputError(f"that dataset is {size:.0f} MB; the limit is {limit} MB")
        try:
            with zipfile.ZipFile(io.BytesIO(dataset)) as zf:
                n_files = sum(1 for m in zf.infolist() if not m.is_dir())
        except zipfile.BadZipFile as e:
            raise BadInputError("send the dataset as a .zip of images") from e
        if n_files < MIN_DATASET_FILES:
            raise BadInputError(f"the zip holds {n_files} files; a fine-tune needs at least {MIN_DATASET_FILES} images")
        async with self.rt.sessions() as s:
            user, comm = await require_admin(s, actor, place)
            st = await s.scalar(
                sa.select(StyleModel).where(StyleModel.name == name, StyleModel.community_id == comm.id)
            )
            if st is not None and st.status in (StyleStatus.PUBLISHED, StyleStatus.TRAINING):
                raise ConflictError(f"this community already has a {st.status.value} style called {name!r}")
            if st is None:
                st = StyleModel(
                    name=name,
                    community_id=comm.id,
                    status=StyleStatus.TRAINING,
                    checkpoint_path="",
                    created_by=user.id,
                    default_blend=DEFAULT_BLEND.to_json(),
                )
                s.add(st)
            await s.commit()
            user_id, comm_id, style_id = user.id, comm.id, st.id
        sha, blob_id = await store_blob(self.rt, None, dataset, "application/zip", BlobKind.DATASET, None)
        async with self.rt.sessions() as s:
            ds = Dataset(community_id=comm_id, created_by=user_id, name=name, blob_id=blob_id, status="uploaded")
            s.add(ds)
            await s.commit()
            ds_id = ds.id
        params = FinetuneParams(
            style_id=style_id, dataset_id=ds_id, steps=steps, style=name, snapshot_every=snapshot_every
        )
        ident = f"finetune:{comm_id}:{name}:{sha}:{steps}" + (f":{snapshot_every}" if snapshot_every != 50 else "")
        key = hashlib.sha256(ident.encode()).hexdigest()
        created = await ledger.create_job(self.rt, NewJob(key, JobKind.FINETUNE, user_id, comm_id, params))
        return JobTicket(created.job_id, created.status.value, duplicate=created.duplicate)

    async def publish_style(self, actor: Actor, place: Place | None, name: str) -> StyleInfo:
        """Admins: a draft style of this community becomes available to its members, and the training of its
        instant model for the blend the community gets is queued (``distill_job_id``; None when one exists)."""
        async with self.rt.sessions() as s:
            user, comm = await require_admin(s, actor, place)
            st = await s.scalar(
                sa.select(StyleModel).where(StyleModel.name == name.strip().lower(), StyleModel.community_id == comm.id)
            )
            if st is None:
                raise NotFoundError(f"this community has no style called {name!r}")
            if st.status != StyleStatus.DRAFT:
                raise ConflictError(f"{name!r} is {st.status.value}; only a finished draft can be published")
            st.status = StyleStatus.PUBLISHED
            spec = await default_spec(s, st, comm)
            await s.commit()
            info, ids = _info(st), (st.id, user.id, comm.id)
        job_id = await auto_distill(self.rt, ids[0], spec, user_id=ids[1], community_id=ids[2], reason="publish")
        return replace(info, distill_job_id=job_id)

    async def set_default_blend(
        self, actor: Actor, place: Place | None, style: str | None, blend: int | str | BlendSpec
    ) -> StyleInfo:
        """Admins: ``blend`` becomes the blend this community gets for ``style``, as a closed poll's winner does
        (the web studio's "publish this blend"). When that changes the blend, the training of its instant model
        is queued (``distill_job_id``; None when nothing was queued). ``default_blend`` is the new blend."""
        spec = parse_blend(blend)
        if spec is None:
            raise BadInputError("name the blend to publish, such as 16 or a blend description")
        async with self.rt.sessions() as s:
            user, comm = await require_admin(s, actor, place)
            st = await resolve_style(s, self.rt.models_dir, style, comm, drafts=True)
            before = await default_spec(s, st, comm)
            chosen = Blend(style_id=st.id, community_id=comm.id, spec=spec.to_json(), created_by=user.id)
            chosen.label = f"chosen: {spec.describe()}"[:64]
            s.add(chosen)
            await s.flush()
            await s.execute(
                sa.update(Blend)
                .where(Blend.style_id == st.id, Blend.community_id == comm.id)
                .values(is_default=Blend.id == chosen.id)
            )
            await s.commit()
            info, ids = replace(_info(st), default_blend=spec.to_json()), (st.id, user.id, comm.id)
        if spec == before:
            return info
        job_id = await auto_distill(self.rt, ids[0], spec, user_id=ids[1], community_id=ids[2], reason="studio")
        return replace(info, distill_job_id=job_id)

    @names_redis
    async def start_distill(
        self,
        actor: Actor,
        place: Place | None,
        style: str | None = None,
        blend: int | str | BlendSpec | None = None,
        kimg: float | None = None,
    ) -> JobTicket:
        """Admins: queue the training of ``style``'s instant model for ``blend`` (default: the blend this
        community gets now). The same style, blend and length is one job while it is queued or running, or done
        with its student still ready."""
        await self.styles_fresh()  # a style added or removed since the last request
        if kimg is not None and not kimg > 0:
            raise BadInputError(f"kimg must be a positive number of thousands of images, not {kimg!r}")
        spec = parse_blend(blend)
        async with self.rt.sessions() as s:
            user, comm = await require_admin(s, actor, place)
            st = await resolve_style(s, self.rt.models_dir, style, comm, drafts=True)
            spec = spec or await default_spec(s, st, comm)
            await s.commit()
            user_id, comm_id = user.id, comm.id
        created = await queue_distill(self.rt, st, spec, user_id=user_id, community_id=comm_id, kimg=kimg)
        return JobTicket(created.job_id, created.status.value, duplicate=created.duplicate)
