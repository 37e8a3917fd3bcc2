"""convert_sync_batchnorm / revert_sync_batchnorm keep everything a user relies on, in both directions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import syncbn


def model_with_every_batchnorm() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 1),
        nn.BatchNorm1d(3, eps=1e-3, momentum=0.2),
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)),
        nn.BatchNorm3d(5, track_running_stats=False),
        nn.BatchNorm1d(6, momentum=None),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    model[1].eval()
    return model


def _bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_convert_replaces_every_batchnorm_and_keeps_state() -> None:
    model = model_with_every_batchnorm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = _bn_layers(model)
    weight = model[1].weight
    converted = syncbn.convert_sync_batchnorm(model)
    layers = _bn_layers(converted)
    assert layers.keys() == originals.keys()
    for name, layer in layers.items():
        old = originals[name]
        assert type(layer) is syncbn.SyncBatchNorm
        assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats, layer.training) == (
            old.eps,
            old.momentum,
            old.affine,
            old.track_running_stats,
            old.training,
        )
    assert converted[1].weight is weight, "parameters are shared, so an existing optimizer keeps working"
    after = converted.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_revert_restores_original_classes_and_state_dict() -> None:
    model = model_with_every_batchnorm()
    classes = {n: type(m) for n, m in _bn_layers(model).items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reverted = syncbn.revert_sync_batchnorm(syncbn.convert_sync_batchnorm(model))
    assert {n: type(m) for n, m in _bn_layers(reverted).items()} == classes
    fresh = model_with_every_batchnorm()
    fresh.load_state_dict(reverted.state_dict())  # strict: keys identical to the plain model's
    for key, value in state.items():
        assert torch.equal(reverted.state_dict()[key], value)
    assert not reverted[2][1].affine and reverted[3].running_mean is None and not reverted[1].training


def test_top_level_batchnorm_is_replaced_and_converted_back() -> None:
    bn = nn.BatchNorm2d(4)
    converted = syncbn.convert_sync_batchnorm(bn)
    assert isinstance(converted, syncbn.SyncBatchNorm)
    assert type(syncbn.revert_sync_batchnorm(converted)) is nn.BatchNorm2d


def test_torch_syncbatchnorm_is_converted_and_process_group_applied() -> None:
    model = nn.Sequential(nn.SyncBatchNorm(3), syncbn.SyncBatchNorm(3))
    sentinel = object()
    converted = syncbn.convert_sync_batchnorm(model, process_group=sentinel)  # type: ignore[arg-type]
    assert all(type(m) is syncbn.SyncBatchNorm and m.process_group is sentinel for m in converted)


def test_revert_of_directly_built_layer_uses_the_inputs_it_saw() -> None:
    layer = syncbn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"run one forward pass or set layer\.input_dims_hint"):
        syncbn.revert_sync_batchnorm(nn.Sequential(layer))
    layer(torch.randn(4, 3, 2, 2, 2))
    assert type(syncbn.revert_sync_batchnorm(layer)) is nn.BatchNorm3d


def test_state_dict_keys_identical_to_torch_batchnorm() -> None:
    assert list(syncbn.SyncBatchNorm(3).state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    # Loading a plain BatchNorm checkpoint (old or new format) works unchanged.
    layer = syncbn.SyncBatchNorm(3)
    layer.load_state_dict(nn.BatchNorm2d(3).state_dict())


def test_parameters_created_on_requested_dtype() -> None:
    layer = syncbn.SyncBatchNorm(3, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.running_var.dtype == torch.float64
    converted = syncbn.convert_sync_batchnorm(nn.BatchNorm1d(3).double())
    assert converted.weight.dtype == torch.float64
