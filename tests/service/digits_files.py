"""Real image data on disk for the data tests and benchmarks: scikit-learn's digits written as an image folder
(`<class>/<index>.png`, grey 8x8 png files) or as Parquet files of encoded png bytes and integer labels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

__all__ = ["digits_pixels", "png_bytes", "write_digits_folder", "write_digits_parquet"]


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8 `(N, 8, 8)` pixels in 0..255 and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.round(bunch.images * 255.0 / 16.0).astype(np.uint8), bunch.target.astype(np.int64)


def png_bytes(pixels: np.ndarray) -> bytes:
    """One grey image encoded as png."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_digits_folder(folder: Path, count: int | None = None) -> Path:
    """`folder/digit_<label>/<index>.png` for the first `count` digits (all by default); returns `folder`."""
    pixels, labels = digits_pixels()
    for index in range(len(labels) if count is None else count):
        target = folder / f"digit_{labels[index]}"
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{index:04d}.png").write_bytes(png_bytes(pixels[index]))
    return folder


def write_digits_parquet(
    folder: Path,
    files: int = 2,
    image_column: str = "image",
    label_column: str = "label",
    row_group_rows: int | None = None,
) -> Path:
    """The digits as `files` Parquet files (`part-<i>.parquet`) of png bytes and labels, in row groups of
    `row_group_rows` rows (default: one per file); returns `folder`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pixels, labels = digits_pixels()
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in enumerate(np.array_split(np.arange(len(labels)), files)):
        table = pa.table(
            {
                image_column: pa.array([png_bytes(pixels[i]) for i in rows], type=pa.binary()),
                label_column: pa.array(labels[rows], type=pa.int64()),
            }
        )
        pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=row_group_rows)
    return folder
