"""Streamed data in real runs on a real local Ray: an image folder trained through `syncbn train`; each worker sees
only its shard of an image folder or a Parquet file and its memory stays bounded by the streaming window, not by
the data set (measured); bad data
fails the job with a message naming the file or column. (The REST side is in test_api_data.py.)"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from service.cli import main
from service.engine.data import DataInfo, prepare_data
from service.engine.runner import launch_run
from service.spec import DatasetSpec, JobSpec
from tests.service.digits_files import write_digits_folder, write_digits_parquet

pytestmark = pytest.mark.timeout(300)


def test_cli_trains_an_image_folder_of_digits(ray_cluster: dict, tmp_path: Path, capsys: Any) -> None:
    write_digits_folder(tmp_path / "root" / "digits")
    spec = {
        "model": "cnn",
        "dataset": {"kind": "image_folder", "uri": "digits", "image_size": [8, 8], "channels": 1},
        "workers": 2,
        "epochs": 2,
        "batch_size": 32,
        "steps_per_epoch": 15,  # fewer than the 22 a shard holds: each epoch leaves its stream early
        "stats_every": 5,
        "checkpoint_every": 0,
        "optimizer": {"name": "sgd", "lr": 0.1},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    code = main(
        ["train", str(tmp_path / "spec.json"), "--output", str(out), "--json", "--data-root", str(tmp_path / "root")]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # (Ray may print warnings first)
    assert code == 0, summary
    assert summary["status"] == "succeeded" and summary["epochs_done"] == 2
    assert summary["final_val_acc"] > 0.8, summary  # real digits, learnt in 30 steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log = [r["message"] for r in records if r["kind"] == "log"]
    assert any("10 classes (streamed through Ray Data)" in m for m in log), log
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e["step"] for e in epochs] == [15, 30]  # the cap, every epoch


def _shard_peak_memory(config: dict[str, Any]) -> None:
    """Ray Train worker: stream this rank's shard for one epoch; write rows seen and memory growth to a file."""
    import ray.train

    from service.engine.data.rank_batches import StreamedBatches

    def status_bytes(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    # RssAnon is this process's own (private) memory: what it holds. VmHWM also counts the shared pages of Ray's
    # object store that the worker mapped while reading blocks (they belong to the store, which bounds and spills
    # them), so it is reported but not what the bound is about.
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    batches = StreamedBatches(DataInfo.from_dict(config["info"]), config["batch_size"], None, 0, rank, world)
    anon_before, hwm_before = status_bytes("RssAnon"), status_bytes("VmHWM")
    anon_peak = anon_before
    rows, steps = 0, 0
    for x, y in batches.train(epoch=1):
        rows += len(y)
        steps += 1
        assert x.dtype.is_floating_point and x.shape[1:] == (3, *config["image_size"])
        anon_peak = max(anon_peak, status_bytes("RssAnon"))
    result = {"rows": rows, "steps": steps, "steps_per_epoch": batches.steps_per_epoch}
    result["growth"] = anon_peak - anon_before
    result["hwm_growth"] = status_bytes("VmHWM") - hwm_before
    (Path(config["out"]) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize("kind", ["image_folder", "parquet"])
def test_each_worker_streams_only_its_shard_in_bounded_memory(ray_cluster: dict, tmp_path: Path, kind: str) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if kind == "image_folder":
        write_digits_folder(tmp_path / "root" / "digits")
    else:  # one file, one row group: a single read task decodes the whole set, in bounded chunks
        write_digits_parquet(tmp_path / "root" / "digits", files=1)
    size = [160, 160]  # 8x8 digits upscaled: 300 KiB per decoded RGB float32 sample, ~540 MB for the set
    spec = DatasetSpec(kind=kind, uri="digits", image_size=size, channels=3)
    prepared = prepare_data(spec, seed=0, data_root=tmp_path / "root")
    sample_bytes = 3 * size[0] * size[1] * 4
    shard_bytes = prepared.info.train_size // 2 * sample_bytes
    batch_size = 8  # the streaming window: a prefetched batch and a 4-batch local shuffle buffer, ~12 MB
    (tmp_path / "out").mkdir()
    trainer = TorchTrainer(
        _shard_peak_memory,
        train_loop_config={
            "info": prepared.info.to_dict(),
            "batch_size": batch_size,
            "image_size": size,
            "out": str(tmp_path / "out"),
        },
        datasets=prepared.datasets,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    per_rank = prepared.info.train_size // 2
    for result in ranks:
        # every rank got exactly its equal share (not the whole set), and the same number of steps
        assert result["steps"] == result["steps_per_epoch"] == per_rank // batch_size, result
        assert result["rows"] == per_rank // batch_size * batch_size
        # the worker's own memory grew by a small part of its shard, let alone the whole set
        assert result["growth"] < shard_bytes / 4, (result, shard_bytes)
    mib = [f"{r['growth'] / 2**20:.1f} MiB (VmHWM +{r['hwm_growth'] / 2**20:.1f} MiB)" for r in ranks]
    print(f"{kind}: shard {shard_bytes / 2**20:.0f} MiB; peak private memory growth per rank: {mib}")


@pytest.mark.timeout(600)
def test_a_streamed_job_resumes_after_a_killed_worker(ray_cluster: dict, tmp_path: Path) -> None:
    write_digits_folder(tmp_path / "root" / "digits")
    spec = JobSpec(
        model="cnn",
        dataset={"kind": "image_folder", "uri": "digits", "image_size": [8, 8], "channels": 1},
        workers=2,
        epochs=2,
        batch_size=32,
        stats_every=5,
        max_failures=1,
        checkpoint_every=1,
    )
    run = launch_run(spec, f"test-{uuid.uuid4().hex[:8]}", tmp_path / "out", data_root=tmp_path / "root")
    killed: list[int] = []
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + 480  # two worker-group starts; slow on a loaded 2-core machine
    while not records or records[-1]["kind"] != "end":
        assert time.monotonic() < deadline, f"the run did not end: {records[-3:]}"
        for record in run.poll(records[-1]["seq"] if records else 0):
            records.append(record)
            if record["kind"] == "epoch" and record["epoch"] == 1 and not killed:
                pid = next(w["pid"] for w in run.info()["workers"] if w["rank"] == 1)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.2)
    run.close()
    end = records[-1]
    assert killed and end["status"] == "succeeded" and end["epochs_done"] == 2, end
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    starts = [r["message"] for r in records if r["kind"] == "log" and "workers on cpu" in r["message"]]
    assert len(starts) == 2 and "resuming after epoch 1" in starts[1], starts
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert epochs[1]["step"] == 2 * epochs[0]["step"]  # the resumed epoch streamed a full shard again
