"""The study verdict's arithmetic (service/store/verdict.py) on known data, against scipy's own tests.

The paired difference's p-value must be `scipy.stats.ttest_rel`'s, its interval the textbook t-interval built
here from `scipy.stats.t.ppf`; the outcome rules (pays / does not pay / inconclusive) are checked on data placed on
each side of the margin band; the sentence says the numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from service.store.verdict import (
    METRIC_RANGES,
    ArmResult,
    Comparison,
    Difference,
    Verdict,
    default_margin,
    paired_difference,
    seeds_needed,
    settled,
    skewed_layers,
    study_verdict,
    summarise_arm,
)

SYNC = {0: 0.968, 1: 0.955, 2: 0.971, 3: 0.962}
LOCAL = {0: 0.842, 1: 0.861, 2: 0.828, 3: 0.850}


def test_paired_difference_matches_scipy_ttest_rel_and_the_t_interval() -> None:
    d = paired_difference(SYNC, LOCAL, 0.95)
    a, b = np.array(list(SYNC.values())), np.array(list(LOCAL.values()))
    expected = stats.ttest_rel(a, b)
    diffs = a - b
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert d.n_pairs == 4 and math.isclose(d.mean, diffs.mean(), rel_tol=1e-12)
    assert math.isclose(d.p_value, expected.pvalue, rel_tol=1e-9)
    assert math.isclose(d.ci_low, diffs.mean() - half, rel_tol=1e-12)
    assert math.isclose(d.ci_high, diffs.mean() + half, rel_tol=1e-12)
    # scipy's own interval of the same test (scipy >= 1.11) agrees.
    low, high = expected.confidence_interval(0.95)
    assert math.isclose(low, d.ci_low, rel_tol=1e-9) and math.isclose(high, d.ci_high, rel_tol=1e-9)


def test_only_shared_seeds_are_paired() -> None:
    d = paired_difference({0: 1.0, 1: 2.0, 5: 9.0}, {0: 0.5, 1: 1.0, 7: 0.0}, 0.9)
    assert d.n_pairs == 2 and math.isclose(d.mean, 0.75)
    with pytest.raises(ValueError, match="share no finished seed"):
        paired_difference({0: 1.0}, {1: 1.0}, 0.95)


def test_synchronisation_pays_with_a_sentence_of_numbers() -> None:
    verdict = study_verdict(
        [ArmResult(SYNC, samples_per_s=[500.0] * 4), ArmResult(LOCAL, samples_per_s=[950.0] * 4)],
        metric="val_accuracy",
        confidence=0.95,
        margin=default_margin("val_accuracy", 0.96),
        labels=["sync_bn=true", "sync_bn=false"],
        sync_only=True,
    )
    assert verdict is not None and verdict.outcome == "pays"
    comparison = verdict.comparisons[0]
    assert math.isclose(comparison.cost_ratio, 1.9) and comparison.seeds_needed is None
    d = comparison.difference
    expected = (
        f"Synchronised BatchNorm pays: {d.mean * 100:+.1f} points of validation accuracy "
        f"(95 % CI {d.ci_low * 100:+.1f} to {d.ci_high * 100:+.1f}, 4 paired seeds) at 1.9× the step time."
    )
    assert verdict.sentence == expected
    assert verdict.arms[0].n == 4 and math.isclose(verdict.arms[0].mean, np.mean(list(SYNC.values())))


def test_a_difference_inside_the_margin_does_not_pay_and_an_unclear_one_is_inconclusive() -> None:
    same = {seed: 0.9 + 0.001 * seed for seed in range(5)}
    close = {seed: value - 0.0005 + 0.0002 * (seed % 2) for seed, value in same.items()}
    small = study_verdict(
        [ArmResult(same), ArmResult(close)], metric="val_accuracy", confidence=0.95, margin=0.005, labels=["a", "b"]
    )
    assert small is not None and small.outcome == "does_not_pay"
    assert small.sentence.startswith("a (against b) does not pay:")

    worse = study_verdict(
        [ArmResult({0: 0.5, 1: 0.52, 2: 0.49}), ArmResult({0: 0.6, 1: 0.61, 2: 0.62})],
        metric="val_accuracy",
        confidence=0.95,
        margin=0.005,
        labels=["a", "b"],
    )
    assert worse is not None and worse.outcome == "does_not_pay", "an interval below zero does not pay"

    noisy = study_verdict(
        [ArmResult({0: 0.90, 1: 0.80, 2: 0.95}), ArmResult({0: 0.85, 1: 0.84, 2: 0.86})],
        metric="val_accuracy",
        confidence=0.95,
        margin=0.005,
        labels=["a", "b"],
    )
    assert noisy is not None and noisy.outcome == "inconclusive"
    needed = noisy.comparisons[0].seeds_needed
    d = noisy.comparisons[0].difference
    # The estimate is the smallest n whose t half-width at the observed spread is below the observed difference.
    half = [stats.t.ppf(0.975, n - 1) * d.sd / math.sqrt(n) for n in range(2, 2000)]
    assert needed == next(n for n, h in zip(range(2, 2000), half, strict=False) if h < abs(d.mean))
    assert f"about {needed} paired seeds would settle it" in noisy.sentence


def test_loss_is_better_when_lower() -> None:
    verdict = study_verdict(
        [ArmResult({0: 0.20, 1: 0.22, 2: 0.21}), ArmResult({0: 0.50, 1: 0.55, 2: 0.52})],
        metric="val_loss",
        confidence=0.95,
        margin=default_margin("val_loss", 0.21),
        labels=["sync_bn=true", "sync_bn=false"],
        sync_only=True,
    )
    assert verdict is not None and verdict.outcome == "pays" and "validation loss" in verdict.sentence


def test_no_verdict_until_two_shared_seeds_and_bad_arguments_are_refused() -> None:
    args = {"metric": "val_accuracy", "confidence": 0.95, "margin": 0.005, "labels": ["a", "b"]}
    assert study_verdict([ArmResult({0: 0.9}), ArmResult({0: 0.8, 1: 0.7})], **args) is None
    with pytest.raises(ValueError, match="metric must be one of"):
        study_verdict([ArmResult(SYNC), ArmResult(LOCAL)], **{**args, "metric": "f1"})
    with pytest.raises(ValueError, match="confidence"):
        study_verdict([ArmResult(SYNC), ArmResult(LOCAL)], **{**args, "confidence": 1.5})
    d = paired_difference({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0}, 0.95)
    assert d.sd == 0.0 and seeds_needed(d, 0.005, 0.95) is None


def test_skewed_layers_ranks_by_mean_between_share() -> None:
    ranked = skewed_layers({"stem.1": [0.4, 0.6], "layer1.bn1": [0.1], "head": [float("nan")]}, top=2)
    assert [item["layer"] for item in ranked] == ["stem.1", "layer1.bn1"]
    assert math.isclose(ranked[0]["between_share_mean"], 0.5) and ranked[0]["points"] == 2


def _difference_verdict(low: float, high: float, n_pairs: int = 3, margin: float = 0.005) -> Verdict:
    difference = Difference((low + high) / 2, low, high, 0.01, n_pairs, 0.01)
    comparison = Comparison(1, difference, "inconclusive", None, None)
    return Verdict("inconclusive", "", "val_accuracy", margin, 0.95, [], [comparison])


@pytest.mark.parametrize(
    ("low", "high", "n_pairs", "expected"),
    [
        (0.01, 0.2, 3, True),  # wholly above the band
        (-0.004, 0.004, 3, True),  # wholly inside it
        (-0.3, -0.01, 3, True),  # wholly below it
        (0.001, 0.2, 3, False),  # "pays" (above zero) yet reaching into the band
        (-0.01, 0.003, 3, False),  # across the lower edge
        (-0.2, 0.2, 3, False),  # across both
        (0.01, 0.2, 1, False),  # one pair is never enough
    ],
)
def test_settled_means_the_interval_excludes_both_edges_of_the_band(
    low: float, high: float, n_pairs: int, expected: bool
) -> None:
    assert settled(_difference_verdict(low, high, n_pairs)) is expected


def test_a_study_with_several_comparisons_settles_only_when_every_one_does() -> None:
    verdict = _difference_verdict(0.01, 0.2)
    unsettled = Comparison(2, Difference(0.0, -0.1, 0.1, 0.5, 3, 0.1), "inconclusive", None, None)
    assert settled(verdict)
    assert not settled(Verdict("pays", "", "val_accuracy", 0.005, 0.95, [], [*verdict.comparisons, unsettled]))
    assert not settled(Verdict("pays", "", "val_accuracy", 0.005, 0.95, [], []))


def test_an_arms_interval_stays_within_the_values_its_metric_can_take() -> None:
    """Accuracies of 0.96, 0.99 and 1.0 over three seeds: the t interval (~0.93 to ~1.03) is clipped to [0, 1];
    a loss interval cannot go below 0; an unbounded use keeps the plain t interval."""
    arm = ArmResult({0: 0.96, 1: 0.99, 2: 1.0})
    plain = summarise_arm(arm, 0.95)
    assert plain.ci_high > 1.0, "the unclipped interval reaches past 100 %"
    clipped = summarise_arm(arm, 0.95, METRIC_RANGES["val_accuracy"])
    assert clipped.ci_high == 1.0 and clipped.ci_low == plain.ci_low and clipped.mean == plain.mean
    loss = summarise_arm(ArmResult({0: 0.01, 1: 0.2, 2: 0.02}), 0.95, METRIC_RANGES["val_loss"])
    assert loss.ci_low == 0.0 and loss.ci_high > 0.2
    result = study_verdict(
        [arm, ArmResult({0: 0.9, 1: 0.92, 2: 0.91})],
        metric="val_accuracy",
        confidence=0.95,
        margin=0.005,
        labels=["sync_bn=true", "sync_bn=false"],
    )
    assert result is not None and result.arms[0].ci_high == 1.0
