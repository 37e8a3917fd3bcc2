"""The streamed splits on a real local Ray: the Parquet validation split is the same wherever the files lie and
however they are cut into row groups (it hashes the path relative to the dataset's location and the row's position
in its file), and validation scores every row exactly once, even when the set's size is not a multiple of the
workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.engine.data import PreparedData, prepare_data
from service.spec import DatasetSpec
from tests.service.digits_files import digits_pixels, write_digits_parquet

pytestmark = pytest.mark.timeout(600)


def _val_rows(prepared: PreparedData) -> list[tuple[int, bytes]]:
    rows = []
    for batch in prepared.datasets["val"].iter_batches(batch_size=512, batch_format="numpy"):
        rows += [(int(y), x.tobytes()) for x, y in zip(batch["x"], batch["y"], strict=True)]
    return sorted(rows)


@pytest.mark.parametrize("uri", ["digits_parquet", "digits_parquet/part-1.parquet"], ids=["folder", "file"])
def test_the_parquet_validation_split_does_not_depend_on_where_the_data_lies(
    ray_cluster: dict, tmp_path: Path, uri: str
) -> None:
    first = tmp_path / "root-a"
    write_digits_parquet(first / "digits_parquet", files=3)
    # The same files in another data root, one folder deeper: every absolute path differs.
    second = tmp_path / "elsewhere" / "root-b"
    shutil.copytree(first / "digits_parquet", second / "nested" / "digits_parquet")
    spec = {"kind": "parquet", "image_size": [8, 8], "channels": 1, "val_fraction": 0.2}
    here = prepare_data(DatasetSpec(**spec, uri=uri), seed=4, data_root=first)
    there = prepare_data(DatasetSpec(**spec, uri=f"nested/{uri}"), seed=4, data_root=second)
    assert (here.info.train_size, here.info.val_size) == (there.info.train_size, there.info.val_size)
    rows = _val_rows(here)
    assert len(rows) == here.info.val_size > 0
    assert rows == _val_rows(there)


def _score_validation(config: dict[str, Any]) -> None:
    """Ray Train worker: the labels of this rank's validation rows, written to a file."""
    import ray.train

    from service.engine.data import DataInfo
    from service.engine.data.rank_batches import StreamedBatches

    rank = ray.train.get_context().get_world_rank()
    batches = StreamedBatches(DataInfo.from_dict(config["info"]), 4, None, 0, rank, 2)
    labels = [int(v) for _, y in batches.validation() for v in y.tolist()]
    (Path(config["out"]) / f"rank{rank}.json").write_text(json.dumps(labels))


def test_validation_sees_every_row_once_when_rows_do_not_divide_by_the_workers(
    ray_cluster: dict, tmp_path: Path
) -> None:
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from service.engine.data import DataInfo
    from service.engine.data.shard_config import ShardConfig

    def rows(n: int) -> Any:
        # Many small blocks, so both ranks get some; y numbers the rows.
        items = [{"x": np.zeros((1, 2, 2), dtype=np.float32), "y": i} for i in range(n)]
        return ray.data.from_items(items, override_num_blocks=13)

    val_rows = 101  # odd: an equal split over 2 ranks would drop one row
    info = DataInfo(sample_shape=(1, 2, 2), num_classes=2, train_size=40, val_size=val_rows, streamed=True)
    (tmp_path / "out").mkdir()
    trainer = TorchTrainer(
        _score_validation,
        train_loop_config={"info": info.to_dict(), "out": str(tmp_path / "out")},
        datasets={"train": rows(40), "val": rows(val_rows)},
        dataset_config=ShardConfig(),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    seen = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(seen[0] + seen[1]) == list(range(val_rows))


def test_row_keys_hash_the_relative_path_and_the_position_and_mix_in_the_seed() -> None:
    from service.engine.data.image_batches import relative_path, row_keys, validation_mask

    positions = np.arange(500, 1500, dtype=np.uint64)
    here = relative_path("/data/a/part-1.parquet", "/data", base_is_file=False)
    there = relative_path("/mnt/elsewhere/b/a/part-1.parquet", "/mnt/elsewhere/b/", base_is_file=False)
    assert here == there == "a/part-1.parquet"
    keys = row_keys(here, positions)
    assert len(set(keys.tolist())) == len(positions)
    # A location that is the file itself names it "part-1.parquet", not "a/part-1.parquet": another key.
    alone = relative_path("/mnt/elsewhere/b/a/part-1.parquet", "/mnt/elsewhere/b/a/part-1.parquet", base_is_file=True)
    assert alone == "part-1.parquet" and not np.array_equal(keys, row_keys(alone, positions))
    held_out = validation_mask(keys, seed=4, val_fraction=0.2)
    assert 150 < held_out.sum() < 250
    assert not np.array_equal(held_out, validation_mask(keys, seed=5, val_fraction=0.2))


def test_row_groups_change_neither_the_split_nor_the_pixels_and_training_reads_them_in_a_new_order(
    ray_cluster: dict, tmp_path: Path
) -> None:
    """The same file written as one row group and as 15 (a read unit each): a row's position in the file, not in its
    row group, decides its side; every row lands on one side, decoded to its own pixels; each training pass is a
    new seeded order of the row groups."""
    write_digits_parquet(tmp_path / "one" / "digits", files=1)
    write_digits_parquet(tmp_path / "many" / "digits", files=1, row_group_rows=128)
    assert pq.ParquetFile(tmp_path / "many" / "digits" / "part-0.parquet").num_row_groups == 15
    spec = DatasetSpec(kind="parquet", uri="digits/part-0.parquet", image_size=[8, 8], channels=1)
    one = prepare_data(spec, seed=3, data_root=tmp_path / "one")
    many = prepare_data(spec, seed=3, data_root=tmp_path / "many")
    assert (one.info.train_size, one.info.val_size) == (many.info.train_size, many.info.val_size)
    assert _val_rows(one) == _val_rows(many)
    passes = [
        [
            (int(y), x.tobytes())
            for batch in many.datasets["train"].iter_batches(batch_size=256)
            for x, y in zip(batch["x"], batch["y"], strict=True)
        ]
        for _ in range(2)
    ]
    assert sorted(passes[0]) == sorted(passes[1]) and passes[0] != passes[1]
    assert len(passes[0]) == many.info.train_size
    originals, labels = digits_pixels()
    every = sorted(passes[0] + _val_rows(many))
    pixels = ((originals.astype(np.float32) / 255.0 - 0.5) / 0.5).reshape(len(labels), 1, 8, 8)
    assert every == sorted((int(y), x.tobytes()) for x, y in zip(pixels, labels, strict=True))
