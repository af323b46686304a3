"""Paths and URLs through fsspec: the same calls for a local folder, s3://, gs://, ...

Filesystem objects are created where they are used (in each process), never shipped
between processes: async sessions bind to the event loop that first uses them.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import PipelineError


def has_scheme(url: str) -> bool:
    return "://" in url


def absolute(url: str) -> str:
    """Local paths made absolute, `..` and `.` resolved in paths and URLs alike."""
    if has_scheme(url):
        scheme, path = url.split("://", 1)
        return f"{scheme}://{posixpath.normpath(path)}" if path else url
    return os.path.abspath(os.path.expanduser(url))


def inside(url: str, root: str) -> bool:
    """Whether `url` is `root` or below it (both normalised first)."""
    url, root = absolute(url), absolute(root).rstrip("/")
    return url == root or url.startswith(root + "/")


def join_url(base: str, *parts: str) -> str:
    if has_scheme(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


# Object stores fail transiently (5xx, throttling, dropped connections); botocore's
# "standard" retry mode backs off and retries all of these. A user's own setting wins.
S3_DEFAULTS = {"config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}}}
# Other processes write markers, leases and shards while this one runs: a cached directory
# listing would hide them. Without listing caches the per-process filesystem instances can
# be reused safely (a new S3 client per call costs ~0.1 s of CPU in service-model parsing).
REMOTE_DEFAULTS = {"use_listings_cache": False}


def fs_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The fsspec options for `url`: the user's, over the defaults for its protocol."""
    if not has_scheme(url):
        return {}
    options = {**REMOTE_DEFAULTS, **(storage_options or {})}
    if url.split("://", 1)[0] in ("s3", "s3a"):
        config = {**S3_DEFAULTS["config_kwargs"], **options.get("config_kwargs", {})}
        options["config_kwargs"] = config
    return options


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **fs_options(url, storage_options))
    except ImportError as e:  # fsspec knows the protocol, its package is an optional extra
        scheme = url.split("://", 1)[0]
        if scheme in ("gs", "gcs"):
            raise PipelineError(f"{scheme}:// URLs need gcsfs, the 'gcs' extra: pip install -e '.[gcs]'") from e
        raise PipelineError(f"{scheme}:// URLs need a package that is not installed: {e}") from e


def exists(url: str, storage_options=None) -> bool:
    fs, path = url_to_fs(url, storage_options)
    return fs.exists(path)


def read_bytes(url: str, storage_options=None) -> bytes:
    fs, path = url_to_fs(url, storage_options)
    return fs.cat_file(path)


def write_bytes_atomic(url: str, data: bytes, storage_options=None) -> None:
    """Readers see the old object or the new one, never a partial write.

    Object stores give this for a single PUT; on a local disk we rename a temporary file.
    """
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_json(url: str, storage_options=None) -> Any:
    return json.loads(read_bytes(url, storage_options))


def read_json_many(urls: list[str], storage_options=None) -> dict[str, Any]:
    """Many small JSON objects in one go (concurrent requests on object storage)."""
    if not urls:
        return {}
    fs, _ = url_to_fs(urls[0], storage_options)
    paths = [url_to_fs(u, storage_options)[1] for u in urls]
    data = fs.cat(paths)
    return {u: json.loads(data[p]) for u, p in zip(urls, paths)}


def write_json(url: str, obj: Any, storage_options=None) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=1, sort_keys=True).encode(), storage_options)


def list_names(url: str, storage_options=None) -> list[str]:
    """Names (not paths) of the entries directly under a folder; empty when it does not exist."""
    fs, path = url_to_fs(url, storage_options)
    try:
        entries = fs.ls(path, detail=False, refresh=True)  # object stores cache listings otherwise
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def local_path(url: str) -> str | None:
    """The local path of a URL without a scheme (or file://), None for remote storage."""
    if not has_scheme(url):
        return os.path.abspath(url)
    if url.startswith("file://"):
        return url[len("file://"):]
    return None
