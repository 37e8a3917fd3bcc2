"""On a worker: this rank's batches of an epoch, wherever they come from.

The train loop asks a `RankBatches` for `steps_per_epoch`, `train(epoch)` and `validation()` and never looks at
the source. Two implementations:

- `MemoryBatches` (digits, synthetic, npz): the tensors arrive once through the object store; a
  `DistributedSampler` (reshuffled by `set_epoch`) gives each rank its part.
- `StreamedBatches` (image_folder, parquet): Ray Train hands each rank its shard of the Ray Data datasets
  (`ray.train.get_dataset_shard`; training split with `equal=True`, so every rank gets the same number of rows;
  validation split unevenly, so that every row is scored once: `shard_config.ShardConfig`);
  `iter_torch_batches` streams it with a bounded prefetch and a local shuffle buffer. A new iteration is a new
  execution of the dataset, which reads the files in a new seeded order: a reshuffle per epoch.

Every rank runs exactly `steps_per_epoch` steps per epoch (DDP's collectives need it): full batches only, unless a
rank's share is smaller than one batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from service.engine.data.in_memory import DataSplits
from service.engine.data.source import DataInfo

__all__ = ["EVAL_BATCH", "MemoryBatches", "RankBatches", "StreamedBatches"]

#: Validation batch size (no gradients: larger batches are cheap).
EVAL_BATCH = 512
_SHUFFLE_BATCHES = 4

Batch = tuple[torch.Tensor, torch.Tensor]


class RankBatches(Protocol):
    """This rank's view of a job's data."""

    steps_per_epoch: int

    def train(self, epoch: int) -> Iterator[Batch]:
        """This rank's training batches of `epoch` (at most `steps_per_epoch` of them), shuffled per epoch."""
        ...

    def validation(self) -> Iterator[Batch]:
        """This rank's part of the validation set (the ranks' parts are disjoint and cover it)."""
        ...


def _steps(per_rank: int, batch_size: int, cap: int | None) -> tuple[int, bool]:
    """(steps per epoch, drop_last): full batches unless a rank's share is smaller than one batch."""
    drop_last = per_rank >= batch_size
    steps = per_rank // batch_size if drop_last else 1
    return (min(steps, cap) if cap is not None else steps), drop_last


class MemoryBatches:
    """In-memory tensors split over ranks by a `DistributedSampler`."""

    def __init__(
        self, data: DataSplits, batch_size: int, cap: int | None, seed: int, rank: int, world: int, pin: bool
    ) -> None:
        self.data, self.rank, self.world = data, rank, world
        dataset = TensorDataset(data.x_train, data.y_train)
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.steps_per_epoch, drop_last = _steps(len(self.sampler), batch_size, cap)
        # Full batches only (as DDP recipes do): a last batch of a single sample would break plain BatchNorm1d.
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last, pin_memory=pin
        )

    def train(self, epoch: int) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        for index, (x, y) in enumerate(self.loader):
            if index >= self.steps_per_epoch:
                return
            yield x, y

    def validation(self) -> Iterator[Batch]:
        # Each rank scores every world-th sample: no padding, no sample counted twice.
        x_val = self.data.x_val[self.rank :: self.world]
        y_val = self.data.y_val[self.rank :: self.world]
        for start in range(0, len(y_val), EVAL_BATCH):
            yield x_val[start : start + EVAL_BATCH], y_val[start : start + EVAL_BATCH]


class StreamedBatches:
    """This rank's shard of the Ray Data datasets `train` and `val` (set up by Ray Train from `datasets=`)."""

    def __init__(self, info: DataInfo, batch_size: int, cap: int | None, seed: int, rank: int, world: int) -> None:
        import ray.train

        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val")
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        # streaming_split(equal=True) gives every rank floor(N / world) rows.
        self.steps_per_epoch, self.drop_last = _steps(info.train_size // world, batch_size, cap)

    def train(self, epoch: int) -> Iterator[Batch]:
        batches = self.train_shard.iter_torch_batches(
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            local_shuffle_buffer_size=_SHUFFLE_BATCHES * self.batch_size,
            local_shuffle_seed=self.seed * 100_003 + epoch * 1_009 + self.rank,
            dtypes={"x": torch.float32, "y": torch.int64},
            device="cpu",
        )
        with _data_errors("training"):
            for index, batch in enumerate(batches):
                if index >= self.steps_per_epoch:
                    return
                yield batch["x"], batch["y"]

    def validation(self) -> Iterator[Batch]:
        batches = self.val_shard.iter_torch_batches(
            batch_size=EVAL_BATCH, dtypes={"x": torch.float32, "y": torch.int64}, device="cpu"
        )
        with _data_errors("validation"):
            for batch in batches:
                yield batch["x"], batch["y"]


@contextlib.contextmanager
def _data_errors(split: str) -> Iterator[None]:
    """Turn a failure inside Ray Data (an undecodable image, a bad label) into one sentence that names the file.

    Ray Data wraps a task's exception in its own and appends advice on retries to the message; the job's error
    should be the data problem itself: the first line of the innermost exception.
    """
    try:
        yield
    except Exception as exc:
        cause: BaseException = exc
        while (inner := getattr(cause, "cause", None) or cause.__cause__) is not None and inner is not cause:
            cause = inner
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        first = lines[0] if lines else type(cause).__name__
        raise ValueError(f"reading the {split} data failed: {first}") from None
