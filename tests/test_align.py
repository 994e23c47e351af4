"""Face alignment (dlib + FFHQ recipe), paste-back, and safe image decoding.

Uses the committed public-domain portrait ``tests/fixtures/astronaut.png``; the dlib models come from the
``face-recognition-models`` package (skipped when it or dlib is absent).
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from gan.imageio import BadImageError, decode_image, load_image

FIXTURE = Path(__file__).parent / "fixtures" / "astronaut.png"

pytest.importorskip("dlib")
align = pytest.importorskip("gan.align")


@pytest.fixture(scope="module")
def aligner():
    try:
        return align.FaceAligner()
    except FileNotFoundError as e:  # face-recognition-models not installed
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return load_image(FIXTURE)


@pytest.fixture(scope="module")
def face(aligner, astronaut):
    faces = aligner.detect(astronaut)
    assert len(faces) == 1
    return faces[0]


def ffhq_eye_positions(landmarks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the FFHQ recipe puts the two eye centres in a size² crop, worked out from the quad's
    definition (centre c, half-sides x and y) rather than through the module's matrices."""
    eye_l, eye_r = landmarks[36:42].mean(0), landmarks[42:48].mean(0)
    eye_avg = (eye_l + eye_r) / 2
    e, m = eye_r - eye_l, (landmarks[48] + landmarks[54]) / 2 - eye_avg
    x = e - np.array([m[1], m[0]]) * [-1, 1]
    x = x / np.hypot(*x) * max(np.hypot(*e) * 2.0, np.hypot(*m) * 1.8)
    y = np.array([-x[1], x[0]])
    c = eye_avg + 0.1 * m

    def crop(p):  # p = c + x·(2s - 1) + y·(2t - 1), with s, t in [0, 1] across the crop
        s = 0.5 + np.dot(p - c, x) / (2 * np.dot(x, x))
        t = 0.5 + np.dot(p - c, y) / (2 * np.dot(y, y))
        return np.array([s * size - 0.5, t * size - 0.5])  # pixel-centre coordinates

    return crop(eye_l), crop(eye_r)


def side_by_side(*parts: Image.Image) -> Image.Image:
    width, height = sum(p.width for p in parts), max(p.height for p in parts)
    out, x = Image.new("RGB", (width, height), (128, 128, 128)), 0
    for p in parts:
        out.paste(p, (x, height - p.height))
        x += p.width
    return out


def scaled(img: Image.Image, f: float) -> Image.Image:
    return img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------ alignment


def test_astronaut_one_face(face):
    x0, y0, x1, y1 = face.box
    assert 150 < (x0 + x1) / 2 < 290 and 60 < (y0 + y1) / 2 < 190  # her face, not the mission patch
    assert face.landmarks.shape == (68, 2) and face.size >= 64 and face.quad.shape == (4, 2)


@pytest.mark.parametrize("size", [256, 1024])
def test_eyes_level_and_at_ffhq_positions(aligner, astronaut, face, size):
    aligned = aligner.align(astronaut, face, output_size=size)
    assert aligned.image.size == (size, size) and aligned.image.mode == "RGB"
    exp_l, exp_r = ffhq_eye_positions(face.landmarks, size)
    # The module's transform agrees with the analytic positions exactly.
    np.testing.assert_allclose(aligned.to_crop(face.eye_left), exp_l, atol=1e-6)
    np.testing.assert_allclose(aligned.to_crop(face.eye_right), exp_r, atol=1e-6)
    # The pixels agree too: landmarks found again on the crop itself sit where the recipe says.
    again = aligner.detect(aligned.image)
    assert len(again) == 1
    k = size / 256
    assert abs(again[0].eye_left[1] - again[0].eye_right[1]) < 1.5 * k  # level
    assert np.abs(again[0].eye_left - exp_l).max() < 3 * k
    assert np.abs(again[0].eye_right - exp_r).max() < 3 * k


def test_rotated_face_comes_out_level(aligner, astronaut):
    tilted = astronaut.rotate(20, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(200, 200, 200))
    faces = aligner.detect(tilted)
    assert faces, "the tilted face should still be found"
    f = faces[0]
    assert abs(f.eye_left[1] - f.eye_right[1]) > 10  # visibly tilted in the photo
    again = aligner.detect(aligner.align(tilted, f, 256).image)
    assert len(again) == 1
    assert abs(again[0].eye_left[1] - again[0].eye_right[1]) < 1.5


def test_face_at_the_edge_is_padded(aligner, astronaut):
    cut = astronaut.crop((150, 40, 512, 400))  # the crop square now reaches past the top and left edges
    f = aligner.detect(cut)[0]
    aligned = aligner.align(cut, f, 128)
    S = aligned.output_size
    uv = np.stack(np.meshgrid(np.arange(S), np.arange(S)), -1).astype(np.float64)
    xy = aligned.to_photo(uv)
    outside = ((xy < -0.5) | (xy > np.array(cut.size) - 0.5)).any(-1)
    assert outside.mean() > 0.05
    arr = np.asarray(aligned.image, dtype=np.float64)
    assert arr[outside].mean() > 80 and (arr[outside].sum(-1) < 30).mean() < 0.01  # reflected, not black
    again = aligner.detect(aligned.image.resize((256, 256), Image.Resampling.LANCZOS))
    exp_l, exp_r = ffhq_eye_positions(f.landmarks, 256)
    assert len(again) == 1 and np.abs(again[0].eye_left - exp_l).max() < 3
    assert np.abs(again[0].eye_right - exp_r).max() < 3


def test_transform_maps_crop_back_onto_face(aligner, astronaut, face):
    aligned = aligner.align(astronaut, face, 256)
    S = aligned.output_size
    corners = np.array([[-0.5, -0.5], [-0.5, S - 0.5], [S - 0.5, S - 0.5], [S - 0.5, -0.5]])
    np.testing.assert_allclose(aligned.to_photo(corners), face.quad, atol=1e-9)
    np.testing.assert_allclose(aligned.crop_to_photo @ aligned.photo_to_crop, np.eye(3), atol=1e-9)
    # Eyes found on the crop, mapped back, land on the eyes found in the photo.
    again = aligner.detect(aligned.image)[0]
    assert np.abs(aligned.to_photo(again.eye_left) - face.eye_left).max() < 1.5
    assert np.abs(aligned.to_photo(again.eye_right) - face.eye_right).max() < 1.5
    # And the crop's pixels are the photo's pixels at the mapped positions (away from sharp edges).
    crop = np.asarray(aligned.image, dtype=np.float64)
    photo = np.asarray(astronaut, dtype=np.float64)
    uv = np.stack(np.meshgrid(np.arange(64, 192, 8), np.arange(64, 192, 8)), -1).reshape(-1, 2)
    xy = np.rint(aligned.to_photo(uv)).astype(int)
    diff = np.abs(crop[uv[:, 1], uv[:, 0]] - photo[xy[:, 1], xy[:, 0]]).mean()
    assert diff < 12


def test_paste_back_of_unchanged_crop_reproduces_photo(aligner, astronaut, face):
    aligned = aligner.align(astronaut, face, 256)
    out = align.paste_back(astronaut, aligned.image, aligned, feather=0.1)
    assert out.size == astronaut.size and out is not astronaut
    a, b = np.asarray(out, dtype=np.int16), np.asarray(astronaut, dtype=np.int16)
    # Where each photo pixel falls in the crop (normalised to [0, 1]).
    ys, xs = np.mgrid[: astronaut.height, : astronaut.width]
    uv = (aligned.to_crop(np.stack([xs, ys], -1).astype(np.float64)) + 0.5) / aligned.output_size
    inner = ((uv > 0.15) & (uv < 0.85)).all(-1)
    outside = ((uv < -0.01) | (uv > 1.01)).any(-1)
    assert inner.sum() > 10_000 and outside.sum() > 100_000
    assert np.abs(a - b)[inner].mean() < 3.0
    assert np.array_equal(a[outside], b[outside])  # untouched, bit for bit
    # A different "toon" changes the face and still nothing outside the quad; any crop size is accepted.
    toon = ImageOps.invert(aligned.image).resize((512, 512))
    out2 = np.asarray(align.paste_back(astronaut, toon, aligned), dtype=np.int16)
    assert np.abs(out2 - b)[inner].mean() > 60
    assert np.array_equal(out2[outside], b[outside])


def test_group_photo_every_face(aligner, astronaut):
    group = side_by_side(astronaut, scaled(ImageOps.mirror(astronaut), 0.8), scaled(astronaut, 0.4))
    result = aligner.align_all(group, output_size=128)
    assert len(result) == 2 and len(result.too_small) == 1  # 91 px, 73 px; the 37 px face is reported
    assert [a.face.size >= aligner.min_face_size for a in result] == [True, True]
    assert result.too_small[0].size < aligner.min_face_size
    centres = sorted(a.face.landmarks[30, 0] for a in result)  # nose tips
    assert centres[0] < 512 < centres[1] < 512 + 410
    assert all(a.image.size == (128, 128) for a in result)
    assert aligner.align_all(group, largest_only=True)[0].face.size == result[0].face.size
    # Three full-size astronauts: three faces, no mission patches.
    assert len(aligner.detect(side_by_side(astronaut, ImageOps.mirror(astronaut), astronaut))) == 3


def test_tiny_face_is_reported(aligner, astronaut):
    with pytest.raises(align.FaceTooSmallError, match="too small") as info:
        aligner.align_all(scaled(astronaut, 0.4))
    assert len(info.value.faces) == 1 and info.value.faces[0].size < 64
    assert "closer photo" in str(info.value)


@pytest.mark.parametrize("kind", ["gradient", "noise"])
def test_no_face(aligner, kind):
    rng = np.random.default_rng(0)
    if kind == "gradient":
        g = np.linspace(0, 255, 320)
        arr = np.stack([np.add.outer(g[:240] * 0.5, g * 0.5), np.tile(g, (240, 1)), np.full((240, 320), 90.0)], -1)
    else:
        arr = rng.integers(0, 256, (240, 320, 3))
    with pytest.raises(align.NoFaceError, match="No face found"):
        aligner.align_all(arr.astype(np.uint8))


def test_exif_rotated_jpeg_aligns_to_same_face(aligner, astronaut, face):
    upright = astronaut.crop((0, 0, 512, 400))  # not square, so a missed rotation would show in the size
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how a sideways camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif)
    decoded = decode_image(buf.getvalue())
    assert decoded.size == upright.size
    faces = aligner.detect(decoded)
    assert len(faces) == 1
    assert np.abs(faces[0].landmarks[36:48] - face.landmarks[36:48]).mean() < 2.0
    aligned = aligner.align(decoded, faces[0], 256)
    assert np.abs(aligned.to_crop(face.eye_left) - aligned.to_crop(faces[0].eye_left)).max() < 3.0


def test_numpy_and_pil_inputs_agree(aligner, astronaut, face):
    arr = np.asarray(astronaut)
    faces = aligner.detect(arr)
    np.testing.assert_array_equal(faces[0].landmarks, face.landmarks)
    a = np.asarray(aligner.align(arr, faces[0], 64).image)
    b = np.asarray(aligner.align(astronaut, face, 64).image)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------ decoding


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares width × height RGB pixels (its data is one empty zlib stream)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(1).bytes(4096),
        b"Hello! This is a text file, not a selfie.\n" * 20,
        b"",
        b"\x89PNG\r\n\x1a\n",
    ],
    ids=["random-bytes", "text", "empty", "png-signature-only"],
)
def test_not_an_image(data):
    with pytest.raises(BadImageError) as info:
        decode_image(data)
    assert info.value.reason in ("not_an_image", "empty")
    assert "Send" in str(info.value)


def test_text_file_via_load_image(tmp_path):
    p = tmp_path / "selfie.jpg"
    p.write_text("definitely not a JPEG\n")
    with pytest.raises(BadImageError, match="not an image"):
        load_image(p)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("lenient_pillow", [False, True], ids=["strict", "lenient-global"])
def test_truncated(astronaut, fmt, lenient_pillow, monkeypatch):
    data = encoded(astronaut, fmt)
    decode_image(data)  # the whole file is fine
    if lenient_pillow:  # another library in the process made Pillow pad truncated files
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for cut in (len(data) // 2, len(data) - 20, len(data) - 1):  # mid-pixels, in the checksum, the last byte
        with pytest.raises(BadImageError, match="incomplete") as info:
            decode_image(data[:cut])
        assert info.value.reason == "truncated"


@pytest.mark.parametrize("side", [20_000, 7_000])
def test_too_many_pixels_refused_from_header(side):
    data = png_header_only(side, side)
    assert len(data) < 100
    t0 = time.perf_counter()
    with pytest.raises(BadImageError, match="too large") as info:
        decode_image(data)
    assert time.perf_counter() - t0 < 1.0  # decoding 20 000² pixels would take far longer (and 1.2 GB)
    assert info.value.reason == "too_many_pixels" and "40 megapixels" in str(info.value)
    with pytest.raises(BadImageError, match="too large"):
        decode_image(encoded(Image.new("RGB", (300, 200)), "PNG"), max_pixels=50_000)


def test_too_many_bytes():
    with pytest.raises(BadImageError, match="too big") as info:
        decode_image(b"\0" * 2000, max_bytes=1000)
    assert info.value.reason == "too_many_bytes"


def test_modes_become_rgb(astronaut):
    small = astronaut.resize((48, 40))
    rgba = small.convert("RGBA")
    rgba.putalpha(0)
    cases = {
        "RGBA-transparent": (encoded(rgba, "PNG"), (255, 255, 255)),
        "P": (encoded(small.quantize(256), "PNG"), np.asarray(small.quantize(256).convert("RGB"))),
        "L": (encoded(small.convert("L"), "PNG"), None),
        "CMYK": (encoded(small.convert("CMYK"), "JPEG", quality=95), None),
        "I;16": (encoded(Image.fromarray(np.full((40, 48), 65535, np.uint16)), "PNG"), (255, 255, 255)),
        "I;16-mid": (encoded(Image.fromarray(np.full((40, 48), 32896, np.uint16)), "PNG"), (128, 128, 128)),
        "WEBP": (encoded(small, "WEBP", quality=90), None),
    }
    ref = np.asarray(small, dtype=np.float64)
    for name, (data, colour) in cases.items():
        im = decode_image(data)
        assert im.mode == "RGB" and im.size == (48, 40), name
        arr = np.asarray(im, dtype=np.float64)
        if colour is not None:  # an expected colour, or an expected image
            assert np.abs(arr - np.asarray(colour, dtype=np.float64)).max() <= 1, name
        elif name != "L":
            assert np.abs(arr - ref).mean() < 12, name


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    im = decode_image(buf.getvalue())
    assert im.mode == "RGB" and im.getpixel((5, 5)) == (255, 0, 0)
