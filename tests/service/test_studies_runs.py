"""A study through REST, trained for real: 2 arms (sync_bn true / false) x 2 seeds of a tiny digits job on 2 CPU
workers each, with the service restarted while its trials run. The study completes with exactly one job per
(arm, seed), none of which ran twice (one `running` transition each, no `resumed` event), and its verdict is what
the test recomputes from the trials' stored metrics and layer summaries, read through the API's own routes, with
`service.store.verdict`'s functions.

Real parts: a uvicorn server (`LiveServer`) on the session's local Ray, an SQLite file; the restart is a second
server on the same data folder (the runs live in Ray and are re-attached, as after `syncbn serve` restarts).
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from scipy import stats

from service.settings import Settings
from service.store.verdict import ArmResult, default_margin, paired_difference, study_verdict
from tests.service.conftest_api import LiveServer, read_events, tiny_spec, wait_for

# Whole studies trained for real (4 to 6 trials each): `make test-slow` runs them (and .ci/run runs that).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _study_body() -> dict:
    base = tiny_spec(name="tiny-study", epochs=1, steps_per_epoch=3, stats_every=1, batch_size=8)
    return {"name": "tiny study", "base": base, "seeds": 2}


def _recompute(client: httpx.Client, study: dict) -> dict:
    """Per arm: best val_acc per seed, mean samples/s and wall time per trial, from the metrics routes."""
    arms: list[dict] = [{"values": {}, "speeds": [], "walls": []} for _ in study["arms"]]
    for trial in study["trials"]:
        job = client.get(f"/v1/jobs/{trial['job_id']}").json()
        metrics = client.get(f"/v1/jobs/{trial['job_id']}/metrics").json()
        accuracies = [e["val_acc"] for e in metrics["epochs"] if e["val_acc"] is not None]
        speeds = [s["samples_per_s"] for s in metrics["steps"] if s["samples_per_s"] is not None]
        arm = arms[trial["arm"]]
        arm["values"][trial["seed"]] = max(accuracies)
        arm["speeds"].append(float(np.mean(speeds)))
        wall = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
        arm["walls"].append(wall.total_seconds())
    return {"arms": arms}


def test_a_study_survives_a_restart_and_its_verdict_is_the_stored_metrics(ray_cluster: dict, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_concurrent_jobs=2, poll_interval_s=0.2)
    first = LiveServer(settings).start()
    try:
        with first.client() as client:
            created = client.post("/v1/studies", json=_study_body())
            assert created.status_code == 201, created.text
            study = created.json()
            assert study["status"] == "queued" and study["verdict"] is None
            assert [(t["arm"], t["seed"]) for t in study["trials"]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
            wait_for(
                lambda: client.get(f"/v1/studies/{study['id']}").json()["status"] == "running",
                120,
                "a trial to start",
            )
            running = wait_for(
                lambda: [
                    t for t in client.get(f"/v1/studies/{study['id']}").json()["trials"] if t["status"] == "running"
                ],
                120,
                "a trial running",
            )
    finally:
        first.stop()

    second = LiveServer(settings).start()
    try:
        with second.client() as client:
            final = wait_for(
                lambda: (
                    (s := client.get(f"/v1/studies/{study['id']}").json())["status"]
                    in ("succeeded", "failed", "cancelled")
                    and s
                ),
                1200,
                "the study to end",
                interval=1.0,
            )
            assert final["status"] == "succeeded", final
            assert running, "the service was restarted while a trial ran"
            listed = client.get("/v1/jobs", params={"study": study["id"]}).json()
            assert listed["count"] == 4, "one job per (arm, seed): nothing was submitted twice"
            assert sorted((j["study_arm"], j["study_seed"]) for j in listed["data"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
            for job in listed["data"]:
                assert job["status"] == "succeeded" and job["study_id"] == study["id"]
                assert job["spec"]["seed"] == job["study_seed"]
                assert job["spec"]["sync_bn"] is (job["study_arm"] == 0)
                events = read_events(client, job["id"], timeout=30)
                statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
                assert statuses == ["queued", "running", "succeeded"], (job["id"], statuses)
                assert not [e for e in events if e["event"] == "resumed"], "no trial ran twice"

            # The verdict, recomputed from what the API serves of the trials.
            got = _recompute(client, final)
            arms = [ArmResult(a["values"], a["speeds"], a["walls"]) for a in got["arms"]]
            reference = list(got["arms"][0]["values"].values())
            margin = default_margin("val_accuracy", float(np.mean(reference)))
            local = [t["job_id"] for t in final["trials"] if t["arm"] == 1]
            shares: dict[str, list[float]] = {}
            for job_id in local:
                matrix = client.get(
                    f"/v1/jobs/{job_id}/layer-summaries", params={"keys": "skew_between_share_mean"}
                ).json()
                for layer, row in zip(matrix["layers"], matrix["values"]["skew_between_share_mean"], strict=True):
                    shares.setdefault(layer, []).extend(v for v in row if v is not None)
            expected = study_verdict(
                arms,
                metric="val_accuracy",
                confidence=0.95,
                margin=margin,
                labels=["sync_bn=true", "sync_bn=false"],
                sync_only=True,
                layer_shares=shares,
            )
            assert expected is not None
            verdict = final["verdict"]
            assert verdict["outcome"] == expected.outcome and verdict["sentence"] == expected.sentence
            assert verdict["margin"] == pytest.approx(margin)
            diff = paired_difference(got["arms"][0]["values"], got["arms"][1]["values"], 0.95)
            assert verdict["difference"]["mean"] == pytest.approx(diff.mean, abs=1e-12)
            assert verdict["difference"]["n_pairs"] == 2
            pairs = [got["arms"][0]["values"][s] - got["arms"][1]["values"][s] for s in (0, 1)]
            if np.std(pairs) > 0:  # scipy's own paired test on the same numbers
                ttest = stats.ttest_rel(
                    [got["arms"][0]["values"][s] for s in (0, 1)], [got["arms"][1]["values"][s] for s in (0, 1)]
                )
                assert verdict["difference"]["p_value"] == pytest.approx(ttest.pvalue, rel=1e-9)
                half = stats.t.ppf(0.975, 1) * np.std(pairs, ddof=1) / math.sqrt(2)
                assert verdict["difference"]["ci_low"] == pytest.approx(diff.mean - half, abs=1e-12)
            for index, arm in enumerate(verdict["arms"]):
                assert arm["n"] == 2
                assert arm["mean"] == pytest.approx(np.mean(list(got["arms"][index]["values"].values())))
                assert arm["samples_per_s"] == pytest.approx(np.mean(got["arms"][index]["speeds"]), rel=1e-9)
                assert arm["wall_s"] == pytest.approx(np.mean(got["arms"][index]["walls"]), abs=1e-3)
            ratio = np.mean(got["arms"][1]["speeds"]) / np.mean(got["arms"][0]["speeds"])
            assert verdict["cost_ratio"] == pytest.approx(ratio, rel=1e-9)
            assert verdict["layers"] and verdict["layers"] == [
                {**layer, "between_share_mean": pytest.approx(layer["between_share_mean"], rel=1e-6)}
                for layer in expected.layers
            ]
            print("tiny study verdict:", verdict["sentence"])
    finally:
        second.stop()


def test_an_early_stop_study_settles_after_two_pairs_and_its_last_seed_never_runs(
    ray_cluster: dict, tmp_path: Path
) -> None:
    """Two arms that train the same thing (all ranks as one group, or a group of both ranks): every seed gives the
    same accuracy in both, so after 2 pairs the interval is the point 0, wholly inside the margin band. One trial
    at a time: the third seed's two trials are still queued then, and the leader cancels them."""
    settings = Settings(data_dir=tmp_path / "data", max_concurrent_jobs=1, poll_interval_s=0.2)
    base = tiny_spec(name="settles", epochs=1, steps_per_epoch=2, stats_every=10, batch_size=8)
    body = {"base": base, "arms": [{"sync_group_size": None}, {"sync_group_size": 2}], "seeds": 3, "early_stop": True}
    server = LiveServer(settings).start()
    try:
        with server.client() as client:
            created = client.post("/v1/studies", json=body)
            assert created.status_code == 201, created.text
            study_id = created.json()["id"]
            final = wait_for(
                lambda: (
                    (s := client.get(f"/v1/studies/{study_id}").json())["status"] != "running"
                    and s["status"] != "queued"
                    and s
                ),
                900,
                "the study to end",
                interval=1.0,
            )
            assert final["status"] == "succeeded", final
            statuses = {(t["arm"], t["seed"]): t["status"] for t in final["trials"]}
            assert statuses == {
                (0, 0): "succeeded",
                (1, 0): "succeeded",
                (0, 1): "succeeded",
                (1, 1): "succeeded",
                (0, 2): "cancelled",
                (1, 2): "cancelled",
            }
            verdict = final["verdict"]
            assert verdict["outcome"] == "does_not_pay", verdict
            assert verdict["difference"]["n_pairs"] == 2
            assert -0.005 < verdict["difference"]["ci_low"] <= verdict["difference"]["ci_high"] < 0.005
            assert final["stopped_early"]["paired_seeds"] == 2 and final["stopped_early"]["cancelled_trials"] == 2
            assert verdict["sentence"].endswith("It stopped early after 2 paired seeds (2 queued trials not run).")
            for trial in final["trials"]:
                if trial["status"] == "cancelled":
                    job = client.get(f"/v1/jobs/{trial['job_id']}").json()
                    assert job["started_at"] is None
                    assert job["error"] == "cancelled before it started: its study settled early, after 2 paired seeds"
    finally:
        server.stop()


def test_syncbn_study_runs_a_study_on_the_local_ray_and_prints_its_stored_verdict(
    ray_cluster: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`syncbn study SPEC --json` in this process (on the session's Ray): 2 arms x 2 seeds of one-worker trials,
    as many at once as the 4 CPUs fit; what it prints is study.json, and the verdict is the one derived again from
    the syncbn.db it leaves in the output folder. A bad spec is refused before anything runs (exit 2)."""
    from service.cli import main
    from service.store import JobStore
    from service.store.study_results import read_study

    base = tiny_spec(name="cli study", workers=1, epochs=1, steps_per_epoch=2, stats_every=1, batch_size=8)
    spec_path = tmp_path / "study.json"
    spec_path.write_text(json.dumps({"base": base, "seeds": 2}), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["study", str(spec_path), "--output", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((out / "study.json").read_text(encoding="utf-8"))
    assert printed["status"] == "succeeded" and [t["status"] for t in printed["trials"]] == ["succeeded"] * 4
    store = JobStore(f"sqlite:///{out / 'syncbn.db'}")
    try:
        (row,) = store.list_studies()[0]
        state = read_study(store, row)
        assert row.id == printed["id"]
        assert printed["verdict"]["sentence"] == state.verdict.sentence
        assert printed["verdict"]["difference"]["mean"] == pytest.approx(state.verdict.comparisons[0].difference.mean)
        assert [a["n"] for a in printed["verdict"]["arms"]] == [2, 2]
    finally:
        store.close()

    spec_path.write_text(json.dumps({"base": base, "seeds": 1}), encoding="utf-8")
    assert main(["study", str(spec_path), "--output", str(tmp_path / "refused")]) == 2
    assert "seeds must be between 2 and 10 (got 1)" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
