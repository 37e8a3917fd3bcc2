"""Where a job's data may come from: the one place that checks and resolves data paths and URIs.

A spec names its data relative to the operator's data root (`SYNCBN_DATA_ROOT` / `--data-root`), or as an
`s3://` / `gs://` URI when the operator allows that scheme. Two stages, both here:

- syntax (`check_data_uri`, `check_npz_path`), run by the spec's validators without any settings: no absolute
  paths, no `..`, no backslashes or NUL bytes, and only the schemes the service knows how to read;
- resolution (`resolve_data_uri`, `resolve_npz_path`), run where the root and the allowed schemes are known (the
  service's submit check, and the job's driver before it reads anything): symlinks are followed and the result
  must still lie under the root; a scheme the operator did not allow is refused.

Every refusal is a `ValueError` whose sentence names the spec field (`dataset.uri`, ...) and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "KNOWN_SCHEMES",
    "check_data_uri",
    "check_dataset_locations",
    "check_npz_path",
    "resolve_data_uri",
    "resolve_npz_path",
    "uri_scheme",
]

#: Remote schemes the service can read through pyarrow's filesystems (each must also be allowed by the operator).
KNOWN_SCHEMES: frozenset[str] = frozenset({"s3", "gs"})


def uri_scheme(uri: str) -> str | None:
    """The scheme of `scheme://...`, lower-cased, or None for a plain relative path."""
    scheme, sep, _ = uri.partition("://")
    return scheme.lower() if sep else None


def _check_relative(path: str, field: str) -> PurePosixPath:
    """Refuse absolute paths, `..` components and odd characters; returns the path's parts."""
    if not path or path.strip() != path:
        raise ValueError(f"{field} must be a non-empty relative path without surrounding spaces (got {path!r}).")
    if "\\" in path or "\x00" in path:
        raise ValueError(f"{field} must use '/' separators and no NUL bytes (got {path!r}).")
    pure = PurePosixPath(path)
    if pure.is_absolute() or (len(path) > 1 and path[1] == ":"):
        raise ValueError(
            f"{field} must be relative to the data root (got the absolute path {path!r}): "
            "drop the leading '/' and place the data under the data root."
        )
    if ".." in pure.parts:
        raise ValueError(
            f"{field} must stay under the data root (got {path!r}, which contains '..'): "
            "place the data under the data root and give its path from there."
        )
    return pure


def check_npz_path(path: str, field: str = "dataset.path") -> None:
    """Syntax of an npz data set's path: relative, under the root, ending in `.npz`."""
    if _check_relative(path, field).suffix != ".npz":
        raise ValueError(f"{field} must name a .npz file (got {path!r}).")


def check_data_uri(uri: str, field: str) -> None:
    """Syntax of a data URI: a relative path under the data root, or `s3://bucket/...` / `gs://bucket/...`."""
    scheme = uri_scheme(uri)
    if scheme is None:
        if ":" in uri.split("/", 1)[0] and not (len(uri) > 1 and uri[1] == ":"):
            raise ValueError(
                f"{field} must be a path relative to the data root or an s3:// or gs:// URI (got {uri!r})."
            )
        _check_relative(uri, field)
        return
    if scheme not in KNOWN_SCHEMES:
        raise ValueError(
            f"{field} uses the scheme {scheme!r}, which the service cannot read (got {uri!r}): give a path "
            f"relative to the data root, or one of {', '.join(s + '://' for s in sorted(KNOWN_SCHEMES))}."
        )
    rest = uri.split("://", 1)[1]
    if not rest.split("/", 1)[0] or "\x00" in rest or ".." in PurePosixPath(rest).parts:
        raise ValueError(f"{field} must look like {scheme}://bucket/path, without '..' (got {uri!r}).")


def resolve_data_uri(
    uri: str, data_root: Path | str | None, allowed_schemes: Sequence[str] = (), field: str = "dataset.uri"
) -> str:
    """Resolve a spec's data URI: an absolute local path under the root, or the remote URI when its scheme is allowed.

    Symlinks are followed before the check, so a link inside the root that leads out is refused. Whether the path
    exists is not checked here: a missing folder fails the job with a message naming it.

    Args:
        uri: the spec's `dataset.uri` or `dataset.val_uri`.
        data_root: the folder the operator allows data to be read from (None: none configured).
        allowed_schemes: remote schemes the operator allows (e.g. `["s3"]`).
        field: the spec field, for messages.

    Raises:
        ValueError: a refused scheme, a path outside the root, or no root configured.
    """
    check_data_uri(uri, field)
    scheme = uri_scheme(uri)
    if scheme is not None:
        allowed = {s.lower() for s in allowed_schemes}
        if scheme not in allowed:
            raise ValueError(
                f"{field} uses {scheme}://, which this service does not allow (allowed: "
                f"{', '.join(sorted(allowed)) or 'none'}): give a path relative to the data root, or ask the "
                f"operator to add {scheme!r} to allowed_uri_schemes (SYNCBN_ALLOWED_URI_SCHEMES)."
            )
        return uri
    if data_root is None:
        raise ValueError(
            f"{field} is a path relative to the data root, but no data root is configured: set SYNCBN_DATA_ROOT "
            "for the service or pass --data-root to `syncbn train`."
        )
    root = Path(data_root).resolve()
    resolved = (root / uri).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(
            f"{field} {uri!r} resolves to {resolved}, outside the data root {root}: "
            "place the data itself under the data root (symlinks may not lead out of it)."
        )
    return str(resolved)


def resolve_npz_path(path: str, data_root: Path | str, field: str = "dataset.path") -> Path:
    """Resolve a spec's relative npz path against the data root, refusing anything outside it or missing.

    Raises:
        ValueError: the path escapes the root (symlinks followed), or no such file exists.
    """
    check_npz_path(path, field)
    root = Path(data_root).resolve()
    resolved = Path(resolve_data_uri(path, root, (), field))
    if not resolved.is_file():
        raise ValueError(f"{field} {path!r} does not exist under the data root {root}: upload it there first.")
    return resolved


def check_dataset_locations(dataset: Any, data_root: Path | str | None, allowed_schemes: Sequence[str] = ()) -> None:
    """Resolve every location a `DatasetSpec` names (the submit-time check of the service: a refusal is a 422).

    npz files must exist (as before); image folders and Parquet data are only confined here, and a missing one
    fails the job with a message that names it.
    """
    if dataset.kind == "npz" and dataset.path is not None:
        if data_root is None:
            raise ValueError("dataset.path needs a data root: set SYNCBN_DATA_ROOT or pass --data-root.")
        resolve_npz_path(dataset.path, data_root)
    for field in ("uri", "val_uri"):
        value = getattr(dataset, field, None)
        if value is not None:
            resolve_data_uri(value, data_root, allowed_schemes, f"dataset.{field}")
