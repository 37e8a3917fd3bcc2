"""torchvision and timm models for real (`make test-vision`: torch 2.14.1, torchvision, timm): a
`torchvision/resnet18` job and a `timm/efficientnet_b0` job on an image folder the test writes (nothing downloads),
their saved models loading into the libraries' own classes, a converted timm model, and the service refusing at
submit time a 3-channel torchvision model for 1-channel digits, naming both channel counts.

Skipped with the reason where torchvision or timm does not import (`make test`'s torch 2.13.0). Small images, one
short epoch per job: about two minutes on two cores, most of it Ray Train starting worker groups.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import syncbn
from service.cli import main
from service.engine.model_registry import build_model
from service.settings import Settings
from tests.service.conftest_api import LiveServer, tiny_spec
from tests.service.digits_files import write_digits_folder
from tests.vision import skip_without_vision

pytestmark = [pytest.mark.vision, skip_without_vision, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding `digits/`: 600 of scikit-learn's digits as grey png files in class folders."""
    root = tmp_path_factory.mktemp("vision-data")
    write_digits_folder(root / "digits", count=600)
    return root


def _train(spec: dict[str, Any], data_root: Path, out: Path, capsys: Any) -> tuple[int, dict[str, Any]]:
    """`syncbn train` on `spec`; the exit code and the JSON summary."""
    spec_path = out.parent / f"{out.name}.json"
    spec_path.write_text(json.dumps(spec))
    code = main(["train", str(spec_path), "--output", str(out), "--json", "--data-root", str(data_root)])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _layers(out: Path) -> set[str]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {name for r in records if r["kind"] == "layers" for name in r["layers"]}


def _image_job(model: str, channels: int, optimizer: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "dataset": {"kind": "image_folder", "uri": "digits", "image_size": [32, 32], "channels": channels},
        "workers": 2,
        "epochs": 1,
        "batch_size": 16,
        "steps_per_epoch": 6,
        "stats_every": 3,
        "checkpoint_every": 0,
        "optimizer": optimizer,
    }


def test_torchvision_resnet18_trains_on_an_image_folder(
    ray_cluster: dict, data_root: Path, tmp_path: Path, capsys: Any
) -> None:
    import torchvision

    out = tmp_path / "resnet18"
    code, summary = _train(
        _image_job("torchvision/resnet18", channels=3, optimizer={"name": "sgd", "lr": 0.05}), data_root, out, capsys
    )
    assert code == 0, summary
    assert summary["status"] == "succeeded" and summary["verdict"] == "completed" and summary["epochs_done"] == 1
    # Synchronized BatchNorm in torchvision's own layer names, and the saved model is torchvision's resnet18.
    assert {"bn1", "layer1.0.bn1", "layer4.1.bn2", "layer2.0.downsample.1"} <= _layers(out)
    state = torch.load(out / "model.pt", weights_only=True)
    torchvision.models.resnet18(num_classes=10).load_state_dict(state, strict=True)


def test_timm_efficientnet_b0_trains_on_grey_images(
    ray_cluster: dict, data_root: Path, tmp_path: Path, capsys: Any
) -> None:
    import timm

    out = tmp_path / "efficientnet_b0"
    # Adam, as timm trains it: with SGD at lr 0.05 and momentum 0.9 the validation loss after these 6 steps is
    # ~1e9 (the running statistics of 49 layers lag the weights), which is a divergence, and the job says so.
    job = _image_job("timm/efficientnet_b0", channels=1, optimizer={"name": "adam", "lr": 1e-3})
    code, summary = _train(job, data_root, out, capsys)
    assert code == 0, summary
    assert summary["status"] == "succeeded" and summary["verdict"] == "completed" and summary["epochs_done"] == 1
    assert {"bn1", "blocks.0.0.bn1", "bn2"} <= _layers(out)
    state = torch.load(out / "model.pt", weights_only=True)
    timm.create_model("efficientnet_b0", num_classes=10, in_chans=1).load_state_dict(state, strict=True)


def test_a_converted_timm_model_computes_what_timm_computes() -> None:
    torch.manual_seed(0)
    model = build_model("timm/efficientnet_b0", (3, 32, 32), 10)
    converted = syncbn.convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, syncbn.SyncBatchNormAct) for m in converted.modules())
    x = torch.randn(4, 3, 32, 32)
    # timm's BatchNormAct2d layers become SyncBatchNormAct (their drop and act kept). Without a process group a
    # SyncBatchNorm is BatchNorm: the converted model must compute the same, in both modes.
    for train in (True, False):
        model.train(train)
        converted.train(train)
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def server(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer(Settings(data_dir=tmp_path_factory.mktemp("vision-service"))) as live:
        yield live


def test_the_service_lists_torchvision_and_timm_models_with_whole_sentences(server: LiveServer) -> None:
    with server.client() as client:
        body = client.get("/v1/models").json()
    by_name = {entry["name"]: entry for entry in body["data"]}
    assert body["count"] == len(body["data"])
    assert sum(name.startswith("torchvision/") for name in by_name) >= 80
    assert sum(name.startswith("timm/") for name in by_name) >= 1000
    assert by_name["torchvision/resnet50"] == {
        "name": "torchvision/resnet50",
        "package": "torchvision",
        "summary": "ResNet-50 from Deep Residual Learning for Image Recognition.",
    }
    assert by_name["timm/efficientnet_b0"]["package"] == "timm"
    cut = [e for e in body["data"] if e["summary"][-1:] not in (".", "!", "?")]
    assert cut == [], cut[:5]


def test_a_3_channel_model_on_1_channel_digits_is_a_422_naming_both(server: LiveServer) -> None:
    with server.client() as client:
        refused = client.post("/v1/jobs", json=tiny_spec(model="torchvision/resnet18"))
        assert refused.status_code == 422, refused.text
        body = refused.json()
        assert "'torchvision/resnet18' takes 3-channel images" in body["detail"]
        assert "(dataset.kind 'digits') has 1-channel images (1, 8, 8)" in body["detail"]
        assert body["errors"][0]["field"] == "model" and body["errors"][0]["type"] == "model_input"
        grey_folder = {"kind": "image_folder", "uri": "digits", "image_size": [32, 32], "channels": 1}
        folder = client.post("/v1/jobs", json=tiny_spec(model="torchvision/resnet18", dataset=grey_folder))
        assert folder.status_code == 422 and "set dataset.channels to 3" in folder.json()["detail"]
        assert client.get("/v1/jobs").json()["count"] == 0  # nothing was queued
