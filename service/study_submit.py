"""`syncbn submit --study SPEC`: send a study spec to a running service and, with `--follow`, print its trials'
progress and then its verdict (a table per arm and the sentence).

A thin layer over `Client.submit_study` / `Client.study`; the spec file is validated locally first (the same
`StudySpec` the service uses). Exit codes as for `syncbn submit`: 0 when queued (with --follow: succeeded), 1 when
the study failed or was cancelled, 2 for a refused spec or an unreachable service.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # imported when run: `syncbn --help` stays fast
    from service.api.models import StudyPublic, VerdictPublic
    from service.client import Client

__all__ = ["format_verdict", "run_study_submit"]

#: Seconds between two reads of the study while following it.
POLL_S = 2.0


def _num(value: float | None, scale: float = 1.0, digits: int = 4) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def format_verdict(verdict: VerdictPublic) -> str:
    """The verdict as a small table (one row per arm, then each comparison) and its sentence."""
    scale, unit = (100.0, " (points)") if verdict.metric == "val_accuracy" else (1.0, "")
    lines = [f"{'arm':<32} {'mean':>9} {'ci_low':>9} {'ci_high':>9} {'n':>3} {'samples/s':>10} {'wall_s':>8}"]
    for arm in verdict.arms:
        lines.append(
            f"{arm.label[:32]:<32} {_num(arm.mean, scale, 2):>9} {_num(arm.ci_low, scale, 2):>9} "
            f"{_num(arm.ci_high, scale, 2):>9} {arm.n:>3} {_num(arm.samples_per_s, 1, 1):>10} "
            f"{_num(arm.wall_s, 1, 1):>8}"
        )
    for comparison in verdict.comparisons:
        d = comparison.difference
        lines.append(
            f"reference - {comparison.label}: {_num(d.mean, scale, 2)}{unit} "
            f"[{_num(d.ci_low, scale, 2)}, {_num(d.ci_high, scale, 2)}], p={_num(d.p_value, 1, 3)}, "
            f"{d.n_pairs} pairs, cost ratio {_num(comparison.cost_ratio, 1, 2)}: {comparison.outcome}"
        )
    for layer in verdict.layers:
        lines.append(f"skewed layer {layer.layer}: between-rank share {layer.between_share_mean:.3f}")
    lines.append(verdict.sentence)
    return "\n".join(lines)


def _follow(client: Client, study: StudyPublic, out: TextIO) -> StudyPublic:
    """Print each trial's status changes until the study ends; return the final study."""
    seen: dict[str, str] = {}
    while True:
        for trial in study.trials:
            if seen.get(trial.job_id) != trial.status.value:
                seen[trial.job_id] = trial.status.value
                out.write(f"trial arm {trial.arm} seed {trial.seed} ({trial.job_id}): {trial.status.value}\n")
                out.flush()
        if study.status in ("succeeded", "failed") or (
            study.status == "cancelled" and all(t.status.is_terminal for t in study.trials)
        ):
            return study
        time.sleep(POLL_S)
        study = client.study(study.id)


def run_study_submit(args: argparse.Namespace) -> int:
    """Submit the study spec file; with --follow, wait for its verdict. Returns the exit code."""
    from service.client import APIError, Client, ClientError, ConnectionFailedError, SpecError
    from service.submit import refusal  # here, not at the top: service.submit imports this module

    with Client(args.url, args.token, timeout=args.timeout) as client:
        try:
            study = client.submit_study(args.spec)
        except (SpecError, ConnectionFailedError, APIError) as exc:
            sys.stderr.write(f"syncbn submit: {refusal(exc, args.url, 'study')}\n")
            return 2
        if not args.json:
            sys.stdout.write(f"submitted study {study.id} ({study.status}, {len(study.trials)} trials)\n")
            sys.stdout.flush()
        if args.follow:
            try:
                study = _follow(client, study, out=sys.stderr if args.json else sys.stdout)
            except ClientError as exc:
                sys.stderr.write(f"syncbn submit: lost study {study.id} while following it: {exc}\n")
                return 2
    if args.json:
        sys.stdout.write(json.dumps(study.model_dump(mode="json"), indent=2) + "\n")
    elif args.follow:
        verdict = format_verdict(study.verdict) if study.verdict is not None else "no verdict"
        sys.stdout.write(f"study {study.id} {study.status}\n{verdict}\n")
    if not args.follow:
        return 0
    return 0 if study.status == "succeeded" else 1
