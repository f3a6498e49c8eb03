"""Your own segmentation data: a folder of images and a folder of single-channel class-index masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .errors import DatasetError, DatasetNotFoundError
from .segmentation import IGNORE_INDEX, SegmentationDataset, default_palette, pair_files

__all__ = ["IMAGE_EXTENSIONS", "SegmentationFolder"]

#: Image file extensions :class:`SegmentationFolder` picks up (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class SegmentationFolder(SegmentationDataset):
    """Your own data: images in ``image_dir`` and one single-channel mask per image in ``mask_dir``.

    Images are the ``.jpg/.jpeg/.png/.bmp`` files of ``image_dir`` (sorted by name); the mask of ``<stem>.jpg``
    is ``mask_dir/<stem><mask_suffix>``. Mask values are class indices plus ``label_offset``
    (``label_offset..label_offset+len(class_names)-1``) or ``ignore_index``; any other value raises
    :class:`DatasetError` naming the file and the values. ``label_offset=1`` with ``ignore_index=0`` is the ADE20K
    convention (value 0 "other", not labelled; value k is class k-1). The dataset yields class indices and 255 for
    ``ignore_index`` pixels, so everything downstream uses 255 (``self.ignore_index``; the value the files use is
    ``self.mask_ignore_index``). ``palette`` defaults to :func:`default_palette`.

    ``output_name(i)`` is the image's stem; ``label_ids_for_output`` writes the values the files use (class index
    plus ``label_offset``; 255 kept).
    ``skip_bad``: images without a mask are dropped (one warning counts them) and unusable samples are replaced
    (see :class:`SegmentationDataset`) instead of raising :class:`DatasetError`. ``decoded_cache``: a folder
    keeping every pair decoded (:class:`datasets.decoded_cache.DecodedCache`).
    """

    def __init__(
        self,
        *,
        image_dir: str | Path,
        mask_dir: str | Path,
        class_names: Sequence[str],
        ignore_index: int = IGNORE_INDEX,
        transform: Callable | None = None,
        mask_suffix: str = ".png",
        palette: Sequence[Sequence[int]] | None = None,
        skip_bad: bool = False,
        decoded_cache: str | Path | None = None,
        label_offset: int = 0,
    ) -> None:
        if isinstance(class_names, str):
            raise TypeError("class_names must be a sequence of names, not a single string")
        num_classes = len(class_names)
        if not 1 <= num_classes <= 255:
            raise ValueError(f"need 1 to 255 class names (255 is the ignore value), got {num_classes}")
        ignore_index, offset = int(ignore_index), int(label_offset)
        first, last = offset, offset + num_classes - 1
        if offset < 0 or last > 255:
            raise ValueError(f"label_offset={offset}: the {num_classes} class values {first}..{last} must fit 0..255")
        if not 0 <= ignore_index <= 255 or first <= ignore_index <= last:
            raise ValueError(
                f"ignore_index must be in 0..255 and not one of the class values {first}..{last} (masks are 8-bit), "
                f"got {ignore_index}"
            )
        self.image_dir = Path(image_dir).expanduser()
        self.mask_dir = Path(mask_dir).expanduser()
        self.mask_ignore_index = ignore_index
        self.label_offset = offset
        images = self._scan()
        if not self.mask_dir.is_dir():
            raise DatasetNotFoundError(f"mask folder not found: {self.mask_dir}")
        masks = [self.mask_dir / f"{p.stem}{mask_suffix}" for p in images]
        images, masks, self.skipped = pair_files(images, masks, skip_bad=skip_bad, source=self.image_dir)
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[first : last + 1] = np.arange(num_classes, dtype=np.uint8)
        valid = np.zeros(256, dtype=bool)
        valid[first : last + 1] = True
        valid[ignore_index] = True
        #: Class index (255: ignored) -> the value the mask files store.
        self._output_lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        self._output_lut[:num_classes] = np.arange(first, last + 1, dtype=np.uint8)
        super().__init__(
            image_paths=images,
            mask_paths=masks,
            output_names=[p.stem for p in images],
            class_names=class_names,
            palette=default_palette(num_classes) if palette is None else palette,
            value_to_train_id=lut,
            valid_values=valid,
            transform=transform,
            check_labels=True,
            label_hint=(f"expected class indices 0..{last}" if offset == 0 else
                        f"expected values {first}..{last} (class index + {offset})") + f" or the ignore value {ignore_index}",
            skip_bad=skip_bad,
            source=self.image_dir,
            decoded_cache=decoded_cache,
        )

    def label_ids_for_output(self, train_ids: np.ndarray) -> np.ndarray:
        """A predicted class map in the values the mask files store (class index + ``label_offset``)."""
        return self._output_lut[np.asarray(train_ids).astype(np.uint8)]

    def _scan(self) -> list[Path]:
        if not self.image_dir.is_dir():
            raise DatasetNotFoundError(f"image folder not found: {self.image_dir}")
        images = sorted(
            p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not images:
            raise DatasetNotFoundError(
                f"{self.image_dir}: no images ({'/'.join(IMAGE_EXTENSIONS)}) found in the image folder"
            )
        seen: dict[str, Path] = {}
        for p in images:
            if p.stem in seen:
                raise DatasetError(f"{p}: has the same name as {seen[p.stem]}; each image needs its own mask")
            seen[p.stem] = p
        return images
