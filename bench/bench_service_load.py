"""Load benchmark of the REST service: many concurrent readers of a running job's metrics and layer statistics,
one live SSE follower, and a burst of submissions, all at once, against a real `syncbn serve` on loopback.

It reports throughput and p50/p99 latency per kind of request, and checks that nothing was lost: every accepted
submission is listed by the service, no request answered 5xx, and the SSE follower received a gap-free sequence
of event ids equal to what the service stored.

Bounded: the load phase lasts `--seconds`; the burst jobs ask for all 4 CPUs of the embedded Ray, so they wait in
the queue behind the running job instead of training, and the whole service (with its Ray) is stopped at the end.

    .venv/bin/python bench/bench_service_load.py --readers 32 --burst 50 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

RUNNING_SPEC: dict[str, Any] = {
    "name": "bench-running",
    "model": "small_resnet",
    "dataset": {"kind": "digits"},
    "workers": 2,
    "epochs": 20,
    "batch_size": 16,
    "steps_per_epoch": 40,
    "stats_every": 2,
    "checkpoint_every": 0,
}


@dataclass
class Tally:
    """Latencies (seconds) and status codes of one kind of request."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, seconds: float, status: int) -> None:
        self.latencies.append(seconds)
        self.statuses[status] += 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(data_dir: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-c",
        "from service.cli import main; raise SystemExit(main())",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--ray-num-cpus",
        "4",
        "--log-level",
        "warning",
    ]
    log = (data_dir / "serve.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCBN_")}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


async def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = await predicate()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        await asyncio.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


async def reader(client: httpx.AsyncClient, job_id: str, layer: str, stop: float, tallies: dict[str, Tally]) -> None:
    """One reader: cycles through the read endpoints a dashboard would poll until `stop`."""
    routes = [
        ("metrics", f"/v1/jobs/{job_id}/metrics", None),
        ("metrics since", f"/v1/jobs/{job_id}/metrics", {"since_step": 20}),
        ("layers latest", f"/v1/jobs/{job_id}/layers", None),
        ("layers summary", f"/v1/jobs/{job_id}/layers", {"channels": "false"}),
        ("layer history", f"/v1/jobs/{job_id}/layers/{layer}", {"channels": "false"}),
        ("job", f"/v1/jobs/{job_id}", None),
    ]
    index = 0
    while time.monotonic() < stop:
        name, path, params = routes[index % len(routes)]
        index += 1
        started = time.perf_counter()
        try:
            response = await client.get(path, params=params)
            tallies[name].add(time.perf_counter() - started, response.status_code)
        except httpx.HTTPError:
            tallies[name].add(time.perf_counter() - started, 0)


async def submitter(client: httpx.AsyncClient, count: int, concurrency: int, tally: Tally, accepted: list[str]) -> None:
    """Submit `count` jobs, `concurrency` at a time, each with its own Idempotency-Key."""
    semaphore = asyncio.Semaphore(concurrency)
    burst_spec = {**RUNNING_SPEC, "name": "bench-burst", "workers": 4, "epochs": 1}

    async def one(i: int) -> None:
        async with semaphore:
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/v1/jobs", json={**burst_spec, "seed": i}, headers={"Idempotency-Key": uuid.uuid4().hex}
                )
                tally.add(time.perf_counter() - started, response.status_code)
                if response.status_code == 201:
                    accepted.append(response.json()["id"])
            except httpx.HTTPError:
                tally.add(time.perf_counter() - started, 0)

    await asyncio.gather(*(one(i) for i in range(count)))


async def follower(client: httpx.AsyncClient, job_id: str, stop: float, ids: list[int]) -> None:
    """Follow the running job's SSE stream until `stop`, keeping every event id."""
    try:
        async with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as response:
            async for line in response.aiter_lines():
                if line.startswith("id: "):
                    ids.append(int(line[4:]))
                if time.monotonic() > stop:
                    return
    except httpx.HTTPError:
        return


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.readers + args.burst_concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await wait_until(lambda: _ready(client), 180, "the service to be ready")
        job_id = (await client.post("/v1/jobs", json=RUNNING_SPEC)).json()["id"]
        layers = await wait_until(lambda: _layers(client, job_id), 180, "the first layer statistics")
        layer = sorted(layers)[0]

        tallies: dict[str, Tally] = defaultdict(Tally)
        submit_tally = Tally()
        accepted: list[str] = []
        sse_ids: list[int] = []
        started = time.monotonic()
        stop = started + args.seconds
        await asyncio.gather(
            follower(client, job_id, stop, sse_ids),
            *(reader(client, job_id, layer, stop, tallies) for _ in range(args.readers)),
            submitter(client, args.burst, args.burst_concurrency, submit_tally, accepted),
        )
        elapsed = time.monotonic() - started

        listed: set[str] = set()
        offset = 0
        while True:
            page = (await client.get("/v1/jobs", params={"offset": offset, "limit": 500})).json()
            listed.update(job["id"] for job in page["data"])
            offset += len(page["data"])
            if offset >= page["count"] or not page["data"]:
                break
        stored_ids: list[int] = []
        if sse_ids:
            async with client.stream(
                "GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "0"}, timeout=None
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        stored_ids.append(int(line[4:]))
                        if stored_ids[-1] >= sse_ids[-1]:
                            break
        steps = [p["step"] for p in (await client.get(f"/v1/jobs/{job_id}/metrics")).json()["steps"]]

    reads = [lat for tally in tallies.values() for lat in tally.latencies]
    all_statuses: dict[int, int] = defaultdict(int)
    for tally in [*tallies.values(), submit_tally]:
        for code, n in tally.statuses.items():
            all_statuses[code] += n
    return {
        "config": {"readers": args.readers, "burst": args.burst, "seconds": args.seconds},
        "elapsed_s": round(elapsed, 2),
        "reads": {
            "requests": len(reads),
            "throughput_rps": round(len(reads) / elapsed, 1),
            "p50_ms": round(percentile(reads, 50) * 1000, 1),
            "p99_ms": round(percentile(reads, 99) * 1000, 1),
            "by_route": {
                name: {
                    "requests": len(t.latencies),
                    "p50_ms": round(percentile(t.latencies, 50) * 1000, 1),
                    "p99_ms": round(percentile(t.latencies, 99) * 1000, 1),
                    "mean_ms": round(statistics.fmean(t.latencies) * 1000, 1) if t.latencies else None,
                }
                for name, t in sorted(tallies.items())
            },
        },
        "submissions": {
            "requests": len(submit_tally.latencies),
            "accepted": len(accepted),
            "p50_ms": round(percentile(submit_tally.latencies, 50) * 1000, 1),
            "p99_ms": round(percentile(submit_tally.latencies, 99) * 1000, 1),
        },
        "status_codes": dict(sorted(all_statuses.items())),
        "checks": {
            "no_5xx_or_transport_errors": all(code and code < 500 for code in all_statuses),
            "every_accepted_job_listed": set(accepted) <= listed,
            "missing_jobs": len(set(accepted) - listed),
            "sse_events_received": len(sse_ids),
            "sse_ids_gap_free": sse_ids == list(range(1, len(sse_ids) + 1)),
            "sse_ids_equal_stored": sse_ids == stored_ids[: len(sse_ids)],
            "steps_recorded_while_loaded": len(steps),
            "steps_gap_free": steps == list(range(steps[0], steps[0] + 2 * len(steps), 2)) if steps else False,
        },
    }


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200


async def _layers(client: httpx.AsyncClient, job_id: str) -> dict[str, Any] | None:
    layers = (await client.get(f"/v1/jobs/{job_id}/layers", params={"channels": "false"})).json()["layers"]
    return layers or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", type=int, default=32, help="Concurrent readers (default: 32).")
    parser.add_argument("--burst", type=int, default=50, help="Jobs submitted in the burst (default: 50).")
    parser.add_argument("--burst-concurrency", type=int, default=10, help="Submissions in flight (default: 10).")
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of the load phase (default: 20).")
    parser.add_argument("--json", action="store_true", help="Print the raw result as JSON.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="syncbn-bench-") as folder:
        data_dir = Path(folder)
        port = free_port()
        service = start_service(data_dir, port)
        try:
            result = asyncio.run(run(args, f"http://127.0.0.1:{port}"))
        finally:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(60)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.pid, signal.SIGKILL)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if all(v for k, v in result["checks"].items() if k not in ("missing_jobs",)) else 1
    reads, subs, checks = result["reads"], result["submissions"], result["checks"]
    print(
        f"syncbn service under load: {args.readers} readers + SSE follower + burst of {args.burst} submissions, "
        f"{result['elapsed_s']} s, one 2-worker job training meanwhile"
    )
    print(f"{'requests':<22}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}")
    print(
        f"{'all reads':<22}{reads['requests']:>8}{reads['p50_ms']:>10}{reads['p99_ms']:>10}"
        f"   ({reads['throughput_rps']} req/s)"
    )
    for name, row in reads["by_route"].items():
        print(f"  {name:<20}{row['requests']:>8}{row['p50_ms']:>10}{row['p99_ms']:>10}")
    print(
        f"{'submissions':<22}{subs['requests']:>8}{subs['p50_ms']:>10}{subs['p99_ms']:>10}"
        f"   ({subs['accepted']} accepted)"
    )
    print(f"status codes: {result['status_codes']}")
    for name, value in checks.items():
        print(f"  {name}: {value}")
    ok = (
        checks["no_5xx_or_transport_errors"]
        and checks["every_accepted_job_listed"]
        and checks["sse_ids_gap_free"]
        and checks["sse_ids_equal_stored"]
        and checks["steps_gap_free"]
    )
    print("nothing lost" if ok else "SOMETHING WAS LOST OR FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
