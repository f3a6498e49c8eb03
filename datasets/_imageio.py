"""Reading and decoding image files with errors that name the file: missing, unreadable, corrupt or truncated."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import DatasetError, DatasetNotFoundError

__all__ = ["decode_image", "png_format", "read_file", "truncation"]

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_SOS = b"\xff\xda"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TAIL = 1024  # a PNG ends with its IEND chunk; tolerate a little trailing junk after it


def read_file(path: Path, *, missing: str = "file does not exist") -> np.ndarray:
    """The bytes of ``path`` (uint8); :class:`DatasetNotFoundError` / :class:`DatasetError` naming it otherwise."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as err:
        raise DatasetNotFoundError(f"{path}: {missing}") from err
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err})") from err


def truncation(buf: np.ndarray) -> str | None:
    """Why a JPEG or PNG file is cut short (None when it ends properly or is another format).

    Decoders do not all fail on a truncated file: OpenCV < 5 decodes a JPEG that stops half way with a warning
    on stderr and returns an image whose missing part is grey. A complete JPEG has its end-of-image marker after
    the last start-of-scan (entropy-coded data cannot contain it); a complete PNG ends with the IEND chunk.
    """
    data = buf.tobytes()
    if data.startswith(_JPEG_SOI):
        sos = data.rfind(_JPEG_SOS)
        if sos < 0:
            return "a JPEG file without image data (no start-of-scan marker)"
        if data.find(_JPEG_EOI, sos) < 0:
            return "a JPEG file without its end-of-image marker"
    elif data.startswith(_PNG_SIGNATURE):
        iend = data.rfind(b"IEND", max(0, len(data) - _PNG_TAIL))
        if iend < 0 or iend + 8 > len(data):  # the chunk type and its 4-byte CRC
            return "a PNG file without its IEND chunk"
    return None


def png_format(buf: np.ndarray) -> tuple[int, int] | None:
    """``(bit depth, colour type)`` from a PNG file's header (colour type 0: grey, 3: palette), or None for other
    formats."""
    data = buf[:26].tobytes()
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 26 or data[12:16] != b"IHDR":
        return None
    return data[24], data[25]


def decode_image(buf: np.ndarray, flags: int, path: Path) -> np.ndarray:
    """``cv2.imdecode(buf, flags)``; :class:`DatasetError` naming ``path`` when the file is empty, corrupt or
    truncated (see :func:`truncation`)."""
    if not buf.size:
        raise DatasetError(f"{path}: cannot be decoded as an image: the file is empty")
    cut = truncation(buf)
    if cut is not None:
        raise DatasetError(f"{path}: cannot be decoded as an image: truncated file ({cut}; corrupt or cut short?)")
    try:
        image = cv2.imdecode(buf, flags)
    except cv2.error:
        image = None
    if image is None:
        raise DatasetError(f"{path}: cannot be decoded as an image (corrupt or truncated file?)")
    return image
