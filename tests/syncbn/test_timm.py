"""timm's own norm + act layers through convert/revert: the activation is kept, and 2 gloo ranks stay exact.

timm's ``BatchNormAct2d`` (efficientnet, mobilenetv3, ...) subclasses ``BatchNorm2d`` and applies ``drop`` then
``act`` in its own forward; a converter that builds a plain SyncBatchNorm silently drops both. Marked ``vision``:
timm needs a torchvision that matches torch, so these run in the vision environment (``make test-vision``) and
skip with the reason wherever timm does not import.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import syncbn
from tests.syncbn.process_group_pool import ProcessGroupPool

pytestmark = pytest.mark.vision

try:
    import timm
    from timm.layers import BatchNormAct2d, SplitBatchNorm2d
except Exception as error:  # a torchvision built for another torch fails with RuntimeError, not ImportError
    pytest.skip(f"timm does not import here ({type(error).__name__}: {error})", allow_module_level=True)


def _count(model: nn.Module, cls: type[nn.Module]) -> int:
    return sum(type(m) is cls for m in model.modules())


def test_efficientnet_keeps_its_activations_through_convert_and_revert() -> None:
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10, drop_rate=0.0)
    reference = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10, drop_rate=0.0)
    reference.load_state_dict(model.state_dict())
    layers = _count(model, BatchNormAct2d)
    assert layers > 40
    converted = syncbn.convert_sync_batchnorm(model)
    assert _count(converted, syncbn.SyncBatchNormAct) == layers and _count(converted, BatchNormAct2d) == 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for mode in ("train", "eval"):  # no process group: the synchronized layers are the layers themselves
        converted.train(mode == "train"), reference.train(mode == "train")
        torch.testing.assert_close(converted(x), reference(x), rtol=0, atol=0, msg=mode)
    reverted = syncbn.revert_sync_batchnorm(converted)
    assert _count(reverted, BatchNormAct2d) == layers and _count(reverted, syncbn.SyncBatchNormAct) == 0
    torch.testing.assert_close(reverted(x), reference(x), rtol=0, atol=0)


def test_timm_layer_reverts_before_any_forward() -> None:
    layer = BatchNormAct2d(8, act_layer=nn.SiLU)
    reverted = syncbn.revert_sync_batchnorm(syncbn.convert_sync_batchnorm(nn.Sequential(layer)))[0]
    assert type(reverted) is BatchNormAct2d and isinstance(reverted.act, nn.SiLU)


def test_timm_split_batchnorm_is_refused_with_its_path() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SplitBatchNorm2d(4, num_splits=2))
    with pytest.raises(ValueError, match=r"layer '1' \(timm\.layers\.split_batchnorm\.SplitBatchNorm2d\)"):
        syncbn.convert_sync_batchnorm(model)


def timm_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4, act_layer=nn.SiLU, momentum=0.3), nn.Conv2d(4, 2, 1)
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
    return model.double()


def timm_global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(8, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
    return x, torch.randn(8, 2, 5, 5, generator=gen, dtype=torch.float64)


def timm_step_on_rank(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    model = syncbn.convert_sync_batchnorm(timm_model())
    x, dy = timm_global_batch()
    rows = slice(0, 3) if rank == 0 else slice(3, None)
    xr = x[rows].clone().requires_grad_(True)
    y = model(xr)
    y.backward(dy[rows])
    return {"y": y.detach(), "dx": xr.grad, "dweight": model[1].weight.grad, "running_var": model[1].running_var}


def test_converted_timm_layer_matches_the_unconverted_model_on_the_global_batch(pool2: ProcessGroupPool) -> None:
    ranks = pool2.run(timm_step_on_rank, timeout=240)  # first call: ranks import timm
    model = timm_model()
    x, dy = timm_global_batch()
    x.requires_grad_(True)
    y = model(x)
    y.backward(dy)
    for got, rows in zip(ranks, (slice(0, 3), slice(3, None)), strict=True):
        torch.testing.assert_close(got["y"], y[rows].detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(got["dx"], x.grad[rows], rtol=0, atol=1e-10)
        torch.testing.assert_close(got["running_var"], model[1].running_var, rtol=0, atol=1e-12)
    torch.testing.assert_close(ranks[0]["dweight"] + ranks[1]["dweight"], model[1].weight.grad, rtol=0, atol=1e-10)
