"""Dependencies of the routes, as `Annotated` aliases so route signatures read like plain parameters.

- `SettingsDep`, `StoreDep`, `ManagerDep`: the objects `create_app` built for this app (no globals).
- `JobDep`: the job named by the `{job_id}` path parameter, or a 404 with a sentence.
- `require_token`: bearer-token check, applied to every /v1 route and /metrics when tokens are configured.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.jobs.manager import JobManager, JobNotFoundError
from service.settings import Settings
from service.store import JobStore
from service.store.models import JobRow

__all__ = ["JobDep", "ManagerDep", "SettingsDep", "StoreDep", "require_token"]


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    """The app's store (opened by the lifespan)."""
    return request.app.state.store


def get_manager(request: Request) -> JobManager:
    """The app's job manager (started by the lifespan)."""
    return request.app.state.manager


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
ManagerDep = Annotated[JobManager, Depends(get_manager)]


def get_job(
    job_id: Annotated[str, Path(description="Job id, as returned by POST /v1/jobs.")],
    store: StoreDep,
) -> JobRow:
    """The job named in the path; 404 when there is none."""
    job = store.get_job(job_id)
    if job is None:
        raise JobNotFoundError(job_id)
    return job


JobDep = Annotated[JobRow, Depends(get_job)]

_bearer = HTTPBearer(
    auto_error=False,
    description="A token from the service's api_tokens setting (only enforced when tokens are configured).",
)


def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Accept the request if no tokens are configured or it carries one of them as a bearer token."""
    if not settings.api_tokens:
        return
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this service requires a bearer token: send the header 'Authorization: Bearer <token>' "
            "with one of its api_tokens.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    offered = credentials.credentials.encode()
    # Compare against every token in constant time, so timing does not reveal how much of a token matched.
    matched = False
    for token in settings.api_tokens:
        matched |= secrets.compare_digest(offered, token.encode())
    if not matched:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "the bearer token is not one of this service's api_tokens: check the token you were given.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
