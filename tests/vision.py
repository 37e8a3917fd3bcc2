"""The `vision` marker's condition: torchvision and timm import here (in `make test-vision`'s environment).

Beside the pinned CPU torch 2.13.0 of `make test` torchvision cannot import (it is built for torch 2.14.1), and timm
imports torchvision, so tests marked `vision` and `skip_without_vision` skip there with the reason. `make
test-vision` sets `SYNCBN_REQUIRE_VISION=1`: there a failed import is an error, never a silent skip.
"""

from __future__ import annotations

import importlib
import os

import pytest

__all__ = ["VISION_MISSING", "skip_without_vision"]


def _vision_missing() -> str | None:
    """Why torchvision or timm does not import here, or None when both do."""
    for module in ("torchvision.models", "timm"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # missing, or built against another torch
            reason = f"{module} does not import here ({type(exc).__name__}: {exc}); make test-vision runs this"
            if os.environ.get("SYNCBN_REQUIRE_VISION") == "1":
                raise RuntimeError(f"SYNCBN_REQUIRE_VISION=1 but {reason}") from exc
            return reason
    return None


#: Why the vision tests skip here (None: they run).
VISION_MISSING = _vision_missing()

#: Skips a test (mark it `vision` too) with the reason where torchvision or timm does not import.
skip_without_vision = pytest.mark.skipif(VISION_MISSING is not None, reason=VISION_MISSING or "")
