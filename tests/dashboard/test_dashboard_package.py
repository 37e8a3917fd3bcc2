"""The dashboard's files travel with the package: a wheel built from the project holds every file of
`service/dashboard/static/` (pyproject's package-data), so `pip install syncbn` serves the same page as a checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from service.dashboard import STATIC_DIR

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]


def test_the_built_wheel_ships_every_dashboard_file(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in the environment")
    # Build from a copy of the package sources only, so the checkout gains no build/ or egg-info folders.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("syncbn", "service"):
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(source),
            "-w",
            str(wheels),
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("syncbn-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("service/dashboard/static/")}
    expected = {
        f"service/dashboard/static/{path.relative_to(STATIC_DIR).as_posix()}"
        for path in STATIC_DIR.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert "service/dashboard/static/index.html" in expected
    assert "service/dashboard/static/vendor/uPlot.iife.min.js" in expected
    assert shipped == expected, f"missing from the wheel: {sorted(expected - shipped)}"
