"""`syncbn study SPEC`: run a study on an embedded Ray (or `RAY_ADDRESS`) and print its verdict.

The same parts as the service, in one process: a `JobStore` (an SQLite file in the output folder), the
`JobManager` that queues and runs the trials (as many at once as the cluster fits), and the verdict derived from
the stored results (`service.store.study_results`). Nothing is scheduled here: the command submits the study as
`POST /v1/studies` does (`service.jobs.study_submission`) and waits for the manager to finish it, printing each
trial's transitions (with `--follow`, each epoch's validation accuracy too), then the verdict as a table and its
sentence.

Output folder (default `runs/study-<id>`): `syncbn.db` (the study, its trials' metrics and layer statistics:
`syncbn serve --data-dir <folder>` shows them in the dashboard), `jobs/` and `storage/` (the trials' files and
models), `study.json` (the study as `GET /v1/studies/{id}` answers it).

Exit code: 0 succeeded, 1 failed, 2 bad spec or arguments, 130 cancelled (Ctrl-C cancels the trials; a second
Ctrl-C leaves at once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from service.study_spec import StudySpec, load_study_file

if TYPE_CHECKING:  # imported when run: `syncbn --help` stays fast
    from service.api.models import StudyPublic
    from service.jobs.manager import JobManager
    from service.store.repository import JobStore

__all__ = ["add_study_arguments", "run_study"]

#: Seconds between two reads of the study's trials.
POLL_S = 0.5


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `syncbn study`."""
    parser.add_argument("spec", type=Path, help="Study spec file (.json, .yaml or .yml).")
    parser.add_argument("--output", type=Path, default=None, help="Output folder (default: runs/study-<date>-<time>).")
    parser.add_argument("--follow", "-f", action="store_true", help="Also print each trial's epochs as they end.")
    parser.add_argument("--json", action="store_true", help="Print the finished study as JSON (progress on stderr).")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="Folder that dataset paths are relative to and confined to [env SYNCBN_DATA_ROOT] "
        "(default: the output folder's npz/).",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join instead of starting an embedded one [env RAY_ADDRESS].",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="Logical CPUs of the embedded Ray (default: the machine's cores, or one trial's CPUs if more). "
        "Trials run at once as far as these fit them.",
    )
    parser.add_argument(
        "--concurrent", type=int, default=None, help="At most this many trials at once (default: as many as fit)."
    )


def _embedded_cpus(spec: StudySpec, num_cpus: int | None) -> int:
    """The embedded Ray's logical CPUs: as asked, or the machine's cores but at least the largest trial's CPUs."""
    if num_cpus is not None:
        return num_cpus
    need = max(math.ceil(trial.resources()["CPU"]) for _, _, trial in spec.trial_specs())
    return max(os.cpu_count() or 1, need)


def run_study(args: argparse.Namespace) -> int:
    """Run the study of `args.spec` to its end; returns the exit code."""
    try:
        spec = load_study_file(args.spec)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"syncbn study: {args.spec}: {exc}\n")
        return 2
    if args.concurrent is not None and args.concurrent < 1:
        sys.stderr.write(f"syncbn study: --concurrent must be at least 1 (got {args.concurrent})\n")
        return 2
    import ray

    from service.engine.cluster import ensure_ray
    from service.jobs.manager import JobManager
    from service.jobs.study_submission import submit_study
    from service.settings import Settings
    from service.store.repository import JobStore
    from service.study_submit import format_verdict
    from service.train import _data_root_from_env

    output = (args.output or Path("runs") / f"study-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    output.mkdir(parents=True, exist_ok=True)
    data_root = args.data_root if args.data_root is not None else _data_root_from_env()
    embedded = not args.address and not ray.is_initialized()
    num_cpus = _embedded_cpus(spec, args.num_cpus) if embedded else None
    settings = Settings(
        data_dir=output,
        ray_address=args.address or None,
        ray_num_cpus=num_cpus,
        data_root=data_root,
        max_concurrent_jobs=args.concurrent,
        poll_interval_s=0.2,
    )
    progress = sys.stderr if args.json else sys.stdout
    store = JobStore(settings.resolved_database_url())
    manager = JobManager(settings, store)
    try:
        ensure_ray(settings.ray_address, num_cpus, log_to_driver=False)
        manager.start()
        try:
            study = submit_study(manager, spec)
        except ValueError as exc:  # JobCannotFitError, or a model the service cannot build
            sys.stderr.write(f"syncbn study: {args.spec}: {exc}\n")
            return 2
        progress.write(
            f"study {study.id}: {len(spec.arms)} arms x {len(spec.seed_list())} seeds on "
            f"{'the cluster at ' + args.address if args.address else f'an embedded Ray with {num_cpus} CPUs'}; "
            f"results in {output}\n"
        )
        progress.flush()
        public = _wait(store, manager, study.id, follow=args.follow, out=progress)
    finally:
        manager.stop()
        store.close()
        if embedded:
            ray.shutdown()
    (output / "study.json").write_text(public.model_dump_json(indent=2) + "\n", encoding="utf-8")
    if args.json:
        sys.stdout.write(json.dumps(public.model_dump(mode="json")) + "\n")
    else:
        verdict = format_verdict(public.verdict) if public.verdict is not None else "no verdict: " + _why_none(public)
        sys.stdout.write(f"study {public.id} {public.status}\n{verdict}\n")
    return {"succeeded": 0, "cancelled": 130}.get(public.status, 1)


def _why_none(study: StudyPublic) -> str:
    """Why a finished study has no verdict, in a sentence."""
    done = sum(1 for trial in study.trials if trial.status.value == "succeeded")
    return f"{done} of {len(study.trials)} trials succeeded; a verdict needs two seeds of two arms (see their logs)."


def _wait(store: JobStore, manager: JobManager, study_id: str, *, follow: bool, out: TextIO) -> StudyPublic:
    """Print the trials' transitions (and epochs, with `follow`) until every trial ended; Ctrl-C cancels them."""
    from service.api.models import StudyPublic
    from service.status import JobStatus
    from service.store.study_results import read_study

    seen: dict[str, str] = {}
    epochs_seen: dict[str, int] = {}
    interrupted = False
    while True:
        try:
            state = read_study(store, store.get_study(study_id))
            for job in state.trials:
                where = f"trial arm {job.study_arm} seed {job.study_seed}"
                if seen.get(job.id) != job.status:
                    seen[job.id] = job.status
                    reason = f": {job.error}" if job.error and job.status != "succeeded" else ""
                    out.write(f"{where}: {job.status}{reason}\n")
                if follow and job.status in ("running", "succeeded"):
                    _, epochs = store.metrics(job.id)
                    for point in epochs[epochs_seen.get(job.id, 0) :]:
                        accuracy = "-" if point.val_acc is None else f"{point.val_acc:.4f}"
                        out.write(f"{where}: epoch {point.epoch} val acc {accuracy}\n")
                    epochs_seen[job.id] = len(epochs)
            out.flush()
            if all(JobStatus(job.status).is_terminal for job in state.trials):
                return StudyPublic.from_state(state)
            time.sleep(POLL_S)
        except KeyboardInterrupt:
            if interrupted:
                raise
            interrupted = True
            out.write("interrupted: cancelling the study's trials (Ctrl-C again to leave at once)\n")
            store.mark_study_cancel_requested(study_id)
            for job in store.study_trials(study_id):
                if not JobStatus(job.status).is_terminal:
                    with contextlib.suppress(LookupError, RuntimeError):  # it ended meanwhile
                        manager.cancel(job.id)
