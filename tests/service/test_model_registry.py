"""The model registry: built-ins, a real plugin package installed with pip, torchvision where it imports, and the
checks that keep a request from building anything the registry does not list.

Fast (no Ray); installing the plugin package takes a few seconds, once per session.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from service.engine.model_registry import (
    ENTRY_POINT_GROUP,
    UnknownModelError,
    build_model,
    check_model_name,
    list_models,
)
from service.spec import BUILTIN_MODELS, JobSpec

pytestmark = pytest.mark.timeout(120)


def test_builtins_are_listed_with_their_package_and_one_line() -> None:
    entries = {entry.name: entry for entry in list_models()}
    assert set(BUILTIN_MODELS) <= set(entries)
    for name in BUILTIN_MODELS:
        assert entries[name].package == "syncbn" and entries[name].source == "builtin"
        assert entries[name].summary and "\n" not in entries[name].summary
    model = build_model("small_resnet", (1, 8, 8), 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 9


def test_unknown_names_are_refused_with_close_matches() -> None:
    with pytest.raises(UnknownModelError) as caught:
        build_model("smal_resnet", (1, 8, 8), 10)
    assert caught.value.matches[0] == "small_resnet"
    assert "did you mean 'small_resnet'" in str(caught.value) and "GET /v1/models" in str(caught.value)
    # Something that looks like code is just an unknown name: nothing is imported.
    with pytest.raises(UnknownModelError):
        check_model_name("os.system")
    assert pickle.loads(pickle.dumps(caught.value)).matches == caught.value.matches  # crosses Ray processes


def test_the_spec_accepts_names_only() -> None:
    assert JobSpec(model="torchvision/resnet50").model == "torchvision/resnet50"
    for bad in ("../evil", "a/b/c", "", "x" * 101, "rm -rf", "pkg:factory"):
        with pytest.raises(ValidationError, match="model"):
            JobSpec(model=bad)


def test_plugin_entry_point_is_listed_and_builds(model_plugin: str) -> None:
    entries = {entry.name: entry for entry in list_models()}
    entry = entries[model_plugin]
    assert entry.package == "syncbn-example-models" and entry.source == "entry_point"
    assert entry.summary == "Two conv-BatchNorm-ReLU layers, global average pooling and a linear head."
    model = build_model(model_plugin, (1, 8, 8), 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    check_model_name(model_plugin)
    assert ENTRY_POINT_GROUP == "syncbn.models"


def test_torchvision_models_are_offered_where_torchvision_imports() -> None:
    try:
        import torchvision.models  # noqa: F401
    except Exception as exc:
        pytest.skip(f"torchvision does not import here ({type(exc).__name__}: {exc})")
    names = {entry.name for entry in list_models()}
    assert "torchvision/resnet18" in names
    model = build_model("torchvision/resnet18", (3, 32, 32), 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="3-channel"):
        build_model("torchvision/resnet18", (1, 8, 8), 7)
    with pytest.raises(UnknownModelError, match="torchvision/resnet50"):
        check_model_name("resnet50")
