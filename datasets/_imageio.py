"""Reading and decoding image files with errors that name the file: missing, unreadable, corrupt or truncated."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import DatasetError, DatasetNotFoundError

__all__ = ["check_image_file", "decode_image", "png_format", "read_file", "truncation"]

_JPEG_SOI = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    on stderr and returns an image whose missing part is grey. So the file's own structure is walked: a JPEG's
    segments (length-prefixed, so an embedded EXIF thumbnail does not count) and scans up to the end-of-image marker,
    a PNG's chunks up to IEND. Whatever follows the end (a phone's "motion photo" video, other trailing bytes) is
    not looked at.
    """
    data = buf.tobytes()
    if data.startswith(_JPEG_SOI):
        return _jpeg_truncation(data)
    if data.startswith(_PNG_SIGNATURE):
        return _png_truncation(data)
    return None


def _jpeg_truncation(data: bytes) -> str | None:
    pos, scans, n = 2, 0, len(data)
    while True:
        while pos < n and data[pos] != 0xFF:  # bytes between segments (not valid, but decoders skip them)
            pos += 1
        while pos < n and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker == 0x00:  # FF 00 is no marker: stray bytes, which decoders skip with a warning
            continue
        if marker == 0xD9:  # end of image
            return None if scans else "a JPEG file without image data (no start-of-scan marker)"
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            continue
        if pos + 2 > n:
            break
        pos += (data[pos] << 8) | data[pos + 1]  # the segment, its length field included
        if marker != 0xDA:
            continue
        scans += 1  # start of scan: entropy-coded data up to the next marker other than a stuffed 0 or a restart
        while True:
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= n:
                pos = n
                break
            following = data[pos + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                pos += 1 if following == 0xFF else 2
                continue
            break
    if not scans:
        return "a JPEG file without image data (no start-of-scan marker)"
    return "a JPEG file without its end-of-image marker"


def _png_truncation(data: bytes) -> str | None:
    pos, n = len(_PNG_SIGNATURE), len(data)
    while pos + 8 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if not kind.isalpha():  # not a chunk: the file is corrupt rather than cut short (the decoder says so)
            return None
        pos += 12 + length  # length, type, data, CRC
        if pos > n:
            break
        if kind == b"IEND":
            return None
    return "a PNG file without its IEND chunk"


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


def check_image_file(path: Path) -> None:
    """:class:`DatasetError` naming ``path`` when it is missing, empty, truncated or cannot be decoded. JPEGs are
    decoded at an eighth of their size (a fraction of a full decode's time), which still reads every part of the
    file."""
    buf = read_file(path)
    decode_image(buf, cv2.IMREAD_REDUCED_GRAYSCALE_8, path)
