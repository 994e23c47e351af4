"""Named styles: a manifest maps a style name to its base, toon and encoder checkpoints and default blend.

The bundled demo models live in ``gan/demo_models/`` with a ``manifest.json``; ``TOONIFY_MODELS_DIR`` points
at another folder laid out the same way (real FFHQ-based models, say), which ``toonify styles add`` writes.
Paths in a manifest are relative to its folder (absolute ones are kept as they are).

The file has a versioned schema (``schema_version``, :data:`SCHEMA_VERSION`; a file without one is read as
version 1, the layout that came before the field). :func:`read_manifest` validates it and parses it into a
:class:`Manifest` once per folder (again only when the file changes); a file that does not fit raises
:class:`ManifestError`, whose message names the field (``styles.disney.blend.resolution: …``). Every writer
goes through :func:`update_manifest`, which validates the result before it atomically replaces the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gan.blending import BlendSpec

DEMO_DIR = Path(__file__).parent / "demo_models"
MODELS_ENV = "TOONIFY_MODELS_DIR"
MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
# The blend used when neither the request, the community nor the style names one.
DEFAULT_BLEND = BlendSpec(mode="swap", resolution=32, structure_from="toon")
# What chat commands can type: `/style Disney` is looked up lower-cased, so a name must be lower case already.
STYLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
log = logging.getLogger("toonify.styles")


class ManifestError(ValueError):
    """A manifest that does not fit the schema; ``field`` is the dotted path of the offending entry."""

    def __init__(self, path: Path | str, field: str, problem: str) -> None:
        self.path, self.field, self.problem = Path(path), field, problem
        super().__init__(f"{path}: {field}: {problem}")


def check_style_name(name: str) -> str:
    if not isinstance(name, str) or not STYLE_NAME.match(name):
        raise ValueError(
            f"style name {name!r} must be 1-32 characters of a-z, 0-9, '-' or '_', starting with a letter or digit "
            "(chat commands look styles up in lower case)"
        )
    return name


class _Fields:
    """Typed reads from one JSON object of the manifest; every error names the field's dotted path."""

    def __init__(self, path: Path, where: str, data: Any) -> None:
        self.path, self.where = path, where
        if not isinstance(data, dict):
            raise ManifestError(path, where or "(top level)", f"must be an object, got {_kind(data)}")
        self.data = data

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str) -> ManifestError:
        return ManifestError(self.path, self.name(key), problem)

    def text(self, key: str, *, required: bool = False, nullable: bool = True) -> str | None:
        if key not in self.data or (self.data[key] is None and nullable and not required):
            if required:
                raise self.fail(key, "is required")
            return None
        v = self.data[key]
        if not isinstance(v, str) or not v.strip():
            raise self.fail(key, f"must be a non-empty string, got {_kind(v)}")
        return v

    def blend(self, key: str) -> BlendSpec | None:
        if key not in self.data:
            return None
        v = self.data[key]
        if not isinstance(v, dict):
            raise self.fail(key, f"must be an object like {DEFAULT_BLEND.to_json()}, got {_kind(v)}")
        try:
            return BlendSpec.from_json(v)
        except (ValueError, TypeError) as e:
            # BlendSpec's messages start with the field they reject ("resolution must be …"): point at it
            first = re.split(r"[ =:']", str(e).removeprefix("mode='smooth' needs a finite "), maxsplit=1)[0]
            where = f"{self.name(key)}.{first}" if first in _BLEND_FIELDS else self.name(key)
            raise ManifestError(self.path, where, str(e)) from None

    def objects(self, key: str) -> list[_Fields]:
        v = self.data.get(key, [])
        if not isinstance(v, list):
            raise self.fail(key, f"must be a list, got {_kind(v)}")
        return [_Fields(self.path, f"{self.name(key)}[{i}]", item) for i, item in enumerate(v)]


_BLEND_FIELDS = ("mode", "structure_from", "resolution", "level", "width", "weights")


def _kind(v: Any) -> str:
    return "null" if v is None else f"{type(v).__name__} {json.dumps(v)[:40]}" if not isinstance(v, dict) else "object"


def _at(directory: Path, rel: str | None) -> Path | None:
    return None if rel is None else directory / rel  # an absolute rel stays absolute


def relative_to(path: str | Path, directory: Path) -> str:
    """``path`` as the manifest stores it: relative to ``directory`` when inside it, else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path(directory).resolve()))
    except ValueError:
        return str(Path(path).resolve())


@dataclass(frozen=True)
class StudentEntry:
    """An instant (distilled) model listed for a style: its file and the blend it renders."""

    file: Path
    blend: BlendSpec
    raw: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    @classmethod
    def from_json(cls, d: dict[str, Any], directory: Path) -> StudentEntry:
        f = _Fields(directory / MANIFEST, "student", d)
        return cls._parse(f, directory)

    @classmethod
    def _parse(cls, f: _Fields, directory: Path) -> StudentEntry:
        blend = f.blend("blend")
        if blend is None:
            raise f.fail("blend", "is required")
        return cls(file=directory / str(f.text("file", required=True)), blend=blend, raw=MappingProxyType(dict(f.data)))

    @classmethod
    def for_student(cls, path: Path, student: Any, directory: Path) -> StudentEntry:
        """The entry for a just-written student (``gan.distill.Student``), its file relative to ``directory``."""
        lineage, meta = student.lineage, student.meta
        raw = {"file": relative_to(path, directory), "blend": lineage.blend, "base_hash": lineage.base_hash,
               "toon_hash": lineage.toon_hash, "content_hash": meta.get("content_hash"),
               "command": meta.get("command", []), "kimg": meta.get("training", {}).get("kimg"),
               "final_losses": meta.get("final_losses", {})}  # fmt: skip
        return cls(file=Path(path), blend=lineage.spec, raw=MappingProxyType(raw))


@dataclass(frozen=True)
class Style:
    name: str
    base: Path
    toon: Path
    encoder: Path | None
    blend: BlendSpec
    students: tuple[StudentEntry, ...] = ()
    directions: Path | None = None
    raw: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    def student_for(self, spec: BlendSpec | None = None) -> StudentEntry | None:
        """The instant model listed for ``spec`` (default: the style's blend), if any."""
        spec = spec or self.blend
        return next((s for s in self.students if s.blend.key() == spec.key()), None)

    def files(self) -> dict[str, Path]:
        """Every file the style names (base, toon, encoder, directions, students), by role."""
        out = {"base": self.base, "toon": self.toon}
        if self.encoder is not None:
            out["encoder"] = self.encoder
        if self.directions is not None:
            out["directions"] = self.directions
        out.update({f"student {s.blend.key()}": s.file for s in self.students})
        return out


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``: absolute paths, each style with its own base/encoder resolved.

    ``base``/``encoder`` at the top are the folder's default base (community fine-tunes start from it); a style
    may name its own base, and then the top-level encoder is not its encoder (it was trained for another base)."""

    directory: Path
    base: Path | None
    encoder: Path | None
    default_style: str | None
    styles: MappingProxyType[str, Style]
    raw: MappingProxyType[str, Any] = field(repr=False)  # everything else the file records (timings, metrics…)
    schema_version: int = SCHEMA_VERSION

    def style(self, name: str | None = None) -> Style:
        """The named style (default: ``default_style``, else the first one)."""
        name = name or self.default_style or next(iter(self.styles), None)
        if name not in self.styles:
            raise ValueError(f"unknown style {name!r}; available: {', '.join(sorted(self.styles)) or 'none'}")
        return self.styles[name]

    def style_for_toon(self, toon: Path, name: str | None = None) -> Style | None:
        """The style whose toon checkpoint is ``toon`` (the backend stores that path), if any; where several
        styles list that file (one toon, two default blends), the one called ``name``."""
        target = Path(toon).resolve()
        found = [s for s in self.styles.values() if s.toon.resolve() == target]
        return next((s for s in found if s.name == name), found[0] if found else None)

    def models_for(self, toon: Path | None, name: str | None = None) -> tuple[Path | None, Path | None]:
        """(base, encoder) that ``toon`` renders with: those of its style here (``name`` picks between styles
        sharing the file), else the folder's top-level ones (community fine-tunes start from that base)."""
        listed = self.style_for_toon(toon, name) if toon is not None else None
        return (listed.base, listed.encoder) if listed is not None else (self.base, self.encoder)

    @classmethod
    def from_json(cls, data: Any, directory: Path) -> Manifest:
        """Validate ``data`` against the schema (ManifestError naming the field) and resolve its paths."""
        directory = Path(directory)
        top = _Fields(directory / MANIFEST, "", data)
        version = data.get("schema_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise top.fail("schema_version", f"must be a whole number >= 1, got {_kind(version)}")
        if version > SCHEMA_VERSION:
            raise top.fail("schema_version", f"is {version}, newer than this toonify reads ({SCHEMA_VERSION}); "
                                             "upgrade toonify")  # fmt: skip
        base, encoder = top.text("base"), top.text("encoder")
        default = top.text("default_style")
        raw_styles = data.get("styles", {})
        if not isinstance(raw_styles, dict):
            raise top.fail("styles", f"must be an object of name -> style, got {_kind(raw_styles)}")
        styles = {}
        for name, entry in raw_styles.items():
            if not STYLE_NAME.match(name):
                raise top.fail(f"styles.{name}", "a style name must be 1-32 characters of a-z, 0-9, '-' or '_'")
            f = _Fields(top.path, f"styles.{name}", entry)
            style_base = f.text("base") or base
            if style_base is None:
                raise f.fail("base", "is required (here, or as the manifest's top-level base)")
            own = f.text("encoder")
            # The top-level encoder was trained for the top-level base: another base cannot use it.
            style_encoder = own if "encoder" in entry else (encoder if style_base == base else None)
            styles[name] = Style(
                name=name,
                base=directory / style_base,
                toon=directory / str(f.text("toon", required=True)),
                encoder=_at(directory, style_encoder),
                blend=f.blend("blend") or DEFAULT_BLEND,
                students=tuple(StudentEntry._parse(s, directory) for s in f.objects("students")),
                directions=_at(directory, f.text("directions")),
                raw=MappingProxyType(dict(entry)),
            )
        if default is not None and default not in styles:
            raise top.fail(
                "default_style", f"names {default!r}, which is not among the styles ({', '.join(styles) or 'none'})"
            )
        return cls(
            directory=directory,
            base=_at(directory, base),
            encoder=_at(directory, encoder),
            default_style=default,
            styles=MappingProxyType(styles),
            raw=MappingProxyType(data),
            schema_version=version,
        )


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or DEMO_DIR)


_cache: dict[Path, tuple[tuple[int, int], Manifest]] = {}
_cache_lock = threading.RLock()  # this process's writers and the cache; other processes: the file lock below


def read_manifest(directory: Path | None = None) -> Manifest:
    """The folder's manifest, validated, parsed once and reused until the file's mtime or size changes."""
    path = (directory or models_dir()) / MANIFEST
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no model manifest at {path}; set {MODELS_ENV} to a folder with {MANIFEST} "
            "(`toonify styles add` makes one), or pass --base and --toon checkpoints"
        ) from None
    stamp = (st.st_mtime_ns, st.st_size)
    with _cache_lock:
        hit = _cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    manifest = Manifest.from_json(_parse_json(path), path.parent)
    with _cache_lock:
        _cache[path] = (stamp, manifest)
    return manifest


_last_good: dict[Path, Manifest] = {}


def serving_manifest(directory: Path | None = None) -> Manifest:
    """For long-running services: the folder's manifest, or, while the file is broken (an operator mid-edit),
    the last one that parsed in this process, with a warning, so a running bot keeps its styles. A folder never
    read well raises the error."""
    directory = Path(directory or models_dir())
    try:
        manifest = _last_good[directory] = read_manifest(directory)
    except ManifestError as e:
        if directory not in _last_good:
            raise
        log.warning("model manifest is broken, serving the last good one: %s", e)
        manifest = _last_good[directory]
    return manifest


def _parse_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(path, f"line {e.lineno} column {e.colno}", f"not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ManifestError(path, "(file)", "not UTF-8 text") from None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Writers in this process (the lock) and in other processes (flock on a side file) take turns."""
    directory.mkdir(parents=True, exist_ok=True)
    with _cache_lock, open(directory / f".{MANIFEST}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_manifest(
    directory: Path | None, change: Callable[[dict[str, Any]], None], *, create: bool = False
) -> Manifest:
    """Apply ``change`` to the folder's manifest JSON and write it back atomically, after validating the result
    (a change that would leave an invalid manifest raises ManifestError and writes nothing). ``create``: start
    from an empty manifest when the folder has none."""
    directory = Path(directory or models_dir())
    path = directory / MANIFEST
    with _locked(directory):
        if path.exists():
            data = _parse_json(path)
            Manifest.from_json(data, directory)  # refuse to build on a broken file: the operator fixes it first
        elif create:
            data = {"schema_version": SCHEMA_VERSION, "styles": {}}
        else:
            raise FileNotFoundError(f"no model manifest at {path}")
        change(data)
        data["schema_version"] = SCHEMA_VERSION
        manifest = Manifest.from_json(data, directory)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)  # readers see the old manifest or the new one, never half of one
    return manifest


def _style_entry(data: dict[str, Any], directory: Path, style: str) -> dict[str, Any]:
    entry = data.get("styles", {}).get(style)
    if not isinstance(entry, dict):
        raise ValueError(f"the manifest in {directory} has no style {style!r}")
    return entry


def add_student_to_manifest(directory: Path, style: str, entry: StudentEntry) -> None:
    """List ``entry`` under ``style`` in ``directory``'s manifest (replacing one for the same blend), atomically."""

    def change(data: dict[str, Any]) -> None:
        st = _style_entry(data, directory, style)
        kept = [s for s in st.get("students", []) if BlendSpec.from_json(s["blend"]).key() != entry.blend.key()]
        st["students"] = [*kept, dict(entry.raw)]

    update_manifest(directory, change)


def set_style_file(directory: Path | None, style: str, key: str, path: str | Path) -> Path:
    """Point ``styles.<style>.<key>`` (directions, encoder …) at ``path``, stored relative to the folder."""
    directory = Path(directory or models_dir())
    rel = relative_to(path, directory)

    def change(data: dict[str, Any]) -> None:
        _style_entry(data, directory, style)[key] = rel

    update_manifest(directory, change)
    return directory / rel


def load_manifest(directory: Path | None = None) -> dict:
    """The manifest's raw JSON (see :func:`read_manifest` for the typed, cached form)."""
    return dict(read_manifest(directory).raw)


def get_style(name: str | None = None, directory: Path | None = None) -> Style:
    """The named style (default: the manifest's ``default_style``)."""
    return read_manifest(directory).style(name)
