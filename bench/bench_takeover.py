"""Takeover time of the leader lease: SIGKILL the leading `syncbn serve` replica, time until a follower leads.

Real parts, as in tests/service/test_ha_replicas.py: a PostgreSQL server of its own (`initdb` on a free port), a
`ray start --head` on free ports, two `syncbn serve` replicas and one running job (so that every takeover also
re-attaches a run). Each round kills the leader, measures the time from the kill until the other replica's
/readyz says `leading: true` (its recovery of the running job included), and starts a replacement follower.
Prints each round and the median; everything it started is stopped by pid at the end.

    .venv/bin/python bench/bench_takeover.py --kills 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.service.conftest_api import ServeProcess, tiny_spec, wait_for
from tests.service.own_servers import OwnPostgres, RayHead, replica


def _leading(process: ServeProcess) -> bool:
    try:
        return bool(httpx.get(f"{process.url}/readyz", timeout=5).json().get("leading"))
    except (httpx.HTTPError, ValueError):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="leaders to kill (default 5)")
    args = parser.parse_args()
    postgres = OwnPostgres().start()
    ray = RayHead(num_cpus=4).wait_ready()
    data_dir = Path(tempfile.mkdtemp(prefix="syncbn-takeover-"))
    replicas: list[ServeProcess] = []
    times: list[float] = []
    try:
        replicas = [replica(data_dir, postgres.url, ray, f"r{i}") for i in range(2)]
        for process in replicas:
            process.wait_ready(300)
        leader = wait_for(lambda: next((p for p in replicas if _leading(p)), None), 60, "a leader")
        with leader.client() as client:
            job = client.post("/v1/jobs", json=tiny_spec(name="long", workers=1, epochs=200)).json()
            wait_for(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 300, "the job")
        for round_ in range(1, args.kills + 1):
            alive = [p for p in replicas if p.process.poll() is None]
            leader = wait_for(lambda: next((p for p in alive if _leading(p)), None), 60, "a leader")  # noqa: B023
            follower = next(p for p in alive if p is not leader)
            killed = time.monotonic()
            leader.kill()
            wait_for(lambda: _leading(follower), 60, "the follower to lead", interval=0.05)  # noqa: B023
            times.append(time.monotonic() - killed)
            print(f"round {round_}: takeover {times[-1]:.2f} s", flush=True)
            fresh = replica(data_dir, postgres.url, ray, f"r{len(replicas)}")
            replicas.append(fresh)
            fresh.wait_ready(300)
        with follower.client() as client:
            status = client.get(f"/v1/jobs/{job['id']}").json()["status"]
            client.post(f"/v1/jobs/{job['id']}/cancel")
        print(
            f"takeover after SIGKILL of the leader, {len(times)} kills: median {statistics.median(times):.2f} s, "
            f"min {min(times):.2f} s, max {max(times):.2f} s; the job was still {status}"
        )
    finally:
        for process in replicas:
            if process.process.poll() is None:
                process.kill()
        ray.stop()
        postgres.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
