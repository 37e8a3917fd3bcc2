"""A job's data: one module per kind of source behind one small interface.

- `source`: `DataInfo` and `PreparedData`, what a source hands the engine on the job's driver;
- `in_memory`: digits, synthetic and npz (loaded on the driver, shipped once through the object store);
- `image_folder`, `parquet`: Ray Data datasets, streamed and sharded per rank (`image_batches` holds their
  decode/normalise/split transforms);
- `rank_batches`: on a worker, "this rank's batches of an epoch" from either form.

`prepare_data` picks the source a spec names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from service.engine.data.in_memory import DataSplits, load_data
from service.engine.data.source import DataInfo, PreparedData
from service.spec import DatasetSpec

__all__ = ["DataInfo", "DataSplits", "PreparedData", "load_data", "prepare_data"]


def prepare_data(
    spec: DatasetSpec, seed: int, data_root: Path | str | None = None, allowed_schemes: Sequence[str] = ()
) -> PreparedData:
    """What the job's driver hands to Ray Train for the data set `spec` names.

    Args:
        spec: the job's `dataset` section.
        seed: the job's seed (split, shuffles, synthetic samples).
        data_root: the folder relative paths are resolved under (npz, image_folder, parquet).
        allowed_schemes: remote URI schemes the operator allows (`s3`, `gs`).

    Raises:
        ValueError: the data cannot be used; the message names the field, file or column.
    """
    if spec.kind == "image_folder":
        from service.engine.data import image_folder

        return image_folder.prepare(spec, seed, data_root, allowed_schemes)
    if spec.kind == "parquet":
        from service.engine.data import parquet

        return parquet.prepare(spec, seed, data_root, allowed_schemes)
    splits = load_data(spec, seed, data_root)
    info = DataInfo(
        sample_shape=splits.sample_shape,
        num_classes=splits.num_classes,
        train_size=len(splits.y_train),
        val_size=len(splits.y_val),
        streamed=False,
    )
    return PreparedData(info=info, splits=splits)
