"""Whether a run's BatchNorm running statistics lag its weights, judged from the recorded drift.

The recorder stores, per layer and recorded step, `drift_mean`: the mean over channels of
`|running_mean - batch_mean| / sqrt(running_var + eps)`. Part of it is sampling noise: the batch mean of `n`
values per channel misses the population mean by about `sqrt(2 / (pi * n))` standard deviations on average
(the mean absolute value of a normal variable of variance 1/n), even when the running statistics are exact. What is
left is lag: running statistics that still describe the weights of a few dozen steps ago.

`LAG_THRESHOLD` is 0.05 standard deviations of excess drift, averaged over the last `LAG_WINDOW` recorded steps, on
the worst layer. Why that value: it separates the two cases of bench/bench_precise_bn.py (digits, 3 seeds each)
with a margin on both sides. With a constant learning rate the runs end at 0.077-0.105 and the running statistics
cost 8-14 points of final validation accuracy (precise statistics recover them); with a cosine schedule, whose last
steps barely move the weights, they end at 0.001-0.004 and the two accuracies agree within 0.3 points.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["LAG_THRESHOLD", "LAG_WINDOW", "excess_drift", "lag_warning"]

LAG_THRESHOLD = 0.05
LAG_WINDOW = 5


def excess_drift(summary: Mapping[str, Any]) -> float | None:
    """One layer's recorded drift beyond the batch-sampling noise, in standard deviations (None without data)."""
    drift, count = summary.get("drift_mean"), summary.get("count")
    if drift is None or not count or not math.isfinite(float(drift)):
        return None
    return float(drift) - math.sqrt(2.0 / (math.pi * float(count)))


def lag_warning(recent: Iterable[Mapping[str, Mapping[str, Any]]], precise_bn_ran: bool) -> str | None:
    """A sentence for the job's summary when the running statistics lag, else None.

    Args:
        recent: the last recorded steps' layer summaries (`{layer: summary}` each), oldest first.
        precise_bn_ran: whether the saved model's statistics were recomputed (then the warning says so).
    """
    per_layer: dict[str, list[float]] = {}
    for layers in recent:
        for name, summary in layers.items():
            excess = excess_drift(summary)
            if excess is not None:
                per_layer.setdefault(name, []).append(excess)
    if not per_layer:
        return None
    worst, values = max(per_layer.items(), key=lambda item: sum(item[1]) / len(item[1]))
    lag = sum(values) / len(values)
    if lag <= LAG_THRESHOLD:
        return None
    message = (
        f"the BatchNorm running statistics lag the weights: at the end, layer {worst!r}'s running means were "
        f"{lag:.3f} standard deviations beyond batch noise from the batch means (threshold {LAG_THRESHOLD})"
    )
    if precise_bn_ran:
        return message + "; precise_bn recomputed them, and the saved model carries the precise statistics"
    return message + (
        '; validation accuracy understates the model: set precise_bn (e.g. {"batches": 200, "every": '
        '"end"}) or use a decaying lr_schedule (cosine)'
    )
