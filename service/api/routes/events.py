"""Server-Sent Events of a job: status changes, metric points, layer statistics and log lines, live.

Each event's id is its position in the job's event log (gap-free, stored in the database with the records
it announces), so a client that reconnects with `Last-Event-ID` receives exactly the events it missed, even
across a restart of the service. The stream ends after the job's final `status` event.

Event kinds (the `event:` field) and their JSON `data`:
- `status`: `status, previous, at, error, verdict, epochs_done, last_val_acc, best_val_acc, final_val_acc,
  final_train_loss`;
- `step`: a step point (`step, epoch, train_loss, lr, samples_per_s, step_time_s`);
- `epoch`: an epoch point (`epoch, step, train_loss, train_acc, val_loss, val_acc, epoch_time_s`);
- `layers`: `step, epoch, layers: {layer: summary}` (per-channel lists are left out: read them from
  `GET /v1/jobs/{id}/layers?step=`); `?layers_after_step=N` leaves out those of steps up to N, for a client that
  read them from `GET /v1/jobs/{id}/layer-summaries` first;
- `log`: `level, source, message, at`;
- `resumed`: `epoch, reason, at` (the run died with the service and starts again from its checkpoint after
  `epoch`; the job stays running).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from service.api.deps import JobDep, ManagerDep, StoreDep
from service.api.routes.responses import errors
from service.status import JobStatus
from service.store.limits import integer_range
from service.store.models import JobEventRow, LayerSummaryRow

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["events"])

#: Events read from the database per query.
BATCH = 500
#: Seconds between two checks for new events while the job is quiet.
TICK_S = 0.2
#: Seconds after which the database is asked even when this process has not written anything (other writers).
RECHECK_S = 2.0
#: Reconnection delay suggested to clients, in milliseconds.
RETRY_MS = 2000


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a job live (Server-Sent Events)",
    responses=errors(401, 404, 422, non_json_route=True),
)
async def stream_events(
    job: JobDep,
    store: StoreDep,
    manager: ManagerDep,
    last_event_id: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=integer_range(JobEventRow.seq)[1],
            description="Resume after this event id (browsers send it when they reconnect).",
        ),
    ] = None,
    after: Annotated[
        int | None,
        Query(
            ge=0,
            le=integer_range(JobEventRow.seq)[1],
            description="Same as Last-Event-ID, for clients that cannot set headers.",
        ),
    ] = None,
    layers_after_step: Annotated[
        int | None,
        Query(
            ge=-1,
            le=integer_range(LayerSummaryRow.step)[1],
            description="Leave out `layers` events of steps up to this one (already read from /layer-summaries).",
        ),
    ] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Stream the job's events from the start (or after `Last-Event-ID`); the stream ends when the job ends."""
    cursor = max(last_event_id or 0, after or 0)
    skip_through = layers_after_step if layers_after_step is not None else -1
    yield ServerSentEvent(comment=f"events of job {job.id} after id {cursor}", retry=RETRY_MS)
    while True:
        rows = await run_in_threadpool(
            store.events, job.id, after=cursor, limit=BATCH, layers_after_step=layers_after_step
        )
        for row in rows:
            cursor = row.seq
            if row.kind == "layers" and isinstance(row.data, dict) and row.data.get("step", 0) <= skip_through:
                continue
            yield ServerSentEvent(id=str(row.seq), event=row.kind, data=row.data)
        if len(rows) == BATCH:
            continue
        latest = await run_in_threadpool(store.get_job, job.id)
        if latest is None or manager.stopping:
            return  # deleted, or the service is shutting down: the client reconnects with Last-Event-ID
        if JobStatus(latest.status).is_terminal and cursor >= latest.event_seq:
            return
        if cursor < latest.event_seq:
            continue
        recheck_at = time.monotonic() + RECHECK_S
        while store.latest_event_hint(job.id) <= cursor and time.monotonic() < recheck_at and not manager.stopping:
            await asyncio.sleep(TICK_S)
