"""`syncbn submit SPEC`: send a job spec to a running service and, with `--follow`, print its progress live.

A thin layer over `service.client.Client`: the spec file is validated locally first (the same `JobSpec` the
service uses), posted with an `Idempotency-Key` (so the client's retries after a dropped connection never create
a second job), and with `--follow` the job's Server-Sent Events are printed until it ends (the client resumes a
dropped stream with `Last-Event-ID` by itself).
Exit code: 0 when the job was queued (or, with --follow, succeeded); 1 when it failed or was cancelled; 2 for
a spec or request the service refused, or a service that could not be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # the client (and the API models it loads) is imported in run_submit: `syncbn --help` stays fast
    from service.api.models import JobPublic
    from service.client import Client, Event

__all__ = ["add_submit_arguments", "event_line", "refusal", "run_submit"]


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `syncbn submit`."""
    parser.add_argument("spec", help="Job spec file (.json, .yaml or .yml).")
    parser.add_argument(
        "--url",
        default=os.environ.get("SYNCBN_URL", "http://127.0.0.1:8000"),
        help="Base URL of the service [env SYNCBN_URL] (default: %(default)s).",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SYNCBN_API_TOKEN"),
        help="Bearer token, if the service requires one [env SYNCBN_API_TOKEN].",
    )
    parser.add_argument(
        "--idempotency-key", default=None, help="Idempotency-Key to send (default: a fresh UUID per invocation)."
    )
    parser.add_argument("--follow", "-f", action="store_true", help="Follow the job's events until it ends.")
    parser.add_argument(
        "--study",
        action="store_true",
        help="SPEC is a study spec (POST /v1/studies): with --follow, wait for its verdict (service.study_submit).",
    )
    parser.add_argument("--json", action="store_true", help="Print the job as JSON instead of text.")
    parser.add_argument("--timeout", type=float, default=30.0, help="Seconds per HTTP request (default: 30).")


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def event_line(event: Event) -> str | None:
    """The progress line printed for an event (None for events that are not printed, e.g. layer statistics)."""
    data = event.data if isinstance(event.data, dict) else {}
    if event.type == "status":
        extra = f": {data['error']}" if data.get("error") else ""
        return f"status {data.get('status')}{extra}"
    if event.type == "epoch":
        return (
            f"epoch {data.get('epoch')}  step {data.get('step')}  train loss {_num(data.get('train_loss'))}  "
            f"train acc {_num(data.get('train_acc'))}  val loss {_num(data.get('val_loss'))}  "
            f"val acc {_num(data.get('val_acc'))}"
        )
    if event.type == "step":
        return f"  step {data.get('step')}  loss {_num(data.get('train_loss'))}  lr {_num(data.get('lr'))}"
    if event.type == "log":
        return f"[{data.get('level')}] {data.get('message')}"
    return None


def _follow(client: Client, job_id: str, out: TextIO) -> JobPublic:
    """Print the job's events until it ends; return the final job."""
    for event in client.events(job_id):
        line = event_line(event)
        if line:
            out.write(line + "\n")
            out.flush()
    return client.wait(job_id)


def _job_json(job: JobPublic) -> str:
    return json.dumps(job.model_dump(mode="json"), indent=2)


@contextlib.contextmanager
def _client_notes(stream: TextIO) -> Iterator[None]:
    """Show the client's retry and reconnection notes ("(connection lost: ...; reconnecting after event N)")."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("(%(message)s)"))
    client_logger = logging.getLogger("service.client")
    client_logger.addHandler(handler)
    try:
        yield
    finally:
        client_logger.removeHandler(handler)


def run_submit(args: argparse.Namespace) -> int:
    """Submit the spec file; with --follow, stream the job until it ends. Returns the exit code."""
    with _client_notes(sys.stderr):
        if getattr(args, "study", False):
            from service.study_submit import run_study_submit

            return run_study_submit(args)
        return _submit(args)


def refusal(exc: Exception, url: str, what: str) -> str:
    """The sentence for a submission (`what`: job or study) that did not reach the queue."""
    from service.client import APIError, ConnectionFailedError

    if isinstance(exc, ConnectionFailedError):
        return f"cannot reach the service at {url}: {exc}"
    if isinstance(exc, APIError):
        return f"the service refused the {what} ({exc.status_code}): {exc.detail}"
    return str(exc)


def _submit(args: argparse.Namespace) -> int:
    from service.client import APIError, Client, ClientError, ConnectionFailedError, SpecError

    with Client(args.url, args.token, timeout=args.timeout) as client:
        try:
            job = client.submit(args.spec, idempotency_key=args.idempotency_key)
        except (SpecError, ConnectionFailedError, APIError) as exc:
            sys.stderr.write(f"syncbn submit: {refusal(exc, args.url, 'job')}\n")
            return 2
        if not args.json:
            position = f", position {job.queue_position} in the queue" if job.queue_position else ""
            sys.stdout.write(f"submitted job {job.id} ({job.status.value}{position})\n")
            sys.stdout.flush()
        if not args.follow:
            if args.json:
                sys.stdout.write(_job_json(job) + "\n")
            return 0
        try:
            final = _follow(client, job.id, out=sys.stderr if args.json else sys.stdout)
        except ClientError as exc:
            sys.stderr.write(f"syncbn submit: lost job {job.id} while following it: {exc}\n")
            return 2
    if args.json:
        sys.stdout.write(_job_json(final) + "\n")
    else:
        summary = final.summary
        sys.stdout.write(
            f"job {final.id} {final.status.value}: epochs {summary.epochs_done}, best val acc "
            f"{_num(summary.best_val_acc)}, final train loss {_num(summary.final_train_loss)}, "
            f"verdict {summary.verdict}"
            + (
                ""
                if summary.final_val_acc_precise is None
                else f", precise-BN val acc {_num(summary.final_val_acc_precise)}"
            )
            + (f", error: {final.error}" if final.error else "")
            + (f"\nwarning: {summary.warning}" if summary.warning else "")
            + "\n"
        )
    return 0 if final.status.value == "succeeded" else 1
