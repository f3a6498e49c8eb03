"""Semantic segmentation data: the shared dataset base, a generic image/mask folder, the train and eval
pipelines and the batch collate function.

Every segmentation dataset yields train ids: ``0..num_classes-1`` for the classes and ``255`` for pixels
that are ignored by the loss and the metrics, whatever the file format stores. Each sample is a dict:

* ``image``: uint8 ``[3, H, W]`` (contiguous CHW, RGB; normalisation happens later, on the device),
* ``mask``: uint8 ``[h, w]`` train ids (255 = ignore). After the train pipeline ``(h, w) == (H, W)``; the eval
  pipeline leaves the mask at the original resolution, because metrics are computed against the original labels,
* ``index``: int, the sample's index in the dataset (for ``output_name`` / ``label_ids_for_output``),
* ``orig_size``: ``(H0, W0)`` of the image file,
* ``valid_size``: ``(H, W)`` of the image content in ``image`` (what collate's padding leaves untouched).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ._imageio import decode_image, png_format, read_file
from ._seeding import ProcessRandom, sample_key_split
from ._skip import first_readable, skip_summary
from .errors import DatasetError, DatasetNotFoundError

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "SegmentationDataset",
    "SegmentationFolder",
    "SegmentationTransform",
    "build_segmentation_eval_transform",
    "build_segmentation_train_transform",
    "collate_segmentation",
    "default_palette",
]

log = logging.getLogger(__name__)

#: The train id of ignored pixels in every mask a segmentation dataset yields.
IGNORE_INDEX = 255
#: Image file extensions :class:`SegmentationFolder` picks up (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


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
    names ``source`` (the data folder).

    ``decoded_cache`` (a folder) keeps each pair once decoded and checked, as raw uint8 arrays (``.npy``: the
    image, and the mask as train ids), and memory-maps them on later reads: a Cityscapes frame is then read in
    about a millisecond instead of decoding two 2048x1024 PNGs (tens of milliseconds), and at scales above about
    0.7 the train transform reads only the rows under its crop. An entry is keyed by both files' paths, sizes and
    modification times (not their content: a rewrite that keeps both, e.g. ``cp -p``, is not noticed) and by the
    label mapping, so a changed file is decoded again. Entries are written to a temporary file, flushed to disk
    and renamed into place, so loader workers and processes can share the folder and a crash leaves no partial
    entry; temporary files of killed writers are removed after an hour. Nothing is evicted: entries of files
    that changed stay until the folder is deleted. A Cityscapes frame takes 8.4 MB (6.3 MB image, 2.1 MB mask).
    An entry that cannot be read is decoded again and rewritten, with a warning; when the folder cannot be read
    or written (disk full, read-only), one warning says so and samples are decoded each time.
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
        self._cache_warned = False
        if self.decoded_cache is not None:
            _remove_stale_temporaries(self.decoded_cache)

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
        files = None if self.decoded_cache is None else self._cache_files(index)
        cached = None if files is None else self._load_cached(files)
        if cached is not None:
            return cached
        image = self.read_image(index)
        mask = self.train_ids(self.read_mask(index, image.shape[:2]))
        if files is not None:
            self._store_cached(files, (image, mask))
        return image, mask

    def _cache_files(self, index: int) -> tuple[Path, Path]:
        import hashlib

        digest = hashlib.blake2b(digest_size=16)
        for path in (self._image_paths[index], self._mask_paths[index]):
            try:
                st = os.stat(path)
            except OSError:  # missing or unreadable: decoding raises the error that names the file
                st = None
            digest.update(f"{os.path.abspath(path)}|{st and st.st_size}|{st and st.st_mtime_ns}|".encode())
        digest.update(self._lut.tobytes() + self._valid.tobytes() + bytes([self.check_labels, _CACHE_FORMAT]))
        key = digest.hexdigest()
        folder = self.decoded_cache / key[:2]
        return folder / f"{key}.image.npy", folder / f"{key}.mask.npy"

    def _load_cached(self, files: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            image, mask = (np.load(f, mmap_mode="r", allow_pickle=False) for f in files)
        except (FileNotFoundError, NotADirectoryError):  # not cached (yet), or the folder is not usable
            return None
        except OSError as err:  # the folder cannot be read: the same for every sample, so warned about once
            self._warn_cache_once(f"cannot read decoded copies ({err})")
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

    def _store_cached(self, files: tuple[Path, Path], arrays: tuple[np.ndarray, np.ndarray]) -> None:
        import uuid

        written = []
        try:
            files[0].parent.mkdir(parents=True, exist_ok=True)
            # The mask last: a pair counts as cached once both exist, and a reader finding only the image decodes.
            for path, array in zip(files, arrays):
                tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
                written.append(tmp)
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(array), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())  # on disk before it is renamed into place (a crash leaves no empty entry)
                os.replace(tmp, path)
        except OSError as err:
            for tmp in written:
                tmp.unlink(missing_ok=True)
            self._warn_cache_once(f"cannot write decoded copies ({err})")

    def _warn_cache_once(self, problem: str) -> None:
        if not self._cache_warned:  # once per process: the cause is the same for every sample
            self._cache_warned = True
            log.warning("data.decoded_cache %s: %s; samples are decoded each time they are read",
                        self.decoded_cache, problem)

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


class SegmentationFolder(SegmentationDataset):
    """Your own data: images in ``image_dir`` and one single-channel mask per image in ``mask_dir``.

    Images are the ``.jpg/.jpeg/.png/.bmp`` files of ``image_dir`` (sorted by name); the mask of ``<stem>.jpg``
    is ``mask_dir/<stem><mask_suffix>``. Mask values are class indices ``0..len(class_names)-1`` or
    ``ignore_index``; any other value raises :class:`DatasetError` naming the file and the values. The dataset
    yields 255 for ``ignore_index`` pixels, so everything downstream uses 255 (``self.ignore_index``; the value
    the files use is ``self.mask_ignore_index``). ``palette`` defaults to :func:`default_palette`.

    ``output_name(i)`` is the image's stem; ``label_ids_for_output`` is the identity (uint8, 255 kept).
    ``skip_bad``: images without a mask are dropped (one warning counts them) and unusable samples are replaced
    (see :class:`SegmentationDataset`) instead of raising :class:`DatasetError`. ``decoded_cache``: see
    :class:`SegmentationDataset`.
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


# ---------------------------------------------------------------------- transforms
def _pair(value, name: str) -> tuple[int, int]:
    h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be a positive (height, width), got {tuple(value)}")
    return h, w


class SegmentationTransform:
    """Train or eval segmentation pipeline: ``(image HxWx3 uint8, mask HxW uint8) -> dict(image, mask)``.

    Train: resize to ``base_size`` (H, W) when given, then by a factor drawn uniformly from ``scale_range``
    (image bilinear, mask nearest, one resize each), pad bottom/right to at least ``crop_size`` (image 0, mask
    255), take a random ``crop_size`` (H, W) crop, flip horizontally with probability ``hflip_prob`` and jitter
    brightness, contrast and saturation of the image by up to ``color_jitter`` (0 disables it). Resize, pad and
    crop are one step (:func:`_scaled_crop`), computed on the crop's window when the resized image is more than
    twice the window's size: then the cost follows the crop size, not the resized image's.

    Eval: resize the image to ``eval_size`` (H, W) when given (bilinear); the mask is returned unchanged, at the
    original resolution.

    Randomness: see :class:`datasets._seeding.ProcessRandom` (one generator per process, re-seeded in each
    loader worker; ``seed`` fixes it in the main process).
    """

    def __init__(
        self,
        *,
        train: bool,
        crop_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: tuple[int, int] | None = None,
        hflip_prob: float = 0.5,
        color_jitter: float = 0.2,
        eval_size: tuple[int, int] | None = None,
        seed: int | None = None,
    ) -> None:
        self.train = bool(train)
        self.eval_size = None if eval_size is None else _pair(eval_size, "eval_size")
        self.base_size = None if base_size is None else _pair(base_size, "base_size")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(scale_range)}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        self.scale_range = (lo, hi)
        self.hflip_prob = float(hflip_prob)
        self.color_jitter = float(color_jitter)
        self.crop_size: tuple[int, int] | None = None
        self.pipeline: A.Compose | None = None
        self._random: ProcessRandom | None = None
        if not self.train:
            return
        if crop_size is None:
            raise ValueError("a train transform needs crop_size")
        self.crop_size = _pair(crop_size, "crop_size")
        # Scale, pad and crop are one step (:meth:`_scaled_crop`, computed on the crop only); then these:
        steps = [A.HorizontalFlip(p=self.hflip_prob)]
        if self.color_jitter > 0:
            j = self.color_jitter
            steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=1.0))
        self.pipeline = A.Compose(steps)
        self._random = ProcessRandom(seed, pipeline=self.pipeline)

    def __repr__(self) -> str:
        if self.train:
            return (
                f"{type(self).__name__}(train=True, crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"base_size={self.base_size}, hflip_prob={self.hflip_prob}, color_jitter={self.color_jitter})"
            )
        return f"{type(self).__name__}(train=False, eval_size={self.eval_size})"

    def __call__(self, image: np.ndarray, mask: np.ndarray, *, sample_key: int | None = None) -> dict:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an HxWx3 uint8 image, got shape {image.shape} and dtype {image.dtype}"
            )
        if mask.shape != image.shape[:2] or mask.dtype != np.uint8:
            raise ValueError(
                f"expected an HxW uint8 mask the size of the image {image.shape[:2]}, got {mask.shape} {mask.dtype}"
            )
        h, w = image.shape[:2]
        if not self.train:
            if self.eval_size is not None and self.eval_size != (h, w):
                image = cv2.resize(image, self.eval_size[::-1], interpolation=cv2.INTER_LINEAR)
            return {"image": image, "mask": mask}

        if sample_key is not None:  # augmentation fixed by the sample key (resumable, worker-independent)
            self._random.seed_sample(sample_key)
        else:
            self._random.refresh()
        bh, bw = self.base_size if self.base_size is not None else (h, w)
        rng = self._random.rng
        factor = float(rng.uniform(*self.scale_range))
        nh, nw = max(1, round(bh * factor)), max(1, round(bw * factor))
        ch, cw = self.crop_size
        # The crop's place in the scaled image (top-left when the scaled image is smaller than the crop).
        y0, x0 = int(rng.integers(0, max(nh - ch, 0) + 1)), int(rng.integers(0, max(nw - cw, 0) + 1))
        image, mask = _scaled_crop(image, mask, (nh, nw), (y0, x0), self.crop_size)
        out = self.pipeline(image=image, mask=mask)
        return {"image": np.ascontiguousarray(out["image"]), "mask": np.ascontiguousarray(out["mask"])}


#: Part of every decoded-cache key: raised when what an entry holds changes, so older entries are not used.
_CACHE_FORMAT = 1
#: Temporary files older than this in a decoded cache are left over from a killed writer and removed.
_STALE_TEMPORARY_S = 3600


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files that writers killed mid-write left in a decoded cache (recent ones may belong
    to a writer at work in another process and stay)."""
    import time

    now = time.time()
    for tmp in folder.glob("*/.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TEMPORARY_S:
                tmp.unlink()
        except OSError:
            pass


def _scaled_crop(image: np.ndarray, mask: np.ndarray, size: tuple[int, int], corner: tuple[int, int],
                 crop: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``crop`` (H, W) window at ``corner`` (y, x) of the image and mask resized to ``size`` (H, W), padded at
    the bottom and right (image 0, mask 255) where the resized image ends: what resizing the whole image (bilinear;
    the mask nearest) and cropping it would give. When the resized image is more than twice the window's size, it
    is computed from the source pixels under the window only (a 2x scale of a 1024x2048 image resizes one
    512x1024 window instead of 2048x4096 pixels); otherwise the whole image is resized and cropped.

    The mask is exactly that of ``cv2.resize(..., INTER_NEAREST)`` and cropping; the image samples the same
    source positions as ``cv2.resize(..., INTER_LINEAR)`` (pixel centres aligned, edges clamped), with OpenCV's
    warping interpolation weights (1/32 pixel) instead of its resizing ones, so values may differ by a level or two.
    """
    h, w = mask.shape
    (nh, nw), (y0, x0), (ch, cw) = size, corner, crop
    wh, ww = min(ch, nh - y0), min(cw, nw - x0)  # the window's part inside the resized image
    if (nh, nw) == (h, w):
        img, msk = image[y0:y0 + wh, x0:x0 + ww], mask[y0:y0 + wh, x0:x0 + ww]
    elif nh * nw <= 2 * wh * ww:  # the window is most of the resized image: resizing it all is as cheap
        img = cv2.resize(np.asarray(image), (nw, nh), interpolation=cv2.INTER_LINEAR)[y0:y0 + wh, x0:x0 + ww]
        msk = cv2.resize(np.asarray(mask), (nw, nh), interpolation=cv2.INTER_NEAREST)[y0:y0 + wh, x0:x0 + ww]
    else:
        # Nearest: OpenCV's resize takes source index floor(i * src / dst) (scale as a double, as it computes it).
        ry, rx = 1.0 / (nh / h), 1.0 / (nw / w)
        rows = np.minimum(np.floor(np.arange(y0, y0 + wh) * ry).astype(np.intp), h - 1)
        cols = np.minimum(np.floor(np.arange(x0, x0 + ww) * rx).astype(np.intp), w - 1)
        msk = mask.take(rows, axis=0).take(cols, axis=1)
        # Bilinear with aligned pixel centres: output (i, j) samples source ((i + 0.5) * h / nh - 0.5, ...).
        sy, sx = h / nh, w / nw
        top, left = (y0 + 0.5) * sy - 0.5, (x0 + 0.5) * sx - 0.5
        r0, c0 = max(0, int(np.floor(top))), max(0, int(np.floor(left)))
        r1 = min(h, int(np.floor(top + (wh - 1) * sy)) + 2)
        c1 = min(w, int(np.floor(left + (ww - 1) * sx)) + 2)
        matrix = np.array([[sx, 0.0, left - c0], [0.0, sy, top - r0]])
        img = cv2.warpAffine(image[r0:r1, c0:c1], matrix, (ww, wh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REPLICATE)
    if (wh, ww) == (ch, cw):
        return np.ascontiguousarray(img), np.ascontiguousarray(msk)
    out_img = np.zeros((ch, cw, 3), np.uint8)
    out_msk = np.full((ch, cw), IGNORE_INDEX, np.uint8)
    out_img[:wh, :ww], out_msk[:wh, :ww] = img, msk
    return out_img, out_msk


def build_segmentation_train_transform(
    *,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: tuple[int, int] | None = None,
    hflip_prob: float = 0.5,
    color_jitter: float = 0.2,
    seed: int | None = None,
) -> SegmentationTransform:
    """Resize to ``base_size`` (optional), random scale, pad (mask 255), random ``crop_size`` crop, flip, jitter."""
    return SegmentationTransform(
        train=True,
        crop_size=crop_size,
        scale_range=scale_range,
        base_size=base_size,
        hflip_prob=hflip_prob,
        color_jitter=color_jitter,
        seed=seed,
    )


def build_segmentation_eval_transform(*, eval_size: tuple[int, int] | None = None) -> SegmentationTransform:
    """Resize the image (only) to ``eval_size`` (H, W) when given; the mask stays at the original resolution."""
    return SegmentationTransform(train=False, eval_size=eval_size)


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
