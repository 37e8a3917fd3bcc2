"""`syncbn submit SPEC`: send a job spec to a running service and, with `--follow`, print its progress live.

The client validates the spec locally first (the same `JobSpec` the service uses), posts it with an
`Idempotency-Key` (so its own retries after a dropped connection never create a second job), and follows the
job's Server-Sent Events, reconnecting with `Last-Event-ID` when the connection drops, until the job ends.
Exit code: 0 when the job was queued (or, with --follow, succeeded); 1 when it failed or was cancelled; 2 for
a spec or request the service refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from service.spec import load_spec_file

__all__ = ["SseEvent", "add_submit_arguments", "follow_job", "parse_sse", "run_submit"]

#: Attempts for the POST and for each reconnection of the event stream.
ATTEMPTS = 5


@dataclass
class SseEvent:
    """One Server-Sent Event: its id, kind (`event:` field) and JSON data."""

    id: int | None
    kind: str
    data: Any


def parse_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Events from the lines of a `text/event-stream` (comments and retry fields are skipped)."""
    event_id: int | None = None
    kind = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    payload = json.loads(text)
                except ValueError:
                    payload = text
                yield SseEvent(event_id, kind, payload)
            event_id, kind, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            kind = value
        elif field == "id" and value.isdigit():
            event_id = int(value)


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
    parser.add_argument("--json", action="store_true", help="Print the job as JSON instead of text.")
    parser.add_argument("--timeout", type=float, default=30.0, help="Seconds per HTTP request (default: 30).")


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=args.timeout)


def _post_job(client: httpx.Client, body: dict[str, Any], key: str) -> httpx.Response:
    """POST /v1/jobs, retried on connection errors and 5xx with the same Idempotency-Key."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            response = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError:
            if attempt == ATTEMPTS:
                raise
        else:
            if response.status_code < 500 or attempt == ATTEMPTS:
                return response
        time.sleep(min(2.0**attempt * 0.25, 5.0))
    raise AssertionError("unreachable")  # pragma: no cover


def _line(event: SseEvent) -> str | None:
    data = event.data if isinstance(event.data, dict) else {}
    if event.kind == "status":
        extra = f": {data['error']}" if data.get("error") else ""
        return f"status {data.get('status')}{extra}"
    if event.kind == "epoch":
        return (
            f"epoch {data.get('epoch')}  step {data.get('step')}  train loss {_num(data.get('train_loss'))}  "
            f"train acc {_num(data.get('train_acc'))}  val loss {_num(data.get('val_loss'))}  "
            f"val acc {_num(data.get('val_acc'))}"
        )
    if event.kind == "step":
        return f"  step {data.get('step')}  loss {_num(data.get('train_loss'))}  lr {_num(data.get('lr'))}"
    if event.kind == "log":
        return f"[{data.get('level')}] {data.get('message')}"
    return None


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def follow_job(client: httpx.Client, job_id: str, out: Any = sys.stdout) -> dict[str, Any]:
    """Print a job's events until it ends, reconnecting with Last-Event-ID; returns the final job."""
    last_id = 0
    failures = 0
    while True:
        try:
            headers = {"Last-Event-ID": str(last_id)} if last_id else {}
            with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None) as response:
                response.raise_for_status()
                for event in parse_sse(response.iter_lines()):
                    failures = 0
                    if event.id is not None:
                        last_id = event.id
                    line = _line(event)
                    if line:
                        out.write(line + "\n")
                        out.flush()
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:
            failures += 1
            if failures >= ATTEMPTS:
                raise
            out.write(f"(connection lost: {exc}; reconnecting after event {last_id})\n")
            time.sleep(min(0.5 * failures, 5.0))
            continue
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job.get("status") in ("succeeded", "failed", "cancelled"):
            return job


def run_submit(args: argparse.Namespace) -> int:
    """Submit the spec file; with --follow, stream the job until it ends. Returns the exit code."""
    try:
        spec = load_spec_file(args.spec)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"syncbn submit: {args.spec}: {exc}\n")
        return 2
    key = args.idempotency_key or uuid.uuid4().hex
    with _client(args) as client:
        try:
            response = _post_job(client, spec.model_dump(mode="json"), key)
        except httpx.TransportError as exc:
            sys.stderr.write(f"syncbn submit: cannot reach the service at {args.url}: {exc}\n")
            return 2
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            sys.stderr.write(f"syncbn submit: the service refused the job ({response.status_code}): {detail}\n")
            return 2
        job = response.json()
        if not args.json:
            position = f", position {job['queue_position']} in the queue" if job.get("queue_position") else ""
            sys.stdout.write(f"submitted job {job['id']} ({job['status']}{position})\n")
            sys.stdout.flush()
        if not args.follow:
            if args.json:
                sys.stdout.write(json.dumps(job, indent=2) + "\n")
            return 0
        final = follow_job(client, job["id"], out=sys.stderr if args.json else sys.stdout)
    if args.json:
        sys.stdout.write(json.dumps(final, indent=2) + "\n")
    else:
        summary = final.get("summary", {})
        sys.stdout.write(
            f"job {final['id']} {final['status']}: epochs {summary.get('epochs_done')}, best val acc "
            f"{_num(summary.get('best_val_acc'))}, final train loss {_num(summary.get('final_train_loss'))}, "
            f"verdict {summary.get('verdict')}" + (f", error: {final['error']}" if final.get("error") else "") + "\n"
        )
    return 0 if final["status"] == "succeeded" else 1
