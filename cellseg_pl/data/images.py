"""Image files: which files are images, how they are listed, read, decoded and resized, and what their first bytes
say (kind, size, truncation) before anything is decoded.

Every command that reads images goes through here: data set splits, ``predict``/``select``/``evaluate`` folders and
``convert``'s zip members.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

from cellseg_pl.errors import DatasetError, ImageTooLargeError

#: The image files every command reads (OpenCV decodes them): data set splits, predict/select folders, convert's
#: names (another suffix gets one of these appended). Lower case; compare with ``path.suffix.lower()``.
IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}
#: First bytes of each image format -> its usual suffix.
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8", ".jpg"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"),
              (b"BM", ".bmp"))


def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (sub-folders included; hidden files and folders, such as macOS' ``._x.png``
    or the ``.cellseg_cache`` folder, skipped), in path order."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel.parts) and p.is_file():
            found.append(p)
    return sorted(found)


def image_kind(data: bytes) -> str | None:
    """The suffix of the image format the bytes start with (``.png``, ``.jpg``, ``.tif``, ``.bmp``, ``.webp``), or
    None."""
    for magic, suffix in SIGNATURES:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


def read_image(path: Path) -> np.ndarray:
    """Read an image as uint8 RGB HxWx3; 16-bit is scaled to 8-bit, gray and RGBA are converted.

    Raises:
        DatasetError: the file cannot be read or decoded.
    """
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        message = f"{path}: cannot read the image ({e.strerror or e}); check that it exists and is readable"
        raise DatasetError(message) from None
    return decode_image(data, path)


def decode_image(data: bytes | np.ndarray, path: Path | str) -> np.ndarray:
    """Decode an image file's bytes as :func:`read_image` does (``path`` only names the file in errors).

    Raises:
        DatasetError: the bytes are not a decodable image; :class:`ImageTooLargeError` when the image is over
            pixel limit (:func:`max_image_pixels`, read from the header before decoding).
    """
    data = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    size = image_size_from_header(data)
    if size is not None and size[0] * size[1] > max_image_pixels():  # refused before a byte is decoded
        raise ImageTooLargeError(_too_large(path, data))
    try:
        # ANYDEPTH|ANYCOLOR keeps 16-bit and gray but, unlike IMREAD_UNCHANGED, applies the EXIF orientation as
        # cv2.imread (Ultralytics) and the CVAT converter do, so labels and pixels stay aligned for rotated JPEGs
        img = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) if data.size else None
    except cv2.error as e:  # OpenCV raises (instead of returning None) for images over its pixel limit
        if "CV_IO_MAX_IMAGE_PIXELS" in str(e):
            raise ImageTooLargeError(_too_large(path, data)) from None
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DatasetError(f"{path}: OpenCV cannot decode the image ({detail}); remove or replace it") from None
    if img is None:
        raise DatasetError(f"{path}: cannot decode the image (corrupt or not an image); remove or replace it")
    if img.dtype != np.uint8:
        img = img.astype(np.float32)
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(img)).round().astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


#: Largest image decoded, in pixels, unless ``CV_IO_MAX_IMAGE_PIXELS`` says otherwise: 2^28 (16384 x 16384). An
#: 8-bit RGB image takes 3 bytes a pixel, and its conversion to RGB a second copy: 2^28 px is ~1.6 GB at the peak.
#: Checked on the file's header (PNG, JPEG, TIFF, BMP) before decoding: a 30000 x 30000 PNG of 1 MB is refused
#: without the 5 GB its decoding would take. OpenCV's own limit (the same variable, default 2^30) still applies.
MAX_IMAGE_PIXELS = 1 << 28


def max_image_pixels() -> int:
    """The pixel limit of :func:`decode_image`: ``CV_IO_MAX_IMAGE_PIXELS`` when set to a number, else
    :data:`MAX_IMAGE_PIXELS`."""
    limit = os.environ.get("CV_IO_MAX_IMAGE_PIXELS", "").strip()
    return int(limit) if limit.isdigit() else MAX_IMAGE_PIXELS


def _too_large(path: Path | str, data: np.ndarray) -> str:
    """The message for an image over the pixel limit: its size (from the header), the memory it would take, and
    the way out."""
    size = image_size_from_header(data)
    what = (f"is {size[0]}x{size[1]} px ({size[0] * size[1]:,} px; ~{6 * size[0] * size[1] / 2**30:.1f} GiB to "
            f"decode)," if size else "has more pixels than")
    return (
        f"{path}: image {what} over the limit of {max_image_pixels():,} px (CV_IO_MAX_IMAGE_PIXELS); split it into "
        f"tiles, or set the environment variable CV_IO_MAX_IMAGE_PIXELS higher before starting"
    )


def image_size_from_header(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """``(width, height)`` in px read from a PNG, JPEG, TIFF or BMP file's header (no decoding); None if not found."""
    try:
        b = memoryview(data).cast("B")  # (no copy of the file)
        head = bytes(b[:32])
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head.startswith(b"BM") and len(head) >= 26:
            w, h = struct.unpack("<ii", head[18:26])
            return abs(w), abs(h)
        if head[:4] in (b"II*\0", b"MM\0*"):
            e = "<" if head[:2] == b"II" else ">"
            (ifd,) = struct.unpack(e + "I", b[4:8])
            (n,) = struct.unpack(e + "H", b[ifd : ifd + 2])
            tags = {}
            for k in range(n):
                tag, kind, _, value = struct.unpack(e + "HHI4s", b[ifd + 2 + 12 * k : ifd + 14 + 12 * k])
                if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
                    tags[tag] = struct.unpack(e + ("H" if kind == 3 else "I"), value[: 2 if kind == 3 else 4])[0]
            return (tags[256], tags[257]) if len(tags) == 2 else None
        if head.startswith(b"\xff\xd8"):
            i = 2
            while i + 9 < len(b):
                if b[i] != 0xFF:
                    return None
                marker = b[i + 1]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                    h, w = struct.unpack(">HH", b[i + 5 : i + 9])
                    return w, h
                i += 2 + struct.unpack(">H", b[i + 2 : i + 4])[0]
    except (struct.error, IndexError, ValueError, TypeError):
        return None
    return None


def load_resized(path: Path, imgsz: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an image (:func:`read_image`) resized so its long side is ``imgsz``; returns it and its original (h, w).

    Ultralytics' ``load_image``: linear interpolation to enlarge, area to shrink.
    """
    image = read_image(path)
    h0, w0 = image.shape[:2]
    gain = imgsz / max(h0, w0)
    if gain != 1:
        interp = cv2.INTER_LINEAR if gain > 1 else cv2.INTER_AREA
        image = cv2.resize(image, (max(1, round(w0 * gain)), max(1, round(h0 * gain))), interpolation=interp)
    return image, (h0, w0)


def is_truncated(data: bytes) -> bool:
    """Whether a JPEG or PNG file is cut short (its end marker is missing); other formats: False.

    OpenCV 4.x decodes a truncated JPEG with the missing part grey (and only warns), so this is checked on the
    bytes: a JPEG needs an end-of-image marker after its last start-of-scan, a PNG an ``IEND`` chunk after its
    last ``IDAT``. Bytes appended after the end marker are allowed.
    """
    if data[:3] == b"\xff\xd8\xff":
        sos = data.rfind(b"\xff\xda")
        return sos < 0 or data.find(b"\xff\xd9", sos) < 0
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data.rfind(b"IEND") < data.rfind(b"IDAT")
    return False
