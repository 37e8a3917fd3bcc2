"""JobSpec validation: bounds, unknown fields, cross-field sentences, npz paths confined to the data root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.spec import JobSpec, load_spec_file, resolve_npz_path


def _error_text(data: dict) -> str:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    return str(info.value)


def test_defaults_validate_and_round_trip() -> None:
    spec = JobSpec()
    assert spec.model == "small_resnet" and spec.dataset.kind == "digits" and spec.sync_bn
    again = JobSpec.model_validate(spec.model_dump())
    assert again == spec
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_schema_example_is_valid_and_documented() -> None:
    schema = JobSpec.model_json_schema()
    (example,) = schema["examples"]
    JobSpec.model_validate(example)
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"field {name} has no description"


def test_non_sgd_round_trip_keeps_defaults_of_unused_fields() -> None:
    spec = JobSpec.model_validate({"optimizer": {"name": "adamw", "lr": 1e-3}, "dataset": {"kind": "digits"}})
    assert JobSpec.model_validate(spec.model_dump()) == spec


def test_unknown_field_is_refused() -> None:
    text = _error_text({"epochz": 3})
    assert "epochz" in text and "Extra inputs are not permitted" in text
    assert "lrr" in _error_text({"optimizer": {"lrr": 0.1}})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"workers": 0}, "workers"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"cpus_per_worker": 0.3}, "cpus_per_worker"),
        ({"optimizer": {"lr": 0}}, "lr"),
        ({"optimizer": {"momentum": 1.0}}, "momentum"),
        ({"stats_every": 0}, "stats_every"),
        ({"max_failures": -1}, "max_failures"),
        ({"model": "../vgg"}, "model"),
        ({"dataset": {"kind": "imagenet"}}, "kind"),
        ({"sync_group_size": 1}, "sync_group_size"),
        ({"placement_strategy": "STRICT_PACK"}, "placement_strategy"),
    ],
)
def test_bounds(data: dict, field: str) -> None:
    assert field in _error_text(data)


@pytest.mark.parametrize(
    ("data", "sentence"),
    [
        ({"workers": 4, "sync_group_size": 3}, "sync_group_size must divide workers"),
        ({"workers": 4, "sync_group_size": 2, "sync_bn": False}, "sync_group_size needs sync_bn=true"),
        ({"dataset": {"kind": "npz"}}, "dataset.path is required"),
        ({"dataset": {"kind": "digits", "path": "a.npz"}}, "dataset.path applies to npz data only"),
        ({"dataset": {"kind": "digits", "num_classes": 3}}, "dataset.num_classes applies to synthetic"),
        ({"optimizer": {"name": "adam", "momentum": 0.5}}, "optimizer.momentum applies to sgd only"),
        ({"optimizer": {"momentum": 0.0, "nesterov": True}}, "optimizer.nesterov needs momentum > 0"),
        ({"early_stop": {}}, "early_stop needs target_val_acc and/or patience"),
        ({"epochs": 2, "lr_schedule": {"warmup_epochs": 2}}, "warmup_epochs must be smaller than epochs"),
        ({"lr_schedule": {"name": "cosine", "gamma": 0.5}}, "lr_schedule.gamma applies to the step schedule"),
        (
            {"model": "cnn", "dataset": {"kind": "synthetic", "input_shape": [20]}},
            "needs image samples",
        ),
        ({"dataset": {"kind": "synthetic", "input_shape": [8, 8]}}, "[channels, height, width]"),
        ({"workers": 64, "dataset": {"kind": "synthetic", "num_samples": 32}}, "fewer than workers=64"),
        ({"optimizer": {"lr": 0.01}, "lr_schedule": {"name": "cosine", "min_lr": 0.1}}, "must not exceed"),
    ],
)
def test_cross_field_sentences(data: dict, sentence: str) -> None:
    assert sentence in _error_text(data)


@pytest.mark.parametrize(
    ("path", "sentence"),
    [
        ("/etc/passwd.npz", "absolute path"),
        ("../outside.npz", "contains '..'"),
        ("sub/../../x.npz", "contains '..'"),
        ("data.txt", "must name a .npz file"),
        ("a\\b.npz", "'/' separators"),
        ("", "non-empty"),
    ],
)
def test_npz_path_must_be_relative_and_confined(path: str, sentence: str) -> None:
    assert sentence in _error_text({"dataset": {"kind": "npz", "path": path}})


def test_resolve_npz_path_under_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.npz").write_bytes(b"x")
    assert resolve_npz_path("sub/ok.npz", root) == (root / "sub" / "ok.npz").resolve()
    with pytest.raises(ValueError, match="does not exist under the data root"):
        resolve_npz_path("missing.npz", root)


def test_resolve_npz_path_refuses_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.npz"
    secret.write_bytes(b"x")
    os.symlink(secret, root / "link.npz")
    with pytest.raises(ValueError, match="outside the data root"):
        resolve_npz_path("link.npz", root)


def test_load_spec_file_json_and_yaml(tmp_path: Path) -> None:
    data = {"model": "mlp", "epochs": 3, "dataset": {"kind": "synthetic", "input_shape": [12]}}
    json_path = tmp_path / "spec.json"
    json_path.write_text(json.dumps(data))
    yaml_path = tmp_path / "spec.yaml"
    yaml_path.write_text("model: mlp\nepochs: 3\ndataset:\n  kind: synthetic\n  input_shape: [12]\n")
    assert load_spec_file(json_path) == load_spec_file(yaml_path) == JobSpec.model_validate(data)
    bad = tmp_path / "spec.toml"
    bad.write_text("")
    with pytest.raises(ValueError, match=r"\.json, \.yaml or \.yml"):
        load_spec_file(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ValueError, match="mapping of fields"):
        load_spec_file(scalar)


def test_resources() -> None:
    spec = JobSpec(workers=4, cpus_per_worker=0.5)
    assert spec.resources() == {"CPU": 2.0, "GPU": 0.0}
    assert spec.torch_threads() == 1
