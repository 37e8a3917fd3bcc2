"""Per-layer batch statistics: what the recorder reads on every rank, and the skew merged outside the ranks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import syncbn
from syncbn.stats import MERGED_VECTORS, PACKED_VECTORS, PackedLayerStats, merge_packed_layer_stats
from tests.syncbn import scenarios as sc
from tests.syncbn.process_group_pool import ProcessGroupPool


def test_recorded_statistics_agree_across_ranks_and_match_the_global_batch(pool3: ProcessGroupPool) -> None:
    cfg = {"sizes": [2, 5, 3], "channels": 3, "spatial": (2, 2)}
    snaps = pool3.run(sc.record_stats, cfg)
    json.dumps(snaps)  # JSON-ready
    x, _ = sc.make_global_batch(cfg)
    dims = (0, 2, 3)

    synced = [s["0"] for s in snaps]
    assert all(s["synchronized"] for s in synced)
    merged = syncbn.merge_rank_layer_stats(synced)
    assert merged["ranks_agree"] is True and merged["synchronized"] is True
    torch.testing.assert_close(torch.tensor(merged["mean"], dtype=torch.float64), x.mean(dims), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.tensor(merged["var"], dtype=torch.float64), x.var(dims, correction=0), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        torch.tensor(synced[0]["var_global"], dtype=torch.float64), x.var(dims, correction=0), rtol=1e-12, atol=0
    )

    # Between-rank variance: from the layer's all-reduce, from the merge, and computed directly.
    parts = [x[sc.rank_slice(cfg, r)] for r in range(3)]
    counts = torch.tensor([p.shape[0] * 4.0 for p in parts], dtype=torch.float64)
    rank_means = torch.stack([p.mean(dims) for p in parts])
    between = (counts[:, None] * (rank_means - x.mean(dims)) ** 2).sum(0) / counts.sum()
    torch.testing.assert_close(
        torch.tensor(synced[1]["between_var"], dtype=torch.float64), between, rtol=1e-9, atol=1e-12
    )
    share = between / x.var(dims, correction=0)
    assert merged["skew_between_share_max"] == pytest.approx(float(share.max()), rel=1e-9)
    gap = ((rank_means - x.mean(dims)).abs() / torch.sqrt(x.var(dims, correction=0) + 1e-5)).max()
    assert merged["skew_max_gap"] == pytest.approx(float(gap), rel=1e-9)
    assert merged["per_rank_count"] == [8.0, 20.0, 12.0]

    plain = [s["1"] for s in snaps]
    assert not any(s["synchronized"] for s in plain)
    merged_plain = syncbn.merge_rank_layer_stats(plain)
    assert merged_plain["ranks_agree"] is None
    assert merged_plain["count"] == merged["count"]


def test_merge_reports_dead_channels_and_drift() -> None:
    rank = {
        "eps": 1e-5,
        "synchronized": False,
        "count_local": 10.0,
        "mean_local": [0.0, 2.0],
        "var_local": [1.0, 0.0],
        "running_mean": [1.0, 2.0],
        "running_var": [4.0, 1.0],
    }
    merged = syncbn.merge_rank_layer_stats([rank, dict(rank, count_local=0.0, mean_local=[9.0, 9.0])])
    assert merged["dead_channels"] == 1
    assert merged["drift_max"] == pytest.approx(1.0 / (4.0 + 1e-5) ** 0.5)
    assert merged["skew_max_gap"] == 0.0, "an empty rank has no batch statistics and cannot be skewed"
    with pytest.raises(ValueError, match="at least one rank"):
        syncbn.merge_rank_layer_stats([])


def test_recorder_without_process_group_reads_local_moments_and_gradients() -> None:
    torch.manual_seed(0)
    model = syncbn.convert_sync_batchnorm(sc.small_cnn())
    recorder = syncbn.BatchStatsRecorder(model)
    assert recorder.layer_names == ["1", "4", "8"]
    x = torch.randn(6, 3, 5, 5)
    with recorder.recording():
        model(x).sum().backward()
    snap = recorder.snapshot()
    assert set(snap) == {"1", "4", "8"}
    first = snap["1"]
    assert first["synchronized"] is False and first["count_local"] == 6 * 25
    assert first["weight_grad_norm"] is not None and first["weight_grad_norm"] > 0
    model(x)  # outside recording(): nothing new is kept
    assert recorder.snapshot()["1"]["mean_local"] == first["mean_local"]
    recorder.close()


def _assert_same_merge(packed_summary: dict, vectors: torch.Tensor, merged: dict) -> None:
    """A layer of `merge_packed_layer_stats` says what `merge_rank_layer_stats` says for it."""
    for key, value in packed_summary.items():
        if isinstance(value, float):
            assert value == pytest.approx(merged[key], rel=1e-12, abs=1e-15), key
        else:
            assert value == merged[key], key
    for row, key in enumerate(MERGED_VECTORS):
        expected = merged[key]
        if expected is None:
            assert bool(vectors[row].isnan().all()), key
        else:
            torch.testing.assert_close(vectors[row], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=0)


def test_packed_snapshots_merge_like_the_per_layer_dicts(pool3: ProcessGroupPool) -> None:
    cfg = {"sizes": [2, 0, 3], "channels": 4, "spatial": (2, 2)}  # rank 1 is empty: it must weigh nothing
    both = pool3.run(sc.record_both_stats, cfg)
    packed = [p for _, p in both]
    assert all(p.vectors.dtype == torch.float64 and p.vectors.shape == (len(PACKED_VECTORS), 8) for p in packed)
    merged = merge_packed_layer_stats(packed)
    assert merged.layers == ("0", "1") and merged.channels == (4, 4)
    for index, name in enumerate(merged.layers):
        reference = syncbn.merge_rank_layer_stats([snaps[name] for snaps, _ in both])
        _assert_same_merge(merged.summaries[index], merged.layer_vectors(index), reference)
    assert merged.summaries[0]["ranks_agree"] is True and merged.summaries[1]["ranks_agree"] is None
    assert merged.summaries[0]["per_rank_count"] == [8.0, 0.0, 12.0]


def test_packed_merge_of_many_layers_matches_layer_by_layer_and_refuses_mismatched_ranks() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(*(nn.BatchNorm1d(c) for c in (3, 5, 1, 7)))
    model[2].affine = False
    model[2].weight = model[2].bias = None
    model[3].track_running_stats = False
    model[3].running_mean = model[3].running_var = None
    recorder = syncbn.BatchStatsRecorder(model)
    per_rank = []
    for rank in range(3):
        with recorder.recording():
            outs = [layer(torch.randn(4 + rank, layer.num_features) * (rank + 1) + rank) for layer in model]
        sum(o.sum() for o in outs).backward()
        per_rank.append((recorder.snapshot(), recorder.packed_snapshot()))
        model.zero_grad()
    merged = merge_packed_layer_stats([p for _, p in per_rank])
    for index, name in enumerate(merged.layers):
        reference = syncbn.merge_rank_layer_stats([snaps[name] for snaps, _ in per_rank])
        _assert_same_merge(merged.summaries[index], merged.layer_vectors(index), reference)
    assert merged.summaries[2]["weight_mean"] is None and merged.summaries[3]["drift_max"] is None
    other = per_rank[1][1]
    shrunk = PackedLayerStats(other.layers[:-1], other.channels[:-1], other.scalars[:-1], other.vectors[:, :-7])
    with pytest.raises(ValueError, match="rank 1"):
        merge_packed_layer_stats([per_rank[0][1], shrunk])
    with pytest.raises(ValueError, match="at least one rank"):
        merge_packed_layer_stats([])
    recorder.close()


@pytest.mark.parametrize("widths", [(6, 6, 6), (6, 2, 9)], ids=["equal widths", "unequal widths"])
def test_packed_snapshot_parameter_summaries_with_a_frozen_layer(widths: tuple[int, ...]) -> None:
    """Per-layer weight/bias summaries and gradient norms of the packed form equal the dict form's, also when one
    layer's parameters are frozen (no gradient) and whether the layers share one width or not."""
    torch.manual_seed(5)
    model = nn.Sequential(*(nn.BatchNorm1d(c) for c in widths))
    for layer in model:
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    recorder = syncbn.BatchStatsRecorder(model)
    with recorder.recording():
        outs = [layer(torch.randn(5, layer.num_features)) for layer in model]
    sum((o * o).sum() for o in outs).backward()
    snap, packed = recorder.snapshot(), recorder.packed_snapshot()
    columns = syncbn.stats.PACKED_SCALARS
    for index, name in enumerate(packed.layers):
        for key in ("weight_mean", "weight_min", "weight_max", "bias_mean", "bias_max", "weight_grad_norm"):
            value = float(packed.scalars[index, columns.index(key)])
            if snap[name][key] is None:
                assert value != value, (name, key)  # NaN: no gradient on the frozen layer
            else:
                assert value == pytest.approx(snap[name][key], rel=1e-12), (name, key)
    assert snap["1"]["weight_grad_norm"] is None and snap["0"]["weight_grad_norm"] > 0
    assert repr(packed) == f"PackedLayerStats(3 layers, {sum(widths)} channels)", "a short repr: Ray logs reports"
    recorder.close()
