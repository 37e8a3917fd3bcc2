"""The model registry: built-ins, a real plugin package installed with pip, torchvision and timm where they import
(the `vision` tests: `make test-vision`), whole first sentences as summaries, and the checks that keep a request
from building anything the registry does not list or feeding a model data it cannot take.

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
    ModelInputError,
    UnknownModelError,
    build_model,
    check_model_name,
    first_sentence,
    get_model_entry,
    list_models,
)
from service.spec import BUILTIN_MODELS, JobSpec
from tests.vision import skip_without_vision

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


def test_summaries_are_whole_first_sentences() -> None:
    # torchvision's docstrings wrap their first sentence and name the paper with a reStructuredText link.
    doc = """ResNet-18 from `Deep Residual Learning for Image Recognition
    <https://arxiv.org/abs/1512.03385>`__.

    .. note:: The bottleneck of TorchVision places the stride for downsampling to the second 3x3 convolution.
    """
    assert first_sentence(doc) == "ResNet-18 from Deep Residual Learning for Image Recognition."
    wrapped = "Constructs a ShuffleNetV2 architecture with 0.5x output channels, as described in\n`ShuffleNet V2: " + (
        "Practical Guidelines <https://arxiv.org/abs/1807.11164>`__. More text.\n\nArgs: ..."
    )
    assert first_sentence(wrapped) == (
        "Constructs a ShuffleNetV2 architecture with 0.5x output channels, as described in ShuffleNet V2: "
        "Practical Guidelines."
    )
    assert first_sentence(":class:`~torch.nn.Module` with ``in_chans`` inputs, e.g. grey. Then more.") == (
        "Module with in_chans inputs, e.g. grey."
    )
    assert first_sentence(" EfficientNet-B0 ") == "EfficientNet-B0."  # timm's: a title gets its full stop
    assert first_sentence("") == ""
    # Every model this environment lists (in make test-vision's: torchvision's 80 and timm's) ends a sentence.
    entries = list_models()
    cut = [(e.name, e.summary) for e in entries if not e.summary or e.summary[-1] not in ".!?" or "\n" in e.summary]
    assert cut == [], f"{len(cut)} of {len(entries)} summaries do not end a sentence: {cut[:5]}"


@pytest.mark.vision
@skip_without_vision
def test_torchvision_models_are_offered_where_torchvision_imports() -> None:
    entries = {entry.name: entry for entry in list_models()}
    assert sum(e.source == "torchvision" for e in entries.values()) >= 80
    resnet = entries["torchvision/resnet18"]
    assert resnet.package == "torchvision" and resnet.input_channels == 3
    assert resnet.summary == "ResNet-18 from Deep Residual Learning for Image Recognition."
    model = build_model("torchvision/resnet18", (3, 32, 32), 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ModelInputError, match="3-channel"):
        build_model("torchvision/resnet18", (1, 8, 8), 7)
    with pytest.raises(UnknownModelError, match="torchvision/resnet50"):
        check_model_name("resnet50")


@pytest.mark.vision
@skip_without_vision
def test_a_model_of_fixed_input_channels_is_refused_for_other_data_naming_both() -> None:
    with pytest.raises(ModelInputError) as caught:
        check_model_name("torchvision/resnet18", (1, 8, 8), "digits")
    message = str(caught.value)
    assert "'torchvision/resnet18' takes 3-channel images" in message
    assert "(dataset.kind 'digits') has 1-channel images (1, 8, 8)" in message
    assert "or use a model built for the data's channels" in message and "timm/<name>" in message
    with pytest.raises(ModelInputError, match=r"set dataset\.channels to 3"):
        check_model_name("torchvision/resnet18", (1, 32, 32), "image_folder")
    with pytest.raises(ModelInputError, match=r"samples of shape \(64,\) \(not images\)"):
        check_model_name("torchvision/resnet18", (64,), "synthetic")
    assert pickle.loads(pickle.dumps(caught.value)).args == caught.value.args  # crosses Ray processes
    check_model_name("torchvision/resnet18", (3, 32, 32), "image_folder")
    # Models built for the data's channels take any: the built-ins and timm's (in_chans).
    check_model_name("small_resnet", (1, 8, 8), "digits")
    check_model_name("timm/efficientnet_b0", (1, 8, 8), "digits")


@pytest.mark.vision
@skip_without_vision
def test_timm_models_are_built_for_the_data_sets_channels_and_classes() -> None:
    from timm.layers import BatchNormAct2d

    entry = get_model_entry("timm/efficientnet_b0")
    assert (entry.package, entry.source, entry.input_channels) == ("timm", "timm", None)
    assert entry.summary == "EfficientNet-B0."
    torch.manual_seed(0)
    model = build_model("timm/efficientnet_b0", (1, 16, 16), 10)  # pretrained=False: nothing downloads
    assert model.conv_stem.in_channels == 1 and model.classifier.out_features == 10
    assert sum(isinstance(m, BatchNormAct2d) for m in model.modules()) == 49
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(ModelInputError, match="takes images"):
        build_model("timm/efficientnet_b0", (64,), 10)
    with pytest.raises(UnknownModelError, match=r"did you mean 'timm/efficientnet_b0'"):
        check_model_name("timm/efficientnet_b00")
