"""Semantic segmentation: the base every segmentation dataset derives from, the sample it yields and the batch
collate function.

Every segmentation dataset yields train ids: ``0..num_classes-1`` for the classes and ``255`` for pixels
that are ignored by the loss and the metrics, whatever the file format stores. Each sample is a dict:

* ``image``: uint8 ``[3, H, W]`` (contiguous CHW, RGB; normalisation happens later, on the device),
* ``mask``: uint8 ``[h, w]`` train ids (255 = ignore). After the train pipeline ``(h, w) == (H, W)``; the eval
  pipeline leaves the mask at the original resolution, because metrics are computed against the original labels,
* ``index``: int, the sample's index in the dataset (for ``output_name`` / ``label_ids_for_output``),
* ``orig_size``: ``(H0, W0)`` of the image file,
* ``valid_size``: ``(H, W)`` of the image content in ``image`` (what collate's padding leaves untouched).

The pipelines are in :mod:`datasets.segmentation_transforms`, the generic image/mask folder in
:mod:`datasets.segmentation_folder` and Cityscapes in :mod:`datasets.cityscapes`.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ._imageio import decode_image, png_format, read_file
from ._seeding import sample_key_split
from ._skip import first_readable, skip_summary
from .decoded_cache import DecodedCache
from .errors import DatasetError

__all__ = [
    "IGNORE_INDEX",
    "SegmentationDataset",
    "collate_segmentation",
    "default_palette",
    "padded_size",
    "pair_files",
]

log = logging.getLogger(__name__)

#: The train id of ignored pixels in every mask a segmentation dataset yields.
IGNORE_INDEX = 255


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """A deterministic palette of ``num_classes`` distinct RGB colours (the PASCAL VOC bit-interleaving scheme,
    starting at its first non-black colour)."""
    colours = []
    for k in range(1, num_classes + 1):
        r = g = b = 0
        c = k
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


def _read_file(path: Path) -> np.ndarray:
    return read_file(path, missing="file does not exist (was it removed after the dataset was scanned?)")


def pair_files(
    images: Sequence[Path], masks: Sequence[Path], *, skip_bad: bool, source: Path, what: str = "mask"
) -> tuple[list[Path], list[Path], Counter]:
    """Keep the (image, mask) pairs whose mask file exists. A missing mask raises :class:`DatasetError` naming
    both files, or with ``skip_bad`` drops the pair; returns the kept pairs and the skips by reason."""
    kept_images, kept_masks, skipped = [], [], Counter()
    for image, mask in zip(images, masks):
        if mask.is_file():
            kept_images.append(image)
            kept_masks.append(mask)
        elif skip_bad:
            skipped[f"no {what}"] += 1
        else:
            raise DatasetError(f"{image}: its {what} {mask} does not exist")
    if not kept_images:
        raise DatasetError(f"{source}: no image left to use: none of the {len(images)} images has its {what}")
    summary = skip_summary(str(source), image=skipped)
    if summary:
        log.warning("%s", summary)
    return kept_images, kept_masks, skipped


class SegmentationDataset(Dataset):
    """Base of the segmentation datasets: reads and validates image/mask pairs and maps the stored mask values
    to train ids through a 256-entry lookup table.

    Subclasses scan their folders and call ``super().__init__`` with the pairs, the output names, the lookup
    table ``value_to_train_id`` (uint8 ``[256]``) and ``valid_values`` (bool ``[256]``, which stored values may
    occur). ``transform`` is ``(image HxWx3 uint8 RGB, mask HxW uint8 train ids) -> dict(image, mask)``, e.g.
    :func:`build_segmentation_train_transform`; None keeps both unchanged. With ``check_labels`` a mask holding a
    value outside ``valid_values`` raises :class:`DatasetError` naming the file and the values; ``label_hint``
    is appended to that message (what the values should be). With ``skip_bad`` a sample whose image or mask
    cannot be used (corrupt, truncated, wrong size, invalid values) is replaced by the next usable sample (index
    order, so the result does not depend on the loading order) and the file is named in a warning that also
    names ``source`` (the data folder). ``decoded_cache`` (a folder; None or ``""``: off) keeps each pair once
    decoded and checked, the image and the mask as train ids (:class:`datasets.decoded_cache.DecodedCache`).
    """

    def __init__(
        self,
        *,
        image_paths: Sequence[Path],
        mask_paths: Sequence[Path],
        output_names: Sequence[str],
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        value_to_train_id: np.ndarray,
        valid_values: np.ndarray,
        transform: Callable | None = None,
        check_labels: bool = True,
        label_hint: str = "",
        skip_bad: bool = False,
        source: str | Path = "",
        decoded_cache: str | Path | None = None,
    ) -> None:
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        if not len(image_paths) == len(mask_paths) == len(output_names):
            raise ValueError("image_paths, mask_paths and output_names must have the same length")
        lut = np.asarray(value_to_train_id)
        valid = np.asarray(valid_values)
        if lut.shape != (256,) or lut.dtype != np.uint8 or valid.shape != (256,) or valid.dtype != bool:
            raise ValueError("value_to_train_id must be uint8 [256] and valid_values bool [256]")
        self.class_names: tuple[str, ...] = tuple(str(n) for n in class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = IGNORE_INDEX
        if len(palette) != self.num_classes:
            raise ValueError(f"palette has {len(palette)} colours for {self.num_classes} classes")
        self.palette: tuple[tuple[int, int, int], ...] = tuple(tuple(int(v) for v in c) for c in palette)
        self.transform = transform
        self.check_labels = bool(check_labels)
        # Flat string arrays: cheap to share with forked loader workers.
        self._image_paths = np.asarray([str(p) for p in image_paths], dtype=np.str_)
        self._mask_paths = np.asarray([str(p) for p in mask_paths], dtype=np.str_)
        self._output_names = np.asarray([str(n) for n in output_names], dtype=np.str_)
        self._lut = lut
        self._valid = valid
        self._label_hint = label_hint
        self.skip_bad = bool(skip_bad)
        self.source = str(source) or "segmentation dataset"  # what the skip warnings name
        self._bad: dict[int, str] = {}  # index -> why it cannot be used (skip_bad; per process)
        #: Folder of decoded pairs (see the class docstring), or None.
        self.decoded_cache = None if decoded_cache in (None, "") else Path(decoded_cache).expanduser()
        self._decoded = None if self.decoded_cache is None else DecodedCache(self.decoded_cache)

    # ------------------------------------------------------------------ files
    def __len__(self) -> int:
        return len(self._image_paths)

    def image_path(self, index: int) -> Path:
        return Path(str(self._image_paths[index]))

    def mask_path(self, index: int) -> Path:
        return Path(str(self._mask_paths[index]))

    def output_name(self, index: int) -> str:
        """The name a prediction for sample ``index`` is written under (without extension)."""
        return str(self._output_names[index])

    def prediction_file_name(self, index: int) -> str:
        """The file name a prediction PNG for sample ``index`` is written under: ``<output_name>.png``."""
        return f"{self.output_name(index)}.png"

    def label_ids_for_output(self, train_ids: np.ndarray) -> np.ndarray:
        """Map a predicted train-id mask to the values the dataset's own files store (uint8). Base: identity."""
        return np.asarray(train_ids).astype(np.uint8)

    def read_image(self, index: int) -> np.ndarray:
        """The image as HxWx3 uint8 RGB; :class:`DatasetError` naming the file when it is unreadable or corrupt."""
        path = self.image_path(index)
        image = decode_image(_read_file(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION, path)
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def read_mask(self, index: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """The mask as stored (HxW uint8); :class:`DatasetError` naming the file when it is corrupt, not a
        single-channel 8-bit image, not ``image_size`` (H, W) or (with ``check_labels``) holds invalid values."""
        path = self.mask_path(index)
        buf = _read_file(path)
        mask = decode_image(buf, cv2.IMREAD_UNCHANGED, path)
        png = png_format(buf)
        if png is not None and png[1] == 0 and png[0] < 8 and mask.dtype == np.uint8 and mask.max() >= 2 ** png[0]:
            # OpenCV stretches 1-, 2- and 4-bit grey to 0..255 (a 1-bit mask's 1 would read as 255, ignore):
            # back to the values the file stores.
            mask = mask // (255 // (2 ** png[0] - 1))
        if mask.ndim != 2 or mask.dtype != np.uint8:
            channels = 1 if mask.ndim == 2 else mask.shape[2]
            palette = " (a palette PNG: store the class values as grey levels)" if png and png[1] == 3 else ""
            raise DatasetError(
                f"{path}: a mask must be a single-channel 8-bit image, got {channels} channel(s) of {mask.dtype}"
                f"{palette}"
            )
        if image_size is not None and mask.shape != tuple(image_size):
            raise DatasetError(
                f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image {self.image_path(index)} is "
                f"{image_size[0]}x{image_size[1]}"
            )
        if self.check_labels:
            counts = np.bincount(mask.reshape(-1), minlength=256)
            bad = np.flatnonzero((counts > 0) & ~self._valid)
            if bad.size:
                hint = f"; {self._label_hint}" if self._label_hint else ""
                raise DatasetError(f"{path}: mask holds invalid value(s) {bad.tolist()}{hint}")
        return mask

    def train_ids(self, mask: np.ndarray) -> np.ndarray:
        """Map a stored mask to train ids (255 = ignore)."""
        return self._lut[mask]

    # ------------------------------------------------------------------ samples
    def __getitem__(self, index: int) -> dict:
        """Sample ``index``. An index at or beyond ``len(self)`` is a *sample key* (as a resumable sampler yields:
        ``(epoch + 1) * len + i``): it reads image ``index % len`` and fixes its augmentation by the key."""
        index, key = sample_key_split(index, len(self))
        load = functools.partial(self._sample, sample_key=key)
        if self.skip_bad:
            return first_readable(index, len(self), load, self._bad, source=self.source, log=log)
        return load(index)

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image HxWx3 uint8 RGB, mask HxW uint8 train ids)``, decoded and checked, or memory-mapped (read-only)
        from :attr:`decoded_cache` when it holds them."""
        files = None if self._decoded is None else self._cache_files(index)
        cached = None if files is None else self._decoded.load(files)
        if cached is not None:
            return cached
        image = self.read_image(index)
        mask = self.train_ids(self.read_mask(index, image.shape[:2]))
        if files is not None:
            self._decoded.store(files, (image, mask))
        return image, mask

    def _cache_files(self, index: int) -> tuple[Path, Path]:
        """The decoded-cache entry of pair ``index``: keyed by its two files and by the label mapping."""
        mapping = self._lut.tobytes() + self._valid.tobytes() + bytes([self.check_labels])
        return self._decoded.entry_files((self._image_paths[index], self._mask_paths[index]), mapping)

    def _sample(self, index: int, sample_key: int | None = None) -> dict:
        image, mask = self.read_pair(index)
        h0, w0 = image.shape[:2]
        if self.transform is not None:
            out = self.transform(image, mask, sample_key=sample_key) if sample_key is not None else self.transform(
                image, mask
            )
            image, mask = out["image"], out["mask"]
            valid_size = tuple(int(v) for v in out.get("valid_size", image.shape[:2]))
        else:
            valid_size = (h0, w0)
        image, mask = np.ascontiguousarray(image.transpose(2, 0, 1)), np.ascontiguousarray(mask, dtype=np.uint8)
        return {  # copies of what is still a read-only view of the decoded cache (eval: the whole pair)
            "image": torch.from_numpy(image if image.flags.writeable else image.copy()),
            "mask": torch.from_numpy(mask if mask.flags.writeable else mask.copy()),
            "index": int(index),
            "orig_size": (int(h0), int(w0)),
            "valid_size": valid_size,
        }


def padded_size(size: tuple[int, int], size_divisor: int) -> tuple[int, int]:
    """``(H, W)`` rounded up to multiples of ``size_divisor``: the size :func:`collate_segmentation` pads images to."""
    h, w = size
    return -(-h // size_divisor) * size_divisor, -(-w // size_divisor) * size_divisor


def collate_segmentation(samples: Sequence[dict], *, size_divisor: int = 128) -> dict[str, torch.Tensor]:
    """Stack segmentation samples into batch tensors.

    Returns ``images`` uint8 ``[B, 3, Hp, Wp]``, zero-padded bottom/right to the largest image of the batch
    rounded up to a multiple of ``size_divisor``; ``masks`` uint8 ``[B, Hm, Wm]``, padded with 255 to the largest
    mask (no rounding); ``valid_sizes`` int64 ``[B, 2]`` (the content size of each image in ``images``),
    ``orig_sizes`` int64 ``[B, 2]`` and ``indices`` int64 ``[B]``. Use
    ``functools.partial(collate_segmentation, size_divisor=...)`` as a loader's ``collate_fn``.
    """
    if not samples:
        raise ValueError("collate_segmentation needs at least one sample")
    size_divisor = int(size_divisor)
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    hi = max(int(s["image"].shape[1]) for s in samples)
    wi = max(int(s["image"].shape[2]) for s in samples)
    hp, wp = padded_size((hi, wi), size_divisor)
    hm = max(int(s["mask"].shape[0]) for s in samples)
    wm = max(int(s["mask"].shape[1]) for s in samples)
    images = torch.zeros((len(samples), 3, hp, wp), dtype=torch.uint8)
    masks = torch.full((len(samples), hm, wm), IGNORE_INDEX, dtype=torch.uint8)
    for k, s in enumerate(samples):
        _, h, w = s["image"].shape
        images[k, :, :h, :w] = s["image"]
        mh, mw = s["mask"].shape
        masks[k, :mh, :mw] = s["mask"]
    return {
        "images": images,
        "masks": masks,
        "valid_sizes": torch.tensor([tuple(s["valid_size"]) for s in samples], dtype=torch.int64).reshape(
            -1, 2
        ),
        "orig_sizes": torch.tensor([tuple(s["orig_size"]) for s in samples], dtype=torch.int64).reshape(
            -1, 2
        ),
        "indices": torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64),
    }
