"""Completeness of untrusted images is judged by structure: data after the image's own end (a motion photo's
video after a JPEG, junk after a PNG's IEND) is allowed, and a file that ends before its end is refused.

Real files from the committed portrait, re-encoded with Pillow; every random choice is seeded, and each case
is tried many times, so a check that depends on what the trailing bytes happen to contain shows up.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from gan.imageio import BadImageError, decode_image

FIXTURE = Path(__file__).parent / "fixtures" / "astronaut.png"
TRIES = 40


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    with Image.open(FIXTURE) as im:
        return im.convert("RGB").resize((256, 256))


def encoded(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def exif_with_orientation(img: Image.Image) -> bytes:
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° when shown
    exif[0x010F] = "Phone"
    return exif.tobytes()


def with_thumbnail_segment(jpeg: bytes, thumbnail: bytes) -> bytes:
    """The JPEG with an APP1 segment right after SOI that holds a whole second JPEG, as cameras embed an
    EXIF thumbnail: its SOS and EOI markers sit inside a segment and must be skipped by length."""
    payload = b"Exif\0\0" + thumbnail
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def jpeg_variants(img: Image.Image) -> dict[str, bytes]:
    thumb = encoded(img.resize((32, 32)), "JPEG", quality=70)
    return {
        "baseline": encoded(img, "JPEG", quality=90),
        "progressive": encoded(img, "JPEG", quality=85, progressive=True, optimize=True),
        "exif": encoded(img, "JPEG", quality=90, exif=exif_with_orientation(img)),
        "progressive-exif": encoded(img, "JPEG", progressive=True, exif=exif_with_orientation(img)),
        "restart-markers": encoded(img, "JPEG", restart_marker_blocks=2),
        "grey-444": encoded(img.convert("L"), "JPEG", quality=95),
        "subsampling-444": encoded(img, "JPEG", quality=95, subsampling=0),
        "thumbnail-segment": with_thumbnail_segment(encoded(img, "JPEG"), thumb),
        "fill-bytes": encoded(img, "JPEG")[:-2] + b"\xff\xff\xff\xd9",  # FF fill bytes may precede a marker
    }


def random_trailer(rng: np.random.Generator) -> bytes:
    """Bytes a phone or a broken uploader might append: random data laced with JPEG markers (EOI, SOI, SOS),
    an MP4 header, a second JPEG, or nothing but markers."""
    kind = int(rng.integers(5))
    body = bytearray(rng.bytes(int(rng.integers(1, 3000))))
    if kind == 0:  # markers at random places
        for marker in (b"\xff\xd9", b"\xff\xd8", b"\xff\xda", b"\xff\xd9"):
            at = int(rng.integers(len(body) + 1))
            body[at:at] = marker
    elif kind == 1:  # a motion photo: an MP4 'ftyp' box and media data
        body = bytearray(struct.pack(">I", 24) + b"ftypmp42" + b"\0" * 12 + bytes(body))
    elif kind == 2:  # an SOS with no EOI after it: the old last-SOS heuristic refused this
        body = bytearray(b"\xff\xda\x00\x0c" + bytes(body).replace(b"\xff\xd9", b"\xff\x00"))
    elif kind == 3:  # a second image (MPO-like)
        body = bytearray(encoded(Image.new("RGB", (8, 8), (200, 10, 10)), "JPEG"))
    else:  # just the start of another JPEG
        body = bytearray(b"\xff\xd8\xff\xe0" + bytes(body[:64]))
    return bytes(body)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data))


@pytest.mark.parametrize("lenient_pillow", [False, True], ids=["strict", "lenient-global"])
def test_jpeg_with_trailing_bytes_is_accepted(portrait, lenient_pillow, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_pillow)
    rng = np.random.default_rng(6)
    for name, jpeg in jpeg_variants(portrait).items():
        expected = pixels(jpeg)
        for attempt in range(TRIES):
            trailer = random_trailer(rng)
            got = pixels(jpeg + trailer)  # raises BadImageError("... cut off ...") if judged incomplete
            assert np.array_equal(got, expected), (name, attempt)


def test_the_old_heuristic_case(portrait):
    """Trailing data holding an SOS marker and no EOI after it: the old check (the last SOS anywhere must be
    followed by an EOI) called this truncated."""
    jpeg = jpeg_variants(portrait)["baseline"]
    assert np.array_equal(pixels(jpeg + b"\xff\xda\x00\x0c motion photo video"), pixels(jpeg))


def scan_data_start(jpeg: bytes) -> int:
    """Offset of the first byte after the first SOS segment's header (segments before it skipped by length,
    so an SOS inside an embedded thumbnail does not count)."""
    pos = 2
    while True:
        marker, length = struct.unpack_from(">xBH", jpeg, pos)
        pos += 2 + length
        if marker == 0xDA:
            return pos


@pytest.mark.parametrize("lenient_pillow", [False, True], ids=["strict", "lenient-global"])
def test_cut_jpeg_is_refused_as_truncated(portrait, lenient_pillow, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_pillow)
    rng = np.random.default_rng(7)
    for name, jpeg in jpeg_variants(portrait).items():
        first_scan = scan_data_start(jpeg)
        cuts = {len(jpeg) - k for k in (1, 2, 3)} | {int(c) for c in rng.integers(first_scan, len(jpeg), TRIES)}
        for cut in sorted(cuts):
            with pytest.raises(BadImageError, match="cut off while uploading") as info:
                decode_image(jpeg[:cut])
            assert info.value.reason == "truncated", (name, cut)
        for cut in rng.integers(4, first_scan, 10):  # in the headers, which Pillow cannot even open
            with pytest.raises(BadImageError) as info:
                decode_image(jpeg[: int(cut)])
            assert info.value.reason == "truncated", (name, cut)


@pytest.mark.parametrize("lenient_pillow", [False, True], ids=["strict", "lenient-global"])
def test_png_trailing_bytes_accepted_and_cuts_refused(portrait, lenient_pillow, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_pillow)
    png = encoded(portrait, "PNG")
    expected = pixels(png)
    fake_iend = b"\0\0\0\0IEND\xaeB`\x82"
    rng = np.random.default_rng(8)
    for attempt in range(TRIES):
        trailer = rng.bytes(int(rng.integers(1, 500))) + (fake_iend if attempt % 2 else b"")
        assert np.array_equal(pixels(png + trailer), expected), attempt
    iend_at = len(png) - 12
    pixel_cuts = [int(c) for c in rng.integers(9, iend_at, TRIES)]
    for cut, tail in [(len(png) - 1, b""), (iend_at, b"")] + [(c, t) for c in pixel_cuts for t in (b"", fake_iend)]:
        with pytest.raises(BadImageError) as info:  # an IEND after a cut does not complete the cut chunk
            decode_image(png[:cut] + tail)
        assert info.value.reason == "truncated", (cut, tail)


@pytest.mark.parametrize("lenient_pillow", [False, True], ids=["strict", "lenient-global"])
def test_other_formats_with_trailing_bytes(portrait, lenient_pillow, monkeypatch):
    """WebP (its RIFF length), GIF (its blocks up to the trailer) and BMP (its pixel array) allow data after
    their end; cut short, they are refused whether or not Pillow pads truncated files (a GIF's missing
    trailer only when it does, as some encoders omit it)."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_pillow)
    small = portrait.resize((64, 64))
    rng = np.random.default_rng(9)
    frames = [small, small.rotate(90)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    files = {
        "WEBP": encoded(small, "WEBP", quality=90),
        "GIF": gif.getvalue(),
        "BMP": encoded(small, "BMP"),
    }
    for fmt, data in files.items():
        expected = pixels(data)
        for attempt in range(TRIES // 4):
            trailer = rng.bytes(int(rng.integers(1, 300))) + b";"
            assert np.array_equal(pixels(data + trailer), expected), (fmt, attempt)
        cuts = [len(data) // 4, len(data) - 1]
        if fmt == "GIF" and not lenient_pillow:
            cuts = cuts[:1]  # only the first frame is read; without the global flag a missing trailer is let be
        for cut in cuts:
            with pytest.raises(BadImageError) as info:
                decode_image(data[:cut])
            assert info.value.reason == "truncated", (fmt, cut)
