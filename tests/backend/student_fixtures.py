"""Tiny student networks trained on the bundled demo models, for the instant-mode tests (seconds, not minutes),
and a way to record one as a style's student without the worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from backend.db.models import Student, StyleModel
from backend.jobs import blend_key
from backend.service import ToonService
from gan.blending import BlendSpec
from gan.styles import DEMO_DIR, read_manifest

TINY = {"kimg": 0.008, "batch_size": 4, "channels": 8, "max_channels": 16, "res_blocks": 1, "snapshot_kimg": 1.0}


def train_tiny_student(out: Path, spec: BlendSpec | None = None) -> Path:
    """Two training steps of a small student for the demo style at ``spec`` (default: the style's blend)."""
    from gan.checkpoints import load_generator
    from gan.distill import DistillConfig, save_student, train_student

    style = read_manifest(DEMO_DIR).style()
    base, toon = load_generator(style.base, "cpu"), load_generator(style.toon, "cpu")
    student = train_student(base, toon, spec or style.blend, DistillConfig(**TINY))
    return save_student(student, out)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny student for the demo style at its own blend."""
    return train_tiny_student(tmp_path_factory.mktemp("student") / "demo_swap32.safetensors")


def demo_models_without_students(dest: Path) -> Path:
    """A copy of the bundled demo models whose manifest lists no student: the demo style projects until a test
    records one (the bundled copy ships an instant model for its blend)."""
    import json
    import shutil

    shutil.copytree(DEMO_DIR, dest, ignore=shutil.ignore_patterns("students", "previews"))
    manifest = json.loads((dest / "manifest.json").read_text())
    for style in manifest["styles"].values():
        style.pop("students", None)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


async def record_student(svc: ToonService, path: Path, spec: BlendSpec, *, style: str = "demo") -> int:
    """Record ``path`` as the global ``style``'s student for ``spec`` (what a finished distill job writes)."""
    from gan.distill import read_student_lineage

    lineage = read_student_lineage(path)
    async with svc.rt.sessions() as s:
        st = await s.scalar(sa.select(StyleModel).where(StyleModel.name == style, StyleModel.community_id.is_(None)))
        # one student per style and blend: this one replaces any (the demo style ships its own for its blend)
        await s.execute(sa.delete(Student).where(Student.style_id == st.id, Student.blend_key == blend_key(spec)))
        row = Student(
            style_id=st.id,
            blend=spec.to_json(),
            blend_key=blend_key(spec),
            path=str(path),
            base_hash=lineage.base_hash,
            toon_hash=lineage.toon_hash,
        )
        s.add(row)
        await s.commit()
        return row.id
