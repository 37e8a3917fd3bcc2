"""parquet: a Parquet file or folder with an encoded-image column and an integer label column, streamed through Ray
Data.

On the driver: the schema (file footers only) must have both columns, with binary images and integer labels; one
streamed pass over the *label column alone* counts the split and reads the number of classes (max label + 1), one
small batch at a time. The images themselves are read by `ray.data.read_parquet` and decoded/resized by a
`map_batches` transform in Ray Data's CPU tasks. The validation split is a seeded hash of each row's file path
relative to the dataset's location and its position in that file (`image_batches.row_keys`), so it is the same on
every pass and every epoch, and wherever the data lies; files are read in a new seeded order every epoch and rows
are mixed further by each rank's local shuffle buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.data_location import resolve_data_uri, uri_scheme
from service.engine.data.image_batches import DecodeEncodedImages, HashSplit, row_keys, validation_mask
from service.engine.data.source import DataInfo, PreparedData
from service.spec import DatasetSpec

logger = logging.getLogger(__name__)

__all__ = ["prepare"]

_LABEL_PASS_BATCH = 65_536
_MAX_CLASSES = 1000


def prepare(
    spec: DatasetSpec, seed: int, data_root: Path | str | None, allowed_schemes: Sequence[str] = ()
) -> PreparedData:
    """Check the schema, count the split and build the lazy Ray Data datasets for train and validation.

    Raises:
        ValueError: a location outside the root, no Parquet data there, a missing or mistyped column, labels out of
            range, or an empty split (each message names the field, the column or the file).
    """
    import ray.data
    from ray.data import FileShuffleConfig

    if spec.uri is None or spec.image_size is None:  # guarded by the spec validator; kept for type narrowing
        raise ValueError("dataset.uri and dataset.image_size are required for parquet data.")
    root = None if data_root is None else Path(data_root).resolve()
    location = resolve_data_uri(spec.uri, root, allowed_schemes, "dataset.uri")
    filesystem, path = _filesystem(location, spec.uri, "dataset.uri")
    _check_schema(spec, filesystem, path, "dataset.uri")
    path_is_file = _is_file(filesystem, path)
    columns = [spec.image_column, spec.label_column]
    split_here = spec.val_uri is None

    if split_here:
        train_size, val_size, max_label = _label_pass(
            spec, filesystem, path, spec.uri, seed, split_from_file=path_is_file
        )
        val_filesystem, val_path = filesystem, path
    else:
        train_size, _, max_label = _label_pass(spec, filesystem, path, spec.uri, seed, split_from_file=None)
        val_location = resolve_data_uri(spec.val_uri, root, allowed_schemes, "dataset.val_uri")
        val_filesystem, val_path = _filesystem(val_location, spec.val_uri, "dataset.val_uri")
        _check_schema(spec, val_filesystem, val_path, "dataset.val_uri")
        val_size, _, val_max = _label_pass(spec, val_filesystem, val_path, spec.val_uri, seed, split_from_file=None)
        max_label = max(max_label, val_max)
    if train_size == 0 or val_size == 0:
        raise ValueError(
            f"dataset.uri {spec.uri!r}: the split left {train_size} training and {val_size} validation rows: "
            "add rows, or change dataset.val_fraction."
        )
    num_classes = max(2, max_label + 1)
    decode = DecodeEncodedImages(
        spec.image_column, spec.label_column, spec.image_size, spec.channels, spec.mean, spec.std, num_classes
    )

    def dataset(fs: Any, where: str, shuffle: Any, keep_validation: bool | None) -> Any:
        ds = ray.data.read_parquet(
            where,
            filesystem=fs,
            columns=columns,
            include_paths=True,
            include_row_hash=keep_validation is not None,
            shuffle=shuffle,
        )
        if keep_validation is not None:
            split = HashSplit(seed, spec.val_fraction, keep_validation, path, path_is_file)
            ds = ds.map_batches(split, batch_format="numpy")
        return ds.map_batches(decode, batch_format="numpy")

    train = dataset(
        filesystem, path, FileShuffleConfig(seed=seed, reseed_after_execution=True), False if split_here else None
    )
    val = dataset(val_filesystem, val_path, None, True if split_here else None)
    info = DataInfo(
        sample_shape=(spec.channels, *spec.image_size),
        num_classes=num_classes,
        train_size=train_size,
        val_size=val_size,
        streamed=True,
    )
    logger.info("parquet %s: %d classes, %d train, %d val", spec.uri, num_classes, train_size, val_size)
    return PreparedData(info=info, datasets={"train": train, "val": val})


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


def _check_schema(spec: DatasetSpec, filesystem: Any, path: str, field: str) -> None:
    """Both columns present, images binary, labels integer (reads the Parquet footers only)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    given = spec.uri if field == "dataset.uri" else spec.val_uri
    try:
        schema = pads.dataset(path, filesystem=filesystem, format="parquet").schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{field} {given!r} is not readable as Parquet ({exc}).") from exc
    names = schema.names
    if not names:
        raise ValueError(f"{field} {given!r} holds no Parquet data: put .parquet files there.")
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
            f"dataset.image_column {spec.image_column!r} must hold encoded image bytes (binary), got {image_type}."
        )
    if not pa.types.is_integer(schema.field(spec.label_column).type):
        raise ValueError(
            f"dataset.label_column {spec.label_column!r} must hold integer class labels, got "
            f"{schema.field(spec.label_column).type}."
        )


def _label_pass(
    spec: DatasetSpec, filesystem: Any, path: str, given: str, seed: int, split_from_file: bool | None
) -> tuple[int, int, int]:
    """(train rows, validation rows, largest label) from one streamed pass over the label column alone.

    `split_from_file` is None for no split, else whether `path` is a single file (the rows' relative paths are
    then the file's name).

    Raises:
        ValueError: null labels (counted over the whole pass) or labels out of range.
    """
    import ray.data

    splitting = split_from_file is not None
    labels = ray.data.read_parquet(
        path,
        filesystem=filesystem,
        columns=[spec.label_column],
        include_paths=splitting,
        include_row_hash=splitting,
    )
    train = val = 0
    low, high = 0, -1
    nulls = 0
    for batch in labels.iter_batches(batch_size=_LABEL_PASS_BATCH, batch_format="pyarrow"):
        labels_here = batch[spec.label_column]
        if labels_here.null_count:  # numpy would turn them into NaN floats, then fail with a bare "NaN" error
            nulls += labels_here.null_count
            continue
        column = labels_here.to_numpy()
        if column.size == 0:
            continue
        low, high = min(low, int(column.min())), max(high, int(column.max()))
        if split_from_file is not None:
            keys = row_keys(
                batch["path"].to_numpy(zero_copy_only=False), batch["row_hash"].to_numpy(), path, split_from_file
            )
            held_out = int(validation_mask(keys, seed, spec.val_fraction).sum())
            val += held_out
            train += column.size - held_out
        else:
            train += column.size
    if nulls:
        raise ValueError(
            f"dataset.label_column {spec.label_column!r} has {nulls} null labels in {given!r}: fill them in or drop "
            "those rows."
        )
    if low < 0 or high >= _MAX_CLASSES:
        raise ValueError(
            f"dataset.label_column {spec.label_column!r} labels must lie in 0..{_MAX_CLASSES - 1}, got {low}..{high}."
        )
    return train, val, high
