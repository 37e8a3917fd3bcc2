"""The service's settings: one pydantic-settings class, read from `SYNCBN_*` environment variables and flags.

Nothing here is created at import time: `syncbn serve` builds a `Settings` from its flags (each flag mirrors a
field; a flag left out falls back to the environment, then to the default) and hands it to
`service.api.create_app`. Tests build their own `Settings` with a temporary data folder.

Insecure combinations are refused when the object is built: binding a non-loopback address without API tokens
raises a `ValueError` that says how to fix it, unless `allow_insecure_bind` is set explicitly.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "is_loopback_host"]


def is_loopback_host(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1 or "localhost")."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Where the service listens, where it keeps its data, which Ray it uses and how it protects itself."""

    model_config = SettingsConfigDict(env_prefix="SYNCBN_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", min_length=1, description="Address to bind; loopback by default.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0: any free port).")
    data_dir: Path = Field(
        Path("data"),
        description="Folder for the SQLite database (by default) and each job's files (data_dir/jobs/<id>/).",
    )
    database_url: str | None = Field(
        None,
        description="Any SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; "
        "default: sqlite file data_dir/syncbn.db.",
    )
    ray_address: str | None = Field(
        None,
        description="Address of an existing Ray cluster to join (e.g. ray://head:10001 or auto); "
        "default: start an embedded local Ray.",
    )
    ray_num_cpus: int | None = Field(
        None, ge=1, le=4096, description="Logical CPUs of the embedded Ray (default: Ray's own count)."
    )
    max_concurrent_jobs: int | None = Field(
        None,
        ge=0,
        le=10_000,
        description="Jobs running at once; others wait queued in submission order. Default: the cluster's "
        "CPU count (a job still starts only when its CPUs and GPUs are free). 0 pauses scheduling.",
    )
    api_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens accepted by /v1 and /metrics (comma-separated in SYNCBN_API_TOKENS); "
        "empty: no authentication (loopback only).",
    )
    allow_insecure_bind: bool = Field(
        False, description="Allow binding a non-loopback address without API tokens (not recommended)."
    )
    npz_root: Path | None = Field(
        None,
        description="Folder that npz data sets are read from; a spec's dataset.path is resolved under it. "
        "Default: data_dir/npz.",
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, le=1 << 30, description="Largest accepted request body in bytes (413 above)."
    )
    poll_interval_s: float = Field(
        0.25, gt=0.0, le=10.0, description="Seconds between two drains of the running jobs' records."
    )
    cancel_wait_s: float = Field(
        30.0,
        ge=0.0,
        le=600.0,
        description="How long POST /v1/jobs/{id}/cancel waits for a running job to stop before answering "
        "202 (still stopping) instead of 200.",
    )
    stats_keep: int = Field(
        256,
        ge=2,
        le=100_000,
        description="Recorded steps per layer that keep their per-channel BatchNorm vectors, for jobs whose spec "
        "sets no stats_keep: the most recent half plus a log-spaced selection of older ones.",
    )
    log_level: str = Field("info", description="Log level of the service and uvicorn: debug, info, warning.")

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        """Accept "a,b" (the environment's form) as well as a list; blanks are dropped."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return [str(token).strip() for token in value if str(token).strip()]
        return value

    @field_validator("api_tokens")
    @classmethod
    def _check_token_length(cls, tokens: list[str]) -> list[str]:
        for token in tokens:
            if len(token) < 16:
                raise ValueError(
                    f"api_tokens entries must be at least 16 characters (got one of {len(token)}): "
                    "use e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
                )
        return tokens

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError(f"log_level must be debug, info, warning, error or critical (got {value!r}).")
        return value

    @model_validator(mode="after")
    def _refuse_open_bind_without_tokens(self) -> Settings:
        if not is_loopback_host(self.host) and not self.api_tokens and not self.allow_insecure_bind:
            raise ValueError(
                f"host {self.host!r} is reachable from other machines but no api_tokens are configured: "
                "set SYNCBN_API_TOKENS (or --api-tokens), bind 127.0.0.1, or pass --allow-insecure-bind "
                "if something in front of the service authenticates requests."
            )
        return self

    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL to use: `database_url`, or an SQLite file in `data_dir`."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'syncbn.db').resolve()}"

    def jobs_dir(self) -> Path:
        """Folder holding one sub-folder of files (model, checkpoints) per job."""
        return (self.data_dir / "jobs").resolve()

    def resolved_npz_root(self) -> Path:
        """Folder that npz data sets are confined to."""
        return (self.npz_root if self.npz_root is not None else self.data_dir / "npz").resolve()
