"""parquet: a Parquet file or folder with an encoded-image column and an integer label column, streamed through Ray
Data.

On the driver: the files are listed (the file itself, or the `.parquet` files below the folder at any depth), and
a few threads read each file's footer and its *label column alone*, one row group at a time: that checks both
columns (binary images, integer labels) and the labels (no nulls, 0..999), counts the split, reads the number of
classes (max label + 1) and yields the read units, one per row group. Each dataset is those units
(`ray.data.from_items`) mapped by `image_batches.ReadRowGroups` in Ray Data's CPU tasks: a task reads whole row
groups, keeps its side of the split and decodes, resizes and normalises the rows in chunks of bounded size.

(`ray.data.read_parquet` is not used: on every execution, so every epoch and every validation pass, it lists the
files and reads their footers again on a pool of 32 new actors, which on a small machine took longer than the
training itself; README, "Streamed data".)

The validation split is a seeded hash of each row's file path relative to the dataset's location and its position
in that file (`image_batches.row_keys`), so it is the same on every pass and every epoch, and wherever the data
lies; the training set's row groups are read in a new seeded order every epoch (`randomize_block_order`,
reseeded on every execution) and rows are mixed further by each rank's local shuffle buffer.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from service.data_location import resolve_data_uri, uri_scheme
from service.engine.data.image_batches import (
    DecodeEncodedImages,
    ReadRowGroups,
    relative_path,
    row_keys,
    validation_mask,
)
from service.engine.data.source import DataInfo, PreparedData
from service.spec import DatasetSpec

logger = logging.getLogger(__name__)

__all__ = ["prepare"]

_MAX_CLASSES = 1000
#: Files whose footers and label columns the driver reads at once (the reads wait on storage, not on the CPU).
_SCAN_THREADS = 16
#: Decoded bytes per chunk a read task hands on (float32 `x`): bounds a task's memory whatever the row groups hold.
_CHUNK_BYTES = 16 * 2**20
#: At most this many blocks of read units; beyond it a block holds several row groups (seeded mix for training).
_MAX_UNIT_BLOCKS = 4096


@dataclass(frozen=True)
class _FileScan:
    """One file as the driver's label pass saw it: per row group, its first row, its rows and how many of them the
    split holds out (0 without a split); its labels' null count and range."""

    path: str
    first_rows: tuple[int, ...]
    rows: tuple[int, ...]
    held_out: tuple[int, ...]
    nulls: int
    low: int
    high: int


def prepare(
    spec: DatasetSpec, seed: int, data_root: Path | str | None, allowed_schemes: Sequence[str] = ()
) -> PreparedData:
    """Check the files and their labels, count the split and build the lazy Ray Data datasets for train and
    validation.

    Raises:
        ValueError: a location outside the root, no Parquet data there, a missing or mistyped column, null labels,
            labels out of range, or an empty split (each message names the field, the column or the file).
    """
    if spec.uri is None or spec.image_size is None:  # guarded by the spec validator; kept for type narrowing
        raise ValueError("dataset.uri and dataset.image_size are required for parquet data.")
    root = None if data_root is None else Path(data_root).resolve()
    location = resolve_data_uri(spec.uri, root, allowed_schemes, "dataset.uri")
    filesystem, path = _filesystem(location, spec.uri, "dataset.uri")
    path_is_file = _is_file(filesystem, path)
    split_here = spec.val_uri is None
    split = (seed, spec.val_fraction) if split_here else None
    scans = _label_pass(spec, filesystem, path, path_is_file, spec.uri, "dataset.uri", split)
    max_label = max(scan.high for scan in scans)
    if split_here:
        train_units, val_units = _units(scans, held_out=False), _units(scans, held_out=True)
        val_filesystem, val_path, val_is_file = filesystem, path, path_is_file
    else:
        train_units = _units(scans, held_out=None)
        val_location = resolve_data_uri(spec.val_uri, root, allowed_schemes, "dataset.val_uri")
        val_filesystem, val_path = _filesystem(val_location, spec.val_uri, "dataset.val_uri")
        val_is_file = _is_file(val_filesystem, val_path)
        val_scans = _label_pass(spec, val_filesystem, val_path, val_is_file, spec.val_uri, "dataset.val_uri", None)
        val_units = _units(val_scans, held_out=None)
        max_label = max(max_label, *(scan.high for scan in val_scans))
    train_size, val_size = sum(u["rows"] for u in train_units), sum(u["rows"] for u in val_units)
    if train_size == 0 or val_size == 0:
        raise ValueError(
            f"dataset.uri {spec.uri!r}: the split left {train_size} training and {val_size} validation rows: "
            "add rows, or change dataset.val_fraction."
        )
    num_classes = max(2, max_label + 1)
    decode = DecodeEncodedImages(
        spec.image_column, spec.label_column, spec.image_size, spec.channels, spec.mean, spec.std, num_classes
    )
    chunk_rows = max(1, _CHUNK_BYTES // (4 * spec.channels * spec.image_size[0] * spec.image_size[1]))
    train_read = ReadRowGroups(
        filesystem, path, path_is_file, decode, chunk_rows, (seed, spec.val_fraction, False) if split_here else None
    )
    val_read = ReadRowGroups(
        val_filesystem,
        val_path,
        val_is_file,
        decode,
        chunk_rows,
        (seed, spec.val_fraction, True) if split_here else None,
    )
    info = DataInfo(
        sample_shape=(spec.channels, *spec.image_size),
        num_classes=num_classes,
        train_size=train_size,
        val_size=val_size,
        streamed=True,
    )
    logger.info(
        "parquet %s: %d classes, %d train, %d val rows in %d + %d row groups",
        spec.uri,
        num_classes,
        train_size,
        val_size,
        len(train_units),
        len(val_units),
    )
    datasets = {"train": _dataset(train_units, train_read, seed), "val": _dataset(val_units, val_read, None)}
    return PreparedData(info=info, datasets=datasets)


def _dataset(units: list[dict[str, Any]], read: ReadRowGroups, shuffle_seed: int | None) -> Any:
    """The Ray Data dataset of some read units: one block per unit (up to `_MAX_UNIT_BLOCKS`), each read and
    decoded by one `read` call in a Ray Data task; with a seed, in a new seeded order on every execution."""
    import ray.data
    from ray.data import RandomSeedConfig

    if shuffle_seed is not None and len(units) > _MAX_UNIT_BLOCKS:
        units = list(units)
        random.Random(shuffle_seed).shuffle(units)  # blocks of several units: each a seeded mix of row groups
    dataset = ray.data.from_items(units, override_num_blocks=min(len(units), _MAX_UNIT_BLOCKS))
    if shuffle_seed is not None and len(units) > 1:  # (one block has one order)
        dataset = dataset.randomize_block_order(seed=RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True))
    # batch_size=None: one call per block of units, so every row group has a task of its own.
    return dataset.map_batches(read, batch_size=None, batch_format="numpy")


def _units(scans: list[_FileScan], held_out: bool | None) -> list[dict[str, Any]]:
    """The read units of one side of the split (None: every row), one per row group that holds rows of it."""
    units = []
    for scan in scans:
        for group, (first, rows, out) in enumerate(zip(scan.first_rows, scan.rows, scan.held_out, strict=True)):
            kept = rows if held_out is None else (out if held_out else rows - out)
            if kept:
                units.append({"path": scan.path, "row_group": group, "first_row": first, "rows": kept})
    return units


def _filesystem(location: str, given: str, field: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path of a resolved location; refuses one that does not exist."""
    import pyarrow.fs as pafs

    if uri_scheme(location) is None:
        filesystem: Any = pafs.LocalFileSystem()
        path = location
    else:
        filesystem, path = pafs.FileSystem.from_uri(location)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        raise ValueError(f"{field} {given!r} does not exist: put a .parquet file, or a folder of them, there.")
    return filesystem, path


def _is_file(filesystem: Any, path: str) -> bool:
    import pyarrow.fs as pafs

    return bool(filesystem.get_file_info(path).type == pafs.FileType.File)


def _parquet_files(filesystem: Any, path: str, given: str, field: str) -> list[str]:
    """The file itself, or the `.parquet` files below the folder at any depth (sorted; names starting with `.` or
    `_` skipped, as Spark's `_SUCCESS` and checksum files)."""
    import pyarrow.fs as pafs

    if _is_file(filesystem, path):
        return [path]
    base = PurePosixPath(path.rstrip("/"))
    files = [
        entry.path
        for entry in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        if entry.type == pafs.FileType.File
        and entry.path.lower().endswith(".parquet")
        and not any(part.startswith((".", "_")) for part in PurePosixPath(entry.path).relative_to(base).parts)
    ]
    if not files:
        raise ValueError(f"{field} {given!r} holds no Parquet data: put .parquet files there.")
    return sorted(files)


def _check_schema(spec: DatasetSpec, schema: Any, field: str, given: str) -> None:
    """Both columns present, images binary, labels integer (from one file's footer)."""
    import pyarrow as pa

    names = schema.names
    wanted = (("dataset.image_column", spec.image_column), ("dataset.label_column", spec.label_column))
    for column_field, column in wanted:
        if column not in names:
            raise ValueError(
                f"{column_field} {column!r} is not a column of {field}'s Parquet data (columns: {names[:10]}): "
                f"set {column_field} to the right column (in {given!r})."
            )
    image_type = schema.field(spec.image_column).type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise ValueError(
            f"dataset.image_column {spec.image_column!r} must hold encoded image bytes (binary), got {image_type} "
            f"(in {given!r})."
        )
    if not pa.types.is_integer(schema.field(spec.label_column).type):
        raise ValueError(
            f"dataset.label_column {spec.label_column!r} must hold integer class labels, got "
            f"{schema.field(spec.label_column).type} (in {given!r})."
        )


def _label_pass(
    spec: DatasetSpec,
    filesystem: Any,
    path: str,
    path_is_file: bool,
    given: str,
    field: str,
    split: tuple[int, float] | None,
) -> list[_FileScan]:
    """Every file's row groups, split counts and label range, from its footer and its label column alone.

    `split` is None for no split, else `(seed, val_fraction)`. Memory: one row group's labels per thread.

    Raises:
        ValueError: no Parquet data, a file that is not Parquet, a missing or mistyped column, null labels (counted
            over every file) or labels out of range.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _parquet_files(filesystem, path, given, field)

    def scan(file: str) -> _FileScan:
        named = given if path_is_file else f"{given}/{relative_path(file, path, False)}"
        try:
            with filesystem.open_input_file(file) as source:
                reader = pq.ParquetFile(source)
                _check_schema(spec, reader.schema_arrow, field, named)
                relative = relative_path(file, path, path_is_file)
                first_rows, rows, held_out = [], [], []
                nulls, low, high, position = 0, 0, -1, 0
                for group in range(reader.num_row_groups):
                    labels = reader.read_row_group(group, columns=[spec.label_column]).column(0)
                    count = len(labels)
                    first_rows.append(position)
                    rows.append(count)
                    if split is not None:
                        keys = row_keys(relative, np.arange(position, position + count, dtype=np.uint64))
                        held_out.append(int(validation_mask(keys, split[0], split[1]).sum()))
                    else:
                        held_out.append(0)
                    position += count
                    nulls += labels.null_count
                    if labels.null_count or count == 0:
                        continue  # numpy would turn nulls into NaN floats, then fail with a bare "NaN" error
                    values = labels.to_numpy()
                    low, high = min(low, int(values.min())), max(high, int(values.max()))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{field} {named!r} is not readable as Parquet ({exc}).") from exc
        return _FileScan(file, tuple(first_rows), tuple(rows), tuple(held_out), nulls, low, high)

    with ThreadPoolExecutor(max_workers=max(1, min(_SCAN_THREADS, len(files)))) as pool:
        scans = list(pool.map(scan, files))
    nulls = sum(s.nulls for s in scans)
    if nulls:
        raise ValueError(
            f"dataset.label_column {spec.label_column!r} has {nulls} null labels in {given!r}: fill them in or drop "
            "those rows."
        )
    low, high = min(s.low for s in scans), max(s.high for s in scans)
    if low < 0 or high >= _MAX_CLASSES:
        raise ValueError(
            f"dataset.label_column {spec.label_column!r} labels must lie in 0..{_MAX_CLASSES - 1}, got {low}..{high}."
        )
    return scans
