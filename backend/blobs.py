"""Content-addressed file store for selfies, results, datasets and checkpoints.

A blob's name is the sha256 of its bytes, so storing the same selfie twice costs nothing and a name can be
trusted to mean one content forever. Files are written atomically (temporary file, fsync, rename), so a reader
never sees half a blob even if the writer dies. The store is files only: ownership and expiry live in the
`blobs` table (backend.db.models.Blob), and `expire_blobs` ties the two together.

Protocol for writers: commit the Blob row, then `put` the bytes (the service does: a failure between the two
leaves a row without a file, which expiry removes, never a file that no row accounts for). `put` refreshes the
file's mtime, and `expire_blobs` leaves alone files touched within its grace period, so a sweep that runs
between the two steps cannot delete a file in use; writers that `put` first are covered by the same grace.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db.models import Blob, utcnow

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 500  # ids / hashes per IN (...) clause


class BlobTooLargeError(ValueError):
    """The data is bigger than the store accepts (max_upload_bytes)."""

    def __init__(self, size: int, max_bytes: int) -> None:
        super().__init__(f"blob of {size} bytes is over the {max_bytes}-byte limit")
        self.size = size
        self.max_bytes = max_bytes


class BlobNotFoundError(FileNotFoundError):
    """No file for this sha256 (never stored, or expired)."""


class BlobStore:
    """Blobs as files `root/ab/cd/<sha256>`; two levels of fan-out keep directories small."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def path(self, sha: str) -> Path:
        """Where the blob with this sha256 lives (whether or not it exists). Rejects anything but 64 lowercase
        hex digits, so a hash taken from a request can never name a path outside the store."""
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return self.root / sha[:2] / sha[2:4] / sha

    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Store `data` and return its sha256. Idempotent: storing existing content rewrites nothing (it only
        refreshes the file's mtime, see the module docstring). Raises BlobTooLargeError over max_bytes."""
        view = memoryview(data)
        if view.nbytes > self.max_bytes:
            raise BlobTooLargeError(view.nbytes, self.max_bytes)
        sha = hashlib.sha256(view).hexdigest()
        dest = self.path(sha)
        try:
            os.utime(dest)
            return sha
        except FileNotFoundError:
            pass
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(view)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)
        return sha

    def read(self, sha: str) -> bytes:
        """The blob's bytes; BlobNotFoundError when absent."""
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(f"no blob {sha}") from None

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def delete(self, sha: str) -> bool:
        """Remove the file; True if there was one. Callers decide when no row needs it any more."""
        try:
            self.path(sha).unlink()
        except FileNotFoundError:
            return False
        return True

    def mtime(self, sha: str) -> float | None:
        """Last write or `put` of this blob (POSIX seconds), None when absent."""
        try:
            return self.path(sha).stat().st_mtime
        except FileNotFoundError:
            return None


class ExpireResult(NamedTuple):
    rows: int  # Blob rows deleted
    files: int  # files removed (no row referenced their sha256 any more)


async def expire_blobs(
    session: AsyncSession, store: BlobStore, now: datetime | None = None, *, grace_s: float = 300.0
) -> ExpireResult:
    """Delete Blob rows whose expires_at has passed, commit, then remove the files no remaining row references.

    A file stays while any row (another owner's, or one without expiry) still has its sha256, and while it was
    written or re-put less than `grace_s` seconds before `now` (its row may not be committed yet). Files are
    removed only after the commit, so a failed transaction never leaves rows without files. Safe to run
    concurrently with itself.
    """
    now = now or utcnow()
    expired = (await session.execute(sa.select(Blob.id, Blob.sha256).where(Blob.expires_at <= now))).all()
    if not expired:
        return ExpireResult(0, 0)
    ids = [row.id for row in expired]
    shas = sorted({row.sha256 for row in expired})
    deleted = 0
    for chunk in _chunks(ids):
        result = await session.execute(
            sa.delete(Blob).where(Blob.id.in_(chunk)).execution_options(synchronize_session=False)
        )
        deleted += result.rowcount or 0
    still_used: set[str] = set()
    for chunk in _chunks(shas):
        still_used.update((await session.execute(sa.select(Blob.sha256).where(Blob.sha256.in_(chunk)))).scalars())
    await session.commit()

    cutoff = now.timestamp() - grace_s
    files = 0
    for sha in shas:
        if sha in still_used:
            continue
        mtime = store.mtime(sha)
        if mtime is not None and mtime <= cutoff and store.delete(sha):
            files += 1
    return ExpireResult(deleted, files)


def copy_atomic(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` through a temporary file and a rename: readers never see half a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def _chunks(items: list, size: int = _CHUNK) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
