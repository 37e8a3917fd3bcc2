"""The studies routes on a real uvicorn server and the session's local Ray, with scheduling paused
(max_concurrent_jobs=0, so trials stay queued and nothing trains): a study queues one job per (arm, seed) for its
owner, all at once; `GET /v1/jobs?study=` lists them; another principal's study is a 404 on every route and absent
from listings, admins see it; DELETE cancels the queued trials and the study reads `cancelled`; bad specs are 422s
with a sentence naming the field, and queue nothing (a spec one arm of which can never fit included).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.client import AsyncClient, Client
from service.settings import Settings
from tests.service.conftest_api import LiveServer, tiny_spec

pytestmark = pytest.mark.timeout(180)

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"
ROOT = "root-token-0123456789abcdefg"


@pytest.fixture(scope="module")
def server(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("studies"),
        api_tokens=[f"alice={ALICE}", f"bob={BOB}", f"root={ROOT}"],
        admins=["root"],
        max_concurrent_jobs=0,
        cancel_wait_s=0,
    )
    with LiveServer(settings) as live:
        yield live


def _body(**overrides: Any) -> dict[str, Any]:
    return {"name": "paused study", "base": tiny_spec(), "seeds": 2, **overrides}


def test_a_study_queues_one_job_per_arm_and_seed_for_its_owner(server: LiveServer) -> None:
    with server.client(token=ALICE) as alice:
        created = alice.post("/v1/studies", json=_body(seeds=[4, 9]))
        assert created.status_code == 201, created.text
        study = created.json()
        assert created.headers["location"] == f"/v1/studies/{study['id']}"
        assert (study["owner"], study["status"], study["verdict"]) == ("alice", "queued", None)
        assert study["arms"] == [
            {"arm": 0, "label": "sync_bn=true", "overrides": {"sync_bn": True}},
            {"arm": 1, "label": "sync_bn=false", "overrides": {"sync_bn": False}},
        ]
        assert [(t["arm"], t["seed"], t["status"]) for t in study["trials"]] == [
            (0, 4, "queued"),
            (1, 4, "queued"),
            (0, 9, "queued"),
            (1, 9, "queued"),
        ]
        trials = alice.get("/v1/jobs", params={"study": study["id"]}).json()
        assert trials["count"] == 4
        by_id = {job["id"]: job for job in trials["data"]}
        for trial in study["trials"]:
            job = by_id[trial["job_id"]]
            assert job["owner"] == "alice" and job["status"] == "queued" and job["queue_position"] is not None
            assert (job["study_id"], job["study_arm"], job["study_seed"]) == (study["id"], trial["arm"], trial["seed"])
            assert job["spec"]["seed"] == trial["seed"] and job["spec"]["sync_bn"] is (trial["arm"] == 0)
            assert job["spec"]["batch_size"] == 16 and job["spec"]["name"].startswith("paused study [sync_bn=")
        assert alice.get(f"/v1/studies/{study['id']}").json() == study
        assert study["id"] in [s["id"] for s in alice.get("/v1/studies").json()["data"]]
        # The stored spec reads back as it was sent: arms list only what they override.
        again = alice.post("/v1/studies", json={**study["spec"], "name": "again"})
        assert again.status_code == 201, again.text
        assert again.json()["spec"]["arms"] == study["spec"]["arms"] == [{"sync_bn": True}, {"sync_bn": False}]
        alice.delete(f"/v1/studies/{again.json()['id']}")


def test_another_principals_study_is_a_404_and_admins_see_it(server: LiveServer) -> None:
    with server.client(token=ALICE) as alice:
        study = alice.post("/v1/studies", json=_body()).json()
    with server.client(token=BOB) as bob:
        for method in ("GET", "DELETE"):
            foreign = bob.request(method, f"/v1/studies/{study['id']}")
            unknown = bob.request(method, f"/v1/studies/{uuid.uuid4().hex}")
            assert foreign.status_code == unknown.status_code == 404, (method, foreign.text)
            assert "no study with id" in foreign.json()["detail"]
        assert study["id"] not in [s["id"] for s in bob.get("/v1/studies").json()["data"]]
        assert bob.get("/v1/jobs", params={"study": study["id"]}).json() == {"data": [], "count": 0}
    with server.client(token=ROOT) as root:
        assert root.get(f"/v1/studies/{study['id']}").json()["owner"] == "alice"
        assert study["id"] in [s["id"] for s in root.get("/v1/studies", params={"limit": 100}).json()["data"]]
    with server.client(token=ALICE) as alice:
        assert alice.get(f"/v1/studies/{study['id']}").json()["status"] == "queued", "bob's DELETE did nothing"
        alice.delete(f"/v1/studies/{study['id']}")


def test_delete_cancels_the_queued_trials_and_keeps_the_study(server: LiveServer) -> None:
    with server.client(token=ALICE) as alice:
        study = alice.post("/v1/studies", json=_body()).json()
        cancelled = alice.delete(f"/v1/studies/{study['id']}")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert {t["status"] for t in cancelled.json()["trials"]} == {"cancelled"}
        for trial in study["trials"]:
            job = alice.get(f"/v1/jobs/{trial['job_id']}").json()
            assert job["status"] == "cancelled" and job["error"] == "cancelled before it started"
        assert alice.get(f"/v1/studies/{study['id']}").json()["status"] == "cancelled"
        assert alice.delete(f"/v1/studies/{study['id']}").json()["status"] == "cancelled", "twice is harmless"


BAD_SPECS = [
    ({"arms": [{"sync_bn": True}, {"epochs": 3}]}, ["arms.1.epochs", "not a known field"]),
    ({"arms": [{"sync_bn": True}, {"sync_bn": False, "sync_group_size": 2}]}, ["arms[1]", "sync_group_size"]),
    ({"arms": [{"sync_bn": True}, {"batch_size": 0}]}, ["arms.1.batch_size", "greater than or equal to 1"]),
    ({"arms": [{"sync_bn": True}, {"sync_bn": True}]}, ["arms[1] runs the same job as arms[0]"]),
    ({"arms": [{"sync_bn": True}]}, ["arms", "at least 2"]),
    ({"arms": [{"workers": w} for w in range(1, 10)]}, ["arms", "at most 8"]),
    ({"seeds": 1}, ["seeds must be between 2 and 10"]),
    ({"seeds": 11}, ["seeds must be between 2 and 10"]),
    ({"seeds": [1, 2, 1]}, ["seeds must be distinct", "[1]"]),
    ({"metric": "val_f1"}, ["metric", "val_accuracy", "val_loss"]),
    ({"confidence": 1.0}, ["confidence", "less than 1"]),
    ({"base": tiny_spec(batch_size=0)}, ["base.batch_size"]),
    ({"base": tiny_spec(model="no_such_model")}, ["model", "no_such_model"]),
    ({"surprise": 1}, ["surprise", "not a known field"]),
    # Admission: arm 1 asks for more CPUs than the cluster has (4): nothing is queued, the sentence names the arm.
    ({"arms": [{"sync_bn": True}, {"workers": 64}]}, ["arms[1] (workers=64)", "CPUs"]),
]


@pytest.mark.parametrize(("change", "words"), BAD_SPECS, ids=[str(words[0]) for _, words in BAD_SPECS])
def test_bad_specs_are_422s_naming_the_field_and_queue_nothing(
    server: LiveServer, change: dict[str, Any], words: list[str]
) -> None:
    with server.client(token=ALICE) as alice:
        before = alice.get("/v1/jobs").json()["count"], alice.get("/v1/studies").json()["count"]
        answer = alice.post("/v1/studies", json=_body(**change))
        assert answer.status_code == 422, answer.text
        detail = answer.json()["detail"]
        for word in words:
            assert word in detail, (word, detail)
        assert (alice.get("/v1/jobs").json()["count"], alice.get("/v1/studies").json()["count"]) == before


def test_both_clients_submit_read_list_and_cancel_studies(server: LiveServer) -> None:
    import asyncio

    with Client(server.url, token=ALICE) as client:
        study = client.submit_study({"base": tiny_spec(), "seeds": 2, "name": "from the client"})
        assert study.status == "queued" and len(study.trials) == 4 and study.verdict is None
        assert client.study(study.id) == study
        assert study.id in [s.id for s in client.studies()]
        assert client.cancel_study(study.id).status == "cancelled"
        # Every trial ended (cancelled), so the stream ends by itself: the study, 8 transitions, the study again.
        events = list(client.study_events(study.id))
        assert [e.type for e in events] == ["study"] + ["trial"] * 8 + ["study"]
        assert events[0].data["id"] == study.id and events[-1].data["status"] == "cancelled"
        trials = [e for e in events if e.type == "trial"]
        assert sorted((e.data["job_id"], e.data["status"]) for e in trials) == sorted(
            (t.job_id, status) for t in study.trials for status in ("queued", "cancelled")
        )
        assert all(isinstance(e.id, str) and e.id.count(".") == 3 for e in trials), "dotted cursors, kept whole"
        resumed = list(client.study_events(study.id, last_event_id=trials[5].id))
        assert [e.id for e in resumed if e.type == "trial"] == [e.id for e in trials[6:]]

    async def use_async() -> None:
        async with AsyncClient(server.url, token=ALICE) as client:
            study = await client.submit_study({"base": tiny_spec(), "seeds": 2})
            assert (await client.study(study.id)).id == study.id
            assert study.id in [s.id async for s in client.studies()]
            assert (await client.cancel_study(study.id)).status == "cancelled"
            events = [e async for e in client.study_events(study.id)]
            assert [e.type for e in events] == ["study"] + ["trial"] * 8 + ["study"]

    asyncio.run(use_async())


def _study_events(client: httpx.Client, study_id: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    """Read a study's SSE stream until the server ends it; each event as {id, event, data}."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    timeout = httpx.Timeout(60, connect=10)
    with client.stream("GET", f"/v1/studies/{study_id}/events", headers=headers, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line == "":
                if "data" in current:
                    events.append(current)
                current = {}
            elif not line.startswith((":", "retry:")):
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return events


def test_study_events_replay_the_trials_transitions_and_resume_after_an_id(server: LiveServer) -> None:
    with server.client(token=ALICE) as alice:
        study = alice.post("/v1/studies", json=_body()).json()
        alice.delete(f"/v1/studies/{study['id']}")  # every trial ends (cancelled), so the stream ends by itself
        events = _study_events(alice, study["id"])
        assert events[0]["event"] == "study" and events[0]["data"]["id"] == study["id"]
        trial_events = [e for e in events if e["event"] == "trial"]
        assert sorted((e["data"]["job_id"], e["data"]["status"]) for e in trial_events) == sorted(
            (t["job_id"], status) for t in study["trials"] for status in ("queued", "cancelled")
        )
        assert events[-1]["event"] == "study" and events[-1]["data"]["status"] == "cancelled"
        assert trial_events[-1]["id"].count(".") == 3, "one position per trial"
        resumed = _study_events(alice, study["id"], last_event_id=trial_events[3]["id"])
        assert [e["id"] for e in resumed if e["event"] == "trial"] == [e["id"] for e in trial_events[4:]]
        assert _study_events(alice, study["id"], last_event_id="1.2")[0]["event"] == "study"
    with server.client(token=BOB) as bob:
        assert bob.get(f"/v1/studies/{study['id']}/events").status_code == 404


def test_syncbn_submit_study_queues_it_and_refuses_a_bad_file(
    server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    good = tmp_path / "study.yaml"
    good.write_text(yaml.safe_dump({"name": "from the cli", "base": tiny_spec(), "seeds": 2}))
    assert main(["submit", "--study", str(good), "--url", server.url, "--token", ALICE, "--json"]) == 0
    study = json.loads(capsys.readouterr().out)
    assert study["name"] == "from the cli" and len(study["trials"]) == 4 and study["owner"] == "alice"
    with server.client(token=ALICE) as alice:
        alice.delete(f"/v1/studies/{study['id']}")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base": tiny_spec(), "seeds": 1}))
    assert main(["submit", "--study", str(bad), "--url", server.url, "--token", ALICE]) == 2
    assert "seeds must be between 2 and 10" in capsys.readouterr().err


def test_the_verdict_table_shows_every_arm_and_the_sentence() -> None:
    from service.api.models import VerdictPublic
    from service.store.verdict import ArmResult, study_verdict
    from service.study_submit import format_verdict

    verdict = study_verdict(
        [ArmResult({0: 0.9, 1: 0.8, 2: 0.85}, [100.0], [10.0]), ArmResult({0: 0.7, 1: 0.62, 2: 0.66}, [200.0], [6.0])],
        metric="val_accuracy",
        confidence=0.95,
        margin=0.005,
        labels=["sync_bn=true", "sync_bn=false"],
        sync_only=True,
    )
    table = format_verdict(VerdictPublic.from_verdict(verdict, ["sync_bn=true", "sync_bn=false"]))
    lines = table.splitlines()
    assert lines[1].split()[:2] == ["sync_bn=true", "85.00"] and lines[2].split()[:2] == ["sync_bn=false", "66.00"]
    assert "reference - sync_bn=false: 19.00 (points)" in lines[3] and lines[3].endswith("cost ratio 2.00: pays")
    assert lines[-1] == verdict.sentence
