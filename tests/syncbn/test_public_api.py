"""The public surface of the library is exactly what `__all__` names, and it depends on torch only."""

from __future__ import annotations

import subprocess
import sys

import syncbn


def test_all_is_the_public_surface() -> None:
    public = {name for name in dir(syncbn) if not name.startswith("_")}
    # `syncbn.recalibrate` is the function (its module of the same name is shadowed by it, as intended).
    submodules = {"batchnorm", "convert", "lightning", "norm_act", "stats"}
    assert set(syncbn.__all__) - {"__version__"} == public - submodules
    assert {"SyncBatchNorm", "convert_sync_batchnorm", "recalibrate", "revert_sync_batchnorm"} <= set(syncbn.__all__)
    assert callable(syncbn.recalibrate)


def test_importing_syncbn_pulls_in_no_service_dependencies() -> None:
    # torch._dynamo too: importing it costs ~1.2 s of CPU in every process of a job; it loads when compiling only.
    heavy = ("ray", "fastapi", "pydantic", "sqlalchemy", "lightning", "torch._dynamo")
    code = f"import sys, syncbn; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_importing_syncbn_lightning_without_lightning_names_the_install() -> None:
    code = "import sys; sys.modules['lightning'] = None; import syncbn.lightning"  # as if Lightning were absent
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ImportError: syncbn.lightning needs Lightning" in result.stderr, result.stderr[-2000:]
    assert "pip install lightning" in result.stderr
