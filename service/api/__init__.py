"""The HTTP API of the service (FastAPI): `create_app(settings)` builds it.

`create_app` is imported on first use, so that importing `service.api.models` (the response models the Python
client shares) does not load the application, the job manager and Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from service.api.app import create_app

        return create_app
    raise AttributeError(f"module 'service.api' has no attribute {name!r}")
