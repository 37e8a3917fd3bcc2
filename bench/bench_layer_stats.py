"""What recording per-layer BatchNorm statistics costs, and what storing them takes, for a wide model.

Model: 40 `syncbn.SyncBatchNorm` layers of 256 channels (10,240 channels), each followed by a ReLU, then a
linear head; 2 Ray Train workers (gloo, one thread each), batch 16 x 256 x 4 x 4 per rank, DDP + SGD.

1. Step time (one real Ray Train run, the real `RecordingCallback` merging into a real `RecordLog` actor, drained
   into a real SQLite store by a thread of this process as the service's manager does). Modes alternate round by
   round inside the run (after one untimed warm-up round), so machine noise hits all of them alike:
   - `off`: no report at all (the baseline);
   - `metrics/k`: step metrics reported every k steps, no layer statistics;
   - `layers/k`: step metrics and the packed per-layer statistics every k steps (what a job does);
   recorded steps travel as a job's loop sends them, `service.engine.reports.steps_per_report(k)` per report
   (10 at k = 1: reports at least 10 steps apart); `metrics/1-each` and `layers/1-each` send one report per
   recorded step, as the loop did before.
   Printed: mean step time per mode (a report round's cost spread over the k steps it serves; medians too),
   ratios against `off` and of `layers/k` against `metrics/k`, all measured in the same run, and the median time
   rank 0 spends inside `ray.train.report` (the round's barrier and hand-over to the controller). The controller
   polls the workers every 0.1 s, as for a job (`service.engine.runner.TRAIN_ENV_VARS`); under Ray's default of
   2 s every report would wait up to 2 s for the previous one to be collected.
2. Pieces of a recorded step, timed in this process on the run's own payloads: the packed snapshot's size, the
   vectorised merge, the merge layer by layer of the per-layer dicts, and the store's ingest of one record.
3. Storage: 500 recorded steps of that model ingested into a fresh SQLite store with stats_keep=256: bytes per
   recorded step (summaries, and vectors of a kept snapshot, per channel), footprint after 250 and 500 steps.
4. Latency: `syncbn serve` on that database (a real server on loopback): p50 of `/layers` (with and without
   channels, latest and a step), `/layers/{layer}` (summaries; the dashboard's 120 kept snapshots), and the
   heatmap's requests as the dashboard sends them: `/layer-summaries` of the statistic it shows first, of a
   second one when the user switches to it, then the page's event stream without the `layers` events already
   read; for comparison, what the dashboard sent before: `/layer-summaries` of all its 9 statistics at once, and
   the stream replaying every `layers` event.

5. Layer history at ResNet-50 scale (`--history-channels 256,2048`): for each width, a store with two layers of
   that many channels, 300 recorded steps and stats_keep=200 (so ~200 kept snapshots), served by `syncbn serve`:
   p50 and bytes of `/layers/{layer}?max_points=200` and `/layers?step=` in JSON and in the binary safetensors
   form (`Accept: application/x-safetensors`), and, in this process, the JSON encoding as the route did it before
   (pydantic models + the standard encoder) against orjson on the store's float32 arrays.

    .venv/bin/python bench/bench_layer_stats.py [--rounds 6 --steps 20 --requests 30]
    .venv/bin/python bench/bench_layer_stats.py --training-only [--modes off,metrics/1,layers/1]
    .venv/bin/python bench/bench_layer_stats.py --history-only [--history-channels 256,2048]

Figures depend on the machine's load: on a shared machine run it more than once and say so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

LAYERS, CHANNELS, BATCH, SPATIAL = 40, 256, 16, 4
MODES = ("off", "metrics/10", "layers/10", "metrics/1", "layers/1", "metrics/1-each", "layers/1-each")
#: The statistics the dashboard's heatmap offers (service/dashboard/static/layer_view.js, STATISTICS), in its order:
#: the first is the one a job page shows (and reads) first.
HEATMAP_KEYS = (
    "skew_between_share_max",
    "skew_max_gap",
    "drift_mean",
    "drift_max",
    "batch_var_mean",
    "batch_var_min",
    "dead_channels",
    "weight_mean",
    "weight_grad_norm",
)


def train_fn(config: dict[str, Any]) -> None:
    """One rank: the modes round by round; rank 0 writes each mode's per-step times to config["out"]."""
    import ray.train
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import syncbn
    from service.engine.reports import steps_per_report

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(LAYERS):
        blocks += [nn.BatchNorm2d(CHANNELS), nn.ReLU()]
    model = syncbn.convert_sync_batchnorm(
        nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, 10))
    )
    ddp = DistributedDataParallel(model, forward_sync_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    recorder = syncbn.BatchStatsRecorder(model)
    torch.manual_seed(1 + rank)
    x = torch.randn(BATCH, CHANNELS, SPATIAL, SPATIAL) + rank
    y = torch.randint(0, 10, (BATCH,))
    times: dict[str, list[float]] = {mode: [] for mode in config["modes"]}
    # Time inside ray.train.report (the round's barrier and hand-over to the controller).
    report_s: dict[str, list[float]] = {mode: [] for mode in config["modes"]}
    step = 0
    for round_index in range(config["rounds"] + 1):  # round 0 warms up (first steps, first reports): not timed
        timed = round_index > 0
        for mode in config["modes"]:
            every = int(mode.split("/")[1].removesuffix("-each")) if "/" in mode else 0
            # As the engine's loop: recorded steps travel steps_per_report(every) at a time; "-each": one per report.
            per_report = 1 if mode.endswith("-each") or not every else steps_per_report(every)
            pending: list[dict[str, Any]] = []
            dist.barrier()
            for index in range(config["steps"]):
                step += 1
                report = every and index % every == every - 1
                layers = report and mode.startswith("layers")
                started = time.perf_counter()
                with recorder.recording() if layers else contextlib.nullcontext():
                    out = ddp(x)
                loss = nn.functional.cross_entropy(out, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                packed = recorder.packed_snapshot() if layers else None
                optimizer.step()
                if report:
                    metrics = {
                        "kind": "step",
                        "step": step,
                        "epoch": 1,
                        "train_loss": float(loss),
                        "lr": 0.01,
                        "samples_per_s": 0.0,
                        "step_time_s": 0.0,
                    }
                    if layers:
                        metrics["layers"] = packed
                    pending.append(metrics)
                    if len(pending) == per_report or index == config["steps"] - 1:
                        reporting = time.perf_counter()
                        ray.train.report(pending[0] if len(pending) == 1 else {"kind": "steps", "steps": pending})
                        pending = []
                        if timed:
                            report_s[mode].append(time.perf_counter() - reporting)
                if timed:
                    times[mode].append(time.perf_counter() - started)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"times": times, "report_s": report_s}))


def median_ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values)


def run_training(args: argparse.Namespace, work: Path, store: Any, job_id: str) -> dict[str, Any]:
    """The Ray Train run with the real callback and record log, drained into `store` while it runs."""
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from service.engine.recorder import RecordLog
    from service.engine.recording_callback import RecordingCallback
    from service.engine.runner import TRAIN_ENV_VARS

    # The controller polls the workers as it does for a job (Ray's default 2 s would throttle every report).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": TRAIN_ENV_VARS})
    log = ray.remote(RecordLog).options(num_cpus=0).remote(job_id)
    out = work / "times.json"
    ingest_s: list[float] = []
    stop = threading.Event()

    def drain() -> None:
        cursor = 0
        while not stop.is_set() or cursor < ray.get(log.last_seq.remote()):
            records = ray.get(log.poll.remote(cursor, 200))
            if records:  # one transaction per poll, as the service's drain stores them
                started = time.perf_counter()
                store.ingest(job_id, records)
                layer_records = sum(record["kind"] == "layers" for record in records)
                if layer_records:
                    ingest_s.extend([(time.perf_counter() - started) / layer_records] * layer_records)
                cursor = records[-1]["seq"]
            else:
                time.sleep(0.25)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"rounds": args.rounds, "steps": args.steps, "modes": args.modes, "out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=f"bench-{job_id}",
            storage_path=str(work / "ray"),
            callbacks=[RecordingCallback(log)],
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started
    stop.set()
    drainer.join(timeout=120)
    written = json.loads(out.read_text())
    records = ray.get(log.poll.remote(0))
    ray.shutdown()
    return {
        "times": written["times"],
        "report_s": written["report_s"],
        "wall_s": wall,
        "ingest_s": ingest_s,
        "records": len(records),
    }


def recorded_ranks() -> list[Any]:
    """Two ranks' `syncbn.BatchStatsRecorder`s after one recording pass of the bench's layers, each on its own
    data (shifted by its rank, so the ranks disagree as real shards do)."""
    import torch
    from torch import nn

    import syncbn

    recorders = []
    for rank in range(2):
        torch.manual_seed(rank)
        model = nn.Sequential(*(nn.BatchNorm2d(CHANNELS) for _ in range(LAYERS)))
        recorder = syncbn.BatchStatsRecorder(model)
        with recorder.recording():
            model(torch.randn(BATCH, CHANNELS, SPATIAL, SPATIAL) + rank).sum().backward()
        recorders.append(recorder)
    return recorders


def piece_costs() -> dict[str, float]:
    """Payload size and merge times on a freshly recorded pair of rank snapshots (in this process)."""
    import pickle

    import torch

    from service.engine.reports import merge_layers

    torch.set_num_threads(1)
    recorders = recorded_ranks()
    per_rank_packed = [recorder.packed_snapshot() for recorder in recorders]
    per_rank_dicts = [recorder.snapshot() for recorder in recorders]

    def best(fn: Any, repeat: int = 7) -> float:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return 1000.0 * min(times)

    return {
        "packed_payload_bytes": len(pickle.dumps(per_rank_packed[0], protocol=5)),
        "dict_payload_bytes": len(pickle.dumps(per_rank_dicts[0], protocol=5)),
        "packed_snapshot_ms": best(lambda: recorders[-1].packed_snapshot()),
        "dict_snapshot_ms": best(lambda: recorders[-1].snapshot()),
        "merge_packed_ms": best(lambda: merge_layers(per_rank_packed)),
        "merge_per_layer_dicts_ms": best(lambda: merge_layers(per_rank_dicts)),
    }


def fill_store(store: Any, job_id: str, template: dict[str, Any], steps: int) -> dict[str, Any]:
    """`steps` recorded steps (with their step points) from one real layers record; sizes at half and at the end."""
    sizes = {}
    for step in range(1, steps + 1):
        records = [
            {"kind": "step", "step": step, "epoch": 1 + step // 100, "train_loss": 1.0, "lr": 0.1},
            {**template, "step": step, "epoch": 1 + step // 100},
        ]
        seq = store.get_job(job_id).record_seq
        store.ingest(job_id, [{**r, "seq": seq + i + 1} for i, r in enumerate(records)])
        if step in (steps // 2, steps):
            sizes[step] = store.layer_storage_bytes(job_id)
    return sizes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_latency(data_dir: Path, job_id: str, requests: int) -> dict[str, float]:
    """p50 latency (ms) of the layer routes and the SSE replay against `syncbn serve` on `data_dir`."""
    import httpx

    server, base = serve(data_dir)
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            layer = "19"  # a layer in the middle of the model (module path of the 20th BatchNorm)
            path = f"/v1/jobs/{job_id}"
            cases = {
                "/layers (latest, channels)": (f"{path}/layers", {}),
                "/layers (latest, summaries)": (f"{path}/layers", {"channels": "false"}),
                "/layers?step=123 (nearest kept)": (f"{path}/layers", {"step": "123"}),
                "/layers/{layer} (500 summaries)": (f"{path}/layers/{layer}", {"channels": "false"}),
                "/layers/{layer} (120 kept snapshots)": (f"{path}/layers/{layer}", {"max_points": "120"}),
                # The dashboard reads one statistic at a time: the shown one, then each one the user switches to.
                f"heatmap: /layer-summaries of the shown statistic ({HEATMAP_KEYS[0]})": (
                    f"{path}/layer-summaries",
                    {"keys": HEATMAP_KEYS[0]},
                ),
                f"heatmap: switch to a second statistic ({HEATMAP_KEYS[2]})": (
                    f"{path}/layer-summaries",
                    {"keys": HEATMAP_KEYS[2]},
                ),
                "page: event stream after it": (f"{path}/events", {"layers_after_step": "500"}),
                "before: /layer-summaries of all 9 statistics at once": (
                    f"{path}/layer-summaries",
                    {"keys": ",".join(HEATMAP_KEYS)},
                ),
                "before: event stream replaying every layers event": (f"{path}/events", {}),
            }
            out: dict[str, float] = {}
            sizes: dict[str, int] = {}
            for name, (url, params) in cases.items():
                times = []
                for _ in range(requests):
                    started = time.perf_counter()
                    response = client.get(url, params=params)
                    body = response.content
                    times.append(time.perf_counter() - started)
                    if response.status_code != 200:
                        raise RuntimeError(f"{name}: {response.status_code} {body[:300]!r}")
                out[name] = median_ms(times)
                sizes[name] = len(body)
            return {"p50_ms": out, "bytes": sizes}
    finally:
        stop(server)


def serve(data_dir: Path) -> tuple[subprocess.Popen, str]:
    """`syncbn serve` on `data_dir` (a real server on a free loopback port), ready; (process, base URL)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-c", "from service.cli import main; raise SystemExit(main())", "serve"]
    command += ["--port", str(port), "--data-dir", str(data_dir), "--ray-num-cpus", "1", "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCBN_")}
    log = (data_dir / "serve.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            stop(server)
            raise RuntimeError(f"syncbn serve did not become ready; see {data_dir / 'serve.log'}")
        time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL after a minute."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def history_forms(work: Path, channels: int, requests: int) -> dict[str, Any]:
    """Section 5 for one layer width: p50 (ms) and bytes of the history routes in JSON and safetensors."""
    import httpx
    import orjson
    import torch
    from torch import nn

    import syncbn
    from service.api.models import LayerHistoryPublic
    from service.engine.reports import records_from_reports
    from service.status import JobStatus
    from service.store import JobStore

    recorders = []
    for rank in range(2):
        torch.manual_seed(rank)
        model = nn.Sequential(nn.BatchNorm2d(channels), nn.BatchNorm2d(channels))
        recorder = syncbn.BatchStatsRecorder(model)
        with recorder.recording():
            model(torch.randn(4, channels, 2, 2) + rank).sum().backward()
        recorders.append(recorder)
    step = {"kind": "step", "step": 1, "epoch": 1, "train_loss": 1.0, "lr": 0.1, "samples_per_s": 1.0}
    template = records_from_reports([step | {"step_time_s": 0.1, "layers": r.packed_snapshot()} for r in recorders])[1]
    data_dir = work / f"history-{channels}"
    store = JobStore(f"sqlite:///{(data_dir / 'syncbn.db').resolve()}", stats_keep=200)
    job_id = uuid.uuid4().hex
    store.create_job(job_id, {"name": f"bench-history-{channels}"})
    store.transition(job_id, JobStatus.RUNNING)
    fill_store(store, job_id, template, 300)

    def best_ms(fn: Any, repeat: int = 5) -> float:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return 1000.0 * min(times)

    def before() -> bytes:  # the route's work before: Python lists, pydantic models, the standard encoder
        history = store.layer_history(job_id, "0", max_points=200)
        return LayerHistoryPublic.from_result(job_id, "0", history).model_dump_json().encode()

    def now() -> bytes:
        history = store.layer_history(job_id, "0", max_points=200, arrays=True)
        points = [{"step": p.step, "epoch": p.epoch, "stats": p.stats} for p in history.points]
        return orjson.dumps({"points": points}, option=orjson.OPT_SERIALIZE_NUMPY)

    out: dict[str, Any] = {
        "kept_snapshots": store.layer_history(job_id, "0", max_points=10_000, channels=True).available,
        "in_process_best_ms": {"before: pydantic + json": best_ms(before), "orjson on float32 arrays": best_ms(now)},
    }
    store.close()
    server, base = serve(data_dir)
    try:
        path = f"{base}/v1/jobs/{job_id}"
        binary = {"Accept": "application/x-safetensors"}
        cases = {
            "/layers/{layer}?max_points=200 (JSON)": (f"{path}/layers/0", {"max_points": "200"}, {}),
            "/layers/{layer}?max_points=200 (safetensors)": (f"{path}/layers/0", {"max_points": "200"}, binary),
            "/layers?step=150 (JSON)": (f"{path}/layers", {"step": "150"}, {}),
            "/layers?step=150 (safetensors)": (f"{path}/layers", {"step": "150"}, binary),
        }
        p50: dict[str, float] = {}
        sizes: dict[str, int] = {}
        with httpx.Client(timeout=60) as client:
            for name, (url, params, headers) in cases.items():
                times = []
                for _ in range(requests):
                    started = time.perf_counter()
                    response = client.get(url, params=params, headers=headers)
                    body = response.content
                    times.append(time.perf_counter() - started)
                    if response.status_code != 200:
                        raise RuntimeError(f"{name}: {response.status_code} {body[:300]!r}")
                p50[name] = median_ms(times)
                sizes[name] = len(body)
        out |= {"p50_ms": p50, "bytes": sizes}
    finally:
        stop(server)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of all modes (default 6)")
    parser.add_argument("--steps", type=int, default=20, help="steps per mode per round (default 20)")
    parser.add_argument("--recorded", type=int, default=500, help="recorded steps stored (default 500)")
    parser.add_argument("--requests", type=int, default=30, help="requests per route (default 30)")
    parser.add_argument("--skip-training", action="store_true", help="only pieces, storage and latency")
    parser.add_argument("--training-only", action="store_true", help="only section 1 (step time)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"modes of section 1, 'off' among them (default {','.join(MODES)})"
    )
    parser.add_argument("--history-channels", default="256,2048", help="layer widths of section 5 (default 256,2048)")
    parser.add_argument("--history-only", action="store_true", help="only section 5 (layer history at scale)")
    args = parser.parse_args()
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if "off" not in args.modes or not set(args.modes) <= set(MODES):
        parser.error(f"--modes: expected 'off' and any of {', '.join(MODES)}, got {','.join(args.modes)}")
    widths = [int(w) for w in args.history_channels.split(",") if w.strip()]
    if args.history_only:
        with tempfile.TemporaryDirectory(prefix="bench-layer-history-") as tmp:
            forms = {str(w): history_forms(Path(tmp), w, args.requests) for w in widths}
        print(json.dumps({"history_forms": forms}, indent=2))
        return 0

    from service.status import JobStatus
    from service.store import JobStore

    with tempfile.TemporaryDirectory(prefix="bench-layer-stats-") as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {"model": f"{LAYERS} SyncBatchNorm layers x {CHANNELS} channels, 2 workers"}
        train_store = JobStore(f"sqlite:///{work / 'train.db'}")
        train_job = uuid.uuid4().hex
        train_store.create_job(train_job, {"name": "bench-train"})
        train_store.transition(train_job, JobStatus.RUNNING)
        if not args.skip_training:
            run = run_training(args, work, train_store, train_job)
            # Mean per step: a report round's cost is spread over the k steps it serves (a median would skip it).
            means = {mode: 1000.0 * statistics.fmean(values) for mode, values in run["times"].items()}
            result["step_ms_mean"] = means
            result["step_ms_median"] = {mode: median_ms(values) for mode, values in run["times"].items()}
            result["ratio_vs_off"] = {mode: means[mode] / means["off"] for mode in args.modes}
            result["layers_vs_metrics"] = {
                k: means[f"layers/{k}"] / means[f"metrics/{k}"]
                for k in ("1", "10", "1-each")
                if f"layers/{k}" in means and f"metrics/{k}" in means
            }
            result["report_call_ms_median"] = {mode: median_ms(v) for mode, v in run["report_s"].items() if v}
            result["ingest_ms_per_layers_record"] = median_ms(run["ingest_s"]) if run["ingest_s"] else None
            result["training_wall_s"] = run["wall_s"]
        if args.training_only:
            print(json.dumps(result, indent=2))
            return 0
        result["pieces"] = piece_costs()

        # A real merged record (the controller's output) as the template of the stored history.
        from service.engine.reports import records_from_reports

        step = {
            "kind": "step",
            "step": 1,
            "epoch": 1,
            "train_loss": 1.0,
            "lr": 0.1,
            "samples_per_s": 1.0,
            "step_time_s": 0.1,
        }
        reports = [step | {"layers": recorder.packed_snapshot()} for recorder in recorded_ranks()]
        template = records_from_reports(reports)[1]

        data_dir = work / "serve"
        store = JobStore(f"sqlite:///{(data_dir / 'syncbn.db').resolve()}", stats_keep=256)
        job_id = uuid.uuid4().hex
        store.create_job(job_id, {"name": "bench-history"})
        store.transition(job_id, JobStatus.RUNNING)
        started = time.perf_counter()
        sizes = fill_store(store, job_id, template, args.recorded)
        fill_s = time.perf_counter() - started
        store.ingest(job_id, [{"seq": store.get_job(job_id).record_seq + 1, "kind": "end", "status": "succeeded"}])
        store.close()
        channels = LAYERS * CHANNELS
        end = sizes[args.recorded]
        result["storage"] = {
            "summary_bytes_per_layer_step": end["summaries_bytes"] / end["summaries_rows"],
            "vector_bytes_per_channel_per_kept_snapshot": end["vectors_bytes"]
            / (end["vectors_rows"] / LAYERS)
            / channels,
            "bytes_per_channel_per_kept_snapshot_with_summaries": (
                end["vectors_bytes"] / (end["vectors_rows"] / LAYERS) + end["summaries_bytes"] / args.recorded
            )
            / channels,
            "kept_snapshots_per_layer": {step: s["vectors_rows"] // LAYERS for step, s in sizes.items()},
            "layer_payload_bytes": {step: s["summaries_bytes"] + s["vectors_bytes"] for step, s in sizes.items()},
            "sqlite_file_bytes_at_end": (data_dir / "syncbn.db").stat().st_size,
            "ingest_ms_per_recorded_step": 1000.0 * fill_s / args.recorded,
        }
        result["latency"] = measure_latency(data_dir, job_id, args.requests)
        result["history_forms"] = {str(w): history_forms(work, w, args.requests) for w in widths}
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
