"""Does synchronised BatchNorm pay on this data? The verdict of a study, from its trials' stored results.

A study runs every arm (a variant of one job spec, e.g. `sync_bn: true` and `sync_bn: false`) with the same seeds,
so arms are compared pair by pair: for each seed, the reference arm's (the first) best value of the metric minus
the other arm's. The mean of those paired differences gets a Student t confidence interval, and a paired t-test
its p-value (`scipy.stats.ttest_rel` computes the same test; the tests check that). Pairing removes the
seed-to-seed variation that both arms share (initialisation, data order), which is most of it.

Outcomes, with `direction` +1 for a metric where higher is better (accuracy) and -1 where lower is (loss):
- `does_not_pay`: the interval lies within +-margin (a difference too small to matter; this is checked first, so
  a surely-positive but negligible gain does not "pay"), or entirely on the bad side of zero;
- `pays`: otherwise, when the interval lies entirely on the good side of zero (the reference arm is better);
- `inconclusive`: otherwise; `seeds_needed` then estimates how many paired seeds would resolve it.

Everything here is a pure function of plain numbers: the service reads the metrics and layer summaries from the
store and hands them in, so the arithmetic is tested on its own, against scipy, on known data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats

__all__ = [
    "METRICS",
    "METRIC_RANGES",
    "ArmResult",
    "ArmSummary",
    "Comparison",
    "Difference",
    "Verdict",
    "compare_arms",
    "default_margin",
    "paired_difference",
    "seeds_needed",
    "settled",
    "skewed_layers",
    "study_verdict",
    "summarise_arm",
]

Outcome = Literal["pays", "does_not_pay", "inconclusive"]

#: The metrics a study can judge by: (direction: +1 higher is better, -1 lower is; words for the sentence).
METRICS: dict[str, tuple[int, str]] = {
    "val_accuracy": (+1, "validation accuracy"),
    "val_loss": (-1, "validation loss"),
}

#: Most paired seeds `seeds_needed` looks for; beyond it the answer is "more than this".
MAX_SEEDS = 1000


@dataclass(frozen=True)
class ArmResult:
    """One arm's finished trials: the best metric value per seed, and the runs' throughput and wall time."""

    values: Mapping[int, float]
    samples_per_s: Sequence[float] = ()
    wall_s: Sequence[float] = ()


@dataclass(frozen=True)
class ArmSummary:
    """An arm's mean metric with its t interval over seeds (not paired), throughput and wall time."""

    mean: float
    ci_low: float | None
    ci_high: float | None
    n: int
    samples_per_s: float | None
    wall_s: float | None


@dataclass(frozen=True)
class Difference:
    """Reference minus the other arm, over the seeds both finished: mean, t interval, paired t-test."""

    mean: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    n_pairs: int
    sd: float | None


@dataclass(frozen=True)
class Comparison:
    """The reference arm against one other arm."""

    arm: int
    difference: Difference
    outcome: Outcome
    cost_ratio: float | None
    seeds_needed: int | None


@dataclass
class Verdict:
    """A study's answer: the outcome of the reference against the first other arm, in a sentence, and the parts."""

    outcome: Outcome
    sentence: str
    metric: str
    margin: float
    confidence: float
    arms: list[ArmSummary | None]
    comparisons: list[Comparison]
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (what the API serves and the store keeps)."""
        return asdict(self)


def default_margin(metric: str, reference_mean: float) -> float:
    """The band of differences too small to matter: 0.5 accuracy points, or 2 % of the reference's loss."""
    if metric == "val_accuracy":
        return 0.005
    if metric == "val_loss":
        return 0.02 * abs(reference_mean)
    raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


def _mean_or_none(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _t_half_width(sd: float, n: int, confidence: float) -> float:
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


#: The values each metric can take: an arm's interval is clipped to them (a t interval of accuracies near 100 %
#: would otherwise reach past it, e.g. 92 to 102 %).
METRIC_RANGES: dict[str, tuple[float, float]] = {"val_accuracy": (0.0, 1.0), "val_loss": (0.0, math.inf)}


def summarise_arm(
    result: ArmResult, confidence: float, value_range: tuple[float, float] = (-math.inf, math.inf)
) -> ArmSummary:
    """Mean over seeds, its t interval (None with fewer than two seeds) clipped to `value_range` (the values the
    metric can take, `METRIC_RANGES`), mean samples/s and wall time."""
    values = np.array([v for v in result.values.values() if math.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        raise ValueError("an arm needs at least one finished trial with a finite metric, got none")
    mean = float(values.mean())
    low = high = None
    if values.size >= 2:
        half = _t_half_width(float(values.std(ddof=1)), int(values.size), confidence)
        low, high = max(mean - half, value_range[0]), min(mean + half, value_range[1])
    return ArmSummary(
        mean, low, high, int(values.size), _mean_or_none(result.samples_per_s), _mean_or_none(result.wall_s)
    )


def paired_difference(reference: Mapping[int, float], other: Mapping[int, float], confidence: float) -> Difference:
    """Reference minus other over the seeds both have (finite values), with a t interval and a paired t-test.

    Raises:
        ValueError: when the two arms share no seed.
    """
    seeds = sorted(seed for seed in reference.keys() & other.keys() if math.isfinite(reference[seed] - other[seed]))
    if not seeds:
        raise ValueError("the arms share no finished seed: a paired comparison needs at least one")
    diffs = np.array([reference[s] - other[s] for s in seeds], dtype=np.float64)
    mean = float(diffs.mean())
    if diffs.size < 2:
        return Difference(mean, None, None, None, 1, None)
    sd = float(diffs.std(ddof=1))
    if sd == 0.0:  # every seed gave the same difference: the interval is that point
        p_value = 1.0 if mean == 0.0 else 0.0
        return Difference(mean, mean, mean, p_value, int(diffs.size), 0.0)
    half = _t_half_width(sd, int(diffs.size), confidence)
    t_stat = mean / (sd / math.sqrt(diffs.size))
    p_value = float(2 * stats.t.sf(abs(t_stat), diffs.size - 1))
    return Difference(mean, mean - half, mean + half, p_value, int(diffs.size), sd)


def seeds_needed(difference: Difference, margin: float, confidence: float) -> int | None:
    """About how many paired seeds would resolve a difference of the observed size at the observed spread.

    Resolving means an interval that excludes zero (when |mean| is at least the margin) or one that fits within
    the margin band (when |mean| is inside it). None without a spread to extrapolate from (fewer than two pairs,
    or no spread at all); `MAX_SEEDS` + 1 when even that many would not do.
    """
    if difference.sd is None or difference.sd == 0.0:
        return None
    size = abs(difference.mean)
    target = size if size >= margin else margin - size
    if target <= 0.0:
        return MAX_SEEDS + 1
    for n in range(2, MAX_SEEDS + 1):
        if _t_half_width(difference.sd, n, confidence) < target:
            return n
    return MAX_SEEDS + 1


def _outcome(difference: Difference, direction: int, margin: float) -> Outcome:
    if difference.ci_low is None or difference.ci_high is None:
        return "inconclusive"
    good_low = min(direction * difference.ci_low, direction * difference.ci_high)
    good_high = max(direction * difference.ci_low, direction * difference.ci_high)
    if -margin <= good_low and good_high <= margin:  # too small to matter, even if it is surely above zero
        return "does_not_pay"
    if good_low > 0.0:
        return "pays"
    if good_high < 0.0:
        return "does_not_pay"
    return "inconclusive"


def settled(verdict: Verdict) -> bool:
    """Whether more seeds would hardly change the answer: for every comparison, after at least two paired seeds,
    the interval of the difference excludes both edges of the margin band (it lies wholly above +margin, wholly
    inside the band, or wholly below -margin). A study with `early_stop` stops queueing trials once this holds.

    An interval that straddles an edge is not settled even when its outcome reads `pays` (above zero but reaching
    into the band: more seeds could make it `does_not_pay`) or `does_not_pay` (below zero but reaching into it).
    Looking after every trial like this makes a false "settled" somewhat likelier than 1 - confidence; the margin
    band, which a real difference must clear, keeps that small in practice.
    """
    if not verdict.comparisons:
        return False
    for comparison in verdict.comparisons:
        d = comparison.difference
        if d.n_pairs < 2 or d.ci_low is None or d.ci_high is None:
            return False
        margin = verdict.margin
        for edge in (-margin, margin):
            if d.ci_low <= edge <= d.ci_high:
                return False
    return True


def compare_arms(
    reference: ArmResult, other: ArmResult, *, arm: int, metric: str, margin: float, confidence: float
) -> Comparison:
    """The reference against `other`: paired difference, outcome, cost ratio and (if inconclusive) seeds needed.

    `cost_ratio` is the other arm's samples/s over the reference's, i.e. the reference's step time in units of the
    other's: above 1 the reference is slower (what synchronisation costs).
    """
    direction, _ = METRICS[metric]
    difference = paired_difference(reference.values, other.values, confidence)
    outcome = _outcome(difference, direction, margin)
    ref_speed, other_speed = _mean_or_none(reference.samples_per_s), _mean_or_none(other.samples_per_s)
    cost = other_speed / ref_speed if ref_speed and other_speed else None
    needed = seeds_needed(difference, margin, confidence) if outcome == "inconclusive" else None
    return Comparison(arm, difference, outcome, cost, needed)


def skewed_layers(shares: Mapping[str, Sequence[float]], top: int = 5) -> list[dict[str, Any]]:
    """The `top` layers with the largest mean between-rank variance share over training (local-arm runs).

    `shares` maps a layer to its recorded `skew_between_share_mean` values (over steps, and over the local arm's
    trials); a large share means the workers' batches disagree, which is what synchronisation corrects.
    """
    ranked = []
    for layer, values in shares.items():
        mean = _mean_or_none(values)
        if mean is not None:
            ranked.append({"layer": layer, "between_share_mean": mean, "points": len(values)})
    ranked.sort(key=lambda item: item["between_share_mean"], reverse=True)
    return ranked[:top]


def _signed(value: float, scale: float, digits: int = 1) -> str:
    return f"{value * scale:+.{digits}f}"


def _sentence(comparison: Comparison, metric: str, confidence: float, labels: tuple[str, str], sync_only: bool) -> str:
    """One plain sentence with the numbers: what pays (or not), by how much, with what interval, at what cost."""
    _, words = METRICS[metric]
    d = comparison.difference
    accuracy = metric == "val_accuracy"
    scale, unit = (100.0, "points of ") if accuracy else (1.0, "")
    pairs = f"{d.n_pairs} paired seed{'s' if d.n_pairs != 1 else ''}"
    interval = (
        f"{round(confidence * 100)} % CI {_signed(d.ci_low, scale)} to {_signed(d.ci_high, scale)}, {pairs}"
        if d.ci_low is not None and d.ci_high is not None
        else pairs
    )
    cost = f" at {comparison.cost_ratio:.1f}× the step time" if comparison.cost_ratio is not None else ""
    subject = "Synchronised BatchNorm" if sync_only else f"{labels[0]} (against {labels[1]})"
    change = f"{_signed(d.mean, scale)} {unit}{words}"
    if comparison.outcome == "pays":
        return f"{subject} pays: {change} ({interval}){cost}."
    if comparison.outcome == "does_not_pay":
        return f"{subject} does not pay: {change} ({interval}){cost}."
    more = ""
    if comparison.seeds_needed is not None:
        more = (
            f"; about {comparison.seeds_needed} paired seeds would settle it"
            if comparison.seeds_needed <= MAX_SEEDS
            else f"; more than {MAX_SEEDS} paired seeds would be needed to settle it"
        )
    return f"Inconclusive whether {subject} pays: {change} ({interval}){cost}{more}."


def study_verdict(
    arms: Sequence[ArmResult],
    *,
    metric: str,
    confidence: float,
    margin: float,
    labels: Sequence[str],
    sync_only: bool = False,
    layer_shares: Mapping[str, Sequence[float]] | None = None,
) -> Verdict | None:
    """The verdict of a study, or None until two arms have each at least two finished seeds in common.

    Args:
        arms: per arm (the reference first), its finished trials.
        metric: a key of `METRICS`.
        confidence: of the intervals, e.g. 0.95.
        margin: the band of differences too small to matter, in the metric's units (e.g. 0.005 = 0.5 points).
        labels: a short name per arm for the sentence (e.g. "sync_bn=true").
        sync_only: the arms differ only in `sync_bn` (the sentence then speaks of synchronised BatchNorm).
        layer_shares: the local arm's per-layer between-rank variance shares (see `skewed_layers`).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if len(arms) < 2 or len(labels) != len(arms):
        raise ValueError(f"expected at least two arms with one label each, got {len(arms)} arms, {len(labels)} labels")
    reference = arms[0]
    comparisons = []
    for index, other in enumerate(arms[1:], start=1):
        shared = reference.values.keys() & other.values.keys()
        if len(shared) >= 2:
            comparisons.append(
                compare_arms(reference, other, arm=index, metric=metric, margin=margin, confidence=confidence)
            )
    if not comparisons:
        return None
    summaries = [summarise_arm(arm, confidence, METRIC_RANGES[metric]) if arm.values else None for arm in arms]
    first = comparisons[0]
    sentence = _sentence(first, metric, confidence, (labels[0], labels[first.arm]), sync_only)
    layers = skewed_layers(layer_shares) if layer_shares else []
    return Verdict(first.outcome, sentence, metric, margin, confidence, summaries, comparisons, layers)
