"""The service's settings: one pydantic-settings class, read from `SYNCBN_*` environment variables and flags.

Nothing here is created at import time: `syncbn serve` builds a `Settings` from its flags (each flag mirrors a
field; a flag left out falls back to the environment, then to the default) and hands it to
`service.api.create_app`. Tests build their own `Settings` with a temporary data folder.

Insecure combinations are refused when the object is built: binding a non-loopback address without API tokens
raises a `ValueError` that says how to fix it, unless `allow_insecure_bind` is set explicitly.

Tokens name principals: an `api_tokens` entry `alice=<token>` lets whoever holds `<token>` act as `alice`, who
sees and manages only the jobs `alice` submitted; a bare `<token>` acts as the principal `default`. Principals
listed in `admins` see every job.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import warnings
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.data_location import KNOWN_SCHEMES

__all__ = ["DEFAULT_PRINCIPAL", "PRINCIPAL_PATTERN", "Settings", "is_loopback_host"]

#: The principal of a bare token (an `api_tokens` entry without `name=`), and of every request without tokens.
DEFAULT_PRINCIPAL = "default"
#: What a principal's name may look like (it is stored as the owner of the jobs it submits).
PRINCIPAL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
_PRINCIPAL = re.compile(PRINCIPAL_PATTERN)

logger = logging.getLogger(__name__)


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
    ray_join_timeout_s: float = Field(
        120.0,
        ge=0.0,
        le=3600.0,
        description="Seconds to keep retrying, with backoff, to join ray_address while that cluster is still "
        "starting; then the service stops with the last error. 0: one attempt.",
    )
    ray_allow_insecure: bool = Field(
        False,
        description="Join a ray_address on another machine without Ray's token authentication (RAY_AUTH_MODE=token "
        "with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH); refused otherwise. Not recommended.",
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
        description="Bearer tokens accepted by /v1 and /metrics, each `name=token` (the principal `name` owns "
        "the jobs it submits) or a bare token (principal 'default'); comma-separated in SYNCBN_API_TOKENS. "
        "Empty: no authentication (loopback only).",
    )
    admins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Principals (names from api_tokens) that see and manage every job, comma-separated in "
        "SYNCBN_ADMINS.",
    )
    allow_insecure_bind: bool = Field(
        False, description="Allow binding a non-loopback address without API tokens (not recommended)."
    )
    data_root: Path | None = Field(
        None,
        description="Folder that data sets are read from: a spec's dataset.path (npz) and dataset.uri "
        "(image_folder, parquet) are resolved under it and may not leave it. Default: data_dir/npz.",
    )
    npz_root: Path | None = Field(
        None,
        description="Deprecated name of data_root (SYNCBN_NPZ_ROOT): still honoured, with a warning.",
    )
    allowed_uri_schemes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Remote schemes a spec's dataset.uri may use besides paths under data_root: s3 and/or gs "
        "(comma-separated in SYNCBN_ALLOWED_URI_SCHEMES; read with pyarrow's filesystems and the cluster's "
        "credentials). Empty: local data only.",
    )
    tracking_uris: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="MLflow tracking servers a spec's tracking.mlflow.tracking_uri may name, http(s) URIs compared "
        "after normalising (comma-separated in SYNCBN_TRACKING_URIS). A tracking URI is a network destination that "
        "a request carries: only these are ever contacted. Empty: MLflow tracking is refused (TensorBoard, which "
        "writes into the run storage, needs nothing).",
    )
    storage_uri: str | None = Field(
        None,
        min_length=1,
        description="Where Ray Train keeps each run's checkpoints and final model, so they outlive the node that "
        "wrote them: a folder every node reaches (an NFS mount on a cluster), or s3://bucket/prefix or "
        "gs://bucket/prefix (pyarrow filesystems, credentials from the environment). Default: data_dir/storage.",
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, le=1 << 30, description="Largest accepted request body in bytes (413 above)."
    )
    poll_interval_s: float = Field(
        0.25, gt=0.0, le=10.0, description="Seconds between two drains of the running jobs' records."
    )
    leader_poll_s: float = Field(
        2.0,
        gt=0.0,
        le=30.0,
        description="Seconds between two attempts of a follower replica to take the leader lease (PostgreSQL); "
        "a dead leader is replaced within about this long.",
    )
    replica_name: str | None = Field(
        None,
        min_length=1,
        max_length=48,
        description="This replica's name in /readyz, /v1/cluster and the logs; default: host:port/pid.",
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

    @field_validator("api_tokens", "admins", mode="before")
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
    def _check_tokens(cls, entries: list[str]) -> list[str]:
        seen: set[str] = set()
        for entry in entries:
            name, token = _principal_and_token(entry)
            if len(token) < 16:
                raise ValueError(
                    f"api_tokens: the token of principal {name!r} must be at least 16 characters (got {len(token)}): "
                    "use e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
                )
            if token in seen:
                raise ValueError(f"api_tokens: principal {name!r} uses a token listed before: give each its own.")
            seen.add(token)
        return entries

    @field_validator("admins")
    @classmethod
    def _check_admins(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _PRINCIPAL.match(name):
                raise ValueError(
                    f"admins: expected principal names of letters, digits, '_', '.', '@' or '-' (got {name!r})."
                )
        return names

    @field_validator("storage_uri")
    @classmethod
    def _check_storage_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme, sep, _ = value.partition("://")
        if sep and scheme.lower() not in ("file", "s3", "gs"):
            raise ValueError(
                f"storage_uri must be a folder, file://, s3:// or gs:// (got the scheme {scheme!r}): "
                "mount the storage as a folder on every node, or use a bucket URI."
            )
        return value

    @field_validator("allowed_uri_schemes", mode="before")
    @classmethod
    def _split_schemes(cls, value: object) -> object:
        """Accept "s3,gs" (the environment's form) as well as a list; blanks are dropped."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return [str(s).strip().lower().removesuffix("://") for s in value if str(s).strip()]
        return value

    @field_validator("allowed_uri_schemes")
    @classmethod
    def _check_schemes(cls, schemes: list[str]) -> list[str]:
        for scheme in schemes:
            if scheme not in KNOWN_SCHEMES:
                raise ValueError(
                    f"allowed_uri_schemes entries must be one of {sorted(KNOWN_SCHEMES)} (got {scheme!r})."
                )
        return schemes

    @field_validator("tracking_uris", mode="before")
    @classmethod
    def _split_tracking_uris(cls, value: object) -> object:
        """Accept "http://a:5000,https://b" (the environment's form) as well as a list; blanks are dropped."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return [str(uri).strip() for uri in value if str(uri).strip()]
        return value

    @field_validator("tracking_uris")
    @classmethod
    def _check_tracking_uris(cls, uris: list[str]) -> list[str]:
        from service.engine.tracking import normalize_tracking_uri

        for uri in uris:
            normalize_tracking_uri(uri, "tracking_uris")
        return uris

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError(f"log_level must be debug, info, warning, error or critical (got {value!r}).")
        return value

    @model_validator(mode="after")
    def _take_over_npz_root(self) -> Settings:
        """`npz_root` is the old name of `data_root`: honour it with a deprecation warning."""
        if self.npz_root is not None:
            if self.data_root is not None and self.data_root != self.npz_root:
                raise ValueError(
                    f"data_root ({self.data_root}) and its deprecated name npz_root ({self.npz_root}) disagree: "
                    "set SYNCBN_DATA_ROOT only."
                )
            message = "npz_root (SYNCBN_NPZ_ROOT) is deprecated: set data_root (SYNCBN_DATA_ROOT) instead."
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            logger.warning(message)
            self.data_root = self.npz_root
        return self

    @model_validator(mode="after")
    def _check_admins_have_tokens(self) -> Settings:
        names = {name for name, _ in self.principals()}
        unknown = [name for name in self.admins if self.api_tokens and name not in names]
        if unknown:
            raise ValueError(
                f"admins names {', '.join(map(repr, unknown))}, but api_tokens has no token for "
                f"{'it' if len(unknown) == 1 else 'them'} (principals: {', '.join(sorted(names))}): "
                "add a `name=token` entry or fix the name."
            )
        return self

    @model_validator(mode="after")
    def _refuse_open_bind_without_tokens(self) -> Settings:
        if not is_loopback_host(self.host) and not self.api_tokens and not self.allow_insecure_bind:
            raise ValueError(
                f"host {self.host!r} is reachable from other machines but no api_tokens are configured: "
                "set SYNCBN_API_TOKENS (or --api-tokens), bind 127.0.0.1, or pass --allow-insecure-bind "
                "if something in front of the service authenticates requests."
            )
        return self

    def principals(self) -> list[tuple[str, str]]:
        """(principal, token) for every `api_tokens` entry, in order."""
        return [_principal_and_token(entry) for entry in self.api_tokens]

    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL to use: `database_url`, or an SQLite file in `data_dir`."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'syncbn.db').resolve()}"

    def jobs_dir(self) -> Path:
        """Folder holding one sub-folder of files (model, checkpoints) per job."""
        return (self.data_dir / "jobs").resolve()

    def resolved_storage_uri(self) -> str:
        """Where runs keep checkpoints and final models: `storage_uri`, or the folder data_dir/storage."""
        if self.storage_uri:
            return self.storage_uri
        return str((self.data_dir / "storage").resolve())

    def resolved_data_root(self) -> Path:
        """Folder that data sets (npz files, image folders, Parquet files) are confined to."""
        return (self.data_root if self.data_root is not None else self.data_dir / "npz").resolve()

    def resolved_npz_root(self) -> Path:
        """Deprecated name of `resolved_data_root`."""
        return self.resolved_data_root()


def _principal_and_token(entry: str) -> tuple[str, str]:
    """`name=token` -> (name, token); an entry without a valid `name=` prefix is a bare token of 'default'.

    A token may itself end in '=' (base64 padding): only a prefix that is a valid principal name followed by more
    than padding counts as a name.
    """
    name, sep, token = entry.partition("=")
    if sep and token.rstrip("=") and _PRINCIPAL.match(name):
        return name, token
    return DEFAULT_PRINCIPAL, entry
