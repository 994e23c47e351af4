"""Safe decoding of untrusted image bytes (photos sent by users) into RGB Pillow images.

Every refusal is a :class:`BadImageError` (a ``ValueError``) whose message can be shown to the user as it
is, and whose ``reason`` is a short machine-readable code for callers that map errors to their own texts.

What is checked, in order:

* the byte count (``max_bytes``), before anything is parsed;
* the format, from the header, against an allow-list (``formats``); anything else is "not an image";
* the declared pixel count (``max_pixels``), from the header, *before* any pixel is decoded, so a tiny
  file declaring 20 000 × 20 000 pixels is refused in microseconds without allocating it (Pillow's own
  ``DecompressionBombError``/``DecompressionBombWarning`` are turned into the same refusal);
* a full decode of the first frame (animated GIF/WebP/PNG: the first frame only), and a check that the
  file is complete. Pillow refuses truncated pixel data only while the process-wide
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is false, and accepts files cut off after the last pixel (a
  PNG without its checksum and ``IEND``, a JPEG without its end marker). This module never changes that
  flag; it checks the file's own structure instead, walking it from the start to the image's end: a JPEG's
  segments and scans up to its end-of-image marker, a PNG's chunks up to ``IEND``, a WebP's RIFF length
  (and, only when the flag is on, a GIF's blocks up to its trailer, which some encoders omit, and a BMP's
  pixel array). Bytes after that end are allowed: phones append a video to a JPEG ("motion photos");
* EXIF orientation is applied (``ImageOps.exif_transpose``), so the result is the upright view;
* every mode becomes 8-bit RGB: palette, grey, CMYK and YCbCr are converted, transparency is flattened
  onto white, 16-bit and float grey are scaled (Pillow's own conversion would clip them).
"""

from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["ACCEPTED_FORMATS", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "BadImageError", "decode_image", "load_image"]

#: Formats accepted from users: what phones, browsers and chat apps send. TIFF, EPS, PSD and Pillow's
#: other decoders are left out on purpose (large attack surface, never a selfie).
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # JPEG includes MPO
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024

_SUPPORTED_TEXT = "JPEG, PNG, WebP, GIF or BMP"


class BadImageError(ValueError):
    """The bytes are not an acceptable image. ``str(err)`` is a user-facing sentence; ``reason`` is one of
    ``empty``, ``too_many_bytes``, ``not_an_image``, ``too_many_pixels``, ``truncated``, ``unsupported``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _too_many_pixels(max_pixels: int, size: tuple[int, int] | None = None) -> BadImageError:
    limit = f"{max_pixels / 1e6:g} megapixels"
    what = f" ({size[0]} x {size[1]} pixels)" if size else ""
    return BadImageError(
        f"The image is too large{what}. Send a photo of at most {limit} (a normal phone photo is fine).",
        "too_many_pixels",
    )


def _truncated() -> BadImageError:
    return BadImageError(
        "The image file is incomplete or damaged (it may have been cut off while uploading). Send it again.",
        "truncated",
    )


# The end of a JPEG scan's entropy-coded data: an FF followed by a byte that makes it a marker (after fill
# bytes, the last FF). FF00 is a stuffed data byte and FFD0-FFD7 are restart markers inside the scan. A
# fixed two-byte pattern: with "FF+" the search is ten times slower on a 14 MB photo.
_SCAN_END = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_JPEG_NO_LENGTH = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RSTn: markers without a segment


def _jpeg_end(data: bytes) -> int | None:
    """Offset just past the end-of-image marker that closes the JPEG starting at ``data[0]``, found by walking
    its segments (marker, length, and after each start-of-scan the entropy-coded data); ``None`` when the data
    ends first. Bytes after that marker (a motion photo's video, an MPO's second image) are never read, so
    markers inside them cannot fool the check."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return None
    pos, scans = 2, 0
    while True:
        pos = data.find(b"\xff", pos)  # like libjpeg, skip stray bytes before a marker ...
        if pos < 0:
            return None
        while pos < n and data[pos] == 0xFF:  # ... and FF fill bytes
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return pos if scans else None
        if marker == 0x00 or marker in _JPEG_NO_LENGTH:  # a stray FF00 is skipped by libjpeg too
            continue
        if pos + 2 > n:
            return None
        (length,) = struct.unpack_from(">H", data, pos)
        pos += length
        if length < 2 or pos > n:
            return None
        if marker == 0xDA:
            scans += 1
            scan_end = _SCAN_END.search(data, pos)
            if scan_end is None:
                return None
            pos = scan_end.start()


def _png_end(data: bytes) -> int | None:
    """Offset just past the ``IEND`` chunk, found by walking the chunks (length, type, data, CRC)."""
    pos, n = 8, len(data)
    while pos + 12 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        pos += 12 + length
        if pos > n:
            return None
        if kind == b"IEND":
            return pos
    return None


def _gif_end(data: bytes) -> int | None:
    """Offset just past the GIF trailer, found by walking the blocks (extensions and images, each a chain of
    length-prefixed sub-blocks). Bytes that start no block are skipped, as Pillow does."""
    n = len(data)
    if n < 13:
        return None
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # after the global colour table
    while pos < n:
        block = data[pos]
        if block == 0x3B:
            return pos + 1
        if block == 0x21:  # extension: introducer, label, sub-blocks
            pos += 2
        elif block == 0x2C:  # image: descriptor, local colour table, LZW code size, sub-blocks
            if pos + 10 > n:
                return None
            flags = data[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
        else:
            pos += 1
            continue
        while pos < n and data[pos]:  # sub-blocks up to the zero-length terminator
            pos += 1 + data[pos]
        if pos >= n:
            return None
        pos += 1
    return None


def _bmp_complete(data: bytes) -> bool:
    """Whether the pixel array the header declares is all there (uncompressed BMPs; for compressed ones the
    declared image size, when the header gives one)."""
    if len(data) < 26:
        return False
    (pixels_at, header_size) = struct.unpack_from("<II", data, 10)
    if header_size == 12:  # OS/2 core header
        width, height, _, bits = struct.unpack_from("<HHHH", data, 18)
        compression, image_size = 0, 0
    elif len(data) >= 38:
        width, height, _, bits, compression, image_size = struct.unpack_from("<iiHHII", data, 18)
    else:
        return False
    if compression in (0, 3, 6):  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS: rows padded to 4 bytes
        image_size = (abs(width) * bits + 31) // 32 * 4 * abs(height)
    return len(data) >= pixels_at + image_size


def _looks_complete(data: bytes, fmt: str | None, lenient: bool) -> bool:
    """Format-level completeness check, independent of Pillow's global truncation flag. Data after the
    image's own end is allowed (phones append a video to a JPEG to make a motion photo)."""
    if fmt in ("JPEG", "MPO"):
        return _jpeg_end(data) is not None
    if fmt == "PNG":
        return _png_end(data) is not None
    if fmt == "WEBP":
        if len(data) < 12 or data[:4] != b"RIFF":
            return False
        (riff_len,) = struct.unpack("<I", data[4:8])
        return len(data) >= riff_len + 8
    # Pillow refuses truncated GIF and BMP pixel data itself unless the global flag is on. Only then is the
    # structure checked: some encoders omit the GIF trailer.
    if fmt == "GIF" and lenient:
        return _gif_end(data) is not None
    if fmt == "BMP" and lenient:
        return _bmp_complete(data)
    return True


def _cut_short(data: bytes, formats: tuple[str, ...]) -> bool:
    """Whether ``data`` is more than the signature of an accepted JPEG, PNG or WebP and its structure runs
    past its last byte: for a file Pillow could not even open, this tells a cut-off upload from a damaged or
    foreign one (a bare signature is "not an image")."""
    if data[:3] == b"\xff\xd8\xff" and len(data) > 3 and "JPEG" in formats:
        return _jpeg_end(data) is None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 8 and "PNG" in formats:
        return _png_end(data) is None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) > 12 and "WEBP" in formats:
        return not _looks_complete(data, "WEBP", lenient=False)
    return False


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        hi = float(a.max()) if a.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and hi > 255):
            a = a / 257.0  # 16-bit samples
        elif mode == "F" and hi <= 1.0:
            a = a * 255.0  # float in [0, 1]
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    formats: tuple[str, ...] = ACCEPTED_FORMATS,
) -> Image.Image:
    """Decode untrusted image bytes into an upright 8-bit RGB image, or raise :class:`BadImageError`."""
    if not data:
        raise BadImageError("The file is empty. Send a photo.", "empty")
    if len(data) > max_bytes:
        raise BadImageError(
            f"The file is too big ({len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:g} MiB). "
            "Send a smaller photo.",
            "too_many_bytes",
        )
    data = bytes(data)
    try:
        im = Image.open(io.BytesIO(data), formats=list(formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Raised from the header alone (the warning only when a caller turned warnings into errors). Pillow's
        # own limit is process-wide; report whichever limit is the lower.
        pillow_limit = Image.MAX_IMAGE_PIXELS or max_pixels
        if isinstance(e, Image.DecompressionBombError):
            pillow_limit *= 2
        raise _too_many_pixels(min(max_pixels, pillow_limit)) from e
    except Exception as e:
        if _cut_short(data, formats):  # the header itself was cut off
            raise _truncated() from e
        if isinstance(e, UnidentifiedImageError):
            raise BadImageError(
                f"This is not an image I can read. Send a photo ({_SUPPORTED_TEXT}).", "not_an_image"
            ) from e
        # a malformed header can surface as almost any exception from a plugin
        raise BadImageError(
            f"The image could not be read (damaged header). Send a photo ({_SUPPORTED_TEXT}).", "not_an_image"
        ) from e

    with im:
        width, height = im.size
        if width < 1 or height < 1:
            raise BadImageError("The image is empty (zero pixels). Send a photo.", "not_an_image")
        if width * height > max_pixels:
            raise _too_many_pixels(max_pixels, (width, height))
        fmt = im.format
        try:
            im.seek(0)  # animated images: the first frame
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _too_many_pixels(max_pixels) from e
        except Exception as e:  # OSError "image file is truncated", SyntaxError "broken PNG file", zlib …
            raise _truncated() from e
        if not _looks_complete(data, fmt, lenient=bool(ImageFile.LOAD_TRUNCATED_IMAGES)):
            raise _truncated()
        try:
            upright = ImageOps.exif_transpose(im)  # a copy; for animations, of the current (first) frame
        except Exception:  # unreadable EXIF: keep the stored orientation rather than refuse the photo
            upright = im.copy()
        try:
            rgb = _to_rgb(upright)
        except Exception as e:
            msg = f"The image uses a colour format I cannot read ({im.mode}). Send a photo ({_SUPPORTED_TEXT})."
            raise BadImageError(msg, "unsupported") from e
        rgb.load()
    rgb.info.pop("exif", None)  # orientation is applied; drop it so nothing applies it twice
    return rgb


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    formats: tuple[str, ...] = ACCEPTED_FORMATS,
) -> Image.Image:
    """Read a file and :func:`decode_image` it (the size is checked before the file is read)."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise BadImageError(
            f"The file is too big ({size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:g} MiB). "
            "Send a smaller photo.",
            "too_many_bytes",
        )
    return decode_image(path.read_bytes(), max_pixels=max_pixels, max_bytes=max_bytes, formats=formats)
