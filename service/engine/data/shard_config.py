"""How Ray Train hands the streamed datasets to the ranks: equal training shards, validation whole.

Ray Train's `DataConfig` splits every dataset with `streaming_split(world, equal=True)`: each rank gets
floor(N / world) rows and up to world - 1 rows are dropped. For training that is what DDP needs (every rank runs
the same number of steps). For validation it loses rows, and the accuracy would not be that of the validation set.
Validation involves no collective per batch (the ranks add up their sums once at the end), so its split need not be
equal: `streaming_split(world, equal=False)` gives disjoint shards that together hold every row exactly once.
"""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig

__all__ = ["VALIDATION_DATASET", "ShardConfig"]

VALIDATION_DATASET = "val"


class ShardConfig(DataConfig):
    """`DataConfig` that splits the validation dataset unevenly (every row once) and the others equally."""

    def configure(
        self,
        datasets: dict[str, Any],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        equal = {name: ds for name, ds in datasets.items() if name != VALIDATION_DATASET}
        output = (
            super().configure(equal, world_size, worker_handles, worker_node_ids, **kwargs)
            if equal
            else [{} for _ in range(world_size)]
        )
        if VALIDATION_DATASET in datasets:
            dataset = datasets[VALIDATION_DATASET]
            if dataset.name is None:
                dataset.set_name(VALIDATION_DATASET)
            # equal=False: blocks go to whichever rank asks next; every row reaches exactly one rank.
            shards = dataset.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for rank, shard in enumerate(shards):
                output[rank][VALIDATION_DATASET] = shard
        return output
