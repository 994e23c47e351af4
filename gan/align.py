"""Face detection, 68-point landmarks and FFHQ-style alignment, and the inverse: pasting a crop back.

Detection uses dlib's frontal face detector (HOG, or the CNN "MMOD" detector as an option) and dlib's
68-landmark shape predictor, with the model files of the ``face-recognition-models`` package (offline).

The crop follows the recipe that produced FFHQ (NVlabs/ffhq-dataset, ``recreate_aligned_images``): an
oriented square built from the eye centres and mouth corners, so that a StyleGAN2 trained on FFHQ sees
faces where it expects them. The implementation is this project's own, with two differences that change
no geometry: every resampling step is tracked exactly in continuous coordinates (so the crop → photo
transform is exact, not off by the rounding of the shrink step), and the super-sampling factor of the
final warp is chosen from the face size instead of a fixed 4096-pixel canvas.

Coordinates. Photo and crop points are in *pixel-centre* coordinates, dlib's convention: the centre of
pixel (column i, row j) is the point (i, j); the image covers [-0.5, W - 0.5] × [-0.5, H - 0.5].
:attr:`AlignedFace.crop_to_photo` is a 3 × 3 matrix acting on homogeneous (x, y, 1) column vectors.

Images are expected upright (EXIF orientation already applied, as :func:`gan.imageio.decode_image` does)
and in RGB; NumPy ``uint8`` arrays of shape [H, W, 3] are accepted wherever a Pillow image is.

dlib objects are not documented as thread-safe; each :class:`FaceAligner` serialises its own model calls
with a lock, so one aligner may be shared by threads (one per worker process is the intended use).
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

__all__ = [
    "AlignedFace",
    "Alignment",
    "Face",
    "FaceAligner",
    "FaceTooSmallError",
    "NoFaceError",
    "align_face",
    "crop_to_photo_matrix",
    "default_model_path",
    "ffhq_quad",
    "paste_back",
]

PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR = "mmod_human_face_detector.dat"

ImageLike = Image.Image | np.ndarray


# --------------------------------------------------------------------------------------------- errors


class NoFaceError(ValueError):
    """No face at all in the photo. ``str(err)`` is a user-facing sentence."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "No face found in the photo. Send a well-lit photo with the face looking at the camera, "
            "not covered and not cut off by the edge."
        )


class FaceTooSmallError(ValueError):
    """Faces were found, but every one is below the minimum size. ``faces`` lists them (largest first)."""

    def __init__(self, faces: list[Face], min_size: int) -> None:
        self.faces = faces
        self.min_size = min_size
        biggest = faces[0].size if faces else 0
        what = "The face is" if len(faces) == 1 else f"All {len(faces)} faces are"
        super().__init__(
            f"{what} too small ({biggest} px; at least {min_size} px is needed). "
            "Send a closer photo, or crop the photo around the face."
        )


# ------------------------------------------------------------------------------------------ geometry


def default_model_path(name: str = PREDICTOR_68) -> Path:
    """Path of a dlib model file shipped by the ``face-recognition-models`` package.

    The package is located without importing it: its ``__init__`` imports ``pkg_resources``, which recent
    setuptools no longer provides.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"dlib model {name!r} not found: install the 'face-recognition-models' package "
            "(pip install face-recognition-models), or pass the file's path explicitly"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"dlib model file missing: {path} (reinstall 'face-recognition-models')")
    return path


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ crop square, [4, 2] corners (top-left, bottom-left, bottom-right, top-right as seen in the
    crop), from 68 dlib landmarks, in the landmarks' coordinates."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected 68 landmarks of shape [68, 2], got {lm.shape}")
    eye_left = lm[36:42].mean(axis=0)
    eye_right = lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    # x: the crop's horizontal half-side; a blend of the eye line and the normal of the eye-mouth line.
    x = eye_to_eye - np.flipud(eye_to_mouth) * np.array([-1.0, 1.0])
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * np.array([-1.0, 1.0])  # x turned 90° (towards the mouth)
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def crop_to_photo_matrix(quad: np.ndarray, output_size: int) -> np.ndarray:
    """3 × 3 affine matrix taking crop pixel coordinates (pixel centres, crop of ``output_size``²) to photo
    coordinates, for a crop whose corners are ``quad`` (as returned by :func:`ffhq_quad`)."""
    q = np.asarray(quad, dtype=np.float64)
    du = (q[3] - q[0]) / output_size  # one crop pixel to the right
    dv = (q[1] - q[0]) / output_size  # one crop pixel down
    t = q[0] + 0.5 * (du + dv)  # centre of crop pixel (0, 0)
    return np.array([[du[0], dv[0], t[0]], [du[1], dv[1], t[1]], [0.0, 0.0, 1.0]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    flat = p.reshape(-1, 2)
    out = flat @ matrix[:2, :2].T + matrix[:2, 2]
    return out.reshape(p.shape)


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in photo coordinates.

    ``box``: detector box (x0, y0, x1, y1) in Pillow's crop-box convention (pixel edges, x1 and y1
    exclusive), may reach outside the photo; ``size``: the box's longer side in
    photo pixels (what ``min_face_size`` is compared with); ``landmarks``: [68, 2] dlib points; ``quad``:
    [4, 2] corners of the FFHQ crop (top-left, bottom-left, bottom-right, top-right as seen in the crop);
    ``score``: detector confidence (HOG: SVM margin, CNN: MMOD confidence).
    """

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float
    quad: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        lm = np.asarray(self.landmarks, dtype=np.float64)
        object.__setattr__(self, "landmarks", lm)
        object.__setattr__(self, "quad", ffhq_quad(lm))

    @property
    def size(self) -> int:
        x0, y0, x1, y1 = self.box
        return round(max(x1 - x0, y1 - y0))

    @property
    def crop_size(self) -> float:
        """Side of the FFHQ crop square in photo pixels."""
        return float(np.hypot(*(self.quad[3] - self.quad[0])))

    @property
    def eye_left(self) -> np.ndarray:
        """Centre of the eye on the image's left (the person's right eye): mean of landmarks 36-41."""
        return self.landmarks[36:42].mean(axis=0)

    @property
    def eye_right(self) -> np.ndarray:
        """Centre of the eye on the image's right: mean of landmarks 42-47."""
        return self.landmarks[42:48].mean(axis=0)

    @property
    def mouth(self) -> np.ndarray:
        """Midpoint of the mouth corners (landmarks 48 and 54)."""
        return (self.landmarks[48] + self.landmarks[54]) * 0.5


@dataclass(eq=False)
class AlignedFace:
    """An FFHQ-style square crop of one face and the exact transform between crop and photo."""

    image: Image.Image
    face: Face
    crop_to_photo: np.ndarray
    photo_size: tuple[int, int]

    @property
    def output_size(self) -> int:
        return self.image.width

    @property
    def photo_to_crop(self) -> np.ndarray:
        return np.linalg.inv(self.crop_to_photo)

    def to_photo(self, points: np.ndarray) -> np.ndarray:
        """Crop coordinates [..., 2] → photo coordinates."""
        return _apply(self.crop_to_photo, points)

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """Photo coordinates [..., 2] → crop coordinates."""
        return _apply(self.photo_to_crop, points)

    @property
    def landmarks(self) -> np.ndarray:
        """The face's 68 landmarks in crop coordinates."""
        return self.to_crop(self.face.landmarks)

    def array(self) -> np.ndarray:
        """The crop as uint8 [S, S, 3]."""
        return np.asarray(self.image)


@dataclass
class Alignment:
    """Result of :meth:`FaceAligner.align_all`: the aligned faces (largest first) and the faces that were
    found but left out for being smaller than the aligner's ``min_face_size``."""

    aligned: list[AlignedFace]
    too_small: list[Face]

    def __len__(self) -> int:
        return len(self.aligned)

    def __iter__(self) -> Iterator[AlignedFace]:
        return iter(self.aligned)

    def __getitem__(self, i: int) -> AlignedFace:
        return self.aligned[i]


# ------------------------------------------------------------------------------------------ helpers


def _as_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image array, got {arr.dtype}")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    raise ValueError(f"expected an image array of shape [H, W, 3], got {arr.shape}")


def _as_rgb_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(image if image.mode == "RGB" else image.convert("RGB")))
    return np.ascontiguousarray(np.asarray(_as_pil(image)))


def _pad_reflect_blend(img: Image.Image, pad: tuple[int, int, int, int], qsize: float) -> Image.Image:
    """FFHQ padding: reflect the image outwards, blur the reflection (and a band inside the edge), and fade
    it towards the median colour, so the padding reads as out-of-focus background rather than a mirror."""
    left, top, right, bottom = pad
    a = np.asarray(img, dtype=np.float32)
    a = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="reflect")
    h, w, _ = a.shape
    yy, xx = np.ogrid[:h, :w]
    xx = xx.astype(np.float32)[..., None]
    yy = yy.astype(np.float32)[..., None]
    mask = np.maximum(
        1.0 - np.minimum(xx / max(left, 1), (w - 1 - xx) / max(right, 1)),
        1.0 - np.minimum(yy / max(top, 1), (h - 1 - yy) / max(bottom, 1)),
    )
    blur = qsize * 0.02
    if blur > 0:
        blurred = np.asarray(
            Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur)),
            dtype=np.float32,
        )
        a += (blurred - a) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    a += (np.median(a, axis=(0, 1)) - a) * np.clip(mask, 0.0, 1.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")


def align_face(image: ImageLike, face: Face | np.ndarray, output_size: int = 256) -> AlignedFace:
    """Cut the FFHQ-style crop of ``face`` (a :class:`Face`, or 68 landmarks) out of ``image``.

    Needs no models; :meth:`FaceAligner.align` is this function.
    """
    if output_size < 8:
        raise ValueError(f"output_size must be at least 8, got {output_size}")
    if not isinstance(face, Face):
        lm = np.asarray(face, dtype=np.float64)
        (bx0, by0), (bx1, by1) = lm.min(axis=0), lm.max(axis=0)
        face = Face(box=(float(bx0), float(by0), float(bx1), float(by1)), landmarks=lm, score=math.nan)
    img = _as_pil(image)
    W, H = img.size
    S = int(output_size)

    # Work in continuous coordinates (pixel corners at integers): photo index coordinates + 0.5.
    quad = face.quad + 0.5
    qsize = face.crop_size

    # Shrink: a face much larger than the output is first reduced (by an integer factor, as FFHQ does).
    shrink = int(np.floor(qsize / S * 0.5))
    if shrink > 1:
        ww, wh = max(1, round(W / shrink)), max(1, round(H / shrink))
        sx, sy = ww / W, wh / H
    else:
        ww, wh, sx, sy = W, H, 1.0, 1.0
    quad = quad * np.array([sx, sy])
    qsize = qsize * math.sqrt(sx * sy)

    # Crop: the quad's bounding box plus a border, clipped to the (virtual, shrunk) image.
    border = max(round(qsize * 0.1), 3)
    lo = np.floor(quad.min(axis=0)).astype(int)
    hi = np.ceil(quad.max(axis=0)).astype(int)
    cx0, cy0 = max(lo[0] - border, 0), max(lo[1] - border, 0)
    cx1, cy1 = min(hi[0] + border, ww), min(hi[1] + border, wh)
    if cx1 <= cx0 or cy1 <= cy0:
        raise ValueError("the face lies entirely outside the image")
    if shrink > 1:
        box = (cx0 / sx, cy0 / sy, cx1 / sx, cy1 / sy)
        work = img.resize((cx1 - cx0, cy1 - cy0), Image.Resampling.LANCZOS, box=box)
    else:
        work = img.crop((cx0, cy0, cx1, cy1))
    quad = quad - np.array([cx0, cy0])

    # Pad: where the square reaches past the image, reflect, blur and fade (FFHQ's recipe).
    lo = np.floor(quad.min(axis=0)).astype(int)
    hi = np.ceil(quad.max(axis=0)).astype(int)
    pad = (
        max(-lo[0] + border, 0),
        max(-lo[1] + border, 0),
        max(hi[0] - work.width + border, 0),
        max(hi[1] - work.height + border, 0),
    )
    if max(pad) > border - 4:
        p = max(round(qsize * 0.3), 1)
        pad = tuple(max(v, p) for v in pad)
        work = _pad_reflect_blend(work, pad, qsize)
        quad = quad + np.array([pad[0], pad[1]])

    # Warp the quad onto a square, super-sampled when the source is denser than the output, then reduce.
    ss = int(min(max(math.ceil(qsize / S), 1), 4))
    T = S * ss
    out = work.transform((T, T), Image.Transform.QUAD, tuple(quad.flatten()), Image.Resampling.BILINEAR)
    if ss > 1:
        out = out.resize((S, S), Image.Resampling.LANCZOS)

    return AlignedFace(image=out, face=face, crop_to_photo=crop_to_photo_matrix(face.quad, S), photo_size=(W, H))


# ------------------------------------------------------------------------------------------ aligner


class FaceAligner:
    """Finds faces with dlib and cuts FFHQ-style crops. Models are loaded once, in the constructor.

    ``detector``: ``"hog"`` (fast on CPU, frontal faces) or ``"cnn"`` (dlib's MMOD CNN: more poses, much
    slower on CPU). ``upsample``: how many times the detector doubles the image (1 finds faces down to
    about 40 px). ``min_face_size``: faces whose box is smaller (px, longer side) are reported in
    ``too_small`` and not aligned. ``max_detect_side``: the longest side of the image the detector scans,
    upsampling included; a photo whose side × 2^upsample exceeds it is rescaled once to that side for
    *detection* only (landmarks are always found at full resolution). It bounds detection time (HOG at
    2048 px: under a second on one CPU core) at the cost of missing faces in big photos smaller than about
    40 × side / 2048 px. ``threshold``: detections scoring below it are dropped (HOG: it is
    dlib's ``adjust_threshold``; CNN: a floor on the MMOD confidence). The default 0.3 is above dlib's 0
    because at ``upsample=1`` the HOG detector fires on round badges and patches with scores up to about
    0.15 (three such on the test group photo), while clear faces score about 0.8 and more.
    """

    def __init__(
        self,
        predictor_path: str | Path | None = None,
        detector: Literal["hog", "cnn"] = "hog",
        upsample: int = 1,
        min_face_size: int = 64,
        *,
        cnn_model_path: str | Path | None = None,
        max_detect_side: int = 2048,
        threshold: float = 0.3,
    ) -> None:
        import dlib  # imported here so that the rest of ``gan`` works without dlib installed

        if detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', got {detector!r}")
        self.predictor_path = Path(predictor_path) if predictor_path else default_model_path(PREDICTOR_68)
        if not self.predictor_path.is_file():
            raise FileNotFoundError(f"landmark model not found: {self.predictor_path}")
        self.detector_kind = detector
        self.upsample = int(upsample)
        self.min_face_size = int(min_face_size)
        self.max_detect_side = int(max_detect_side)
        self.threshold = float(threshold)
        self._dlib = dlib
        self._lock = threading.Lock()
        self._predictor = dlib.shape_predictor(str(self.predictor_path))
        if detector == "hog":
            self._detector = dlib.get_frontal_face_detector()
        else:
            path = Path(cnn_model_path) if cnn_model_path else default_model_path(CNN_DETECTOR)
            if not path.is_file():
                raise FileNotFoundError(f"CNN face detector model not found: {path}")
            self._detector = dlib.cnn_face_detection_model_v1(str(path))

    def detect(self, image: ImageLike) -> list[Face]:
        """Every face in the image, largest first, whatever its size."""
        rgb = _as_rgb_array(image)
        H, W = rgb.shape[:2]
        longest = max(H, W)
        if longest * 2**self.upsample <= self.max_detect_side:
            det, fx, fy, upsample = rgb, 1.0, 1.0, self.upsample  # dlib upsamples by itself
        else:  # rescale once to the budget instead (down for big photos, up by less than 2^upsample)
            scale = self.max_detect_side / longest
            dw, dh = max(1, round(W * scale)), max(1, round(H * scale))
            small = Image.fromarray(rgb).resize((dw, dh), Image.Resampling.BILINEAR, reducing_gap=2.0)
            det, fx, fy, upsample = np.ascontiguousarray(np.asarray(small)), W / dw, H / dh, 0

        dlib = self._dlib
        faces: list[Face] = []
        with self._lock:
            if self.detector_kind == "hog":
                rects, scores, _ = self._detector.run(det, upsample, self.threshold)
                found = list(zip(rects, scores, strict=True))
            else:
                found = [(d.rect, d.confidence) for d in self._detector(det, upsample)]
                found = [(r, sc) for r, sc in found if sc >= self.threshold]
            for rect, score in found:
                # dlib boxes are inclusive pixel ranges; take their pixel-edge extent back to the photo.
                x0, y0 = rect.left() * fx, rect.top() * fy
                x1, y1 = (rect.right() + 1) * fx, (rect.bottom() + 1) * fy
                box = dlib.rectangle(round(x0), round(y0), round(x1) - 1, round(y1) - 1)
                shape = self._predictor(rgb, box)  # landmarks always at full resolution
                lm = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
                faces.append(Face(box=(x0, y0, x1, y1), landmarks=lm, score=float(score)))
        faces.sort(key=lambda f: (-f.size, -f.score))
        return faces

    def align(self, image: ImageLike, face: Face, output_size: int = 256) -> AlignedFace:
        """The FFHQ-style crop of one detected face (see :func:`align_face`)."""
        return align_face(image, face, output_size)

    def align_all(self, image: ImageLike, output_size: int = 256, largest_only: bool = False) -> Alignment:
        """Detect and align every face at least ``min_face_size`` big (or only the largest).

        Raises :class:`NoFaceError` when there is no face and :class:`FaceTooSmallError` when every face is
        too small; otherwise too-small faces are listed in ``Alignment.too_small``.
        """
        img = _as_pil(image)
        faces = self.detect(img)
        if not faces:
            raise NoFaceError()
        usable = [f for f in faces if f.size >= self.min_face_size]
        too_small = [f for f in faces if f.size < self.min_face_size]
        if not usable:
            raise FaceTooSmallError(too_small, self.min_face_size)
        if largest_only:
            usable = usable[:1]
        return Alignment(aligned=[align_face(img, f, output_size) for f in usable], too_small=too_small)


# ------------------------------------------------------------------------------------------ paste back


def _feather_mask(size: int, feather: float) -> Image.Image:
    """Square mask, 1 inside and ramping smoothly to 0 over ``feather`` × size at every edge."""
    n = (np.arange(size, dtype=np.float64) + 0.5) / size
    d = np.minimum(n, 1.0 - n)
    r = np.ones_like(d) if feather <= 0 else np.clip(d / feather, 0.0, 1.0)
    r = r * r * (3.0 - 2.0 * r)  # smoothstep
    m = np.outer(r, r)
    return Image.fromarray(np.clip(np.rint(m * 255.0), 0, 255).astype(np.uint8), "L")


def paste_back(
    photo: ImageLike,
    toon_crop: ImageLike,
    aligned: AlignedFace,
    feather: float = 0.1,
    *,
    in_place: bool = False,
) -> Image.Image:
    """Warp ``toon_crop`` (a square image standing for ``aligned.image``, any size) back into ``photo`` and
    blend it in with a feathered mask that is zero outside the crop's quad.

    ``feather``: width of the soft edge as a fraction of the crop side (0 to 0.5; 0 is a hard edge).
    Pixels where the mask is zero — everything outside the quad, and its outer feather band's edge — keep
    their exact values. ``in_place`` writes into ``photo`` (a Pillow RGB image) instead of a copy.
    """
    if not 0.0 <= feather <= 0.5:
        raise ValueError(f"feather must be within [0, 0.5], got {feather}")
    if isinstance(photo, Image.Image) and photo.mode == "RGB":
        base = photo
    else:
        base, in_place = _as_pil(photo), False
    if base.size != tuple(aligned.photo_size):
        raise ValueError(f"photo is {base.size[0]}x{base.size[1]} but the face was aligned on {aligned.photo_size}")
    toon = _as_pil(toon_crop)
    if toon.width != toon.height:
        raise ValueError(f"toon crop must be square, got {toon.size}")

    # Crop corners in continuous photo coordinates (pixel corners at integers).
    S0 = aligned.output_size
    corners = aligned.to_photo(np.array([[-0.5, -0.5], [-0.5, S0 - 0.5], [S0 - 0.5, S0 - 0.5], [S0 - 0.5, -0.5]]))
    corners = corners + 0.5
    side = float(np.hypot(*(corners[3] - corners[0])))

    # A crop much denser than the face's footprint in the photo is reduced first (bilinear would alias).
    if toon.width > 1.5 * side:
        toon = toon.resize((max(2, math.ceil(side)), max(2, math.ceil(side))), Image.Resampling.LANCZOS)
    S = toon.width

    W, H = base.size
    lo = np.floor(corners.min(axis=0)).astype(int) - 1
    hi = np.ceil(corners.max(axis=0)).astype(int) + 1
    x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
    x1, y1 = min(int(hi[0]), W), min(int(hi[1]), H)
    out = base if in_place else base.copy()
    if x1 <= x0 or y1 <= y0:
        return out

    # Continuous crop coords (size S) → continuous photo coords, then its inverse from the region's pixels.
    du = (corners[3] - corners[0]) / S
    dv = (corners[1] - corners[0]) / S
    fwd = np.array([[du[0], dv[0], corners[0][0]], [du[1], dv[1], corners[0][1]], [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(fwd) @ np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
    data = tuple(inv[:2].flatten())
    size = (x1 - x0, y1 - y0)
    warped = toon.transform(size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    mask = _feather_mask(S, feather).transform(
        size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=0
    )
    region = base.crop((x0, y0, x1, y1))
    out.paste(Image.composite(warped, region, mask), (x0, y0))
    return out
