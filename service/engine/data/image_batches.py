"""Ray Data batch transforms shared by the image kinds: read, decode, resize, normalise, and the seeded validation
split.

Each transform is a small callable class with plain-data state (class names, sizes, normalisation, a filesystem),
so Ray can ship it to its CPU tasks; `map_batches` calls it on one batch at a time (a dict of numpy columns: the
images `read_images` decoded, or for Parquet a few read units), which is what keeps memory bounded by the
streaming window. Every transform emits the same two columns the workers read: `x` float32 `(B, C, H, W)` and `y`
int64 `(B,)`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import numpy as np

__all__ = [
    "DecodeEncodedImages",
    "LabelFolderImages",
    "ReadRowGroups",
    "is_validation_path",
    "normalisation",
    "relative_path",
    "row_keys",
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


def relative_path(path: str, base: str, base_is_file: bool) -> str:
    """A source file's path relative to the dataset's location (the file name when the location is the file)."""
    if base_is_file:
        return PurePosixPath(path).name
    return PurePosixPath(path).relative_to(PurePosixPath(base.rstrip("/"))).as_posix()


def row_keys(relative: str, positions: np.ndarray) -> np.ndarray:
    """A uint64 key per row of one file from (its path relative to the dataset's location, the row's position in
    the file).

    The key, and so the split, stays the same wherever the data lies: the same file under another folder or data
    root holds out the same rows, on every pass and every epoch.
    """
    seed = np.uint64(int.from_bytes(hashlib.blake2b(relative.encode(), digest_size=8).digest(), "little"))
    with np.errstate(over="ignore"):
        return np.asarray(positions, dtype=np.uint64) + seed


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
    """parquet: encoded png/jpeg bytes → decoded, converted, resized, normalised `x`; integer labels → `y`.

    A value that is not a decodable image fails with a message naming the column and the file.
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

    def decode(self, values: list[Any], labels: np.ndarray, where: str) -> dict[str, np.ndarray]:
        """`x` and `y` of one chunk of rows: `values` the encoded images, `labels` theirs, `where` names the file."""
        from PIL import Image, UnidentifiedImageError

        mode = "L" if self.channels == 1 else "RGB"
        size = (self.width, self.height)
        pixels = np.empty((len(values), self.height, self.width, self.channels), np.uint8)
        for i, value in enumerate(values):
            try:
                with Image.open(io.BytesIO(value)) as image:
                    image = image.convert(mode)
                    if image.size != size:
                        image = image.resize(size, resample=Image.BILINEAR)
                    pixels[i] = np.asarray(image).reshape(self.height, self.width, self.channels)
            except (UnidentifiedImageError, OSError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"dataset.image_column {self.image_column!r} holds a value that is not a decodable png/jpeg "
                    f"image in {where} ({type(exc).__name__}: {exc}): store encoded image bytes in that column."
                ) from None  # this message, not PIL's, is the one a failed job reports
        labels = np.asarray(labels).astype(np.int64, copy=False)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"dataset.label_column {self.label_column!r} holds labels outside 0..{self.num_classes - 1} "
                f"(got {labels.min()}..{labels.max()}) in {where}."
            )
        x = (_to_chw(pixels, self.channels) - self.mean) / self.std
        return {"x": x.astype(np.float32, copy=False), "y": labels}


class ReadRowGroups:
    """parquet: read each unit (one row group of one file: `path`, `row_group`, `first_row`) of a batch of units,
    keep the rows of one side of the seeded split, and decode them, `chunk_rows` rows at a time.

    One Ray Data task reads whole row groups (the unit Parquet is written and compressed in) and decodes them in
    chunks whose decoded size is bounded, so a task's memory is one row group's encoded bytes plus one chunk.
    Each row's position in its file is counted here (`first_row` + its place in the row group), which with the
    file's path relative to the dataset's location (`row_keys`) decides its side of the split.
    """

    def __init__(
        self,
        filesystem: Any,
        base: str,
        base_is_file: bool,
        decode: DecodeEncodedImages,
        chunk_rows: int,
        split: tuple[int, float, bool] | None,
    ):
        """`split`: None to keep every row, else `(seed, val_fraction, keep_validation)`."""
        self.filesystem = filesystem
        self.base, self.base_is_file = base, base_is_file
        self.decode = decode
        self.chunk_rows = chunk_rows
        self.split = split

    def __call__(self, units: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = [self.decode.image_column, self.decode.label_column]
        for path, row_group, first_row in zip(units["path"], units["row_group"], units["first_row"], strict=True):
            path = str(path)
            where = f"file {path}"
            relative = relative_path(path, self.base, self.base_is_file)
            position = int(first_row)
            with self.filesystem.open_input_file(path) as source:
                reader = pq.ParquetFile(source)
                for chunk in reader.iter_batches(
                    batch_size=self.chunk_rows, row_groups=[int(row_group)], columns=columns, use_threads=False
                ):
                    rows = chunk.num_rows
                    images = chunk.column(self.decode.image_column)
                    labels = chunk.column(self.decode.label_column)
                    if self.split is not None:
                        seed, val_fraction, keep_validation = self.split
                        positions = np.arange(position, position + rows, dtype=np.uint64)
                        held_out = validation_mask(row_keys(relative, positions), seed, val_fraction)
                        keep = held_out if keep_validation else ~held_out
                        mask = pa.array(keep)
                        images, labels = images.filter(mask), labels.filter(mask)
                    position += rows
                    if len(labels) == 0:
                        continue
                    if labels.null_count:  # the driver's label pass refuses them; the file changed since
                        raise ValueError(
                            f"dataset.label_column {self.decode.label_column!r} has null labels in {where}: fill "
                            "them in or drop those rows."
                        )
                    yield self.decode.decode(images.to_pylist(), labels.to_numpy(), where)
