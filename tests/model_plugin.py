"""The example model plugin of the tests: a real package, built and installed into the test environment with pip.

`tests/fixtures/model_plugin` is an ordinary Python project (pyproject.toml + one module) whose entry point
`tiny_convnet` in the group `syncbn.models` offers a model. `installed_model_plugin()` copies it to a temporary
folder (so the build leaves nothing in the source tree), installs it with `pip install --no-deps
--no-build-isolation` into the running interpreter's environment (setuptools from that environment builds it, so
nothing is downloaded), and uninstalls it afterwards unless it was installed before. Ray workers started later find
it like any installed package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PLUGIN_DIR", "PLUGIN_DISTRIBUTION", "PLUGIN_MODEL", "installed_model_plugin"]

PLUGIN_DIR = Path(__file__).resolve().parent / "fixtures" / "model_plugin"
PLUGIN_DISTRIBUTION = "syncbn-example-models"
PLUGIN_MODEL = "tiny_convnet"


def _installed() -> bool:
    try:
        importlib.metadata.distribution(PLUGIN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")


@contextlib.contextmanager
def installed_model_plugin() -> Iterator[str]:
    """Install the example plugin for the duration of the block; yields its model's name."""
    was_installed = _installed()
    if not was_installed:
        with tempfile.TemporaryDirectory(prefix="syncbn-plugin-") as scratch:
            source = Path(scratch) / "model_plugin"
            shutil.copytree(PLUGIN_DIR, source)
            _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(source))
        importlib.invalidate_caches()
    try:
        yield PLUGIN_MODEL
    finally:
        if not was_installed:
            _pip("uninstall", "-y", PLUGIN_DISTRIBUTION)
            importlib.invalidate_caches()
