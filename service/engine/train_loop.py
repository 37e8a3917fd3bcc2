"""The per-worker training function that Ray Train's `TorchTrainer` runs on every rank.

Ray Train has already created the process group (gloo on CPU, NCCL on GPU) when `train_loop_per_worker`
starts. One rank's life:

1. pin torch threads to the worker's CPUs, seed, build the model with plain BatchNorm, convert it to
   `syncbn.SyncBatchNorm` (over all ranks or over subgroups of `sync_group_size`) when the job asks for it;
2. resume from `ray.train.get_checkpoint()` when Ray restarted the worker group after a failure;
3. train with DDP and a `DistributedSampler` (`set_epoch` every epoch); every `stats_every` steps, record the
   BatchNorm statistics of that step's forward pass and report them; validate, report and checkpoint every epoch;
4. stop together: divergence and early-stop decisions use only all-reduced values, so every rank leaves the loop
   at the same step and no collective is left waiting;
5. rank 0 saves the final model with `syncbn.revert_sync_batchnorm` applied, then every rank sends the final
   report.

See `service.engine.reports` for what each report holds.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import syncbn
from service.engine.convergence import ConvergenceTracker, divergence_reason
from service.engine.data import DataSplits
from service.engine.models import build_model
from service.engine.optimization import LearningRate, build_optimizer, set_lr
from service.spec import JobSpec

logger = logging.getLogger(__name__)

__all__ = ["MODEL_FILE", "train_loop_per_worker"]

#: Name of the final model file in the job's output directory.
MODEL_FILE = "model.pt"
_STATE_FILE = "state.pt"
_EVAL_BATCH = 512


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker.

    Args:
        config: `spec` (the JobSpec as JSON-ready dict), `data` (an ObjectRef to `DataSplits`) and `output_dir`
            (where rank 0 writes the final model).
    """
    spec = JobSpec.model_validate(config["spec"])
    data: DataSplits = ray.get(config["data"])
    _WorkerRun(spec, data, Path(config["output_dir"])).run()


def _buffer_sync(enabled: bool) -> dict[str, bool]:
    """DDP's per-forward buffer broadcast switch: `forward_sync_buffers` (torch >= 2.13) or `broadcast_buffers`."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": enabled}
    return {"broadcast_buffers": enabled}


class _WorkerRun:
    """State of one rank for one attempt: model, optimizer, data loader, counters.

    Responsibilities:
      - build (or restore) the model and optimizer the same way on every rank;
      - run epochs, reporting at the same steps on every rank;
      - decide when to stop from globally agreed values only.
    """

    def __init__(self, spec: JobSpec, data: DataSplits, output_dir: Path) -> None:
        self.spec = spec
        self.data = data
        self.output_dir = output_dir
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world = context.get_world_size()
        torch.set_num_threads(spec.torch_threads())
        self.device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")

        # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway).
        torch.manual_seed(spec.seed)
        model = build_model(spec.model, data.sample_shape, data.num_classes)
        self.sync_group: dist.ProcessGroup | None = None
        if spec.sync_bn:
            if spec.sync_group_size is not None and spec.sync_group_size < self.world:
                # Every rank must take part in creating every subgroup; we keep the one holding this rank.
                self.sync_group, _ = dist.new_subgroups(group_size=spec.sync_group_size)
            model = syncbn.convert_sync_batchnorm(model, process_group=self.sync_group)
        self.model = model.to(self.device)
        self.recorder = syncbn.BatchStatsRecorder(self.model)

        sampler_data = TensorDataset(data.x_train, data.y_train)
        self.sampler = DistributedSampler(
            sampler_data, num_replicas=self.world, rank=self.rank, shuffle=True, seed=spec.seed
        )
        shard = len(self.sampler)
        # Full batches only (as DDP recipes do) unless a rank's shard is smaller than one batch: a last batch of a
        # single sample would break plain BatchNorm1d, and every rank has the same number of batches either way.
        self.loader = DataLoader(
            sampler_data,
            batch_size=spec.batch_size,
            sampler=self.sampler,
            drop_last=shard >= spec.batch_size,
            pin_memory=self.device.type == "cuda",
        )
        self.steps_per_epoch = len(self.loader)
        if spec.steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, spec.steps_per_epoch)
        self.lr = LearningRate(spec.optimizer.lr, spec.lr_schedule, self.steps_per_epoch, spec.epochs)

        self.optimizer = build_optimizer(spec.optimizer, self.model.parameters())
        self.tracker = ConvergenceTracker(spec.early_stop)
        self.start_epoch = 1
        self.step = 0
        self.final_val_acc: float | None = None
        self.final_train_loss: float | None = None
        # The current epoch's start time and global sums [loss * n, n, correct], filled by _train_epoch.
        self._epoch_start = 0.0
        self._epoch_sums = torch.zeros(3, dtype=torch.float64)
        self._restore()

        # With synchronized BatchNorm every rank computes its running statistics from the same global moments,
        # so they are already identical: DDP's default broadcast of rank 0's buffers before each forward would
        # only add a collective per step (and, with sync subgroups, overwrite each group's own statistics with
        # group 0's). With local BatchNorm we keep DDP's default, the usual baseline users compare against.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids, **_buffer_sync(not spec.sync_bn))

    # ---------------------------------------------------------------- checkpoints

    def _restore(self) -> None:
        """Load model, optimizer and counters from the latest checkpoint, if Ray handed us one."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / _STATE_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.start_epoch = int(state["epoch"]) + 1
        self.step = int(state["step"])
        self.final_val_acc = state["final_val_acc"]
        self.final_train_loss = state["final_train_loss"]
        logger.info("rank %d resumed after epoch %d (step %d)", self.rank, self.start_epoch - 1, self.step)

    def _checkpoint_state(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tracker": self.tracker.state_dict(),
            "epoch": epoch,
            "step": self.step,
            "final_val_acc": self.final_val_acc,
            "final_train_loss": self.final_train_loss,
        }

    def _report(self, metrics: dict[str, Any], checkpoint_epoch: int | None = None) -> None:
        """`ray.train.report` on every rank; rank 0 attaches a checkpoint when `checkpoint_epoch` is given."""
        if checkpoint_epoch is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="syncbn-ckpt-") as directory:
            torch.save(self._checkpoint_state(checkpoint_epoch), Path(directory) / _STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    # ---------------------------------------------------------------- the run

    def run(self) -> None:
        self._report(
            {
                "kind": "start",
                "rank": self.rank,
                "pid": os.getpid(),
                "hostname": socket.gethostname(),
                "device": str(self.device),
                "world_size": self.world,
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.steps_per_epoch * self.spec.epochs,
                "resumed_from_epoch": self.start_epoch - 1,
            }
        )
        verdict: str | None = None
        reason: str | None = None
        epochs_done = self.start_epoch - 1
        for epoch in range(self.start_epoch, self.spec.epochs + 1):
            reason = self._train_epoch(epoch)
            if reason is not None:
                verdict = "diverged"
                break
            verdict = self._end_epoch(epoch)
            epochs_done = epoch
            if verdict is not None:
                break
        if verdict is None:
            verdict = "completed"

        model_path = None
        if verdict != "diverged" and self.rank == 0:
            model_path = str(self._save_final_model())
        self._report(
            {
                "kind": "final",
                "verdict": verdict,
                "reason": reason,
                "epochs_done": epochs_done,
                "best_val_acc": self.tracker.best_val_acc if self.tracker.best_epoch else None,
                "final_val_acc": self.final_val_acc,
                "final_train_loss": self.final_train_loss,
                "model_path": model_path,
            }
        )
        self.recorder.close()

    def _train_epoch(self, epoch: int) -> str | None:
        """One pass over this rank's shard; returns a divergence reason when the loss stops being finite."""
        spec = self.spec
        self.ddp.train()
        self.sampler.set_epoch(epoch)
        self._epoch_start = time.perf_counter()
        self._epoch_sums = torch.zeros(3, dtype=torch.float64)
        window = torch.zeros(3, dtype=torch.float64)
        window_compute_s = 0.0
        window_steps = 0
        window_start = time.perf_counter()
        for index, (x, y) in enumerate(self.loader):
            if index >= self.steps_per_epoch:
                break
            lr = self.lr.at(self.step)
            set_lr(self.optimizer, lr)
            self.step += 1
            recording = self.step % spec.stats_every == 0
            started = time.perf_counter()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self.recorder.recording() if recording else contextlib.nullcontext():
                logits = self.ddp(x)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            layers = self.recorder.packed_snapshot() if recording else None  # after backward: gradient norms
            self.optimizer.step()

            # One tiny all-reduce per step gives the global loss, so every rank sees the same number and a
            # divergence on any rank stops all of them at this very step.
            # (On GPU the `.cpu()` is one host synchronisation per step, the price of deciding at once.)
            correct = (logits.detach().argmax(1) == y).sum().double()
            sums = torch.stack([loss.detach().double() * y.numel(), correct.new_tensor(y.numel()), correct])
            dist.all_reduce(sums)
            sums = sums.cpu()
            window_compute_s += time.perf_counter() - started
            window_steps += 1
            window += sums
            self._epoch_sums += sums
            global_loss = float(sums[0] / sums[1])
            reason = divergence_reason(global_loss, self.step, epoch, lr)
            if reason is not None:
                logger.warning("rank %d: %s", self.rank, reason)
                return reason

            if recording:
                elapsed = time.perf_counter() - window_start
                metrics: dict[str, Any] = {
                    "kind": "step",
                    "step": self.step,
                    "epoch": epoch,
                    "train_loss": float(window[0] / window[1]),
                    "lr": lr,
                    "samples_per_s": float(window[1]) / max(elapsed, 1e-9),
                    "step_time_s": window_compute_s / window_steps,
                    "layers": layers,
                }
                self._report(metrics)
                window.zero_()
                window_compute_s, window_steps = 0.0, 0
                window_start = time.perf_counter()
        return None

    def _end_epoch(self, epoch: int) -> str | None:
        """Validate, report the epoch (with a checkpoint when due) and return an early-stop verdict or None."""
        sums = self._epoch_sums
        train_loss = float(sums[0] / sums[1])
        train_acc = float(sums[2] / sums[1])
        val_loss, val_acc = self._evaluate()
        verdict = self.tracker.update(epoch, val_acc)
        self.final_val_acc, self.final_train_loss = val_acc, train_loss
        metrics = {
            "kind": "epoch",
            "epoch": epoch,
            "step": self.step,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "epoch_time_s": time.perf_counter() - self._epoch_start,
        }
        every = self.spec.checkpoint_every
        due = every > 0 and epoch % every == 0 and verdict is None and epoch < self.spec.epochs
        self._report(metrics, checkpoint_epoch=epoch if due else None)
        return verdict

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float]:
        """Global validation loss and accuracy; each rank scores every world-th sample (no padding)."""
        x_val = self.data.x_val[self.rank :: self.world]
        y_val = self.data.y_val[self.rank :: self.world]
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        with self._rank0_buffers():
            for start in range(0, len(y_val), _EVAL_BATCH):
                x = x_val[start : start + _EVAL_BATCH].to(self.device)
                y = y_val[start : start + _EVAL_BATCH].to(self.device)
                logits = self.model(x)
                sums[0] += float(F.cross_entropy(logits, y, reduction="sum"))
                sums[1] += y.numel()
                sums[2] += float((logits.argmax(1) == y).sum())
        self.model.train()
        sums = sums.to(self.device)  # NCCL reduces device tensors only
        dist.all_reduce(sums)
        total_loss, count, correct = sums.tolist()
        return total_loss / count, correct / count

    @contextlib.contextmanager
    def _rank0_buffers(self) -> Iterator[None]:
        """Evaluate with rank 0's BatchNorm buffers: the validation numbers then describe the model we save.

        With synchronized BatchNorm over all ranks the buffers are already identical and nothing is sent. With
        local BatchNorm or sync subgroups they differ; we broadcast rank 0's (one flat tensor) and put this rank's
        own back afterwards so training continues unchanged.
        """
        if self.world == 1 or (self.spec.sync_bn and self.sync_group is None):
            yield
            return
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        own = [b.detach().clone() for b in buffers]
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()
        try:
            yield
        finally:
            for b, saved in zip(buffers, own, strict=True):
                b.copy_(saved)

    def _save_final_model(self) -> Path:
        """Write the plain-BatchNorm state dict to `output_dir/model.pt` atomically (rank 0 only)."""
        plain: nn.Module = syncbn.revert_sync_batchnorm(self.model)
        state = {key: value.detach().cpu() for key, value in plain.state_dict().items()}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / MODEL_FILE
        partial = path.with_suffix(".pt.partial")
        torch.save(state, partial)
        partial.replace(path)
        return path
