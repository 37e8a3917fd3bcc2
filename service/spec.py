"""The job spec: the one description of a training job, shared by the REST API, the CLI and the Ray workers.

`JobSpec` is a pydantic v2 model with `extra="forbid"` (an unknown field is an error, so a typo never
silently falls back to a default). Every field carries a description and bounds; the OpenAPI docs are
generated from them. Mistakes that involve two fields raise `ValueError` with a sentence that names the
field and says how to fix it.

Files are never trusted: a data set names a path *relative to the data root* that the operator configures (or an
`s3://`/`gs://` URI where the operator allows it). Absolute paths, `..` and unknown schemes are refused at validation
time; `service.data_location` resolves the path (symlinks followed), which must still lie under the root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from service.data_location import check_data_uri, check_npz_path, resolve_npz_path

__all__ = [
    "BUILTIN_MODELS",
    "CONV_MODELS",
    "STREAMED_KINDS",
    "TRACKING_URI_SCHEMES",
    "DatasetSpec",
    "EarlyStopSpec",
    "JobSpec",
    "LrScheduleSpec",
    "MlflowSpec",
    "ModelName",
    "OptimizerSpec",
    "PlacementStrategy",
    "Precision",
    "TensorBoardSpec",
    "TrackingSpec",
    "load_spec_file",
    "read_spec_mapping",
    "resolve_npz_path",
]

#: A model's name as the registry lists it (GET /v1/models): a built-in, a plugin's entry point, or
#: `torchvision/<name>`. Only the syntax is checked here; the service checks that it can build the name at submit.
ModelName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)?$"),
]
#: The built-in models (service.engine.models); the registry may offer more.
BUILTIN_MODELS: tuple[str, ...] = ("resnet18", "small_resnet", "cnn", "mlp")
#: Ray placement-group strategies for the workers (ScalingConfig.placement_strategy).
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_SPREAD"]
#: Arithmetic of a training step: float32, bfloat16 autocast, or float16 autocast with gradient scaling.
Precision = Literal["fp32", "bf16", "fp16"]
#: Models made of 2-D convolutions: they need image-shaped inputs (channels, height, width).
CONV_MODELS: frozenset[str] = frozenset({"resnet18", "small_resnet", "cnn"})

#: Images of scikit-learn's bundled digits data set: 1,797 grey 8x8 images, 10 classes.
DIGITS_SAMPLES = 1797
DIGITS_SHAPE = (1, 8, 8)
#: Dataset kinds streamed through Ray Data (the others are loaded into memory on the job's driver).
STREAMED_KINDS: frozenset[str] = frozenset({"image_folder", "parquet"})
#: Logical CPUs a streamed job keeps free for its Ray Data read/decode tasks (counted by admission).
STREAMED_DATA_CPUS = 1.0


class _Strict(BaseModel):
    """Base of every spec model: unknown fields are errors, and names like `model` are allowed."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def _changed(self, field: str) -> bool:
        """Whether `field` holds something other than its default.

        Fields that do not apply to the chosen variant are refused only when changed, so that a dumped spec
        (which lists every default) validates again unchanged.
        """
        info = type(self).model_fields[field]
        return getattr(self, field) != info.get_default(call_default_factory=True)


class OptimizerSpec(_Strict):
    """Which optimizer updates the weights, and its hyper-parameters."""

    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="Optimizer: sgd, adam or adamw.")
    lr: float = Field(0.1, gt=0.0, le=10.0, description="Peak learning rate (after warm-up).")
    momentum: float = Field(
        0.9, ge=0.0, lt=1.0, description="SGD momentum (sgd only; adam/adamw use their default betas)."
    )
    nesterov: bool = Field(False, description="Use Nesterov momentum (sgd only; needs momentum > 0).")
    weight_decay: float = Field(
        5e-4,
        ge=0.0,
        le=1.0,
        description="Weight decay: L2 penalty for sgd/adam, decoupled decay for adamw.",
    )

    @model_validator(mode="after")
    def _check_sgd_only_fields(self) -> OptimizerSpec:
        if self.name != "sgd":
            for field in ("momentum", "nesterov"):
                if self._changed(field):
                    raise ValueError(
                        f"optimizer.{field} applies to sgd only (got name={self.name!r}): "
                        f"remove optimizer.{field} or set optimizer.name to 'sgd'."
                    )
        if self.nesterov and self.momentum == 0.0:
            raise ValueError(
                "optimizer.nesterov needs momentum > 0 (got momentum=0): set optimizer.momentum, e.g. 0.9, "
                "or nesterov to false."
            )
        return self


class LrScheduleSpec(_Strict):
    """How the learning rate changes over the run: an optional linear warm-up, then a decay."""

    name: Literal["none", "cosine", "step"] = Field(
        "none",
        description="Decay after warm-up: none (constant), cosine (to min_lr at the last step) or step "
        "(multiply by gamma every step_epochs epochs).",
    )
    warmup_epochs: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="Linear warm-up from 0 to optimizer.lr over this many epochs (fractions allowed).",
    )
    min_lr: float = Field(0.0, ge=0.0, le=10.0, description="Final learning rate of the cosine decay.")
    step_epochs: int = Field(
        10, ge=1, le=10_000, description="Epochs between two decays of the step schedule (step only)."
    )
    gamma: float = Field(
        0.1, gt=0.0, le=1.0, description="Factor applied at each decay of the step schedule (step only)."
    )

    @model_validator(mode="after")
    def _check_schedule_fields(self) -> LrScheduleSpec:
        if self.name != "step":
            for field in ("step_epochs", "gamma"):
                if self._changed(field):
                    raise ValueError(
                        f"lr_schedule.{field} applies to the step schedule only (got name={self.name!r}): "
                        f"remove lr_schedule.{field} or set lr_schedule.name to 'step'."
                    )
        if self.name != "cosine" and self._changed("min_lr"):
            raise ValueError(
                f"lr_schedule.min_lr applies to the cosine schedule only (got name={self.name!r}): "
                "remove lr_schedule.min_lr or set lr_schedule.name to 'cosine'."
            )
        return self


class EarlyStopSpec(_Strict):
    """When to stop before the last epoch: a validation accuracy target, a patience, or both."""

    target_val_acc: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Stop as soon as the validation accuracy reaches this value (0-1]; verdict 'converged'.",
    )
    patience: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Stop when the validation accuracy has not improved by more than min_delta for this many "
        "epochs; verdict 'plateaued'.",
    )
    min_delta: float = Field(
        0.0, ge=0.0, le=1.0, description="Smallest gain in validation accuracy that counts as an improvement."
    )

    @model_validator(mode="after")
    def _check_has_criterion(self) -> EarlyStopSpec:
        if self.target_val_acc is None and self.patience is None:
            raise ValueError("early_stop needs target_val_acc and/or patience: set one of them, or remove early_stop.")
        return self


class PreciseBnSpec(_Strict):
    """Precise BatchNorm: running statistics recomputed exactly over training batches (`syncbn.recalibrate`).

    With momentum 0.1 and a slowly decaying learning rate the running statistics trail the moving weights and
    validation accuracy swings from epoch to epoch; recomputing them with the final weights removes the lag.
    """

    batches: int = Field(
        200,
        ge=1,
        le=100_000,
        description="Training batches per rank whose pooled statistics replace the running ones (at most an epoch).",
    )
    every: Literal["epoch", "end"] = Field(
        "end",
        description="'epoch': recalibrate a copy of the statistics before every validation and report both "
        "accuracies (training keeps the running ones); 'end': once, after the last epoch. Either way the saved "
        "model carries the precise statistics.",
    )


class DatasetSpec(_Strict):
    """Where the samples come from.

    - `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), shape (1, 8, 8).
    - `synthetic`: seeded class-conditional Gaussian images/vectors of `input_shape`.
    - `npz`: a user file under the operator's data root with arrays `x` (N, ...) and `y` (N,) of integer
      labels, optionally `x_val`/`y_val` (otherwise `val_fraction` of `x` is held out).
    - `image_folder`: a folder `uri` laid out `<class_name>/<image files>` (png, jpeg); classes sorted by name
      get labels 0..K-1. Streamed through Ray Data: no process ever holds the whole set.
    - `parquet`: a Parquet file or folder `uri` with an encoded-image column and an integer label column.
      Streamed through Ray Data.

    Image kinds are decoded, converted to `channels` and resized to `image_size`, scaled to [0, 1] and
    normalised per channel with `mean`/`std` (default 0.5/0.5).
    """

    kind: Literal["digits", "synthetic", "npz", "image_folder", "parquet"] = Field(
        "digits", description="Data source: digits, synthetic, npz, image_folder or parquet."
    )
    val_fraction: float = Field(
        0.2,
        ge=0.05,
        le=0.5,
        description="Share of the samples held out for validation (seeded split; npz files with x_val/y_val "
        "and image data with val_uri use those instead).",
    )
    num_samples: int = Field(
        2048,
        ge=16,
        le=1_000_000,
        description="Number of generated samples, train + validation (synthetic only).",
    )
    num_classes: int = Field(10, ge=2, le=1000, description="Number of classes (synthetic only).")
    input_shape: list[int] = Field(
        default_factory=lambda: [3, 16, 16],
        min_length=1,
        max_length=3,
        description="Shape of one sample (synthetic only): [features] for vectors or "
        "[channels, height, width] for images; each entry 1-4096.",
    )
    path: str | None = Field(
        None,
        max_length=512,
        description="Path of the .npz file relative to the service's data root (npz only); "
        "absolute paths and '..' are refused.",
        examples=["mnist_small.npz"],
    )
    uri: str | None = Field(
        None,
        max_length=1024,
        description="Where the images are (image_folder, parquet): a path relative to the data root, or an "
        "s3:// or gs:// URI where the operator allows that scheme. image_folder: a folder of "
        "<class_name>/<image files>; parquet: a .parquet file or a folder of them.",
        examples=["digits_images"],
    )
    val_uri: str | None = Field(
        None,
        max_length=1024,
        description="A separate validation set laid out like uri (image_folder, parquet); null: hold out "
        "val_fraction of uri.",
    )
    image_column: str = Field(
        "image", min_length=1, max_length=256, description="Column of encoded images, png or jpeg (parquet only)."
    )
    label_column: str = Field(
        "label", min_length=1, max_length=256, description="Column of integer class labels 0..K-1 (parquet only)."
    )
    image_size: list[int] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="[height, width] every image is resized to (image_folder, parquet; required there); each 1-4096.",
        examples=[[32, 32]],
    )
    channels: int = Field(
        3, ge=1, le=3, description="Channels after decoding (image_folder, parquet): 1 (grey) or 3 (RGB)."
    )
    mean: list[float] | None = Field(
        None,
        min_length=1,
        max_length=3,
        description="Per-channel mean subtracted from pixels scaled to [0, 1] (image kinds; default 0.5).",
    )
    std: list[float] | None = Field(
        None,
        min_length=1,
        max_length=3,
        description="Per-channel standard deviation pixels are divided by (image kinds; default 0.5; > 0).",
    )

    @property
    def is_streamed(self) -> bool:
        """Whether the data is streamed through Ray Data (image kinds) rather than loaded into memory."""
        return self.kind in STREAMED_KINDS

    @model_validator(mode="after")
    def _check_kind_fields(self) -> DatasetSpec:
        if self.kind != "synthetic":
            for field in ("num_samples", "num_classes", "input_shape"):
                if self._changed(field):
                    raise ValueError(
                        f"dataset.{field} applies to synthetic data only (got kind={self.kind!r}): "
                        f"remove dataset.{field} or set dataset.kind to 'synthetic'."
                    )
        if self.kind == "synthetic":
            if len(self.input_shape) == 2:
                raise ValueError(
                    f"dataset.input_shape must be [features] or [channels, height, width] "
                    f"(got {self.input_shape}): add the channel count, e.g. [1, {self.input_shape[0]}, "
                    f"{self.input_shape[1]}]."
                )
            if any(not 1 <= d <= 4096 for d in self.input_shape):
                raise ValueError(
                    f"dataset.input_shape entries must lie in 1-4096 (got {self.input_shape}): use smaller sizes."
                )
        if self.kind == "npz":
            if self.path is None:
                raise ValueError(
                    "dataset.path is required when dataset.kind is 'npz': give the file's path relative to "
                    "the data root, e.g. 'my_data.npz'."
                )
            check_npz_path(self.path)
        elif self.path is not None:
            raise ValueError(
                f"dataset.path applies to npz data only (got kind={self.kind!r}): remove dataset.path or set "
                "dataset.kind to 'npz'."
            )
        self._check_image_fields()
        return self

    def _check_image_fields(self) -> None:
        """The fields of the streamed image kinds: present where needed, absent elsewhere, consistent."""
        if not self.is_streamed:
            for field in ("uri", "val_uri", "image_size", "mean", "std", "image_column", "label_column", "channels"):
                if self._changed(field):
                    raise ValueError(
                        f"dataset.{field} applies to image_folder and parquet data only (got kind={self.kind!r}): "
                        f"remove dataset.{field} or set dataset.kind to 'image_folder' or 'parquet'."
                    )
            return
        if self.kind != "parquet":
            for field in ("image_column", "label_column"):
                if self._changed(field):
                    raise ValueError(
                        f"dataset.{field} applies to parquet data only (got kind={self.kind!r}): "
                        f"remove dataset.{field} or set dataset.kind to 'parquet'."
                    )
        if self.uri is None:
            example = "'my_images'" if self.kind == "image_folder" else "'my_data.parquet'"
            raise ValueError(
                f"dataset.uri is required when dataset.kind is {self.kind!r}: give the path relative to the "
                f"data root, e.g. {example}."
            )
        check_data_uri(self.uri, "dataset.uri")
        if self.val_uri is not None:
            check_data_uri(self.val_uri, "dataset.val_uri")
            if self._changed("val_fraction"):
                raise ValueError(
                    "dataset.val_fraction and dataset.val_uri exclude each other (the validation set is either "
                    "held out of uri or read from val_uri): remove one of them."
                )
        if self.channels not in (1, 3):
            raise ValueError(f"dataset.channels must be 1 (grey) or 3 (RGB) (got {self.channels}).")
        if self.image_size is None:
            raise ValueError(
                f"dataset.image_size is required when dataset.kind is {self.kind!r}: give [height, width] every "
                "image is resized to, e.g. [32, 32]."
            )
        if any(not 1 <= d <= 4096 for d in self.image_size):
            raise ValueError(f"dataset.image_size entries must lie in 1-4096 (got {self.image_size}).")
        for field in ("mean", "std"):
            values = getattr(self, field)
            if values is not None and len(values) != self.channels:
                raise ValueError(
                    f"dataset.{field} needs one value per channel (got {len(values)} for channels="
                    f"{self.channels}): give {self.channels} value(s)."
                )
        if self.std is not None and any(not s > 0 for s in self.std):
            raise ValueError(f"dataset.std values must be > 0 (got {self.std}).")

    def sample_shape(self) -> tuple[int, ...] | None:
        """Shape of one input sample when it is known before loading (None for npz files)."""
        if self.kind == "digits":
            return DIGITS_SHAPE
        if self.kind == "synthetic":
            return tuple(self.input_shape)
        if self.is_streamed and self.image_size is not None:
            return (self.channels, *self.image_size)
        return None

    def train_size(self) -> int | None:
        """Number of training samples when it is known before loading (None for files)."""
        total = {"digits": DIGITS_SAMPLES, "synthetic": self.num_samples}.get(self.kind)
        if total is None:
            return None
        return total - max(1, round(total * self.val_fraction))


#: URI schemes an MLflow tracking URI may use: a tracking server's REST API. File stores and plugin schemes
#: (databricks://, custom entry points) are refused, so that a request never picks which code MLflow loads.
TRACKING_URI_SCHEMES: tuple[str, ...] = ("http", "https")


class MlflowSpec(_Strict):
    """Where the run shows up in MLflow: a tracking server the operator allows, an experiment, a run name.

    Credentials never travel in a spec: the MLflow client reads them from the environment of the service's
    cluster (`MLFLOW_TRACKING_TOKEN`, `MLFLOW_TRACKING_USERNAME`/`PASSWORD`).
    """

    tracking_uri: str = Field(
        min_length=1,
        max_length=1024,
        description="The MLflow tracking server, http:// or https:// (no user:password@ part); the service "
        "accepts only servers its operator lists in tracking_uris (SYNCBN_TRACKING_URIS).",
        examples=["http://127.0.0.1:5000"],
    )
    experiment_name: str = Field(
        min_length=1,
        max_length=256,
        description="MLflow experiment the run is logged to (created when it does not exist).",
        examples=["syncbn-digits"],
    )
    run_name: str | None = Field(
        None,
        min_length=1,
        max_length=250,
        description="MLflow run name; null: the job's name, else its id.",
    )
    log_model: bool = Field(
        True,
        description="Log the final model (model.pt: a plain nn.BatchNorm*d state dict) as the run's artifact "
        "model/model.pt.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _check_tracking_uri(cls, uri: str) -> str:
        parts = urlsplit(uri.strip())
        scheme = parts.scheme.lower()
        if scheme not in TRACKING_URI_SCHEMES:
            raise ValueError(
                f"tracking.mlflow.tracking_uri must be an http:// or https:// MLflow server (got the scheme "
                f"{scheme or 'none'!r} in {uri!r}): run `mlflow server` and give its address."
            )
        if not parts.hostname:
            raise ValueError(f"tracking.mlflow.tracking_uri names no host (got {uri!r}): e.g. http://mlflow:5000.")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "tracking.mlflow.tracking_uri must not carry credentials (a spec is stored and shown): remove the "
                "user:password@ part and let the operator set MLFLOW_TRACKING_USERNAME/PASSWORD or "
                "MLFLOW_TRACKING_TOKEN on the cluster."
            )
        if parts.query or parts.fragment:
            raise ValueError(f"tracking.mlflow.tracking_uri takes no ?query or #fragment (got {uri!r}).")
        return uri.strip()


class TensorBoardSpec(_Strict):
    """TensorBoard event files in the run storage (`<storage>/syncbn-<job>/tensorboard/`)."""

    histograms: bool = Field(
        True,
        description="Also write per-layer histograms of the per-channel batch means and variances on every "
        "recorded step (stats_every); false: scalars only.",
    )


class TrackingSpec(_Strict):
    """Where the run is mirrored besides the service's own store: MLflow and/or TensorBoard.

    A tracker that fails (server down, disk full) never fails the job: each failure is a warning line in the
    job's log, and the count shows in its last tracking line and in the service's Prometheus metrics.
    """

    mlflow: MlflowSpec | None = Field(
        None,
        description="Log params (the spec), step and epoch metrics, per-layer summaries and the final model to an "
        "MLflow tracking server; null: no MLflow.",
    )
    tensorboard: TensorBoardSpec | None = Field(
        None,
        description="Write TensorBoard event files (scalars, per-layer histograms) into the run storage; null: none.",
    )

    @model_validator(mode="after")
    def _check_has_tracker(self) -> TrackingSpec:
        if self.mlflow is None and self.tensorboard is None:
            raise ValueError("tracking needs mlflow and/or tensorboard: set one of them, or remove tracking.")
        return self


_EXAMPLE: dict[str, Any] = {
    "name": "digits-small-resnet",
    "model": "small_resnet",
    "dataset": {"kind": "digits", "val_fraction": 0.2},
    "workers": 2,
    "use_gpu": False,
    "cpus_per_worker": 1,
    "epochs": 10,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0005},
    "lr_schedule": {"name": "cosine", "warmup_epochs": 1},
    "sync_bn": True,
    "sync_group_size": None,
    "seed": 0,
    "stats_every": 10,
    "early_stop": {"target_val_acc": 0.99, "patience": 3},
    "max_failures": 1,
    "checkpoint_every": 1,
}


class JobSpec(_Strict):
    """One distributed training job: model, data, cluster shape, optimisation and what to record.

    The same object travels from the REST body or the CLI's spec file to every Ray worker, so it holds
    plain data only (nothing here is ever executed).
    """

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={"examples": [_EXAMPLE]},
    )

    name: str | None = Field(
        None, max_length=100, description="Optional human-readable label shown in listings and logs."
    )
    model: ModelName = Field(
        "small_resnet",
        description="A model the service can build, by name (GET /v1/models lists them): a built-in "
        "(resnet18: CIFAR-style ResNet-18, small_resnet: 3 stages of 16-64 channels, cnn: plain conv net, mlp: "
        "BatchNorm1d multi-layer perceptron), a model of an installed plugin package (entry point group "
        "syncbn.models) or torchvision/<name> where torchvision is installed. Built with nn.BatchNorm*d and "
        "converted to syncbn.SyncBatchNorm when sync_bn is true.",
        json_schema_extra={"x-options-from": "/v1/models"},
    )
    dataset: DatasetSpec = Field(default_factory=DatasetSpec, description="Data source and validation split.")
    workers: int = Field(2, ge=1, le=512, description="Number of Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend; false: CPU workers with gloo.")
    placement_strategy: PlacementStrategy = Field(
        "PACK",
        description="How Ray places the workers on the cluster's nodes: PACK (as few nodes as possible), SPREAD "
        "(over as many nodes as possible, best effort) or STRICT_SPREAD (every worker on a different node; needs "
        "at least `workers` nodes).",
    )
    cpus_per_worker: float = Field(
        1.0,
        gt=0.0,
        le=256.0,
        multiple_of=0.25,
        description="Logical CPUs reserved per worker (multiple of 0.25); torch uses max(1, floor(value)) threads.",
    )
    epochs: int = Field(5, ge=1, le=10_000, description="Number of passes over the training data.")
    batch_size: int = Field(
        32,
        ge=1,
        le=65_536,
        description="Samples per worker per step; the global batch is workers x batch_size.",
    )
    steps_per_epoch: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Cap on steps per epoch (smoke tests, quick looks); null: one full pass over the data.",
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer and its settings.")
    lr_schedule: LrScheduleSpec = Field(default_factory=LrScheduleSpec, description="Learning-rate warm-up and decay.")
    sync_bn: bool = Field(
        True,
        description="true: syncbn.SyncBatchNorm (batch statistics over all ranks); false: local "
        "BatchNorm per rank under DDP, to compare.",
    )
    sync_group_size: int | None = Field(
        None,
        ge=2,
        le=512,
        description="Synchronise BatchNorm within groups of this many consecutive ranks instead of all ranks "
        "(must divide workers; needs sync_bn).",
    )
    precision: Precision = Field(
        "fp32",
        description="Arithmetic of the forward and backward passes: fp32; bf16 (torch.autocast to bfloat16, CPU "
        "and GPU); fp16 (autocast to float16 with a GradScaler, GPU only). Weights, optimizer state and "
        "BatchNorm statistics stay float32.",
    )
    channels_last: bool = Field(
        False,
        description="Keep image tensors and conv weights in channels_last (NHWC) memory format, the fast layout "
        "for convolutions on GPUs with tensor cores and on recent CPUs; image data only.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model (after wrapping it in DDP, as torch recommends); the first steps "
        "pay the compilation time.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for weights, data split, shuffling and synthetic data.")
    stats_every: int = Field(
        10,
        ge=1,
        le=1_000_000,
        description="Record step metrics and per-layer BatchNorm statistics every N steps.",
    )
    stats_keep: int | None = Field(
        None,
        ge=2,
        le=100_000,
        description="Recorded steps that keep their per-channel BatchNorm vectors, per layer: the most recent "
        "half of them plus a log-spaced selection of older ones (summaries are kept for every recorded step). "
        "null: the service's stats_keep setting (256 by default).",
    )
    early_stop: EarlyStopSpec | None = Field(
        None,
        description="Stop early on a validation accuracy target and/or a patience; null: run every epoch.",
    )
    precise_bn: PreciseBnSpec | None = Field(
        None,
        description="Recompute the BatchNorm running statistics exactly over training batches (at every "
        "validation or at the end) and report validation accuracy with both; null: off.",
    )
    max_failures: int = Field(
        0,
        ge=0,
        le=100,
        description="Worker-group failures tolerated; each one restarts the workers from the last checkpoint.",
    )
    checkpoint_every: int = Field(
        1,
        ge=0,
        le=10_000,
        description="Save a checkpoint every N epochs (used to resume after a failure); 0: never.",
    )
    tracking: TrackingSpec | None = Field(
        None,
        description="Mirror the run to MLflow and/or TensorBoard (a tracker's failures never fail the job); "
        "null: the service's own store only.",
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> JobSpec:
        if self.sync_group_size is not None:
            if not self.sync_bn:
                raise ValueError(
                    "sync_group_size needs sync_bn=true (local BatchNorm has no groups): "
                    "remove sync_group_size or set sync_bn to true."
                )
            if self.workers % self.sync_group_size != 0:
                raise ValueError(
                    f"sync_group_size must divide workers (got sync_group_size={self.sync_group_size}, "
                    f"workers={self.workers}): pick a divisor of {self.workers} or change workers."
                )
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError(
                "precision 'fp16' needs use_gpu=true (float16 training with a GradScaler runs on GPUs only): "
                "use precision 'bf16' on CPU workers, or set use_gpu to true."
            )
        shape = self.dataset.sample_shape()
        if self.channels_last and shape is not None and len(shape) != 3:
            raise ValueError(
                f"channels_last applies to image samples [channels, height, width], but dataset.input_shape is "
                f"{list(shape)}: set channels_last to false or use image data."
            )
        if self.model in CONV_MODELS and shape is not None and len(shape) != 3:
            raise ValueError(
                f"model {self.model!r} needs image samples [channels, height, width], but "
                f"dataset.input_shape is {list(shape)}: use model 'mlp' or a 3-entry input_shape."
            )
        if self.lr_schedule.warmup_epochs >= self.epochs:
            raise ValueError(
                f"lr_schedule.warmup_epochs must be smaller than epochs (got warmup_epochs="
                f"{self.lr_schedule.warmup_epochs}, epochs={self.epochs}): shorten the warm-up or add epochs."
            )
        if self.lr_schedule.name == "cosine" and self.lr_schedule.min_lr > self.optimizer.lr:
            raise ValueError(
                f"lr_schedule.min_lr ({self.lr_schedule.min_lr}) must not exceed optimizer.lr "
                f"({self.optimizer.lr}): lower min_lr."
            )
        train_size = self.dataset.train_size()
        if train_size is not None and train_size < self.workers:
            raise ValueError(
                f"the data set has {train_size} training samples, fewer than workers={self.workers}: "
                "raise dataset.num_samples or use fewer workers."
            )
        return self

    def torch_threads(self) -> int:
        """Torch intra-op threads for one worker: its reserved CPUs, at least one."""
        return max(1, int(self.cpus_per_worker))

    def resources(self) -> dict[str, float]:
        """Logical resources the whole run reserves: `{"CPU": ..., "GPU": ...}` (for admission checks).

        Streamed data sets add `STREAMED_DATA_CPUS` for the Ray Data tasks that read and decode beside the workers:
        with every CPU taken by the workers those tasks could never be scheduled and the run would wait forever.
        """
        data_cpus = STREAMED_DATA_CPUS if self.dataset.is_streamed else 0.0
        return {
            "CPU": self.workers * self.cpus_per_worker + data_cpus,
            "GPU": float(self.workers if self.use_gpu else 0),
        }


def read_spec_mapping(path: Path | str, what: str = "spec") -> dict[str, Any]:
    """The mapping of fields in a `.json`, `.yaml` or `.yml` file (`what` names the file's kind in errors).

    Raises:
        ValueError: unknown file type, or content that is not a mapping.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
    elif suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        raise ValueError(f"{what} file must end in .json, .yaml or .yml (got {path.name!r}).")
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path.name!r} must hold a mapping of fields (got {type(data).__name__}).")
    return data


def load_spec_file(path: Path | str) -> JobSpec:
    """Read a job spec from a `.json`, `.yaml` or `.yml` file and validate it.

    Raises:
        ValueError: unknown file type, unreadable content, or a spec that does not validate (pydantic's
            `ValidationError` is a `ValueError` and names each bad field).
    """
    return JobSpec.model_validate(read_spec_mapping(path))
