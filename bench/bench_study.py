"""Studies through the product: does synchronised BatchNorm pay, and what does the study's bookkeeping cost?

Every case runs `syncbn study SPEC --output DIR` in this process (`service.cli.main`: an embedded Ray, the
service's own JobManager and an SQLite store in DIR), then reads DIR/study.json and DIR/syncbn.db.

- `--case tiny`: digits, small_resnet, 4 workers x 1 sample per worker, 2 epochs (the spec of
  bench_tiny_batches.py), seeds 0 1 2, arms sync_bn true / false. Prints the verdict (table and sentence).
- `--case large`: the same with 64 samples per worker (and more epochs, so that both arms train to a plateau),
  where local BatchNorm already sees enough samples: synchronisation should not pay.
- `--overhead`: the 4 trials of a short 2-arm x 2-seed digits study as bare engine runs (`launch_run`, as
  bench_tiny_batches.py runs jobs: no queue, no store), then the study one trial at a time (`--concurrent 1`),
  then two trials at once (`--concurrent 2`, 4 logical CPUs). For each study: its wall time (its submission to
  the end of its last trial) over the sum of its trials' own run times (each job's finished_at - started_at);
  and the first study's wall time over the sum of the bare runs' wall times. Target: at most 1.2x one at a time
  (the queue and the store add little); below 1x two at a time.
- `--figure`: a screenshot of the tiny case's study page (`syncbn serve --data-dir DIR` with scheduling paused,
  Playwright driving /usr/bin/chromium) to bench/results/study_tiny.png.

    .venv/bin/python bench/bench_study.py                 # all of them, one after another
    .venv/bin/python bench/bench_study.py --case tiny --figure
    .venv/bin/python bench/bench_study.py --overhead

Results: bench/results/study_<case>.json (the study as `GET /v1/studies/{id}` shows it, plus its timings) and the
PNG; the studies' own folders (database, models) go under --work (default artifacts/bench-study/, not committed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "bench"):  # the repository's packages, and bench_tiny_batches' run_job
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from service.cli import main as syncbn  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CHROMIUM = Path("/usr/bin/chromium")

#: The job every tiny/large trial starts from (bench_tiny_batches.py's spec; batch_size set per case).
TINY_BASE: dict[str, Any] = {
    "model": "small_resnet",
    "dataset": {"kind": "digits"},
    "workers": 4,
    "batch_size": 1,
    "epochs": 2,
    "stats_every": 40,
    "checkpoint_every": 0,
    "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4},
}


def case_spec(case: str) -> dict[str, Any]:
    """The study spec of a case: tiny (1 sample per worker), large (64 per worker) or overhead (short, 2 x 2)."""
    if case == "tiny":
        return {"name": "digits, 4 workers x 1 sample: does syncbn pay?", "base": TINY_BASE, "seeds": 3}
    if case == "large":
        # 4 x 64 = 256 samples per step is ~5 steps per epoch of digits' training split: 2 epochs would leave
        # both arms untrained, so this case runs 20 epochs (~100 steps) and a larger learning rate.
        base = {**TINY_BASE, "batch_size": 64, "epochs": 20, "stats_every": 5}
        base["optimizer"] = {**TINY_BASE["optimizer"], "lr": 0.1}
        return {"name": "digits, 4 workers x 64 samples: does syncbn pay?", "base": base, "seeds": 3}
    if case == "overhead":
        base = {
            "model": "small_resnet",
            "dataset": {"kind": "digits"},
            "workers": 2,
            "cpus_per_worker": 1,
            "batch_size": 16,
            "epochs": 1,
            "steps_per_epoch": 20,
            "stats_every": 5,
            "checkpoint_every": 0,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        }
        return {"name": "overhead: 2 arms x 2 seeds, short", "base": base, "seeds": 2}
    raise ValueError(f"unknown case {case!r}: expected tiny, large or overhead")


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def timings(output: Path, study_id: str) -> dict[str, Any]:
    """The study's wall time (submission to the end of its last trial) and each trial's own run time, from the
    store the study wrote (jobs.started_at / finished_at, studies.created_at)."""
    from service.store.repository import JobStore

    store = JobStore(f"sqlite:///{(output / 'syncbn.db').resolve()}")
    try:
        study = store.get_study(study_id)
        if study is None:
            raise RuntimeError(f"study {study_id} is not in {output / 'syncbn.db'}")
        trials = []
        for job in store.study_trials(study_id):
            if job.started_at is None or job.finished_at is None:
                raise RuntimeError(f"trial {job.id} has no run time (status {job.status})")
            trials.append(
                {
                    "job_id": job.id,
                    "arm": job.study_arm,
                    "seed": job.study_seed,
                    "status": job.status,
                    "queued_s": (_utc(job.started_at) - _utc(study.created_at)).total_seconds(),
                    "run_s": (_utc(job.finished_at) - _utc(job.started_at)).total_seconds(),
                }
            )
            trials[-1]["end_s"] = trials[-1]["queued_s"] + trials[-1]["run_s"]
    finally:
        store.close()
    wall = max(trial["end_s"] for trial in trials)
    total = sum(trial["run_s"] for trial in trials)
    return {"wall_s": wall, "sum_run_s": total, "ratio": wall / total, "trials": trials}


def run_case(case: str, work: Path, *, extra: list[str] | None = None, tag: str | None = None) -> dict[str, Any]:
    """Run a case's study through `syncbn study` into work/<tag>; returns study.json plus its timings."""
    name = tag or case
    output = work / name
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    spec_path = output / "spec.json"
    spec_path.write_text(json.dumps(case_spec(case), indent=2) + "\n")
    print(f"== {name}: syncbn study {spec_path} --output {output} {' '.join(extra or [])}", flush=True)
    print(f"load average before: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")
    started = time.perf_counter()
    code = syncbn(["study", str(spec_path), "--output", str(output), *(extra or [])])
    elapsed = time.perf_counter() - started
    study = json.loads((output / "study.json").read_text())
    if code != 0:
        raise RuntimeError(f"syncbn study ended with exit code {code} (study {study['status']})")
    result = {
        "case": name,
        "command": f"syncbn study SPEC --output DIR {' '.join(extra or [])}".strip(),
        "load_average": list(os.getloadavg()),
        "process_s": elapsed,
        "timings": timings(output, study["id"]),
        "study": study,
    }
    (RESULTS / f"study_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {elapsed:.0f} s in all\n")
    return result


def print_timings(result: dict[str, Any]) -> None:
    """One line per trial (arm, seed, start after submission, run time), then the ratio."""
    t = result["timings"]
    for trial in t["trials"]:
        print(
            f"  arm {trial['arm']} seed {trial['seed']}: started {trial['queued_s']:6.1f} s after submission, "
            f"ran {trial['run_s']:6.1f} s"
        )
    print(
        f"  {result['case']}: study wall {t['wall_s']:.1f} s / sum of trial run times {t['sum_run_s']:.1f} s "
        f"= {t['ratio']:.3f}x"
    )


def bare_runs(case: str, work: Path) -> list[float]:
    """The case's trials as bare engine runs (`launch_run`, no queue, no store), one at a time on an embedded Ray
    of 2 CPUs: each one's wall time from launch to its end record. The baseline of what the service adds."""
    import ray
    from bench_tiny_batches import run_job

    from service.engine.cluster import ensure_ray
    from service.study_spec import StudySpec

    spec = StudySpec.model_validate(case_spec(case))
    folder = work / f"{case}_bare"
    shutil.rmtree(folder, ignore_errors=True)
    ensure_ray(None, num_cpus=2, log_to_driver=False)
    try:
        walls = []
        for arm, seed, trial in spec.trial_specs():
            walls.append(run_job(trial, folder)["wall_time_s"])
            print(f"  bare run arm {arm} seed {seed}: {walls[-1]:.1f} s", flush=True)
    finally:
        ray.shutdown()
    return walls


def overhead(work: Path) -> None:
    """The short study's trials as bare runs, then the study one trial at a time, then two at once; prints the
    ratios."""
    print(f"== overhead: the 4 trials as bare launch_run jobs, one at a time (load {os.getloadavg()[0]:.1f})")
    bare = bare_runs("overhead", work)
    one = run_case("overhead", work, extra=["--concurrent", "1", "--num-cpus", "2"], tag="overhead_concurrent1")
    two = run_case("overhead", work, extra=["--concurrent", "2", "--num-cpus", "4"], tag="overhead_concurrent2")
    for result in (one, two):
        print_timings(result)
    summary = {
        "bare_walls_s": bare,
        "concurrent1": {key: one["timings"][key] for key in ("wall_s", "sum_run_s", "ratio")},
        "concurrent2": {key: two["timings"][key] for key in ("wall_s", "sum_run_s", "ratio")},
    }
    (RESULTS / "study_overhead.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"one trial at a time: {one['timings']['ratio']:.3f}x the sum of its trials' run times (target <= 1.2x), "
        f"{one['timings']['wall_s'] / sum(bare):.3f}x the sum of the same trials' bare launch_run wall times "
        f"({sum(bare):.1f} s); two at once: {two['timings']['ratio']:.3f}x (target < 1x), "
        f"{two['timings']['wall_s'] / one['timings']['wall_s']:.2f}x the wall time of one at a time"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(data_dir: Path) -> Iterator[str]:
    """`syncbn serve --data-dir data_dir` on a free loopback port with scheduling paused; yields its URL."""
    import httpx

    port = _free_port()
    env = {**os.environ, "SYNCBN_MAX_CONCURRENT_JOBS": "0", "SYNCBN_RAY_NUM_CPUS": "1", "SYNCBN_API_TOKENS": ""}
    serve = ["serve", "--data-dir", str(data_dir), "--port", str(port)]
    command = [sys.executable, "-c", f"import sys; from service.cli import main; sys.exit(main({serve!r}))"]
    log = (data_dir / "serve.log").open("w")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"syncbn serve exited with {server.returncode}: see {data_dir / 'serve.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"syncbn serve not ready after 180 s: see {data_dir / 'serve.log'}")
            time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def shrink(path: Path) -> None:
    """Rewrite the PNG with a 256-colour palette (the page is flat colours: a third of the size, no visible
    change), when Pillow is there (matplotlib brings it)."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def figure(work: Path, path: Path) -> None:
    """Screenshot of the tiny study's page, once its verdict and curves are drawn."""
    from playwright.sync_api import sync_playwright

    data_dir = work / "tiny"
    study_id = json.loads((data_dir / "study.json").read_text())["id"]
    with serving(data_dir) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"], timeout=60_000
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"{url}/#/studies/{study_id}", wait_until="load")
            page.wait_for_selector("#verdict-explained")
            page.wait_for_timeout(5_000)  # the curves and the heatmap load after the verdict
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()
    shrink(path)
    print(f"figure: {path} ({path.stat().st_size // 1024} KB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("tiny", "large"), action="append", help="Run this case (repeatable).")
    parser.add_argument("--overhead", action="store_true", help="Measure the study's overhead (2 studies).")
    parser.add_argument("--figure", action="store_true", help="Screenshot the tiny case's study page.")
    parser.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-study", help="The studies' folders.")
    args = parser.parse_args()
    everything = not (args.case or args.overhead or args.figure)
    cases = args.case or (["tiny", "large"] if everything else [])
    RESULTS.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for case in cases:  # `syncbn study` itself prints the verdict (service.study_submit.format_verdict)
        print_timings(run_case(case, args.work))
        print()
    if args.overhead or everything:
        overhead(args.work)
    if args.figure or everything:
        figure(args.work, RESULTS / "study_tiny.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
