"""Streaming vs in-memory: samples/s of an image_folder job against the same images held in memory (an npz file).

The digits are written as an image folder (png files, `<class>/<file>`) and, decoded and resized the same way, as
an npz file; the same job (model, 2 CPU workers, batch size, seed) then runs on each, alternating, in one embedded
Ray. The figure is the median of the step records' samples/s (global samples over wall time, data waits included)
after the first epoch (warm-up: worker start, the first Ray Data execution). Target: the streamed job keeps >= 80 %
of the in-memory throughput.

    .venv/bin/python bench/bench_data.py                       # 32x32 RGB, small_resnet, 3 epochs, 2 rounds
    .venv/bin/python bench/bench_data.py --size 8 --channels 1 --model cnn
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine.cluster import ensure_ray  # noqa: E402
from service.engine.runner import launch_run  # noqa: E402
from service.spec import JobSpec  # noqa: E402
from tests.service.digits_files import write_digits_folder  # noqa: E402

TARGET = 0.80


def _npz_like(folder: Path, target: Path, size: int, channels: int) -> None:
    """The image folder's files decoded, converted and resized as Ray Data's read_images does, into one npz."""
    from PIL import Image

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.png")):
            with Image.open(path) as image:
                image = image.resize((size, size), resample=Image.BILINEAR).convert("L" if channels == 1 else "RGB")
                pixels = np.asarray(image, dtype=np.float32) / 255.0
            xs.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
            ys.append(label)
    np.savez(target, x=np.stack(xs), y=np.asarray(ys, dtype=np.int64))


def _run(spec: JobSpec, data_root: Path, out: Path) -> dict[str, Any]:
    """Run one job to its end; returns samples/s after the first epoch, the end record and the wall time."""
    started = time.perf_counter()
    run = launch_run(spec, f"bench-data-{uuid.uuid4().hex[:8]}", out, data_root=data_root)
    records: list[dict[str, Any]] = []
    while not records or records[-1]["kind"] != "end":
        records += run.poll(records[-1]["seq"] if records else 0)
        time.sleep(0.25)
    run.close()
    rates = [r["samples_per_s"] for r in records if r["kind"] == "step" and r["epoch"] >= 2]
    return {"rates": rates, "end": records[-1], "wall_s": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="images are resized to size x size")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--model", default="small_resnet")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating (in-memory, streamed) pairs")
    args = parser.parse_args()

    ensure_ray(None, num_cpus=3, log_to_driver=False)  # 2 workers + 1 CPU a streamed job keeps for Ray Data
    common = {
        "model": args.model,
        "workers": 2,
        "epochs": args.epochs,
        "batch_size": 32,
        "stats_every": 5,
        "checkpoint_every": 0,
        "seed": 0,
    }
    streamed = JobSpec(
        **common,
        dataset={"kind": "image_folder", "uri": "digits", "image_size": [args.size] * 2, "channels": args.channels},
    )
    in_memory = JobSpec(**common, dataset={"kind": "npz", "path": "digits.npz"})
    results: dict[str, list[float]] = {"in_memory": [], "streamed": []}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp) / "root"
        write_digits_folder(root / "digits")
        _npz_like(root / "digits", root / "digits.npz", args.size, args.channels)
        for round_ in range(args.rounds):
            for name, spec in (("in_memory", in_memory), ("streamed", streamed)):
                result = _run(spec, root, Path(tmp) / f"{name}-{round_}")
                if result["end"]["status"] != "succeeded":
                    print(f"FAIL: the {name} job ended {result['end']['status']}: {result['end'].get('error')}")
                    return 1
                median = statistics.median(result["rates"])
                results[name].append(median)
                print(
                    f"round {round_ + 1} {name:9s}: {median:8.1f} samples/s (median of {len(result['rates'])} "
                    f"step windows), val acc {result['end']['final_val_acc']:.4f}, wall {result['wall_s']:.0f} s",
                    flush=True,
                )
    memory, stream = statistics.median(results["in_memory"]), statistics.median(results["streamed"])
    ratio = stream / memory
    print(
        json.dumps(
            {
                "model": args.model,
                "image": [args.channels, args.size, args.size],
                "in_memory_samples_per_s": round(memory, 1),
                "streamed_samples_per_s": round(stream, 1),
                "ratio": round(ratio, 3),
            }
        )
    )
    print(f"streamed / in-memory = {ratio:.2f} (target >= {TARGET:.2f}): {'PASS' if ratio >= TARGET else 'FAIL'}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
