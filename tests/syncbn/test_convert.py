"""convert_sync_batchnorm / revert_sync_batchnorm keep everything a user relies on, in both directions."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import syncbn
from tests.syncbn.process_group_pool import ProcessGroupPool


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


# --- BatchNorm subclasses: kept, or refused loudly -------------------------------------------------------------


class BatchNormAct(nn.BatchNorm2d):
    """Mimics timm's BatchNormAct2d: batch norm written out in its own forward, then ``drop``, then ``act``."""

    def __init__(self, num_features: int, act: nn.Module, drop: nn.Module, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)
        self.drop = drop
        self.act = act
        self.apply_act = True  # an attribute of the subclass's own, which revert must keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        x = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, factor, self.eps
        )
        return self.act(self.drop(x))


class DoubledBatchNorm(nn.BatchNorm2d):
    """A subclass whose forward does something a synchronized layer cannot know about."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class UncheckedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Keeps BatchNorm's forward (like Lightning's and mmcv's ``_BatchNormXd``): plain batch norm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        return


NORM_ACT = {BatchNormAct: ("drop", "act")}


def norm_act_model() -> nn.Module:
    """Conv, then a norm + act layer whose drop and act both change the output (and their order matters)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        BatchNormAct(4, act=nn.SiLU(), drop=nn.Hardtanh(-0.5, 1.0), momentum=0.3),
        nn.Conv2d(4, 2, 1),
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
    return model.double()


def test_norm_act_subclass_becomes_sync_layer_that_keeps_its_children() -> None:
    model = norm_act_model()
    act, drop, keys = model[1].act, model[1].drop, list(model.state_dict())
    converted = syncbn.convert_sync_batchnorm(model, norm_act=NORM_ACT)
    layer = converted[1]
    assert type(layer) is syncbn.SyncBatchNormAct and layer.after_names == ("drop", "act")
    assert layer.act is act and layer.drop is drop
    assert list(converted.state_dict()) == keys
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    expected = norm_act_model()(x)  # no process group: the synchronized layer is the layer itself
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("forward_first", [False, True], ids=["before-forward", "after-forward"])
def test_revert_restores_the_subclass_with_its_children_and_attributes(forward_first: bool) -> None:
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    converted = syncbn.convert_sync_batchnorm(norm_act_model(), norm_act=NORM_ACT)
    reference = norm_act_model()
    if forward_first:
        converted(x)
        reference(x)
    reverted = syncbn.revert_sync_batchnorm(converted)
    layer = reverted[1]
    assert type(layer) is BatchNormAct
    assert isinstance(layer.act, nn.SiLU) and isinstance(layer.drop, nn.Hardtanh) and layer.apply_act
    assert layer.momentum == 0.3 and layer.training
    assert list(reverted.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(reverted.state_dict()[key], value, rtol=0, atol=1e-12, msg=key)
    torch.testing.assert_close(reverted(x), reference(x), rtol=0, atol=1e-12)
    reverted.eval(), reference.eval()
    torch.testing.assert_close(reverted(x), reference(x), rtol=0, atol=1e-12)


def norm_act_step_on_rank(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """One training step of the converted norm + act model on this rank's slice of the global batch."""
    model = syncbn.convert_sync_batchnorm(norm_act_model(), norm_act=NORM_ACT)
    x, dy = norm_act_global_batch()
    rows = slice(0, 3) if rank == 0 else slice(3, None)  # ranks of 3 and 5 samples
    xr = x[rows].clone().requires_grad_(True)
    y = model(xr)
    y.backward(dy[rows])
    layer = model[1]
    return {
        "y": y.detach(),
        "dx": xr.grad,
        "dweight": layer.weight.grad,
        "dconv": model[0].weight.grad,
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
    }


def norm_act_global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(8, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
    return x, torch.randn(8, 2, 5, 5, generator=gen, dtype=torch.float64)


def test_converted_norm_act_matches_the_unconverted_model_on_the_global_batch(pool2: ProcessGroupPool) -> None:
    ranks = pool2.run(norm_act_step_on_rank, timeout=180)
    model = norm_act_model()
    x, dy = norm_act_global_batch()
    x.requires_grad_(True)
    y = model(x)
    y.backward(dy)
    for got, rows in zip(ranks, (slice(0, 3), slice(3, None)), strict=True):
        torch.testing.assert_close(got["y"], y[rows].detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(got["dx"], x.grad[rows], rtol=0, atol=1e-10)
        torch.testing.assert_close(got["running_mean"], model[1].running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(got["running_var"], model[1].running_var, rtol=0, atol=1e-12)
    # Each rank's parameter gradient is its contribution: their sum is the global gradient.
    torch.testing.assert_close(ranks[0]["dweight"] + ranks[1]["dweight"], model[1].weight.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(ranks[0]["dconv"] + ranks[1]["dconv"], model[0].weight.grad, rtol=0, atol=1e-10)


def test_subclass_with_an_unknown_forward_is_refused_with_its_path_and_the_fix() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU(), DoubledBatchNorm(4)))
    with pytest.raises(ValueError, match=r"layer '1\.1' \(.*DoubledBatchNorm\).*norm_act=\{DoubledBatchNorm: "):
        syncbn.convert_sync_batchnorm(model)
    with pytest.raises(ValueError, match=r"layer '1' \(.*BatchNormAct\).*this layer has: 'drop', 'act'"):
        syncbn.convert_sync_batchnorm(norm_act_model())  # not declared: refused, not flattened


class LeakyBatchNormAct(BatchNormAct):
    """Inherits BatchNormAct's forward: declaring the base class covers it."""


def test_norm_act_declared_for_a_base_class_covers_subclasses_that_keep_its_forward() -> None:
    layer = LeakyBatchNormAct(4, act=nn.LeakyReLU(), drop=nn.Identity())
    converted = syncbn.convert_sync_batchnorm(nn.Sequential(layer), norm_act=NORM_ACT)
    assert type(converted[0]) is syncbn.SyncBatchNormAct
    assert type(syncbn.revert_sync_batchnorm(converted)[0]) is LeakyBatchNormAct


def test_norm_act_naming_a_missing_child_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no child \['relu'\]"):
        syncbn.convert_sync_batchnorm(norm_act_model(), norm_act={BatchNormAct: ("drop", "relu")})


def test_subclass_declared_as_batch_norm_alone_converts_and_reverts() -> None:
    converted = syncbn.convert_sync_batchnorm(nn.Sequential(DoubledBatchNorm(4)), norm_act={DoubledBatchNorm: ()})
    assert type(converted[0]) is syncbn.SyncBatchNorm
    assert type(syncbn.revert_sync_batchnorm(converted)[0]) is DoubledBatchNorm


def test_subclass_that_keeps_batchnorm_forward_converts_and_reverts_to_its_class() -> None:
    layer = UncheckedBatchNorm(3, momentum=0.2)
    layer.note = "kept"
    converted = syncbn.convert_sync_batchnorm(nn.Sequential(layer))
    assert type(converted[0]) is syncbn.SyncBatchNorm
    reverted = syncbn.revert_sync_batchnorm(converted)[0]  # before any forward: the class is known
    assert type(reverted) is UncheckedBatchNorm and reverted.note == "kept" and reverted.momentum == 0.2
    reverted(torch.randn(4, 3, 2, 2, 2))  # its own (absent) input check, not BatchNorm3d's


def test_converted_norm_act_model_survives_torch_save_and_deepcopy(tmp_path: Path) -> None:
    converted = syncbn.convert_sync_batchnorm(norm_act_model(), norm_act=NORM_ACT)
    torch.save(converted, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for copy_ in (loaded, copy.deepcopy(converted)):
        reverted = syncbn.revert_sync_batchnorm(copy_)
        assert type(reverted[1]) is BatchNormAct and isinstance(reverted[1].act, nn.SiLU)


def test_directly_built_sync_batchnorm_act_refuses_to_revert() -> None:
    layer = syncbn.SyncBatchNormAct(3, after={"act": nn.ReLU()})
    layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"built directly as SyncBatchNormAct.*\['act'\]"):
        syncbn.revert_sync_batchnorm(nn.Sequential(layer))
