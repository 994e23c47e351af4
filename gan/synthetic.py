"""Procedural two-domain faces: a shaded "photo" and a flat "toon" of the same seeded person.

Demo models and tests train on these instead of downloaded data. Both domains are FFHQ-like aligned crops
(eye midpoint on the centre column at row ``EYE_ROW``, inter-ocular distance about a quarter of the width,
the face filling most of the frame), so models trained on them behave like face models and the alignment
geometry of real photos carries over. Shapes are implicit: approximate signed distances on a coordinate grid,
which give anti-aliased edges and cartoon outlines for free and keep rendering vectorised numpy.

Head-local units: the eye midpoint is the origin, y points down, 1 is half the image width at scale 1.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

# Eye line as a fraction of the height. The FFHQ recipe (gan.align) puts it at 0.5 - 0.1·|eye→mouth|/side, about
# 0.47 for these proportions, so re-aligning a synthetic face with that recipe leaves it nearly where it is.
EYE_ROW = 0.47
DOMAINS = ("photo", "toon")
HAIR_STYLES = ("short", "long", "bob", "afro", "buzz", "bun")
_EYE_V = 2 * EYE_ROW - 1
_FACE_CY = 0.12  # face ellipse centre below the eye line: eyes sit a little above the middle of the head
_INK, _WHITE = np.float32([0.09, 0.06, 0.07]), np.float32([1, 1, 1])
Colour = tuple[float, float, float]


@dataclass(frozen=True)
class FaceParams:
    # identity
    face_w: float  # half-width of the face ellipse
    face_h: float  # half-height
    jaw: float  # narrowing of the lower face: 0 round chin, 0.3 pointed
    skin: Colour
    hair: Colour
    hair_style: int  # index into HAIR_STYLES
    hair_volume: float
    fringe: float  # 0 high hairline .. 1 low fringe
    parting: float  # -1..1, where the hairline is highest
    eye_sep: float  # half the inter-ocular distance
    eye_w: float  # half-width of an eye
    eye_open: float
    iris: Colour
    brow_gap: float
    brow_thick: float
    brow_arch: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip: float
    smile: float  # -0.3 frown .. 1 open grin
    lip_colour: Colour
    ear: float
    clothes: Colour
    # pose
    yaw: float  # radians; positive turns the face toward the image right
    roll: float  # radians; positive rotates clockwise on screen (the image-right eye goes down)
    scale: float
    # lighting: where the light comes from (azimuth in the image plane, elevation toward the viewer)
    light_az: float
    light_elev: float
    light: float  # strength of the directional part
    # background
    bg_top: Colour
    bg_bottom: Colour
    bg_angle: float
    noise_seed: int


_SKIN_LIGHT, _SKIN_DARK = np.array([0.97, 0.82, 0.71]), np.array([0.33, 0.2, 0.14])
_HAIRS = [(0.07, 0.05, 0.05), (0.2, 0.12, 0.08), (0.4, 0.25, 0.14), (0.55, 0.24, 0.1), (0.84, 0.68, 0.42),
          (0.72, 0.33, 0.13), (0.62, 0.6, 0.58), (0.9, 0.86, 0.75)]  # fmt: skip
_IRISES = [(0.38, 0.23, 0.11), (0.18, 0.1, 0.06), (0.28, 0.48, 0.75), (0.3, 0.52, 0.32), (0.52, 0.42, 0.22),
           (0.5, 0.55, 0.6)]  # fmt: skip


def _floats(c) -> Colour:  # plain floats keep FaceParams printable and JSON-friendly
    return tuple(float(v) for v in c)


def _hsv(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> Colour:
    return colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*s), rng.uniform(*v))


def sample_params(rng: np.random.Generator, max_yaw_deg: float = 20.0, max_roll_deg: float = 8.0) -> FaceParams:
    """One random person, pose, light and background; every draw comes from ``rng`` (deterministic)."""
    u = rng.uniform
    skin = np.clip(_SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * u() ** 1.3 + u(-0.03, 0.03, 3), 0, 1)
    hair = np.clip(np.array(_HAIRS[rng.integers(len(_HAIRS))]) * u(0.85, 1.12), 0, 1)
    bg = _hsv(rng, (0.05, 0.5), (0.35, 0.95))
    return FaceParams(
        face_w=u(0.5, 0.6), face_h=u(0.72, 0.8), jaw=u(0.0, 0.3), skin=_floats(skin), hair=_floats(hair),
        hair_style=int(rng.integers(len(HAIR_STYLES))), hair_volume=u(0.03, 0.12), fringe=u(), parting=u(-1, 1),
        eye_sep=u(0.23, 0.27), eye_w=u(0.08, 0.1), eye_open=u(0.8, 1.15), iris=_IRISES[rng.integers(len(_IRISES))],
        brow_gap=u(0.05, 0.08), brow_thick=u(0.016, 0.03), brow_arch=u(0.5, 2.5), nose_len=u(0.24, 0.3),
        nose_w=u(0.06, 0.085), mouth_y=u(0.44, 0.5), mouth_w=u(0.13, 0.18), lip=u(0.025, 0.045),
        smile=u(-0.3, 1.0), lip_colour=_floats(np.clip(skin * 0.5 + np.array([0.75, 0.28, 0.3]) * 0.45, 0, 1)),
        ear=u(0.85, 1.15), clothes=_hsv(rng, (0.2, 0.8), (0.2, 0.9)),
        yaw=math.radians(u(-max_yaw_deg, max_yaw_deg)), roll=math.radians(u(-max_roll_deg, max_roll_deg)),
        scale=u(0.94, 1.06), light_az=-math.pi / 2 + u(-1.3, 1.3), light_elev=u(0.5, 1.1), light=u(0.3, 0.8),
        bg_top=bg, bg_bottom=_floats(np.clip(np.array(bg) * u(0.5, 1.0) + u(-0.1, 0.1, 3), 0, 1)),
        bg_angle=u(0, 2 * math.pi), noise_seed=int(rng.integers(2**31)),
    )  # fmt: skip


def sample_faces(n: int, seed: int) -> list[FaceParams]:
    """``n`` people from ``seed``; the same list whatever domain is rendered, so index i pairs across domains."""
    rng = np.random.default_rng(seed)
    return [sample_params(rng) for _ in range(n)]


class _Head:
    """Where everything goes, in head-local units. Shared by both renderers and ``feature_points`` so that
    features and the positions reported for them agree by construction."""

    def __init__(self, p: FaceParams, toon: bool):
        self.scale = p.scale * (1.06 if toon else 1.0)  # toon: bigger head, scaled about the eyes
        self.a, self.b = p.face_w, p.face_h * (0.95 if toon else 1.0)
        self.jaw = p.jaw + (0.15 if toon else 0.0)  # toon: smaller chin
        self.ek = 1.6 if toon else 1.0  # toon: bigger eyes
        self.p, self.sin, self.cos = p, math.sin(p.yaw), math.cos(p.yaw)
        self.z_eye = self.depth(p.eye_sep, 0.0)
        # Yaw: points move by their depth relative to the eyes', so the eyes stay centred as in aligned crops
        # while the nose leads and the silhouette (face outline, hair, ears) slides the other way.
        self.ox = -self.z_eye * self.sin
        self.eyes = [(self.proj(s * p.eye_sep, 0.0), self.fore(s * p.eye_sep)) for s in (-1, 1)]
        self.nose = self.proj(0.0, p.nose_len, 0.1)
        self.mouth = self.proj(0.0, p.mouth_y)
        self.vol = p.hair_volume
        self.hair_cy = _FACE_CY - 0.06
        self.hair_A, self.hair_B = self.a + self.vol + 0.03, self.b + self.vol + 0.02

    def depth(self, x: float, y: float) -> float:
        return self.a * math.sqrt(max(0.05, 1 - (x / self.a) ** 2 - ((y - _FACE_CY) / self.b) ** 2))

    def proj(self, x: float, y: float, bump: float = 0.0) -> float:
        return x * self.cos + (self.depth(x, y) + bump - self.z_eye) * self.sin

    def fore(self, x: float) -> float:  # horizontal foreshortening of a feature on the face's curve
        t = math.asin(max(-0.95, min(0.95, x / self.a)))
        return math.cos(t + self.p.yaw) / math.cos(t)

    def to_pixels(self, x: float, y: float, size: int) -> tuple[float, float]:
        c, s = math.cos(self.p.roll), math.sin(self.p.roll)
        u, v = self.scale * (c * x - s * y), self.scale * (s * x + c * y) + _EYE_V
        return (u + 1) * size / 2 - 0.5, (v + 1) * size / 2 - 0.5


def feature_points(params: FaceParams, size: int, domain: str = "photo") -> dict[str, tuple[float, float]]:
    """Pixel (x, y) of named points: eye centres (image-left/right), nose tip, mouth centre, a cheek point on
    each side that is plain skin, and a point inside the hair above the forehead."""
    h = _Head(params, _check_domain(domain) == "toon")
    pts = {"eye_left": (h.eyes[0][0], 0.0), "eye_right": (h.eyes[1][0], 0.0), "nose": (h.nose, params.nose_len),
           "mouth": (h.mouth, params.mouth_y), "cheek_left": (h.proj(-0.55 * params.eye_sep, 0.2), 0.2),
           "cheek_right": (h.proj(0.55 * params.eye_sep, 0.2), 0.2),
           "hair": (h.ox, _FACE_CY - h.b - 0.025)}  # fmt: skip
    return {k: h.to_pixels(x, y, size) for k, (x, y) in pts.items()}


def _ellipse(x, y, cx, cy, a, b, bend=0.0, taper=0.0):
    """Approximate signed distance to an ellipse, optionally bent into an arc (y shifted by bend·dx²: smiles,
    brows) and tapered (lower half narrowed: jaws). First-order f/|∇f|: exact on the edge, fine for edges."""
    dx = x - cx
    dy = y - cy - bend * dx * dx
    ax = a * (1.0 - taper * np.clip(dy / b, 0.0, 1.0)) if taper else a
    qx, qy = dx / ax, dy / b
    k = np.sqrt(qx * qx + qy * qy)
    g = np.sqrt((qx / ax) ** 2 + (qy / b) ** 2)
    return (k - 1.0) * (k + 1e-6) / (g + 1e-6 / min(a, b))  # the epsilons keep the centre well inside


def _almond(x, y, cx, a, up, lo):
    """Signed distance (approximate) to the region between two parabolic lids: a human eye opening."""
    dx, q = x - cx, 1 - ((x - cx) / a) ** 2
    d_up = (-up * q - y) / np.sqrt(1 + (2 * up * dx / a**2) ** 2)
    return np.maximum(d_up, (y - lo * q) / np.sqrt(1 + (2 * lo * dx / a**2) ** 2)), d_up


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).astype(np.float32)
    return c[None, :], c[:, None]


def _saturate(c, k: float, gain: float = 1.0) -> np.ndarray:
    c = np.asarray(c, np.float32)
    return np.clip((c.mean() + (c - c.mean()) * k) * gain, 0, 1)


class _Canvas:
    """The image being painted plus head-local coordinates; ``win`` gives a view on a sub-rectangle so that
    small features cost their own area, not the whole image's (most layers are small)."""

    def __init__(self, p: FaceParams, h: _Head, size: int, toon: bool, img, x, y):
        self.p, self.h, self.size, self.toon, self.img, self.x, self.y = p, h, size, toon, img, x, y
        self.xs = x - h.ox  # silhouette coordinates
        self.px = 2.0 / size / h.scale  # one pixel in head-local units
        self.soft = self.px if toon else max(self.px, 0.011)  # photo edges a little soft at every size
        self.lw = max(0.022, 1.3 * self.px)  # toon outline width
        el = math.cos(p.light_elev)
        self.L = (el * math.cos(p.light_az), el * math.sin(p.light_az), math.sin(p.light_elev))
        self.sl = (slice(None), slice(None))

    def win(self, cx: float, cy: float, rx: float, ry: float) -> _Canvas:
        corners = [self.h.to_pixels(cx + sx * rx, cy + sy * ry, self.size) for sx in (-1, 1) for sy in (-1, 1)]
        (c0, r0), (c1, r1) = np.floor(np.min(corners, 0)).astype(int) - 2, np.ceil(np.max(corners, 0)).astype(int) + 3
        sl = (slice(max(r0, 0), max(r1, 0)), slice(max(c0, 0), max(c1, 0)))
        sub = object.__new__(_Canvas)
        sub.__dict__.update(self.__dict__, sl=sl, img=self.img[sl], x=self.x[sl], y=self.y[sl], xs=self.xs[sl])
        return sub

    def cover(self, d, s=None):
        return np.clip(0.5 - d / (s or self.soft), 0.0, 1.0)

    def paint(self, alpha, colour):
        self.img += alpha[..., None] * (colour - self.img)

    def darken(self, alpha, amount):  # photo shading touches (shadows, creases) multiply what is there
        self.img *= (1.0 - amount * alpha)[..., None]

    def outline(self, d, w=None):
        if self.toon:
            self.paint(self.cover(np.abs(d) - (w or self.lw) / 2, self.px), _INK)

    def shading(self, nx, ny):
        """Lambert on a pseudo-ellipsoid normal: (factor [..., 1], lambert). The toon keeps two tones only."""
        L, r2 = self.L, nx * nx + ny * ny
        nz, s = np.sqrt(np.clip(1 - r2, 0.0, 1.0)), np.sqrt(np.maximum(r2, 1.0))
        lam = np.clip((nx * L[0] + ny * L[1]) / s + nz * L[2], 0.0, 1.0)
        if self.toon:
            return (1 - 0.2 * np.clip((0.22 - lam) / 0.03 + 0.5, 0.0, 1.0))[..., None], lam
        return (1.1 - 0.75 * self.p.light * (1 - lam))[..., None], lam


def _hair_shape(c: _Canvas):
    p, h, xs, y = c.p, c.h, c.xs, c.y
    style, a, b = HAIR_STYLES[p.hair_style], h.a, h.b
    cap = _ellipse(xs, y, 0, h.hair_cy, h.hair_A, h.hair_B)
    if style == "afro":
        return cap, np.maximum(
            _ellipse(xs, y, 0, h.hair_cy - 0.08, h.hair_A + 0.2, h.hair_B + 0.1), y - _FACE_CY - 0.45
        )
    if style == "buzz":
        return cap, np.maximum(_ellipse(xs, y, 0, _FACE_CY - 0.02, a + 0.025, b + 0.03), y - _FACE_CY + 0.1)
    if style in ("long", "bob"):  # a curtain, rounded at the bottom, hanging from the cap
        w, bottom = (h.hair_A, _FACE_CY + 1.0) if style == "long" else (h.hair_A + 0.05, _FACE_CY + 0.5)
        qx, qy = np.abs(xs) - w + 0.12, y - bottom + 0.12  # a rounded box of corner radius 0.12
        box = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - 0.12
        return cap, np.minimum(cap, np.maximum(box, h.hair_cy - y))
    d = np.maximum(cap, y - _FACE_CY + 0.02)  # short and bun end at the temples
    if style == "bun":
        d = np.minimum(d, _ellipse(xs, y, 0, h.hair_cy - h.hair_B - 0.08, 0.17, 0.14))
    return cap, d


def _eyes(c: _Canvas) -> None:
    """Brows and eyes: almond eyes with lids, iris and a small glint in the photo; big round eyes with heavy
    upper lids and large catchlights in the toon."""
    p, h, toon, px, lw, L = c.p, c.h, c.toon, c.px, c.lw, c.L
    brow_col = _saturate(p.hair, 1.3, 0.55) if toon else np.float32(p.hair) * 0.55 + np.float32(p.skin) * 0.2
    for s, (ex, fx) in zip((-1, 1), h.eyes, strict=True):
        ew, up, ri = p.eye_w * h.ek * fx, p.eye_w * 0.42 * p.eye_open * h.ek, 0.5 * p.eye_w * h.ek
        bx, by = h.proj(s * (p.eye_sep + 0.01), -up), -up - p.brow_gap
        w = c.win(bx, by, p.eye_w * 1.3 + 0.04, 0.1)
        d = _ellipse(w.x, w.y, bx, by, p.eye_w * 1.3 * fx, p.brow_thick, bend=p.brow_arch)
        w.paint(w.cover(d, px if toon else c.soft * 2) * (1.0 if toon else 0.85), brow_col)
        w = c.win(ex, -0.01, ew + 0.04, 2.2 * up + 0.04)
        x_, y_ = w.x, w.y
        if toon:
            d_eye = _ellipse(x_, y_, ex, -0.01, ew, up * 1.3)
            w.paint(w.cover(d_eye, px), np.float32([0.98, 0.98, 0.97]))
            d_iris = _ellipse(x_, y_, ex, 0.0, ri * 0.85 * fx, ri)
            iris = _saturate(p.iris, 1.5, 1.15) * np.where(y_ > 0.3 * ri, 1.25, 1.0)[..., None]
            w.paint(w.cover(np.maximum(d_iris, d_eye), px), iris)
            w.paint(w.cover(np.maximum(_ellipse(x_, y_, ex, 0.0, ri * 0.45 * fx, ri * 0.5), d_eye), px), _INK)
            for hx, hy, hr in ((-0.35, -0.4, 0.32), (0.35, 0.35, 0.14)):  # catchlights, cartoon-size
                w.paint(w.cover(_ellipse(x_, y_, ex + hx * ri, hy * ri, hr * ri, hr * ri), px), _WHITE)
            w.outline(d_eye, lw * 0.8)
            w.paint(w.cover(np.maximum(np.abs(d_eye) - lw * 1.2, y_ + 0.2 * up), px), _INK)  # heavy upper lid
        else:
            d_eye, d_up = _almond(x_, y_, ex, ew, up, up * 0.75)
            crease = np.maximum(np.abs(_almond(x_, y_ + up * 0.7, ex, ew * 1.05, up * 1.3, up)[1]) - 0.004,
                                np.abs(x_ - ex) - ew)  # fmt: skip
            w.darken(w.cover(crease, 0.012), 0.2)
            corner = (1 - 0.3 * np.clip(((x_ - ex) / ew) ** 2, 0, 1))[..., None]
            w.paint(w.cover(d_eye, c.soft * 0.8), np.float32([0.9, 0.87, 0.84]) * corner)
            r = np.sqrt(((x_ - ex) / fx) ** 2 + y_ * y_) / ri
            iris = np.float32(p.iris) * (1.15 - 0.5 * np.clip(r, 0, 1) ** 3)[..., None]  # darker limbal ring
            w.paint(w.cover(np.maximum((r - 1) * ri, d_eye), c.soft * 0.7), iris)
            w.paint(w.cover(np.maximum((r - 0.42) * ri, d_eye), c.soft * 0.6), np.float32([0.04, 0.03, 0.03]))
            glint = _ellipse(x_, y_, ex + 0.4 * ri * L[0], 0.4 * ri * L[1], 0.16 * ri, 0.16 * ri)
            w.paint(w.cover(np.maximum(glint, d_eye), c.soft * 0.5) * 0.9, _WHITE)
            lid = np.maximum(np.abs(d_up) - 0.006, np.abs(x_ - ex) - ew)
            w.paint(w.cover(lid, c.soft * 0.8) * 0.9, np.float32(p.hair) * 0.3)


def _nose_and_mouth(c: _Canvas) -> None:
    p, h, toon, px, lw, L = c.p, c.h, c.toon, c.px, c.lw, c.L
    a, b = h.a, h.b
    nx, ny, nw = h.nose, p.nose_len, p.nose_w
    w = c.win(nx, ny / 2 + 0.02, nw * 1.3 + 0.08, ny / 2 + 0.1)
    if toon:
        d = _ellipse(w.x, w.y, nx, ny - 0.01, nw * 0.5, nw * 0.3)
        w.paint(w.cover(np.maximum(np.abs(d) - lw * 0.4, ny - 0.01 - w.y), px), _INK)
    else:
        far = -1.0 if L[0] >= 0 else 1.0  # the side of the nose away from the light is in shadow
        w.darken(w.cover(_ellipse(w.x, w.y, nx + far * nw * 0.55, ny * 0.55, nw * 0.3, ny * 0.5), 0.04), 0.25 * p.light)
        w.darken(w.cover(_ellipse(w.x, w.y, nx, ny + 0.035, nw * 0.9, 0.022), 0.02), 0.18)
        for s in (-1, 1):
            w.darken(w.cover(_ellipse(w.x, w.y, nx + s * nw * 0.45, ny + 0.012, nw * 0.28, nw * 0.14), 0.012), 0.5)
        w.paint(w.cover(_ellipse(w.x, w.y, nx, ny - 0.015, nw * 0.35, nw * 0.3), 0.03) * 0.15, _WHITE)
    mx, my, mw, lip, bend = h.mouth, p.mouth_y, p.mouth_w * h.cos, p.lip, -p.smile * 0.8
    w = c.win(mx, my, mw + 0.05, lip * 1.5 + abs(bend) * mw * mw + 0.05)
    x_, y_, soft = w.x, w.y, (px if toon else c.soft)
    lips = (
        _saturate(p.lip_colour, 1.5) if toon else np.float32(p.lip_colour) * w.shading(w.xs / a, (y_ - _FACE_CY) / b)[0]
    )
    d_lips = _ellipse(x_, y_, mx, my, mw, lip, bend)
    if toon:
        w.paint(w.cover(d_lips, px), lips)
    else:
        w.paint(w.cover(_ellipse(x_, y_, mx, my + lip * 0.4, mw * 0.9, lip * 0.7, bend), soft * 1.5), lips)
        w.paint(w.cover(_ellipse(x_, y_, mx, my - lip * 0.35, mw, lip * 0.55, bend), soft * 1.5), lips * 0.8)
        w.paint(w.cover(_ellipse(x_, y_, mx, my + lip * 0.5, mw * 0.4, lip * 0.2, bend), 0.02) * 0.25, _WHITE)
    if p.smile > 0.55:  # a grin opens the mouth: dark inside, a band of upper teeth
        d_in = _ellipse(x_, y_, mx, my + 0.004, mw * 0.82, lip * 0.8 * min(1.0, (p.smile - 0.55) * 3), bend)
        w.paint(w.cover(d_in, soft), np.float32([0.25, 0.06, 0.07]))
        w.paint(
            w.cover(np.maximum(d_in, y_ - my - bend * (x_ - mx) ** 2 + lip * 0.1), soft), np.float32([0.95, 0.93, 0.88])
        )
    line = np.maximum(
        np.abs(y_ - my - bend * (x_ - mx) ** 2) - (lw * 0.4 if toon else 0.005), np.abs(x_ - mx) - mw * 0.95
    )
    w.paint(w.cover(line, soft) * (1.0 if toon else 0.6), _INK if toon else lips * 0.4)
    w.outline(d_lips, lw * 0.8)


def _render(p: FaceParams, size: int, toon: bool) -> np.ndarray:
    h, (u, v) = _Head(p, toon), _grid(size)
    cr, sr = math.cos(p.roll), math.sin(p.roll)
    rng = np.random.default_rng(p.noise_seed)
    # background: photo a lit gradient with vignette and out-of-focus blobs, toon one flat saturated colour
    if toon:
        img = np.empty((size, size, 3), np.float32)
        img[...] = _saturate(np.add(p.bg_top, p.bg_bottom) / 2, 1.4, 1.1)
    else:
        t = np.clip(0.5 + 0.5 * (u * math.cos(p.bg_angle) + v * math.sin(p.bg_angle)), 0, 1)[..., None]
        img = (np.float32(p.bg_top) * (1 - t) + np.float32(p.bg_bottom) * t) * (1 - 0.15 * (u * u + v * v))[..., None]
        for bx, by, br in rng.uniform([-1, -1, 0.15], [1, 1, 0.5], (2, 3)):
            img += np.float32(0.07) * np.exp(-((u - bx) ** 2 + (v - by) ** 2) / br**2)[..., None]
        img = img.astype(np.float32)
    x = (cr * u + sr * (v - _EYE_V)) / h.scale
    c = _Canvas(p, h, size, toon, img, x, (-sr * u + cr * (v - _EYE_V)) / h.scale)
    xs, y, a, b, px, lw, L = c.xs, c.y, h.a, h.b, c.px, c.lw, c.L

    # colour fields for hair and skin, painted through several shapes below
    hy = (y - h.hair_cy) / h.hair_B
    if toon:
        hair = _saturate(p.hair, 1.25) * c.shading(xs / h.hair_A, hy)[0]
        side = 1.0 if L[0] >= 0 else -1.0  # a shine arc on the lit side: the classic cartoon hair highlight
        ring = np.maximum(np.abs(_ellipse(xs, y, 0, h.hair_cy, h.hair_A * 0.82, h.hair_B * 0.82)) - 0.016,
                          np.maximum(y - h.hair_cy + h.hair_B * 0.5, 0.1 - side * xs))  # fmt: skip
        hair = hair + c.cover(ring, px)[..., None] * (np.minimum(_saturate(p.hair, 1.4) * 1.6 + 0.15, 1) - hair)
        skin_col = _saturate(p.skin, 1.2) * c.shading(xs / a, (y - _FACE_CY) / b)[0]
    else:
        hs, hlam = c.shading(xs / h.hair_A, hy)
        f, ph = min(90.0, size * 0.6), rng.uniform(0, 6.3, 2)  # strand frequency kept below the pixel frequency
        strands = 1 + 0.1 * np.sin(f * xs + 4 * np.sin(5 * y + ph[0]) + ph[1])
        hair = np.float32(p.hair) * hs * strands[..., None] + (0.25 * hlam**12)[..., None]
        n = max(size // 8, 4)  # blotchy low-frequency skin variation plus fine grain
        blot = np.asarray(
            Image.fromarray(rng.standard_normal((n, n)).astype(np.float32)).resize(
                (size, size), Image.Resampling.BICUBIC
            )
        )
        tex = (1 + 0.02 * blot + 0.015 * rng.standard_normal((size, size))).astype(np.float32)
        fs = c.shading(xs / a, (y - _FACE_CY) / b)[0] * tex[..., None]
        skin_col = np.float32(p.skin) * fs ** np.float32([1.0, 1.15, 1.3])  # shadows on skin go warm

    # back hair, clothes, neck, ears
    cap, d_hair = _hair_shape(c)
    c.paint(c.cover(d_hair), hair)
    c.outline(d_hair)
    d = _ellipse(x, y, 0, _FACE_CY + 1.65, 1.5, 0.82)
    clothes = _saturate(p.clothes, 1.3) if toon else np.float32(p.clothes)
    c.paint(c.cover(d), clothes * c.shading(x / 1.5, (y - _FACE_CY - 1.65) / 0.82)[0])
    c.outline(d)
    d = np.maximum(np.abs(x - h.ox * 0.5) - a * 0.5 * (1 + 0.3 * np.clip(y - 0.95, 0, 2)), _FACE_CY + 0.3 - y)
    below_chin = np.clip((y - _FACE_CY - b) / 0.25, 0, 1)[..., None]  # the chin shades the neck below it
    c.paint(c.cover(d), skin_col * (np.where(below_chin < 0.5, 0.8, 1.0) if toon else 0.78 + 0.2 * below_chin))
    c.outline(d)
    for s in (-1, 1):
        ex, ey = h.ox + s * a * h.cos - 0.15 * h.sin, _FACE_CY - 0.02
        w = c.win(ex, ey, 0.1 * p.ear, 0.15 * p.ear)
        d = _ellipse(w.x, w.y, ex, ey, 0.075 * p.ear, 0.13 * p.ear)
        w.paint(w.cover(d), skin_col[w.sl] * 0.92)
        w.outline(d)
        d_in = np.abs(_ellipse(w.x, w.y, ex + s * 0.01, ey, 0.04 * p.ear, 0.085 * p.ear)) - lw / 3
        w.paint(w.cover(np.maximum(d_in, -d), px if toon else 0.02), _INK if toon else skin_col[w.sl] * 0.7)

    # face, then what lies over it: shading touches, blush, side locks and the fringe
    d_face = _ellipse(xs, y, 0, _FACE_CY, a, b, taper=h.jaw)
    c.paint(c.cover(d_face), skin_col)
    c.outline(d_face)
    hairline = _FACE_CY - b * (0.8 - 0.32 * p.fringe) + 0.7 * (xs - p.parting * 0.2) ** 2
    for s, (ex, fx) in zip((-1, 1), h.eyes, strict=True):
        bx = h.proj(s * (p.eye_sep + 0.06), 0.19)
        w = c.win(bx, 0.19, 0.12, 0.1)
        tint, amount, edge = ([0.98, 0.45, 0.45], 0.4, px) if toon else ([0.85, 0.3, 0.3], 0.12, 0.05)
        w.paint(w.cover(_ellipse(w.x, w.y, bx, 0.19, 0.06, 0.035), edge) * amount, np.float32(tint))  # blush
        if not toon:  # eye sockets are in shade
            w = c.win(ex, -0.02, p.eye_w * 1.5 + 0.08, p.eye_w * 0.8 + 0.08)
            w.darken(w.cover(_ellipse(w.x, w.y, ex, -0.02, p.eye_w * 1.5 * fx, p.eye_w * 0.8), 0.05), 0.15 * p.light)
    if not toon:
        c.darken(c.cover(y - hairline - 0.04, 0.05) * c.cover(d_face), 0.25)  # the fringe shades the forehead
    if HAIR_STYLES[p.hair_style] in ("long", "bob"):
        d = np.maximum(d_hair, -_ellipse(xs, y, 0, _FACE_CY + 0.1, 0.86 * a, 1.6 * b))  # frames the face
        c.paint(c.cover(d), hair)
        c.outline(d)
    d = np.maximum(np.minimum(d_hair, cap), y - hairline)
    c.paint(c.cover(d), hair)
    c.outline(d)

    _eyes(c)
    _nose_and_mouth(c)
    if not toon:  # sensor grain
        img += rng.normal(0, 0.012, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, not {domain!r}")
    return domain


def render_photo(params: FaceParams, size: int = 128) -> np.ndarray:
    """The "photo" domain: shaded, textured, soft-edged face. uint8 [size, size, 3]."""
    return _render(params, size, toon=False)


def render_toon(params: FaceParams, size: int = 128) -> np.ndarray:
    """The "toon" domain of the same person: big eyes, flat two-tone colours, ink outlines. uint8 [H, W, 3]."""
    return _render(params, size, toon=True)


def render_batch(params_list: Sequence[FaceParams], domain: str = "photo", size: int = 128) -> np.ndarray:
    """uint8 [N, size, size, 3]; image i equals the single render of params_list[i]."""
    toon = _check_domain(domain) == "toon"
    out = np.empty((len(params_list), size, size, 3), np.uint8)
    for i, p in enumerate(params_list):
        out[i] = _render(p, size, toon)
    return out


def make_dataset(n: int, domain: str = "photo", size: int = 128, seed: int = 0) -> np.ndarray:
    """``n`` images [n, size, size, 3] uint8, deterministic in ``seed``; image i shows the same person in both
    domains (use different seeds for data sets that should not share people)."""
    return render_batch(sample_faces(n, seed), domain, size)


def save_dataset(directory: str | Path, n: int, domain: str = "photo", size: int = 128, seed: int = 0) -> list[Path]:
    """Write ``n`` PNGs ``{domain}_{i:05d}.png`` into ``directory`` (created), one image in memory at a time."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    toon = _check_domain(domain) == "toon"
    paths = []
    for i, p in enumerate(sample_faces(n, seed)):
        paths.append(out / f"{domain}_{i:05d}.png")
        Image.fromarray(_render(p, size, toon)).save(paths[-1])
    return paths
