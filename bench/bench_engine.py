"""The engine against bare loops: steady-state speed, and where its start-up and wrap-up time goes.

Three things run alternately, round after round, in one invocation (so machine load hits them alike):

- `bare`: a bare DDP loop, two processes started by `torch.multiprocessing` with a gloo process group: the same
  model (small ResNet with `syncbn.SyncBatchNorm`), data (digits, the engine's split and per-rank batches), batch,
  optimizer, learning-rate schedule and torch threads (1 per rank) as the job, and a validation pass per epoch;
  nothing else (no reports, no per-step loss all-reduce, no checkpoints);
- `engine`: the same job through `syncbn train SPEC --json` (embedded Ray, Ray Train, the record log, the final
  model in the run storage), with the run's timeline (`service.engine.timeline`) from its `summary.json`;
- `floor`: bare Ray Train, a script that starts Ray and runs the bare loop as a `TorchTrainer`'s train function
  (2 workers, gloo, the jobs' controller polling interval), rank 0 reporting once at the end with the model as a
  checkpoint: what Ray Train costs by itself on this machine, at start-up, in steady state and at the end.

Steady state: samples/s of epochs 2..N (epoch 1 is the warm-up), `train` = epoch start to its last step, `epoch` =
epoch start to the next one's (validation, and for the engine its reports and checkpoint, included); the ratios
are of the medians over rounds.

Start-up and wrap-up: from launching the command (or `POST /v1/jobs` on a warm `syncbn serve`) to rank 0's first
optimizer step, and from its last step to the end (the CLI: `end` record read, Ray stopped; the service: the job
stored as succeeded), split into the timeline's parts, plus Ray Train's own split (placement group, worker actors,
train context, process group) read from its controller log under /tmp/ray.

    .venv/bin/python bench/bench_engine.py                       # 3 rounds, then 3 jobs on a warm service
    .venv/bin/python bench/bench_engine.py --rounds 1 --service-jobs 0
    .venv/bin/python bench/bench_engine.py --json bench/results/engine.json
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The job: bench/bench_digits.py's, shorter.
SPEC: dict[str, Any] = {
    "name": "bench-engine",
    "model": "small_resnet",
    "dataset": {"kind": "digits", "val_fraction": 0.2},
    "workers": 2,
    "cpus_per_worker": 1,
    "epochs": 8,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "lr_schedule": {"name": "cosine", "warmup_epochs": 1},
    "sync_bn": True,
    "seed": 0,
    "stats_every": 20,
    "checkpoint_every": 5,
}
WARMUP_EPOCHS = 1


def uptime() -> str:
    with contextlib.suppress(OSError):
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "load average unknown"


def _env() -> dict[str, str]:
    """This environment without a cluster address or service settings (the runs start their own Ray)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("SYNCBN_")}


# ---------------------------------------------------------------------------------------------- CPU accounting

_TICK = os.sysconf("SC_CLK_TCK")


class TreeCPU:
    """Samples, every 0.5 s, the CPU seconds (user + system) used so far by each process under `root`.

    On a shared machine wall-clock speed follows the load; the CPU a run spends per sample does not (much), so it
    tells whether the engine does more work per step, or only waits more.
    """

    def __init__(self, root: int, exclude_root: bool = False) -> None:
        self.root, self.exclude_root = root, exclude_root
        self.samples: list[tuple[float, dict[int, float]]] = []
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._tree()))
            self._stop.wait(0.5)

    def _tree(self) -> dict[int, float]:
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
                parents[int(name)] = int(fields[1])
                cpu[int(name)] = (int(fields[11]) + int(fields[12])) / _TICK
        tree, frontier = {self.root}, [self.root]
        children: dict[int, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in tree:
                    tree.add(child)
                    frontier.append(child)
        if self.exclude_root:
            tree.discard(self.root)
        for pid in tree:
            name = self.names.get(pid, "")
            if not name or "IDLE" in name or name.startswith("/"):  # Ray renames a worker once it runs an actor
                with contextlib.suppress(OSError):
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    self.names[pid] = " ".join(part.decode(errors="replace") for part in raw[:3])[:70]
        return {pid: cpu[pid] for pid in tree if pid in cpu}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds in [start, end]: of the two busiest processes (the ranks) and of all the others."""
        first = min(self.samples, key=lambda s: abs(s[0] - start))
        last = min(self.samples, key=lambda s: abs(s[0] - end))
        used = sorted(((cpu - first[1].get(pid, 0.0), pid) for pid, cpu in last[1].items()), reverse=True)
        others = {self.names.get(pid, str(pid)): seconds for seconds, pid in used[2:8] if seconds > 0}
        return {
            "seconds": last[0] - first[0],
            "ranks": sum(seconds for seconds, _ in used[:2]),
            "others": sum(seconds for seconds, _ in used[2:]),
            "top_others": others,
        }


def steady_cpu(timeline: dict[str, Any], cpu: TreeCPU) -> dict[str, float]:
    """CPU milliseconds per training sample over the steady epochs: the ranks', and every other process's."""
    epochs = [e for e in timeline["epochs"] if e[0] > WARMUP_EPOCHS]
    window = cpu.window(epochs[0][1], epochs[-1][3])
    samples = len(epochs) * timeline["samples_per_epoch"]
    return {
        "ranks_ms": 1000 * window["ranks"] / samples,
        "others_ms": 1000 * window["others"] / samples,
        "top_others_ms": {name: 1000 * seconds / samples for name, seconds in window["top_others"].items()},
    }


# ---------------------------------------------------------------------------------------------- the bare DDP loop


def _bare_train(spec_json: dict[str, Any], rank: int, world: int, loop_started: float) -> dict[str, Any]:
    """The bare training loop on one rank (the gloo process group exists); returns rank's timeline and model."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    import syncbn
    from service.engine.data import prepare_data
    from service.engine.data.rank_batches import MemoryBatches
    from service.engine.model_registry import build_model
    from service.engine.optimization import LearningRate, build_optimizer, set_lr
    from service.engine.train_loop import _buffer_sync
    from service.spec import JobSpec

    spec = JobSpec.model_validate(spec_json)
    torch.set_num_threads(spec.torch_threads())
    data = prepare_data(spec.dataset, spec.seed)
    info, splits = data.info, data.splits
    assert splits is not None
    torch.manual_seed(spec.seed)
    model = syncbn.convert_sync_batchnorm(build_model(spec.model, info.sample_shape, info.num_classes))
    ddp = DistributedDataParallel(model, **_buffer_sync(False))
    batches = MemoryBatches(splits, spec.batch_size, spec.steps_per_epoch, spec.seed, rank, world, False)
    optimizer = build_optimizer(spec.optimizer, model.parameters())
    lr = LearningRate(spec.optimizer.lr, spec.lr_schedule, batches.steps_per_epoch, spec.epochs)
    model_ready = time.time()
    step, first_step, epochs = 0, None, []
    for epoch in range(1, spec.epochs + 1):
        started = time.time()
        ddp.train()
        for x, y in batches.train(epoch):
            set_lr(optimizer, lr.at(step))
            step += 1
            loss = F.cross_entropy(ddp(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if first_step is None:
                first_step = time.time()
        trained = time.time()
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for x, y in batches.validation():
                logits = model(x)
                sums[0] += float(F.cross_entropy(logits, y, reduction="sum"))
                sums[1] += y.numel()
                sums[2] += float((logits.argmax(1) == y).sum())
        dist.all_reduce(sums)
        epochs.append([epoch, started, trained, time.time()])
    return {
        "loop_started": loop_started,
        "model_ready": model_ready,
        "first_step": first_step,
        "last_step": epochs[-1][2],
        "epochs": epochs,
        "samples_per_epoch": batches.steps_per_epoch * spec.batch_size * world,
        "val_acc": float(sums[2] / sums[1]),
        "model": syncbn.revert_sync_batchnorm(model).state_dict(),
    }


def _bare_rank(rank: int, world: int, port: int, spec_json: dict[str, Any], out: str) -> None:
    """One rank of the bare DDP loop (a `torch.multiprocessing` process); rank 0 writes its timeline to `out`."""
    import torch.distributed as dist

    started = time.time()
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    timeline = _bare_train(spec_json, rank, world, started)
    dist.destroy_process_group()
    if rank == 0:
        timeline.pop("model")
        Path(out).write_text(json.dumps(timeline))


def run_bare(spec: dict[str, Any]) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench-engine-bare-") as tmp:
        out = str(Path(tmp) / "timeline.json")
        launched = time.time()
        cpu = TreeCPU(os.getpid(), exclude_root=True)
        try:
            mp.spawn(_bare_rank, args=(2, _free_port(), spec, out), nprocs=2, join=True)
        finally:
            cpu.stop()
        timeline = json.loads(Path(out).read_text())
    timeline["command_started"] = launched
    timeline["ended"] = time.time()
    timeline["cpu"] = steady_cpu(timeline, cpu)
    return timeline


# ---------------------------------------------------------------------------------------------- the engine (CLI)


def run_engine(spec: dict[str, Any]) -> dict[str, Any]:
    syncbn = Path(sys.executable).with_name("syncbn")
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        launched = time.time()
        command = [str(syncbn), "train", str(spec_path), "--output", str(Path(tmp) / "out"), "--json"]
        returncode, output = _run_measured(command, cpu_holder := [])
        exited = time.time()
        if returncode != 0:
            raise RuntimeError(f"syncbn train exited with {returncode}:\n{output}")
        summary = json.loads((Path(tmp) / "out" / "summary.json").read_text())
        info = _first_info(Path(tmp) / "out" / "metrics.jsonl")
    timeline = dict(summary["timeline"])
    timeline.update(launched_command=launched, exited=exited, val_acc=summary["final_val_acc"])
    timeline["samples_per_epoch"] = info["steps_per_epoch"] * spec["batch_size"] * spec["workers"]
    timeline["ray"] = ray_train_split(f"syncbn-{summary['job_id']}")
    timeline["cpu"] = steady_cpu(timeline, cpu_holder[0])
    return timeline


def _run_measured(command: list[str], cpu_holder: list[TreeCPU]) -> tuple[int, str]:
    """Run a command (its output to a temporary file), sampling the CPU of its process tree meanwhile."""
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, text=True)
        cpu = TreeCPU(process.pid)
        cpu_holder.append(cpu)
        try:
            returncode = process.wait()
        finally:
            cpu.stop()
        output.seek(0)
        return returncode, output.read()[-5000:]


def _first_info(metrics: Path) -> dict[str, Any]:
    """steps_per_epoch from the run's first log line ("... 22 steps per epoch ...")."""
    for line in metrics.read_text().splitlines():
        match = re.search(r"(\d+) steps per epoch", json.loads(line).get("message", ""))
        if match:
            return {"steps_per_epoch": int(match.group(1))}
    raise RuntimeError(f"no 'steps per epoch' line in {metrics}")


# ---------------------------------------------------------------------------------------------- bare Ray Train


def _floor_loop(config: dict[str, Any]) -> None:
    """The bare loop as a Ray Train function; rank 0 reports its timeline with the model as a checkpoint."""
    import ray.train
    import torch

    loop_started = time.time()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    timeline = _bare_train(config["spec"], rank, context.get_world_size(), loop_started)
    model = timeline.pop("model")
    if rank == 0:
        with tempfile.TemporaryDirectory() as directory:
            torch.save(model, Path(directory) / "model.pt")
            ray.train.report({"timeline": timeline}, checkpoint=ray.train.Checkpoint.from_directory(directory))
    else:
        ray.train.report({})


def floor_child(out: Path, storage: Path, spec: dict[str, Any]) -> int:
    """Runs in its own process: start Ray, run the bare loop in a TorchTrainer, write the timeline to `out`."""
    command_started = time.time()
    from service.engine.runner import TRAIN_ENV_VARS

    os.environ.update(TRAIN_ENV_VARS)  # the jobs' controller polling, propagated by Ray Train to its actors
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
    ray_ready = time.time()
    name = f"bench-floor-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        _floor_loop,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    fit_started = time.time()
    result = trainer.fit()
    fit_returned = time.time()
    ray.shutdown()
    timeline = {
        "command_started": command_started,
        "ray_ready": ray_ready,
        "fit_started": fit_started,
        **result.metrics["timeline"],
        "fit_returned": fit_returned,
        "ray_stopped": time.time(),
        "run_name": name,
    }
    out.write_text(json.dumps(timeline))
    return 0


def run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-engine-floor-") as tmp:
        out = Path(tmp) / "timeline.json"
        launched = time.time()
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--floor-child",
            str(out),
            str(Path(tmp) / "ray"),
            json.dumps(spec),
        ]
        returncode, output = _run_measured(command, cpu_holder := [])
        if returncode != 0:
            raise RuntimeError(f"the bare Ray Train run exited with {returncode}:\n{output}")
        timeline = json.loads(out.read_text())
        timeline["cpu"] = steady_cpu(timeline, cpu_holder[0])
    timeline.update(launched_command=launched, exited=time.time())
    timeline["ray"] = ray_train_split(timeline["run_name"])
    return timeline


# ---------------------------------------------------------------------------------------------- Ray Train's own log

_RAY_PARTS = {
    "placement group": r"Placement group ready in ([0-9.]+)s",
    "worker actors": r"worker actors created in ([0-9.]+)s",
    "train context": r"Train context initialized on workers in ([0-9.]+)s",
    "process group": r"BackendSetupCallback: ([0-9.]+)s",
    "train function launch": r"Train function launched on workers in ([0-9.]+)s",
    "worker group total": r"Worker group startup completed in ([0-9.]+)s total",
}


def ray_train_split(run_name: str) -> dict[str, float]:
    """Ray Train's own timing of a run's worker-group start (its controller's debug log under /tmp/ray)."""
    split: dict[str, float] = {}
    for path in glob.glob("/tmp/ray/session_*/logs/train/ray-train-sys-controller-*.log"):
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as lines:
            for line in lines:
                if run_name not in line:
                    continue
                message = json.loads(line).get("message", "")
                if "Requesting resources" in message:
                    split.setdefault("controller_init_at", json.loads(line)["timestamp_ns"] / 1e9)
                for part, pattern in _RAY_PARTS.items():
                    match = re.search(pattern, message)
                    if match and part not in split:
                        split[part] = float(match.group(1))
    return split


# ---------------------------------------------------------------------------------------------- a warm service


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_service(spec: dict[str, Any], jobs: int) -> list[dict[str, Any]]:
    """Start `syncbn serve`, wait until it is ready, then submit `jobs` jobs one after the other."""
    import httpx

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-engine-serve-") as tmp:
        port = _free_port()
        command = [
            sys.executable,
            "-c",
            "from service.cli import main; raise SystemExit(main())",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            tmp,
            "--log-level",
            "warning",
        ]
        log = (Path(tmp) / "serve.log").open("wb")
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                _wait(lambda: client.get("/readyz").status_code == 200, 300, "the service to be ready")
                samples = _samples_per_epoch(spec)
                for _ in range(jobs):
                    cpu = TreeCPU(server.pid)
                    try:
                        results.append(_service_job(client, spec))
                    finally:
                        cpu.stop()
                    results[-1]["samples_per_epoch"] = samples
                    results[-1]["cpu"] = steady_cpu(results[-1], cpu)
                    print(f"  service job: {_service_line(results[-1])}", flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    return results


def _samples_per_epoch(spec: dict[str, Any]) -> int:
    """Training samples per epoch over all ranks (the engine's own batching of the job's data)."""
    from service.engine.data import prepare_data
    from service.engine.data.rank_batches import MemoryBatches
    from service.spec import JobSpec

    job = JobSpec.model_validate(spec)
    splits = prepare_data(job.dataset, job.seed).splits
    assert splits is not None
    steps = MemoryBatches(splits, job.batch_size, job.steps_per_epoch, job.seed, 0, job.workers, False).steps_per_epoch
    return steps * job.batch_size * job.workers


def _wait(predicate: Any, timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def _service_job(client: Any, spec: dict[str, Any]) -> dict[str, Any]:
    posted = time.time()
    response = client.post("/v1/jobs", json=spec)
    answered = time.time()
    response.raise_for_status()
    job_id = response.json()["id"]
    # Asked once a second (the times come from the job's timeline and status event, not from this loop): a
    # faster loop would be the service's largest load and slow the job it measures.
    terminal = ("succeeded", "failed", "cancelled")
    _wait(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] in terminal, 900, "the job's end", every=1.0)
    status = None
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as events:
        kind = None
        for line in events.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "status":
                data = json.loads(line.split(":", 1)[1])
                if data.get("status") in ("succeeded", "failed", "cancelled"):
                    status = data
    if status is None or status["status"] != "succeeded":
        raise RuntimeError(f"service job {job_id} did not succeed: {status}")
    timeline = dict(status["timeline"])
    timeline.update(posted=posted, answered=answered, stored=datetime.fromisoformat(status["at"]).timestamp())
    return timeline


# ---------------------------------------------------------------------------------------------- figures


def steady(timeline: dict[str, Any]) -> dict[str, float]:
    """Median samples/s of the steady epochs: training only, and epoch to epoch."""
    epochs = [e for e in timeline["epochs"] if e[0] > WARMUP_EPOCHS]
    samples = timeline["samples_per_epoch"]
    train = [samples / (e[2] - e[1]) for e in epochs]
    whole = [samples / (e[3] - e[1]) for e in epochs]
    return {"train": statistics.median(train), "epoch": statistics.median(whole)}


def _span(timeline: dict[str, Any], start: str, end: str) -> float | None:
    if timeline.get(start) is None or timeline.get(end) is None:
        return None
    return float(timeline[end]) - float(timeline[start])


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _service_line(t: dict[str, Any]) -> str:
    return (
        f"POST to first step {_s(_span(t, 'posted', 'first_step'))} s (answered {_s(_span(t, 'posted', 'answered'))}, "
        f"to launch {_s(_span(t, 'posted', 'launched'))}); last step to succeeded "
        f"{_s(_span(t, 'last_step', 'stored'))} s; steady {steady(t)['train']:.1f} samples/s, CPU per sample "
        f"{t['cpu']['ranks_ms']:.3f} ms ranks + {t['cpu']['others_ms']:.3f} ms others "
        f"({', '.join(f'{n} {ms:.3f}' for n, ms in list(t['cpu']['top_others_ms'].items())[:3])})"
    )


Rows = tuple[tuple[str, str, str], ...]
#: (label, from mark, to mark): the start-up and wrap-up parts shown for each kind of run.
_ENGINE_STARTUP: Rows = (
    ("driver actor start", "launched", "driver_started"),
    ("data", "driver_started", "data_ready"),
    ("trainer + controller start", "data_ready", "controller_started"),
    ("placement, worker start, process group", "controller_started", "workers_ready"),
    ("train function start", "workers_ready", "loop_started"),
    ("model build", "loop_started", "model_ready"),
    ("first step", "model_ready", "first_step"),
)
_ENGINE_WRAPUP: Rows = (
    ("last validation + epoch report", "last_step", "last_epoch_ended"),
    ("final checkpoint upload + report", "last_epoch_ended", "final_reported"),
    ("worker group + controller shutdown", "final_reported", "fit_returned"),
    ("end record", "fit_returned", "ended"),
)
STARTUP_ROWS: dict[str, Rows] = {
    "syncbn train": (
        ("process start, imports", "launched_command", "command_started"),
        ("Ray start (ray.init)", "command_started", "ray_ready"),
        ("launch", "ray_ready", "launched"),
        *_ENGINE_STARTUP,
    ),
    "warm service": (
        ("POST answered", "posted", "answered"),
        ("queued to launched", "posted", "launched"),
        *_ENGINE_STARTUP,
    ),
    "bare Ray Train (floor)": (
        ("process start, imports", "launched_command", "command_started"),
        ("Ray start (ray.init)", "command_started", "ray_ready"),
        ("trainer + controller start", "fit_started", "controller_init"),
        ("placement, worker start, process group", "controller_init", "loop_started"),
        ("data, model build", "loop_started", "model_ready"),
        ("first step", "model_ready", "first_step"),
    ),
    "bare DDP": (
        ("process group", "command_started", "loop_started"),
        ("data, model build", "loop_started", "model_ready"),
        ("first step", "model_ready", "first_step"),
    ),
}
WRAPUP_ROWS: dict[str, Rows] = {
    "syncbn train": (
        *_ENGINE_WRAPUP,
        ("end record read", "ended", "end_seen"),
        ("actors removed, Ray stopped", "end_seen", "ray_stopped"),
    ),
    "warm service": (*_ENGINE_WRAPUP, ("stored as succeeded (drain)", "ended", "stored")),
    "bare Ray Train (floor)": (
        ("last validation", "last_step", "last_epoch_ended"),
        ("final checkpoint upload + report + shutdown", "last_epoch_ended", "fit_returned"),
        ("Ray stopped", "fit_returned", "ray_stopped"),
    ),
}
#: (start, first step, end) marks per kind of run.
SPANS = {
    "syncbn train": ("launched_command", "first_step", "ray_stopped"),
    "warm service": ("posted", "first_step", "stored"),
    "bare Ray Train (floor)": ("launched_command", "first_step", "ray_stopped"),
    "bare DDP": ("command_started", "first_step", "ended"),
}


def _with_derived(t: dict[str, Any]) -> dict[str, Any]:
    t = dict(t)
    epochs = t.get("epochs") or []
    if epochs:
        t["last_epoch_ended"] = epochs[-1][3]
    if "controller_init_at" in (t.get("ray") or {}):
        t["controller_init"] = t["ray"]["controller_init_at"]
    return t


def _median_rows(runs: list[dict[str, Any]], rows: Rows) -> list[tuple[str, float]]:
    out = []
    for label, start, end in rows:
        values = [v for v in (_span(_with_derived(r), start, end) for r in runs) if v is not None]
        if values:
            out.append((label, statistics.median(values)))
    return out


def report(results: dict[str, Any]) -> None:
    bare, engine, floor = results["bare"], results["engine"], results["floor"]
    print(f"\n== steady state (median over {len(bare)} rounds of epochs {WARMUP_EPOCHS + 1}..N, samples/s)")
    for part in ("train", "epoch"):
        b = [steady(t)[part] for t in bare]
        e = [steady(t)[part] for t in engine]
        f = [steady(t)[part] for t in floor]
        per_round = " ".join(f"{ei / bi:.3f}" for ei, bi in zip(e, b, strict=True))
        print(
            f"  {part:5s}: bare DDP {statistics.median(b):7.1f}, bare Ray Train {statistics.median(f):7.1f}, "
            f"engine {statistics.median(e):7.1f}; engine/bare {statistics.median(e) / statistics.median(b):.3f} "
            f"(per round: {per_round}), Ray Train/bare {statistics.median(f) / statistics.median(b):.3f}, "
            f"engine/Ray Train {statistics.median(e) / statistics.median(f):.3f}"
        )
    print("  CPU per training sample (ms, steady epochs; medians): ranks + every other process of the run")
    service = results["service"]
    for name, runs in (("bare DDP", bare), ("bare Ray Train", floor), ("engine", engine), ("warm service", service)):
        if not runs:
            continue
        ranks = statistics.median(r["cpu"]["ranks_ms"] for r in runs)
        others = statistics.median(r["cpu"]["others_ms"] for r in runs)
        print(f"    {name:15s} {ranks:.3f} + {others:.3f} = {ranks + others:.3f}")
    kinds = {
        "syncbn train": engine,
        "warm service": results["service"],
        "bare Ray Train (floor)": results["floor"],
        "bare DDP": bare,
    }
    print("\n== start-up, median seconds (to rank 0's first optimizer step)")
    for name, runs in kinds.items():
        if not runs:
            continue
        start, first, _ = SPANS[name]
        print(f"  {name}: {_median_span(runs, start, first):.2f} s")
        for label, value in _median_rows(runs, STARTUP_ROWS[name]):
            print(f"      {label:44s} {value:6.2f}")
        splits = [r["ray"] for r in runs if r.get("ray")]
        if splits:
            inner = ", ".join(
                f"{part} {statistics.median(s[part] for s in splits if part in s):.2f}"
                for part in _RAY_PARTS
                if any(part in s for s in splits)
            )
            print(f"      (Ray Train's own log: {inner})")
    print("\n== wrap-up, median seconds (from rank 0's last optimizer step)")
    for name, runs in kinds.items():
        if not runs or name not in WRAPUP_ROWS:
            continue
        _, _, end = SPANS[name]
        print(f"  {name}: {_median_span(runs, 'last_step', end):.2f} s")
        for label, value in _median_rows(runs, WRAPUP_ROWS[name]):
            print(f"      {label:44s} {value:6.2f}")
    print(
        f"\n  command wall time, median: syncbn train {_median_span(engine, 'launched_command', 'exited'):.1f} s, "
        f"bare Ray Train {_median_span(results['floor'], 'launched_command', 'exited'):.1f} s"
    )


def _median_span(runs: list[dict[str, Any]], start: str, end: str) -> float:
    values = [v for v in (_span(_with_derived(r), start, end) for r in runs) if v is not None]
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=SPEC["epochs"])
    parser.add_argument("--service-jobs", type=int, default=3, help="jobs submitted to a warm service (0: none)")
    parser.add_argument("--json", type=Path, default=None, help="also write every timeline to this file")
    parser.add_argument("--floor-child", nargs=3, metavar=("OUT", "STORAGE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_child:
        return floor_child(Path(args.floor_child[0]), Path(args.floor_child[1]), json.loads(args.floor_child[2]))
    spec = {**SPEC, "epochs": args.epochs}
    print(f"bench_engine: {args.rounds} rounds, {spec['epochs']} epochs, {uptime()}", flush=True)
    results: dict[str, Any] = {"bare": [], "engine": [], "floor": [], "service": []}
    runners = {"bare": lambda: run_bare(spec), "engine": lambda: run_engine(spec), "floor": lambda: run_floor(spec)}
    for round_index in range(args.rounds):
        order = ["bare", "engine", "floor"] if round_index % 2 == 0 else ["floor", "engine", "bare"]
        for kind in order:
            timeline = runners[kind]()
            results[kind].append(timeline)
            figures, cpu = steady(timeline), timeline["cpu"]
            line = (
                f"train {figures['train']:.1f} samples/s, epoch {figures['epoch']:.1f} samples/s, CPU per sample "
                f"{cpu['ranks_ms']:.3f} ms ranks + {cpu['others_ms']:.3f} ms others; "
            )
            busiest = ", ".join(f"{name} {ms:.3f}" for name, ms in list(cpu["top_others_ms"].items())[:4])
            start = "command_started" if kind == "bare" else "launched_command"
            print(
                f"round {round_index + 1} {kind:6s}: {line}start to first step "
                f"{_s(_span(timeline, start, 'first_step'))} s, "
                f"last step to exit {_s(_span(timeline, 'last_step', 'exited' if kind != 'bare' else 'ended'))} s "
                f"({uptime()})" + (f"\n    others' CPU, ms per sample: {busiest}" if busiest else ""),
                flush=True,
            )
    if args.service_jobs:
        service_spec = {**spec, "epochs": 4, "name": "bench-engine-service"}
        results["service"] = run_service(service_spec, args.service_jobs)
    report(results)
    print(f"\n{uptime()}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
