"""`syncbn train SPEC`: run one job from a spec file, show its progress, save its metrics and model.

Ray: an embedded local Ray by default; `--address` or `RAY_ADDRESS` joins an existing cluster instead. The embedded
Ray gets at least as many logical CPUs as the job reserves (`workers x cpus_per_worker`), so a 4-worker job runs
on a 2-core laptop (oversubscribed, and said so) rather than waiting forever.

Output folder (default `runs/<job id>`):
  - `metrics.jsonl`: every record of the run (step, epoch, layers, log, end), one JSON object per line (a layer
    record's float32 per-channel vectors are written back into its layers as lists: `mean`, `var`, ...);
  - `model.pt`: the final model, a plain `nn.BatchNorm*d` state dict (copied from the run storage, where Ray Train
    keeps the run's checkpoints: `--storage-uri`, default `<output>/ray`);
  - `spec.json`: the validated spec; `summary.json`: the end record plus the wall time, and the run's `timeline`
    (`service.engine.timeline`) with this command's own marks: `command_started`, `ray_ready` (Ray is up),
    `end_seen` (the end record was read) and `ray_stopped` (the run's actors are gone and, when embedded, Ray).

Exit code: 0 succeeded, 1 failed (including diverged), 2 bad spec or arguments, 130 cancelled (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.data_location import check_dataset_locations
from service.spec import JobSpec, load_spec_file

__all__ = ["add_train_arguments", "run_train"]

#: Seconds between two reads of the run's new records. Each read is a call to the record log, and on a machine
#: whose cores the ranks fill, whatever this process does comes out of training (bench/bench_engine.py).
_POLL_S = 0.5
#: Seconds without a new record after which the command also asks whether the driver is still there.
_DONE_CHECK_S = 2.0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `syncbn train`."""
    parser.add_argument("spec", type=Path, help="Job spec file (.json, .yaml or .yml).")
    parser.add_argument("--output", type=Path, default=None, help="Output folder (default: runs/<job id>).")
    parser.add_argument("--json", action="store_true", help="No progress bar; print the summary as one JSON object.")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="Folder that dataset paths (npz, image_folder, parquet) are relative to and confined to "
        "[env SYNCBN_DATA_ROOT; the deprecated SYNCBN_NPZ_ROOT still works].",
    )
    parser.add_argument(
        "--storage-uri",
        default=os.environ.get("SYNCBN_STORAGE_URI"),
        help="Where Ray Train keeps checkpoints and the final model: a folder every node reaches, or s3:// / gs:// "
        "(default: <output>/ray) [env SYNCBN_STORAGE_URI].",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join instead of starting an embedded one [env RAY_ADDRESS].",
    )
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="Logical CPUs of the embedded Ray (default: enough for the job)."
    )


def run_train(args: argparse.Namespace) -> int:
    """Run the job of `args.spec` to its end; returns the exit code."""
    started = time.perf_counter()
    command_started = time.time()
    try:
        spec = load_spec_file(args.spec)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"syncbn train: {args.spec}: {exc}\n")
        return 2
    from service.engine.model_registry import check_model_name
    from service.engine.storage import RunStorage
    from service.engine.tracking import check_tracking

    data_root = args.data_root if args.data_root is not None else _data_root_from_env()
    schemes_env = os.environ.get("SYNCBN_ALLOWED_URI_SCHEMES", "")
    allowed_schemes = [s.strip().lower() for s in schemes_env.split(",") if s.strip()]
    tracking_uris = [u.strip() for u in os.environ.get("SYNCBN_TRACKING_URIS", "").split(",") if u.strip()]
    try:
        check_model_name(spec.model, spec.dataset.sample_shape(), spec.dataset.kind)
        check_dataset_locations(spec.dataset, data_root, allowed_schemes)
        check_tracking(spec.tracking, tracking_uris)
    except ValueError as exc:
        sys.stderr.write(f"syncbn train: {args.spec}: {exc}\n")
        return 2
    job_id = f"train-{uuid.uuid4().hex[:10]}"
    output = (args.output or Path("runs") / job_id).resolve()
    output.mkdir(parents=True, exist_ok=True)
    try:
        storage = RunStorage(args.storage_uri or str(output / "ray"))
    except ValueError as exc:
        sys.stderr.write(f"syncbn train: {exc}\n")
        return 2
    (output / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")

    import ray

    from service.engine.cluster import ensure_ray
    from service.engine.runner import launch_run

    embedded = not args.address and not ray.is_initialized()
    num_cpus = args.num_cpus
    if embedded and num_cpus is None:
        # (Streamed data sets count one more CPU, for the Ray Data tasks that read and decode beside the workers.)
        num_cpus = max(os.cpu_count() or 1, math.ceil(spec.resources()["CPU"]))
    if embedded and num_cpus is not None and num_cpus > (os.cpu_count() or 1):
        sys.stderr.write(
            f"syncbn train: the job reserves {spec.resources()['CPU']:g} CPUs and this machine has "
            f"{os.cpu_count()} cores: Ray counts {num_cpus} logical CPUs (workers share cores).\n"
        )
    ensure_ray(args.address, num_cpus, log_to_driver=False)
    ray_ready = time.time()
    try:
        run = launch_run(
            spec, job_id, output, data_root=data_root, storage_uri=storage.uri, allowed_schemes=allowed_schemes
        )
        end = _follow(run, spec, output / "metrics.jsonl", quiet=args.json)
        end_seen = time.time()
        run.close()
    finally:
        if embedded:
            ray.shutdown()
    summary = {"job_id": job_id, **end, "wall_time_s": time.perf_counter() - started, "output_dir": str(output)}
    # The run's timeline (service.engine.timeline) with this command's own marks around it.
    summary["timeline"] = {
        "command_started": command_started,
        "ray_ready": ray_ready,
        **(end.get("timeline") or {}),
        "end_seen": end_seen,
        "ray_stopped": time.time(),
    }
    stored = storage.find_model(job_id, end.get("model_path"))
    if stored is not None:
        # The run storage may be a bucket: the output folder gets its own copy, next to the metrics.
        summary["model_uri"] = end["model_path"]
        summary["model_path"] = str(storage.copy_to(stored, output / "model.pt"))
    summary.pop("kind", None)
    summary.pop("seq", None)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        _print_summary(summary, spec)
    return {"succeeded": 0, "cancelled": 130}.get(end["status"], 1)


def _data_root_from_env() -> Path | None:
    """`SYNCBN_DATA_ROOT`, or its deprecated name `SYNCBN_NPZ_ROOT` (with a warning)."""
    if os.environ.get("SYNCBN_DATA_ROOT"):
        return Path(os.environ["SYNCBN_DATA_ROOT"])
    if os.environ.get("SYNCBN_NPZ_ROOT"):
        message = "SYNCBN_NPZ_ROOT is deprecated: set SYNCBN_DATA_ROOT (or pass --data-root) instead."
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        sys.stderr.write(f"syncbn train: {message}\n")
        return Path(os.environ["SYNCBN_NPZ_ROOT"])
    return None


def _follow(run: Any, spec: JobSpec, metrics_path: Path, quiet: bool) -> dict[str, Any]:
    """Write every record to `metrics_path` and drive the progress bar until the `end` record; Ctrl-C cancels."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # Imported now, while the run starts, rather than at its first layers record: it loads the store package
    # (SQLAlchemy), 0.6 s of CPU that would otherwise be taken from the training ranks.
    from service.store.layer_codec import decode_vectors

    console = Console(stderr=quiet, quiet=quiet)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("val acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        auto_refresh=not quiet,  # --json shows no bar: no refresh thread waking 10 times a second
    )
    task = progress.add_task("starting workers", total=None, loss="-", acc="-")
    seq = 0
    end: dict[str, Any] | None = None
    checked = time.monotonic()
    with metrics_path.open("a", encoding="utf-8") as sink, progress:
        while end is None:
            try:
                records = run.poll(seq)
                for record in records:
                    seq = record["seq"]
                    sink.write(json.dumps(_jsonable(record, decode_vectors)) + "\n")
                    end = _show(record, progress, task, run, spec) or end
                sink.flush()
                if records:
                    checked = time.monotonic()
                elif end is None:
                    # The end record arrives by poll; done() is for a driver that vanished without writing it.
                    if time.monotonic() - checked >= _DONE_CHECK_S:
                        checked = time.monotonic()
                        if run.done():
                            continue  # the end record is there now (written for the vanished driver)
                    time.sleep(_POLL_S)
            except KeyboardInterrupt:
                console.print("[yellow]interrupted: cancelling the run")
                run.cancel()
    return end


def _jsonable(
    record: dict[str, Any], decode_vectors: Callable[[bytes], dict[str, list[float | None] | None]]
) -> dict[str, Any]:
    """The record as JSON-ready data: a `layers` record's float32 vector blocks become per-layer lists
    (`decode_vectors`: `service.store.layer_codec.decode_vectors`)."""
    vectors = record.get("vectors")
    if not isinstance(vectors, dict):
        return record
    layers = {
        name: {**stats, **decode_vectors(vectors[name])} if name in vectors else stats
        for name, stats in record["layers"].items()
    }
    return {**{k: v for k, v in record.items() if k != "vectors"}, "layers": layers}


def _show(record: dict[str, Any], progress: Any, task: Any, run: Any, spec: JobSpec) -> dict[str, Any] | None:
    """Reflect one record in the progress bar; returns the record when it is the `end` record."""
    kind = record["kind"]
    if kind == "step":
        if progress.tasks[task].total is None:
            total = run.info().get("total_steps")
            progress.update(task, total=total)
        progress.update(
            task,
            completed=record["step"],
            description=f"epoch {record['epoch']}/{spec.epochs}",
            loss=f"{record['train_loss']:.4f}",
        )
    elif kind == "epoch":
        progress.update(
            task,
            completed=record["step"],
            description=f"epoch {record['epoch']}/{spec.epochs}",
            acc=f"{record['val_acc']:.4f}"
            + ("" if record.get("val_acc_precise") is None else f" / {record['val_acc_precise']:.4f}"),
        )
    elif kind == "log" and record["level"] != "debug":  # debug: checkpoint paths, kept in metrics.jsonl
        style = {"error": "red", "warning": "yellow"}.get(record["level"], "dim")
        progress.console.print(f"[{style}]{record['message']}", markup=True, highlight=False)
    elif kind == "end":
        return record
    return None


def _print_summary(summary: dict[str, Any], spec: JobSpec) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    table = Table(title=f"syncbn train: {spec.name or summary['job_id']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    status_style = {"succeeded": "green", "cancelled": "yellow"}.get(summary["status"], "red")
    table.add_row("status", f"[{status_style}]{summary['status']}")
    table.add_row("verdict", str(summary.get("verdict")))
    if summary.get("error"):
        table.add_row("error", str(summary["error"]))
    table.add_row(
        "model / data", f"{spec.model} on {spec.dataset.kind}, {spec.workers} workers, sync_bn={spec.sync_bn}"
    )
    table.add_row(
        "precision",
        f"{spec.precision}, channels_last={spec.channels_last}, compile={spec.compile}",
    )
    table.add_row("epochs done", f"{summary.get('epochs_done')}/{spec.epochs}")
    table.add_row("best val acc", pct(summary.get("best_val_acc")))
    if spec.precise_bn is None:
        table.add_row("final val acc", pct(summary.get("final_val_acc")))
    else:  # side by side: the running (EMA) statistics, and the precise ones the saved model carries
        precise = pct(summary.get("final_val_acc_precise"))
        table.add_row("final val acc", f"{pct(summary.get('final_val_acc'))} (EMA) / {precise} (precise BN)")
    if summary.get("warning"):
        table.add_row("warning", f"[yellow]{summary['warning']}")
    loss = summary.get("final_train_loss")
    table.add_row("final train loss", "-" if loss is None else f"{loss:.4f}")
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    table.add_row("model", str(summary.get("model_path") or "-"))
    table.add_row("metrics", str(Path(summary["output_dir"]) / "metrics.jsonl"))
    Console().print(table)
