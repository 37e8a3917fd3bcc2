"""Ray Data batch transforms shared by the image kinds: decode, resize, normalise, and the seeded validation split.

Each transform is a small callable class with plain-data state (class names, sizes, normalisation), so Ray can
ship it to its CPU tasks; `map_batches` calls it on one batch at a time (a dict of numpy columns), which is what
keeps memory bounded by the streaming window. Every transform emits the same two columns the workers read:
`x` float32 `(B, C, H, W)` and `y` int64 `(B,)`.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import PurePosixPath
from typing import Any

import numpy as np

__all__ = [
    "DecodeEncodedImages",
    "HashSplit",
    "LabelFolderImages",
    "is_validation_path",
    "normalisation",
    "validation_mask",
]

_HASH_SPAN = float(2**64)


def normalisation(channels: int, mean: list[float] | None, std: list[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std as `(C, 1, 1)` float32 arrays (default 0.5 and 0.5: pixels land in [-1, 1])."""
    m = np.asarray(mean if mean is not None else [0.5] * channels, dtype=np.float32).reshape(channels, 1, 1)
    s = np.asarray(std if std is not None else [0.5] * channels, dtype=np.float32).reshape(channels, 1, 1)
    return m, s


def _to_chw(images: np.ndarray, channels: int) -> np.ndarray:
    """`(B, H, W)` or `(B, H, W, C)` uint8 pixels → `(B, C, H, W)` float32 in [0, 1]."""
    if images.ndim == 3:
        images = images[:, :, :, None]
    if images.shape[-1] != channels:
        raise ValueError(f"expected images with {channels} channel(s), got shape {images.shape[1:]}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def is_validation_path(relative_path: str, seed: int, val_fraction: float) -> bool:
    """Seeded, order-free split of one file: a hash of (seed, path) below `val_fraction` holds it out."""
    digest = hashlib.blake2b(f"{seed}:{relative_path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / _HASH_SPAN < val_fraction


class LabelFolderImages:
    """image_folder: images decoded and resized by `read_images` → normalised `x`, and as label the class folder:
    the first folder of the image's path below `folder` (the dataset's folder as listed, so images in sub-folders
    of a class folder belong to that class)."""

    def __init__(
        self,
        class_names: list[str],
        folder: str,
        channels: int,
        mean: list[float] | None,
        std: list[float] | None,
    ):
        self.class_index = {name: index for index, name in enumerate(class_names)}
        self.folder_parts = len(PurePosixPath(folder).parts)
        self.channels = channels
        self.mean, self.std = normalisation(channels, mean, std)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        images = np.stack(list(batch["image"])) if batch["image"].dtype == object else batch["image"]
        x = (_to_chw(images, self.channels) - self.mean) / self.std
        labels = [self.class_index[PurePosixPath(str(path)).parts[self.folder_parts]] for path in batch["path"]]
        return {"x": x.astype(np.float32, copy=False), "y": np.asarray(labels, dtype=np.int64)}


class HashSplit:
    """parquet: keep the rows of one side of the seeded split, decided by Ray Data's per-row hash (file + row)."""

    def __init__(self, seed: int, val_fraction: float, keep_validation: bool):
        self.seed = seed
        self.val_fraction = val_fraction
        self.keep_validation = keep_validation

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        held_out = validation_mask(batch["row_hash"], self.seed, self.val_fraction)
        keep = held_out if self.keep_validation else ~held_out
        return {name: column[keep] for name, column in batch.items() if name != "row_hash"}


def validation_mask(row_hash: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """Which rows the seeded split holds out, from Ray Data's uint64 `row_hash` column."""
    mixed = (np.asarray(row_hash, dtype=np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)) * np.uint64(
        0xBF58476D1CE4E5B9
    )
    return (mixed >> np.uint64(11)).astype(np.float64) / float(2**53) < val_fraction


class DecodeEncodedImages:
    """parquet: encoded png/jpeg bytes → decoded, converted, resized, normalised `x`; the label column → `y`.

    A value that is not a decodable image fails the batch with a message naming the column and the file.
    """

    def __init__(
        self,
        image_column: str,
        label_column: str,
        image_size: list[int],
        channels: int,
        mean: list[float] | None,
        std: list[float] | None,
        num_classes: int,
    ):
        self.image_column = image_column
        self.label_column = label_column
        self.height, self.width = image_size
        self.channels = channels
        self.mean, self.std = normalisation(channels, mean, std)
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        mode = "L" if self.channels == 1 else "RGB"
        paths = batch.get("path")
        pixels = np.empty((len(batch[self.image_column]), self.height, self.width, self.channels), np.uint8)
        for i, value in enumerate(batch[self.image_column]):
            where = f"file {paths[i]!s}" if paths is not None else "the data set"
            try:
                with Image.open(io.BytesIO(bytes(value))) as image:
                    image = image.convert(mode)
                    if image.size != (self.width, self.height):
                        image = image.resize((self.width, self.height), resample=Image.BILINEAR)
                    pixels[i] = np.asarray(image).reshape(self.height, self.width, self.channels)
            except (UnidentifiedImageError, OSError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"dataset.image_column {self.image_column!r} holds a value that is not a decodable png/jpeg "
                    f"image in {where} ({type(exc).__name__}: {exc}): store encoded image bytes in that column."
                ) from None  # this message, not PIL's, is the one a failed job reports
        labels = np.asarray(batch[self.label_column]).astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"dataset.label_column {self.label_column!r} holds labels outside 0..{self.num_classes - 1} "
                f"(got {labels.min()}..{labels.max()}) in {paths[0] if paths is not None else 'the data set'}."
            )
        x = (_to_chw(pixels, self.channels) - self.mean) / self.std
        return {"x": x.astype(np.float32, copy=False), "y": labels}
