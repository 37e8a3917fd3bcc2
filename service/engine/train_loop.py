"""The per-worker training function that Ray Train's `TorchTrainer` runs on every rank.

Ray Train has already created the process group (gloo on CPU, NCCL on GPU) when `train_loop_per_worker`
starts. One rank's life:

1. pin torch threads to the worker's CPUs, seed, build the model with plain BatchNorm, convert it to
   `syncbn.SyncBatchNorm` (over all ranks or over subgroups of `sync_group_size`) when the job asks for it;
2. resume from `ray.train.get_checkpoint()` when Ray restarted the worker group after a failure, or else from
   the `resume_from` checkpoint folder the service picked for a run started again after its restart;
3. train with DDP on this rank's batches (`service.engine.data.rank_batches`: in-memory tensors through a
   `DistributedSampler`, or this rank's shard of the job's Ray Data datasets; reshuffled every epoch); every
   `stats_every` steps, record the BatchNorm statistics of that step's forward pass and report them (several
   recorded steps per report when `stats_every` is below `service.engine.reports.REPORT_EVERY_STEPS`); validate,
   report and checkpoint every epoch (with `precise_bn`, validate a second time with the running statistics
   recomputed exactly by `syncbn.recalibrate`: every epoch, or after the last one, which the saved model keeps);
4. stop together: divergence and early-stop decisions use only all-reduced values, so every rank leaves the loop
   at the same step and no collective is left waiting;
5. every rank sends the final report; rank 0 attaches a last checkpoint holding the final model
   (`syncbn.revert_sync_batchnorm` applied), which Ray Train uploads to the run's storage
   (`service.engine.storage`), so the model outlives the node that trained it.

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

import syncbn
from service.engine.convergence import ConvergenceTracker
from service.engine.data import DataInfo, DataSplits
from service.engine.data.rank_batches import MemoryBatches, RankBatches, StreamedBatches
from service.engine.model_registry import build_model
from service.engine.optimization import LearningRate, build_optimizer, set_lr
from service.engine.reports import steps_per_report
from service.engine.step_precision import StepPrecision
from service.engine.storage import MODEL_FILE
from service.spec import JobSpec

logger = logging.getLogger(__name__)

__all__ = ["train_loop_per_worker"]

_STATE_FILE = "state.pt"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker.

    Args:
        config: `spec` (the JobSpec as JSON-ready dict), `data` (`info`: the `DataInfo` as a dict; `splits`: an
            ObjectRef to the in-memory `DataSplits`, or None for data streamed through Ray Data) and `resume_from`
            (a checkpoint folder or None).
    """
    loop_started = time.time()  # the run's timeline (service.engine.timeline): the process group exists now
    spec = JobSpec.model_validate(config["spec"])
    info = DataInfo.from_dict(config["data"]["info"])
    splits_ref = config["data"].get("splits")
    splits: DataSplits | None = ray.get(splits_ref) if splits_ref is not None else None
    resume_from = config.get("resume_from")
    _WorkerRun(spec, info, splits, None if resume_from is None else Path(resume_from), loop_started).run()


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

    def __init__(
        self,
        spec: JobSpec,
        info: DataInfo,
        splits: DataSplits | None,
        resume_from: Path | None = None,
        loop_started: float | None = None,
    ) -> None:
        self.spec = spec
        # Timeline marks (service.engine.timeline), sent with the start and final reports.
        self._times: dict[str, float] = {"loop_started": time.time() if loop_started is None else loop_started}
        self._first_step_at: float | None = None
        self._epoch_times: list[list[float | None]] = []  # [epoch, started, trained, ended] per epoch run here
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world = context.get_world_size()
        torch.set_num_threads(spec.torch_threads())
        self.device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")

        # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway).
        torch.manual_seed(spec.seed)
        model = build_model(spec.model, info.sample_shape, info.num_classes)
        self.sync_group: dist.ProcessGroup | None = None
        if spec.sync_bn:
            if spec.sync_group_size is not None and spec.sync_group_size < self.world:
                # Every rank must take part in creating every subgroup; we keep the one holding this rank.
                self.sync_group, _ = dist.new_subgroups(group_size=spec.sync_group_size)
            model = syncbn.convert_sync_batchnorm(model, process_group=self.sync_group)
        self.precision = StepPrecision(spec.precision, spec.channels_last, spec.compile, self.device)
        self.model = self.precision.prepare_model(model.to(self.device))
        self.recorder = syncbn.BatchStatsRecorder(self.model)

        # This rank's batches, from memory or streamed: the same number of steps per epoch on every rank.
        self.batches: RankBatches
        if splits is not None:
            pin = self.device.type == "cuda"
            self.batches = MemoryBatches(
                splits, spec.batch_size, spec.steps_per_epoch, spec.seed, self.rank, self.world, pin
            )
        else:
            world = self.world
            self.batches = StreamedBatches(info, spec.batch_size, spec.steps_per_epoch, spec.seed, self.rank, world)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.lr = LearningRate(spec.optimizer.lr, spec.lr_schedule, self.steps_per_epoch, spec.epochs)

        self.optimizer = build_optimizer(spec.optimizer, self.model.parameters())
        self.tracker = ConvergenceTracker(spec.early_stop)
        self.start_epoch = 1
        self.step = 0
        # Recorded steps not reported yet: they travel `_steps_per_report` at a time (service.engine.reports).
        self._pending_steps: list[dict[str, Any]] = []
        self._steps_per_report = steps_per_report(spec.stats_every)
        self.final_val_acc: float | None = None
        self.final_val_acc_precise: float | None = None
        self.final_train_loss: float | None = None
        self.verdict: str | None = None  # set when restored from the final checkpoint: the run is already over
        self.divergence: str | None = None  # why the run diverged, when it did
        # The current epoch's start time and global sums [loss * n, n, correct], filled by _train_epoch.
        self._epoch_start = 0.0
        self._epoch_sums = torch.zeros(3, dtype=torch.float64)
        self._restore(resume_from)

        # With synchronized BatchNorm every rank computes its running statistics from the same global moments,
        # so they are already identical: DDP's default broadcast of rank 0's buffers before each forward would
        # only add a collective per step (and, with sync subgroups, overwrite each group's own statistics with
        # group 0's). With local BatchNorm we keep DDP's default, the usual baseline users compare against.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids, **_buffer_sync(not spec.sync_bn))
        # What each training step calls: the DDP model, compiled when the job asks (DDP first, then compile).
        self.step_model = self.precision.wrap(self.ddp)
        self._times["model_ready"] = time.time()

    # ---------------------------------------------------------------- checkpoints

    def _restore(self, resume_from: Path | None) -> None:
        """Load model, optimizer and counters from the latest checkpoint Ray handed us, else from `resume_from`."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and resume_from is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(resume_from))
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / _STATE_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.precision.load_state_dict(state.get("precision", {}))
        self.start_epoch = int(state["epoch"]) + 1
        self.step = int(state["step"])
        self.final_val_acc = state["final_val_acc"]
        self.final_val_acc_precise = state.get("final_val_acc_precise")
        self.final_train_loss = state["final_train_loss"]
        self.verdict = state.get("verdict")
        logger.info("rank %d resumed after epoch %d (step %d)", self.rank, self.start_epoch - 1, self.step)

    def _checkpoint_state(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tracker": self.tracker.state_dict(),
            "precision": self.precision.state_dict(),
            "epoch": epoch,
            "step": self.step,
            "final_val_acc": self.final_val_acc,
            "final_val_acc_precise": self.final_val_acc_precise,
            "final_train_loss": self.final_train_loss,
            "verdict": self.verdict,
        }

    def _report(self, metrics: dict[str, Any], checkpoint_epoch: int | None = None, final_model: bool = False) -> None:
        """`ray.train.report` on every rank; rank 0 attaches a checkpoint when `checkpoint_epoch` is given, with the
        final model in it when `final_model` is set."""
        if checkpoint_epoch is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="syncbn-ckpt-") as directory:
            torch.save(self._checkpoint_state(checkpoint_epoch), Path(directory) / _STATE_FILE)
            if final_model:
                self._save_final_model(Path(directory) / MODEL_FILE)
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
                "times": dict(self._times),
            }
        )
        verdict: str | None = self.verdict
        reason: str | None = None
        epochs_done = self.start_epoch - 1
        # A run restored from its final checkpoint (a failure after the last report) only reports again.
        epochs = range(self.start_epoch, self.spec.epochs + 1) if verdict is None else range(0)
        for epoch in epochs:
            reason = self._train_epoch(epoch)
            if reason is not None:
                verdict = "diverged"
                break
            verdict = self._end_epoch(epoch)
            epochs_done = epoch
            if verdict is not None:
                reason = self.divergence  # set when the validation loss diverged
                break
        if verdict is None:
            verdict = "completed"

        self.verdict = verdict
        self._report(
            {
                "kind": "final",
                "verdict": verdict,
                "reason": reason,
                "epochs_done": epochs_done,
                "best_val_acc": self.tracker.best_val_acc if self.tracker.best_epoch else None,
                "final_val_acc": self.final_val_acc,
                "final_val_acc_precise": self.final_val_acc_precise,
                "final_train_loss": self.final_train_loss,
                "times": {
                    **({"first_step": self._first_step_at} if self._first_step_at is not None else {}),
                    **({"last_step": self._epoch_times[-1][2]} if self._epoch_times else {}),
                    "epochs": self._epoch_times,
                },
            },
            # The final model travels in a last checkpoint, which Ray Train uploads to the run's storage.
            checkpoint_epoch=None if verdict == "diverged" else epochs_done,
            final_model=True,
        )
        self.recorder.close()

    def _train_epoch(self, epoch: int) -> str | None:
        """One pass over this rank's shard; returns a divergence reason when the loss stops being finite."""
        spec = self.spec
        self.ddp.train()
        timing = [epoch, time.time(), None, None]  # [epoch, started, trained, ended] (service.engine.timeline)
        self._epoch_times.append(timing)
        self._epoch_start = time.perf_counter()
        self._epoch_sums = torch.zeros(3, dtype=torch.float64)
        window = torch.zeros(3, dtype=torch.float64)
        window_compute_s = 0.0
        window_steps = 0
        window_start = time.perf_counter()
        for x, y in self.batches.train(epoch):
            lr = self.lr.at(self.step)
            set_lr(self.optimizer, lr)
            self.step += 1
            recording = self.step % spec.stats_every == 0
            started = time.perf_counter()
            x = self.precision.prepare_batch(x.to(self.device, non_blocking=True))
            y = y.to(self.device, non_blocking=True)
            with self.recorder.recording() if recording else contextlib.nullcontext(), self.precision.autocast():
                logits = self.step_model(x)
                logits = logits.float()  # the loss and the accuracy in float32 whatever the step's precision
                loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.backward(loss, self.optimizer)
            layers = self.recorder.packed_snapshot() if recording else None  # after backward: gradient norms
            self.precision.step(self.optimizer)

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
            if self._first_step_at is None:
                self._first_step_at = time.time()
            global_loss = float(sums[0] / sums[1])
            reason = self.tracker.check_train_loss(global_loss, self.step, epoch, lr)
            if reason is not None:
                logger.warning("rank %d: %s", self.rank, reason)
                self._report_steps()
                timing[2] = time.time()
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
                self._pending_steps.append(metrics)
                if len(self._pending_steps) >= self._steps_per_report:
                    self._report_steps()
                window.zero_()
                window_compute_s, window_steps = 0.0, 0
                window_start = time.perf_counter()
        self._report_steps()  # the epoch's last recorded steps, before its epoch report
        timing[2] = time.time()
        return None

    def _report_steps(self) -> None:
        """Report the recorded steps kept so far, if any (every rank has kept the same ones): one `step` report,
        or one `steps` report of several (`service.engine.reports.steps_per_report`)."""
        pending, self._pending_steps = self._pending_steps, []
        if len(pending) == 1:
            self._report(pending[0])
        elif pending:
            self._report({"kind": "steps", "steps": pending})

    def _end_epoch(self, epoch: int) -> str | None:
        """Validate, report the epoch (with a checkpoint when due) and return an early-stop verdict or None."""
        sums = self._epoch_sums
        train_loss = float(sums[0] / sums[1])
        train_acc = float(sums[2] / sums[1])
        val_loss, val_acc = self._evaluate()
        verdict = self.tracker.update(epoch, val_acc)
        # The validation loss is all-reduced too: every rank reaches the same verdict.
        self.divergence = self.tracker.check_val_loss(val_loss, epoch)
        if self.divergence is not None:
            logger.warning("rank %d: %s", self.rank, self.divergence)
            verdict = "diverged"
        self.final_val_acc, self.final_train_loss = val_acc, train_loss
        val_loss_precise, val_acc_precise = self._precise_evaluation(epoch, last=verdict is not None)
        if val_acc_precise is not None:
            self.final_val_acc_precise = val_acc_precise
        metrics = {
            "kind": "epoch",
            "epoch": epoch,
            "step": self.step,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "val_loss_precise": val_loss_precise,
            "val_acc_precise": val_acc_precise,
            "epoch_time_s": time.perf_counter() - self._epoch_start,
        }
        every = self.spec.checkpoint_every
        due = every > 0 and epoch % every == 0 and verdict is None and epoch < self.spec.epochs
        self._report(metrics, checkpoint_epoch=epoch if due else None)
        self._epoch_times[-1][3] = time.time()
        return verdict

    def _precise_evaluation(self, epoch: int, last: bool) -> tuple[float | None, float | None]:
        """Validation loss and accuracy with precise BatchNorm statistics, or (None, None) when not due.

        `last` (an early stop) or the final epoch: the precise statistics stay in the model, which is saved with
        them. Any other epoch (`every: epoch`): the running statistics are put back afterwards, so training and
        its recorded drift go on exactly as without precise_bn.
        """
        precise = self.spec.precise_bn
        final = last or epoch == self.spec.epochs
        if precise is None or not (final or precise.every == "epoch"):
            return None, None
        saved = None if final else [b.detach().clone() for b in self.model.buffers()]
        batches = (
            self.precision.prepare_batch(x.to(self.device, non_blocking=True)) for x, _ in self.batches.train(epoch)
        )
        with self.precision.autocast():
            syncbn.recalibrate(self.model, batches, num_batches=min(precise.batches, self.steps_per_epoch))
        result = self._evaluate()
        if saved is not None:
            with torch.no_grad():
                for buffer, value in zip(self.model.buffers(), saved, strict=True):
                    buffer.copy_(value)
        return result

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float]:
        """Global validation loss and accuracy; each rank scores every world-th sample (no padding)."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        with self._rank0_buffers():
            for x_batch, y_batch in self.batches.validation():
                x = self.precision.prepare_batch(x_batch.to(self.device))
                y = y_batch.to(self.device)
                with self.precision.autocast():
                    logits = self.model(x).float()
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

    def _save_final_model(self, path: Path) -> None:
        """Write the plain-BatchNorm state dict (float32, contiguous layout) to `path` (rank 0 only)."""
        plain: nn.Module = syncbn.revert_sync_batchnorm(self.model)
        state = {key: value.detach().cpu().contiguous() for key, value in plain.state_dict().items()}
        torch.save(state, path)
