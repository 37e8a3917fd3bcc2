"""Which per-channel snapshots of a job the store keeps: the recent ones, and a log-spaced selection of the rest.

Per-layer summaries are kept for every recorded step (they are small); the per-channel vectors are what grows
with the model, so at most `keep` recorded steps keep them. Like the downsampling of time-series stores, the
newest half of the budget holds every recent step and the other half holds older steps spaced evenly in the
logarithm of their age (distance to the newest step): dense near the present, sparse in the distant past, and
always the first step kept. The selection only ever chooses among the steps still kept, so a snapshot that was
dropped never has to come back, and the footprint of a job stops growing once it has `keep` snapshots.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

__all__ = ["MIN_KEEP", "downsample", "nearest", "snapshots_to_keep"]

#: The smallest budget the rule works with: the first step and the newest one.
MIN_KEEP = 2


def snapshots_to_keep(steps: Sequence[int], keep: int) -> list[int]:
    """The steps (ascending) to keep out of `steps` (the ones kept so far plus any new ones), at most `keep`.

    Raises:
        ValueError: `keep` below `MIN_KEEP`.
    """
    if keep < MIN_KEEP:
        raise ValueError(f"expected keep >= {MIN_KEEP} snapshots, got {keep}")
    ordered = sorted(set(steps))
    if len(ordered) <= keep:
        return ordered
    recent_count = keep // 2
    recent = ordered[len(ordered) - recent_count :]
    older = ordered[: len(ordered) - recent_count]
    slots = keep - recent_count
    newest = ordered[-1]
    ages = [newest - step for step in reversed(older)]  # ascending ages, all >= 1
    low, high = math.log(ages[0]), math.log(ages[-1])
    chosen: set[int] = set()
    for k in range(slots):
        target = high if slots == 1 else low + (high - low) * k / (slots - 1)
        chosen.add(newest - ages[_nearest_index(ages, target)])
    return sorted(chosen) + recent


def _nearest_index(ascending_ages: Sequence[int], log_target: float) -> int:
    """Index of the age closest to `exp(log_target)` in log scale."""
    target = math.exp(log_target)
    at = bisect.bisect_left(ascending_ages, target)
    if at == 0:
        return 0
    if at == len(ascending_ages):
        return at - 1
    below, above = ascending_ages[at - 1], ascending_ages[at]
    return at - 1 if math.log(target / below) <= math.log(above / target) else at


def downsample(count: int, max_points: int) -> list[int]:
    """At most `max_points` indices into a series of `count` points, evenly spaced, first and last included."""
    if max_points < 1:
        raise ValueError(f"expected max_points >= 1, got {max_points}")
    if count <= max_points:
        return list(range(count))
    if max_points == 1:
        return [count - 1]
    return sorted({round(i * (count - 1) / (max_points - 1)) for i in range(max_points)})


def nearest(steps: Sequence[int], step: int) -> int | None:
    """The element of ascending `steps` closest to `step` (the earlier one on a tie), or None when empty."""
    if not steps:
        return None
    at = bisect.bisect_left(steps, step)
    if at == 0:
        return steps[0]
    if at == len(steps):
        return steps[-1]
    before, after = steps[at - 1], steps[at]
    return before if step - before <= after - step else after
