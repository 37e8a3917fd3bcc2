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
    "relative_paths",
    "row_keys",
    "row_positions",
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
    """parquet: keep the rows of one side of the seeded split, decided by each row's stable key (see `row_keys`)."""

    def __init__(self, seed: int, val_fraction: float, keep_validation: bool, base: str, base_is_file: bool):
        self.seed = seed
        self.val_fraction = val_fraction
        self.keep_validation = keep_validation
        self.base, self.base_is_file = base, base_is_file

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys = row_keys(batch["path"], batch["row_hash"], self.base, self.base_is_file)
        held_out = validation_mask(keys, self.seed, self.val_fraction)
        keep = held_out if self.keep_validation else ~held_out
        return {name: column[keep] for name, column in batch.items() if name != "row_hash"}


# Ray Data's row_hash is splitmix64's finalizer of (md5(path)[:8] + row position in the file): invertible. These
# undo its two multiplications.
_UNMIX_1 = np.uint64(pow(0xBF58476D1CE4E5B9, -1, 2**64))
_UNMIX_2 = np.uint64(pow(0x94D049BB133111EB, -1, 2**64))
# A position beyond this means Ray Data's row_hash is no longer what `row_positions` undoes.
_MAX_ROWS_PER_FILE = 2**48


def _path_seed(path: str) -> int:
    return int.from_bytes(hashlib.md5(path.encode("utf-8")).digest()[:8], "little")


def row_positions(paths: np.ndarray, row_hash: np.ndarray) -> np.ndarray:
    """Each row's position in its file, recovered from Ray Data's `row_hash` and `path` columns.

    Ray Data hashes the source path *as read* (absolute, so moving the data changes every hash) plus the row's
    position; the finalizer is a bijection, so the position comes back exactly. Checked: a position outside any
    plausible file means Ray changed its hash, and the split refuses rather than going quietly wrong.
    """
    z = np.asarray(row_hash, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= (z >> np.uint64(31)) ^ (z >> np.uint64(62))
        z *= _UNMIX_2
        z ^= (z >> np.uint64(27)) ^ (z >> np.uint64(54))
        z *= _UNMIX_1
        z ^= (z >> np.uint64(30)) ^ (z >> np.uint64(60))
        seeds = {path: np.uint64(_path_seed(path)) for path in set(map(str, paths))}
        positions = z - np.asarray([seeds[str(path)] for path in paths], dtype=np.uint64)
    if positions.size and int(positions.max()) >= _MAX_ROWS_PER_FILE:
        raise RuntimeError(
            "Ray Data's row_hash is not the hash of (path, row position) this version of syncbn expects: the "
            "Parquet validation split cannot be made stable; pin ray to the version in constraints.txt"
        )
    return positions


def relative_paths(paths: np.ndarray, base: str, base_is_file: bool) -> list[str]:
    """Each source file's path relative to the dataset's location (the file name when the location is a file)."""
    if base_is_file:
        return [PurePosixPath(str(p)).name for p in paths]
    base_path = PurePosixPath(base.rstrip("/"))
    return [PurePosixPath(str(p)).relative_to(base_path).as_posix() for p in paths]


def row_keys(paths: np.ndarray, row_hash: np.ndarray, base: str, base_is_file: bool) -> np.ndarray:
    """A uint64 key per row from (path relative to the dataset's location, row position in its file).

    Unlike Ray Data's `row_hash` (built from the absolute path), the key, and so the split, stays the same
    wherever the data lies: the same file under another folder or data root holds out the same rows.
    """
    positions = row_positions(paths, row_hash)
    relative = relative_paths(paths, base, base_is_file)
    seeds = {
        r: np.uint64(int.from_bytes(hashlib.blake2b(r.encode(), digest_size=8).digest(), "little"))
        for r in set(relative)
    }
    with np.errstate(over="ignore"):
        return np.asarray([seeds[r] for r in relative], dtype=np.uint64) + positions


def validation_mask(keys: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """Which rows the seeded split holds out, from their uint64 keys (`row_keys`)."""
    with np.errstate(over="ignore"):
        mixed = (np.asarray(keys, dtype=np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)) * np.uint64(
            0xBF58476D1CE4E5B9
        )
        mixed ^= mixed >> np.uint64(31)
        mixed *= np.uint64(0x94D049BB133111EB)
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
