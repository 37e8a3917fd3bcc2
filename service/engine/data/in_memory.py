"""In-memory data sets: scikit-learn's digits, seeded synthetic data, or a user's `.npz` under the data root.

Everything is loaded once, on the job's driver, into float32/int64 tensors with a seeded train/validation split and
standardised with the training set's mean and standard deviation; the workers receive the result through Ray's
object store (so npz files need only be readable where the job is launched, and a bad file fails before any
worker starts).

`.npz` files are read with `allow_pickle=False`: object arrays (pickles) are refused, never executed.
"""

from __future__ import annotations

import importlib.util
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.data_location import resolve_npz_path
from service.spec import DatasetSpec

logger = logging.getLogger(__name__)

__all__ = ["DataSplits", "load_data"]

#: The most classes an npz label array may use (labels are 0..K-1).
MAX_CLASSES = 1000


@dataclass(frozen=True)
class DataSplits:
    """Standardised training and validation tensors of one job.

    Attributes:
        x_train, y_train: training samples `(N, *sample_shape)` float32 and labels `(N,)` int64.
        x_val, y_val: held-out validation samples and labels.
        num_classes: number of classes (labels lie in `0..num_classes-1`).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(self.x_train.shape[1:])


def load_data(spec: DatasetSpec, seed: int, data_root: Path | str | None = None) -> DataSplits:
    """Load the data set a spec describes, split it (seeded) and standardise it.

    Args:
        spec: the job's `dataset` section.
        seed: the job's seed; the same seed gives the same split and the same synthetic samples.
        data_root: directory that `npz` paths are resolved against (required for `npz`).

    Raises:
        ValueError: a missing data root, a path outside it, or a file whose arrays have the wrong keys, shapes or
            dtypes (the message names what was expected and what was found).
    """
    if spec.kind == "digits":
        x, y = _digits()
        x_train, y_train, x_val, y_val = _split(x, y, spec.val_fraction, seed)
        num_classes = 10
    elif spec.kind == "synthetic":
        x, y = _synthetic(spec.num_samples, spec.num_classes, tuple(spec.input_shape), seed)
        x_train, y_train, x_val, y_val = _split(x, y, spec.val_fraction, seed)
        num_classes = spec.num_classes
    elif spec.kind == "npz":
        if data_root is None:
            raise ValueError(
                "dataset.kind 'npz' needs a data root: configure the service's data_root (SYNCBN_DATA_ROOT) or "
                "pass --data-root to the CLI."
            )
        if spec.path is None:  # guarded by the spec validator; kept for type narrowing
            raise ValueError("dataset.path is required when dataset.kind is 'npz'.")
        path = resolve_npz_path(spec.path, data_root)
        x_train, y_train, x_val, y_val, num_classes = _npz(path, spec.val_fraction, seed)
    else:
        raise ValueError(f"dataset.kind {spec.kind!r} is streamed through Ray Data, not loaded into memory.")
    mean, std = float(x_train.mean()), float(x_train.std())
    std = std if std > 1e-12 else 1.0
    return DataSplits(
        x_train=((x_train - mean) / std).contiguous(),
        y_train=y_train,
        x_val=((x_val - mean) / std).contiguous(),
        y_val=y_val,
        num_classes=num_classes,
    )


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits as `(1797, 1, 8, 8)` floats in [0, 1] and int64 labels.

    Read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`: 64 pixel values from 0 to 16,
    then the label, per row), found without importing scikit-learn: `import sklearn.datasets` costs ~1.2 s of CPU
    on the job driver's way to its first step, reading the file 0.02 s. `load_digits()` when the file is elsewhere.
    """
    found = importlib.util.find_spec("sklearn")
    path = Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz" if found and found.origin else None
    if path is not None and path.is_file():
        rows = np.loadtxt(path, delimiter=",")
        data, target = rows[:, :-1], rows[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        data, target = bunch.data, bunch.target
    x = torch.from_numpy(data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, torch.from_numpy(target.astype(np.int64))


def _synthetic(
    num_samples: int, num_classes: int, shape: tuple[int, ...], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded class-conditional Gaussians: one random prototype per class plus unit noise.

    The prototypes are scaled so that classes overlap somewhat (a model needs a few epochs to separate them)
    and every sample gets a random brightness offset, so per-batch statistics vary as they do in real images.
    """
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn((num_classes, *shape), generator=gen) * 0.5
    labels = torch.randint(0, num_classes, (num_samples,), generator=gen)
    noise = torch.randn((num_samples, *shape), generator=gen)
    offset = torch.randn((num_samples,) + (1,) * len(shape), generator=gen) * 0.5
    return prototypes[labels] + noise + offset, labels


def _split(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random split: `round(N * val_fraction)` samples (at least one) go to validation."""
    n = x.shape[0]
    n_val = max(1, round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _npz(
    path: Path, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Read and check a user's npz file: `x`/`y`, optionally `x_val`/`y_val`."""
    if not zipfile.is_zipfile(path):  # np.load would otherwise try the file as a (refused) pickle or .npy
        raise ValueError(
            f"dataset.path {path.name!r} is not a readable .npz file (not a zip archive): save it with np.savez."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise ValueError(
            f"dataset.path {path.name!r}: could not read the arrays without pickle ({exc}): save numeric arrays "
            "only, e.g. np.savez(path, x=x.astype('float32'), y=y.astype('int64'))."
        ) from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"dataset.path {path.name!r} is not a readable .npz file ({exc}).") from exc

    for key in ("x", "y"):
        if key not in arrays:
            raise ValueError(
                f"dataset.path {path.name!r} must hold arrays 'x' and 'y' (found {sorted(arrays)}): "
                "save them with np.savez(path, x=..., y=...)."
            )
    has_val = "x_val" in arrays or "y_val" in arrays
    if has_val and not ("x_val" in arrays and "y_val" in arrays):
        raise ValueError(f"dataset.path {path.name!r} must hold both 'x_val' and 'y_val', or neither.")

    x, y = _check_pair(path.name, "x", "y", arrays["x"], arrays["y"])
    if has_val:
        x_val, y_val = _check_pair(path.name, "x_val", "y_val", arrays["x_val"], arrays["y_val"])
        if x_val.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"dataset.path {path.name!r}: 'x_val' samples have shape {tuple(x_val.shape[1:])}, expected "
                f"{tuple(x.shape[1:])} like 'x'."
            )
        x_train, y_train = x, y
    else:
        if x.shape[0] < 2:
            raise ValueError(f"dataset.path {path.name!r}: need at least 2 samples to hold some out (got 1).")
        x_train, y_train, x_val, y_val = _split(x, y, val_fraction, seed)
    num_classes = int(max(int(y_train.max()), int(y_val.max()))) + 1
    logger.info("loaded %s: %d train, %d val, %d classes", path.name, len(y_train), len(y_val), num_classes)
    return x_train, y_train, x_val, y_val, num_classes


def _check_pair(file: str, x_key: str, y_key: str, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Check one (samples, labels) pair and convert it to float32/int64 tensors."""
    if x.dtype.kind not in "fiub":
        raise ValueError(f"dataset.path {file!r}: {x_key!r} must be numeric, got dtype {x.dtype}.")
    if x.ndim not in (2, 3, 4):
        raise ValueError(
            f"dataset.path {file!r}: {x_key!r} must have shape (N, features), (N, H, W) or (N, C, H, W), "
            f"got shape {x.shape}."
        )
    if x.shape[0] == 0:
        raise ValueError(f"dataset.path {file!r}: {x_key!r} holds no samples.")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"dataset.path {file!r}: {y_key!r} must have shape ({x.shape[0]},) to match {x_key!r}, got {y.shape}."
        )
    if y.dtype.kind not in "iub":
        raise ValueError(
            f"dataset.path {file!r}: {y_key!r} must hold integer class labels, got dtype {y.dtype}: convert with "
            "y.astype('int64')."
        )
    if int(y.min()) < 0 or int(y.max()) >= MAX_CLASSES:
        raise ValueError(
            f"dataset.path {file!r}: {y_key!r} labels must lie in 0..{MAX_CLASSES - 1}, got {int(y.min())}.."
            f"{int(y.max())}."
        )
    features = x.astype(np.float32)
    if not np.isfinite(features).all():
        raise ValueError(f"dataset.path {file!r}: {x_key!r} contains NaN or infinite values.")
    tensor = torch.from_numpy(features)
    if tensor.dim() == 3:  # (N, H, W): one channel
        tensor = tensor.unsqueeze(1)
    return tensor, torch.from_numpy(y.astype(np.int64))
