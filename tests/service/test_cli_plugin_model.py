"""`syncbn train` with a model from a real plugin package (installed with pip from tests/fixtures/model_plugin),
its checkpoints and final model in a given run storage, and a copy of the model in the output folder.

About 30 s on two cores (one short 2-worker run on the session's Ray).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from service.cli import main
from service.engine.model_registry import build_model

pytestmark = pytest.mark.timeout(240)


def test_syncbn_train_trains_a_plugin_model(ray_cluster: dict, model_plugin: str, tmp_path: Path, capsys: Any) -> None:
    spec_path = tmp_path / "plugin.yaml"
    spec_path.write_text(
        f"model: {model_plugin}\nworkers: 2\nepochs: 2\nbatch_size: 16\nsteps_per_epoch: 4\nstats_every: 2\n"
        "precision: bf16\nchannels_last: true\n"
    )
    storage = tmp_path / "storage"
    out = tmp_path / "out"
    code = main(["train", str(spec_path), "--output", str(out), "--storage-uri", str(storage), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    assert summary["status"] == "succeeded" and summary["epochs_done"] == 2
    assert Path(summary["model_uri"]).is_relative_to(storage.resolve() / f"syncbn-{summary['job_id']}")
    assert summary["model_path"] == str(out.resolve() / "model.pt")
    layers = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    layer_names = {name for record in layers if record["kind"] == "layers" for name in record["layers"]}
    assert layer_names == {"1", "4"}, "the plugin's two BatchNorm layers were synchronized and recorded"
    model = build_model(model_plugin, (1, 8, 8), 10)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)


def test_syncbn_train_refuses_an_unknown_model_before_starting(tmp_path: Path, capsys: Any) -> None:
    spec_path = tmp_path / "typo.json"
    spec_path.write_text(json.dumps({"model": "smal_resnet"}))
    assert main(["train", str(spec_path), "--output", str(tmp_path / "out")]) == 2
    assert "did you mean 'small_resnet'" in capsys.readouterr().err
