"""Security settings: bearer tokens guard /v1 and /metrics when configured (probes stay open), and the settings
refuse to expose the service on a non-loopback address without tokens unless told to explicitly.

A real uvicorn server with a real local Ray; the settings are built the way `syncbn serve` builds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.settings import Settings, is_loopback_host
from tests.service.conftest_api import LiveServer, tiny_spec

pytestmark = pytest.mark.timeout(120)

TOKEN = "t0ken-for-the-tests-0123456789"
OTHER = "another-valid-token-9876543210"


@pytest.fixture(scope="module")
def server(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("auth"), api_tokens=[TOKEN, OTHER], max_concurrent_jobs=0)
    with LiveServer(settings) as live:
        yield live


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/x/events"),
        ("GET", "/v1/cluster"),
        ("GET", "/metrics"),
    ],
)
def test_requests_without_a_valid_token_are_401(server: LiveServer, method: str, path: str) -> None:
    with server.client() as anonymous, server.client(token="wrong-token-but-long-enough") as wrong:
        missing = anonymous.request(method, path, json=tiny_spec())
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "requires a bearer token" in missing.json()["detail"]
        bad = wrong.request(method, path, json=tiny_spec())
        assert bad.status_code == 401 and "not one of this service's api_tokens" in bad.json()["detail"]
    basic = httpx.get(f"{server.url}/v1/jobs", auth=("user", TOKEN))
    assert basic.status_code == 401, "only bearer tokens are accepted"


def test_every_configured_token_is_accepted(server: LiveServer) -> None:
    for token in (TOKEN, OTHER):
        with server.client(token=token) as client:
            assert client.get("/v1/jobs").status_code == 200
            assert client.post("/v1/jobs", json=tiny_spec()).status_code == 201
            assert client.get("/metrics").status_code == 200


def test_probes_and_docs_stay_open(server: LiveServer) -> None:
    with server.client() as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        schema = anonymous.get("/openapi.json").json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_non_loopback_bind_needs_tokens_or_an_explicit_opt_out(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no api_tokens are configured"):
        Settings(data_dir=tmp_path, host="0.0.0.0")
    assert Settings(data_dir=tmp_path, host="0.0.0.0", api_tokens=[TOKEN]).api_tokens == [TOKEN]
    assert Settings(data_dir=tmp_path, host="0.0.0.0", allow_insecure_bind=True).allow_insecure_bind
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
        assert is_loopback_host(host) and Settings(data_dir=tmp_path, host=host).host == host
    assert not is_loopback_host("192.168.1.4") and not is_loopback_host("example.org")


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SYNCBN_API_TOKENS", f" {TOKEN} ,{OTHER},")
    monkeypatch.setenv("SYNCBN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SYNCBN_MAX_CONCURRENT_JOBS", "3")
    settings = Settings()
    assert settings.api_tokens == [TOKEN, OTHER] and settings.max_concurrent_jobs == 3
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path.resolve() / 'syncbn.db'}"
    assert settings.resolved_npz_root() == tmp_path.resolve() / "npz"
    assert Settings(port=9000).port == 9000, "explicit values (the CLI flags) win over the environment"
    monkeypatch.setenv("SYNCBN_API_TOKENS", "short")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings()
