"""The one small interface between a data source and the rest of the engine.

On the job's driver, a source turns the spec's `dataset` section into `PreparedData`: what the workers need to know
before the first batch (`DataInfo`: sample shape, classes, split sizes) and either the in-memory tensors (digits,
synthetic, npz; shipped once through the object store) or Ray Data datasets `{"train", "val"}` (image_folder,
parquet; handed to the `TorchTrainer` as `datasets=` and streamed, sharded per rank). On a worker,
`service.engine.data.rank_batches` turns either form into "this rank's batches of an epoch".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from service.engine.data.in_memory import DataSplits

__all__ = ["DataInfo", "PreparedData"]


@dataclass(frozen=True)
class DataInfo:
    """What every rank must agree on before training: sample shape, classes and split sizes."""

    sample_shape: tuple[int, ...]
    num_classes: int
    train_size: int
    val_size: int
    streamed: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (travels in the train loop's config)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataInfo:
        return cls(**{**data, "sample_shape": tuple(data["sample_shape"])})

    def describe(self) -> str:
        """One log line for the job's records."""
        how = "streamed through Ray Data" if self.streamed else "in memory"
        return (
            f"data: {self.train_size} train / {self.val_size} val samples of shape {list(self.sample_shape)}, "
            f"{self.num_classes} classes ({how})"
        )


@dataclass
class PreparedData:
    """A job's data as the driver hands it to Ray Train.

    Attributes:
        info: shapes, classes and sizes.
        splits: the in-memory tensors (digits, synthetic, npz), else None.
        datasets: Ray Data datasets `{"train": ..., "val": ...}` (image_folder, parquet), else empty.
    """

    info: DataInfo
    splits: DataSplits | None = None
    datasets: dict[str, Any] = field(default_factory=dict)
