"""image_folder: a folder `<class_name>/<image files>` (png, jpeg) streamed through Ray Data.

On the driver only the file *names* of the images below each class folder are listed, at any depth as in
torchvision's `ImageFolder` (`dog/session_2/x.png` is a dog; classes sorted by name give labels 0..K-1, each
file's split is a seeded hash of its relative path); the pixels are read, decoded
and resized by `ray.data.read_images` in Ray Data's CPU tasks and normalised by a `map_batches` transform, one
block at a time. Files are read in a new seeded order
every epoch (`FileShuffleConfig(reseed_after_execution=True)`: each epoch is a new execution).

Local folders must lie under the data root, and so must every file in them: a symlink inside the folder that leads
out of the root is refused with its name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from service.data_location import resolve_data_uri, uri_scheme
from service.engine.data.image_batches import LabelFolderImages, is_validation_path
from service.engine.data.source import DataInfo, PreparedData
from service.spec import DatasetSpec

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "prepare"]

#: File name endings read as images (case-insensitive); other files are ignored, as torchvision's ImageFolder does.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def prepare(
    spec: DatasetSpec, seed: int, data_root: Path | str | None, allowed_schemes: Sequence[str] = ()
) -> PreparedData:
    """List the folder(s), split them and build the lazy Ray Data datasets for train and validation.

    Raises:
        ValueError: a location outside the root, a missing or empty folder, a folder without class folders, or a
            validation folder with classes the training folder lacks (each message names the field or file).
    """
    import ray.data
    from ray.data import FileShuffleConfig

    if spec.uri is None or spec.image_size is None:  # guarded by the spec validator; kept for type narrowing
        raise ValueError("dataset.uri and dataset.image_size are required for image_folder data.")
    root = None if data_root is None else Path(data_root).resolve()
    location = resolve_data_uri(spec.uri, root, allowed_schemes, "dataset.uri")
    filesystem, base, classes, files = _list_folder(location, spec.uri, "dataset.uri", root)
    val_filesystem, val_base = filesystem, base
    if spec.val_uri is not None:
        val_location = resolve_data_uri(spec.val_uri, root, allowed_schemes, "dataset.val_uri")
        val_filesystem, val_base, val_classes, val_files = _list_folder(
            val_location, spec.val_uri, "dataset.val_uri", root
        )
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise ValueError(
                f"dataset.val_uri {spec.val_uri!r} has class folders the training folder lacks: {unknown[:5]}: "
                "give both folders the same classes."
            )
        train_files = [path for path, _ in files]
        val_paths = [path for path, _ in val_files]
    else:
        train_files, val_paths = [], []
        for path, relative in files:
            (val_paths if is_validation_path(relative, seed, spec.val_fraction) else train_files).append(path)
    if not train_files or not val_paths:
        raise ValueError(
            f"dataset.uri {spec.uri!r}: the split left {len(train_files)} training and {len(val_paths)} validation "
            "images: add images, or change dataset.val_fraction."
        )
    mode = "L" if spec.channels == 1 else "RGB"
    size = (spec.image_size[0], spec.image_size[1])

    def dataset(fs: Any, folder: str, paths: list[str], shuffle: Any) -> Any:
        label = LabelFolderImages(classes, folder, spec.channels, spec.mean, spec.std)
        return ray.data.read_images(
            paths, filesystem=fs, size=size, mode=mode, include_paths=True, shuffle=shuffle
        ).map_batches(label, batch_format="numpy")

    train = dataset(filesystem, base, train_files, FileShuffleConfig(seed=seed, reseed_after_execution=True))
    val = dataset(val_filesystem, val_base, val_paths, None)
    info = DataInfo(
        sample_shape=(spec.channels, *size),
        num_classes=len(classes),
        train_size=len(train_files),
        val_size=len(val_paths),
        streamed=True,
    )
    logger.info(
        "image_folder %s: %d classes, %d train, %d val", spec.uri, len(classes), *map(len, (train_files, val_paths))
    )
    return PreparedData(info=info, datasets={"train": train, "val": val})


def _list_folder(
    location: str, given: str, field: str, root: Path | None
) -> tuple[Any, str, list[str], list[tuple[str, str]]]:
    """The filesystem, the folder's path on it, the sorted class names and `(path, class/relative path)` of every
    image below a class folder (at any depth)."""
    import pyarrow.fs as pafs

    if uri_scheme(location) is None:
        filesystem: Any = pafs.LocalFileSystem()
        base = location
    else:
        filesystem, base = pafs.FileSystem.from_uri(location)
    info = filesystem.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"{field} {given!r} does not exist: create the folder <class_name>/<image files> there.")
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"{field} {given!r} is not a folder: image_folder expects <class_name>/<image files>.")
    entries = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    base_parts = len(PurePosixPath(base).parts)
    classes: set[str] = set()
    files: list[tuple[str, str]] = []
    for entry in entries:
        parts = PurePosixPath(entry.path).parts[base_parts:]
        if entry.type == pafs.FileType.Directory and len(parts) == 1:
            classes.add(parts[0])
        if entry.type != pafs.FileType.File or len(parts) < 2 or not entry.path.lower().endswith(IMAGE_SUFFIXES):
            continue
        if root is not None and uri_scheme(location) is None and not Path(entry.path).resolve().is_relative_to(root):
            raise ValueError(
                f"{field} {given!r}: {'/'.join(parts)} is a link that leads out of the data root: "
                "copy the file itself into the folder."
            )
        files.append((entry.path, "/".join(parts)))
    if not classes:
        raise ValueError(f"{field} {given!r} holds no class folders: lay the images out as <class_name>/<image files>.")
    if not files:
        raise ValueError(f"{field} {given!r} holds no png or jpeg images in its class folders {sorted(classes)[:5]}.")
    empty = sorted(classes - {PurePosixPath(rel).parts[0] for _, rel in files})
    if empty:
        raise ValueError(
            f"{field} {given!r}: class folder {empty[0]!r} holds no png or jpeg images: add images or remove it."
        )
    files.sort()
    return filesystem, base, sorted(classes), files
