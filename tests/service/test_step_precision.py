"""The training step's precision, memory format and compile switches, checked on one process (no Ray): what
autocast computes in, that weights, gradients and BatchNorm statistics stay float32, the channels_last layout,
and the spec's refusals. The distributed runs are in test_engine_precision.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import syncbn
from service.engine.model_registry import build_model
from service.engine.step_precision import StepPrecision
from service.spec import JobSpec

pytestmark = pytest.mark.timeout(60)


def test_bf16_channels_last_step_keeps_weights_grads_and_bn_statistics_float32() -> None:
    torch.manual_seed(0)
    model = syncbn.convert_sync_batchnorm(build_model("small_resnet", (1, 8, 8), 10))
    step = StepPrecision("bf16", channels_last=True, compile_model=False, device=torch.device("cpu"))
    step.prepare_model(model)
    conv = model.stem[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = step.prepare_batch(torch.randn(16, 1, 8, 8) + 3.0)
    y = torch.randint(0, 10, (16,))
    assert x.is_contiguous(memory_format=torch.channels_last)
    before = model.stem[1].running_mean.clone()
    with step.autocast():
        logits = model(x)
        assert logits.dtype == torch.bfloat16  # the forward really ran in bfloat16
        loss = F.cross_entropy(logits.float(), y)
    step.backward(loss, optimizer)
    step.step(optimizer)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    stem_bn = model.stem[1]
    assert stem_bn.running_mean.dtype == torch.float32 and torch.isfinite(stem_bn.running_mean).all()
    # The input's offset of 3 moved the running mean (momentum 0.1): statistics were taken, not lost in rounding.
    assert not torch.equal(before, stem_bn.running_mean)
    assert step.state_dict() == {}


def test_fp32_is_plain_and_1d_batches_keep_their_layout() -> None:
    step = StepPrecision("fp32", channels_last=True, compile_model=False, device=torch.device("cpu"))
    vectors = torch.randn(4, 20)
    assert step.prepare_batch(vectors) is vectors
    with step.autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_fp16_needs_a_gpu() -> None:
    with pytest.raises(ValueError, match=r"fp16.*CUDA"):
        StepPrecision("fp16", channels_last=False, compile_model=False, device=torch.device("cpu"))
    with pytest.raises(ValidationError, match="precision 'fp16' needs use_gpu=true"):
        JobSpec(precision="fp16")
    assert JobSpec(precision="fp16", use_gpu=True).precision == "fp16"
    with pytest.raises(ValidationError, match="precision"):
        JobSpec(precision="fp8")


def test_channels_last_needs_image_samples() -> None:
    with pytest.raises(ValidationError, match="channels_last applies to image samples"):
        JobSpec(model="mlp", channels_last=True, dataset={"kind": "synthetic", "input_shape": [20]})
    assert JobSpec(channels_last=True, compile=True, precision="bf16").compile is True
