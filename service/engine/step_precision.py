"""How one training step computes: autocast precision, gradient scaling, memory format and compilation.

The JobSpec's `precision`, `channels_last` and `compile` fields become one `StepPrecision` per worker:

- `bf16`: the forward pass and the loss run under `torch.autocast(dtype=torch.bfloat16)` (CPU and GPU); weights,
  gradients and optimizer state stay float32. bfloat16 has float32's exponent range, so no loss scaling is needed.
- `fp16`: autocast to float16 plus `torch.amp.GradScaler`, which scales the loss so small gradients do not flush
  to zero and skips steps whose gradients overflowed (GPU only; the spec refuses it for CPU jobs).
- BatchNorm under autocast: the layers receive low-precision activations, but their parameters and running
  statistics stay float32 and `syncbn.SyncBatchNorm` computes and all-reduces the batch moments in float32/float64
  (torch's own BatchNorm, used without peers, also keeps float32 statistics for low-precision inputs).
- `channels_last`: conv weights and 4-D inputs in NHWC layout; other tensors are left alone.
- `compile`: `torch.compile` of the DDP-wrapped model, the order torch's DDP notes recommend (DDP first, so
  dynamo's DDP optimizer can split graphs at the gradient buckets). No `fullgraph`: layers that break the graph
  still run, in eager mode.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from service.spec import Precision

__all__ = ["AUTOCAST_DTYPES", "StepPrecision"]

#: Autocast dtype of each precision (None: plain float32).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class StepPrecision:
    """Precision, layout and compilation of one worker's training step.

    Args:
        precision: `fp32`, `bf16` or `fp16` (see the module docstring).
        channels_last: put conv weights and 4-D batches in channels_last layout.
        compile_model: `torch.compile` the DDP-wrapped model.
        device: the worker's device (autocast and the grad scaler are per device type).

    Raises:
        ValueError: fp16 on a device other than CUDA (GradScaler-based fp16 training is GPU-only here).
    """

    def __init__(self, precision: Precision, channels_last: bool, compile_model: bool, device: torch.device) -> None:
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)} (got {precision!r})")
        if precision == "fp16" and device.type != "cuda":
            raise ValueError(f"precision 'fp16' needs a CUDA device (got {device.type}): use 'bf16' on CPU.")
        self.precision = precision
        self.dtype = AUTOCAST_DTYPES[precision]
        self.channels_last = channels_last
        self.compile_model = compile_model
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context of the forward pass and the loss: autocast to bf16/fp16, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move the model's 4-D weights to channels_last when asked (in place; returns the model)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def prepare_batch(self, x: Tensor) -> Tensor:
        """A batch in the step's layout: channels_last for 4-D image batches when asked, else unchanged."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def wrap(self, ddp: nn.Module) -> nn.Module:
        """The module the training step calls: the DDP model, compiled when asked."""
        return torch.compile(ddp) if self.compile_model else ddp

    def backward(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward pass; with a grad scaler the loss is scaled and the gradients unscaled afterwards, so what is
        read between `backward` and `step` (gradient norms) is in true units."""
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step (skipped by the grad scaler when fp16 gradients overflowed)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the grad scaler's scale and counters (empty without a scaler)."""
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
