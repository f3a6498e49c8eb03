"""Decoded image/mask pairs kept in a folder and memory-mapped on later reads, so a segmentation dataset decodes
and checks each pair once."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from utils.files import atomic_path

__all__ = ["DecodedCache"]

log = logging.getLogger(__name__)

#: Part of every entry's key: raised when what an entry holds changes, so older entries are not used.
_CACHE_FORMAT = 1
#: Temporary files older than this (seconds) are left over from a killed writer and removed.
_STALE_TEMPORARY_S = 3600


class DecodedCache:
    """A folder of decoded (image, mask) pairs as raw uint8 ``.npy`` files, memory-mapped when read: a sample
    skips decoding, and a crop reads only the rows under it.

    An entry is keyed by both source files' paths, sizes and modification times (not their content: a rewrite
    that keeps all three, e.g. ``cp -p``, is not noticed) and by the label mapping, so a changed file is decoded
    again. Entries are written to a temporary file, flushed to disk and renamed into place, so loader workers and
    processes can share the folder and a crash leaves no partial entry; temporary files of killed writers are
    removed after an hour. Nothing is evicted. An entry that cannot be read is decoded again and rewritten, with
    a warning; when the folder cannot be read or written (disk full, read-only), one warning per process says so
    and samples are decoded each time.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        self._warned = False
        self._remove_stale_temporaries()

    def entry_files(self, sources: Sequence[str | os.PathLike], mapping: bytes) -> tuple[Path, Path]:
        """The ``(image, mask)`` entry files of the pair decoded from the files ``sources`` with the label
        ``mapping`` (any bytes that change when the decoded values would)."""
        digest = hashlib.blake2b(digest_size=16)
        for path in sources:
            try:
                st = os.stat(path)
            except OSError:  # missing or unreadable: decoding raises the error that names the file
                st = None
            digest.update(f"{os.path.abspath(path)}|{st and st.st_size}|{st and st.st_mtime_ns}|".encode())
        digest.update(mapping + bytes([_CACHE_FORMAT]))
        key = digest.hexdigest()
        folder = self.folder / key[:2]
        return folder / f"{key}.image.npy", folder / f"{key}.mask.npy"

    def load(self, files: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray] | None:
        """The entry's ``(image HxWx3, mask HxW)`` uint8 arrays, memory-mapped read-only, or None when it is
        missing or unusable (the caller decodes the files and :meth:`store` rewrites it)."""
        try:
            image, mask = (np.load(f, mmap_mode="r", allow_pickle=False) for f in files)
        except (FileNotFoundError, NotADirectoryError):  # not cached (yet), or the folder is not usable
            return None
        except OSError as err:  # the folder cannot be read: the same for every sample, so warned about once
            self._warn_once(f"cannot read decoded copies ({err})")
            return None
        except Exception as err:  # noqa: BLE001 -- cut short, empty or not an array: decode again and rewrite
            log.warning("%s: unreadable decoded copy (%s: %s); decoding the files again", files[0].parent,
                        type(err).__name__, err)
            return None
        if image.dtype != np.uint8 or mask.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or (
                mask.shape != image.shape[:2]):
            log.warning("%s: decoded copy of unexpected shape %s / %s; decoding the files again", files[0],
                        image.shape, mask.shape)
            return None
        return image, mask

    def store(self, files: tuple[Path, Path], arrays: tuple[np.ndarray, np.ndarray]) -> None:
        """Write an entry; a folder that cannot be written gives one warning and nothing else."""
        try:
            # The mask last: a pair counts as cached once both exist, and a reader finding only the image decodes.
            for path, array in zip(files, arrays):
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        except OSError as err:
            self._warn_once(f"cannot write decoded copies ({err})")

    def _warn_once(self, problem: str) -> None:
        if not self._warned:  # once per process: the cause is the same for every sample
            self._warned = True
            log.warning("data.decoded_cache %s: %s; samples are decoded each time they are read",
                        self.folder, problem)

    def _remove_stale_temporaries(self) -> None:
        """Remove the temporary files that writers killed mid-write left (recent ones may belong to a writer at
        work in another process and stay)."""
        now = time.time()
        for tmp in self.folder.glob("*/.*.tmp"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TEMPORARY_S:
                    tmp.unlink()
            except OSError:
                pass
