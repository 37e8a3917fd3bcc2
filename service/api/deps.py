"""Dependencies of the routes, as `Annotated` aliases so route signatures read like plain parameters.

- `SettingsDep`, `StoreDep`, `ManagerDep`: the objects `create_app` built for this app (no globals).
- `PrincipalDep`: who sends the request (`require_token`'s answer).
- `JobDep`: the job named by the `{job_id}` path parameter if the principal may see it, else a 404 with a
  sentence (the same 404 as for a job that does not exist: another principal's job is never confirmed).
- `require_token`: bearer-token check, applied to every /v1 route and /metrics when tokens are configured.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.jobs.manager import JobManager, JobNotFoundError
from service.settings import DEFAULT_PRINCIPAL, Settings
from service.store import JobStore
from service.store.models import JobRow

__all__ = ["JobDep", "ManagerDep", "Principal", "PrincipalDep", "SettingsDep", "StoreDep", "require_token"]


@dataclass(frozen=True)
class Principal:
    """Who sends a request: the name its token stands for, and whether it sees every job."""

    name: str
    admin: bool

    def owner_filter(self) -> str | None:
        """The owner to restrict queries to: None (every job) for an admin, else the principal's name."""
        return None if self.admin else self.name

    def may_see(self, owner: str | None) -> bool:
        """Whether a job owned by `owner` exists for this principal."""
        return self.admin or owner == self.name


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


_bearer = HTTPBearer(
    auto_error=False,
    description="A token from the service's api_tokens setting (only enforced when tokens are configured).",
)


def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """The principal of the request's bearer token; without configured tokens, 'default' as an admin."""
    if not settings.api_tokens:
        return Principal(DEFAULT_PRINCIPAL, admin=True)
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this service requires a bearer token: send the header 'Authorization: Bearer <token>' "
            "with one of its api_tokens.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    offered = credentials.credentials.encode()
    # Compare against every token in constant time and without stopping at a match, so timing reveals neither
    # how much of a token matched nor which entry did.
    matched: str | None = None
    for name, token in settings.principals():
        if hmac.compare_digest(offered, token.encode()) and matched is None:
            matched = name
    if matched is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "the bearer token is not one of this service's api_tokens: check the token you were given.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return Principal(matched, admin=matched in settings.admins)


PrincipalDep = Annotated[Principal, Depends(require_token)]


def get_job(
    job_id: Annotated[str, Path(description="Job id, as returned by POST /v1/jobs.")],
    store: StoreDep,
    principal: PrincipalDep,
) -> JobRow:
    """The job named in the path; 404 when there is none or it belongs to another principal."""
    job = store.get_job(job_id)
    if job is None or not principal.may_see(job.owner):
        raise JobNotFoundError(job_id)
    return job


JobDep = Annotated[JobRow, Depends(get_job)]
