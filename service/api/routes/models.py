"""The models resource: what the service can build, so clients (and the dashboard's form) can offer the names."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.models import ModelPublic, ModelsPublic
from service.api.routes.responses import errors
from service.engine.model_registry import list_models

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelsPublic, summary="List the models jobs can use", responses=errors(401))
def read_models() -> ModelsPublic:
    """Built-in models, models of installed packages (entry point group `syncbn.models`) and, where torchvision and
    timm are installed, `torchvision/<name>` and `timm/<name>`. A job's `model` must be one of these names."""
    entries = list_models()
    return ModelsPublic(
        data=[ModelPublic(name=e.name, package=e.package, summary=e.summary) for e in entries], count=len(entries)
    )
