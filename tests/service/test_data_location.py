"""Where data may come from: the spec's syntax checks and the one resolver (`service.data_location`) refuse
absolute paths, `..`, symlinks that lead out of the data root and schemes the operator did not allow, each with a
sentence naming the field; the settings take `data_root` over from the deprecated `npz_root`. No Ray here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.data_location import check_dataset_locations, resolve_data_uri
from service.settings import Settings
from service.spec import DatasetSpec, JobSpec

IMAGES = {"kind": "image_folder", "uri": "digits", "image_size": [8, 8], "channels": 1}


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("/etc/passwd", "dataset.uri must be relative to the data root"),
        ("a/../../b", "dataset.uri must stay under the data root"),
        ("..", "dataset.uri must stay under the data root"),
        ("http://example.com/x", "dataset.uri uses the scheme 'http'"),
        ("file:///etc", "dataset.uri uses the scheme 'file'"),
        ("s3://", "dataset.uri must look like s3://bucket/path"),
        ("s3://bucket/../x", "dataset.uri must look like s3://bucket/path"),
        ("a\\b", "dataset.uri must use '/' separators"),
        (" x", "dataset.uri must be a non-empty relative path"),
    ],
)
def test_spec_refuses_bad_uris_naming_the_field(uri: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        DatasetSpec(**{**IMAGES, "uri": uri})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image_size": None}, "dataset.image_size is required"),
        ({"uri": None}, "dataset.uri is required when dataset.kind is 'image_folder'"),
        ({"image_column": "img"}, "dataset.image_column applies to parquet data only"),
        ({"mean": [0.5, 0.5]}, "dataset.mean needs one value per channel"),
        ({"std": [0.0]}, "dataset.std values must be > 0"),
        ({"val_uri": "val", "val_fraction": 0.3}, "dataset.val_fraction and dataset.val_uri exclude each other"),
        ({"image_size": [0, 8]}, "dataset.image_size entries must lie in 1-4096"),
    ],
)
def test_spec_checks_image_fields(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DatasetSpec(**{**IMAGES, **fields})


def test_image_fields_are_refused_for_other_kinds_and_dumps_validate_again() -> None:
    with pytest.raises(ValidationError, match=r"dataset\.uri applies to image_folder and parquet data only"):
        DatasetSpec(kind="digits", uri="x")
    spec = JobSpec(model="cnn", dataset={**IMAGES, "val_uri": "digits_val"})
    assert spec.dataset.sample_shape() == (1, 8, 8) and spec.dataset.is_streamed
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert JobSpec.model_validate(JobSpec().model_dump(mode="json")) == JobSpec()


def test_resolution_confines_paths_and_follows_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "inside").mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, root / "escape")
    os.symlink(root / "inside", root / "alias")
    assert resolve_data_uri("inside", root) == str((root / "inside").resolve())
    assert resolve_data_uri("alias", root) == str((root / "inside").resolve())  # a link that stays inside is fine
    assert resolve_data_uri("not/there/yet", root).endswith("not/there/yet")  # existence is the job's business
    with pytest.raises(ValueError, match=r"dataset\.uri 'escape' resolves to .* outside the data root"):
        resolve_data_uri("escape", root)
    with pytest.raises(ValueError, match=r"dataset\.val_uri 'escape/x' resolves"):
        resolve_data_uri("escape/x", root, field="dataset.val_uri")
    with pytest.raises(ValueError, match="no data root is configured"):
        resolve_data_uri("inside", None)


def test_remote_schemes_need_the_operators_consent() -> None:
    spec = DatasetSpec(**{**IMAGES, "uri": "s3://bucket/digits"})
    with pytest.raises(ValueError, match=r"dataset\.uri uses s3://, which this service does not allow \(allowed: none"):
        check_dataset_locations(spec, None, [])
    check_dataset_locations(spec, None, ["s3"])
    with pytest.raises(ValueError, match="does not allow"):
        check_dataset_locations(DatasetSpec(**{**IMAGES, "uri": "gs://b/d"}), None, ["s3"])


def test_settings_data_root_takes_over_from_npz_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SYNCBN_"):
            monkeypatch.delenv(name)
    assert Settings(data_dir=tmp_path).resolved_data_root() == (tmp_path / "npz").resolve()
    monkeypatch.setenv("SYNCBN_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("SYNCBN_ALLOWED_URI_SCHEMES", "s3, GS")
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_data_root() == (tmp_path / "data").resolve()
    assert settings.allowed_uri_schemes == ["s3", "gs"]
    monkeypatch.delenv("SYNCBN_DATA_ROOT")
    monkeypatch.setenv("SYNCBN_NPZ_ROOT", str(tmp_path / "old"))
    with pytest.warns(DeprecationWarning, match="SYNCBN_NPZ_ROOT"):
        settings = Settings(data_dir=tmp_path)
    assert settings.resolved_data_root() == settings.resolved_npz_root() == (tmp_path / "old").resolve()
    with pytest.raises(ValidationError, match="allowed_uri_schemes entries must be one of"):
        Settings(data_dir=tmp_path, allowed_uri_schemes="http")
