"""Blob exporters: where checkpoint bytes go.

A blob exporter is as small as OpenTelemetry's SpanExporter: ``put`` bytes
under a key and get back a URI, ``get`` by URI, ``list`` keys under a prefix,
``delete``. Puts are write-once and atomic: a reader never sees part of a
blob, and a second put to the same key raises BlobExistsError.

Exporters are chosen by URI: ``memory://``, ``file:///path`` (or a plain path).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from multirun.errors import CheckpointError, ConfigurationError


class BlobExistsError(CheckpointError):
    """Another writer already put a blob under this key: one wins, the other gets this."""


class BlobNotFoundError(CheckpointError):
    """No blob at that URI or key."""


@runtime_checkable
class BlobExporter(Protocol):
    """Stores checkpoint blobs. Implementations must make ``put`` write-once and atomic."""

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` and return its URI; BlobExistsError if the key is taken."""
        ...

    def get(self, uri: str) -> bytes:
        """The bytes stored at ``uri`` (as returned by ``put``); BlobNotFoundError if absent."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """The keys that start with ``prefix``, sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob under ``key``; nothing happens if there is none."""
        ...


_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")


def validate_key(key: str) -> str:
    """Refuse keys that could leave the store: ``..``, absolute paths, NUL, control characters."""
    if not isinstance(key, str) or not key or len(key) > 512:
        raise CheckpointError(f"invalid blob key {key!r}: must be 1 to 512 characters")
    if not _KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise CheckpointError(
            f"invalid blob key {key!r}: use letters, digits, '_', '-', '.' and '/' separators, "
            "no '..' and no leading '/'"
        )
    return key


class MemoryBlobExporter:
    """Keeps blobs in a dict: for tests and short-lived processes."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _key(self, uri: str) -> str:
        prefix = f"memory://{self.name}/"
        return uri[len(prefix) :] if uri.startswith(prefix) else uri

    def put(self, key: str, data: bytes) -> str:
        validate_key(key)
        with self._lock:
            if key in self._blobs:
                raise BlobExistsError(f"a blob already exists under {key!r}")
            self._blobs[key] = bytes(data)
        return f"memory://{self.name}/{key}"

    def get(self, uri: str) -> bytes:
        key = self._key(uri)
        with self._lock:
            try:
                return self._blobs[key]
            except KeyError:
                raise BlobNotFoundError(f"no blob at {uri}") from None

    def list(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(k for k in self._blobs if k.startswith(prefix))

    def delete(self, key: str) -> None:
        with self._lock:
            self._blobs.pop(self._key(key), None)


class FileBlobExporter:
    """Keeps blobs as files under a folder: temp file, fsync, then an atomic no-replace link."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).absolute()

    def _path(self, key: str) -> Path:
        return self.directory.joinpath(*validate_key(key).split("/"))

    def _key(self, uri: str) -> str:
        if uri.startswith("file://"):
            path = Path(unquote(urlparse(uri).path))
            try:
                return path.relative_to(self.directory).as_posix()
            except ValueError:
                raise BlobNotFoundError(f"{uri} is not inside {self.directory}") from None
        return uri

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            try:
                # link() fails if the target exists: write-once even between processes
                os.link(tmp, path)
            except FileExistsError:
                raise BlobExistsError(f"a blob already exists under {key!r}") from None
        finally:
            os.unlink(tmp)
        _fsync_dir(path.parent)
        return path.as_uri()

    def get(self, uri: str) -> bytes:
        path = self._path(self._key(uri))
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(f"no blob at {uri}") from None

    def list(self, prefix: str = "") -> list[str]:
        if not self.directory.is_dir():
            return []
        keys = []
        for root, _dirs, files in os.walk(self.directory):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = Path(root, name).relative_to(self.directory).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(self._key(key)).unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exporter_from_uri(uri: str) -> BlobExporter:
    """The blob exporter for ``uri``: ``memory://name``, ``file:///path`` or a plain path."""
    if not isinstance(uri, str) or not uri:
        raise ConfigurationError(f"checkpoint_uri must be a non-empty string, got {uri!r}")
    parsed = urlparse(uri)
    if parsed.scheme == "memory":
        return MemoryBlobExporter(parsed.netloc or "default")
    if parsed.scheme == "file":
        return FileBlobExporter(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return FileBlobExporter(uri)
    raise ConfigurationError(
        f"checkpoint_uri {uri!r}: unknown scheme {parsed.scheme!r}; use memory://, file:// or a path"
    )
