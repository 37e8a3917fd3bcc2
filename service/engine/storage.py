"""Run storage: where Ray Train keeps a run's checkpoints and its final model, so they outlive any one node.

A storage URI is a local folder (an NFS mount on a multi-node cluster, so every node writes to the same place) or
an `s3://` / `gs://` bucket prefix, read and written through pyarrow's filesystems (the ones Ray Train uses).
Each launch of a job gets its own folder, `<storage>/syncbn-<job_id>/`, then `syncbn-<job_id>-r<n>/` for the
n-th relaunch after a service restart (Ray Train's `RunConfig(storage_path=<storage>, name=...)`): checkpoints
go to its `checkpoint_*` folders, and the final model is `model.pt` in the last checkpoint, uploaded by Ray from
rank 0's node when it reports. Whoever reads a model afterwards (the service, `syncbn train`) reads it from
storage, never from the disk of the node that trained.

Paths read back (a job's recorded `model_path`) must lie inside one of that job's run folders: nothing else in
the storage, and nothing outside it, is ever served.
"""

from __future__ import annotations

import posixpath
import re
import shutil
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs

__all__ = ["MODEL_FILE", "REMOTE_SCHEMES", "RunStorage", "launch_pattern", "next_launch_name", "run_name"]

#: Name of the final model file inside the run's last checkpoint.
MODEL_FILE = "model.pt"
#: URI schemes read through pyarrow's object-store filesystems; anything else is a local path.
REMOTE_SCHEMES = ("s3", "gs")


def run_name(job_id: str) -> str:
    """Ray Train's run name (and folder under the storage) of a job's first launch."""
    return f"syncbn-{job_id}"


def launch_pattern(job_id: str) -> re.Pattern[str]:
    """The run folder names of every launch of a job: `syncbn-<job>`, then `syncbn-<job>-r<n>` for the n-th
    relaunch after a service restart (`service.engine.checkpoints`)."""
    return re.compile(rf"^{re.escape(run_name(job_id))}(-r[0-9]+)?$")


def next_launch_name(job_id: str, taken: set[str]) -> str:
    """The first launch name of a job that is not in `taken`."""
    if run_name(job_id) not in taken:
        return run_name(job_id)
    n = 1
    while f"{run_name(job_id)}-r{n}" in taken:
        n += 1
    return f"{run_name(job_id)}-r{n}"


class RunStorage:
    """One storage location: a local folder, or an `s3://`/`gs://` prefix.

    Args:
        uri: `/abs/folder`, a relative folder (resolved against the working directory), `file:///abs/folder`,
            `s3://bucket/prefix` or `gs://bucket/prefix`.

    Raises:
        ValueError: an unsupported scheme, or a URI pyarrow cannot open.
    """

    def __init__(self, uri: str) -> None:
        uri = uri.strip()
        scheme, sep, rest = uri.partition("://")
        if not sep:
            scheme, rest = "", uri
        scheme = scheme.lower()
        if scheme in REMOTE_SCHEMES:
            if not rest.strip("/"):
                raise ValueError(f"storage_uri {uri!r} names no bucket: use {scheme}://<bucket>/<prefix>.")
            try:
                self.filesystem, base = pafs.FileSystem.from_uri(uri)
            except Exception as exc:  # pyarrow raises ArrowInvalid/OSError with its own message
                raise ValueError(f"storage_uri {uri!r} cannot be opened: {exc}") from exc
            self.scheme = scheme
            self.base = base.rstrip("/")
            self.uri = f"{scheme}://{self.base}"
        elif scheme in ("", "file"):
            root = Path(rest).expanduser().resolve()
            self.filesystem = pafs.LocalFileSystem()
            self.scheme = ""
            self.base = str(root)
            self.uri = str(root)
        else:
            raise ValueError(
                f"storage_uri {uri!r} has the unsupported scheme {scheme!r}: use a local folder (e.g. an NFS "
                f"mount), or one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}."
            )

    @property
    def is_local(self) -> bool:
        """Whether this storage is a folder of this machine's file system (local disk or a mount)."""
        return self.scheme == ""

    def storage_path(self) -> str:
        """What Ray Train's `RunConfig(storage_path=...)` takes: the folder, or the URI with its scheme."""
        return self.uri

    def launch_paths(self, job_id: str) -> list[str]:
        """The run folders of every launch of a job that exist in this storage, as paths of its filesystem."""
        selector = pafs.FileSelector(self.base, allow_not_found=True, recursive=False)
        pattern = launch_pattern(job_id)
        return sorted(
            info.path
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.Directory and pattern.match(posixpath.basename(info.path.rstrip("/")))
        )

    def next_run_name(self, job_id: str) -> str:
        """The Ray Train run name of a job's next launch: one that none of its earlier launches used."""
        taken = {posixpath.basename(path.rstrip("/")) for path in self.launch_paths(job_id)}
        return next_launch_name(job_id, taken)

    def model_location(self, checkpoint_path: str) -> str:
        """The final model's location (a local path or a URI with its scheme) inside a checkpoint folder."""
        path = posixpath.join(checkpoint_path.rstrip("/"), MODEL_FILE)
        return path if self.is_local else f"{self.scheme}://{path}"

    def find_model(self, job_id: str, location: str | None) -> str | None:
        """The filesystem path of a job's final model when `location` lies in one of its run folders and exists.

        Local paths are compared after resolving symlinks, so a link that leads out of the run folder is refused.
        """
        if not location:
            return None
        pattern = launch_pattern(job_id)
        if self.is_local:
            if "://" in location:
                return None
            resolved = Path(location).resolve()
            base = Path(self.base).resolve()
            if not resolved.is_relative_to(base) or not resolved.is_file():
                return None
            parts = resolved.relative_to(base).parts
            return str(resolved) if len(parts) > 1 and pattern.match(parts[0]) else None
        prefix = f"{self.scheme}://"
        if not location.startswith(prefix):
            return None
        path = posixpath.normpath(location[len(prefix) :])
        if not path.startswith(self.base + "/") or ".." in path.split("/"):
            return None
        parts = path[len(self.base) + 1 :].split("/")
        if len(parts) < 2 or not pattern.match(parts[0]):
            return None
        info = self.filesystem.get_file_info(path)
        return path if info.type == pafs.FileType.File else None

    def local_file(self, path: str) -> Path | None:
        """The local file for a path of this storage, or None when the storage is remote."""
        return Path(path) if self.is_local else None

    def open(self, path: str) -> BinaryIO:
        """A binary stream reading a file of this storage (a path from `find_model`)."""
        return self.filesystem.open_input_stream(path)

    def copy_to(self, path: str, target: Path) -> Path:
        """Copy a file of this storage to a local file (atomically: a partial file, then a rename)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with self.open(path) as source, partial.open("wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)
        partial.replace(target)
        return target

    def delete_run(self, job_id: str) -> None:
        """Remove the run folders of every launch of a job (checkpoints and final model); nothing when none exists."""
        for run in self.launch_paths(job_id):
            self.filesystem.delete_dir(run)
