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
    is ``mask_dir/<stem><mask_suffix>``. Mask values are class indices ``0..len(class_names)-1`` or
    ``ignore_index``; any other value raises :class:`DatasetError` naming the file and the values. The dataset
    yields 255 for ``ignore_index`` pixels, so everything downstream uses 255 (``self.ignore_index``; the value
    the files use is ``self.mask_ignore_index``). ``palette`` defaults to :func:`default_palette`.

    ``output_name(i)`` is the image's stem; ``label_ids_for_output`` is the identity (uint8, 255 kept).
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
    ) -> None:
        if isinstance(class_names, str):
            raise TypeError("class_names must be a sequence of names, not a single string")
        num_classes = len(class_names)
        if not 1 <= num_classes <= 255:
            raise ValueError(f"need 1 to 255 class names (255 is the ignore value), got {num_classes}")
        ignore_index = int(ignore_index)
        if not 0 <= ignore_index <= 255 or ignore_index < num_classes:
            raise ValueError(
                f"ignore_index must be in [{num_classes}, 255] (masks are 8-bit and 0..{num_classes - 1} are "
                f"classes), got {ignore_index}"
            )
        self.image_dir = Path(image_dir).expanduser()
        self.mask_dir = Path(mask_dir).expanduser()
        self.mask_ignore_index = ignore_index
        images = self._scan()
        if not self.mask_dir.is_dir():
            raise DatasetNotFoundError(f"mask folder not found: {self.mask_dir}")
        masks = [self.mask_dir / f"{p.stem}{mask_suffix}" for p in images]
        images, masks, self.skipped = pair_files(images, masks, skip_bad=skip_bad, source=self.image_dir)
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[:num_classes] = np.arange(num_classes, dtype=np.uint8)
        valid = np.zeros(256, dtype=bool)
        valid[:num_classes] = True
        valid[ignore_index] = True
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
            label_hint=f"expected class indices 0..{num_classes - 1} or the ignore value {ignore_index}",
            skip_bad=skip_bad,
            source=self.image_dir,
            decoded_cache=decoded_cache,
        )

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
