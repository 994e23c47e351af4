"""The SQL models on real SQLite and real PostgreSQL: constraints, cascades, value round trips."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from backend.db import async_url, make_engine, make_sessionmaker
from backend.db.models import (
    Blend,
    Blob,
    BlobKind,
    CachedLatent,
    Community,
    Dataset,
    Job,
    JobKind,
    JobStatus,
    Membership,
    Platform,
    Poll,
    PollOption,
    Role,
    StyleModel,
    User,
    Vote,
    utcnow,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


async def count(session: AsyncSession, model: type) -> int:
    return (await session.execute(sa.select(sa.func.count()).select_from(model))).scalar_one()


async def seed(session: AsyncSession) -> dict:
    """Two users in one community, a style with two blends, an open poll, one vote, a job, blobs, a latent."""
    alice = User(platform=Platform.DISCORD, platform_user_id="1", display_name="Alice")
    bob = User(platform=Platform.TELEGRAM, platform_user_id="1", display_name="Bob")
    guild = Community(platform=Platform.DISCORD, platform_community_id="g1", name="Guild")
    session.add_all([alice, bob, guild])
    await session.flush()
    session.add_all(
        [
            Membership(user_id=alice.id, community_id=guild.id, role=Role.ADMIN),
            Membership(user_id=bob.id, community_id=guild.id),
        ]
    )
    style = StyleModel(
        name="cartoon",
        community_id=guild.id,
        checkpoint_path="styles/cartoon.safetensors",
        lineage=["0" * 64],
        default_blend={"mode": "swap", "resolution": 32},
        created_by=alice.id,
    )
    session.add(style)
    await session.flush()
    blends = [Blend(style_id=style.id, community_id=guild.id, spec={"resolution": r}, label=str(r)) for r in (16, 32)]
    session.add_all(blends)
    await session.flush()
    poll = Poll(community_id=guild.id, style_id=style.id, created_by=alice.id, closes_at=utcnow() + timedelta(days=1))
    poll.options = [PollOption(blend_id=b.id, position=i) for i, b in enumerate(blends)]
    session.add(poll)
    await session.flush()
    selfie = Blob(sha256=SHA_A, owner_user_id=alice.id, size=3, media_type="image/png", kind=BlobKind.SELFIE)
    shared = Blob(sha256=SHA_A, owner_user_id=bob.id, size=3, media_type="image/png", kind=BlobKind.SELFIE)
    session.add_all([selfie, shared])
    await session.flush()
    vote = Vote(poll_id=poll.id, user_id=alice.id, option_id=poll.options[0].id)
    job = Job(key="k-alice", kind=JobKind.TOON, user_id=alice.id, community_id=guild.id, input_blob_id=selfie.id)
    bob_job = Job(key="k-bob", kind=JobKind.TOON, user_id=bob.id, community_id=guild.id, input_blob_id=selfie.id)
    latent = CachedLatent(user_id=alice.id, image_sha256=SHA_A, base_hash=SHA_B, mode="w+", data=b"\x00\x01")
    dataset = Dataset(community_id=guild.id, created_by=alice.id, name="ds", blob_id=selfie.id, status="ready")
    session.add_all([vote, job, bob_job, latent, dataset])
    await session.commit()
    return dict(
        alice=alice, bob=bob, guild=guild, style=style, blends=blends, poll=poll, vote=vote, job=job,
        bob_job=bob_job, selfie=selfie, shared=shared, dataset=dataset,
    )  # fmt: skip


@pytest.mark.asyncio
async def test_round_trips(session: AsyncSession) -> None:
    s = await seed(session)
    session.expunge_all()
    alice = await session.get(User, s["alice"].id)
    assert alice.platform is Platform.DISCORD and alice.created_at.tzinfo is not None
    assert alice.created_at.utcoffset() == timedelta(0)
    assert abs(alice.created_at - utcnow()) < timedelta(minutes=5)
    job = await session.get(Job, s["job"].id)
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert (job.status, job.attempts, job.cancel_requested, job.params) == (JobStatus.QUEUED, 0, False, {})
    style = await session.get(StyleModel, s["style"].id)
    assert style.lineage == ["0" * 64] and style.default_blend == {"mode": "swap", "resolution": 32}
    latent = (await session.execute(sa.select(CachedLatent))).scalar_one()
    assert latent.data == b"\x00\x01"
    # enums are stored as their values, so SQL written by hand (and PostgreSQL and SQLite) agree
    raw = (await session.execute(sa.text("SELECT platform FROM users WHERE id = :i"), {"i": alice.id})).scalar_one()
    assert raw == "discord"
    # aware datetimes in any zone are stored as UTC and compare correctly in SQL
    later = datetime(2030, 1, 1, 12, tzinfo=timezone(timedelta(hours=5)))
    job.finished_at = later
    await session.commit()
    session.expunge_all()
    assert (await session.get(Job, s["job"].id)).finished_at == later
    hits = await session.execute(sa.select(Job.id).where(Job.finished_at > datetime(2030, 1, 1, 6, 59, tzinfo=UTC)))
    assert hits.scalars().all() == [s["job"].id]
    poll = await session.get(Poll, s["poll"].id)
    assert [o.position for o in await poll.awaitable_attrs.options] == [0, 1]


@pytest.mark.asyncio
async def test_naive_datetimes_are_refused(session: AsyncSession) -> None:
    s = await seed(session)
    job = await session.get(Job, s["job"].id)
    job.started_at = datetime(2030, 1, 1)
    with pytest.raises(StatementError, match="naive datetime"):
        await session.commit()


@pytest.mark.asyncio
async def test_unique_constraints(session: AsyncSession) -> None:
    s = await seed(session)
    duplicates = [
        User(platform=Platform.DISCORD, platform_user_id="1"),
        Community(platform=Platform.DISCORD, platform_community_id="g1"),
        Membership(user_id=s["alice"].id, community_id=s["guild"].id),
        Blob(sha256=SHA_A, owner_user_id=s["alice"].id, size=3, media_type="image/png", kind=BlobKind.RESULT),
        StyleModel(name="cartoon", community_id=s["guild"].id, checkpoint_path="x"),
        PollOption(poll_id=s["poll"].id, blend_id=s["blends"][1].id, position=0),
        Job(key="k-alice", kind=JobKind.REBLEND, user_id=s["bob"].id),
        CachedLatent(user_id=s["alice"].id, image_sha256=SHA_A, base_hash=SHA_B, mode="w+", data=b""),
    ]
    for row in duplicates:
        session.add(row)
        with pytest.raises(IntegrityError):
            await session.flush()
        await session.rollback()
    # the same platform id on another platform is another user
    session.add(User(platform=Platform.CLI, platform_user_id="1"))
    await session.commit()


@pytest.mark.asyncio
async def test_one_vote_per_member_per_poll_and_it_can_change(session: AsyncSession) -> None:
    s = await seed(session)
    poll_id, alice_id, bob_id = s["poll"].id, s["alice"].id, s["bob"].id
    first, second = (o.id for o in s["poll"].options)
    session.add(Vote(poll_id=poll_id, user_id=alice_id, option_id=second))
    with pytest.raises(IntegrityError):
        await session.commit()
    await session.rollback()

    vote = (
        await session.execute(sa.select(Vote).where(Vote.poll_id == poll_id, Vote.user_id == alice_id))
    ).scalar_one()
    before = vote.updated_at
    vote.option_id = second
    await session.commit()
    session.expunge_all()
    votes = (await session.execute(sa.select(Vote).where(Vote.poll_id == poll_id))).scalars().all()
    assert [(v.user_id, v.option_id) for v in votes] == [(alice_id, second)]
    assert votes[0].updated_at >= before
    # another member votes too
    session.add(Vote(poll_id=poll_id, user_id=bob_id, option_id=first))
    await session.commit()
    assert await count(session, Vote) == 2


@pytest.mark.asyncio
async def test_deleting_a_user_deletes_what_is_theirs(session: AsyncSession) -> None:
    s = await seed(session)
    alice, bob = s["alice"], s["bob"]
    await session.execute(sa.delete(User).where(User.id == alice.id))
    await session.commit()
    session.expunge_all()

    assert (await session.execute(sa.select(Membership.user_id))).scalars().all() == [bob.id]
    assert await count(session, Vote) == 0
    assert await count(session, CachedLatent) == 0
    assert (await session.execute(sa.select(Blob.owner_user_id))).scalars().all() == [bob.id]
    assert (await session.execute(sa.select(Job.user_id))).scalars().all() == [bob.id]
    # what the community owns stays, with the creator forgotten; Bob's job lost its input (Alice's blob row)
    style = await session.get(StyleModel, s["style"].id)
    assert style is not None and style.created_by is None
    assert (await session.get(Poll, s["poll"].id)).created_by is None
    assert (await session.get(Job, s["bob_job"].id)).input_blob_id is None
    dataset = await session.get(Dataset, s["dataset"].id)
    assert (dataset.created_by, dataset.blob_id) == (None, None)


@pytest.mark.asyncio
async def test_orm_delete_relies_on_the_database_cascade(session: AsyncSession) -> None:
    s = await seed(session)
    alice = await session.get(User, s["alice"].id)
    assert len(await alice.awaitable_attrs.memberships) == 1
    await session.delete(alice)
    await session.commit()
    assert await count(session, User) == 1 and await count(session, Membership) == 1


@pytest.mark.asyncio
async def test_deleting_a_community_or_poll_option(session: AsyncSession) -> None:
    s = await seed(session)
    await session.execute(sa.delete(PollOption).where(PollOption.id == s["vote"].option_id))
    await session.commit()
    assert await count(session, Vote) == 0  # a vote for a withdrawn option goes with it

    await session.execute(sa.delete(Community).where(Community.id == s["guild"].id))
    await session.commit()
    session.expunge_all()
    for model in (Membership, StyleModel, Blend, Poll, PollOption, Dataset):
        assert await count(session, model) == 0, model
    jobs = (await session.execute(sa.select(Job))).scalars().all()
    assert len(jobs) == 2 and all(j.community_id is None for j in jobs)
    assert await count(session, User) == 2


@pytest.mark.asyncio
async def test_poll_winner_is_forgotten_when_its_blend_goes(session: AsyncSession) -> None:
    s = await seed(session)
    poll = s["poll"]
    poll.winner_blend_id = s["blends"][1].id
    await session.commit()
    await session.execute(sa.delete(Blend).where(Blend.id == s["blends"][1].id))
    await session.commit()
    session.expunge_all()
    poll = await session.get(Poll, poll.id)
    assert poll.winner_blend_id is None
    assert [o.position for o in await poll.awaitable_attrs.options] == [0]


@pytest.mark.asyncio
async def test_sqlite_connections_enforce_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "t.db"
    engine = make_engine(f"sqlite:///{path}")  # the async driver is filled in
    try:
        async with engine.connect() as conn:
            pragmas = [(await conn.exec_driver_sql(f"PRAGMA {p}")).scalar() for p in ("foreign_keys", "journal_mode")]
        assert pragmas == [1, "wal"] and path.is_file()
    finally:
        await engine.dispose()


def test_async_url() -> None:
    assert async_url("postgresql://u@h/db").drivername == "postgresql+asyncpg"
    assert async_url("postgres://u@h/db").drivername == "postgresql+asyncpg"
    assert async_url("sqlite:///x.db").drivername == "sqlite+aiosqlite"
    assert async_url("postgresql+asyncpg://u@h/db").drivername == "postgresql+asyncpg"
    with pytest.raises(ValueError, match="unsupported"):
        async_url("mysql://u@h/db")


@pytest.mark.asyncio
async def test_sessions_keep_attributes_after_commit(engine: AsyncEngine) -> None:
    async with make_sessionmaker(engine)() as session:
        user = User(platform=Platform.CLI, platform_user_id="me")
        session.add(user)
        await session.commit()
    assert user.platform_user_id == "me" and user.id is not None  # no lazy load needed after the session ended
