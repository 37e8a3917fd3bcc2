"""The streamed data sources on a real local Ray: an image folder and Parquet files made from scikit-learn's digits
are listed, split (seeded, disjoint, complete), decoded and normalised by Ray Data to exactly the original pixels;
bad data (a missing or empty folder, a link out of the root, a missing or mistyped column, an undecodable image)
is refused with a message naming the folder, file or column."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.engine.data import PreparedData, prepare_data
from service.spec import DatasetSpec
from tests.service.digits_files import digits_pixels, png_bytes, write_digits_folder, write_digits_parquet

pytestmark = pytest.mark.timeout(180)

FOLDER = {"kind": "image_folder", "uri": "digits", "image_size": [8, 8], "channels": 1}
PARQUET = {"kind": "parquet", "uri": "digits_parquet", "image_size": [8, 8], "channels": 1}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data-root")
    write_digits_folder(root / "digits")
    write_digits_parquet(root / "digits_parquet", files=3)
    return root


def _rows(prepared: PreparedData, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Every (x, y) of one dataset (small here: the digits)."""
    xs, ys = [], []
    for batch in prepared.datasets[name].iter_batches(batch_size=512, batch_format="numpy"):
        xs.append(batch["x"])
        ys.append(batch["y"])
    return np.concatenate(xs), np.concatenate(ys)


def _check_digits(prepared: PreparedData) -> None:
    """Sizes, classes, and every validation sample is exactly one of the digits, with its own label."""
    info = prepared.info
    assert info.num_classes == 10 and info.sample_shape == (1, 8, 8) and info.streamed
    assert info.train_size + info.val_size == 1797 and 250 < info.val_size < 470
    x_val, y_val = _rows(prepared, "val")
    assert x_val.shape == (info.val_size, 1, 8, 8) and x_val.dtype == np.float32 and y_val.dtype == np.int64
    pixels = (x_val * 0.5 + 0.5) * 255.0  # undo the default normalisation (p / 255 - 0.5) / 0.5
    assert np.allclose(pixels, np.round(pixels), atol=1e-3), "pixels are not whole values: resampled or rescaled"
    flat = np.round(pixels).astype(np.int64).reshape(len(y_val), -1)
    decoded = {(int(y), tuple(p)) for y, p in zip(y_val, flat, strict=True)}
    originals, labels = digits_pixels()
    flat_originals = originals.astype(np.int64).reshape(len(labels), -1)
    known = {(int(y), tuple(p)) for y, p in zip(labels, flat_originals, strict=True)}
    assert decoded <= known, "a decoded image or its label does not match the digit it was made from"
    assert len(decoded) > 0.95 * info.val_size  # distinct samples (a few digits share their pixels)


def test_image_folder_lists_splits_and_decodes_the_digits(ray_cluster: dict, root: Path) -> None:
    spec = DatasetSpec(**FOLDER)
    prepared = prepare_data(spec, seed=0, data_root=root)
    _check_digits(prepared)
    again = prepare_data(spec, seed=0, data_root=root)
    assert (again.info.train_size, again.info.val_size) == (prepared.info.train_size, prepared.info.val_size)
    assert prepare_data(spec, seed=1, data_root=root).info.val_size != prepared.info.val_size
    _, y_train = _rows(prepared, "train")
    assert len(y_train) == prepared.info.train_size and set(y_train.tolist()) == set(range(10))


def test_image_folder_reads_images_in_sub_folders_of_a_class(ray_cluster: dict, tmp_path: Path) -> None:
    """As torchvision's ImageFolder: every image below a class folder belongs to it, however deep, and the class
    is the top folder (a sub-folder named like another class changes nothing)."""
    folder = write_digits_folder(tmp_path / "nested", count=120)
    moved = 0
    for index, image in enumerate(sorted(folder.glob("digit_*/*.png"))):
        other = "digit_0" if image.parent.name != "digit_0" else "digit_1"
        sub = [None, Path("session_a"), Path("session_b") / "deeper", Path(other)][index % 4]
        if sub is not None:
            (image.parent / sub).mkdir(parents=True, exist_ok=True)
            image.rename(image.parent / sub / image.name)
            moved += 1
    assert moved >= 80
    prepared = prepare_data(
        DatasetSpec(**{**FOLDER, "uri": "nested", "val_fraction": 0.25}), seed=0, data_root=tmp_path
    )
    assert prepared.info.train_size + prepared.info.val_size == 120 and prepared.info.num_classes == 10
    originals, labels = digits_pixels()
    known = {tuple(originals[i].astype(np.int64).reshape(-1)): int(labels[i]) for i in range(120)}
    for name in ("train", "val"):
        x, y = _rows(prepared, name)
        pixels = np.round((x * 0.5 + 0.5) * 255.0).astype(np.int64).reshape(len(y), -1)
        assert [known[tuple(p)] for p in pixels] == y.tolist(), f"{name}: an image got another folder's label"


def test_parquet_counts_the_split_reads_the_classes_and_decodes(ray_cluster: dict, root: Path) -> None:
    prepared = prepare_data(DatasetSpec(**PARQUET), seed=0, data_root=root)
    _check_digits(prepared)
    _, y_train = _rows(prepared, "train")
    assert len(y_train) == prepared.info.train_size  # the streamed split matches the driver's count exactly


def test_parquet_with_a_separate_validation_file(ray_cluster: dict, root: Path) -> None:
    spec = DatasetSpec(
        **{**PARQUET, "uri": "digits_parquet/part-1.parquet", "val_uri": "digits_parquet/part-0.parquet"}
    )
    prepared = prepare_data(spec, seed=0, data_root=root)
    assert prepared.info.val_size == pq.read_metadata(root / "digits_parquet" / "part-0.parquet").num_rows
    assert prepared.info.train_size == pq.read_metadata(root / "digits_parquet" / "part-1.parquet").num_rows
    assert prepared.info.num_classes == 10


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "dataset.uri 'case' does not exist"),
        ("file", "dataset.uri 'case' is not a folder"),
        ("empty", "dataset.uri 'case' holds no class folders"),
        ("no_images", "class folder 'b' holds no png or jpeg images"),
        ("link_out", "dataset.uri 'case': a/0.png is a link that leads out of the data root"),
    ],
)
def test_bad_image_folders_are_refused_naming_the_folder_or_file(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    case = root / "case"
    if layout == "file":
        case.write_bytes(b"x")
    elif layout != "missing":
        case.mkdir()
    if layout in ("no_images", "link_out"):
        (case / "a").mkdir()
        (case / "b").mkdir()
        (case / "b" / "notes.txt").write_text("not an image")
        outside = tmp_path / "outside.png"
        outside.write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
        if layout == "link_out":
            os.symlink(outside, case / "a" / "0.png")
            (case / "b" / "1.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
        else:
            (case / "a" / "0.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    with pytest.raises(ValueError, match=message):
        prepare_data(DatasetSpec(**{**FOLDER, "uri": "case"}), seed=0, data_root=root)


@pytest.mark.parametrize(
    ("columns", "spec_fields", "message"),
    [
        ({"img": pa.binary(), "label": pa.int64()}, {}, "dataset.image_column 'image' is not a column"),
        ({"image": pa.binary(), "y": pa.int64()}, {}, "dataset.label_column 'label' is not a column"),
        ({"image": pa.binary(), "label": pa.string()}, {}, "dataset.label_column 'label' must hold integer"),
        ({"image": pa.string(), "label": pa.int64()}, {}, "dataset.image_column 'image' must hold encoded image"),
        ({"pic": pa.binary(), "label": pa.int64()}, {"image_column": "photo"}, "dataset.image_column 'photo'"),
    ],
)
def test_bad_parquet_columns_are_refused_naming_the_column(
    tmp_path: Path, columns: dict, spec_fields: dict, message: str
) -> None:
    arrays = {
        name: pa.array([b"x" if kind == pa.binary() else ("1" if kind == pa.string() else 1)] * 4, type=kind)
        for name, kind in columns.items()
    }
    pq.write_table(pa.table(arrays), tmp_path / "bad.parquet")
    spec = DatasetSpec(**{**PARQUET, "uri": "bad.parquet", **spec_fields})
    with pytest.raises(ValueError, match=message):
        prepare_data(spec, seed=0, data_root=tmp_path)


def test_parquet_labels_out_of_range_are_refused(ray_cluster: dict, tmp_path: Path) -> None:
    image = png_bytes(np.zeros((8, 8), np.uint8))
    pq.write_table(pa.table({"image": [image] * 8, "label": [0, 1, -1, 2, 0, 1, 2, 0]}), tmp_path / "neg.parquet")
    with pytest.raises(ValueError, match=r"dataset.label_column 'label' labels must lie in 0..999, got -1..2"):
        prepare_data(DatasetSpec(**{**PARQUET, "uri": "neg.parquet"}), seed=0, data_root=tmp_path)


def test_parquet_null_labels_are_refused_with_their_count(ray_cluster: dict, tmp_path: Path) -> None:
    image = png_bytes(np.zeros((8, 8), np.uint8))
    labels = pa.array([0, 1, None, 2, 0, None, 2, 0], type=pa.int64())
    pq.write_table(pa.table({"image": [image] * 8, "label": labels}), tmp_path / "holes.parquet")
    message = r"dataset.label_column 'label' has 2 null labels in 'holes.parquet': fill them in or drop those rows"
    with pytest.raises(ValueError, match=message):
        prepare_data(DatasetSpec(**{**PARQUET, "uri": "holes.parquet"}), seed=0, data_root=tmp_path)


def test_an_undecodable_image_fails_the_read_naming_the_file(ray_cluster: dict, tmp_path: Path) -> None:
    write_digits_folder(tmp_path / "digits", count=40)
    (tmp_path / "digits" / "digit_3" / "broken.png").write_bytes(b"this is not a png")
    prepared = prepare_data(DatasetSpec(**{**FOLDER, "val_fraction": 0.5}), seed=0, data_root=tmp_path)
    with pytest.raises(Exception, match=r"broken\.png"):
        for name in ("train", "val"):
            _rows(prepared, name)

    good = png_bytes(np.zeros((8, 8), np.uint8))
    pq.write_table(
        pa.table({"image": [good] * 10 + [b"garbage"], "label": list(range(2)) * 5 + [0]}), tmp_path / "broken.parquet"
    )
    prepared = prepare_data(DatasetSpec(**{**PARQUET, "uri": "broken.parquet", "val_fraction": 0.5}), 0, tmp_path)
    with pytest.raises(
        Exception, match=r"dataset.image_column 'image' holds a value that is not a decodable .*broken\.parquet"
    ):
        for name in ("train", "val"):
            _rows(prepared, name)
