"""Property-based fuzzing of every operation in the service's own OpenAPI document (schemathesis): data that
fits the schema and data that does not (paths, queries, headers, bodies) never produce a 5xx, and every answer
matches what the document says (status code, content type, response schema); on SQLite and on the real
PostgreSQL server, which refuses what SQLite stores silently (NUL characters, integers beyond 32 bits).

A real uvicorn server with a real local Ray; scheduling is paused (`max_concurrent_jobs=0`) so the accepted
specs stay queued instead of training, and the number of examples per operation is bounded to keep the run short.
(Hypothesis drives each operation directly: schemathesis' pytest plugin does not support pytest 9 yet.)
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.settings import Settings
from tests.service.conftest_api import LiveServer

pytestmark = pytest.mark.timeout(300)

#: Examples per operation and generation mode: enough to hit each parameter's edges, few enough for ~1 minute.
EXAMPLES = 40
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(
    request: pytest.FixtureRequest, ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    database_url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("fuzz"), database_url=database_url, max_concurrent_jobs=0, cancel_wait_s=1
    )
    with LiveServer(settings) as live:
        yield live


def fuzz(operation: schemathesis.APIOperation, mode: GenerationMode, base_url: str) -> None:
    """Run `EXAMPLES` generated cases of one operation against the server; raises on the first failed check."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_operation_answers_5xx_or_off_schema(server: LiveServer, mode: GenerationMode) -> None:
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 13, [op.label for op in operations]
    failures = []
    for operation in operations:
        try:
            fuzz(operation, mode, server.url)
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no valid input could be generated"
            # An operation without parameters or body has no invalid input to send.
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {type(exc).__name__}: {exc}")
    assert not failures, "\n\n".join(failures)
    handled = sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{server.url}/metrics").text.splitlines()
        if line.startswith("syncbn_http_request_duration_seconds_count")
    )
    assert handled >= 5 * len(operations), f"only {handled:g} requests reached the server"
