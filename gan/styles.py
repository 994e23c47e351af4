"""Named styles: a manifest maps a style name to its base, toon and encoder checkpoints and default blend.

The bundled demo models live in ``gan/demo_models/`` with a ``manifest.json``; ``TOONIFY_MODELS_DIR`` points
at another folder laid out the same way (real FFHQ-based models, say). Paths in a manifest are relative to
its folder. :func:`read_manifest` parses it into a :class:`Manifest` once per folder (again only when the file
changes), so callers asking on every request do not re-read the JSON.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gan.blending import BlendSpec

DEMO_DIR = Path(__file__).parent / "demo_models"
MODELS_ENV = "TOONIFY_MODELS_DIR"
# The blend used when neither the request, the community nor the style names one.
DEFAULT_BLEND = BlendSpec(mode="swap", resolution=32, structure_from="toon")


@dataclass(frozen=True)
class StudentEntry:
    """An instant (distilled) model listed for a style: its file and the blend it renders."""

    file: Path
    blend: BlendSpec
    raw: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    @classmethod
    def from_json(cls, d: dict[str, Any], directory: Path) -> StudentEntry:
        return cls(file=directory / d["file"], blend=BlendSpec.from_json(d["blend"]), raw=MappingProxyType(dict(d)))

    @classmethod
    def for_student(cls, path: Path, student: Any, directory: Path) -> StudentEntry:
        """The entry for a just-written student (``gan.distill.Student``), its file relative to ``directory``."""
        try:
            rel = str(Path(path).resolve().relative_to(Path(directory).resolve()))
        except ValueError:
            rel = str(Path(path).resolve())
        lineage, meta = student.lineage, student.meta
        raw = {"file": rel, "blend": lineage.blend, "base_hash": lineage.base_hash, "toon_hash": lineage.toon_hash,
               "content_hash": meta.get("content_hash"), "command": meta.get("command", []),
               "kimg": meta.get("training", {}).get("kimg"), "final_losses": meta.get("final_losses", {})}  # fmt: skip
        return cls(file=Path(path), blend=lineage.spec, raw=MappingProxyType(raw))


@dataclass(frozen=True)
class Style:
    name: str
    base: Path
    toon: Path
    encoder: Path | None
    blend: BlendSpec
    students: tuple[StudentEntry, ...] = ()

    def student_for(self, spec: BlendSpec | None = None) -> StudentEntry | None:
        """The instant model listed for ``spec`` (default: the style's blend), if any."""
        spec = spec or self.blend
        return next((s for s in self.students if s.blend.key() == spec.key()), None)


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``: absolute paths, each style with its own base/encoder resolved."""

    directory: Path
    base: Path | None
    encoder: Path | None
    default_style: str | None
    styles: MappingProxyType[str, Style]
    raw: MappingProxyType[str, Any] = field(repr=False)  # everything else the file records (timings, metrics…)

    def style(self, name: str | None = None) -> Style:
        """The named style (default: ``default_style``, else the first one)."""
        name = name or self.default_style or next(iter(self.styles), None)
        if name not in self.styles:
            raise ValueError(f"unknown style {name!r}; available: {', '.join(sorted(self.styles)) or 'none'}")
        return self.styles[name]

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> Manifest:
        def path(rel: str | None) -> Path | None:
            return directory / rel if rel else None

        styles = {}
        for name, entry in data.get("styles", {}).items():
            encoder = entry.get("encoder", data.get("encoder"))
            styles[name] = Style(
                name=name,
                base=directory / entry.get("base", data.get("base", "")),
                toon=directory / entry["toon"],
                encoder=path(encoder),
                blend=BlendSpec.from_json(entry["blend"]) if "blend" in entry else DEFAULT_BLEND,
                students=tuple(StudentEntry.from_json(st, directory) for st in entry.get("students", [])),
            )
        return cls(
            directory=directory,
            base=path(data.get("base")),
            encoder=path(data.get("encoder")),
            default_style=data.get("default_style"),
            styles=MappingProxyType(styles),
            raw=MappingProxyType(data),
        )


def add_student_to_manifest(directory: Path, style: str, entry: StudentEntry) -> None:
    """List ``entry`` under ``style`` in ``directory``'s manifest (replacing one for the same blend), atomically."""
    path = Path(directory) / "manifest.json"
    with _cache_lock:
        data = json.loads(path.read_text())
        if style not in data.get("styles", {}):
            raise ValueError(f"the manifest in {directory} has no style {style!r}")
        students = [
            st for st in data["styles"][style].get("students", [])
            if BlendSpec.from_json(st["blend"]).key() != entry.blend.key()
        ]  # fmt: skip
        data["styles"][style]["students"] = [*students, dict(entry.raw)]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)  # readers see the old manifest or the new one, never half of one


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or DEMO_DIR)


_cache: dict[Path, tuple[tuple[int, int], Manifest]] = {}
_cache_lock = threading.Lock()


def read_manifest(directory: Path | None = None) -> Manifest:
    """The folder's manifest, parsed once and reused until the file's mtime or size changes."""
    path = (directory or models_dir()) / "manifest.json"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no model manifest at {path}; set {MODELS_ENV} to a folder with manifest.json, "
            "or pass --base and --toon checkpoints"
        ) from None
    stamp = (st.st_mtime_ns, st.st_size)
    with _cache_lock:
        hit = _cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    manifest = Manifest.from_json(json.loads(path.read_text()), path.parent)
    with _cache_lock:
        _cache[path] = (stamp, manifest)
    return manifest


def load_manifest(directory: Path | None = None) -> dict:
    """The manifest's raw JSON (see :func:`read_manifest` for the typed, cached form)."""
    return dict(read_manifest(directory).raw)


def get_style(name: str | None = None, directory: Path | None = None) -> Style:
    """The named style (default: the manifest's ``default_style``)."""
    return read_manifest(directory).style(name)
