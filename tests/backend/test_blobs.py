"""The content-addressed blob store, and expiry of Blob rows together with their files."""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from backend.blobs import BlobNotFoundError, BlobStore, BlobTooLargeError, expire_blobs
from backend.db.models import Blob, BlobKind, Job, JobKind, Platform, User, utcnow


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs", max_bytes=1000)


def test_put_read_exists_delete(store: BlobStore) -> None:
    data = b"selfie bytes"
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.path(sha) == store.root / sha[:2] / sha[2:4] / sha
    assert store.exists(sha) and store.read(sha) == data
    assert store.delete(sha) is True
    assert not store.exists(sha) and store.delete(sha) is False
    with pytest.raises(BlobNotFoundError):
        store.read(sha)
    with pytest.raises(FileNotFoundError):  # BlobNotFoundError is one
        store.read(sha)


def test_put_is_idempotent_and_leaves_no_temporary_files(store: BlobStore) -> None:
    sha = store.put(b"x" * 10)
    os.utime(store.path(sha), (1_000_000, 1_000_000))
    assert store.put(bytearray(b"x" * 10)) == sha
    assert store.mtime(sha) > 1_000_000  # a second put refreshes the mtime (see expire_blobs' grace period)
    assert store.put(memoryview(b"y")) == hashlib.sha256(b"y").hexdigest()
    files = sorted(p.name for p in store.root.rglob("*") if p.is_file())
    assert files == sorted([sha, hashlib.sha256(b"y").hexdigest()])
    assert store.read(sha) == b"x" * 10


def test_too_large_is_refused_before_writing(store: BlobStore) -> None:
    assert store.put(b"z" * 1000)  # exactly the limit is fine
    with pytest.raises(BlobTooLargeError, match="1001 bytes") as info:
        store.put(b"z" * 1001)
    assert (info.value.size, info.value.max_bytes) == (1001, 1000)
    assert isinstance(info.value, ValueError)
    assert not store.exists(hashlib.sha256(b"z" * 1001).hexdigest())


@pytest.mark.parametrize("bad", ["../" * 21 + "etc", "A" * 64, "a" * 63, "g" * 64, ""])
def test_only_sha256_digests_name_blobs(store: BlobStore, bad: str) -> None:
    with pytest.raises(ValueError, match="sha256"):
        store.path(bad)
    with pytest.raises(ValueError):
        store.read(bad)


def test_a_failed_put_leaves_nothing_behind(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails before the rename (here: the disk refuses fsync) leaves no blob and no temporary file."""

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        store.put(b"half")
    monkeypatch.undo()
    sha = hashlib.sha256(b"half").hexdigest()
    assert not store.exists(sha)
    assert [p for p in store.root.rglob("*") if p.is_file()] == []
    assert store.put(b"half") == sha and store.read(sha) == b"half"


async def _blob(session: AsyncSession, owner: User | None, sha: str, expires_in: timedelta | None) -> Blob:
    row = Blob(
        sha256=sha,
        owner_user_id=owner.id if owner else None,
        size=1,
        media_type="image/png",
        kind=BlobKind.SELFIE,
        expires_at=utcnow() + expires_in if expires_in is not None else None,
    )
    session.add(row)
    await session.flush()
    return row


@pytest.mark.asyncio
async def test_expire_blobs_removes_rows_then_unreferenced_files(session: AsyncSession, tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", max_bytes=1000)
    alice = User(platform=Platform.DISCORD, platform_user_id="a")
    bob = User(platform=Platform.DISCORD, platform_user_id="b")
    session.add_all([alice, bob])
    await session.flush()
    solo, shared, kept, system = (store.put(x) for x in (b"solo", b"shared", b"kept", b"system"))
    hour, week = timedelta(hours=1), timedelta(days=7)
    solo_row = await _blob(session, alice, solo, hour)
    await _blob(session, alice, shared, hour)
    await _blob(session, bob, shared, week)  # Bob's copy of the same bytes lives longer
    await _blob(session, alice, kept, week)
    await _blob(session, None, system, None)  # never expires
    job = Job(key="j", kind=JobKind.TOON, user_id=alice.id, input_blob_id=solo_row.id)
    session.add(job)
    await session.commit()

    assert await expire_blobs(session, store, utcnow()) == (0, 0)  # nothing due yet

    result = await expire_blobs(session, store, utcnow() + 2 * hour)
    assert (result.rows, result.files) == (2, 1)
    assert not store.exists(solo)
    assert store.exists(shared) and store.exists(kept) and store.exists(system)
    remaining = (await session.execute(sa.select(Blob.sha256, Blob.owner_user_id))).all()
    assert sorted(remaining, key=lambda r: r.sha256) == sorted(
        [(shared, bob.id), (kept, alice.id), (system, None)], key=lambda r: r[0]
    )
    session.expunge_all()
    assert (await session.get(Job, job.id)).input_blob_id is None

    assert await expire_blobs(session, store, utcnow() + 2 * hour) == (0, 0)  # idempotent
    result = await expire_blobs(session, store, utcnow() + 2 * week)
    assert (result.rows, result.files) == (2, 2)
    assert not store.exists(shared) and not store.exists(kept) and store.exists(system)


@pytest.mark.asyncio
async def test_expire_blobs_spares_a_file_just_put_again(session: AsyncSession, tmp_path: Path) -> None:
    """A file re-put moments ago may belong to a row not committed yet: the grace period keeps it."""
    store = BlobStore(tmp_path / "blobs", max_bytes=1000)
    user = User(platform=Platform.CLI, platform_user_id="u")
    session.add(user)
    await session.flush()
    sha = store.put(b"again")
    await _blob(session, user, sha, timedelta(seconds=-1))
    await session.commit()

    assert await expire_blobs(session, store, utcnow(), grace_s=300) == (1, 0)
    assert store.exists(sha)
