"""The library's wheel on its own: `pip install syncbn` brings torch and nothing of the service.

The test builds the wheel from a copy of the project (so the build leaves nothing in the checkout), installs it
into a fresh virtual environment whose only other package is torch (pinned to the tested build through
`constraints.txt`), and there: imports `syncbn`, runs one training step of a synchronized layer on a real 2-rank
gloo group and compares it with BatchNorm on the global batch, checks that Ray, FastAPI and the rest of the
`service` extra were not installed, and that the `syncbn` command names the extra to install instead of a traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Distributions of the `service` extra; none may arrive with the library.
SERVICE_ONLY = ("ray", "fastapi", "uvicorn", "pydantic", "sqlalchemy", "alembic", "pyarrow", "scikit-learn", "httpx")

TWO_RANK_STEP = textwrap.dedent(
    """
    import os, sys, tempfile
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    import syncbn

    def rank_main(rank, world, store_file, x, out):
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
        layer = syncbn.SyncBatchNorm(3).double()
        part = x.chunk(world)[rank].clone().requires_grad_(True)
        y = layer(part)
        (y * y).sum().backward()
        out[rank] = torch.cat([y.detach().flatten(), part.grad.flatten(), layer.running_mean, layer.running_var])
        dist.destroy_process_group()

    if __name__ == "__main__":
        torch.manual_seed(0)
        x = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 3 + 1
        world = 2
        with tempfile.TemporaryDirectory() as folder:
            out = torch.multiprocessing.Manager().dict()
            mp.spawn(rank_main, args=(world, os.path.join(folder, "store"), x, out), nprocs=world)
        ref = torch.nn.BatchNorm2d(3).double()
        whole = x.clone().requires_grad_(True)
        y = ref(whole)
        (y * y).sum().backward()
        for rank in range(world):
            n = x.chunk(world)[rank].numel()
            got = out[rank]
            want = torch.cat([y.detach().chunk(world)[rank].flatten(), whole.grad.chunk(world)[rank].flatten(),
                              ref.running_mean, ref.running_var])
            err = (got - want).abs().max().item()
            assert err < 1e-10, f"rank {rank}: max abs error {err} against BatchNorm on the global batch"
        print("two-rank step exact", syncbn.__file__)
    """
)


def _run(command: list[str], *, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _checked(command: list[str], **kwargs: object) -> str:
    done = _run(command, **kwargs)  # type: ignore[arg-type]
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.timeout(900)
def test_library_wheel_installs_with_torch_alone(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("syncbn", "service"):
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    wheels = tmp_path / "wheels"
    # The running environment's setuptools builds it (no build isolation: nothing downloaded for the build).
    _checked(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(source),
        ]
    )
    (wheel,) = wheels.glob("syncbn-*.whl")

    venv = tmp_path / "venv"
    _checked([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    torch_pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(torch_pin + "\n")
    _checked([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), str(wheel)])

    installed = _checked([str(python), "-m", "pip", "list", "--format=freeze"]).lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert "syncbn" in names and "torch" in names, installed
    leaked = sorted(name for name in SERVICE_ONLY if name in names)
    assert not leaked, f"the library's wheel pulled in service dependencies: {leaked}"

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_STEP)
    out = _checked([str(python), str(script)], cwd=tmp_path)
    assert "two-rank step exact" in out and str(venv) in out, out

    done = _run([str(venv / "bin" / "syncbn"), "serve"], cwd=tmp_path, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "pip install 'syncbn[service]'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
