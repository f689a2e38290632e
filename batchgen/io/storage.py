"""Every byte in or out of storage goes through here: local paths and s3:// alike, via fsspec.

Writes are whole-object: small JSON documents are written in one put (atomic on S3; a temp file
plus rename on a local disk), and Parquet files are built on local disk, checked, then uploaded
whole. Nothing streams into a final key, so a crash never publishes a truncated object.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from functools import cached_property
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from batchgen.errors import StorageError

# botocore's own retry machinery handles throttling, 5xx and connection errors with back-off;
# "adaptive" also rate-limits the client when the server throttles.
_S3_RETRIES = {"max_attempts": 10, "mode": "adaptive"}


def storage_options(url: str, endpoint_url: str | None = None, extra: dict | None = None) -> dict:
    """fsspec options for ``url``: endpoint and retry settings for S3, nothing for local paths."""
    options: dict[str, Any] = dict(extra or {})
    if _protocol(url) in ("s3", "s3a"):
        if endpoint_url:
            options.setdefault("endpoint_url", endpoint_url)
        config = dict(options.pop("config_kwargs", {}) or {})
        config.setdefault("retries", _S3_RETRIES)
        options["config_kwargs"] = config
    return options


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


class Storage:
    """A root URL plus an fsspec filesystem; paths given to methods are relative to the root."""

    def __init__(self, url: str, options: dict | None = None):
        # "" would become "/" below and a job would write into the filesystem root.
        if not url.strip():
            raise StorageError("empty storage path: give a directory or an s3:// URL (is a "
                               "shell variable unset?)")
        self.url = url.rstrip("/") or "/"
        self.options = dict(options or {})

    @cached_property
    def _fs_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = url_to_fs(self.url, **self.options)
        return fs, root

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_root[0]

    @property
    def root(self) -> str:
        return self._fs_root[1]

    @property
    def is_local(self) -> bool:
        return _protocol(self.url) in ("file", "local")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def url_of(self, *parts: str) -> str:
        return posixpath.join(self.url, *parts)

    # -- reads -----------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_json(self, rel: str) -> Any:
        with self.fs.open(self.path(rel), "rb") as f:
            return json.loads(f.read())

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json_or_none(self, rel: str) -> Any:
        try:
            return self.read_json(rel)
        except FileNotFoundError:
            return None

    def list_names(self, rel: str) -> list[str]:
        """Names directly under ``rel`` in one listing call; empty if it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def open_read(self, rel: str):
        return self.fs.open(self.path(rel), "rb")

    # -- writes ----------------------------------------------------------------------------

    def ensure_writable(self) -> None:
        """Fail early, with the reason, if the output cannot be written."""
        probe = f"_batchgen/probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"ok")
            self.fs.rm(self.path(probe))
        except Exception as e:  # noqa: BLE001 - any failure here means "not writable"
            raise StorageError(f"output.path {self.url}: cannot write there: {e}") from None

    def create_bytes(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist yet; False if it does. Atomic: a create-only
        open on a local disk, a conditional PUT (``If-None-Match: *``) on S3."""
        target = self.path(rel)
        if self.is_local:
            tmp = _local_temp(target, data)
            try:
                os.link(tmp, target)  # fails if target exists; the content appears whole
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            self.fs.pipe_file(target, data, mode="create")
        except FileExistsError:
            return False
        except OSError as e:  # some servers' 412 reaches s3fs as a generic OSError
            if "precondition" in str(e).lower().replace("-", ""):
                return False
            raise
        return True

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.is_local:
            os.replace(_local_temp(target, data), target)
        else:
            self.fs.pipe_file(target, data)  # one PUT: the object appears whole or not at all

    def upload(self, local_file: str, rel: str) -> None:
        """Upload a finished local file whole, in one call."""
        target = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            self.fs.put_file(local_file, tmp)
            os.replace(tmp, target)
        else:
            self.fs.put_file(local_file, target)

    def publish(self, src_rel: str, dst_rel: str) -> None:
        """Make ``src`` visible at ``dst``: a rename on a local disk, a server-side copy on S3.

        The bytes never pass through this process. Repeating it overwrites ``dst`` rather than
        adding a second file, which is what makes a re-commit after a crash harmless.
        """
        src, dst = self.path(src_rel), self.path(dst_rel)
        if self.is_local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        else:
            self.fs.copy(src, dst)

    def remove(self, rel: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=recursive)
        except FileNotFoundError:
            pass


def _local_temp(target: str, data: bytes) -> str:
    """``data`` written to a fresh temporary file beside ``target``; returns its path."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp


def output_storage(spec) -> Storage:
    """The job's output folder (``output.path``) with the spec's storage options."""
    return Storage(spec.output.path,
                   storage_options(spec.output.path, spec.storage.endpoint_url, spec.storage.options))


def input_options(spec) -> dict:
    """fsspec options for the job's input (``input.path``)."""
    return storage_options(spec.input.path, spec.storage.endpoint_url, spec.storage.options)
