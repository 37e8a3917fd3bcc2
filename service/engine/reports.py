"""What workers report to Ray Train, and how the controller turns one report per rank into records.

Every rank calls `ray.train.report` at the same points (it is a barrier), with a dict whose `kind` says which:

- `start` (once per attempt): `rank, pid, hostname, device, world_size, steps_per_epoch, total_steps,
  resumed_from_epoch` and `times` (rank 0's marks `loop_started`, `model_ready` of `service.engine.timeline`);
- `step` (every `stats_every` steps): `step, epoch, train_loss, lr, samples_per_s, step_time_s` (global values,
  equal on every rank) and `layers`: this rank's `syncbn.BatchStatsRecorder.packed_snapshot()` (two float64
  tensors for all layers; the per-layer dicts of `snapshot()` are still understood);
- `steps`: `steps`, a list of `step` reports sent together. With `stats_every` below `REPORT_EVERY_STEPS` the
  loop keeps its recorded steps and reports them `steps_per_report(stats_every)` at a time (and whatever is left
  before each epoch's report): a report round has a fixed cost in every process of the run (the ranks' barrier,
  the controller's poll, the record log's push and the service's read) that recording every step would pay at
  every step;
- `epoch` (after each epoch's validation): `epoch, step, train_loss, train_acc, val_loss, val_acc,
  val_loss_precise, val_acc_precise, epoch_time_s` (global values; the `_precise` ones with precise BatchNorm
  statistics, None when `precise_bn` did not run that epoch);
- `final` (once, at the end): `verdict, reason, epochs_done, best_val_acc, final_val_acc, final_val_acc_precise,
  final_train_loss` and `times` (`first_step`, `last_step`, `epochs`)
  (rank 0 attaches the final model as a checkpoint; the driver reads its location from Ray Train's result).

Layer statistics are merged over all ranks: with `sync_group_size`, `ranks_agree` is False by design (each group
normalises with its own global statistics) while `count`, `mean`, `var` and the skew measures describe the whole
world batch.

`records_from_reports` merges one such dict per rank into the records of the engine's contract (`step`, `layers`,
`epoch`, `log`) plus three internal kinds that the recorder keeps as state: `info` (the attempt's workers),
`summary` (the final report) and `timeline` (the marks in `times`). A `layers` record holds
`layers: {layer: summary}` (JSON-ready scalars) and `vectors: {layer: bytes}`: the merged per-channel block as
float32 (`service.store.layer_codec.VECTOR_ROWS` x channels), which is what the store keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from syncbn import merge_rank_layer_stats
from syncbn.stats import PackedLayerStats, merge_packed_layer_stats

__all__ = [
    "EPOCH_FIELDS",
    "REPORT_EVERY_STEPS",
    "STEP_FIELDS",
    "SUMMARY_FIELDS",
    "merge_layers",
    "records_from_reports",
    "steps_per_report",
]

#: Training steps between two step reports at the least: recorded steps closer than that travel together.
REPORT_EVERY_STEPS = 10

STEP_FIELDS = ("step", "epoch", "train_loss", "lr", "samples_per_s", "step_time_s")
EPOCH_FIELDS = (
    "epoch",
    "step",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_loss_precise",
    "val_acc_precise",
    "epoch_time_s",
)
SUMMARY_FIELDS = (
    "verdict",
    "reason",
    "epochs_done",
    "best_val_acc",
    "final_val_acc",
    "final_val_acc_precise",
    "final_train_loss",
)
_INFO_FIELDS = ("world_size", "device", "steps_per_epoch", "total_steps", "resumed_from_epoch")


def steps_per_report(stats_every: int) -> int:
    """How many recorded steps one `steps` report carries: enough that reports are `REPORT_EVERY_STEPS` training
    steps apart (1 when `stats_every` already is that far: a plain `step` report)."""
    if stats_every < 1:
        raise ValueError(f"expected stats_every >= 1, got {stats_every}")
    return max(1, -(-REPORT_EVERY_STEPS // stats_every))


def records_from_reports(per_rank: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn the metrics dicts of one `ray.train.report` round (index = rank) into records (without `seq`).

    Global numbers are taken from rank 0 (every rank holds the same all-reduced values); per-layer statistics are
    merged across ranks with `syncbn.merge_rank_layer_stats`.

    Raises:
        ValueError: the ranks reported different kinds, or an unknown kind (a bug in the train loop).
    """
    if not per_rank:
        return []
    kinds = {report.get("kind") for report in per_rank}
    if len(kinds) != 1:
        raise ValueError(f"expected every rank to report the same kind, got {sorted(map(str, kinds))}")
    kind = kinds.pop()
    first = per_rank[0]
    if kind == "start":
        workers = [{"rank": int(r["rank"]), "pid": int(r["pid"]), "hostname": str(r["hostname"])} for r in per_rank]
        info = {key: first[key] for key in _INFO_FIELDS} | {"workers": workers}
        where = ", ".join(f"rank {w['rank']} pid {w['pid']} on {w['hostname']}" for w in workers)
        resumed = first["resumed_from_epoch"]
        origin = f"resuming after epoch {resumed} from its checkpoint" if resumed else "starting from scratch"
        message = (
            f"{len(workers)} workers on {first['device']} ({where}), {first['steps_per_epoch']} steps per epoch, "
            f"{origin}"
        )
        return [{"kind": "info", **info}, {"kind": "log", "level": "info", "message": message}, *_timeline(first)]
    if kind == "steps":
        counts = {len(report["steps"]) for report in per_rank}
        if len(counts) != 1:
            raise ValueError(f"expected every rank to report the same number of steps, got {sorted(counts)}")
        out: list[dict[str, Any]] = []
        for index in range(counts.pop()):
            out += records_from_reports([report["steps"][index] for report in per_rank])
        return out
    if kind == "step":
        records: list[dict[str, Any]] = [{"kind": "step", **{key: first[key] for key in STEP_FIELDS}}]
        if first.get("layers") is not None:
            layers, vectors = merge_layers([r["layers"] for r in per_rank])
            records.append(
                {"kind": "layers", "step": first["step"], "epoch": first["epoch"], "layers": layers, "vectors": vectors}
            )
        return records
    if kind == "epoch":
        return [{"kind": "epoch", **{key: first[key] for key in EPOCH_FIELDS}}]
    if kind == "final":
        return [{"kind": "summary", **{key: first[key] for key in SUMMARY_FIELDS}}, *_timeline(first)]
    raise ValueError(f"unknown report kind {kind!r}: expected start, step, steps, epoch or final")


def _timeline(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rank 0's timeline marks (`times`) as a `timeline` record, when its report has them."""
    times = report.get("times")
    return [{"kind": "timeline", **times}] if isinstance(times, dict) and times else []


def merge_layers(per_rank: Sequence[Any]) -> tuple[dict[str, dict[str, Any]], dict[str, bytes]]:
    """Merge one recorded step's layer statistics of every rank: `({layer: summary}, {layer: float32 bytes})`.

    Each element is a rank's `PackedLayerStats` (one vectorised merge for all layers) or, from older train
    loops, its `{layer: snapshot dict}` (merged layer by layer).
    """
    if all(isinstance(p, PackedLayerStats) for p in per_rank):
        merged = merge_packed_layer_stats(per_rank)
        block = merged.vectors.numpy().astype(np.float32)
        summaries: dict[str, dict[str, Any]] = {}
        vectors: dict[str, bytes] = {}
        start = 0
        for name, channels, summary in zip(merged.layers, merged.channels, merged.summaries, strict=True):
            summaries[name] = summary
            vectors[name] = block[:, start : start + channels].tobytes()
            start += channels
        return summaries, vectors
    summaries, vectors = {}, {}
    for name in per_rank[0]:
        merged_layer = merge_rank_layer_stats([r[name] for r in per_rank])
        rows = [merged_layer[k] or [float("nan")] * merged_layer["channels"] for k in _VECTOR_KEYS]
        vectors[name] = np.array(rows, dtype=np.float32).reshape(len(_VECTOR_KEYS), -1).tobytes()
        summaries[name] = {k: v for k, v in merged_layer.items() if k not in _VECTOR_KEYS}
    return summaries, vectors


# The rows of a vectors block, as in `service.store.layer_codec.VECTOR_ROWS` (the engine does not import the store).
_VECTOR_KEYS = ("mean", "var", "running_mean", "running_var")
