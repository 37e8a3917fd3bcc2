"""Who am I: the principal the caller's token stands for (the dashboard shows it in its header)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import PrincipalDep, SettingsDep
from service.api.models import WhoAmIPublic
from service.api.routes.responses import errors

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["auth"])


@router.get("/whoami", response_model=WhoAmIPublic, summary="Read who you are", responses=errors(401, 422))
def whoami(principal: PrincipalDep, settings: SettingsDep) -> WhoAmIPublic:
    """Your principal, and whether you are an admin (you then see every principal's jobs)."""
    return WhoAmIPublic(principal=principal.name, admin=principal.admin, authenticated=bool(settings.api_tokens))
