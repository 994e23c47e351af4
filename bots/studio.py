"""``toonify studio``: a web studio for a style's latent space, on gradio (the optional extra ``toonify[studio]``).

Choose a style of the model manifest or a fine-tune snapshot (``--checkpoint``, ``--snapshots``); set the swap
level, the smooth width and which model gives the shape, and see seeded faces rendered by the base model (top
row) and by the blended model (bottom row) as you move them; set the first seed and the truncation; move the
style's named directions (``gan.editing``, the file ``toonify directions STYLE --register`` made); see a
style-mixing grid; upload a photo and get its toon with the current settings. Admins publish the blend they
like: it becomes their community's default for the style, as a poll's winner does
(``ToonService.set_default_blend``).

It is never open to anyone by default: it binds 127.0.0.1 unless ``--host`` says otherwise, and every request,
the page, its assets and every event alike, needs the studio's token (``--token`` or ``TOONIFY_STUDIO_TOKEN``; if
neither is given one is made and the address with it is printed once). A browser opens ``/?token=…`` once and
keeps a cookie; API clients send ``Authorization: Bearer <token>``. Publishing also needs the admin token
(``--admin-token`` or ``TOONIFY_STUDIO_ADMIN_TOKEN``); without one, publishing is off.

gradio is imported only when the studio starts, so the rest of ``toonify`` works without the extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from PIL import Image, ImageDraw

from gan.blending import BlendSpec

if TYPE_CHECKING:  # torch and the models load only when the studio runs
    import torch

    from gan.pipeline import Toonifier

TOKEN_ENV = "TOONIFY_STUDIO_TOKEN"
ADMIN_TOKEN_ENV = "TOONIFY_STUDIO_ADMIN_TOKEN"
DEFAULT_PORT = 7860
COOKIE_PREFIX = "toonify_studio_"  # + the port: two studios on one host keep their own cookie
PREVIEW_FACES = 4  # seeds seed … seed+3
MIXING_ROWS = 3  # the style-mixing grid's rows: seeds seed … seed+2
MAX_MIX_COLUMNS = 6
MAX_DIRECTION_SLIDERS = 8  # gradio's components are fixed: this many slots, shown per style
STRENGTH_RANGE = 3.0  # sliders move ±3 σ (a named direction's vector is one σ of sampled W along it)
DISPLAY_SIZE = 128  # faces smaller than this are shown enlarged (the demo models are 64 px)
PHOTO_CACHE = 4  # photos whose projection is kept, so a new blend or edit re-renders without projecting again
MAX_PHOTO_BYTES = 20 << 20
STUDIO_MODES = ("auto", "instant", "balanced", "fast")  # auto: instant where a student serves the blend
PLATFORMS = ("telegram", "discord")

log = logging.getLogger("toonify.studio")


class StudioError(Exception):
    """A request the studio refuses, with a message for the person using it."""


# --------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Source:
    """Something to explore: a style of the manifest, or a fine-tune snapshot paired with the manifest's base."""

    name: str  # what the dropdown shows: the style's name, or "snapshot: <file>"
    base: Path
    toon: Path
    encoder: Path | None
    blend: BlendSpec  # the style's default blend: the controls start there
    style: str | None  # the manifest's style name; None for a snapshot (it cannot be published)
    students: tuple[Path, ...] = ()


@dataclass
class Directions:
    """A source's direction sliders (named directions first, then unnamed components), or why it has none."""

    items: list[Any] = field(default_factory=list)  # gan.editing.NamedDirection
    labels: list[str] = field(default_factory=list)
    note: str = ""


def spec_from_controls(level: int, width: float, structure_from: str = "toon") -> BlendSpec:
    """The blend the controls describe: a hard swap at ``level`` px, or a smooth one when ``width`` > 0."""
    try:
        level = int(level)
        width = float(width or 0.0)
        if width > 0:
            return BlendSpec(mode="smooth", resolution=level, width=width, structure_from=structure_from)
        return BlendSpec(mode="swap", resolution=level, structure_from=structure_from)
    except (TypeError, ValueError) as e:
        raise StudioError(f"that blend is not valid: {e}") from e


def blend_levels(resolution: int) -> list[int]:
    return [2**i for i in range(2, int(math.log2(resolution)) + 1)]


def parse_mix_seeds(text: str) -> list[int]:
    from gan.images import parse_seeds

    try:
        seeds = parse_seeds(str(text or ""))
    except ValueError as e:
        raise StudioError(f"mix seeds: {e} (write them like 10,11 or 10-13)") from e
    if len(seeds) > MAX_MIX_COLUMNS:
        raise StudioError(f"mix seeds: at most {MAX_MIX_COLUMNS} columns, got {len(seeds)}")
    return seeds


def snapshot_files(path: Path) -> list[Path]:
    """A fine-tune's generator snapshots: a run folder (its ``snapshots/``), a folder of them, or one file."""
    path = Path(path)
    if path.is_file():
        return [path]
    folder = path / "snapshots" if (path / "snapshots").is_dir() else path
    if not folder.is_dir():
        raise FileNotFoundError(f"no snapshot file or folder at {path}")
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.endswith(".directions.safetensors"))


def find_sources(models_dir: Path | None = None, checkpoints: list[Path] = ()) -> dict[str, Source]:
    """The manifest's styles, then each snapshot (with the default style's base, encoder and blend)."""
    from gan.styles import read_manifest

    manifest = read_manifest(models_dir)
    sources: dict[str, Source] = {}
    for name, st in manifest.styles.items():
        students = tuple(s.file for s in st.students if s.file.is_file())
        sources[name] = Source(name, st.base, st.toon, st.encoder, st.blend, name, students)
    if checkpoints:
        default = manifest.style()
        for path in checkpoints:
            label = f"snapshot: {path.parent.name}/{path.name}" if path.parent.name == "snapshots" else path.name
            label = label if label.startswith("snapshot") else f"snapshot: {label}"
            sources[label] = Source(label, default.base, Path(path), default.encoder, default.blend, None)
    if not sources:
        raise ValueError(f"the manifest in {manifest.directory} lists no styles and no snapshots were given")
    return sources


def _enlarged(face: Image.Image) -> Image.Image:
    if face.width >= DISPLAY_SIZE:
        return face
    return face.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.BICUBIC)


def face_grid(rows: list[list[Image.Image | None]], labels: list[str] | None = None) -> Image.Image:
    """Faces in rows (None: an empty cell), enlarged for display, with a label at each row's start."""
    cells = [[None if f is None else _enlarged(f) for f in row] for row in rows]
    size = next(f.width for row in cells for f in row if f is not None)
    pad = 4
    columns = max(len(row) for row in cells)
    grid = Image.new("RGB", (columns * (size + pad) + pad, len(cells) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(cells):
        for c, face in enumerate(row):
            if face is not None:
                grid.paste(face, (pad + c * (size + pad), pad + r * (size + pad)))
        if labels and labels[r]:
            # bottom left: the page puts the image's own label over its top left corner
            where = (pad + 3, pad + r * (size + pad) + size - 14)
            draw.text(where, labels[r], fill="white", stroke_width=2, stroke_fill="black")
    return grid


class StudioModels:
    """The generators behind the studio, loaded per source on first use, and everything it renders.

    One lock serialises the torch work: gradio runs events in threads, and on CPU two OpenMP teams on the same
    cores only slow each other down."""

    def __init__(self, sources: dict[str, Source], *, device: str | None = None, models_dir: Path | None = None):
        import torch

        self.sources = sources
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.models_dir = models_dir
        self.lock = threading.Lock()
        self._toonifiers: dict[str, Toonifier] = {}
        self._directions: dict[str, Directions] = {}
        self._photos: OrderedDict[tuple[str, str, str], tuple[Image.Image, list, Any, str]] = OrderedDict()

    def source(self, name: str) -> Source:
        if name not in self.sources:
            raise StudioError(f"there is no style or snapshot called {name!r}; choose one of the list")
        return self.sources[name]

    def toonifier(self, name: str) -> Toonifier:
        """The source's models (base, toon, encoder, students) in a Toonifier, loaded once."""
        if name not in self._toonifiers:
            from gan.checkpoints import CheckpointError
            from gan.pipeline import Toonifier

            src = self.source(name)
            try:
                tf = Toonifier.from_files(src.base, src.toon, encoder_path=src.encoder, device=self.device)
            except (CheckpointError, OSError, ValueError) as e:
                raise StudioError(f"{name}: its models do not load: {e}") from e
            for path in src.students:
                try:
                    from gan.distill import load_student

                    tf.add_student(load_student(path, device=self.device))
                except Exception as e:  # a stale student costs instant mode, not the studio
                    log.warning("%s: instant model %s not used: %s", name, path, e)
            self._toonifiers[name] = tf
        return self._toonifiers[name]

    def resolution(self, name: str) -> int:
        with self.lock:
            return self.toonifier(name).base.resolution

    def directions(self, name: str) -> Directions:
        """The source's direction sliders: the style's directions file checked against its models."""
        if name in self._directions:
            return self._directions[name]
        src = self.source(name)
        found = Directions(note=f"No directions for this {'style' if src.style else 'snapshot'}.")
        if src.style is not None:
            try:
                from gan.editing import DirectionsError, generator_hash, load_style_directions
            except ImportError:  # an older gan.editing without named directions
                found.note = "No directions for this style: this version of gan.editing has no directions files."
            else:
                try:
                    ds = load_style_directions(src.style, self.models_dir)
                except (DirectionsError, FileNotFoundError, ValueError) as e:
                    found.note = f"No directions for this style: {e}."
                else:
                    tf = self.toonifier(name)
                    made_for = {generator_hash(tf.base), generator_hash(tf.toon)}
                    if ds.generator_hash not in made_for:
                        found.note = (
                            f"No directions for this style: its directions file was made for generator "
                            f"{ds.generator_hash[:12]}, not this style's base or toon model; make new ones with "
                            f"`toonify directions {src.style} --register`."
                        )
                    else:
                        found = self._sliders(ds)
        self._directions[name] = found
        return found

    @staticmethod
    def _sliders(ds: Any) -> Directions:
        items = [ds.named[k] for k in sorted(ds.named)][:MAX_DIRECTION_SLIDERS]
        labels = [d.name for d in items]
        named_components = {d.index for d in items if d.index is not None}
        for i in range(len(ds)):
            if len(items) >= MAX_DIRECTION_SLIDERS:
                break
            if i not in named_components:
                items.append(ds.component(i))
                labels.append(f"{ds.method} component #{i} (unnamed)")
        if not items:
            return Directions(note="No directions for this style: its directions file holds none.")
        named = len(ds.named)
        note = f"{named} named direction{'s' * (named != 1)}" + (
            f", then unnamed {ds.method} components (name one: `toonify name-direction STYLE INDEX NAME`)"
            if len(items) > min(named, MAX_DIRECTION_SLIDERS)
            else ""
        )
        return Directions(items, labels, note + "; the sliders move in standard deviations of sampled latents.")

    def _edited(self, name: str, ws: torch.Tensor, strengths: list[float]) -> torch.Tensor:
        dirs = self.directions(name).items
        for d, s in zip(dirs, strengths, strict=False):
            if s:
                ws = d.apply(ws, float(s))
        return ws

    def seed_ws(self, tf: Toonifier, seeds: list[int], truncation: float) -> torch.Tensor:
        """W+ latents of seeded faces in the base model's space (where photos are projected), as poll grids
        draw their probe faces."""
        import torch

        from gan.images import z_from_seeds

        with torch.no_grad():
            z = z_from_seeds(seeds, tf.base.z_dim).to(tf.device)
            return tf.base.mapping(z, truncation_psi=truncation).unsqueeze(1).repeat(1, tf.base.num_ws, 1)

    def preview(self, name: str, spec: BlendSpec, seed: int, truncation: float, strengths: list[float]) -> Image.Image:
        """Faces seed … seed+3: the base model (top row) and the blended model (bottom row), edits applied."""
        import torch

        from gan.pipeline import to_images

        with self.lock:
            tf = self.toonifier(name)
            self._check_spec(tf, spec)
            seeds = [int(seed) + i for i in range(PREVIEW_FACES)]
            ws = self._edited(name, self.seed_ws(tf, seeds, truncation), strengths)
            with torch.no_grad():
                base = to_images(tf.base.synthesis(ws, noise_mode="const"))
            toon = tf.render(ws, spec)
        return face_grid([base, toon], ["base", "blend"])

    def mixing_grid(
        self, name: str, spec: BlendSpec, seed: int, truncation: float, columns: list[int], group: str
    ) -> Image.Image:
        """Style mixing by the blended model: rows are seeds seed … seed+2, columns the mix seeds; each cell is
        its row's latent with the column's ``group`` layers (coarse, middle or fine)."""
        try:
            from gan.editing import layer_group, mix_styles
        except ImportError as e:
            raise StudioError("style mixing needs a gan.editing with mix_styles and layer_group") from e
        with self.lock:
            tf = self.toonifier(name)
            self._check_spec(tf, spec)
            try:
                layers = layer_group(tf.base, group)
            except ValueError as e:
                raise StudioError(str(e)) from e
            rows = self.seed_ws(tf, [int(seed) + i for i in range(MIXING_ROWS)], truncation)
            cols = self.seed_ws(tf, columns, truncation)
            header = tf.render(cols, spec)
            grid: list[list[Image.Image | None]] = [[None, *header]]
            labels = [f"{group} from"]
            for r in range(MIXING_ROWS):
                mixed = mix_styles(rows[r : r + 1].expand(len(columns), -1, -1), cols, layers)
                grid.append([tf.render(rows[r : r + 1], spec)[0], *tf.render(mixed, spec)])
                labels.append(f"seed {int(seed) + r}")
        return face_grid(grid, labels)

    def toonify(
        self, name: str, spec: BlendSpec, photo: bytes, mode: str, strengths: list[float]
    ) -> tuple[Image.Image, str]:
        """The photo toonified with the current blend (and edits, where the mode has latents)."""
        from gan.imageio import BadImageError, decode_image

        if mode not in STUDIO_MODES:
            raise StudioError(f"mode must be one of {', '.join(STUDIO_MODES)}, not {mode!r}")
        if len(photo) > MAX_PHOTO_BYTES:
            raise StudioError(f"that photo is {len(photo) / 2**20:.1f} MiB; the limit is {MAX_PHOTO_BYTES >> 20} MiB")
        try:
            image = decode_image(photo)
        except BadImageError as e:
            raise StudioError(str(e)) from e
        t0 = time.perf_counter()
        with self.lock:
            tf = self.toonifier(name)
            self._check_spec(tf, spec)
            if mode == "auto":
                mode = "instant" if tf.student_for(spec) is not None else "balanced"
            if mode == "instant":
                if tf.student_for(spec) is None:
                    raise StudioError(
                        f"no instant model for {spec.describe()}; choose balanced, or make one with `toonify distill`"
                    )
                result = tf.toonify(image, mode="instant", spec=spec)
                note = "instant: the style's student network (directions need latents: not applied)"
                return result.composite, self._note(note, len(result.crops), t0)
            key = (hashlib.sha256(photo).hexdigest(), name, mode)
            if key in self._photos:  # projected before: a new blend or edit only re-renders
                self._photos.move_to_end(key)
                image, aligned, latents, _ = self._photos[key]
            else:
                try:
                    alignment = tf.align(image)
                except ValueError as e:
                    raise StudioError(str(e)) from e
                aligned = list(alignment)
                if not aligned:
                    raise StudioError("no face found in that photo; try one with a clear, front-facing face")
                from gan.pipeline import to_tensor

                try:
                    latents, _ = tf.project(to_tensor([a.image for a in aligned], tf.device), mode)
                except ValueError as e:
                    raise StudioError(str(e)) from e
                latents = latents.detach()
                self._photos[key] = (image, aligned, latents, mode)
                while len(self._photos) > PHOTO_CACHE:
                    self._photos.popitem(last=False)
            crops = tf.render(self._edited(name, latents, strengths), spec)
            composite = tf.composite(image, aligned, crops)
        edits = " with the direction sliders' edits" if any(strengths) else ""
        return composite, self._note(f"{mode}: projected, rendered at {spec.describe()}{edits}", len(crops), t0)

    @staticmethod
    def _note(what: str, faces: int, t0: float) -> str:
        return f"{faces} face{'s' * (faces != 1)}; {what} ({time.perf_counter() - t0:.1f} s)"

    @staticmethod
    def _check_spec(tf: Toonifier, spec: BlendSpec) -> None:
        try:
            spec.layer_weights(tf.base.resolution)
        except ValueError as e:
            raise StudioError(str(e)) from e


# ---------------------------------------------------------------------------------------------------- publish


class Publisher:
    """'Publish this blend': the service, opened on first use in the server's event loop."""

    def __init__(self, admin_token: str | None, models_dir: Path | None = None) -> None:
        self.admin_token = admin_token
        self.models_dir = models_dir  # the studio's manifest: the service must know the same styles
        self._service = None
        self._opening = asyncio.Lock()

    def is_admin(self, given: str | None) -> bool:
        return bool(self.admin_token) and _same(given, self.admin_token)

    async def service(self):
        async with self._opening:
            if self._service is None:
                from backend.config import Settings
                from backend.service import ToonService

                settings = Settings.from_env()
                if self.models_dir is not None:
                    settings = replace(settings, models_dir=self.models_dir.expanduser().absolute())
                self._service = await ToonService.open(settings)
            return self._service

    async def publish(self, source: Source, spec: BlendSpec, platform: str, community: str, admin_token: str) -> str:
        from backend.errors import ServiceError
        from backend.service import Actor, Place

        if not self.admin_token:
            raise StudioError(f"publishing is off: start the studio with --admin-token or {ADMIN_TOKEN_ENV}")
        if source.style is None:
            raise StudioError("a snapshot is not a style the bots serve: publish its fine-tune as a style first")
        if platform not in PLATFORMS:
            raise StudioError(f"choose the community's platform: {' or '.join(PLATFORMS)}")
        community = str(community or "").strip()
        if not community:
            raise StudioError("give the community's id: the Telegram chat id or the Discord server id")
        # The platform cannot vouch for a studio user: the admin token is the proof of the right to publish, and
        # the service checks it (an actor who is not an admin is refused there, as in chat).
        actor = Actor(platform, "studio", "Toonify studio", is_admin=self.is_admin(admin_token))
        try:
            service = await self.service()
            info = await service.set_default_blend(actor, Place(platform, community), source.style, spec)
        except ServiceError as e:
            raise StudioError(e.public_message) from e
        said = f"Published: {source.style} in {platform} community {community} now uses {spec.describe()}."
        if info.distill_job_id:
            said += f" Its instant model is queued (job {info.distill_job_id})."
        return said

    async def close(self) -> None:
        if self._service is not None:
            await self._service.close()
            self._service = None


# ------------------------------------------------------------------------------------------------------ token


def _same(given: str | None, token: str) -> bool:
    return bool(given) and hmac.compare_digest(str(given).encode(), token.encode())


class TokenGate:
    """ASGI middleware: every request needs the token, as ``Authorization: Bearer``, ``X-Toonify-Token``, the
    studio's cookie, or ``?token=``. A page opened with ``?token=`` gets the cookie and is sent to the same
    address without the token; anything else without the token gets 401 (a websocket is closed)."""

    def __init__(self, app, token: str, cookie: str) -> None:
        self.app, self.token, self.cookie = app, token, cookie

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        from starlette.requests import HTTPConnection
        from starlette.responses import PlainTextResponse, RedirectResponse

        conn = HTTPConnection(scope)
        auth = conn.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        from_query = next((v for k, v in query if k == "token"), None)
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and _same(from_query, self.token):
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            response = RedirectResponse(scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else ""), 303)
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        given = (bearer, conn.headers.get("x-toonify-token"), conn.cookies.get(self.cookie), from_query)
        if any(_same(g, self.token) for g in given):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        refusal = "This studio needs its token: open the address `toonify studio` printed (it ends in ?token=...).\n"
        return await PlainTextResponse(refusal, status_code=401)(scope, receive, send)


# ------------------------------------------------------------------------------------------------------- page


def _theme():
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the studio may run offline
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


def build_blocks(models: StudioModels, publisher: Publisher):
    """The studio's page. Events carry the controls' values; named API endpoints (``/preview``, ``/mix``,
    ``/toonify``, ``/publish``, ``/choose``) are what gradio_client calls."""
    import gradio as gr

    names = list(models.sources)
    first = models.sources[names[0]]
    first_res = models.resolution(first.name)

    def controls_for(name: str):
        src = models.source(name)
        levels = blend_levels(models.resolution(name))
        level = src.blend.resolution if src.blend.resolution in levels else levels[len(levels) // 2]
        dirs = models.directions(name)
        sliders = [
            gr.Slider(value=0, label=dirs.labels[i], visible=True)
            if i < len(dirs.items)
            else gr.Slider(value=0, label=f"direction {i + 1}", visible=False)
            for i in range(MAX_DIRECTION_SLIDERS)
        ]
        return (
            gr.Radio(choices=levels, value=level),
            gr.Slider(value=src.blend.width or 0.0),
            gr.Radio(value=src.blend.structure_from),
            dirs.note,
            *sliders,
        )

    def guarded(fn):
        def run(*args):
            try:
                return fn(*args)
            except StudioError as e:
                raise gr.Error(str(e), print_exception=False) from e

        run.__name__ = fn.__name__
        return run

    @guarded
    def preview(name, level, width, structure, seed, truncation, *strengths):
        spec = spec_from_controls(level, width, structure)
        image = models.preview(name, spec, int(seed or 0), float(truncation), [float(s or 0) for s in strengths])
        return image, f"**{name}**: {spec.describe()}"

    @guarded
    def mix(name, level, width, structure, seed, truncation, mix_seeds, group):
        spec = spec_from_controls(level, width, structure)
        return models.mixing_grid(name, spec, int(seed or 0), float(truncation), parse_mix_seeds(mix_seeds), group)

    @guarded
    def toonify(name, level, width, structure, photo, mode, *strengths):
        if not photo:
            raise StudioError("upload a photo first")
        data = Path(photo).read_bytes()
        spec = spec_from_controls(level, width, structure)
        return models.toonify(name, spec, data, mode, [float(s or 0) for s in strengths])

    async def publish(name, level, width, structure, platform, community, admin_token):
        try:
            spec = spec_from_controls(level, width, structure)
            return await publisher.publish(models.source(name), spec, platform, community, admin_token)
        except StudioError as e:
            raise gr.Error(str(e), print_exception=False) from e

    with gr.Blocks(title="Toonify studio", analytics_enabled=False) as blocks:
        gr.Markdown("## Toonify studio")
        with gr.Row():
            source = gr.Dropdown(choices=names, value=first.name, label="Style or snapshot")
            level = gr.Radio(choices=blend_levels(first_res), value=first.blend.resolution, label="Swap level (px)")
            width = gr.Slider(0, 4, value=first.blend.width or 0.0, step=0.1, label="Smooth width (0: a hard swap)")
            structure = gr.Radio(["toon", "base"], value=first.blend.structure_from, label="Shape from")
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="First seed")
            truncation = gr.Slider(0, 1, value=0.7, step=0.05, label="Truncation ψ")
        with gr.Row():
            with gr.Column(scale=1):
                directions_note = gr.Markdown(models.directions(first.name).note)
                first_dirs = models.directions(first.name)
                sliders = [
                    gr.Slider(
                        -STRENGTH_RANGE,
                        STRENGTH_RANGE,
                        value=0,
                        step=0.1,
                        label=first_dirs.labels[i] if i < len(first_dirs.items) else f"direction {i + 1}",
                        visible=i < len(first_dirs.items),
                    )
                    for i in range(MAX_DIRECTION_SLIDERS)
                ]
            with gr.Column(scale=2):
                preview_image = gr.Image(
                    label="Preview: base model (top), blended model (bottom)",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="studio-preview",
                )
                blend_note = gr.Markdown()
        with gr.Tab("Style mixing"):
            with gr.Row():
                mix_seeds = gr.Textbox("10-13", label="Columns: seeds whose layers are taken (e.g. 10-13 or 5,9)")
                group = gr.Radio(["coarse", "middle", "fine"], value="coarse", label="Layers taken")
                mix_button = gr.Button("Mix")
            mix_image = gr.Image(label="Style mixing", type="pil", format="png", interactive=False)
        with gr.Tab("Your photo"):
            with gr.Row():
                photo = gr.Image(type="filepath", sources=["upload"], label="Photo")
                toon_image = gr.Image(label="Toon", type="pil", format="png", interactive=False)
            with gr.Row():
                mode = gr.Radio(list(STUDIO_MODES), value="auto", label="Mode (auto: instant where it exists)")
                toon_button = gr.Button("Toonify", variant="primary")
            toon_note = gr.Markdown()
        with gr.Tab("Publish this blend"):
            gr.Markdown(
                "Make the current blend a community's default for this style, as a poll's winner does. "
                "Needs the studio's admin token."
            )
            with gr.Row():
                platform = gr.Radio(list(PLATFORMS), value=PLATFORMS[0], label="Platform")
                community = gr.Textbox(label="Community: Telegram chat id or Discord server id")
                admin_token = gr.Textbox(label="Admin token", type="password")
            publish_button = gr.Button("Publish this blend")
            publish_note = gr.Markdown()

        blend_inputs = [source, level, width, structure]
        preview_inputs = [*blend_inputs, seed, truncation, *sliders]
        preview_outputs = [preview_image, blend_note]
        # The named endpoint first: later events of the same function get numbered names.
        blocks.load(preview, preview_inputs, preview_outputs, api_name="preview")
        chosen = source.change(
            guarded(controls_for),
            [source],
            [level, width, structure, directions_note, *sliders],
            api_name="choose",
        )
        chosen.then(preview, preview_inputs, preview_outputs, api_visibility="private")
        # User edits only (.input): choosing a style sets the controls itself and renders once, above.
        gr.on(
            [c.input for c in (level, width, structure, seed, truncation, *sliders)],
            preview,
            preview_inputs,
            preview_outputs,
            api_visibility="private",
            trigger_mode="always_last",
        )
        mix_button.click(mix, [*blend_inputs, seed, truncation, mix_seeds, group], [mix_image], api_name="mix")
        toon_button.click(toonify, [*blend_inputs, photo, mode, *sliders], [toon_image, toon_note], api_name="toonify")
        publish_button.click(
            publish, [*blend_inputs, platform, community, admin_token], [publish_note], api_name="publish"
        )
    return blocks


def build_app(models: StudioModels, publisher: Publisher, token: str, port: int):
    """The ASGI app: the studio's page under the token gate."""
    import gradio as gr
    from fastapi import FastAPI

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app = gr.mount_gradio_app(
        app,
        build_blocks(models, publisher),
        path="",
        ssr_mode=False,
        theme=_theme(),
        max_file_size=MAX_PHOTO_BYTES,
        footer_links=[],
    )
    app.add_middleware(TokenGate, token=token, cookie=f"{COOKIE_PREFIX}{port}")
    return app


# -------------------------------------------------------------------------------------------------------- run


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)  # listening before the address is printed: an early visitor waits rather than being refused
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def studio_url(host: str, port: int, token: str | None = None) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def _server(app):
    import uvicorn

    class StudioServer(uvicorn.Server):
        """Stops on SIGINT/SIGTERM and returns. uvicorn's own handler raises the signal again once it has shut
        down, which would end the process before the studio closes the service (and its embedded Redis)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

    return StudioServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))


async def serve_studio(
    models: StudioModels, publisher: Publisher, *, host: str, port: int, token: str, show_token: bool
) -> None:
    """Serve until SIGINT/SIGTERM, then close the service if publishing opened it."""
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    server = _server(build_app(models, publisher, token, port))
    if show_token:
        print(f"toonify studio: open {studio_url(host, port, token)}", flush=True)
        print(f"  (a token made for this run; set --token or {TOKEN_ENV} to choose one)", flush=True)
    else:
        print(f"toonify studio: serving at {studio_url(host, port)} (open it with ?token=<your token>)", flush=True)
    if not _is_loopback(host):
        print(f"  listening on {host}: other machines can reach it; the token is all that guards it", flush=True)
    try:
        await server.serve(sockets=[sock])
    finally:
        await publisher.close()
        sock.close()


def cmd_studio(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the studio calls no one
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("toonify studio needs gradio: pip install 'toonify[studio]'", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV) or None
    show_token = token is None
    token = token or secrets.token_urlsafe(24)
    admin_token = args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
    if admin_token is not None and _same(admin_token, token):
        raise ValueError("the admin token must differ from the studio's token (everyone with the page has that)")
    models_dir = Path(args.models_dir) if args.models_dir else None
    checkpoints: list[Path] = [Path(p) for p in args.checkpoint or ()]
    for folder in args.snapshots or ():
        checkpoints += snapshot_files(Path(folder))
    models = StudioModels(
        find_sources(models_dir, checkpoints),
        device=args.device or os.environ.get("TOONIFY_DEVICE"),
        models_dir=models_dir,
    )
    asyncio.run(
        serve_studio(
            models,
            Publisher(admin_token, models_dir),
            host=args.host,
            port=args.port,
            token=token,
            show_token=show_token,
        )
    )
    return 0


def add_studio_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``toonify studio``: registered by bots.cli beside ``up`` and ``bot``."""
    from backend.cli import reports_failures

    s = sub.add_parser(
        "studio",
        help="the web studio: blends, seeds, directions, style mixing and your photo, behind a token",
        description="A web studio for a style's latent space, behind a token (needs pip install 'toonify[studio]').",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: a free one)")
    s.add_argument("--token", help=f"the studio's token (default ${TOKEN_ENV}, else one made and printed)")
    s.add_argument("--admin-token", help=f"the token that allows publishing blends (default ${ADMIN_TOKEN_ENV})")
    s.add_argument("--models-dir", help="model manifest folder (default $TOONIFY_MODELS_DIR, else the demo models)")
    s.add_argument("--checkpoint", action="append", help="a fine-tune snapshot or toon checkpoint (repeatable)")
    s.add_argument("--snapshots", action="append", help="a fine-tune run folder: all its snapshots (repeatable)")
    s.add_argument("--device", help="torch device (default $TOONIFY_DEVICE, else cuda when available)")
    s.set_defaults(func=reports_failures(cmd_studio))
    return s
