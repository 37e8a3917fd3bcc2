"""Models through the real service: GET /v1/models lists the built-ins and a real plugin package installed with
pip, an unknown name is a 422 that names the field and offers close matches, and the plugin's model trains to the
end through the REST API, with its checkpoints and final model in the configured run storage (`storage_uri`,
here a folder outside the data folder) from which GET /v1/jobs/{id}/model reads it.

About 40 s on two cores (one short 2-worker run).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from service.settings import Settings
from tests.service.conftest_api import LiveServer, read_events, tiny_spec

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(ray_cluster: dict, model_plugin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("models-data")
    storage = tmp_path_factory.mktemp("shared-storage")  # stands for an NFS mount every node reaches
    with LiveServer(Settings(data_dir=data_dir, storage_uri=str(storage))) as live:
        yield live


def test_models_lists_builtins_and_the_installed_plugin(server: LiveServer, model_plugin: str) -> None:
    with server.client() as client:
        body = client.get("/v1/models").json()
    by_name = {entry["name"]: entry for entry in body["data"]}
    assert body["count"] == len(body["data"])
    assert {"resnet18", "small_resnet", "cnn", "mlp"} <= set(by_name)
    assert by_name["small_resnet"]["package"] == "syncbn"
    assert by_name[model_plugin] == {
        "name": model_plugin,
        "package": "syncbn-example-models",
        "summary": "Two conv-BatchNorm-ReLU layers, global average pooling and a linear head.",
    }


def test_the_model_field_is_a_name_read_from_the_models_list(server: LiveServer) -> None:
    with server.client() as client:
        schema = client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]
    assert schema["model"]["type"] == "string" and "enum" not in schema["model"]
    assert schema["model"]["x-options-from"] == "/v1/models"
    assert schema["precision"]["enum"] == ["fp32", "bf16", "fp16"]
    assert schema["channels_last"]["type"] == schema["compile"]["type"] == "boolean"


def test_unknown_models_and_cpu_fp16_are_422_naming_the_field(server: LiveServer) -> None:
    with server.client() as client:
        typo = client.post("/v1/jobs", json=tiny_spec(model="tiny_convnt"))
        assert typo.status_code == 422, typo.text
        body = typo.json()
        assert "did you mean 'tiny_convnet'" in body["detail"] and "GET /v1/models" in body["detail"]
        assert body["errors"][0]["loc"] == ["body", "model"] and body["errors"][0]["field"] == "model"
        code = client.post("/v1/jobs", json=tiny_spec(model="os/system"))
        assert code.status_code == 422 and "is not a model this service can build" in code.json()["detail"]
        fp16 = client.post("/v1/jobs", json=tiny_spec(precision="fp16"))
        assert fp16.status_code == 422 and "precision 'fp16' needs use_gpu=true" in fp16.json()["detail"]
        assert client.get("/v1/jobs").json()["count"] == 0  # nothing was queued


def test_a_plugin_model_trains_and_its_model_is_read_from_the_run_storage(
    server: LiveServer, model_plugin: str
) -> None:
    from service.engine.model_registry import build_model

    spec = tiny_spec(model=model_plugin, precision="bf16", channels_last=True, checkpoint_every=1)
    with server.client() as client:
        created = client.post("/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        read_events(client, job_id, timeout=240)
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job["error"]
        assert job["spec"]["precision"] == "bf16" and job["spec"]["channels_last"] is True
        assert job["has_model"] is True

        run_folder = Path(server.settings.storage_uri) / f"syncbn-{job_id}"
        stored = sorted(run_folder.glob("checkpoint_*/model.pt"))
        assert len(stored) == 1, "the final model lives in the run storage, in the run's last checkpoint"
        assert not list(server.settings.jobs_dir().glob(f"{job_id}/**/*.pt")), "nothing kept on the node's disk"

        response = client.get(f"/v1/jobs/{job_id}/model")
        assert response.status_code == 200
        assert response.content == stored[0].read_bytes()
        model = build_model(model_plugin, (1, 8, 8), 10)
        model.load_state_dict(torch.load(io.BytesIO(response.content), weights_only=True), strict=True)

        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert not run_folder.exists(), "deleting a job removes its checkpoints and model from the storage"


def test_a_model_outside_the_run_folder_is_never_served(server: LiveServer, tmp_path: Path) -> None:
    from service.engine.storage import RunStorage

    storage = RunStorage(server.settings.storage_uri)
    outside = tmp_path / "model.pt"
    outside.write_bytes(b"secret")
    (Path(storage.uri) / "syncbn-other").mkdir()
    link = Path(storage.uri) / "syncbn-other" / "model.pt"
    link.symlink_to(outside)
    assert storage.find_model("other", str(link)) is None, "a symlink out of the storage is refused"
    assert storage.find_model("other", str(outside)) is None
    assert storage.find_model("job", str(link)) is None, "another job's folder is refused"
